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
use crate::backend::Backend;
use crate::format::EdmFile;
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

/// A backend that can run a model with paged experts.
pub trait PagedLoad: Backend + Sized {
    /// Bytes one pool slot takes on this backend.
    fn slot_bytes(&self, file: &EdmFile) -> Result<u64, ExpertsError>;
    /// The model with every MoE layer's experts paged through one pool of `slots`. `prefetch`
    /// turns on the GPU's optimistic pass with the previous pass's routing and `readers` its
    /// read-ahead threads (the CPU pages on demand, on the calling thread).
    fn load_paged(
        &self,
        file: &Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<(Model<Self>, ExpertPaging), ExpertsError>;
}

impl PagedLoad for CpuBackend {
    fn slot_bytes(&self, file: &EdmFile) -> Result<u64, ExpertsError> {
        Ok(cpu_slot_bytes(file))
    }
    fn load_paged(
        &self,
        file: &Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        _prefetch: bool,
        _readers: usize,
    ) -> Result<(Model<Self>, ExpertPaging), ExpertsError> {
        let layers = file.header.metadata.config.num_layers;
        let pool = Arc::new(Mutex::new(CpuExpertPool::new(Pager::new(
            slots, layers, policy,
        ))));
        let model = Model::load_with_experts(self, file.clone(), &mut |l| {
            Ok(CpuExperts::paged(file.clone(), l, pool.clone()))
        })?;
        Ok((model, ExpertPaging::Cpu(pool)))
    }
}

impl PagedLoad for GpuBackend {
    fn slot_bytes(&self, file: &EdmFile) -> Result<u64, ExpertsError> {
        Ok(slot_bytes(file)?)
    }
    fn load_paged(
        &self,
        file: &Arc<EdmFile>,
        slots: usize,
        policy: Eviction,
        prefetch: bool,
        readers: usize,
    ) -> Result<(Model<Self>, ExpertPaging), ExpertsError> {
        let pool = self.expert_pool(file, slots, policy, prefetch, true, readers)?;
        let model =
            Model::load_with_experts(self, file.clone(), &mut |l| self.paged_experts(&pool, l))?;
        Ok((model, ExpertPaging::Gpu(pool)))
    }
}

/// Read-ahead threads of a paged GPU pool loaded through [`load_paged`] (see
/// backend/gpu/experts.rs): two keep a flash read in flight while the previous one uploads.
pub const READERS: usize = 2;

/// Loads `file` on `backend` with an expert pool of `memory`; an error naming the numbers when the
/// budget cannot hold one layer's top-k routed experts.
pub fn load_paged<B: PagedLoad>(
    backend: &B,
    file: &Arc<EdmFile>,
    memory: ExpertMemory,
    policy: Eviction,
) -> Result<(Model<B>, ExpertPaging), ExpertsError> {
    let top_k = file.header.metadata.config.moe.top_k;
    let slots = memory.slots(stored_experts(file), backend.slot_bytes(file)?, top_k)?;
    backend.load_paged(file, slots, policy, true, READERS)
}
