//! Exact lazy paging: a bounded pool of expert slots shared by all layers, filled from the model
//! file when the router picks an expert that is not resident. The output is identical to having
//! every expert resident; only time and memory change.
//!
//! This module holds the bookkeeping every backend shares — which (layer, expert) sits in which
//! slot, which slot to evict, and the statistics; a backend owns the slot storage (host vectors on
//! the CPU, regions of GPU pool buffers behind the slot table on the GPU) and copies bytes in when
//! told to.
//!
//! Eviction policies, measured against each other by `edgediff bench experts`:
//! - `Lru`: least recently used.
//! - `Lfu`: least frequently used (ties by recency).
//! - `LeastStale` (SpecMD): experts are used layer by layer in a cycle, so the expert whose layer ran
//!   most recently is the one needed furthest in the future; evict by cyclic layer distance, then LRU.
//!
//! Diffusion-aware prefetch: a block is denoised over several steps with nearly the same routing
//! (adjacent steps ≈ 0.985 cosine, TIDE), so the routing of the previous step of the same block is
//! the prediction for the next; [`Pager::prefetch`] brings those experts in before the step runs.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use super::ExpertKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Eviction {
    Lru,
    Lfu,
    LeastStale,
}

impl std::str::FromStr for Eviction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lru" => Ok(Eviction::Lru),
            "lfu" => Ok(Eviction::Lfu),
            "least-stale" => Ok(Eviction::LeastStale),
            _ => Err(format!(
                "unknown eviction policy '{s}' (lru, lfu, least-stale)"
            )),
        }
    }
}

/// How much memory the expert pool may use: bytes, or a fraction of every routed expert
/// (`--expert-memory 800MiB`, `--expert-memory 12.5%`; a bare number is bytes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertMemory {
    Fraction(f64),
    Bytes(u64),
}

impl std::str::FromStr for ExpertMemory {
    type Err = super::ExpertsError;
    fn from_str(s: &str) -> Result<Self, super::ExpertsError> {
        use super::KeepSpec;
        match s.parse::<KeepSpec>() {
            Ok(KeepSpec::Fraction(f)) => Ok(ExpertMemory::Fraction(f)),
            Ok(KeepSpec::Bytes(b)) => Ok(ExpertMemory::Bytes(b)),
            Ok(KeepSpec::PerLayer(n)) => Ok(ExpertMemory::Bytes(n as u64)),
            Err(_) => Err(super::ExpertsError::BadExpertMemory(s.to_string())),
        }
    }
}

impl ExpertMemory {
    /// Slots this budget buys for a model of `total` routed experts taking `slot_bytes` each in
    /// the pool; an error when they cannot hold one layer's `top_k` routed experts. A fraction
    /// rounds up (12.5 % of 20 experts is 3 slots), bytes round down (a budget is a ceiling).
    pub fn slots(
        self,
        total: usize,
        slot_bytes: u64,
        top_k: usize,
    ) -> Result<usize, super::ExpertsError> {
        let slots = match self {
            ExpertMemory::Fraction(f) => ((total as f64 * f).ceil() as usize).min(total),
            ExpertMemory::Bytes(b) => (b / slot_bytes.max(1)).min(total as u64) as usize,
        };
        if slots < top_k {
            return Err(super::ExpertsError::PoolTooSmall {
                budget: match self {
                    ExpertMemory::Fraction(f) => format!("{}% of {total} experts", f * 100.0),
                    ExpertMemory::Bytes(b) => format!("{b} bytes"),
                },
                slots,
                slot_bytes,
                top_k,
                need: top_k as u64 * slot_bytes,
            });
        }
        Ok(slots)
    }
}

/// Counters of one pager, exposed through the API and `generate --stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PagerStats {
    pub hits: u64,
    pub misses: u64,
    /// Experts brought in by prefetch before they were asked for.
    pub prefetched: u64,
    /// Prefetched experts that were then used.
    pub prefetch_hits: u64,
    pub evictions: u64,
    pub bytes_read: u64,
    /// Time spent reading experts on demand (the forward pass waited for it), and on the GPU the
    /// time of optimistic passes thrown away because they missed.
    pub stall: Duration,
    /// GPU passes run again because the router picked an expert the optimistic pass did not have
    /// (see backend/gpu/experts.rs); always 0 on the CPU.
    pub repasses: u64,
    /// Experts (of `misses + prefetched`) whose bytes a read-ahead thread had already copied out of
    /// the file when the upload needed them (see experts/reader.rs); the rest were read on the
    /// calling thread.
    pub read_ahead: u64,
    pub slots: usize,
    pub occupied: usize,
}

impl PagerStats {
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            1.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// What the backend must do for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Resident in `slot`.
    Hit { slot: usize },
    /// Not resident: load it into `slot` (whose previous occupant, if any, is evicted).
    Miss {
        slot: usize,
        evicted: Option<ExpertKey>,
    },
}

#[derive(Clone, Debug)]
struct SlotInfo {
    key: ExpertKey,
    last_use: u64,
    uses: u64,
    prefetched: bool,
}

/// Slot bookkeeping for `slots` experts of `num_layers` layers.
#[derive(Clone, Debug)]
pub struct Pager {
    policy: Eviction,
    num_layers: usize,
    slots: Vec<Option<SlotInfo>>,
    index: HashMap<ExpertKey, usize>,
    clock: u64,
    /// Layer of the most recent request (for `LeastStale`).
    current_layer: usize,
    /// Keys that must not be evicted during the current layer (its routed set), or while a whole
    /// predicted pass is prefetched.
    pinned: HashSet<ExpertKey>,
    pub stats: PagerStats,
}

impl Pager {
    /// A pool of `slots` experts. The caller guarantees `slots` ≥ one layer's top-k (checked by
    /// [`Pager::check_capacity`]), else a token's experts could not all be resident at once.
    pub fn new(slots: usize, num_layers: usize, policy: Eviction) -> Self {
        Pager {
            policy,
            num_layers: num_layers.max(1),
            slots: vec![None; slots],
            index: HashMap::new(),
            clock: 0,
            current_layer: 0,
            pinned: HashSet::new(),
            stats: PagerStats {
                slots,
                ..Default::default()
            },
        }
    }

    /// The pool must hold every expert one layer's routing can ask for in one forward pass.
    pub fn check_capacity(slots: usize, top_k: usize) -> Result<(), String> {
        if slots < top_k {
            return Err(format!(
                "an expert pool of {slots} slots cannot hold one token's top-{top_k} experts; give it at least {top_k}"
            ));
        }
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn slot_of(&self, layer: usize, expert: usize) -> Option<usize> {
        self.index.get(&ExpertKey::new(layer, expert)).copied()
    }

    /// Starts a layer's MoE: the experts in `routed` stay pinned until the next call, so loading one
    /// of them never evicts another (the pool must be ≥ `routed.len()`).
    pub fn begin_layer(&mut self, layer: usize, routed: &[usize]) {
        self.current_layer = layer;
        self.pinned = routed.iter().map(|&e| ExpertKey::new(layer, e)).collect();
    }

    /// Pins an arbitrary set; cleared by the next [`Pager::begin_layer`], `pin` or
    /// [`Pager::begin_prefetch`].
    pub fn pin(&mut self, keys: impl IntoIterator<Item = ExpertKey>) {
        self.pinned = keys.into_iter().collect();
    }

    /// Starts prefetching a whole pass's predicted experts before the pass runs: they are pinned
    /// (one prefetch never evicts another), and the cycle position is the end of the pass, since
    /// the next layer to run is the first. Without the latter, `LeastStale` would rank the first
    /// layer's experts — needed soonest — as needed last and evict the ones just prefetched.
    pub fn begin_prefetch(&mut self, keys: impl IntoIterator<Item = ExpertKey>) {
        self.current_layer = self.num_layers - 1;
        self.pin(keys);
    }

    /// Asks for one expert; counts a hit or a miss.
    pub fn request(&mut self, layer: usize, expert: usize) -> Lookup {
        self.clock += 1;
        let key = ExpertKey::new(layer, expert);
        if let Some(&slot) = self.index.get(&key) {
            let info = self.slots[slot].as_mut().expect("indexed slot is occupied");
            info.last_use = self.clock;
            info.uses += 1;
            if std::mem::take(&mut info.prefetched) {
                self.stats.prefetch_hits += 1;
            }
            self.stats.hits += 1;
            return Lookup::Hit { slot };
        }
        self.stats.misses += 1;
        self.place(key, false)
    }

    /// Brings `expert` in ahead of use (prefetch). Returns the slot to fill, or `None` when it is
    /// already resident or every slot is pinned.
    pub fn prefetch(&mut self, layer: usize, expert: usize) -> Option<Lookup> {
        if self.index.contains_key(&ExpertKey::new(layer, expert)) {
            return None;
        }
        if self
            .slots
            .iter()
            .flatten()
            .all(|s| self.pinned.contains(&s.key))
            && self.slots.iter().all(Option::is_some)
        {
            return None;
        }
        self.clock += 1;
        self.stats.prefetched += 1;
        Some(self.place(ExpertKey::new(layer, expert), true))
    }

    fn place(&mut self, key: ExpertKey, prefetched: bool) -> Lookup {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(free) => free,
            None => self.victim(),
        };
        let evicted = self.slots[slot].take().map(|s| {
            self.index.remove(&s.key);
            self.stats.evictions += 1;
            s.key
        });
        self.slots[slot] = Some(SlotInfo {
            key,
            last_use: self.clock,
            uses: 1,
            prefetched,
        });
        self.index.insert(key, slot);
        self.stats.occupied = self.index.len();
        Lookup::Miss { slot, evicted }
    }

    fn victim(&self) -> usize {
        let l = self.num_layers;
        let cur = self.current_layer;
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .filter(|(_, s)| !self.pinned.contains(&s.key))
            .min_by_key(|(_, s)| match self.policy {
                Eviction::Lru => (0, 0, s.last_use),
                Eviction::Lfu => (0, s.uses, s.last_use),
                // Distance until the expert's layer comes round again: smallest for the layer that
                // just ran, so it goes first.
                Eviction::LeastStale => {
                    let until_next = (s.key.layer + l - cur - 1) % l;
                    (l - until_next, 0, s.last_use)
                }
            })
            .map(|(i, _)| i)
            // Every slot pinned cannot happen when the pool holds ≥ top-k (check_capacity).
            .unwrap_or(0)
    }

    pub fn record_read(&mut self, bytes: u64, stall: Duration) {
        self.stats.bytes_read += bytes;
        self.stats.stall += stall;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(layer: usize, expert: usize) -> ExpertKey {
        ExpertKey::new(layer, expert)
    }

    #[test]
    fn hits_after_the_first_request() {
        let mut p = Pager::new(2, 2, Eviction::Lru);
        assert!(matches!(
            p.request(0, 5),
            Lookup::Miss { evicted: None, .. }
        ));
        assert!(matches!(p.request(0, 5), Lookup::Hit { .. }));
        assert_eq!((p.stats.hits, p.stats.misses), (1, 1));
    }

    #[test]
    fn lru_evicts_the_least_recently_used_and_lfu_the_least_used() {
        for (policy, victim) in [(Eviction::Lru, k(0, 1)), (Eviction::Lfu, k(0, 2))] {
            let mut p = Pager::new(2, 1, policy);
            p.request(0, 1);
            p.request(0, 1);
            p.request(0, 2);
            // 1: used twice, longer ago; 2: used once, recently.
            match p.request(0, 3) {
                Lookup::Miss { evicted, .. } => assert_eq!(evicted, Some(victim), "{policy:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn least_stale_evicts_the_layer_that_just_ran() {
        let mut p = Pager::new(2, 4, Eviction::LeastStale);
        p.begin_layer(1, &[7]);
        p.request(1, 7);
        p.begin_layer(2, &[7]);
        p.request(2, 7);
        // At layer 3 the order of future use is 0, 1, 2: layer 2's expert is needed last.
        p.begin_layer(3, &[9]);
        match p.request(3, 9) {
            Lookup::Miss { evicted, .. } => assert_eq!(evicted, Some(k(2, 7))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pinned_experts_of_the_current_layer_are_never_evicted() {
        let mut p = Pager::new(2, 1, Eviction::Lru);
        p.begin_layer(0, &[1, 2]);
        p.request(0, 1);
        p.request(0, 2);
        p.begin_layer(0, &[2, 3]);
        match p.request(0, 3) {
            Lookup::Miss { evicted, .. } => assert_eq!(evicted, Some(k(0, 1))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn least_stale_prefetch_keeps_the_first_layers_experts() {
        // Four layers; the pool holds one expert of each. Before a pass the experts of layers 0
        // and 1 are prefetched; layer 0's is needed first, so making room for a third expert must
        // evict something else, and with the prefetch pinned it evicts neither.
        let mut p = Pager::new(4, 4, Eviction::LeastStale);
        for l in 0..4 {
            p.begin_layer(l, &[1]);
            p.request(l, 1);
        }
        p.begin_prefetch([k(0, 2), k(1, 2)]);
        let mut evicted = Vec::new();
        for (l, e) in [(0, 2), (1, 2)] {
            match p.prefetch(l, e) {
                Some(Lookup::Miss {
                    evicted: Some(v), ..
                }) => evicted.push(v),
                other => panic!("{other:?}"),
            }
        }
        // Layers 3 and 2 ran last, so theirs are needed furthest in the future.
        assert_eq!(evicted, vec![k(3, 1), k(2, 1)]);
        assert!(p.slot_of(0, 2).is_some() && p.slot_of(1, 2).is_some());
    }

    #[test]
    fn too_small_a_pool_is_refused() {
        assert!(Pager::check_capacity(1, 2).is_err());
        assert!(Pager::check_capacity(2, 2).is_ok());
    }
}
