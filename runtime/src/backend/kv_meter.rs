//! KV-cache bytes as the backends allocate them, counted where they are allocated: each backend's
//! `new_kv` wraps the byte size of the buffers it just created (K, V and any per-position state
//! such as CCA's) in a [`KvAllocation`] that the cache holds until it is dropped. A [`KvMeter`]
//! installed on a thread with [`KvMeter::measure`] counts every cache allocated on that thread while
//! it is installed — live bytes and their peak — so a caller (the RSA reasoner) reports the memory
//! its traces really took, not a formula, and other threads' generations (a server's other
//! requests) do not leak into its figure. Work handed to other threads takes the meter along
//! ([`KvMeter::current`], then [`KvMeter::measure`] there).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

thread_local! {
    static CURRENT: RefCell<Option<Arc<KvMeter>>> = const { RefCell::new(None) };
}

/// Live and peak KV-cache bytes of the caches allocated under it.
#[derive(Debug, Default)]
pub struct KvMeter {
    live: AtomicU64,
    peak: AtomicU64,
}

impl KvMeter {
    pub fn new() -> Arc<Self> {
        Arc::new(KvMeter::default())
    }

    /// Bytes of the caches counted here that are still allocated.
    pub fn live(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the meter was made.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Runs `f` with `meter` counting every KV cache allocated on this thread (nested calls count
    /// in the innermost meter only); the previous meter is back when `f` returns or panics.
    pub fn measure<R>(meter: &Arc<KvMeter>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<KvMeter>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = prev);
            }
        }
        let prev = CURRENT.with(|c| c.borrow_mut().replace(meter.clone()));
        let _restore = Restore(prev);
        f()
    }

    /// The meter installed on this thread, to install it on threads working for this one.
    pub fn current() -> Option<Arc<KvMeter>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    fn add(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
}

/// One KV cache's bytes, held by the cache: counted in the thread's meter (if any) when made,
/// released when the cache drops (on whatever thread that happens).
#[derive(Debug)]
pub struct KvAllocation {
    bytes: u64,
    meter: Option<Arc<KvMeter>>,
}

impl KvAllocation {
    /// Records `bytes` just allocated for a KV cache on this thread.
    pub fn new(bytes: u64) -> Self {
        let meter = CURRENT.with(|c| c.borrow().clone());
        if let Some(m) = &meter {
            m.add(bytes);
        }
        KvAllocation { bytes, meter }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for KvAllocation {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.live.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_counts_only_its_own_thread_and_scope() {
        let meter = KvMeter::new();
        let outside = KvAllocation::new(1000);
        let (a, b) = KvMeter::measure(&meter, || {
            let a = KvAllocation::new(100);
            let b = KvAllocation::new(50);
            std::thread::spawn(|| drop(KvAllocation::new(7)))
                .join()
                .unwrap();
            (a, b)
        });
        assert_eq!((meter.live(), meter.peak()), (150, 150));
        drop(a);
        assert_eq!((meter.live(), meter.peak()), (50, 150));
        drop(b);
        drop(outside);
        assert_eq!((meter.live(), meter.peak()), (0, 150));
        assert!(KvAllocation::new(3).meter.is_none());
    }
}
