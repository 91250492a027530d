//! Routing traces and their replay through a [`Pager`]. Which experts a decode asks for, in which
//! order, does not depend on the pool (paging is exact), so one recorded trace answers "what hit
//! rate would a pool of N slots with policy P reach, with or without step prefetch" for every N and
//! P deterministically, on any machine. Time and memory still need real runs.

use serde::Serialize;

use super::pager::{Eviction, Pager, PagerStats};
use super::ExpertKey;

/// Per forward pass, per MoE layer in execution order: the distinct experts the layer routed to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoutingTrace {
    pub forwards: Vec<Vec<(usize, Vec<usize>)>>,
}

impl RoutingTrace {
    /// Appends one layer's routed experts; a layer not after the previous one starts a new pass.
    pub fn record(&mut self, layer: usize, experts: &[usize]) {
        let new_pass = self
            .forwards
            .last()
            .and_then(|f| f.last())
            .is_none_or(|&(prev, _)| layer <= prev);
        if new_pass {
            self.forwards.push(Vec::new());
        }
        self.forwards
            .last_mut()
            .expect("pushed above")
            .push((layer, experts.to_vec()));
    }

    pub fn requests(&self) -> usize {
        self.forwards.iter().flatten().map(|(_, e)| e.len()).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ReplayConfig {
    pub slots: usize,
    pub policy: Eviction,
    /// Before each pass, bring in the experts of the previous pass (the previous denoising step).
    pub prefetch: bool,
}

/// Replays `trace` through a fresh pager; returns its counters (bytes in units of experts: multiply
/// `misses + prefetched` by the expert size).
pub fn replay(trace: &RoutingTrace, num_layers: usize, cfg: ReplayConfig) -> PagerStats {
    let mut pager = Pager::new(cfg.slots, num_layers, cfg.policy);
    let mut previous: Option<&Vec<(usize, Vec<usize>)>> = None;
    for pass in &trace.forwards {
        if let (true, Some(prev)) = (cfg.prefetch, previous) {
            // In execution order and no more than the pool holds: prefetching past capacity would
            // evict the experts needed first. Pinned while prefetched, as on the GPU.
            let want: Vec<ExpertKey> = prev
                .iter()
                .flat_map(|(l, es)| es.iter().map(move |&e| ExpertKey::new(*l, e)))
                .take(cfg.slots)
                .collect();
            pager.begin_prefetch(want.iter().copied());
            for k in &want {
                pager.prefetch(k.layer, k.expert);
            }
        }
        for (layer, experts) in pass {
            pager.begin_layer(*layer, experts);
            for &e in experts {
                pager.request(*layer, e);
            }
        }
        previous = Some(pass);
    }
    pager.stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> RoutingTrace {
        let mut t = RoutingTrace::default();
        for _step in 0..4 {
            t.record(0, &[1, 2]);
            t.record(1, &[3, 4]);
        }
        t
    }

    #[test]
    fn passes_split_where_the_layer_index_goes_back() {
        assert_eq!(trace().forwards.len(), 4);
        assert_eq!(trace().requests(), 16);
    }

    #[test]
    fn a_pool_holding_the_working_set_only_misses_once_per_expert() {
        let s = replay(
            &trace(),
            2,
            ReplayConfig {
                slots: 4,
                policy: Eviction::Lru,
                prefetch: false,
            },
        );
        assert_eq!((s.misses, s.hits), (4, 12));
    }

    #[test]
    fn prefetch_turns_the_first_layers_misses_into_hits_in_a_pool_smaller_than_a_pass() {
        // Two slots for four experts per pass: without prefetch every request misses; prefetching
        // the previous pass's first two experts makes layer 0 hit from the second pass on.
        let plain = replay(
            &trace(),
            2,
            ReplayConfig {
                slots: 2,
                policy: Eviction::Lru,
                prefetch: false,
            },
        );
        assert_eq!((plain.misses, plain.hits), (16, 0));
        let pre = replay(
            &trace(),
            2,
            ReplayConfig {
                slots: 2,
                policy: Eviction::Lru,
                prefetch: true,
            },
        );
        assert_eq!((pre.misses, pre.hits, pre.prefetch_hits), (10, 6, 6));
    }
}
