//! One recording = one command encoder and one queue submission. Every op of a forward pass
//! appends its dispatches to the open encoder; the params of every dispatch (and host inputs such
//! as token ids) go into one arena that is uploaded with a single `write_buffer` just before the
//! submission and bound at dynamic offsets, so bind groups stay the same from pass to pass and are
//! cached. The recording is submitted only when the host needs bytes back (statistics, logits,
//! routing) — one submission per forward pass, no per-layer host sync.
//!
//! Consecutive dispatches share one compute pass (wgpu orders them and inserts the barriers their
//! bindings need): a pass per dispatch costs wgpu-core a pass begin/end, its usage-scope
//! bookkeeping and a Vulkan barrier set each time, which is most of the host time of a small pass.
//! The pass is closed only for a copy, a clear, a timestamp resolve or the submission. While GPU
//! timing is on, every dispatch gets its own pass (timestamps are written at pass boundaries).

use std::time::Instant;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytemuck::Pod;

use super::device::{GpuDevice, GpuError};
use super::kernels::{Entry, Kernels, Slot, INPUT_BINDING};
use super::pool::{ActPool, GpuBuffer, Pooled};

type Result<T> = std::result::Result<T, GpuError>;

/// Host read-backs (each a wait for the GPU: a round trip) and dispatches of every GPU backend in
/// this process, for benchmarks that see only an engine (`bench decode`).
static READBACKS: AtomicU64 = AtomicU64::new(0);
static DISPATCHES: AtomicU64 = AtomicU64::new(0);

/// (read-backs, dispatches) so far in this process; benchmarks take differences.
pub fn activity() -> (u64, u64) {
    (
        READBACKS.load(Ordering::Relaxed),
        DISPATCHES.load(Ordering::Relaxed),
    )
}

/// The workgroup grid of one dispatch.
pub enum Grid<'a> {
    Groups(u32, u32, u32),
    /// `n` workgroups, folded into x·y when `n` exceeds the per-dimension limit (kernels compute
    /// `wid.x + wid.y · num_workgroups.x`).
    Linear(u64),
    /// Arguments written by an earlier kernel at this byte offset.
    Indirect(&'a GpuBuffer, u64),
}

/// What lives for the whole backend and needs no lock.
pub struct Shared {
    pub dev: GpuDevice,
    pub kernels: Kernels,
    pub acts: Arc<ActPool>,
    pub staging: Arc<ActPool>,
    /// Bound where an entry's binding is unused by this call (distinct ones, so a read-only and a
    /// read-write placeholder never alias).
    pub dummies: [Arc<GpuBuffer>; 3],
    /// Error flags raised by kernels (a routed expert that is not resident), read back with the
    /// statistics.
    pub status: Arc<GpuBuffer>,
    pub poison: bool,
    pub arena_align: u64,
}

/// Per-kernel GPU time collection (benchmarks).
pub struct Timing {
    pub queries: wgpu::QuerySet,
    pub capacity: u32,
    pub labels: Vec<DispatchTag>,
}

/// What a timed dispatch was: its entry point and grid (`None`: indirect), so a benchmark can
/// tell one matrix's dispatches from another's of the same kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DispatchTag {
    pub entry: &'static str,
    pub grid: Option<[u32; 3]>,
}

pub struct RopeTable {
    pub positions: usize,
    pub buf: Arc<GpuBuffer>,
}

/// What changes while recording; behind the backend's mutex.
pub struct State {
    encoder: Option<wgpu::CommandEncoder>,
    /// The open compute pass on `encoder` (ended before any other command is recorded on it).
    pass: Option<wgpu::ComputePass<'static>>,
    /// See `GpuOptions::pass_per_dispatch` and `GpuOptions::submit_every`.
    pass_per_dispatch: bool,
    pub submit_every: u64,
    since_submit: u64,
    arena: Vec<u8>,
    arena_buf: Arc<GpuBuffer>,
    arena_cap: u64,
    grow_arena: bool,
    bind_groups: HashMap<(usize, u32, Vec<u64>), wgpu::BindGroup>,
    pub submissions: u64,
    pub dispatches: u64,
    pub rope: HashMap<(u64, usize), RopeTable>,
    pub pending_upload: u64,
    pub timing: Option<Timing>,
    pub host: HostTimes,
    /// In a batched pass, the rows of its largest sequence: kernels chosen by row count choose
    /// as for these (`None`: one sequence, choose by the op's rows). Set by `begin_forward`.
    pub batch_rows: Option<usize>,
    /// This pass runs the fused-norm forward (`KernelChoice::fuse_norms_max_t`); set by
    /// `begin_forward`.
    pub fused_norms: bool,
}

/// Host time spent on the GPU path, summed since the backend started (benchmarks take differences).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostTimes {
    /// Inside backend ops, submission and waiting included.
    pub ops_ns: u64,
    /// Arena upload + `queue.submit` (+ command buffer finish).
    pub submit_ns: u64,
    /// Waiting for the GPU to finish and map read-backs.
    pub wait_ns: u64,
}

impl HostTimes {
    /// Recording alone: op time less submission and waiting.
    pub fn encode_ns(&self) -> u64 {
        self.ops_ns.saturating_sub(self.submit_ns + self.wait_ns)
    }
}

const ARENA_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::UNIFORM
    .union(wgpu::BufferUsages::STORAGE)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Bind groups cached before the cache is cleared (shapes that vary without bound).
const BIND_GROUP_CACHE: usize = 8192;

impl State {
    pub fn new(dev: &GpuDevice, opts: &super::device::GpuOptions) -> State {
        let cap = 256 << 10;
        State {
            encoder: None,
            pass: None,
            pass_per_dispatch: opts.pass_per_dispatch,
            submit_every: opts.submit_every,
            since_submit: 0,
            arena: Vec::new(),
            arena_buf: GpuBuffer::new(&dev.device, cap + INPUT_BINDING, ARENA_USAGE, "arena"),
            arena_cap: cap,
            grow_arena: false,
            bind_groups: HashMap::new(),
            submissions: 0,
            dispatches: 0,
            rope: HashMap::new(),
            pending_upload: 0,
            timing: None,
            host: HostTimes::default(),
            batch_rows: None,
            fused_norms: false,
        }
    }
}

/// An op's handle on the recording.
pub struct Ctx<'a> {
    pub sh: &'a Shared,
    pub st: &'a mut State,
}

fn align(n: u64, a: u64) -> u64 {
    n.div_ceil(a) * a
}

impl Ctx<'_> {
    /// The encoder, for a command outside compute passes (the open pass is ended first).
    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.st.pass = None;
        self.raw_encoder()
    }

    fn raw_encoder(&mut self) -> &mut wgpu::CommandEncoder {
        let sh = self.sh;
        self.st.encoder.get_or_insert_with(|| {
            sh.dev
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("forward"),
                })
        })
    }

    /// Makes room for `need` arena bytes, submitting what is recorded when the arena is full.
    fn reserve(&mut self, need: u64) -> Result<()> {
        if self.st.arena.len() as u64 + need <= self.st.arena_cap {
            return Ok(());
        }
        if need > INPUT_BINDING {
            return Err(GpuError::Limit {
                what: "host data of one op".into(),
                need,
                limit: INPUT_BINDING,
            });
        }
        self.st.grow_arena = true;
        self.flush()
    }

    fn push(&mut self, bytes: &[u8]) -> u64 {
        let off = align(self.st.arena.len() as u64, self.sh.arena_align);
        self.st.arena.resize(off as usize, 0);
        self.st.arena.extend_from_slice(bytes);
        off
    }

    /// A pooled buffer of at least `bytes` for a kernel to write (NaN-filled in poison mode).
    pub fn output(&mut self, bytes: u64) -> Result<Pooled> {
        if bytes > self.sh.dev.max_binding {
            return Err(GpuError::Limit {
                what: "an activation buffer".into(),
                need: bytes,
                limit: self.sh.dev.max_binding,
            });
        }
        let (buf, _) = self.sh.acts.take(bytes);
        if self.sh.poison {
            self.fill(&buf, 0x7fc0_0000)?;
        }
        Ok(buf)
    }

    /// Sets every word of `buf` to `pattern`.
    pub fn fill(&mut self, buf: &GpuBuffer, pattern: u32) -> Result<()> {
        let n = buf.size / 4;
        let p = super::ops::elementwise::EwParams {
            n: n as u32,
            cols: 0,
            pattern,
            _pad: 0,
        };
        self.dispatch(
            &super::ops::elementwise::FILL,
            0,
            &p,
            None,
            &[buf],
            Grid::Linear(n.div_ceil(64)),
        )
    }

    /// Records one dispatch of `entry`; `bufs` fill its Read/ReadWrite bindings in order.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch<P: Pod>(
        &mut self,
        entry: &'static Entry,
        wtype: u32,
        params: &P,
        input: Option<&[u8]>,
        bufs: &[&GpuBuffer],
        grid: Grid<'_>,
    ) -> Result<()> {
        debug_assert_eq!(bufs.len(), entry.buffers(), "{}", entry.name);
        let pipe = self.sh.kernels.get(&self.sh.dev, entry, wtype)?;
        let a = self.sh.arena_align;
        let params = bytemuck::bytes_of(params);
        let need = align(params.len() as u64, a) + input.map_or(0, |i| align(i.len() as u64, a));
        self.reserve(need + a)?;
        let p_off = self.push(params);
        let in_off = input.map(|i| self.push(i));
        let arena = self.st.arena_buf.clone();
        let mut key_ids = vec![arena.id];
        key_ids.extend(bufs.iter().map(|b| b.id));
        let key = (entry as *const Entry as usize, wtype, key_ids);
        if !self.st.bind_groups.contains_key(&key) {
            if self.st.bind_groups.len() >= BIND_GROUP_CACHE {
                self.st.bind_groups.clear();
            }
            let mut next = bufs.iter();
            let entries: Vec<wgpu::BindGroupEntry> = entry
                .bindings
                .iter()
                .map(|&(binding, slot)| {
                    let resource = match slot {
                        Slot::Params => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &arena.raw,
                            offset: 0,
                            size: std::num::NonZeroU64::new(params.len() as u64),
                        }),
                        Slot::Input => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &arena.raw,
                            offset: 0,
                            size: std::num::NonZeroU64::new(INPUT_BINDING),
                        }),
                        Slot::Read | Slot::ReadWrite => {
                            next.next().expect("checked count").raw.as_entire_binding()
                        }
                    };
                    wgpu::BindGroupEntry { binding, resource }
                })
                .collect();
            let bg = self
                .sh
                .dev
                .device
                .create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some(entry.name),
                    layout: &pipe.layout,
                    entries: &entries,
                });
            self.st.bind_groups.insert(key.clone(), bg);
        }
        let mut offsets = Vec::with_capacity(2);
        for &(_, slot) in entry.bindings {
            match slot {
                Slot::Params => offsets.push(p_off as u32),
                Slot::Input => offsets.push(in_off.unwrap_or(0) as u32),
                _ => {}
            }
        }
        let max_dim = self.sh.dev.limits.max_compute_workgroups_per_dimension;
        let groups = match grid {
            Grid::Groups(x, y, z) => Some((x, y, z)),
            Grid::Linear(n) => {
                let x = n.min(max_dim as u64);
                let y = n.div_ceil(x.max(1));
                Some((x as u32, y as u32, 1))
            }
            Grid::Indirect(..) => None,
        };
        if let Some((x, y, z)) = groups {
            if x == 0 || y == 0 || z == 0 {
                return Ok(());
            }
            if x.max(y).max(z) > max_dim {
                return Err(GpuError::Limit {
                    what: format!("workgroups of {} in one dimension", entry.name),
                    need: x.max(y).max(z) as u64,
                    limit: max_dim as u64,
                });
            }
        }
        let timestamps = self.next_timestamps(DispatchTag {
            entry: entry.name,
            grid: groups.map(|(x, y, z)| [x, y, z]),
        });
        let bg = self.st.bind_groups.get(&key).expect("inserted").clone();
        if timestamps.is_some() || self.st.pass_per_dispatch {
            self.st.pass = None;
        }
        if self.st.pass.is_none() {
            let pass = self
                .raw_encoder()
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: timestamps.as_ref().map(|(q, i)| {
                        wgpu::ComputePassTimestampWrites {
                            query_set: q,
                            beginning_of_pass_write_index: Some(*i),
                            end_of_pass_write_index: Some(*i + 1),
                        }
                    }),
                })
                .forget_lifetime();
            self.st.pass = Some(pass);
        }
        let pass = self.st.pass.as_mut().expect("opened above");
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bg, &offsets);
        match grid {
            Grid::Indirect(buf, off) => pass.dispatch_workgroups_indirect(&buf.raw, off),
            _ => {
                let (x, y, z) = groups.expect("direct grid");
                pass.dispatch_workgroups(x, y, z);
            }
        }
        if timestamps.is_some() {
            self.st.pass = None;
        }
        self.st.since_submit += 1;
        if self.st.submit_every > 0 && self.st.since_submit >= self.st.submit_every {
            self.flush()?;
        }
        self.st.dispatches += 1;
        DISPATCHES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn next_timestamps(&mut self, label: DispatchTag) -> Option<(wgpu::QuerySet, u32)> {
        let t = self.st.timing.as_mut()?;
        let i = t.labels.len() as u32 * 2;
        if i + 2 > t.capacity {
            return None;
        }
        t.labels.push(label);
        Some((t.queries.clone(), i))
    }

    /// Copies host bytes into `dst` at the current point of the recording.
    pub fn upload(&mut self, bytes: &[u8], dst: &GpuBuffer) -> Result<()> {
        let len = bytes.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let a = self.sh.arena_align;
        if len + a > self.st.arena_cap {
            // Larger than the arena: the recording so far is submitted first, so the direct write
            // cannot overtake commands recorded before it.
            self.flush()?;
            let mut padded = bytes.to_vec();
            padded.resize(align(len, 4) as usize, 0);
            self.sh.dev.queue.write_buffer(&dst.raw, 0, &padded);
            return Ok(());
        }
        self.reserve(align(len, a) + a)?;
        let off = self.push(bytes);
        let arena = self.st.arena_buf.clone();
        self.encoder()
            .copy_buffer_to_buffer(&arena.raw, off, &dst.raw, 0, align(len, 4));
        Ok(())
    }

    /// Records a copy of `src[offset .. offset + len]` into `dst` at `dst_offset`.
    pub fn copy(
        &mut self,
        src: &GpuBuffer,
        offset: u64,
        dst: &GpuBuffer,
        dst_offset: u64,
        len: u64,
    ) {
        self.encoder()
            .copy_buffer_to_buffer(&src.raw, offset, &dst.raw, dst_offset, len);
    }

    /// Records the resolution of the first `n` timestamps into `dst`.
    pub fn resolve_timestamps(&mut self, queries: &wgpu::QuerySet, n: u32, dst: &GpuBuffer) {
        self.encoder().resolve_query_set(queries, 0..n, &dst.raw, 0);
    }

    pub fn clear(&mut self, buf: &GpuBuffer) {
        self.encoder().clear_buffer(&buf.raw, 0, None);
    }

    /// Drops the open recording without submitting it (after an op failed half-way).
    pub fn discard(&mut self) {
        self.st.pass = None;
        self.st.encoder = None;
        self.st.arena.clear();
    }

    /// Submits the recording (if any) and reports errors raised so far.
    pub fn flush(&mut self) -> Result<()> {
        self.st.pass = None;
        if let Some(enc) = self.st.encoder.take() {
            let t0 = Instant::now();
            if !self.st.arena.is_empty() {
                self.sh
                    .dev
                    .queue
                    .write_buffer(&self.st.arena_buf.raw, 0, &self.st.arena);
            }
            self.sh.dev.queue.submit([enc.finish()]);
            self.st.submissions += 1;
            self.st.since_submit = 0;
            self.st.arena.clear();
            self.st.host.submit_ns += t0.elapsed().as_nanos() as u64;
        }
        if self.st.grow_arena {
            let cap = self.st.arena_cap * 2;
            self.st.arena_buf = GpuBuffer::new(
                &self.sh.dev.device,
                cap + INPUT_BINDING,
                ARENA_USAGE,
                "arena",
            );
            self.st.arena_cap = cap;
            self.st.bind_groups.clear();
            self.st.grow_arena = false;
        }
        self.sh.dev.errors.take()
    }

    /// Copies each `(buffer, offset, len)` to the host: records the copies, submits, waits.
    pub fn read(&mut self, srcs: &[(&GpuBuffer, u64, u64)]) -> Result<Vec<Vec<u8>>> {
        READBACKS.fetch_add(1, Ordering::Relaxed);
        let mut at = Vec::with_capacity(srcs.len());
        let mut total = 0u64;
        for &(_, _, len) in srcs {
            at.push(total);
            total += align(len, 4);
        }
        let (staging, _) = self.sh.staging.take(total.max(4));
        for (&(src, off, len), &dst) in srcs.iter().zip(&at) {
            if len > 0 {
                self.copy(src, off, &staging, dst, align(len, 4));
            }
        }
        self.flush()?;
        let slot: Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>> =
            Arc::default();
        let s = slot.clone();
        staging
            .raw
            .slice(0..total.max(4))
            .map_async(wgpu::MapMode::Read, move |r| {
                *s.lock().unwrap_or_else(|p| p.into_inner()) = Some(r)
            });
        let t0 = Instant::now();
        let waited = self.sh.dev.wait();
        self.st.host.wait_ns += t0.elapsed().as_nanos() as u64;
        waited?;
        match slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(GpuError::Readback(e.to_string())),
            None => return Err(GpuError::Readback("the map callback never ran".into())),
        }
        let out = {
            let view = staging
                .raw
                .get_mapped_range(0..total.max(4))
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            srcs.iter()
                .zip(&at)
                .map(|(&(_, _, len), &a)| view[a as usize..(a + len) as usize].to_vec())
                .collect()
        };
        staging.raw.unmap();
        Ok(out)
    }
}
