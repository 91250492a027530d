//! Kernel registry: the embedded WGSL sources, one [`Entry`] per entry point with its binding list,
//! and the pipeline cache. A pipeline is built once per (entry, weight type) from the kernel file
//! composed for the device's caps (see compose.rs) and reused for the life of the backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::choice::{ShaderChecks, PROBE_EXPERTS_ONLY, PROBE_STAGES};
use super::compose::{compose, Caps};
use super::device::{GpuDevice, GpuError};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/shaders.rs"));
}

pub use embedded::PARAMS_SIZES;

/// The text of `shaders/<path>`.
pub fn source(path: &str) -> Option<&'static str> {
    embedded::SOURCES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, s)| *s)
}

/// The overrides `file` declares, with its includes (pipelines set one only where it exists: a
/// constant the module lacks is a pipeline error).
fn declared_overrides(file: &str) -> Vec<String> {
    source(file)
        .and_then(|text| {
            compose(text, Caps { subgroups: false }, &|p| {
                source(p).map(str::to_string)
            })
            .ok()
        })
        .map(|s| {
            s.lines()
                .filter_map(|l| l.trim_start().strip_prefix("override "))
                .filter_map(|rest| rest.split([':', ' ', '=']).next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The gate activation of the gated-MLP kernels (lib/gate_act.wgsl's `ACT`) in the second byte of
/// a dispatch's weight-type argument: `wtype | gate_act(act)`.
pub fn gate_act(act: crate::arch::Activation) -> u32 {
    match act {
        crate::arch::Activation::Silu => 0,
        crate::arch::Activation::GeluTanh => 1 << 8,
    }
}

/// The wide kernels' 8-bit activations (lib/wide_gemv.wgsl's `QACT`) in the top bit of the
/// weight-type argument's second byte, beside the gate activation.
pub fn q8_act() -> u32 {
    1 << 15
}

/// With [`q8_act`]: the wide kernels' activations are codes made once for the pass
/// (lib/wide_gemv.wgsl's `QCODES`), the bit below it.
pub fn q8_codes_in() -> u32 {
    1 << 14
}

/// With [`q8_act`]: the wide expert gate/up kernel writes its output as the down kernel's codes
/// (moe_gemv_wide.wgsl's `QCODES_OUT`), the bit below [`q8_codes_in`].
pub fn q8_codes_out() -> u32 {
    1 << 13
}

/// Activation rows a pass of a gemv kernel's registers holds (the `CHUNK_T` override of
/// gemv.wgsl and moe_gemv.wgsl) in the third byte of a dispatch's weight-type argument; 0 keeps the
/// kernel's default. Fewer rows, fewer registers: more workgroups resident on an SM.
pub fn chunk_t(rows: u32) -> u32 {
    rows << 16
}

/// Row sets a gemv_wide workgroup works against each staged block (gemv_wide.wgsl's `ROW_SETS`)
/// in the third byte of a dispatch's weight-type argument, where the word-a-lane kernels keep
/// [`chunk_t`]; 0 keeps the default (one).
pub fn row_sets(sets: u32) -> u32 {
    sets << 16
}

/// Octets a gemv lane loads before their arithmetic (the `DEPTH` override of gemv.wgsl and
/// moe_gemv.wgsl) in the fourth byte of a dispatch's weight-type argument; 0 keeps the default.
pub fn depth(octets: u32) -> u32 {
    octets << 24
}

/// The weight-type bit of the GEMV expert kernels' 32 lanes a row (moe_gemv.wgsl `LANES`); it
/// shares [`depth`]'s byte, whose values need its low bits only.
pub fn lanes32() -> u32 {
    1 << 31
}

/// What sits at one binding of an entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The entry's params struct: a uniform in the per-recording arena, at a dynamic offset.
    Params,
    /// Host data of this recording (token ids): read-only storage in the arena, dynamic offset.
    Input,
    Read,
    ReadWrite,
}

/// One kernel entry point and its bindings (ascending binding numbers, group 0).
#[derive(Debug)]
pub struct Entry {
    pub file: &'static str,
    pub name: &'static str,
    pub bindings: &'static [(u32, Slot)],
    /// The WGSL params struct it reads (checked against the host struct in tests).
    pub params: &'static str,
}

impl Entry {
    pub fn buffers(&self) -> usize {
        self.bindings
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Read | Slot::ReadWrite))
            .count()
    }
}

pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Bytes bound for a [`Slot::Input`] binding; the arena keeps this much slack past its end.
pub const INPUT_BINDING: u64 = 64 << 10;
/// The most host data one op may carry: its params and their alignment share the binding's room.
pub const INPUT_MAX: u64 = INPUT_BINDING - 1024;

/// (kernel file, entry point, weight type).
type PipelineKey = (&'static str, &'static str, u32);

#[derive(Default)]
pub struct Kernels {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    /// One gate per pipeline being built: a second thread that wants the same pipeline (a pass
    /// and the background warm-up, pipeline_store.rs) waits for the first instead of building it
    /// again. Only the slow path takes it.
    building: Mutex<HashMap<PipelineKey, Arc<Mutex<()>>>>,
    /// The same for shader modules (several pipelines of one file built at once).
    composing: Mutex<HashMap<&'static str, Arc<Mutex<()>>>>,
}

fn scoped<T>(
    dev: &GpuDevice,
    what: &str,
    f: impl FnOnce() -> T,
) -> std::result::Result<T, GpuError> {
    let scope = dev.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    match pollster::block_on(scope.pop()) {
        Some(e) => Err(GpuError::Wgpu(format!("{what}: {e}"))),
        None => Ok(out),
    }
}

/// The value under `key` in `ready`, built by `build` where there is none — once: a second thread
/// that wants the same key meanwhile waits at the key's gate in `gates` for the first instead of
/// building it again. The lookup of a built value takes one lock.
fn built_once<K: Copy + Eq + std::hash::Hash, V>(
    ready: &Mutex<HashMap<K, Arc<V>>>,
    gates: &Mutex<HashMap<K, Arc<Mutex<()>>>>,
    key: K,
    build: impl FnOnce() -> std::result::Result<Arc<V>, GpuError>,
) -> std::result::Result<Arc<V>, GpuError> {
    if let Some(v) = ready.lock().unwrap().get(&key) {
        return Ok(v.clone());
    }
    let gate = gates.lock().unwrap().entry(key).or_default().clone();
    let _building = gate.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = ready.lock().unwrap().get(&key) {
        return Ok(v.clone());
    }
    let v = build()?;
    ready.lock().unwrap().insert(key, v.clone());
    Ok(v)
}

impl Kernels {
    fn module(
        &self,
        dev: &GpuDevice,
        file: &'static str,
    ) -> std::result::Result<Arc<wgpu::ShaderModule>, GpuError> {
        built_once(&self.modules, &self.composing, file, || {
            self.compose_module(dev, file).map(Arc::new)
        })
    }

    fn compose_module(
        &self,
        dev: &GpuDevice,
        file: &'static str,
    ) -> std::result::Result<wgpu::ShaderModule, GpuError> {
        let caps = Caps {
            subgroups: dev.caps.subgroups,
        };
        let text =
            source(file).ok_or_else(|| GpuError::Wgpu(format!("kernel {file} not embedded")))?;
        if text.contains("enable wgpu_cooperative_matrix;") && !dev.caps.coop {
            return Err(GpuError::Unsupported(format!(
                "{file} (cooperative matrices) on {}",
                dev.describe()
            )));
        }
        let src =
            compose(text, caps, &|p| source(p).map(str::to_string)).map_err(GpuError::Wgpu)?;
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(file),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        };
        let checks = match dev.kernels.checks_on(dev.info.backend) {
            ShaderChecks::All => wgpu::ShaderRuntimeChecks::checked(),
            ShaderChecks::NoLoopBound => wgpu::ShaderRuntimeChecks {
                force_loop_bounding: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            },
            ShaderChecks::None => wgpu::ShaderRuntimeChecks::unchecked(),
        };
        scoped(dev, file, || {
            // SAFETY: the kernels are ours, not a user's: every loop is counted (none can run
            // forever) and every index is in bounds by construction for the shapes the host
            // checks before dispatching (tests run them with outputs poisoned). They go only on
            // Vulkan by default, whose robust buffer access (core, enabled by wgpu) still guards
            // every buffer read (KernelChoice::checks_on).
            unsafe { dev.device.create_shader_module_trusted(desc, checks) }
        })
    }

    /// How many pipelines exist.
    pub fn count(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    /// Every pipeline built so far, by name (pipeline_store.rs keeps the list).
    pub fn names(&self) -> Vec<super::pipeline_store::KeyName> {
        let p = self.pipelines.lock().unwrap();
        let mut v: Vec<_> = p
            .keys()
            .map(|&(f, e, w)| (f.to_string(), e.to_string(), w))
            .collect();
        v.sort_unstable();
        v
    }

    /// The weight types `entry`'s pipelines were built for so far (tests: which kernel an op took).
    #[cfg(test)]
    pub fn built(&self, entry: &Entry) -> Vec<u32> {
        let p = self.pipelines.lock().unwrap();
        let mut w: Vec<u32> = p
            .keys()
            .filter(|k| k.0 == entry.file && k.1 == entry.name)
            .map(|k| k.2)
            .collect();
        w.sort_unstable();
        w
    }

    /// The pipeline of `entry` for weight type `wtype` (0 where the kernel reads no weights; its
    /// second byte is the gate activation, [`gate_act`], of kernels that declare one).
    pub fn get(
        &self,
        dev: &GpuDevice,
        entry: &'static Entry,
        wtype: u32,
    ) -> std::result::Result<Arc<Pipeline>, GpuError> {
        let key = (entry.file, entry.name, wtype);
        built_once(&self.pipelines, &self.building, key, || {
            self.build_pipeline(dev, entry, wtype).map(Arc::new)
        })
    }

    fn build_pipeline(
        &self,
        dev: &GpuDevice,
        entry: &'static Entry,
        wtype: u32,
    ) -> std::result::Result<Pipeline, GpuError> {
        let module = self.module(dev, entry.file)?;
        let layout_entries: Vec<wgpu::BindGroupLayoutEntry> = entry
            .bindings
            .iter()
            .map(|&(binding, slot)| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match slot {
                        Slot::Params => wgpu::BufferBindingType::Uniform,
                        Slot::Input | Slot::Read => {
                            wgpu::BufferBindingType::Storage { read_only: true }
                        }
                        Slot::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: matches!(slot, Slot::Params | Slot::Input),
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let what = format!("{}::{}", entry.file, entry.name);
        scoped(dev, &what, || {
            let layout = dev
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(entry.name),
                    entries: &layout_entries,
                });
            let pl = dev
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(entry.name),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
            let declared = declared_overrides(entry.file);
            let declares = |name: &str| declared.iter().any(|d| d == name);
            let mut constants: Vec<(&str, f64)> = vec![];
            if declares("WTYPE") {
                constants.push(("WTYPE", (wtype & 0xff) as f64));
            }
            if declares("ACT") {
                constants.push(("ACT", ((wtype >> 8) & 0x1f) as f64));
            }
            if declares("QACT") && wtype & q8_act() != 0 {
                constants.push(("QACT", 1.0));
            }
            if declares("QCODES") && wtype & q8_codes_in() != 0 {
                constants.push(("QCODES", 1.0));
            }
            if declares("QCODES_OUT") && wtype & q8_codes_out() != 0 {
                constants.push(("QCODES_OUT", 1.0));
            }
            if declares("CHUNK_T") && (wtype >> 16) & 0xff != 0 {
                constants.push(("CHUNK_T", ((wtype >> 16) & 0xff) as f64));
            }
            if declares("ROW_SETS") && (wtype >> 16) & 0xff != 0 {
                constants.push(("ROW_SETS", ((wtype >> 16) & 0xff) as f64));
            }
            if declares("DEPTH") && (wtype >> 24) & 0x7f != 0 {
                constants.push(("DEPTH", ((wtype >> 24) & 0x7f) as f64));
            }
            if declares("LANES") && wtype & lanes32() != 0 {
                constants.push(("LANES", 32.0));
            }
            if declares("GQA_CLAMP") {
                constants.push(("GQA_CLAMP", f64::from(u8::from(dev.kernels.attn_clamp))));
            }
            let probe = dev.kernels.probe;
            let expert_kernel = entry.file.starts_with("moe_gemv");
            if probe & PROBE_STAGES != 0
                && declares("PROBE")
                && (probe & PROBE_EXPERTS_ONLY == 0 || expert_kernel)
            {
                constants.push(("PROBE", (probe & PROBE_STAGES) as f64));
            }
            let pipeline = dev
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry.name),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(entry.name),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Every kernel initialises the shared memory it reads.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: dev.store.as_ref().and_then(|s| s.cache.as_ref()),
                });
            Pipeline { pipeline, layout }
        })
    }
}
