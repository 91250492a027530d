//! The device layer: which adapter runs the kernels, which optional features it lends, which limits
//! bind. A real GPU wins over a software one (lavapipe, WARP); `EDGEDIFF_ADAPTER` forces one by a
//! substring of its name or by backend (`vulkan`, `metal`, `dx12`, `gl`). Optional features are
//! requested only when present, and every kernel has a path without them:
//! - SUBGROUP: workgroup reductions through subgroup operations (else shared memory);
//! - TIMESTAMP_QUERY: per-kernel GPU time in benchmarks;
//! - SHADER_F16: requested and reported for the kernels that will compute in f16; the v1 kernels
//!   compute in f32 and unpack f16 weights with `unpack2x16float` (exact, needs no feature);
//! - EXPERIMENTAL_COOPERATIVE_MATRIX (tensor cores; Vulkan VK_KHR_cooperative_matrix): the dense
//!   matmul of large token blocks (shaders/matmul_coop.wgsl), requested only where the adapter lists
//!   the configuration it uses — f16 × f16 → f32, 16 × 16 × 16, subgroup scope — lends SHADER_F16 and
//!   runs compute shaders in subgroups of exactly 32 (the kernel maps subgroups to invocations
//!   32 at a time).
//!
//! A missing adapter, a refused device or a lost one is a [`GpuError`], never a panic: wgpu's
//! uncaptured-error and device-lost callbacks are routed into [`ErrorSink`], which the backend
//! checks after every submission.

use std::sync::{Arc, Mutex};

use wgpu::{Backends, DeviceType, Features};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter with compute shaders was found (backends tried: {backends}); on Linux without a GPU install lavapipe: apt-get install mesa-vulkan-drivers")]
    NoAdapter { backends: String },
    #[error("no adapter matches EDGEDIFF_ADAPTER='{wanted}'; available: {available}")]
    AdapterNotFound { wanted: String, available: String },
    #[error("the adapter refused a device: {0}")]
    RequestDevice(String),
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    #[error("GPU error: {0}")]
    Wgpu(String),
    #[error("reading back from the GPU failed: {0}")]
    Readback(String),
    #[error("{what} needs {need} bytes, the device allows {limit}")]
    Limit { what: String, need: u64, limit: u64 },
    #[error("{0} is not supported by the GPU backend")]
    Unsupported(String),
}

impl From<GpuError> for super::super::BackendError {
    fn from(e: GpuError) -> Self {
        super::super::BackendError::Gpu(e.to_string())
    }
}

/// How to pick and configure the device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// A substring of the adapter name (case-insensitive) or a backend name; `None` picks the best.
    pub adapter: Option<String>,
    /// Do not use SHADER_F16 even if present.
    pub disable_f16: bool,
    /// Do not use SUBGROUP even if present.
    pub disable_subgroups: bool,
    /// Do not use TIMESTAMP_QUERY even if present.
    pub disable_timestamps: bool,
    /// Do not use cooperative matrices (tensor cores) even if present.
    pub disable_coop: bool,
    /// Fill every activation and scratch buffer with NaN before kernels write it (tests: a kernel
    /// that leaves an output unwritten shows up as NaN).
    pub poison: bool,
    /// Splits weights, LM-head passes and expert pool buffers at this many bytes, below the device
    /// limit (tests of splitting on tiny models).
    pub max_binding: Option<u64>,
    /// Submit the recording after this many dispatches without waiting, so the GPU starts while
    /// the host records the rest of a pass; 0 = only when the host needs bytes back
    /// (`EDGEDIFF_SUBMIT_EVERY`).
    pub submit_every: u64,
    /// One compute pass per dispatch instead of one per run of dispatches (`EDGEDIFF_PASS=
    /// per-dispatch`; the earlier behaviour, kept for before/after measurements).
    pub pass_per_dispatch: bool,
    /// Kernel choices and tuning (`EDGEDIFF_*` measurement knobs; see choice.rs).
    pub kernels: super::KernelChoice,
    /// A directory that keeps compiled pipelines between runs (pipeline_store.rs); `None`: none
    /// (`EDGEDIFF_PIPELINE_CACHE=<dir>|off`, else the process default set by
    /// [`set_default_pipeline_cache`]: the command line's is the user's cache directory).
    pub pipeline_cache: Option<std::path::PathBuf>,
}

static DEFAULT_PIPELINE_CACHE: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

/// Where [`GpuOptions::from_env`] keeps pipelines when `EDGEDIFF_PIPELINE_CACHE` is unset: an
/// app's cache directory (the Kotlin and Swift SDKs pass theirs), the command line's
/// `$XDG_CACHE_HOME/edgediff` or `~/.cache/edgediff`. Unset, a library keeps none.
pub fn set_default_pipeline_cache(dir: Option<std::path::PathBuf>) {
    *DEFAULT_PIPELINE_CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = dir;
}

/// The user's cache directory for edgediff on this platform, if the environment names one.
pub fn user_pipeline_cache() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| std::path::PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("edgediff"))
}

/// A 20-layer pass records ≈ 340 dispatches: submitting every 96 lets the GPU start after the
/// first few layers, for a few submissions of tens of µs each.
pub const DEFAULT_SUBMIT_EVERY: u64 = 96;

impl GpuOptions {
    /// Options from the environment: `EDGEDIFF_ADAPTER` (name substring or backend) and
    /// `EDGEDIFF_GPU_DISABLE` (comma list of `f16`, `subgroups`, `timestamps`, `coop`).
    pub fn from_env() -> Self {
        let disabled = std::env::var("EDGEDIFF_GPU_DISABLE").unwrap_or_default();
        let off = |name: &str| disabled.split(',').any(|d| d.trim() == name);
        GpuOptions {
            adapter: std::env::var("EDGEDIFF_ADAPTER")
                .ok()
                .filter(|s| !s.is_empty()),
            disable_f16: off("f16"),
            disable_subgroups: off("subgroups"),
            disable_timestamps: off("timestamps"),
            disable_coop: off("coop"),
            poison: false,
            max_binding: None,
            submit_every: std::env::var("EDGEDIFF_SUBMIT_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_SUBMIT_EVERY),
            pass_per_dispatch: std::env::var("EDGEDIFF_PASS").is_ok_and(|v| v == "per-dispatch"),
            kernels: super::KernelChoice::from_env(),
            pipeline_cache: match std::env::var_os("EDGEDIFF_PIPELINE_CACHE") {
                Some(v) if v == "off" || v.is_empty() => None,
                Some(v) => Some(v.into()),
                None => DEFAULT_PIPELINE_CACHE
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            },
        }
    }
}

/// What one adapter offers, as `edgediff devices` prints it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub shader_f16: bool,
    pub subgroups: Option<(u32, u32)>,
    pub timestamps: bool,
    /// The cooperative-matrix configurations the adapter lists ("16×16×16 f16→f32", …).
    pub coop_configs: Vec<String>,
    /// Whether the kernels would use cooperative matrices (see [`coop_usable`]).
    pub coop: bool,
    pub compute: bool,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_storage: u32,
    pub max_invocations: u32,
    pub max_storage_buffers_per_stage: u32,
    /// The adapter [`GpuDevice::new`] would choose with the same options.
    pub chosen: bool,
}

impl AdapterSummary {
    /// A CPU-emulated adapter (lavapipe, WARP, SwiftShader): correct, but slower than the CPU
    /// backend, so `--backend auto` passes it over.
    pub fn is_software(&self) -> bool {
        self.device_type == format!("{:?}", DeviceType::Cpu)
    }
}

/// Features the kernels actually use on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    /// Cooperative matrices f16 × f16 → f32, 16 × 16 × 16 (the tensor-core matmul).
    pub coop: bool,
}

/// "M×N×K ab→cr" of one cooperative-matrix configuration.
fn coop_config_name(c: &wgpu::CooperativeMatrixProperties) -> String {
    let t = |t: wgpu::CooperativeScalarType| format!("{t:?}").to_ascii_lowercase();
    format!(
        "{}×{}×{} {}→{}",
        c.m_size,
        c.n_size,
        c.k_size,
        t(c.ab_type),
        t(c.cr_type)
    )
}

/// Whether the tensor-core matmul can run on `a`: the feature, the f16 × f16 → f32 16 × 16 × 16
/// configuration, SHADER_F16 and subgroups of exactly 32 invocations.
pub fn coop_usable(a: &wgpu::Adapter) -> bool {
    use wgpu::CooperativeScalarType as S;
    let info = a.get_info();
    a.features()
        .contains(Features::EXPERIMENTAL_COOPERATIVE_MATRIX | Features::SHADER_F16)
        && info.subgroup_min_size == 32
        && info.subgroup_max_size == 32
        && a.cooperative_matrix_properties().iter().any(|c| {
            (c.m_size, c.n_size, c.k_size) == (16, 16, 16)
                && c.ab_type == S::F16
                && c.cr_type == S::F32
        })
}

/// Errors reported by wgpu callbacks, drained after each submission.
#[derive(Clone, Default)]
pub struct ErrorSink(Arc<Mutex<Option<GpuError>>>);

impl ErrorSink {
    fn put(&self, e: GpuError) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    /// The first error since the last check, if any.
    pub fn take(&self) -> Result<(), GpuError> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// An open device with the limits and features the backend works within.
pub struct GpuDevice {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub caps: DeviceCaps,
    /// The largest storage binding the device allows (and the backend creates).
    pub max_binding: u64,
    /// Where weights, LM-head passes and expert pools are split: `max_binding`, or less with the
    /// `max_binding` option.
    pub split: u64,
    pub errors: ErrorSink,
    pub kernels: super::KernelChoice,
    /// Compiled pipelines kept between runs, where [`GpuOptions::pipeline_cache`] names a place.
    pub store: Option<super::pipeline_store::PipelineStore>,
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = Backends::from_env().unwrap_or(Backends::PRIMARY);
    wgpu::Instance::new(desc)
}

fn rank(info: &wgpu::AdapterInfo) -> u32 {
    let kind = match info.device_type {
        DeviceType::DiscreteGpu => 40,
        DeviceType::IntegratedGpu => 30,
        DeviceType::VirtualGpu => 20,
        DeviceType::Other => 10,
        DeviceType::Cpu => 0,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 1,
        _ => 0,
    };
    kind + api
}

fn matches(info: &wgpu::AdapterInfo, wanted: &str) -> bool {
    let w = wanted.to_ascii_lowercase();
    info.name.to_ascii_lowercase().contains(&w)
        || info.backend.to_str().eq_ignore_ascii_case(&w)
        || (w == "gl" && info.backend == wgpu::Backend::Gl)
}

fn has_compute(a: &wgpu::Adapter) -> bool {
    a.get_downlevel_capabilities().flags.contains(
        wgpu::DownlevelFlags::COMPUTE_SHADERS
            | wgpu::DownlevelFlags::INDIRECT_EXECUTION
            | wgpu::DownlevelFlags::SHADER_F16_IN_F32,
    )
}

/// Every adapter with compute shaders, best first, and the index of the one `opts` chooses.
fn ranked_adapters(
    opts: &GpuOptions,
) -> Result<(Vec<wgpu::Adapter>, Option<usize>, Backends), GpuError> {
    let inst = instance();
    let backends = Backends::from_env().unwrap_or(Backends::PRIMARY);
    let mut all = pollster::block_on(inst.enumerate_adapters(backends));
    all.sort_by_key(|a| std::cmp::Reverse(rank(&a.get_info())));
    let chosen = match &opts.adapter {
        Some(w) => all
            .iter()
            .position(|a| has_compute(a) && matches(&a.get_info(), w)),
        None => all.iter().position(has_compute),
    };
    Ok((all, chosen, backends))
}

/// Lists the adapters of this machine (for `edgediff devices`).
pub fn list_adapters(opts: &GpuOptions) -> Result<Vec<AdapterSummary>, GpuError> {
    let (all, chosen, _) = ranked_adapters(opts)?;
    Ok(all
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            let f = a.features();
            let l = a.limits();
            AdapterSummary {
                name: info.name.clone(),
                backend: info.backend.to_str().to_string(),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info)
                    .trim()
                    .to_string(),
                shader_f16: f.contains(Features::SHADER_F16),
                subgroups: f
                    .contains(Features::SUBGROUP)
                    .then_some((info.subgroup_min_size, info.subgroup_max_size)),
                timestamps: f.contains(Features::TIMESTAMP_QUERY),
                coop_configs: a
                    .cooperative_matrix_properties()
                    .iter()
                    .map(coop_config_name)
                    .collect(),
                coop: coop_usable(a) && !opts.disable_coop,
                compute: has_compute(a),
                max_storage_binding: l.max_storage_buffer_binding_size,
                max_buffer: l.max_buffer_size,
                max_workgroup_storage: l.max_compute_workgroup_storage_size,
                max_invocations: l.max_compute_invocations_per_workgroup,
                max_storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
                chosen: Some(i) == chosen,
            }
        })
        .collect())
}

impl GpuDevice {
    pub fn new(opts: &GpuOptions) -> Result<GpuDevice, GpuError> {
        let (all, chosen, backends) = ranked_adapters(opts)?;
        let adapter = match (chosen, &opts.adapter) {
            (Some(i), _) => &all[i],
            (None, Some(w)) => {
                let available: Vec<String> = all
                    .iter()
                    .map(|a| {
                        let i = a.get_info();
                        format!("{} ({})", i.name, i.backend.to_str())
                    })
                    .collect();
                return Err(GpuError::AdapterNotFound {
                    wanted: w.clone(),
                    available: if available.is_empty() {
                        "none".into()
                    } else {
                        available.join(", ")
                    },
                });
            }
            (None, None) => {
                return Err(GpuError::NoAdapter {
                    backends: format!("{backends:?}"),
                })
            }
        };
        let info = adapter.get_info();
        let have = adapter.features();
        let mut want = Features::empty();
        let caps = DeviceCaps {
            f16: have.contains(Features::SHADER_F16) && !opts.disable_f16,
            subgroups: have.contains(Features::SUBGROUP)
                && !opts.disable_subgroups
                && info.subgroup_max_size <= 64,
            timestamps: have.contains(Features::TIMESTAMP_QUERY) && !opts.disable_timestamps,
            coop: coop_usable(adapter) && !opts.disable_coop && !opts.disable_f16,
        };
        if caps.f16 || caps.coop {
            want |= Features::SHADER_F16;
        }
        if caps.coop {
            want |= Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        if caps.subgroups {
            want |= Features::SUBGROUP;
        }
        if caps.timestamps {
            want |= Features::TIMESTAMP_QUERY;
        }
        let driver_cache = opts.pipeline_cache.is_some() && have.contains(Features::PIPELINE_CACHE);
        if driver_cache {
            want |= Features::PIPELINE_CACHE;
        }
        // Ask for everything the adapter allows: binding sizes and workgroup storage are the limits
        // that matter here, and the defaults are far below what real devices lend.
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("edgediff"),
            required_features: want,
            required_limits: limits.clone(),
            experimental_features: if caps.coop {
                // SAFETY: wgpu asks the caller to accept that its experimental features may hold
                // bugs. Only the cooperative-matrix feature is requested, and only its one kernel
                // (shaders/matmul_coop.wgsl) uses it; tests check that kernel against the CPU.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| GpuError::RequestDevice(e.to_string()))?;
        let errors = ErrorSink::default();
        {
            let sink = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                sink.put(GpuError::Wgpu(e.to_string()))
            }));
            let sink = errors.clone();
            device.set_device_lost_callback(move |reason, msg| {
                sink.put(GpuError::DeviceLost(format!("{reason:?}: {msg}")))
            });
        }
        // Bindings are addressed in u32 words by u32 indices.
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(u32::MAX as u64)
            & !255;
        let split = opts
            .max_binding
            .map_or(max_binding, |m| max_binding.min(m.max(256)) & !255);
        let store = opts.pipeline_cache.as_deref().map(|dir| {
            super::pipeline_store::PipelineStore::open(dir, &device, &info, driver_cache)
        });
        Ok(GpuDevice {
            queue,
            info,
            limits,
            caps,
            max_binding,
            split,
            store,
            device,
            errors,
            kernels: opts.kernels,
        })
    }

    /// "name (backend, type)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {:?})",
            self.info.name,
            self.info.backend.to_str(),
            self.info.device_type
        )
    }

    /// Waits for every submission so far and reports any error raised meanwhile.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Wgpu(e.to_string()))?;
        self.errors.take()
    }
}
