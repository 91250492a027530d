//! kernel-stats: the Vulkan driver's compile statistics of every compute entry point of our WGSL
//! kernels (VK_KHR_pipeline_executable_properties). On NVIDIA that is the register count per
//! thread (with local and shared memory): what kernel tuning needs, on GPU machines where no
//! profiler reads Vulkan pipelines. Mesa drivers (RADV, ANV, lavapipe) report their own statistics.
//!
//! Each kernel is composed, parsed and validated with naga as the runtime does, overrides are
//! applied (WTYPE=3, q4, where declared, then `--const`/`--vary`), and the SPIR-V is written with
//! the options wgpu uses for the runtime's trusted kernels on Vulkan (see `spv_options`).
//!
//! ```text
//! kernel-stats                                   # every kernel, shaders/ of the cwd
//! kernel-stats --file moe_gemv.wgsl --vary CHUNK_T=1,2,4
//! kernel-stats --entry gemv --const WTYPE=2      # q8
//! kernel-stats --modules-only                    # every pipeline builds (any Vulkan driver)
//! # GPU machine: built and stripped here, run from the repository root there (it loads
//! # libvulkan.so.1: carry .gl and unpack its debs first, as for the runtime):
//! #   strip -o .bin/kernel-stats target/release/kernel-stats
//! ./.bin/kernel-stats --shaders shaders
//! ```

mod vk;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use edgediff::backend::gpu::compose::{compose, Caps};
use naga::back::spv;
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};

#[derive(Parser)]
#[command(
    name = "kernel-stats",
    about = "Prints the Vulkan driver's compile statistics of every compute entry point of the \
             WGSL kernels",
    long_about = "Prints, as a markdown table, the compile statistics the Vulkan driver reports \
                  (VK_KHR_pipeline_executable_properties) for every compute entry point of \
                  DIR/*.wgsl: file, entry point, the overrides set, the executable's subgroup \
                  size, then one column per statistic (on NVIDIA: registers per thread, local \
                  and shared memory; Mesa drivers report their own), then the driver's \
                  description of each. Kernels are composed, overridden (WTYPE=3 where declared) \
                  and written to SPIR-V as the runtime does on Vulkan.\n\n\
                  Needs a Vulkan driver with VK_KHR_pipeline_executable_properties (NVIDIA, Mesa \
                  RADV/ANV, lavapipe newer than Mesa 22.3, recent Mali); --modules-only works \
                  with any driver."
)]
struct Cli {
    /// The kernel directory (*.wgsl, includes under DIR/lib). Missing: the copy embedded in this
    /// binary, for the files named by --file.
    #[arg(long, value_name = "DIR", default_value = "shaders")]
    shaders: PathBuf,
    /// Only these kernel files (repeatable).
    #[arg(long = "file", value_name = "NAME.wgsl")]
    files: Vec<String>,
    /// Only these entry points (repeatable).
    #[arg(long = "entry", value_name = "NAME")]
    entries: Vec<String>,
    /// Set an override in the modules that declare it (repeatable; after WTYPE=3).
    #[arg(long = "const", value_name = "NAME=VALUE", value_parser = parse_const)]
    consts: Vec<(String, f64)>,
    /// One row per value of an override, in the modules that declare it (repeatable: every
    /// combination), e.g. --vary CHUNK_T=1,2,4.
    #[arg(long, value_name = "NAME=V1,V2,...", value_parser = parse_vary)]
    vary: Vec<(String, Vec<f64>)>,
    /// Compose with the shared-memory reductions (as on devices without subgroups).
    #[arg(long)]
    no_subgroups: bool,
    /// Include the cooperative-matrix kernels (`enable wgpu_cooperative_matrix;`), skipped
    /// otherwise; needs VK_KHR_cooperative_matrix.
    #[arg(long)]
    coop: bool,
    /// Vulkan device index (default: the first discrete GPU, else the first device).
    #[arg(long, value_name = "N")]
    device: Option<usize>,
    /// Build every pipeline without asking for statistics and report OK or the error per entry
    /// point (needs no VK_KHR_pipeline_executable_properties).
    #[arg(long)]
    modules_only: bool,
    /// naga's run-time checks: none is what the runtime uses on Vulkan (EDGEDIFF_SHADER_CHECKS).
    #[arg(long, value_enum, default_value_t = Checks::None)]
    checks: Checks,
    /// Don't enable robust buffer access (wgpu always does; the driver's bounds checks cost
    /// registers too).
    #[arg(long)]
    no_robust: bool,
    /// Bind uniforms at dynamic offsets, as the runtime binds its params (default: plain).
    #[arg(long)]
    dynamic_uniforms: bool,
}

/// The runtime's `ShaderChecks` (runtime/src/backend/gpu/choice.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Checks {
    None,
    NoLoopBound,
    All,
}

fn parse_const(s: &str) -> Result<(String, f64), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    let v = value
        .trim()
        .parse::<f64>()
        .map_err(|e| format!("{value}: {e}"))?;
    Ok((name.trim().to_string(), v))
}

fn parse_vary(s: &str) -> Result<(String, Vec<f64>), String> {
    let (name, values) = s.split_once('=').ok_or("expected NAME=V1,V2,...")?;
    let vs = values
        .split(',')
        .map(|v| v.trim().parse::<f64>().map_err(|e| format!("{v}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.trim().to_string(), vs))
}

/// naga's SPIR-V options as wgpu-hal 30 sets them on Vulkan (src/vulkan/adapter.rs, the
/// `naga_options` of `device_from_raw`; src/vulkan/device.rs, `compile_stage`, for what a
/// module's runtime checks turn off) for the runtime's kernels: modules created with
/// `create_shader_module_trusted` and the checks of `checks`, pipelines with
/// `zero_initialize_workgroup_memory: false` (runtime/src/backend/gpu/kernels.rs), no binding
/// arrays, no debug info.
fn spv_options(checks: Checks, gpu: &vk::Gpu, subgroups: bool) -> spv::Options<'static> {
    let robust2 = gpu.robust2;
    // wgpu lists the capabilities of the features the device was opened with, and naga takes
    // its faster paths only where they are listed (packed 4x8 dot products, 4x8 packing): here
    // those that can reach a compute kernel, for what the runtime asks of wgpu (SHADER_F16,
    // SUBGROUP, EXPERIMENTAL_COOPERATIVE_MATRIX where the device has them).
    use spv::Capability as C;
    let mut caps = vec![
        C::Shader,
        C::Matrix,
        C::Sampled1D,
        C::Image1D,
        C::ImageQuery,
        C::DerivativeControl,
        C::StorageImageExtendedFormats,
    ];
    if subgroups {
        caps.extend([
            C::GroupNonUniform,
            C::GroupNonUniformVote,
            C::GroupNonUniformArithmetic,
            C::GroupNonUniformBallot,
            C::GroupNonUniformShuffle,
            C::GroupNonUniformShuffleRelative,
            C::GroupNonUniformQuad,
        ]);
    }
    if gpu.f16 {
        caps.push(C::Float16);
    }
    if gpu.coop {
        caps.extend([C::CooperativeMatrixKHR, C::VulkanMemoryModel]);
    }
    if gpu.dot_product {
        caps.extend([
            C::DotProductInputAllKHR,
            C::DotProductInput4x8BitKHR,
            C::DotProductInput4x8BitPackedKHR,
            C::DotProductKHR,
        ]);
    }
    if gpu.int8 {
        caps.push(C::Int8);
    }
    let checked = BoundsCheckPolicies {
        index: BoundsCheckPolicy::Restrict,
        buffer: if robust2 {
            BoundsCheckPolicy::Unchecked
        } else {
            BoundsCheckPolicy::Restrict
        },
        // Robust image access is on wherever robustness2 is (no images in our kernels anyway).
        image_load: if robust2 {
            BoundsCheckPolicy::Unchecked
        } else {
            BoundsCheckPolicy::Restrict
        },
        binding_array: BoundsCheckPolicy::Unchecked,
    };
    spv::Options {
        lang_version: gpu.spirv_version(),
        // wgpu: DEBUG only with InstanceFlags::DEBUG (names, no code), LABEL_VARYINGS off on
        // Qualcomm, FORCE_POINT_SIZE always; none changes a compute shader's code.
        flags: spv::WriterFlags::LABEL_VARYINGS | spv::WriterFlags::FORCE_POINT_SIZE,
        fake_missing_bindings: false,
        binding_map: spv::BindingMap::default(),
        capabilities: Some(caps.into_iter().collect()),
        bounds_check_policies: match checks {
            Checks::None => BoundsCheckPolicies {
                index: BoundsCheckPolicy::Unchecked,
                buffer: BoundsCheckPolicy::Unchecked,
                image_load: BoundsCheckPolicy::Unchecked,
                binding_array: BoundsCheckPolicy::Unchecked,
            },
            Checks::NoLoopBound | Checks::All => checked,
        },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: checks == Checks::All,
        ray_query_initialization_tracking: checks != Checks::None,
        trace_ray_argument_validation: true,
        use_storage_input_output_16: false,
        debug_info: None,
        task_dispatch_limits: None,
        mesh_shader_primitive_indices_clamp: checks != Checks::None,
        emit_int_div_checks: checks != Checks::None,
    }
}

/// One table row: a pipeline's outcome.
struct Row {
    file: String,
    entry: String,
    overrides: String,
    result: Result<Vec<vk::Executable>, String>,
}

/// The kernel files and their text: DIR/*.wgsl, or the embedded copy of those --file names.
fn kernel_files(cli: &Cli) -> Result<Vec<(String, String)>, String> {
    let dir = &cli.shaders;
    if !dir.is_dir() {
        if cli.files.is_empty() {
            return Err(format!(
                "{}: no such directory (--shaders DIR; without one, --file NAME.wgsl takes the \
                 kernels embedded in this binary)",
                dir.display()
            ));
        }
        return cli
            .files
            .iter()
            .map(|f| {
                edgediff::backend::gpu::kernels::source(f)
                    .map(|t| (f.clone(), t.to_string()))
                    .ok_or_else(|| format!("{f}: not an embedded kernel"))
            })
            .collect();
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    names.sort();
    for f in &cli.files {
        if !names.contains(f) {
            return Err(format!("--file {f}: no {}", dir.join(f).display()));
        }
    }
    names.retain(|n| cli.files.is_empty() || cli.files.contains(n));
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(&n))
                .map_err(|e| format!("{}: {e}", dir.join(&n).display()))?;
            Ok((n, text))
        })
        .collect()
}

/// The override sets of a module: WTYPE=3, the --const values, then every combination of the
/// --vary values, each only where the module declares the name.
fn override_sets(cli: &Cli, declared: &[String]) -> Vec<Vec<(String, f64)>> {
    let has = |n: &str| declared.iter().any(|d| d == n);
    let mut base: Vec<(String, f64)> = vec![];
    let set = |list: &mut Vec<(String, f64)>, n: &str, v: f64| match list
        .iter_mut()
        .find(|(k, _)| k == n)
    {
        Some(slot) => slot.1 = v,
        None => list.push((n.to_string(), v)),
    };
    if has("WTYPE") {
        set(&mut base, "WTYPE", 3.0);
    }
    for (n, v) in &cli.consts {
        if has(n) {
            set(&mut base, n, *v);
        }
    }
    let mut sets = vec![base];
    for (n, values) in &cli.vary {
        if !has(n) {
            continue;
        }
        sets = sets
            .iter()
            .flat_map(|s| {
                values.iter().map(|&v| {
                    let mut s = s.clone();
                    set(&mut s, n, v);
                    s
                })
            })
            .collect();
    }
    sets
}

fn show(overrides: &[(String, f64)]) -> String {
    if overrides.is_empty() {
        return "-".into();
    }
    overrides
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The rows of one kernel file (a file that fails to compose, parse or validate: one error row).
fn kernel_rows(
    cli: &Cli,
    gpu: &vk::Gpu,
    opts: &spv::Options,
    file: &str,
    text: &str,
    declared_any: &mut BTreeSet<String>,
) -> Vec<Row> {
    let err_row = |e: String| Row {
        file: file.to_string(),
        entry: "-".into(),
        overrides: "-".into(),
        result: Err(e),
    };
    let caps = Caps {
        subgroups: !cli.no_subgroups,
    };
    let dir = cli.shaders.clone();
    let on_disk = dir.is_dir();
    let lookup = move |p: &str| -> Option<String> {
        if on_disk {
            std::fs::read_to_string(dir.join(p)).ok()
        } else {
            edgediff::backend::gpu::kernels::source(p).map(str::to_string)
        }
    };
    let src = match compose(text, caps, &lookup) {
        Ok(s) => s,
        Err(e) => return vec![err_row(format!("compose: {e}"))],
    };
    let module = match naga::front::wgsl::parse_str(&src) {
        Ok(m) => m,
        Err(e) => {
            let at = e.location(&src).map(|l| l.line_number).unwrap_or(0);
            return vec![err_row(format!(
                "WGSL, composed line {at}: {}",
                e.message()
            ))];
        }
    };
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    );
    let info = match validator.validate(&module) {
        Ok(i) => i,
        Err(e) => {
            let at = e
                .location(&src)
                .map(|l| format!(", composed line {}", l.line_number))
                .unwrap_or_default();
            let mut msg = format!("validation{at}: {}", e.as_inner());
            let mut cause = std::error::Error::source(e.as_inner());
            while let Some(c) = cause {
                msg += &format!(": {c}");
                cause = c.source();
            }
            return vec![err_row(msg)];
        }
    };
    let declared: Vec<String> = module
        .overrides
        .iter()
        .filter_map(|(_, o)| o.name.clone())
        .collect();
    declared_any.extend(declared.iter().cloned());
    let mut rows = vec![];
    for ep in &module.entry_points {
        if ep.stage != naga::ShaderStage::Compute
            || !(cli.entries.is_empty() || cli.entries.contains(&ep.name))
        {
            continue;
        }
        for set in override_sets(cli, &declared) {
            let constants: naga::back::PipelineConstants = set.iter().cloned().collect();
            let result = entry_spirv(&module, &info, &ep.name, &constants, opts, cli)
                .and_then(|(words, bindings)| gpu.pipeline(&words, &ep.name, &bindings));
            rows.push(Row {
                file: file.to_string(),
                entry: ep.name.clone(),
                overrides: show(&set),
                result,
            });
        }
    }
    rows
}

/// The SPIR-V of one entry point with `constants`, and its group-0 buffer bindings (the layout's
/// binding i is the i-th, as wgpu-hal numbers them).
fn entry_spirv(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    constants: &naga::back::PipelineConstants,
    opts: &spv::Options,
    cli: &Cli,
) -> Result<(Vec<u32>, Vec<vk::Binding>), String> {
    let stage = naga::ShaderStage::Compute;
    let (module, info) = naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((stage, entry)),
        constants,
    )
    .map_err(|e| format!("overrides: {e}"))?;
    // The module may keep other entry points (no overrides: not compacted): only the globals this
    // one uses go in the layout.
    let index = module
        .entry_points
        .iter()
        .position(|e| e.stage == stage && e.name == entry)
        .ok_or_else(|| format!("entry point {entry} lost in override processing"))?;
    let uses = info.get_entry_point(index);
    let mut bindings = vec![];
    for (h, g) in module.global_variables.iter() {
        let Some(rb) = &g.binding else { continue };
        if uses[h].is_empty() {
            continue;
        }
        if rb.group != 0 {
            return Err(format!(
                "binding group {} (only group 0 is laid out)",
                rb.group
            ));
        }
        let kind = match g.space {
            naga::AddressSpace::Uniform => vk::Binding::Uniform {
                dynamic: cli.dynamic_uniforms,
            },
            naga::AddressSpace::Storage { .. } => vk::Binding::Storage,
            other => return Err(format!("binding {}: {other:?} is not a buffer", rb.binding)),
        };
        bindings.push((rb.binding, kind));
    }
    bindings.sort_by_key(|b| b.0);
    // wgpu-hal numbers a layout's bindings densely in their order (create_bind_group_layout) and
    // hands naga the WGSL → Vulkan binding map (create_pipeline_layout); the same here.
    let mut opts = opts.clone();
    for (i, &(binding, _)) in bindings.iter().enumerate() {
        opts.binding_map.insert(
            naga::ResourceBinding { group: 0, binding },
            spv::BindingInfo {
                descriptor_set: 0,
                binding: i as u32,
                binding_array_size: None,
            },
        );
    }
    let words = spv::write_vec(
        &module,
        &info,
        &opts,
        Some(&spv::PipelineOptions {
            shader_stage: stage,
            entry_point: entry.into(),
        }),
    )
    .map_err(|e| format!("SPIR-V: {e}"))?;
    let dense = bindings.iter().map(|&(_, kind)| kind).collect();
    Ok((words, dense))
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn print_table(rows: &[Row], modules_only: bool) {
    if modules_only {
        println!("| file | entry | overrides | pipeline |");
        println!("|---|---|---|---|");
        for r in rows {
            let what = match &r.result {
                Ok(_) => "OK".to_string(),
                Err(e) => format!("error: {e}"),
            };
            println!(
                "| {} | {} | {} | {} |",
                r.file,
                r.entry,
                r.overrides,
                cell(&what)
            );
        }
        return;
    }
    // Statistic names, in order of first appearance.
    let mut names: Vec<&str> = vec![];
    let mut abouts: Vec<&str> = vec![];
    let mut multi = false;
    for r in rows {
        if let Ok(xs) = &r.result {
            multi |= xs.len() > 1;
            for x in xs {
                for st in &x.stats {
                    if !names.contains(&st.name.as_str()) {
                        names.push(&st.name);
                        abouts.push(&st.about);
                    }
                }
            }
        }
    }
    let mut head = vec!["file", "entry", "overrides"];
    if multi {
        head.push("executable");
    }
    head.push("subgroup size");
    head.extend(names.iter().copied());
    println!(
        "| {} |",
        head.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | ")
    );
    println!("|{}", "---|".repeat(head.len()));
    for r in rows {
        let lead = [r.file.as_str(), r.entry.as_str(), r.overrides.as_str()];
        match &r.result {
            Err(e) => {
                let mut cells: Vec<String> = lead.iter().map(|s| s.to_string()).collect();
                cells.push(format!("error: {}", cell(e)));
                cells.resize(head.len(), String::new());
                println!("| {} |", cells.join(" | "));
            }
            Ok(xs) => {
                for x in xs {
                    let stats: BTreeMap<&str, &str> = x
                        .stats
                        .iter()
                        .map(|st| (st.name.as_str(), st.value.as_str()))
                        .collect();
                    let mut cells: Vec<String> = lead.iter().map(|s| s.to_string()).collect();
                    if multi {
                        cells.push(cell(&x.name));
                    }
                    cells.push(x.subgroup_size.to_string());
                    for n in &names {
                        cells.push(cell(stats.get(n).copied().unwrap_or("")));
                    }
                    println!("| {} |", cells.join(" | "));
                }
                if xs.is_empty() {
                    println!("| {} | (no executables reported) |", lead.join(" | "));
                }
            }
        }
    }
    if !names.is_empty() {
        println!();
        println!("The driver's descriptions:");
        for (n, a) in names.iter().zip(&abouts) {
            println!("- {n}: {a}");
        }
    }
}

fn run(cli: &Cli) -> Result<bool, String> {
    let files = kernel_files(cli)?;
    let gpu = vk::Gpu::new(&vk::Want {
        index: cli.device,
        stats: !cli.modules_only,
        robust: !cli.no_robust,
        coop: cli.coop,
        subgroups: !cli.no_subgroups,
    })?;
    let lang = gpu.spirv_version();
    let opts = spv_options(cli.checks, &gpu, !cli.no_subgroups);
    println!("Device {}", gpu.describe);
    println!(
        "SPIR-V {}.{}, checks {:?}, subgroups {}, robust buffer access {}{}, uniforms {}",
        lang.0,
        lang.1,
        cli.checks,
        if cli.no_subgroups { "off" } else { "on" },
        if cli.no_robust { "off" } else { "on" },
        if gpu.robust2 { " (+robustness2)" } else { "" },
        if cli.dynamic_uniforms {
            "dynamic"
        } else {
            "plain"
        },
    );
    println!();
    let mut rows = vec![];
    let mut skipped = vec![];
    let mut declared = BTreeSet::new();
    for (name, text) in &files {
        if !gpu.coop && text.contains("enable wgpu_cooperative_matrix;") {
            skipped.push(name.as_str());
            continue;
        }
        rows.extend(kernel_rows(cli, &gpu, &opts, name, text, &mut declared));
    }
    for n in cli
        .consts
        .iter()
        .map(|c| &c.0)
        .chain(cli.vary.iter().map(|v| &v.0))
    {
        if !declared.contains(n) {
            eprintln!("note: no kernel built declares override {n}");
        }
    }
    print_table(&rows, cli.modules_only);
    if !skipped.is_empty() {
        println!();
        let why = if cli.coop {
            "the device has no VK_KHR_cooperative_matrix"
        } else {
            "--coop includes them"
        };
        println!(
            "Skipped (cooperative matrices; {why}): {}",
            skipped.join(", ")
        );
    }
    let failed = rows.iter().filter(|r| r.result.is_err()).count();
    if failed > 0 {
        eprintln!("{failed} of {} pipelines failed", rows.len());
    }
    if rows.is_empty() {
        eprintln!("no compute entry point matched");
    }
    Ok(failed == 0 && !rows.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kernel-stats: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(args: &[&str], declared: &[&str]) -> Vec<String> {
        let cli = Cli::parse_from(std::iter::once("kernel-stats").chain(args.iter().copied()));
        let declared: Vec<String> = declared.iter().map(|s| s.to_string()).collect();
        override_sets(&cli, &declared)
            .iter()
            .map(|s| show(s))
            .collect()
    }

    #[test]
    fn overrides_apply_where_declared() {
        assert_eq!(sets(&[], &[]), ["-"]);
        assert_eq!(sets(&[], &["WTYPE", "DEPTH"]), ["WTYPE=3"]);
        assert_eq!(
            sets(&["--const", "WTYPE=2", "--const", "ACT=1"], &["WTYPE"]),
            ["WTYPE=2"]
        );
        assert_eq!(
            sets(
                &[
                    "--vary",
                    "CHUNK_T=1,2",
                    "--vary",
                    "DEPTH=4,8",
                    "--vary",
                    "NONE=1"
                ],
                &["WTYPE", "CHUNK_T", "DEPTH"]
            ),
            [
                "WTYPE=3 CHUNK_T=1 DEPTH=4",
                "WTYPE=3 CHUNK_T=1 DEPTH=8",
                "WTYPE=3 CHUNK_T=2 DEPTH=4",
                "WTYPE=3 CHUNK_T=2 DEPTH=8"
            ]
        );
    }

    #[test]
    fn bad_pairs_are_refused() {
        assert!(parse_const("WTYPE").is_err());
        assert!(parse_const("WTYPE=q4").is_err());
        assert!(parse_vary("CHUNK_T=1,,2").is_err());
        assert_eq!(parse_vary("CHUNK_T=1, 2").unwrap().1, [1.0, 2.0]);
    }
}
