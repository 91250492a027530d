//! Validates every kernel in `shaders/*.wgsl` with naga, under every combination of optional
//! features (see `src/backend/gpu/compose.rs`), and fails the build on the first error. Writes
//! `$OUT_DIR/shaders.rs`: the kernel and library sources embedded with `include_str!` (mobile builds
//! need no shader files on disk) and the byte size of every WGSL struct named `*Params`, which the
//! GPU backend's tests compare with the `#[repr(C)]` host structs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[path = "src/backend/gpu/compose.rs"]
mod compose;

fn wgsl_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "wgsl"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let shaders = manifest.join("../shaders");
    println!("cargo:rerun-if-changed={}", shaders.display());
    println!("cargo:rerun-if-changed=src/backend/gpu/compose.rs");
    let kernels = wgsl_files(&shaders);
    let libs = wgsl_files(&shaders.join("lib"));
    for f in kernels.iter().chain(&libs) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let lookup = |rel: &str| std::fs::read_to_string(shaders.join(rel)).ok();
    let mut sources = String::new();
    let mut params = String::new();
    let mut failures = Vec::new();
    for path in &kernels {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(path).unwrap();
        for caps in compose::Caps::ALL {
            let src = match compose::compose(&text, caps, &lookup) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{name} ({caps:?}): {e}"));
                    continue;
                }
            };
            let module = match naga::front::wgsl::parse_str(&src) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{name} ({caps:?}):\n{}", e.emit_to_string(&src)));
                    continue;
                }
            };
            // unpack2x16float needs SHADER_FLOAT16_IN_FLOAT32: every adapter the backend accepts has
            // it (downlevel flag SHADER_F16_IN_F32, checked when the device is chosen).
            let mut want = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            if caps.subgroups {
                want |= naga::valid::Capabilities::SUBGROUP;
            }
            // Tensor-core kernels (device feature EXPERIMENTAL_COOPERATIVE_MATRIX, with SHADER_F16).
            let coop = src.contains("enable wgpu_cooperative_matrix;");
            if coop {
                want |= naga::valid::Capabilities::COOPERATIVE_MATRIX
                    | naga::valid::Capabilities::SHADER_FLOAT16;
            }
            let mut validator =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), want);
            let info = match validator.validate(&module) {
                Ok(info) => info,
                Err(e) => {
                    failures.push(format!("{name} ({caps:?}):\n{}", e.emit_to_string(&src)));
                    continue;
                }
            };
            // Cooperative matrices reach only Vulkan (through naga's SPIR-V writer, whose support
            // is young): write the SPIR-V here too, under both index bounds-check policies wgpu
            // may pick, so a module the writer rejects fails the build rather than the device.
            if coop {
                // f16, q8 and q4 weights, as the host dispatches them (WTYPE of lib/dequant.wgsl).
                for wtype in [1.0, 2.0, 3.0] {
                    let constants: naga::back::PipelineConstants =
                        [("WTYPE".to_string(), wtype)].into_iter().collect();
                    let (module, info) = match naga::back::pipeline_constants::process_overrides(
                        &module, &info, None, &constants,
                    ) {
                        Ok(m) => m,
                        Err(e) => {
                            failures.push(format!("{name} ({caps:?}) overrides: {e}"));
                            continue;
                        }
                    };
                    for policy in [
                        naga::proc::BoundsCheckPolicy::Restrict,
                        naga::proc::BoundsCheckPolicy::ReadZeroSkipWrite,
                    ] {
                        let mut opts = naga::back::spv::Options::default();
                        opts.bounds_check_policies.index = policy;
                        opts.bounds_check_policies.buffer = policy;
                        if let Err(e) = naga::back::spv::write_vec(&module, &info, &opts, None) {
                            failures.push(format!(
                                "{name} ({caps:?}) SPIR-V (WTYPE {wtype}, {policy:?}): {e}"
                            ));
                        }
                    }
                }
            }
            if caps == compose::Caps::ALL[0] {
                for (_, ty) in module.types.iter() {
                    if let (Some(n), naga::TypeInner::Struct { span, .. }) = (&ty.name, &ty.inner) {
                        if n.ends_with("Params") {
                            writeln!(params, "    ({name:?}, {n:?}, {span}),").unwrap();
                        }
                    }
                }
            }
        }
        writeln!(
            sources,
            "    ({name:?}, include_str!({:?})),",
            path.canonicalize().unwrap()
        )
        .unwrap();
    }
    for path in &libs {
        let name = format!("lib/{}", path.file_name().unwrap().to_string_lossy());
        writeln!(
            sources,
            "    ({name:?}, include_str!({:?})),",
            path.canonicalize().unwrap()
        )
        .unwrap();
    }
    if !failures.is_empty() {
        for f in &failures {
            println!(
                "cargo:warning=WGSL: {}",
                f.lines().take(3).collect::<Vec<_>>().join(" | ")
            );
            eprintln!("{f}\n");
        }
        panic!(
            "{} WGSL kernel composition(s) failed to validate",
            failures.len()
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("shaders.rs");
    std::fs::write(
        out,
        format!(
            "/// Kernel and library sources, by path under `shaders/`.\n\
             pub const SOURCES: &[(&str, &str)] = &[\n{sources}];\n\
             /// (kernel file, struct name, byte size) of every WGSL `*Params` struct.\n\
             #[allow(dead_code)]\n\
             pub const PARAMS_SIZES: &[(&str, &str, u32)] = &[\n{params}];\n"
        ),
    )
    .unwrap();
}
