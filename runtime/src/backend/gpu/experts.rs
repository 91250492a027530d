//! Routed experts on the GPU: an [`ExpertPool`] of buffers of at most 128 MiB (many mobile GPUs
//! and lavapipe bind no more) holding each resident expert's matrices in file layout, and a
//! [`SlotTable`] — one GPU buffer, entry (layer, expert) → (pool buffer index, word offset), NONE
//! for an expert that is not resident — through which the expert kernels find their weights. A
//! residency layer can page experts by writing weights into a pool slot and rewriting the entry;
//! the kernels never change.
//!
//! One store per model file: every MoE layer of a model loaded from the same `Arc<EdmFile>` shares
//! its slot table; loading the same layer again (a second model from the same file) starts a new
//! store, so two models never share slots.

use std::sync::{Arc, Mutex};

use super::device::{GpuError, PORTABLE_BINDING};
use super::pool::GpuBuffer;
use super::recorder::Shared;
use crate::format::{DType, EdmFile, TensorEntry};
use crate::model::names;

pub const NO_SLOT: u32 = u32::MAX;

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

    /// Points (layer, expert) at `(pool, word)` (or NO_SLOT) on the host and the GPU.
    pub fn set(&mut self, sh: &Shared, layer: usize, expert: usize, slot: (u32, u32)) {
        let i = (layer * self.experts + expert) * 2;
        self.host[i] = slot.0;
        self.host[i + 1] = slot.1;
        sh.dev.queue.write_buffer(
            &self.buf.raw,
            (i * 4) as u64,
            bytemuck::cast_slice(&self.host[i..i + 2]),
        );
    }

    pub fn get(&self, layer: usize, expert: usize) -> (u32, u32) {
        let i = (layer * self.experts + expert) * 2;
        (self.host[i], self.host[i + 1])
    }
}

/// The buffers experts live in; a buffer's index is what slot entries name.
#[derive(Default)]
pub struct ExpertPool {
    pub buffers: Vec<Arc<GpuBuffer>>,
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
    /// (pool index, buffer) of the pool buffers holding this layer's experts.
    pub(crate) pools: Vec<(u32, Arc<GpuBuffer>)>,
    pub(crate) gate_up: PartLayout,
    pub(crate) down: PartLayout,
    pub(crate) hidden: usize,
    pub(crate) inter: usize,
    pub resident: Vec<bool>,
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
    let gate_up = part_layout(gu, 0);
    let down = part_layout(dn, (align(gu.length, 4) / 4) as u32);
    let stride = align(align(gu.length, 4) + align(dn.length, 4), 256);
    let cap = PORTABLE_BINDING.min(sh.dev.split);
    if stride > cap {
        return Err(GpuError::Limit {
            what: format!("one expert of layer {layer}"),
            need: stride,
            limit: cap,
        }
        .into());
    }
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
    let mut guard = store.inner.lock().unwrap_or_else(|p| p.into_inner());
    let (slots, pool, loaded) = &mut *guard;
    let mut pools = Vec::new();
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
                let view = file.expert_part(layer, e, name)?;
                super::check_finite(&view)?;
                super::write_padded(sh, &buf, at, view.bytes);
                on_upload(view.bytes.len() as u64);
            }
            slots.set(sh, layer, e, (index, (base / 4) as u32));
        }
        pools.push((index, buf));
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
        hidden: gu.shape.get(1).copied().unwrap_or(0),
        inter: dn.shape.get(1).copied().unwrap_or(0),
        resident: present,
    })
}
