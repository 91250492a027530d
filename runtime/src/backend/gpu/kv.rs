//! KV caches on the GPU: K and V buffers of `[positions][kv_dim]` f32 per layer, either a cache's
//! own or a range of positions of layer buffers that several caches share (a [`KvArena`]).
//!
//! Why an arena: the attention of a batched pass (several sequences, each with its own cache) can
//! only be one dispatch if every sequence's cache sits in the same binding. The server reserves
//! one arena for its KV budget ([`crate::backend::Backend::reserve_kv`]); its sequences' caches
//! are ranges of it, and ops/attention.rs's `*_seqs` kernels serve them all at once. A cache that
//! does not fit (or a model the arena does not suit) gets buffers of its own and its attention
//! runs per sequence, exactly as before.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::pool::GpuBuffer;
use crate::arch::{AttentionKind, ModelConfig};
use crate::backend::kv_meter::KvAllocation;

/// K and V caches, one buffer per layer of `[capacity][kv_dim]` f32 from row `base`.
pub struct GpuKv {
    pub(super) capacity: usize,
    /// The cache's first row in `k` / `v` (0 unless it is a range of an arena).
    pub(super) base: usize,
    pub(super) k: Vec<Arc<GpuBuffer>>,
    pub(super) v: Vec<Arc<GpuBuffer>>,
    /// CCA layers' per-position state beyond K/V (`None` for standard attention).
    pub(super) cca: Option<super::ops::cca::CcaState>,
    /// The arena range this cache holds (given back when the cache drops).
    pub(super) lease: Option<Lease>,
    /// The bytes above, counted in the allocating thread's KV meter until the cache drops.
    pub(super) _bytes: KvAllocation,
}

impl GpuKv {
    /// The arena the cache is a range of.
    pub(super) fn arena(&self) -> Option<&Arc<KvArena>> {
        self.lease.as_ref().map(|l| &l.arena)
    }
}

/// Layer buffers shared by the caches of many sequences, handed out by position ranges
/// (first fit; freed ranges merge with their neighbours).
pub struct KvArena {
    pub(super) layers: usize,
    pub(super) kv_dim: usize,
    positions: usize,
    pub(super) k: Vec<Arc<GpuBuffer>>,
    pub(super) v: Vec<Arc<GpuBuffer>>,
    /// Free ranges, sorted, none adjacent.
    free: Mutex<Vec<Range<usize>>>,
}

/// One buffer per layer.
pub type LayerBuffers = Vec<Arc<GpuBuffer>>;

/// A range of an arena, given back on drop.
pub struct Lease {
    pub(super) arena: Arc<KvArena>,
    pub(super) range: Range<usize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.arena.give_back(self.range.clone());
    }
}

impl KvArena {
    /// Whether caches of `config` can be ranges of one arena: standard attention with every
    /// layer's K/V rows of one width (CCA's per-position state and DiffusionGemma's wider global
    /// layers keep caches of their own).
    pub fn suits(config: &ModelConfig) -> bool {
        config.attention == AttentionKind::Standard
            && (0..config.num_layers).all(|l| config.kv_dim_of(l) == config.kv_dim())
    }

    pub(super) fn new(
        config: &ModelConfig,
        positions: usize,
        k: Vec<Arc<GpuBuffer>>,
        v: Vec<Arc<GpuBuffer>>,
    ) -> Self {
        KvArena {
            layers: config.num_layers,
            kv_dim: config.kv_dim(),
            positions,
            k,
            v,
            free: Mutex::new(
                (positions > 0)
                    .then_some(0..positions)
                    .into_iter()
                    .collect(),
            ),
        }
    }

    /// Whether caches of `config` fit this arena's layer buffers.
    pub(super) fn fits(&self, config: &ModelConfig) -> bool {
        Self::suits(config) && config.num_layers == self.layers && config.kv_dim() == self.kv_dim
    }

    /// `n` consecutive positions, if a free range holds them.
    pub(super) fn take(self: &Arc<Self>, n: usize) -> Option<Lease> {
        let n = n.max(1);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let i = free.iter().position(|r| r.len() >= n)?;
        let start = free[i].start;
        free[i].start += n;
        if free[i].is_empty() {
            free.remove(i);
        }
        Some(Lease {
            arena: self.clone(),
            range: start..start + n,
        })
    }

    fn give_back(&self, r: Range<usize>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let i = free.partition_point(|f| f.start < r.start);
        free.insert(i, r);
        // Merge with the next, then the previous neighbour.
        if i + 1 < free.len() && free[i].end == free[i + 1].start {
            free[i].end = free[i + 1].end;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].end == free[i].start {
            free[i - 1].end = free[i].end;
            free.remove(i);
        }
    }

    /// Positions the arena holds.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Positions free in total (tests, metrics).
    pub fn free_positions(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter().map(|r| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena(positions: usize) -> Arc<KvArena> {
        let spec = crate::synth::SynthSpec::tiny(crate::arch::Architecture::Llama);
        let c = crate::synth::build(&spec).unwrap().meta.config;
        Arc::new(KvArena::new(&c, positions, Vec::new(), Vec::new()))
    }

    #[test]
    fn ranges_are_disjoint_and_come_back_merged() {
        let a = arena(100);
        let x = a.take(30).unwrap();
        let y = a.take(30).unwrap();
        let z = a.take(40).unwrap();
        assert_eq!(
            (x.range.clone(), y.range.clone(), z.range.clone()),
            (0..30, 30..60, 60..100)
        );
        assert!(a.take(1).is_none(), "full");
        drop(y);
        assert!(a.take(31).is_none(), "a 30-position hole holds no 31");
        let w = a.take(10).unwrap();
        assert_eq!(w.range, 30..40);
        drop(x);
        drop(z);
        // Free: 0..30, 40..100 (the last two merged).
        assert_eq!(a.free_positions(), 90);
        assert_eq!(a.take(60).unwrap().range, 40..100);
        drop(w);
        assert_eq!(a.free_positions(), 100);
        assert_eq!(
            a.take(100).unwrap().range,
            0..100,
            "everything merged back into one range"
        );
    }

    #[test]
    fn random_takes_and_drops_never_overlap() {
        let a = arena(257);
        let mut rng = crate::decode::sampling::Rng::new(5);
        let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
        let mut held: Vec<Lease> = Vec::new();
        for _ in 0..2000 {
            if below(3) == 0 && !held.is_empty() {
                let i = below(held.len());
                held.swap_remove(i);
            } else if let Some(l) = a.take(1 + below(40)) {
                held.push(l);
            }
            let mut rs: Vec<Range<usize>> = held.iter().map(|l| l.range.clone()).collect();
            rs.sort_by_key(|r| r.start);
            assert!(rs.windows(2).all(|w| w[0].end <= w[1].start), "{rs:?}");
            assert!(rs.iter().all(|r| r.end <= 257));
            let used: usize = rs.iter().map(|r| r.len()).sum();
            assert_eq!(used + a.free_positions(), 257);
        }
    }
}
