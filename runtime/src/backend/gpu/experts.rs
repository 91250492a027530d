//! Routed experts on the GPU: an [`ExpertPool`] of buffers, each as large as one storage binding of
//! the device may be (`GpuDevice::split`: 2 GiB on an H200, 128 MiB on lavapipe and many phones),
//! holding each resident expert's matrices in file layout, and a
//! [`SlotTable`] — one GPU buffer, entry (layer, expert) → (pool buffer index, word offset), NONE
//! for an expert that is not resident — through which the expert kernels find their weights. A
//! residency layer can page experts by writing weights into a pool slot and rewriting the entry;
//! the kernels never change.
//!
//! One store per model file: every MoE layer of a model loaded from the same `Arc<EdmFile>` shares
//! its slot table; loading the same layer again (a second model from the same file) starts a new
//! store, so two models never share slots.
//!
//! ## Exact lazy paging ([`GpuExpertPool`])
//! A bounded pool of N slots (`--expert-memory`), each the size of the largest expert, shared by
//! every MoE layer and managed by the same [`Pager`] as the CPU (eviction policy, statistics). A
//! slot is filled by writing the expert's file bytes into its region of a pool buffer and pointing
//! the slot-table entry at it; an evicted expert's entry goes back to NO_SLOT. The expert kernels
//! compare each entry with the pool buffer they were given, so an expert with NO_SLOT is skipped
//! (never read from a stale region) and `moe_dispatch` flags it in the status word.
//!
//! The router runs on the GPU, so knowing which experts a layer needs costs a host round trip.
//! Paying it at every MoE layer of every pass would serialise host and GPU; instead each pass runs
//! in one of two modes:
//! - **Optimistic** (the common case): before the pass, the previous pass's routing — the same
//!   block's previous denoising step, ≈0.985 cosine alike — is prefetched, pinned so that no
//!   prefetch evicts another. The whole pass is then recorded and submitted once, as without
//!   paging; each MoE layer copies its routing ids into a capture buffer, read back together with
//!   the per-position statistics (one read per pass, no extra round trip). On the host, every
//!   routed (layer, expert) is checked against the pager: all resident → the pass is exact, its
//!   requests count as hits, its routing is the next prediction. Any missing → the pass's output
//!   is discarded (`BackendError::RerunPass`) and `Model::forward` runs it again.
//! - **Synchronous** (the repair, and whenever the optimistic pass would surely miss: the first
//!   pass, prefetch off, or a predicted working set larger than the pool): each MoE layer reads its
//!   routing back (which submits everything recorded so far, so no recorded command can see a slot
//!   rewritten afterwards), pages its routed experts in on demand (the stall), then records its
//!   kernels. A layer routing to more experts than the pool holds runs them in groups of a pool's
//!   size into the same per-assignment rows, each group submitted before the next one's uploads.
//!   Any pool of ≥ top-k slots therefore works, and the output is bit-identical to all-resident:
//!   the same kernels compute the same rows, only which buffer holds an expert changes.
//!
//! A miss costs a whole pass, so after one the optimistic pass is skipped for 1, 2, 4 … 16 passes
//! (reset by a success): where routing keeps changing (new blocks, random weights) the decode
//! degrades to the synchronous mode instead of paying for discarded passes.
//!
//! Re-running a pass is harmless: it rewrites the same K/V positions it wrote the first time.
//! Uploads go through `queue.write_buffer`, which lands before the next submission and after
//! every earlier one; the modes above only ever upload when no recorded-but-unsubmitted command
//! reads the slots being replaced. A paged expert is read from the file with positional reads
//! (`EdmFile::read_expert_part`) into a reused host buffer, not through the mapping: one read
//! asks for a whole part where page faults would bring it in 4 KiB at a time (the mapping is
//! advised MADV_RANDOM so that touching an expert never pulls in its neighbours), and nothing of
//! it stays mapped: host memory holds the dense weights and what is in flight. Experts resident
//! from the start are read the same way at load.
//!
//! ## Read-ahead ([`ExpertReader`])
//! With reader threads (`readers` > 0, the default through `--expert-memory`), the flash reads move
//! off the submitting thread: experts about to be paged in are read from the file into host
//! staging buffers by std threads, and an upload then only copies staged bytes into wgpu's staging
//! memory. What is read ahead, in the order it will be needed:
//! - at the end of every pass, the prediction for the next one (its routing; after a miss, the
//!   failed pass's exact routing, which its repair will ask for) minus what is resident, first
//!   layers first;
//! - an optimistic pass's prefetch list, while earlier prefetches upload;
//! - in a synchronous pass, before a layer's routing read-back (the submission that makes the GPU
//!   run up to this layer's router), the predicted experts of this layer and the next; after it,
//!   this layer's actual misses, then the next layers' predicted ones, while the misses upload.
//!
//! The pager decides slots on the submitting thread in the same order as without read-ahead, and a
//! staged expert is the same file bytes, so tokens, hits, misses, evictions and bytes read do not
//! change; the stall does.
//!
//! Uploads themselves (a check of the bytes and `queue.write_buffer`, whose copy into wgpu's
//! staging memory runs outside wgpu's locks) of a batch the pager decided at once — one layer's
//! misses, an optimistic pass's prefetch — run on as many scoped threads as there are readers when
//! the batch holds at least [`PARALLEL_UPLOAD_BYTES`]; the slot table is then written on the
//! submitting thread, before anything that reads those slots is submitted. At most [`READ_AHEAD_BYTES`] of experts are staged at once; a staged
//! guess the pass did not route to is dropped when its layer has run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::device::GpuError;
use super::pool::{GpuBuffer, Pooled};
use super::recorder::Shared;
use crate::arch::names;
use crate::experts::pager::{Eviction, Lookup, Pager, PagerStats};
use crate::experts::reader::{ExpertReader, Stage};
use crate::experts::ExpertKey;
use crate::format::{DType, EdmFile, TensorEntry};

pub const NO_SLOT: u32 = u32::MAX;

/// Where one expert lives: pool buffer index and word offset in it (a slot-table entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotPlace {
    pub pool: u32,
    pub word: u32,
}

impl SlotPlace {
    /// Not resident: the expert kernels skip it.
    pub const NONE: SlotPlace = SlotPlace {
        pool: NO_SLOT,
        word: NO_SLOT,
    };
}

/// Host memory read-ahead threads may fill with staged experts (at least one layer's top-k, at
/// most the pool's slots).
pub const READ_AHEAD_BYTES: u64 = 64 << 20;

/// MoE layers ahead of the running one whose predicted experts are read ahead.
const READ_AHEAD_LAYERS: usize = 2;

/// (layer, expert) → (pool buffer, word offset), mirrored on the host.
pub struct SlotTable {
    pub buf: Arc<GpuBuffer>,
    pub experts: usize,
    host: Vec<u32>,
}

impl SlotTable {
    fn new(sh: &Shared, layers: usize, experts: usize) -> SlotTable {
        let host = vec![NO_SLOT; layers * experts * 2];
        let buf = GpuBuffer::new(
            &sh.dev.device,
            (host.len() * 4) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            "slot table",
        );
        sh.dev
            .queue
            .write_buffer(&buf.raw, 0, bytemuck::cast_slice(&host));
        SlotTable { buf, experts, host }
    }

    /// Points `key` at `place` (or [`SlotPlace::NONE`]) on the host and the GPU.
    pub fn set(&mut self, sh: &Shared, key: ExpertKey, place: SlotPlace) {
        let i = (key.layer * self.experts + key.expert) * 2;
        self.host[i] = place.pool;
        self.host[i + 1] = place.word;
        sh.dev.queue.write_buffer(
            &self.buf.raw,
            (i * 4) as u64,
            bytemuck::cast_slice(&self.host[i..i + 2]),
        );
    }

    pub fn get(&self, key: ExpertKey) -> SlotPlace {
        let i = (key.layer * self.experts + key.expert) * 2;
        SlotPlace {
            pool: self.host[i],
            word: self.host[i + 1],
        }
    }
}

/// The buffers experts live in; a buffer's index is what slot entries name.
#[derive(Default)]
pub struct ExpertPool {
    pub buffers: Vec<Arc<GpuBuffer>>,
}

/// A buffer of expert slots and its index in the [`ExpertPool`], the number slot entries name it by.
#[derive(Clone)]
pub struct PoolBuffer {
    pub index: u32,
    pub buf: Arc<GpuBuffer>,
}

pub struct ExpertStore {
    file: Arc<EdmFile>,
    pub inner: Mutex<(SlotTable, ExpertPool, Vec<bool>)>,
    pub slots: Arc<GpuBuffer>,
}

impl ExpertStore {
    pub fn new(sh: &Shared, file: &Arc<EdmFile>) -> ExpertStore {
        let c = &file.header.metadata.config;
        let table = SlotTable::new(sh, c.num_layers, c.moe.num_experts);
        let slots = table.buf.clone();
        ExpertStore {
            file: file.clone(),
            inner: Mutex::new((table, ExpertPool::default(), vec![false; c.num_layers])),
            slots,
        }
    }

    pub fn serves(&self, file: &Arc<EdmFile>, layer: usize) -> bool {
        Arc::ptr_eq(&self.file, file)
            && !self
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .2
                .get(layer)
                .copied()
                .unwrap_or(true)
    }
}

/// How one matrix of an expert sits in the pool.
#[derive(Clone, Copy, Debug)]
pub struct PartLayout {
    pub dtype: DType,
    /// Word offset inside the expert.
    pub word: u32,
    /// Word offset of its scales relative to `word` (quantized types).
    pub scales: u32,
}

/// The resident experts of one layer.
pub struct GpuExperts {
    pub layer: usize,
    pub num_experts: usize,
    pub(crate) store: Arc<ExpertStore>,
    /// The pool buffers holding this layer's experts.
    pub(crate) pools: Vec<PoolBuffer>,
    pub(crate) gate_up: PartLayout,
    pub(crate) down: PartLayout,
    pub(crate) hidden: usize,
    pub(crate) inter: usize,
    pub resident: Vec<bool>,
    /// Set when this layer's experts are paged through a bounded pool instead of loaded.
    pub(crate) paged: Option<Arc<GpuExpertPool>>,
}

impl GpuExperts {
    /// What the MoE kernels need of this layer, its experts found through `slots` in `pools`
    /// (the layer's own buffers, or a paged pool's).
    pub(crate) fn layout<'a>(
        &self,
        slots: &'a GpuBuffer,
        pools: &'a [PoolBuffer],
    ) -> super::ops::moe::ExpertLayout<'a> {
        super::ops::moe::ExpertLayout {
            layer: self.layer,
            num_experts: self.num_experts,
            slot0: self.layer * self.num_experts,
            slots,
            pools,
            wtype_gate_up: super::weight_code(self.gate_up.dtype),
            wtype_down: super::weight_code(self.down.dtype),
            gate_up: (self.gate_up.word, self.gate_up.scales),
            down: (self.down.word, self.down.scales),
            hidden: self.hidden,
            inter: self.inter,
            act: 0,
            all_resident: self.paged.is_none() && self.resident.iter().all(|&r| r),
        }
    }
}

fn part_layout(p: &TensorEntry, word: u32) -> PartLayout {
    let n: usize = p.shape.iter().product();
    let scales = match p.dtype {
        DType::Q8 => (n / 4) as u32,
        DType::Q4 => (n / 8) as u32,
        _ => 0,
    };
    PartLayout {
        dtype: p.dtype,
        word,
        scales,
    }
}

/// The largest expert pool buffer: the device's storage-binding limit (or the `max_binding` option
/// of tests). Every expert kernel runs once per pool buffer holding an expert of its layer, each
/// run costing a fixed ~12–18 µs on an H200 whatever its share of the work, so a layer's experts go
/// into as few buffers as the device allows: one where it binds 2 GiB (a LLaDA2.0-mini q4 layer is
/// ~400 MB), several of 128 MiB on lavapipe and many phones.
/// KernelChoice::expert_pool_binding lowers it (benchmarks: 134217728 gives the 128 MiB buffers
/// of a phone on a large GPU).
fn pool_buffer_cap(sh: &Shared) -> u64 {
    sh.dev
        .kernels
        .expert_pool_binding
        .map_or(sh.dev.split, |f| sh.dev.split.min(f.max(256)) & !255)
}

fn align(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

/// Uploads the resident experts of `layer` into new pool buffers of `store` and points their
/// slots at them.
pub fn load_layer(
    sh: &Shared,
    store: &Arc<ExpertStore>,
    file: &EdmFile,
    layer: usize,
    resident: &dyn Fn(usize) -> bool,
    on_upload: &mut dyn FnMut(u64),
) -> Result<GpuExperts, crate::backend::BackendError> {
    let c = &file.header.metadata.config;
    let l = layer_layout(sh, file, layer)?;
    let (gate_up, down, stride, cap) = (l.gate_up, l.down, l.stride, l.cap);
    let per_buffer = (cap / stride) as usize;
    let ne = c.moe.num_experts;
    let mut present = vec![false; ne];
    let mut list = Vec::new();
    for (e, p) in present.iter_mut().enumerate() {
        if resident(e) && file.expert_range(layer, e).is_some() {
            *p = true;
            list.push(e);
        }
    }
    // Every resident expert of the layer is read below, in order: its flash reads start now.
    for &e in &list {
        file.will_need_expert(layer, e);
    }
    let mut guard = store.inner.lock().unwrap_or_else(|p| p.into_inner());
    let (slots, pool, loaded) = &mut *guard;
    let mut pools = Vec::new();
    // Read into one reused buffer, as paging does: nothing of the experts is mapped in.
    let mut read = Vec::new();
    for group in list.chunks(per_buffer.max(1)) {
        let buf = GpuBuffer::new(
            &sh.dev.device,
            stride * group.len() as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            "expert pool",
        );
        let index = pool.buffers.len() as u32;
        pool.buffers.push(buf.clone());
        for (i, &e) in group.iter().enumerate() {
            let base = stride * i as u64;
            for (name, at) in [
                (names::EXPERT_GATE_UP, base),
                (names::EXPERT_DOWN, base + down.word as u64 * 4),
            ] {
                let view = file.read_expert_part(layer, e, name, &mut read)?;
                super::check_finite(&view)?;
                super::write_padded(sh, &buf, at, view.bytes);
                on_upload(view.bytes.len() as u64);
            }
            let place = SlotPlace {
                pool: index,
                word: (base / 4) as u32,
            };
            slots.set(sh, ExpertKey::new(layer, e), place);
        }
        pools.push(PoolBuffer { index, buf });
    }
    if let Some(l) = loaded.get_mut(layer) {
        *l = true;
    }
    drop(guard);
    Ok(GpuExperts {
        layer,
        num_experts: ne,
        store: store.clone(),
        pools,
        gate_up,
        down,
        hidden: l.hidden,
        inter: l.inter,
        resident: present,
        paged: None,
    })
}

/// Where one layer's expert parts sit inside a slot, and the slot's size.
pub(crate) struct LayerLayout {
    pub gate_up: PartLayout,
    pub down: PartLayout,
    /// Bytes of one expert in the pool (both parts, word- and 256-byte aligned).
    pub stride: u64,
    /// Largest buffer the pool may use.
    pub cap: u64,
    pub hidden: usize,
    pub inter: usize,
}

pub(crate) fn layer_layout(
    sh: &Shared,
    file: &EdmFile,
    layer: usize,
) -> Result<LayerLayout, crate::backend::BackendError> {
    let table = file.expert_table(layer).ok_or_else(|| {
        crate::format::FormatError::MissingTensor(format!("expert table of layer {layer}"))
    })?;
    let part = |name: &str| {
        table.parts.iter().find(|p| p.name == name).ok_or_else(|| {
            crate::format::FormatError::MissingTensor(format!("layer {layer} expert part {name}"))
        })
    };
    let gu = part(names::EXPERT_GATE_UP)?;
    let dn = part(names::EXPERT_DOWN)?;
    if gu.dtype == DType::U8 || dn.dtype == DType::U8 {
        return Err(GpuError::Unsupported("u8 expert weights".into()).into());
    }
    let stride = align(align(gu.length, 4) + align(dn.length, 4), 256);
    let cap = pool_buffer_cap(sh);
    if stride > cap {
        return Err(GpuError::Limit {
            what: format!("one expert of layer {layer}"),
            need: stride,
            limit: cap,
        }
        .into());
    }
    Ok(LayerLayout {
        gate_up: part_layout(gu, 0),
        down: part_layout(dn, (align(gu.length, 4) / 4) as u32),
        stride,
        cap,
        hidden: gu.shape.get(1).copied().unwrap_or(0),
        inter: dn.shape.get(1).copied().unwrap_or(0),
    })
}

/// Exact lazy paging on the GPU: `slots` expert slots in pool buffers behind a slot table of its
/// own, managed by the shared [`Pager`] (the protocol is in the module header).
pub struct GpuExpertPool {
    pub(crate) store: Arc<ExpertStore>,
    pub(crate) state: Mutex<PagingState>,
}

pub(crate) struct PagingState {
    file: Arc<EdmFile>,
    pub(crate) pager: Pager,
    /// Where each pager slot lives.
    places: Vec<SlotPlace>,
    pub(crate) buffers: Vec<PoolBuffer>,
    prefetch: bool,
    /// The pass being recorded reads each MoE layer's routing back before its experts run.
    sync: bool,
    /// The next pass must run synchronously (the optimistic one missed).
    repass: bool,
    /// Passes left to run synchronously before trying the optimistic pass again, and how many a
    /// further miss will skip (doubling up to 16): when routing keeps changing, each miss throws a
    /// whole pass away, so the optimistic pass is tried less often until it succeeds.
    skip: u32,
    backoff: u32,
    in_pass: bool,
    /// When the pass began: a discarded optimistic pass counts as stall time.
    pass_start: Instant,
    /// Routing of each MoE layer of the optimistic pass, copied out for the end-of-pass read.
    pub(crate) captures: Captures,
    /// Routed experts per MoE layer of the pass being run (synchronous passes).
    routed: LayerRouting,
    /// The last completed pass's routed experts per MoE layer, in execution order: the
    /// prediction for the next pass (the same block's next denoising step, most of the time).
    predicted: LayerRouting,
    /// Read-ahead threads (None: every read happens on the submitting thread), and how many
    /// threads a large batch of uploads may use.
    reader: Option<ExpertReader>,
    readers: usize,
    /// Bytes of one slot, and the smallest batch uploaded on several threads.
    slot_bytes: u64,
    parallel_bytes: u64,
    /// Experts to read ahead, in the order they will be needed, and how far staging got.
    ahead: Vec<ExpertKey>,
    ahead_next: usize,
    /// Host buffers the uploads read experts into, one per upload thread.
    read_bufs: Vec<Vec<u8>>,
}

impl GpuExpertPool {
    pub fn stats(&self) -> PagerStats {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pager
            .stats
            .clone()
    }

    /// Batches of uploads of at least `bytes` run on the reader threads' count of upload threads
    /// ([`PARALLEL_UPLOAD_BYTES`] by default; 0: every batch of two or more).
    pub fn set_parallel_upload_bytes(&self, bytes: u64) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .parallel_bytes = bytes;
    }

    /// GPU bytes of the pool buffers (what the budget bought).
    pub fn gpu_bytes(&self) -> u64 {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.buffers.iter().map(|p| p.buf.size).sum()
    }
}

/// Bytes one expert takes in a GPU pool slot: the largest of every MoE layer's (what a budget
/// divides by).
pub fn slot_bytes(file: &EdmFile) -> Result<u64, crate::backend::BackendError> {
    let mut most = 0;
    for t in &file.header.experts {
        let part = |name: &str| {
            t.parts.iter().find(|p| p.name == name).ok_or_else(|| {
                crate::format::FormatError::MissingTensor(format!(
                    "layer {} expert part {name}",
                    t.layer
                ))
            })
        };
        let (gu, dn) = (part(names::EXPERT_GATE_UP)?, part(names::EXPERT_DOWN)?);
        most = most.max(align(align(gu.length, 4) + align(dn.length, 4), 256));
    }
    Ok(most)
}

/// One expert's upload: its pool buffer, the byte offsets of its two parts there, its key.
struct Upload {
    buf: Arc<GpuBuffer>,
    gate_up_at: u64,
    down_at: u64,
    key: ExpertKey,
}

/// `queue.write_buffer` of `bytes`, zero-padded to whole words.
fn write_words(queue: &wgpu::Queue, buf: &GpuBuffer, at: u64, bytes: &[u8]) {
    if bytes.len().is_multiple_of(4) {
        queue.write_buffer(&buf.raw, at, bytes);
    } else {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4) * 4, 0);
        queue.write_buffer(&buf.raw, at, &v);
    }
}

/// Reads one expert — the bytes a reader thread staged, else the mapping's — checks it and copies
/// it into wgpu's staging memory for its slot; (bytes, whether it was staged). Runs on the
/// submitting thread or on an upload thread (wgpu copies `write_buffer` data outside its locks).
fn upload(
    queue: &wgpu::Queue,
    file: &EdmFile,
    reader: Option<&ExpertReader>,
    u: &Upload,
    buf: &mut Vec<u8>,
) -> Result<(u64, bool), crate::backend::BackendError> {
    let ExpertKey { layer, expert: e } = u.key;
    let staged = match reader {
        Some(r) => r.take(u.key).transpose()?,
        None => None,
    };
    let mut bytes = 0;
    // The same part order as `reader::STAGED_PARTS`.
    for (i, (name, at)) in [
        (names::EXPERT_GATE_UP, u.gate_up_at),
        (names::EXPERT_DOWN, u.down_at),
    ]
    .into_iter()
    .enumerate()
    {
        // Not staged: read from the file into this thread's buffer, not through the mapping.
        let view = match &staged {
            Some(s) => {
                let mut view = file.expert_part(layer, e, name)?;
                view.bytes = &s.parts[i];
                view
            }
            None => file.read_expert_part(layer, e, name, buf)?,
        };
        super::check_finite(&view)?;
        write_words(queue, &u.buf, at, view.bytes);
        bytes += view.bytes.len() as u64;
    }
    Ok((bytes, staged.is_some()))
}

/// Uploads in a batch at least this large run on several threads (below it, thread start-up costs
/// more than it saves); [`GpuExpertPool::set_parallel_upload_bytes`] changes it.
pub const PARALLEL_UPLOAD_BYTES: u64 = 4 << 20;

/// One expert to bring in: the pager's slot for it and the expert it evicts, if any.
#[derive(Clone, Copy, Debug)]
struct SlotFill {
    slot: usize,
    key: ExpertKey,
    evicted: Option<ExpertKey>,
}

impl PagingState {
    /// Brings experts into their slots (the pager already chose them, in order) and points the
    /// slot table at them, unmapping evicted ones; returns the bytes read. With reader threads
    /// and a batch of at least [`PARALLEL_UPLOAD_BYTES`], the uploads run on up to `readers`
    /// scoped threads; the slot table is written on this thread afterwards, so the result is the
    /// same either way (every write lands before the next submission).
    fn fill(
        &mut self,
        sh: &Shared,
        store: &ExpertStore,
        fills: &[SlotFill],
    ) -> Result<u64, crate::backend::BackendError> {
        // Every miss's flash read starts before the first copy (one large read each, read
        // together), not a page fault at a time as the copies reach them.
        for f in fills {
            self.file.will_need_expert(f.key.layer, f.key.expert);
        }
        let mut jobs = Vec::with_capacity(fills.len());
        for f in fills {
            let SlotPlace { pool, word } = self.places[f.slot];
            let l = layer_layout(sh, &self.file, f.key.layer)?;
            jobs.push(Upload {
                buf: self.buffers[(pool - self.buffers[0].index) as usize]
                    .buf
                    .clone(),
                gate_up_at: word as u64 * 4,
                down_at: (word + l.down.word) as u64 * 4,
                key: f.key,
            });
        }
        let threads = self.readers.min(jobs.len());
        let parallel = threads > 1 && jobs.len() as u64 * self.slot_bytes >= self.parallel_bytes;
        let queue = &sh.dev.queue;
        // A read buffer per upload thread, kept from fill to fill.
        if self.read_bufs.len() < threads.max(1) {
            self.read_bufs.resize_with(threads.max(1), Vec::new);
        }
        let results: Vec<Result<(u64, bool), crate::backend::BackendError>> = if parallel {
            let (file, reader) = (&*self.file, self.reader.as_ref());
            let next = std::sync::atomic::AtomicUsize::new(0);
            let done: Vec<Mutex<Option<_>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
            let (next_ref, done_ref, jobs_ref) = (&next, &done, &jobs);
            std::thread::scope(|s| {
                for buf in self.read_bufs.iter_mut().take(threads) {
                    s.spawn(move || loop {
                        let i = next_ref.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs_ref.get(i) else {
                            break;
                        };
                        let r = upload(queue, file, reader, job, buf);
                        *done_ref[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                    });
                }
            });
            done.into_iter()
                .map(|d| {
                    d.into_inner()
                        .unwrap_or_else(|p| p.into_inner())
                        .expect("every upload ran: the threads took indices until none was left")
                })
                .collect()
        } else {
            let mut out = Vec::with_capacity(jobs.len());
            let mut buf = std::mem::take(&mut self.read_bufs[0]);
            for job in &jobs {
                // Staging frees room as uploads take staged experts.
                self.advance();
                out.push(upload(
                    queue,
                    &self.file,
                    self.reader.as_ref(),
                    job,
                    &mut buf,
                ));
            }
            self.read_bufs[0] = buf;
            out
        };
        let mut guard = store.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (mut bytes, mut first_err) = (0, None);
        for (f, r) in fills.iter().zip(results) {
            // The slot was (at least partly) overwritten: its old occupant is gone either way.
            if let Some(old) = f.evicted {
                guard.0.set(sh, old, SlotPlace::NONE);
            }
            match r {
                Ok((b, staged)) => {
                    guard.0.set(sh, f.key, self.places[f.slot]);
                    bytes += b;
                    self.pager.stats.read_ahead += staged as u64;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(guard);
        self.advance();
        match first_err {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }

    /// Replaces the read-ahead list with `keys`, in the order they will be needed, and stages what
    /// fits.
    fn read_ahead(&mut self, keys: Vec<ExpertKey>) {
        self.ahead = keys;
        self.ahead_next = 0;
        self.advance();
    }

    /// Stages the next experts of the read-ahead list while the reader has room (the room frees as
    /// uploads take staged experts).
    fn advance(&mut self) {
        let Some(r) = &self.reader else {
            return;
        };
        while let Some(&key) = self.ahead.get(self.ahead_next) {
            if r.stage(key) == Stage::Full {
                break;
            }
            self.ahead_next += 1;
        }
    }

    /// The predicted experts of MoE layers from `layer` on (at most `layers` of them), in
    /// execution order, that are not resident and not in `skip`.
    fn predicted_misses(&self, layer: usize, layers: usize, skip: &[ExpertKey]) -> Vec<ExpertKey> {
        self.predicted
            .iter()
            .filter(|r| r.layer >= layer)
            .take(layers)
            .flat_map(LayerExperts::keys)
            .filter(|k| self.pager.slot_of(k.layer, k.expert).is_none() && !skip.contains(k))
            .collect()
    }

    /// Drops staged experts matching `unwanted` (guesses their layer did not route to).
    fn drop_staged(&self, unwanted: impl Fn(ExpertKey) -> bool) {
        if let Some(r) = &self.reader {
            r.discard(unwanted);
        }
    }

    /// Reads ahead the prediction for the next pass (what of it is not resident), first layers
    /// first, as far as staging has room.
    fn read_ahead_prediction(&mut self) {
        if self.reader.is_some() {
            let keys = self.predicted_misses(0, usize::MAX, &[]);
            self.read_ahead(keys);
        }
    }

    /// Asks the pager for `experts` of `layer` in order and brings the missing ones in on demand
    /// (a stall).
    fn demand(
        &mut self,
        sh: &Shared,
        store: &ExpertStore,
        layer: usize,
        experts: &[usize],
    ) -> Result<(), crate::backend::BackendError> {
        let mut fills = Vec::new();
        for &e in experts {
            if let Lookup::Miss { slot, evicted } = self.pager.request(layer, e) {
                let key = ExpertKey::new(layer, e);
                fills.push(SlotFill { slot, key, evicted });
            }
        }
        if !fills.is_empty() {
            let t0 = Instant::now();
            let bytes = self.fill(sh, store, &fills)?;
            self.pager.record_read(bytes, t0.elapsed());
        }
        Ok(())
    }

    /// Starts a pass: picks its mode and, when optimistic, prefetches the prediction.
    fn begin_pass(
        &mut self,
        sh: &Shared,
        store: &ExpertStore,
    ) -> Result<(), crate::backend::BackendError> {
        self.in_pass = true;
        self.pass_start = Instant::now();
        self.captures.clear();
        self.routed.clear();
        let mut seen = std::collections::HashSet::new();
        let want: Vec<ExpertKey> = self
            .predicted
            .iter()
            .flat_map(LayerExperts::keys)
            .filter(|k| seen.insert(*k))
            .collect();
        // Synchronous when the optimistic pass would surely miss: right after a miss, with no
        // prediction yet (the first pass), without prefetch, or when the predicted working set
        // is larger than the pool.
        let backing_off = self.skip > 0;
        self.skip = self.skip.saturating_sub(1);
        self.sync = std::mem::take(&mut self.repass)
            || backing_off
            || !self.prefetch
            || want.is_empty()
            || want.len() > self.pager.capacity();
        if self.sync {
            return Ok(());
        }
        // The pass cannot start before its prefetch is uploaded: that wait is stall too.
        let t0 = Instant::now();
        self.pager.begin_prefetch(want.iter().copied());
        let mut fills = Vec::new();
        for &key in &want {
            if let Some(Lookup::Miss { slot, evicted }) = self.pager.prefetch(key.layer, key.expert)
            {
                fills.push(SlotFill { slot, key, evicted });
            }
        }
        self.read_ahead(fills.iter().map(|f| f.key).collect());
        let bytes = self.fill(sh, store, &fills)?;
        self.pager.record_read(bytes, Duration::ZERO);
        // Everything this pass needs is resident now.
        self.drop_staged(|_| true);
        self.pager.record_read(0, t0.elapsed());
        Ok(())
    }
}

/// One MoE layer's routing ids of an optimistic pass, copied out for the end-of-pass read.
pub(crate) struct Capture {
    pub layer: usize,
    pub ids: Pooled,
    pub bytes: u64,
}

/// The captures of one optimistic pass, in execution order.
pub(crate) type Captures = Vec<Capture>;

/// The experts (ids) one MoE layer ran in a pass: distinct and ascending once [`distinct`] has
/// seen them, raw routing ids when just read back.
pub(crate) struct LayerExperts {
    pub layer: usize,
    pub experts: Vec<u32>,
}

impl LayerExperts {
    fn keys(&self) -> impl Iterator<Item = ExpertKey> + '_ {
        self.experts
            .iter()
            .map(|&e| ExpertKey::new(self.layer, e as usize))
    }
}

/// Routing of one pass, per MoE layer in execution order.
pub(crate) type LayerRouting = Vec<LayerExperts>;

/// Distinct expert ids of a routing, ascending (ids ≥ `experts` are router garbage and dropped).
fn distinct(ids: &[u32], experts: usize) -> Vec<u32> {
    let mut r: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&e| (e as usize) < experts)
        .collect();
    r.sort_unstable();
    r.dedup();
    r
}

impl GpuExpertPool {
    /// A bounded GPU expert pool of `slots` experts for `file` (exact lazy paging); its layers come
    /// from [`GpuExpertPool::layer`]. `prefetch` turns on
    /// the optimistic pass with the previous pass's routing; `readers` threads read experts ahead
    /// (0: every read on the calling thread; see the module header).
    pub(crate) fn new(
        sh: &Shared,
        file: &Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<Arc<GpuExpertPool>, crate::backend::BackendError> {
        let c = &file.header.metadata.config;
        Pager::check_capacity(slots, c.moe.top_k).map_err(GpuError::Unsupported)?;
        let stride = slot_bytes(file)?;
        let cap = pool_buffer_cap(sh);
        if stride > cap {
            return Err(GpuError::Limit {
                what: "one expert".into(),
                need: stride,
                limit: cap,
            }
            .into());
        }
        let per_buffer = (cap / stride.max(1)) as usize;
        let store = Arc::new(ExpertStore::new(sh, file));
        let mut places = Vec::with_capacity(slots);
        let mut buffers = Vec::new();
        {
            let mut guard = store.inner.lock().unwrap_or_else(|p| p.into_inner());
            let pool = &mut guard.1;
            let mut left = slots;
            while left > 0 {
                let n = left.min(per_buffer);
                let buf = GpuBuffer::new(
                    &sh.dev.device,
                    stride * n as u64,
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    "paged expert pool",
                );
                let index = pool.buffers.len() as u32;
                pool.buffers.push(buf.clone());
                places.extend((0..n).map(|i| SlotPlace {
                    pool: index,
                    word: (stride * i as u64 / 4) as u32,
                }));
                buffers.push(PoolBuffer { index, buf });
                left -= n;
            }
        }
        let reader = if readers > 0 {
            let limit = (READ_AHEAD_BYTES / stride.max(1)) as usize;
            let limit = limit.max(c.moe.top_k).min(slots);
            Some(
                ExpertReader::new(file.clone(), readers, limit).map_err(|e| {
                    crate::format::FormatError::Io {
                        path: file.path().to_path_buf(),
                        source: e,
                    }
                })?,
            )
        } else {
            None
        };
        Ok(Arc::new(GpuExpertPool {
            store,
            state: Mutex::new(PagingState {
                file: file.clone(),
                pager: Pager::new(slots, c.num_layers, policy),
                places,
                buffers,
                prefetch,
                sync: false,
                repass: false,
                skip: 0,
                backoff: 0,
                in_pass: false,
                pass_start: Instant::now(),
                captures: Vec::new(),
                routed: Vec::new(),
                predicted: Vec::new(),
                reader,
                readers,
                slot_bytes: stride,
                parallel_bytes: PARALLEL_UPLOAD_BYTES,
                ahead: Vec::new(),
                ahead_next: 0,
                read_bufs: Vec::new(),
            }),
        }))
    }

    /// The experts of `layer`, paged through `pool` (nothing is uploaded now).
    pub(crate) fn layer(
        self: &Arc<Self>,
        sh: &Shared,
        layer: usize,
    ) -> Result<GpuExperts, crate::backend::BackendError> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let l = layer_layout(sh, &st.file, layer)?;
        Ok(GpuExperts {
            layer,
            num_experts: st.file.header.metadata.config.moe.num_experts,
            store: self.store.clone(),
            pools: Vec::new(),
            gate_up: l.gate_up,
            down: l.down,
            hidden: l.hidden,
            inter: l.inter,
            resident: Vec::new(),
            paged: Some(self.clone()),
        })
    }

    /// One MoE layer over paged experts (see the module header for the two modes), plus `plus`
    /// (the shared experts' output) when given; `act` is the gate activation
    /// (`kernels::gate_act`).
    pub(crate) fn moe(
        self: &Arc<Self>,
        b: &super::GpuBackend,
        x: &super::GpuAct,
        routing: &super::GpuRouting,
        experts: &GpuExperts,
        plus: Option<&GpuBuffer>,
        act: u32,
    ) -> Result<super::GpuAct, crate::backend::BackendError> {
        let sh = &*b.sh;
        // Registered before anything can fail, so the end of the pass (or the next
        // begin_forward) always finds it.
        b.paging.register(self);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.in_pass {
            st.begin_pass(sh, &self.store)?;
        }
        let n = (routing.rows * routing.k * 4) as u64;
        let buffers = st.buffers.clone();
        let mut layout = experts.layout(&self.store.slots, &buffers);
        layout.act = act;
        if !st.sync {
            // Optimistic: run with what the prefetch made resident; the routing is copied out
            // and read back with the pass's statistics, where misses are detected.
            return b.with(|ctx| {
                let capture = ctx.output(n)?;
                ctx.copy(&routing.ids, 0, &capture, 0, n);
                st.captures.push(Capture {
                    layer: experts.layer,
                    ids: capture,
                    bytes: n,
                });
                super::GpuBackend::moe_act(
                    ctx,
                    x,
                    routing,
                    &layout,
                    plus.map_or(
                        super::ops::moe::Shared::None,
                        super::ops::moe::Shared::Output,
                    ),
                )
            });
        }
        // Synchronous: read this layer's routing (submitting the pass so far, so no recorded
        // command can see a slot rewritten below), bring its experts in, then run them. When the
        // layer routes to more experts than the pool holds, they run in groups of a pool's size,
        // each group submitted before the next overwrites its slots.
        // Read ahead what this layer and the next are predicted to need while the GPU runs up to
        // this layer's router.
        let layer = experts.layer;
        let guess = st.predicted_misses(layer, READ_AHEAD_LAYERS, &[]);
        st.read_ahead(guess);
        let ids: Vec<u32> = b.with(|ctx| {
            let b = ctx.read(&[(&routing.ids, 0, n)])?;
            Ok(bytemuck::pod_collect_to_vec(&b[0]))
        })?;
        let routed = distinct(&ids, experts.num_experts);
        st.routed.push(LayerExperts {
            layer: experts.layer,
            experts: routed.clone(),
        });
        // This layer's misses first, then the next layers' predicted ones.
        let mut upcoming: Vec<ExpertKey> = routed
            .iter()
            .map(|&e| ExpertKey::new(layer, e as usize))
            .filter(|k| st.pager.slot_of(k.layer, k.expert).is_none())
            .collect();
        let later = st.predicted_misses(layer + 1, READ_AHEAD_LAYERS, &upcoming);
        upcoming.extend(later);
        st.read_ahead(upcoming);
        let groups: Vec<&[u32]> = routed.chunks(st.pager.capacity().max(1)).collect();
        let status = sh.status.clone();
        b.with(|ctx| {
            let mut scratch = None;
            for (i, group) in groups.iter().enumerate() {
                if i > 0 {
                    ctx.flush()?;
                }
                let keys: Vec<usize> = group.iter().map(|&e| e as usize).collect();
                st.pager.begin_layer(experts.layer, &keys);
                st.demand(sh, &self.store, experts.layer, &keys)?;
                if scratch.is_none() {
                    scratch = Some(super::ops::moe::dispatch(
                        ctx,
                        x.rows,
                        &routing.ids,
                        routing.k,
                        &layout,
                        false,
                    )?);
                    if groups.len() > 1 {
                        // The dispatch flagged the later groups' experts as missing.
                        ctx.clear(&status);
                    }
                }
                let s = scratch.as_ref().expect("set above");
                super::ops::moe::experts(ctx, &x.buf, s, &layout, None)?;
            }
            // Guesses for this layer that it did not route to are of no further use.
            st.drop_staged(|k| k.layer <= layer);
            let out = super::GpuBackend::out_act(ctx, x.rows, x.cols)?;
            match &scratch {
                Some(s) => super::ops::moe::combine(
                    ctx,
                    s,
                    &routing.weights,
                    plus.map(|p| (p, 0)),
                    &out.buf,
                    None,
                )?,
                // Nothing routed (no rows): the plain path writes the zero sum.
                None => super::ops::moe::moe(
                    ctx,
                    &x.buf,
                    x.rows,
                    &routing.ids,
                    &routing.weights,
                    routing.k,
                    &layout,
                    plus.map_or(
                        super::ops::moe::Shared::None,
                        super::ops::moe::Shared::Output,
                    ),
                    &out.buf,
                    None,
                )?,
            }
            Ok(out)
        })
    }
}

/// The expert pools a forward pass being recorded has run layers on (each registered by its
/// first paged MoE layer), for the end-of-pass routing read. The list is locked before a pool,
/// never after.
#[derive(Default)]
pub(crate) struct ActivePools(Mutex<Vec<Arc<GpuExpertPool>>>);

impl ActivePools {
    /// `pool` runs a layer of the pass being recorded.
    fn register(&self, pool: &Arc<GpuExpertPool>) {
        let mut active = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !active.iter().any(|p| Arc::ptr_eq(p, pool)) {
            active.push(pool.clone());
        }
    }

    /// A new forward pass starts: a pass that failed half-way leaves nothing behind.
    pub(crate) fn begin_forward(&self) {
        for p in self.0.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let mut st = p.state.lock().unwrap_or_else(|p| p.into_inner());
            st.in_pass = false;
            st.captures.clear();
        }
    }

    /// Pools with a pass in flight and their captured routing buffers, taken for the
    /// end-of-pass read.
    pub(crate) fn take(&self) -> Vec<(Arc<GpuExpertPool>, Captures)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .map(|p| {
                let mut st = p.state.lock().unwrap_or_else(|p| p.into_inner());
                // The pass is over even if its read fails: the next one starts afresh.
                st.in_pass = false;
                let caps = std::mem::take(&mut st.captures);
                drop(st);
                (p, caps)
            })
            .collect()
    }

    /// Ends a pass with the routing read back: counts hits, keeps the prediction, or — when an
    /// optimistic pass met an expert it did not have — asks for the pass again, synchronously.
    pub(crate) fn finish(
        pools: &[(Arc<GpuExpertPool>, LayerRouting)],
    ) -> Result<(), crate::backend::BackendError> {
        let mut rerun = false;
        for (pool, captured) in pools {
            let mut st = pool.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.sync {
                st.predicted = std::mem::take(&mut st.routed);
                st.read_ahead_prediction();
                continue;
            }
            let ne = st.file.header.metadata.config.moe.num_experts;
            let routed: LayerRouting = captured
                .iter()
                .map(|c| LayerExperts {
                    layer: c.layer,
                    experts: distinct(&c.experts, ne),
                })
                .collect();
            let missed = routed.iter().any(|r| {
                r.experts
                    .iter()
                    .any(|&e| st.pager.slot_of(r.layer, e as usize).is_none())
            });
            if missed {
                // The whole pass is thrown away: the decode waited for it.
                let wasted = st.pass_start.elapsed();
                st.pager.record_read(0, wasted);
                st.pager.stats.repasses += 1;
                st.repass = true;
                st.backoff = (st.backoff * 2).clamp(1, 16);
                st.skip = st.backoff;
                // The repair asks for exactly this routing (synchronous passes decide nothing
                // from the prediction, so this only steers read-ahead).
                st.predicted = routed;
                st.read_ahead_prediction();
                rerun = true;
                continue;
            }
            for r in &routed {
                let keys: Vec<usize> = r.experts.iter().map(|&e| e as usize).collect();
                st.pager.begin_layer(r.layer, &keys);
                for &e in &keys {
                    st.pager.request(r.layer, e);
                }
            }
            st.predicted = routed;
            st.backoff = 0;
            st.read_ahead_prediction();
        }
        if rerun {
            return Err(crate::backend::BackendError::RerunPass);
        }
        Ok(())
    }
}
