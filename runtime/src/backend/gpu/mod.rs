//! The GPU backend: every op of [`Backend`] as WGSL compute kernels (`shaders/`) through wgpu.
//!
//! - Weights stay in their file layout (f32, f16, q8, q4) as u32 words and are dequantized inside
//!   the kernels; a matrix larger than one storage binding is split by rows into chunks.
//! - Activations are pooled GPU buffers ([`GpuAct`]); nothing is read back until the host needs
//!   bytes: every op of a forward pass is recorded into one command encoder and submitted once,
//!   when `lm_head_stats` reads the per-position statistics (20 words per position).
//! - Routed experts are reached through a slot table into an expert pool (experts.rs); the MoE
//!   dispatch (per-expert token lists) is built on the GPU.
//!
//! Module map: device.rs (adapter, features, limits, errors), kernels.rs (embedded WGSL, pipeline
//! cache), recorder.rs (the recording, params arena, bind-group cache, readback), pool.rs
//! (buffers), experts.rs (pool + slot table), ops/ (one file per op: params struct + dispatch).

pub mod choice;
pub mod compose;
pub mod device;
pub mod experts;
pub mod kernels;
pub mod kv;
pub mod ops;
pub mod pipeline_store;
pub mod pool;
pub mod recorder;
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;
pub mod yardsticks;

use std::ops::Range;
use std::sync::{Arc, Mutex, Weak};

pub use choice::KernelChoice;
pub use device::{
    list_adapters, set_default_pipeline_cache, user_pipeline_cache, AdapterSummary, DeviceCaps,
    GpuDevice, GpuError, GpuOptions,
};
pub use experts::{GpuExpertPool, GpuExperts};
pub use kv::{GpuKv, KvArena};
pub use recorder::DispatchTag;
pub use yardsticks::{CopyBandwidth, DispatchFloor};

use super::shapes::{self, shape_err};
use super::{
    AttnMask, Backend, BackendError, CcaParams, CcaWeights, MlpRouterParams, MlpRouterWeights,
    PositionStats, Result,
};
use crate::arch::{AttentionKind, ModelConfig, QkNorm};
use crate::format::{DType, EdmFile, TensorView};
use experts::ExpertStore;
use kernels::Kernels;
use pool::{ActPool, GpuBuffer, Pooled};
use recorder::{Ctx, Shared, State};

/// Uploads queued with `write_buffer` are flushed to the device past this many bytes, so loading a
/// large model does not stage all of it at once.
const UPLOAD_FLUSH: u64 = 256 << 20;

const KV_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// A weight in file layout; vectors (norm weights, biases) are decoded to f32 at load.
pub struct GpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub(crate) chunks: Vec<WeightChunk>,
}

/// Rows `row0 .. row0 + rows` of a weight, laid out as a tensor of their own.
pub(crate) struct WeightChunk {
    pub row0: u32,
    pub rows: u32,
    /// Word offset of the scales (quantized types).
    pub scales: u32,
    pub buf: Arc<GpuBuffer>,
}

impl GpuWeight {
    /// The weight-type code of the kernels (lib/dequant.wgsl).
    pub(crate) fn wtype(&self) -> u32 {
        weight_code(self.dtype)
    }

    fn vector(&self) -> Option<&GpuBuffer> {
        match (self.dtype, self.chunks.as_slice()) {
            (DType::F32, [c]) if self.rows == 1 => Some(&c.buf),
            _ => None,
        }
    }

    /// The f32 values of a small `[rows, cols]` table (conv taps, residual scales) in one buffer,
    /// if it is exactly that shape.
    fn f32_table(&self, rows: usize, cols: usize) -> Option<&GpuBuffer> {
        match (self.dtype, self.chunks.as_slice()) {
            (DType::F32, [c]) if self.rows * self.cols == rows * cols => Some(&c.buf),
            _ => None,
        }
    }
}

/// `[rows, cols]` f32 activations in a pooled GPU buffer.
pub struct GpuAct {
    pub rows: usize,
    pub cols: usize,
    pub(crate) buf: Pooled,
}

/// Router output on the GPU: ids and weights `[rows, k]`.
pub struct GpuRouting {
    pub rows: usize,
    pub k: usize,
    ids: Pooled,
    weights: Pooled,
}

pub struct GpuBackend {
    sh: Arc<Shared>,
    st: Mutex<State>,
    stores: Mutex<Vec<Weak<ExpertStore>>>,
    /// Paged expert pools with a pass in flight (experts.rs).
    paging: experts::ActivePools,
    /// The KV arena new caches are ranges of ([`Backend::reserve_kv`]; kv.rs).
    kv_arena: Mutex<Option<Arc<KvArena>>>,
    /// Threads building the pipelines a model used before ([`Backend::prepare_for_model`]).
    warmers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for GpuBackend {
    fn drop(&mut self) {
        self.keep_caches();
    }
}

/// A norm weight or bias of the right length that is not one f32 row (the kernels read it as one).
fn not_a_vector(op: &'static str, w: &GpuWeight) -> BackendError {
    shape_err(
        op,
        format!(
            "[{}, {}] {:?} weight is not one f32 row",
            w.rows, w.cols, w.dtype
        ),
    )
}

/// A NaN or infinity in a weight file is corruption (the CPU backend refuses it the same way).
pub(crate) fn check_finite(view: &TensorView<'_>) -> Result<()> {
    use crate::format::dtype::{DecodeError, GROUP};
    use crate::format::FormatError;
    let expected = view.dtype.byte_len(view.shape).unwrap_or(usize::MAX);
    let err = |source| FormatError::Decode {
        name: view.name.to_string(),
        source,
    };
    if expected != view.bytes.len() {
        return Err(err(DecodeError::Length {
            dtype: view.dtype,
            shape: view.shape.to_vec(),
            expected,
            got: view.bytes.len(),
        })
        .into());
    }
    let n: usize = view.shape.iter().product();
    match view.dtype {
        DType::F32 => {
            if let Some(index) = view
                .bytes
                .chunks_exact(4)
                .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
            {
                return Err(err(DecodeError::NotFinite {
                    dtype: view.dtype,
                    index,
                })
                .into());
            }
        }
        DType::F16 => {
            if let Some(index) = view
                .bytes
                .chunks_exact(2)
                .position(|c| !half::f16::from_le_bytes([c[0], c[1]]).is_finite())
            {
                return Err(err(DecodeError::NotFinite {
                    dtype: view.dtype,
                    index,
                })
                .into());
            }
        }
        DType::Q8 | DType::Q4 => {
            let codes = if view.dtype == DType::Q8 { n } else { n / 2 };
            for (index, c) in view.bytes[codes..].chunks_exact(2).enumerate() {
                let s = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                if !s.is_finite() {
                    return Err(err(DecodeError::BadScale {
                        dtype: view.dtype,
                        index,
                        value: s,
                    })
                    .into());
                }
            }
            debug_assert_eq!((view.bytes.len() - codes) / 2, n / GROUP);
        }
        DType::U8 => {}
    }
    Ok(())
}

/// `queue.write_buffer` of `bytes` at `offset`, padded to whole words.
pub(crate) fn write_padded(sh: &Shared, buf: &GpuBuffer, offset: u64, bytes: &[u8]) {
    if bytes.len().is_multiple_of(4) {
        sh.dev.queue.write_buffer(&buf.raw, offset, bytes);
    } else {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4) * 4, 0);
        sh.dev.queue.write_buffer(&buf.raw, offset, &v);
    }
}

impl GpuBackend {
    /// Opens the device `opts` chooses (see [`GpuOptions`]); an error when there is none.
    pub fn new(opts: &GpuOptions) -> std::result::Result<GpuBackend, GpuError> {
        let dev = GpuDevice::new(opts)?;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let mk = |label| GpuBuffer::new(&dev.device, 256, storage, label);
        let dummies = [mk("dummy 0"), mk("dummy 1"), mk("dummy 2")];
        let status = GpuBuffer::new(
            &dev.device,
            16,
            storage | wgpu::BufferUsages::COPY_SRC,
            "status",
        );
        let acts = ActPool::new(dev.device.clone(), pool::ACT_USAGE, "activation");
        let staging = ActPool::new(
            dev.device.clone(),
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            "staging",
        );
        let arena_align = (dev.limits.min_uniform_buffer_offset_alignment)
            .max(dev.limits.min_storage_buffer_offset_alignment)
            .max(16) as u64;
        let st = State::new(&dev, opts);
        Ok(GpuBackend {
            sh: Arc::new(Shared {
                dev,
                kernels: Kernels::default(),
                acts,
                staging,
                dummies,
                status,
                poison: opts.poison,
                arena_align,
            }),
            st: Mutex::new(st),
            stores: Mutex::new(Vec::new()),
            paging: experts::ActivePools::default(),
            kv_arena: Mutex::new(None),
            warmers: Mutex::new(Vec::new()),
        })
    }

    /// Waits for the pipelines [`Backend::prepare_for_model`] started building; returns how many
    /// pipelines exist then.
    pub fn finish_warm_up(&self) -> usize {
        let threads = std::mem::take(&mut *self.warmers.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
        self.sh.kernels.count()
    }

    /// Every pipeline built so far, by (kernel file, entry point, weight-type bits).
    pub fn pipelines_built(&self) -> Vec<pipeline_store::KeyName> {
        self.sh.kernels.names()
    }

    /// The device in words: "name (backend, type)".
    pub fn device_name(&self) -> String {
        self.sh.dev.describe()
    }

    /// The measurement probes the kernels were built with (`KernelChoice::probe`; 0: none).
    pub fn probe(&self) -> u32 {
        self.sh.dev.kernels.probe
    }

    pub fn caps(&self) -> DeviceCaps {
        self.sh.dev.caps
    }

    /// The largest storage binding used (weights above it are split by rows).
    pub fn max_binding(&self) -> u64 {
        self.sh.dev.max_binding
    }

    /// Queue submissions so far (one per forward pass that only asks for statistics).
    pub fn submissions(&self) -> u64 {
        self.lock().submissions
    }

    /// Dispatches recorded so far.
    pub fn dispatches(&self) -> u64 {
        self.lock().dispatches
    }

    /// Dispatches after which a recording is submitted without waiting (0: only at read-backs).
    pub fn submit_every(&self) -> u64 {
        self.lock().submit_every
    }

    /// Host time spent in ops, submissions and waits so far (benchmarks take differences).
    pub fn host_times(&self) -> recorder::HostTimes {
        self.lock().host
    }

    /// Starts timing every dispatch (up to `capacity`) with GPU timestamps; false when the device
    /// has no TIMESTAMP_QUERY (or it is switched off).
    pub fn start_timing(&self, capacity: u32) -> bool {
        if !self.sh.dev.caps.timestamps {
            return false;
        }
        let count = (capacity * 2).clamp(2, wgpu::QUERY_SET_MAX_QUERIES);
        let queries = self
            .sh
            .dev
            .device
            .create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timing"),
                ty: wgpu::QueryType::Timestamp,
                count,
            });
        self.lock().timing = Some(recorder::Timing {
            queries,
            capacity: count,
            labels: Vec::new(),
        });
        true
    }

    /// Ends timing: (entry point, GPU nanoseconds) of every dispatch since `start_timing`, in order.
    pub fn finish_timing(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(self
            .finish_timing_tagged()?
            .into_iter()
            .map(|(t, ns)| (t.entry, ns))
            .collect())
    }

    /// [`GpuBackend::finish_timing`] with each dispatch's grid.
    pub fn finish_timing_tagged(&self) -> Result<Vec<(DispatchTag, f64)>> {
        let Some(t) = self.lock().timing.take() else {
            return Ok(Vec::new());
        };
        let n = t.labels.len() as u32 * 2;
        if n == 0 {
            return Ok(Vec::new());
        }
        let resolve = GpuBuffer::new(
            &self.sh.dev.device,
            n as u64 * 8,
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            "timestamps",
        );
        let period = self.sh.dev.queue.get_timestamp_period() as f64;
        let ticks: Vec<u64> = self.with(|ctx| {
            ctx.resolve_timestamps(&t.queries, n, &resolve);
            let b = ctx.read(&[(&resolve, 0, n as u64 * 8)])?;
            Ok(bytemuck::pod_collect_to_vec(&b[0]))
        })?;
        Ok(t.labels
            .iter()
            .zip(ticks.chunks_exact(2))
            .map(|(l, p)| (*l, p[1].saturating_sub(p[0]) as f64 * period))
            .collect())
    }

    /// The device's memory bandwidth as copies see it ([`yardsticks::copy_bandwidth`]).
    pub fn copy_bandwidth(&self, bytes: u64, iters: usize) -> Result<CopyBandwidth> {
        yardsticks::copy_bandwidth(self, bytes, iters)
    }

    /// The cost of a trivial dispatch, `n` in one submission ([`yardsticks::dispatch_floor`]).
    pub fn dispatch_floor(&self, n: usize) -> Result<DispatchFloor> {
        yardsticks::dispatch_floor(self, n)
    }

    /// The latency of a dependent load over `bytes`, ns, and the bytes measured
    /// ([`yardsticks::load_latency`]).
    pub fn load_latency(&self, bytes: u64, steps: u32, warm: bool) -> Result<(f64, u64)> {
        yardsticks::load_latency(self, bytes, steps, warm)
    }

    /// A bounded GPU expert pool of `slots` experts for `file` (exact lazy paging; see
    /// `GpuExpertPool::new`); its layers come from [`GpuBackend::paged_experts`].
    pub fn expert_pool(
        &self,
        file: &Arc<EdmFile>,
        slots: usize,
        policy: crate::experts::Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<Arc<GpuExpertPool>> {
        GpuExpertPool::new(&self.sh, file, slots, policy, prefetch, readers)
    }

    /// The experts of `layer`, paged through `pool` (nothing is uploaded now).
    pub fn paged_experts(&self, pool: &Arc<GpuExpertPool>, layer: usize) -> Result<GpuExperts> {
        pool.layer(&self.sh, layer)
    }

    /// K and V buffers of `capacity` positions for every layer (each layer its own width).
    fn kv_layers(
        &self,
        config: &ModelConfig,
        capacity: usize,
    ) -> Result<(kv::LayerBuffers, kv::LayerBuffers)> {
        // Layers of their own geometry (DiffusionGemma's global layers) cache rows of their own
        // width; the widest sets the binding check.
        let widest = (0..config.num_layers)
            .map(|l| config.kv_dim_of(l))
            .max()
            .unwrap_or(0)
            .max(config.kv_dim());
        let bytes =
            (capacity as u64)
                .checked_mul(widest as u64 * 4)
                .ok_or(BackendError::CacheFull {
                    pos: capacity,
                    capacity: 0,
                })?;
        if bytes > self.sh.dev.max_binding {
            return Err(GpuError::Limit {
                what: format!("a KV cache layer of {capacity} positions"),
                need: bytes,
                limit: self.sh.dev.max_binding,
            }
            .into());
        }
        let mk = |what| {
            (0..config.num_layers)
                .map(|l| {
                    let layer = capacity as u64 * config.kv_dim_of(l) as u64 * 4;
                    GpuBuffer::new(&self.sh.dev.device, layer, KV_USAGE, what)
                })
                .collect()
        };
        Ok((mk("k cache"), mk("v cache")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the recording; on error the recording is dropped (nothing half-recorded runs).
    fn with<R>(
        &self,
        f: impl FnOnce(&mut Ctx) -> std::result::Result<R, BackendError>,
    ) -> Result<R> {
        let mut st = self.lock();
        let t0 = std::time::Instant::now();
        let mut ctx = Ctx {
            sh: &self.sh,
            st: &mut st,
        };
        let r = f(&mut ctx);
        if r.is_err() {
            ctx.discard();
        }
        st.host.ops_ns += t0.elapsed().as_nanos() as u64;
        r
    }

    /// An activation from host values (tests, soft embeddings).
    pub fn upload_act(&self, rows: usize, cols: usize, data: &[f32]) -> Result<GpuAct> {
        if data.len() != rows * cols {
            return Err(shape_err(
                "upload_act",
                format!("{} values for [{rows}, {cols}]", data.len()),
            ));
        }
        self.with(|ctx| {
            let buf = ctx.output((data.len() * 4) as u64)?;
            ctx.upload(bytemuck::cast_slice(data), &buf)?;
            Ok(GpuAct { rows, cols, buf })
        })
    }

    /// Reads an activation back (submits what is recorded).
    pub fn read_act(&self, x: &GpuAct) -> Result<Vec<f32>> {
        self.with(|ctx| {
            let bytes = ctx.read(&[(&x.buf, 0, (x.rows * x.cols * 4) as u64)])?;
            Ok(bytemuck::pod_collect_to_vec(&bytes[0]))
        })
    }

    fn note_upload(&self, bytes: u64) -> Result<()> {
        let mut st = self.lock();
        st.pending_upload += bytes;
        if st.pending_upload > UPLOAD_FLUSH {
            st.pending_upload = 0;
            self.sh.dev.queue.submit(std::iter::empty());
            self.sh.dev.wait()?;
        }
        Ok(())
    }

    /// The RoPE kernel's norm code and its q / k norm vectors (dummies without a norm).
    fn qk_norms(
        &self,
        op: &'static str,
        q_norm: Option<&GpuWeight>,
        k_norm: Option<&GpuWeight>,
        c: &ModelConfig,
    ) -> Result<(u32, Arc<GpuBuffer>, Arc<GpuBuffer>)> {
        let bad = || shape_err(op, "q/k norm weight missing or misshapen".into());
        let vec_of = |w: Option<&GpuWeight>, len: usize| -> Result<Arc<GpuBuffer>> {
            match w {
                Some(w) if w.cols * w.rows == len => {
                    w.vector().map(|_| w.chunks[0].buf.clone()).ok_or_else(bad)
                }
                _ => Err(bad()),
            }
        };
        Ok(match c.qk_norm {
            QkNorm::None => (0, self.sh.dummies[0].clone(), self.sh.dummies[1].clone()),
            QkNorm::PerHead => (1, vec_of(q_norm, c.head_dim)?, vec_of(k_norm, c.head_dim)?),
            QkNorm::Whole => (2, vec_of(q_norm, c.q_dim())?, vec_of(k_norm, c.kv_dim())?),
        })
    }

    fn out_act(ctx: &mut Ctx, rows: usize, cols: usize) -> Result<GpuAct> {
        Ok(GpuAct {
            rows,
            cols,
            buf: ctx.output((rows * cols * 4) as u64)?,
        })
    }

    /// The shared expert as the GEMV expert kernels' extra column, where they run it: resident
    /// experts in their kernels' weight types, few tokens per expert.
    /// `rows`: the row count the kernel choice goes by (a batched pass's largest sequence, see
    /// State::batch_rows), so a batched row sums as it would alone.
    #[allow(clippy::too_many_arguments)]
    fn fused_shared<'a>(
        sh: &Shared,
        rows: usize,
        x: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        layout: &ops::moe::ExpertLayout,
        gate_up: &'a GpuWeight,
        down: &'a GpuWeight,
    ) -> Option<ops::moe::SharedMlp<'a>> {
        let m = match (gate_up.chunks.as_slice(), down.chunks.as_slice()) {
            ([gu], [dn])
                if experts.paged.is_none()
                    && x.cols == experts.hidden
                    && routing.rows == x.rows
                    && (gate_up.rows, gate_up.cols) == (2 * experts.inter, experts.hidden)
                    && (down.rows, down.cols) == (experts.hidden, experts.inter)
                    && gate_up.dtype == experts.gate_up.dtype
                    && down.dtype == experts.down.dtype =>
            {
                ops::moe::SharedMlp {
                    gate_up: (&*gu.buf, gu.scales),
                    down: (&*dn.buf, dn.scales),
                }
            }
            _ => return None,
        };
        ops::moe::fuses_shared(&sh.dev.kernels, rows, routing.k, layout).then_some(m)
    }

    /// The routed experts of `x` under `routing`, plus what `shared` adds (see
    /// [`ops::moe::Shared`]).
    pub(crate) fn moe_act(
        ctx: &mut Ctx,
        x: &GpuAct,
        routing: &GpuRouting,
        layout: &ops::moe::ExpertLayout,
        shared: ops::moe::Shared<'_>,
    ) -> Result<GpuAct> {
        let out = Self::out_act(ctx, x.rows, x.cols)?;
        ops::moe::moe(
            ctx,
            &x.buf,
            x.rows,
            &routing.ids,
            &routing.weights,
            routing.k,
            layout,
            shared,
            &out.buf,
            None,
        )?;
        Ok(out)
    }

    /// Rows of logits computed per LM-head pass: the logits scratch stays within one binding.
    fn head_rows(&self, vocab: usize) -> usize {
        ((self.sh.dev.split / (vocab as u64 * 4)) as usize).max(1)
    }
}

impl Backend for GpuBackend {
    type Weight = GpuWeight;
    type Act = GpuAct;
    type Experts = GpuExperts;
    type Kv = GpuKv;
    type Routing = GpuRouting;
    type Canvas = ops::denoise::GpuCanvas;
    type Stats = ops::denoise::GpuStats;

    fn name(&self) -> String {
        format!("gpu: {}", self.device_name())
    }

    fn weights_leave_host(&self) -> bool {
        true
    }

    /// Builds the pipelines this model used on this device in earlier runs (the pipeline store's
    /// list), on background threads — all cores but one, at most 8, so the load keeps one — while
    /// the weights load. A pass that wants one still being built waits for it (kernels.rs).
    fn prepare_for_model(&self, model_key: &str) {
        let Some(store) = &self.sh.dev.store else {
            return;
        };
        let entries = ops::all_entries();
        let find = |f: &str, e: &str| entries.iter().find(|(x, _)| x.file == f && x.name == e);
        let work: Vec<(&'static kernels::Entry, u32)> = store
            .model_keys(model_key, |(f, e, _)| find(f, e).is_some())
            .iter()
            .filter_map(|(f, e, w)| Some((find(f, e)?.0, *w)))
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = (cores.saturating_sub(1)).clamp(1, 8).min(work.len());
        let work = Arc::new(work);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut warmers = self.warmers.lock().unwrap();
        for _ in 0..threads {
            let (sh, work, next) = (self.sh.clone(), work.clone(), next.clone());
            let spawned = std::thread::Builder::new()
                .name("edgediff-pipelines".into())
                .spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(entry, wtype)) = work.get(i) else {
                        break;
                    };
                    // A failure here (a kernel this device cannot build) is the pass's to report.
                    let _ = sh.kernels.get(&sh.dev, entry, wtype);
                });
            match spawned {
                Ok(t) => warmers.push(t),
                Err(e) => tracing::warn!("pipeline warm-up thread: {e}"),
            }
        }
    }

    fn keep_caches(&self) {
        if let Some(store) = &self.sh.dev.store {
            if store.grew(self.sh.kernels.count()) {
                store.save(&self.sh.kernels.names());
            }
        }
    }

    fn load_weight(&self, view: TensorView<'_>) -> Result<GpuWeight> {
        let sh = &self.sh;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let (rows, cols) = match view.shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => {
                return Err(shape_err(
                    "load_weight",
                    format!("{}: shape {s:?}", view.name),
                ))
            }
        };
        if view.shape.len() == 1 || view.dtype == DType::U8 {
            let data = view.to_f32()?;
            let buf = GpuBuffer::new(&sh.dev.device, (data.len() * 4) as u64, usage, view.name);
            if data.len() as u64 * 4 > sh.dev.max_binding {
                return Err(GpuError::Limit {
                    what: format!("vector {}", view.name),
                    need: data.len() as u64 * 4,
                    limit: sh.dev.max_binding,
                }
                .into());
            }
            write_padded(sh, &buf, 0, bytemuck::cast_slice(&data));
            self.note_upload(buf.size)?;
            return Ok(GpuWeight {
                rows,
                cols,
                dtype: DType::F32,
                chunks: vec![WeightChunk {
                    row0: 0,
                    rows: rows as u32,
                    scales: 0,
                    buf,
                }],
            });
        }
        check_finite(&view)?;
        let dtype = view.dtype;
        // Bytes per row of codes (or values) and of scales.
        let (code_row, scale_row) = match dtype {
            DType::F32 => (cols * 4, 0),
            DType::F16 => (cols * 2, 0),
            DType::Q8 => (cols, cols / 16),
            _ => (cols / 2, cols / 16),
        };
        let row_bytes = (code_row + scale_row) as u64;
        let per_chunk = (sh.dev.split / row_bytes.max(1)) as usize;
        if per_chunk == 0 {
            return Err(GpuError::Limit {
                what: format!("one row of {}", view.name),
                need: row_bytes,
                limit: sh.dev.split,
            }
            .into());
        }
        let codes_total = rows * code_row;
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < rows.max(1) {
            let r1 = (r0 + per_chunk).min(rows);
            let codes = &view.bytes[r0 * code_row..r1 * code_row];
            let scales = &view.bytes[codes_total + r0 * scale_row..codes_total + r1 * scale_row];
            let padded = codes.len().div_ceil(4) * 4;
            let buf = GpuBuffer::new(
                &sh.dev.device,
                (padded + scales.len()) as u64,
                usage,
                view.name,
            );
            write_padded(sh, &buf, 0, codes);
            if !scales.is_empty() {
                write_padded(sh, &buf, padded as u64, scales);
            }
            self.note_upload(buf.size)?;
            chunks.push(WeightChunk {
                row0: r0 as u32,
                rows: (r1 - r0) as u32,
                scales: (padded / 4) as u32,
                buf,
            });
            if r1 == rows {
                break;
            }
            r0 = r1;
        }
        Ok(GpuWeight {
            rows,
            cols,
            dtype,
            chunks,
        })
    }

    fn load_experts(
        &self,
        file: &Arc<EdmFile>,
        layer: usize,
        resident: &dyn Fn(usize) -> bool,
    ) -> Result<GpuExperts> {
        let store = {
            let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
            stores.retain(|w| w.strong_count() > 0);
            match stores
                .iter()
                .rev()
                .filter_map(Weak::upgrade)
                .find(|s| s.serves(file, layer))
            {
                Some(s) => s,
                None => {
                    let s = Arc::new(ExpertStore::new(&self.sh, file));
                    stores.push(Arc::downgrade(&s));
                    s
                }
            }
        };
        let mut uploaded = 0u64;
        let experts = experts::load_layer(&self.sh, &store, file, layer, resident, &mut |b| {
            uploaded += b
        })?;
        self.note_upload(uploaded)?;
        Ok(experts)
    }

    fn new_kv(&self, config: &ModelConfig, capacity: usize) -> Result<GpuKv> {
        let arena = self
            .kv_arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|a| a.fits(config));
        if let Some(lease) = arena.and_then(|a| a.take(capacity)) {
            let a = lease.arena.clone();
            return Ok(GpuKv {
                capacity,
                base: lease.range.start,
                k: a.k.clone(),
                v: a.v.clone(),
                cca: None,
                lease: Some(lease),
                _bytes: crate::backend::kv_meter::KvAllocation::new(config.kv_bytes(capacity)),
            });
        }
        let (k, v) = self.kv_layers(config, capacity)?;
        let cca = match config.attention {
            AttentionKind::Standard => None,
            AttentionKind::Cca => Some(ops::cca::CcaState::new(
                &self.sh.dev,
                config,
                capacity,
                KV_USAGE,
            )?),
        };
        let sizes = |l: &[Arc<GpuBuffer>]| l.iter().map(|b| b.size).sum::<u64>();
        let bytes =
            sizes(&k) + sizes(&v) + cca.as_ref().map_or(0, |c| sizes(&c.conv) + sizes(&c.vd));
        Ok(GpuKv {
            capacity,
            base: 0,
            k,
            v,
            cca,
            lease: None,
            _bytes: crate::backend::kv_meter::KvAllocation::new(bytes),
        })
    }

    fn reserve_kv(&self, config: &ModelConfig, positions: usize) -> Result<usize> {
        let mut slot = self.kv_arena.lock().unwrap_or_else(|p| p.into_inner());
        // Caches already in the old arena keep it alive until they drop.
        *slot = None;
        if positions == 0 || !KvArena::suits(config) {
            return Ok(0);
        }
        // One layer buffer must fit a binding.
        let row = (config.kv_dim() as u64 * 4).max(1);
        let positions = positions.min((self.sh.dev.max_binding / row) as usize);
        let (k, v) = self.kv_layers(config, positions)?;
        // A device out of memory says so here (the server then fails at start, naming it), not at
        // the first request's pass.
        self.sh.dev.wait()?;
        *slot = Some(Arc::new(KvArena::new(config, positions, k, v)));
        Ok(positions)
    }

    fn kv_capacity(&self, kv: &GpuKv) -> usize {
        kv.capacity
    }

    fn begin_forward(&self, tokens: usize, largest: usize) -> Result<()> {
        self.paging.begin_forward();
        // A batched pass: kernels chosen by row count choose as for its largest sequence.
        let mut st = self.lock();
        st.batch_rows = (largest < tokens).then_some(largest);
        st.fused_norms = largest <= self.sh.dev.kernels.fuse_norms_max_t;
        Ok(())
    }

    fn begin_head(&self, rows: usize, largest: usize) -> Result<()> {
        self.lock().batch_rows = (largest < rows).then_some(largest);
        Ok(())
    }

    /// Passes whose row counts choose the same kernels (ops/batch_class.rs).
    fn batch_class(&self, c: &ModelConfig, rows: usize, head_rows: usize) -> Option<u64> {
        ops::batch_class::batch_class(self, c, rows, head_rows)
    }

    fn rows_of(&self, x: &GpuAct, rows: Range<usize>) -> Result<GpuAct> {
        shapes::rows_within("rows_of", &rows, x.rows)?;
        let row = (x.cols * 4) as u64;
        self.with(|ctx| {
            let out = Self::out_act(ctx, rows.len(), x.cols)?;
            if !rows.is_empty() {
                ctx.copy(
                    &x.buf,
                    rows.start as u64 * row,
                    &out.buf,
                    0,
                    rows.len() as u64 * row,
                );
            }
            Ok(out)
        })
    }

    fn stack_rows(&self, parts: &[&GpuAct]) -> Result<GpuAct> {
        let cols = shapes::same_widths("stack_rows", parts.iter().map(|p| p.cols))?;
        let rows = parts.iter().map(|p| p.rows).sum();
        let row = (cols * 4) as u64;
        self.with(|ctx| {
            let out = Self::out_act(ctx, rows, cols)?;
            let mut at = 0;
            for p in parts.iter().filter(|p| p.rows > 0) {
                ctx.copy(&p.buf, 0, &out.buf, at, p.rows as u64 * row);
                at += p.rows as u64 * row;
            }
            Ok(out)
        })
    }

    fn gather_rows(&self, x: &GpuAct, ranges: &[Range<usize>]) -> Result<GpuAct> {
        ops::elementwise::gather_rows(self, x, ranges)
    }

    fn embed(&self, table: &GpuWeight, tokens: &[u32]) -> Result<GpuAct> {
        ops::embed::embed(self, table, tokens)
    }

    fn rms_norm(&self, x: &GpuAct, w: &GpuWeight, eps: f32) -> Result<GpuAct> {
        ops::norm::rms_norm(self, x, w, eps)
    }

    fn add_rms_norm(
        &self,
        x: &mut GpuAct,
        delta: &GpuAct,
        w: &GpuWeight,
        eps: f32,
    ) -> Result<GpuAct> {
        ops::norm::add_rms_norm(self, x, delta, w, eps)
    }

    fn add(&self, x: &mut GpuAct, delta: &GpuAct) -> Result<()> {
        ops::elementwise::add(self, x, delta)
    }

    fn matmul(&self, w: &GpuWeight, x: &GpuAct) -> Result<GpuAct> {
        ops::matmul::matmul(self, w, x)
    }

    fn mlp(&self, gate_up: &GpuWeight, down: &GpuWeight, x: &GpuAct) -> Result<GpuAct> {
        ops::matmul::mlp(self, gate_up, down, x)
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut GpuAct,
        q_norm: Option<&GpuWeight>,
        k_norm: Option<&GpuWeight>,
        c: &ModelConfig,
        start: usize,
    ) -> Result<()> {
        ops::rope::qk_norm_rope(self, qkv, q_norm, k_norm, c, start)
    }

    fn rope_attention(
        &self,
        qkv: &mut GpuAct,
        q_norm: Option<&GpuWeight>,
        k_norm: Option<&GpuWeight>,
        kv: &mut GpuKv,
        layer: usize,
        c: &ModelConfig,
        start: usize,
        kv_len: usize,
        mask: AttnMask,
    ) -> Result<GpuAct> {
        ops::attention::rope_attention(self, qkv, q_norm, k_norm, kv, layer, c, start, kv_len, mask)
    }

    fn rope_attention_seqs(
        &self,
        qkv: &mut GpuAct,
        q_norm: Option<&GpuWeight>,
        k_norm: Option<&GpuWeight>,
        seqs: &mut [super::SeqAttention<'_, GpuKv>],
        layer: usize,
        c: &ModelConfig,
    ) -> Result<GpuAct> {
        ops::attention::rope_attention_seqs(self, qkv, q_norm, k_norm, seqs, layer, c)
    }

    fn attention(
        &self,
        qkv: &GpuAct,
        kv: &mut GpuKv,
        layer: usize,
        c: &ModelConfig,
        start: usize,
        kv_len: usize,
        mask: AttnMask,
    ) -> Result<GpuAct> {
        ops::attention::attention(self, qkv, kv, layer, c, start, kv_len, mask)
    }

    fn route(
        &self,
        x: &GpuAct,
        router: &GpuWeight,
        bias: Option<&GpuWeight>,
        c: &ModelConfig,
    ) -> Result<GpuRouting> {
        self.route_rows(x, router, bias, c, None)
    }

    fn route_within_blocks(
        &self,
        x: &GpuAct,
        router: &GpuWeight,
        bias: Option<&GpuWeight>,
        c: &ModelConfig,
        blocks: &super::BlockRouting,
    ) -> Result<GpuRouting> {
        self.route_rows(x, router, bias, c, Some(blocks))
    }

    fn moe(&self, x: &GpuAct, routing: &GpuRouting, experts: &GpuExperts) -> Result<GpuAct> {
        self.moe_with(x, routing, experts, None)
    }

    fn moe_plus_shared(
        &self,
        x: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        shared: &GpuAct,
    ) -> Result<GpuAct> {
        ops::moe::moe_plus_shared(self, x, routing, experts, shared)
    }

    fn moe_shared_mlp(
        &self,
        x: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        gate_up: &GpuWeight,
        down: &GpuWeight,
    ) -> Result<GpuAct> {
        ops::moe::moe_shared_mlp(self, x, routing, experts, gate_up, down)
    }

    fn fuses_norms(&self) -> bool {
        ops::residual::fuses_norms(self)
    }

    fn matmul_normed(
        &self,
        w: &GpuWeight,
        x: &GpuAct,
        norm: &GpuWeight,
        eps: f32,
    ) -> Result<GpuAct> {
        ops::residual::matmul_normed(self, w, x, norm, eps)
    }

    fn matmul_add(&self, w: &GpuWeight, a: &GpuAct, x: &mut GpuAct) -> Result<()> {
        ops::residual::matmul_add(self, w, a, x)
    }

    fn route_normed(
        &self,
        x: &GpuAct,
        norm: &GpuWeight,
        eps: f32,
        router: &GpuWeight,
        bias: Option<&GpuWeight>,
        c: &ModelConfig,
        blocks: Option<&super::BlockRouting>,
    ) -> Result<(GpuAct, GpuRouting)> {
        ops::residual::route_normed(self, x, norm, eps, router, bias, c, blocks)
    }

    fn mlp_add(
        &self,
        gate_up: &GpuWeight,
        down: &GpuWeight,
        x: &mut GpuAct,
        norm: &GpuWeight,
        eps: f32,
    ) -> Result<()> {
        ops::residual::mlp_add(self, gate_up, down, x, norm, eps)
    }

    fn moe_add(
        &self,
        h: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        shared: Option<(&GpuWeight, &GpuWeight)>,
        x: &mut GpuAct,
    ) -> Result<()> {
        ops::residual::moe_add(self, h, routing, experts, shared, x)
    }

    fn moe_add_rms_norm(
        &self,
        h: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        shared: Option<(&GpuWeight, &GpuWeight)>,
        x: &mut GpuAct,
        norm: &GpuWeight,
        eps: f32,
    ) -> Result<GpuAct> {
        ops::residual::moe_add_rms_norm(self, h, routing, experts, shared, x, norm, eps)
    }

    fn cca_qkv(
        &self,
        proj: &mut GpuAct,
        w: CcaWeights<'_, GpuWeight>,
        kv: &mut GpuKv,
        p: CcaParams,
    ) -> Result<()> {
        ops::cca::cca_qkv(self, proj, w, kv, p)
    }

    fn route_mlp(
        &self,
        x: &GpuAct,
        w: MlpRouterWeights<'_, GpuWeight>,
        eda: Option<&GpuAct>,
        p: MlpRouterParams,
    ) -> Result<(GpuRouting, GpuAct)> {
        ops::router_mlp::route_mlp(self, x, w, eda, p)
    }

    fn scaled_residual_norm(
        &self,
        x: &mut GpuAct,
        delta: &GpuAct,
        scales: &GpuWeight,
        norm: &GpuWeight,
        eps: f32,
    ) -> Result<GpuAct> {
        ops::scaled::scaled_residual_norm(self, x, delta, scales, norm, eps)
    }

    fn embed_affine(&self, x: &mut GpuAct, affine: &GpuWeight) -> Result<()> {
        ops::embed_affine::embed_affine(self, x, affine)
    }

    fn scale(&self, x: &mut GpuAct, s: f32) -> Result<()> {
        ops::gemma::scale(self, x, s)
    }

    fn has_canvas_ops(&self) -> bool {
        true
    }

    fn soft_embed(&self, logits: &[f32], table: &GpuWeight, s: f32) -> Result<GpuAct> {
        ops::soft_embed::soft_embed(self, logits, table, s)
    }

    fn moe_act(
        &self,
        x: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        act: crate::arch::Activation,
    ) -> Result<GpuAct> {
        ops::gemma::moe_act(self, x, routing, experts, act)
    }

    fn prepare_heads(
        &self,
        proj: &GpuAct,
        q_norm: &GpuWeight,
        k_norm: &GpuWeight,
        p: super::HeadsParams,
    ) -> Result<GpuAct> {
        ops::heads::prepare_heads(self, proj, q_norm, k_norm, p)
    }

    fn attention_heads(
        &self,
        qkv: &GpuAct,
        kv: &mut GpuKv,
        p: super::HeadsParams,
    ) -> Result<GpuAct> {
        ops::heads::attention_heads(self, qkv, kv, p)
    }

    fn gated_mlp(
        &self,
        gate_up: &GpuWeight,
        down: &GpuWeight,
        x: &GpuAct,
        act: crate::arch::Activation,
    ) -> Result<GpuAct> {
        ops::gemma::gated_mlp(self, gate_up, down, x, act)
    }

    fn route_scaled(
        &self,
        x: &GpuAct,
        proj: &GpuWeight,
        scale: &GpuWeight,
        expert_scale: &GpuWeight,
        p: super::ScaledRouterParams,
    ) -> Result<GpuRouting> {
        ops::gemma::route_scaled(self, x, proj, scale, expert_scale, p)
    }

    fn logits_softcap(
        &self,
        x: &GpuAct,
        head: &GpuWeight,
        rows: Range<usize>,
        cap: f32,
    ) -> Result<Vec<f32>> {
        ops::gemma::logits_softcap(self, x, head, rows, cap)
    }

    fn canvas_head(
        &self,
        x: &GpuAct,
        table: &GpuWeight,
        p: crate::backend::draw::CanvasHeadParams,
        uniforms: &[f32],
    ) -> Result<(Vec<crate::backend::draw::RowDraw>, Option<GpuAct>)> {
        ops::canvas_draw::canvas_head(self, x, table, p, uniforms)
    }

    fn lm_head_stats_softcap(
        &self,
        x: &GpuAct,
        head: &GpuWeight,
        rows: Range<usize>,
        cap: f32,
    ) -> Result<Vec<PositionStats>> {
        ops::gemma::lm_head_stats_softcap(self, x, head, rows, cap)
    }

    fn routing_to_host(&self, routing: &GpuRouting) -> Result<(Vec<u32>, Vec<f32>)> {
        let n = (routing.rows * routing.k * 4) as u64;
        self.with(|ctx| {
            let b = ctx.read(&[(&routing.ids, 0, n), (&routing.weights, 0, n)])?;
            Ok((
                bytemuck::pod_collect_to_vec(&b[0]),
                bytemuck::pod_collect_to_vec(&b[1]),
            ))
        })
    }

    fn lm_head_stats(
        &self,
        x: &GpuAct,
        head: &GpuWeight,
        rows: Range<usize>,
    ) -> Result<Vec<PositionStats>> {
        ops::stats::lm_head_stats(self, x, head, rows)
    }

    fn new_canvas(&self, cells: &[Option<u32>], mask: u32) -> Result<Self::Canvas> {
        ops::denoise::new_canvas(self, cells, mask)
    }

    fn commit_step(
        &self,
        canvas: &mut Self::Canvas,
        stats: &Self::Stats,
        p: &super::CommitParams,
    ) -> Result<()> {
        ops::denoise::commit_step(self, canvas, stats, p)
    }

    fn read_canvas(
        &self,
        canvas: &Self::Canvas,
        steps: Range<usize>,
    ) -> Result<super::CanvasState> {
        ops::denoise::read_canvas(self, canvas, steps)
    }

    fn read_canvases(
        &self,
        canvases: &[&Self::Canvas],
        steps: &[Range<usize>],
    ) -> Result<Vec<super::CanvasState>> {
        ops::denoise::read_canvases(self, canvases, steps)
    }

    fn stats_rows(&self, stats: &Self::Stats, rows: Range<usize>) -> Result<Self::Stats> {
        ops::denoise::stats_rows(stats, rows)
    }

    fn embed_canvas(
        &self,
        table: &GpuWeight,
        canvas: &Self::Canvas,
        from: usize,
        t: usize,
    ) -> Result<GpuAct> {
        ops::denoise::embed_canvas(self, table, canvas, from, t)
    }

    fn lm_head_stats_kept(
        &self,
        x: &GpuAct,
        head: &GpuWeight,
        rows: Range<usize>,
    ) -> Result<Self::Stats> {
        ops::denoise::lm_head_stats_kept(self, x, head, rows)
    }

    fn upload_stats(&self, stats: &[PositionStats]) -> Result<Self::Stats> {
        ops::denoise::upload_stats(self, stats)
    }

    fn records_passes(&self) -> bool {
        true
    }

    fn experts_paged(&self, experts: &GpuExperts) -> bool {
        experts.paged.is_some()
    }

    fn logits(&self, x: &GpuAct, head: &GpuWeight, rows: Range<usize>) -> Result<Vec<f32>> {
        ops::stats::logits(self, x, head, rows)
    }
}

/// An op's small f32 weight `[rows, cols]` as one buffer, or the op's shape error.
fn f32_arg<'a>(
    op: &'static str,
    name: &str,
    w: &'a GpuWeight,
    rows: usize,
    cols: usize,
) -> Result<&'a GpuBuffer> {
    w.f32_table(rows, cols).ok_or_else(|| {
        shape_err(
            op,
            format!("{name} [{}, {}], want f32 [{rows}, {cols}]", w.rows, w.cols),
        )
    })
}

fn weight_code(d: DType) -> u32 {
    match d {
        DType::F16 => 1,
        DType::Q8 => 2,
        DType::Q4 => 3,
        _ => 0,
    }
}

impl GpuBackend {
    /// The routed experts of one layer, plus `plus` (the shared experts' output) when given.
    fn moe_with(
        &self,
        x: &GpuAct,
        routing: &GpuRouting,
        experts: &GpuExperts,
        plus: Option<&GpuBuffer>,
    ) -> Result<GpuAct> {
        if x.cols != experts.hidden || routing.rows != x.rows {
            return Err(shape_err(
                "moe",
                format!(
                    "x [{}, {}] with experts of width {} and routing of {} rows",
                    x.rows, x.cols, experts.hidden, routing.rows
                ),
            ));
        }
        if let Some(pool) = &experts.paged {
            return pool.moe(self, x, routing, experts, plus, 0);
        }
        let layout = experts.layout(&experts.store.slots, &experts.pools);
        let shared = plus.map_or(ops::moe::Shared::None, ops::moe::Shared::Output);
        self.with(|ctx| Self::moe_act(ctx, x, routing, &layout, shared))
    }
}

impl GpuBackend {
    /// [`Backend::route`], with block-level routing when `blocks` is given.
    fn route_rows(
        &self,
        x: &GpuAct,
        router: &GpuWeight,
        bias: Option<&GpuWeight>,
        c: &ModelConfig,
        blocks: Option<&super::BlockRouting>,
    ) -> Result<GpuRouting> {
        let k = c.moe.top_k;
        shapes::router(
            (router.rows, router.cols),
            bias.map(|b| b.rows * b.cols),
            x.cols,
            c,
        )?;
        let bias_buf = match bias {
            None => None,
            Some(b) => Some(b.vector().ok_or_else(|| not_a_vector("route", b))?),
        };
        self.with(|ctx| {
            let ids = ctx.output((x.rows * k * 4) as u64)?;
            let weights = ctx.output((x.rows * k * 4) as u64)?;
            let done = ops::router::route(
                ctx,
                &x.buf,
                x.rows,
                router,
                bias_buf,
                c,
                blocks,
                (&ids, &weights),
                ops::matmul::GemvFuse::default(),
            )?;
            debug_assert!(done, "unfused routing always records");
            Ok(GpuRouting {
                rows: x.rows,
                k,
                ids,
                weights,
            })
        })
    }
}
