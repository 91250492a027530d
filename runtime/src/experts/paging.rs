//! Loading a model with its routed experts paged through a bounded pool (exact lazy paging) on
//! either backend, sized by an [`ExpertMemory`] budget, and a handle on the pool's statistics.
//!
//! The budget is what the pool itself holds: on the GPU a slot is one expert in file layout (the
//! largest layer's, aligned); on the CPU the pool keeps experts dequantized to f32, so a slot is
//! their f32 size. Dense weights load once and are not part of the budget.

use std::sync::{Arc, Mutex};

use super::pager::{Eviction, ExpertMemory, Pager, PagerStats};
use super::ExpertsError;
use crate::backend::cpu::{CpuBackend, CpuExpertPool, CpuExperts};
use crate::backend::gpu::{experts::slot_bytes, GpuBackend, GpuExpertPool};
use crate::backend::{Backend, BackendError};
use crate::format::EdmFile;
use crate::model::canvas::CanvasModel;
use crate::model::Model;

/// A paged expert pool, for its statistics.
#[derive(Clone)]
pub enum ExpertPaging {
    Cpu(Arc<Mutex<CpuExpertPool>>),
    Gpu(Arc<GpuExpertPool>),
}

impl ExpertPaging {
    pub fn stats(&self) -> PagerStats {
        match self {
            ExpertPaging::Cpu(p) => p
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pager
                .stats
                .clone(),
            ExpertPaging::Gpu(p) => p.stats(),
        }
    }

    /// Bytes the pool's slots take (host memory on the CPU, GPU memory on the GPU).
    pub fn pool_bytes(&self, file: &EdmFile) -> u64 {
        match self {
            ExpertPaging::Cpu(p) => {
                let slots = p.lock().unwrap_or_else(|e| e.into_inner()).pager.capacity();
                slots as u64 * cpu_slot_bytes(file)
            }
            ExpertPaging::Gpu(p) => p.gpu_bytes(),
        }
    }
}

/// Routed experts stored in `file` (a pruned file stores only its resident ones).
pub fn stored_experts(file: &EdmFile) -> usize {
    file.header
        .experts
        .iter()
        .map(|t| t.offsets.iter().filter(|o| o.is_some()).count())
        .sum()
}

/// f32 bytes of one dequantized expert (what the CPU pool keeps per slot).
pub fn cpu_slot_bytes(file: &EdmFile) -> u64 {
    let c = &file.header.metadata.config;
    (3 * c.moe.expert_ffn * c.hidden_size * 4) as u64
}

/// Each MoE layer's experts paged through one pool: `experts(layer)` gives a layer's (nothing is
/// read until the router asks).
pub type PooledExperts<'a, B> =
    Box<dyn FnMut(usize) -> Result<<B as Backend>::Experts, BackendError> + 'a>;

/// A backend that can run a model with paged experts.
pub trait PagedLoad: Backend + Sized {
    /// Bytes one pool slot takes on this backend.
    fn slot_bytes(&self, file: &EdmFile) -> Result<u64, ExpertsError>;
    /// A pool of `slots` for `file`'s routed experts and its layers' expert handles, for any
    /// model kind to load with (`Model::load_with_experts`, `CanvasModel::load_with_experts`).
    /// `prefetch` turns on the GPU's optimistic pass with the previous pass's routing and
    /// `readers` its read-ahead threads (the CPU pages on demand, on the calling thread).
    fn expert_paging<'a>(
        &'a self,
        file: &'a Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<(ExpertPaging, PooledExperts<'a, Self>), ExpertsError>;

    /// The model with every MoE layer's experts paged through one pool of `slots`.
    fn load_paged(
        &self,
        file: &Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<(Model<Self>, ExpertPaging), ExpertsError> {
        let (paging, mut experts) = self.expert_paging(file, slots, policy, prefetch, readers)?;
        let model = Model::load_with_experts(self, file.clone(), &mut *experts)?;
        Ok((model, paging))
    }
}

impl PagedLoad for CpuBackend {
    fn slot_bytes(&self, file: &EdmFile) -> Result<u64, ExpertsError> {
        Ok(cpu_slot_bytes(file))
    }
    fn expert_paging<'a>(
        &'a self,
        file: &'a Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        _prefetch: bool,
        _readers: usize,
    ) -> Result<(ExpertPaging, PooledExperts<'a, Self>), ExpertsError> {
        let layers = file.header.metadata.config.num_layers;
        let pool = Arc::new(Mutex::new(CpuExpertPool::new(Pager::new(
            slots, layers, policy,
        ))));
        let paging = ExpertPaging::Cpu(pool.clone());
        Ok((
            paging,
            Box::new(move |l| Ok(CpuExperts::paged(file.clone(), l, pool.clone()))),
        ))
    }
}

impl PagedLoad for GpuBackend {
    fn slot_bytes(&self, file: &EdmFile) -> Result<u64, ExpertsError> {
        Ok(slot_bytes(file)?)
    }
    fn expert_paging<'a>(
        &'a self,
        file: &'a Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<(ExpertPaging, PooledExperts<'a, Self>), ExpertsError> {
        let pool = self.expert_pool(file, slots, policy, prefetch, readers)?;
        let paging = ExpertPaging::Gpu(pool.clone());
        Ok((paging, Box::new(move |l| self.paged_experts(&pool, l))))
    }
}

/// Read-ahead threads of a paged GPU pool loaded through [`load_paged`] (see
/// backend/gpu/experts.rs): two keep a flash read in flight while the previous one uploads.
pub const READERS: usize = 2;

/// Slots an expert pool of `memory` buys for `file` on `backend`; an error naming the numbers
/// when the budget cannot hold one layer's top-k routed experts.
pub fn pool_slots<B: PagedLoad>(
    backend: &B,
    file: &EdmFile,
    memory: ExpertMemory,
) -> Result<usize, ExpertsError> {
    let top_k = file.header.metadata.config.moe.top_k;
    memory.slots(stored_experts(file), backend.slot_bytes(file)?, top_k)
}

/// Loads `file` on `backend` with an expert pool of `memory` ([`pool_slots`]).
pub fn load_paged<B: PagedLoad>(
    backend: &B,
    file: &Arc<EdmFile>,
    memory: ExpertMemory,
    policy: Eviction,
) -> Result<(Model<B>, ExpertPaging), ExpertsError> {
    let slots = pool_slots(backend, file, memory)?;
    backend.load_paged(file, slots, policy, true, READERS)
}

/// DiffusionGemma's canvas model with its routed experts paged through a pool of `memory`, as
/// [`load_paged`] does for the masked-diffusion models (the same pool, pager and kernels).
pub fn load_paged_canvas<B: PagedLoad>(
    backend: &B,
    file: &Arc<EdmFile>,
    memory: ExpertMemory,
    policy: Eviction,
) -> Result<(CanvasModel<B>, ExpertPaging), ExpertsError> {
    let slots = pool_slots(backend, file, memory)?;
    let (paging, mut experts) = backend.expert_paging(file, slots, policy, true, READERS)?;
    let model = CanvasModel::load_with_experts(backend, file.clone(), &mut *experts)?;
    Ok((model, paging))
}
