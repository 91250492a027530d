//! Continuous batching: the forward passes of many sequences decoding at once run together as
//! batched passes ([`Model::forward_batch`]), so each weight is read once for all of them.
//!
//! Every sequence decodes on a thread of its own with its own decoder state and KV cache (the
//! decoders stay plain loops over `forward`); its passes go through a [`BatchedPasses`] runner
//! taken from the engine's [`PassBatcher`]. A pass is queued and its thread waits. When no batched
//! pass is running and every sequence that joined the batcher has a pass queued (or the oldest has
//! waited [`BatchLimits::wait`] since it was queued and the last pass ended), one waiting thread
//! leads: it takes the queued passes that can
//! share a pass with the oldest one (the same [`Model::batch_class`], up to
//! [`BatchLimits::max_rows`] rows), runs them as one batched pass, posts each sequence its outputs
//! and wakes the others. Sequences join and leave between passes (continuous batching).
//!
//! Exactness: a sequence's outputs are those of its pass alone. Each pass is checked alone first
//! (a bad one fails alone); a batched pass that fails runs its passes again one by one, so an
//! error belongs to the pass that caused it (re-running rewrites the same K/V positions).
//!
//! The queued pass lends its KV cache to the leading thread: the cache stays borrowed by the
//! waiting thread, which cannot return before the pass that uses it has ended and posted its
//! outputs (a panic in the pass included: the leader catches it, posts errors, then re-raises).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::decode::PassRunner;
use crate::model::{ForwardOutput, ForwardRequest, Model, ModelError, SeqPass, Window};

/// How batches form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most rows (Σ tokens) one batched pass takes; a single larger pass runs alone.
    pub max_rows: usize,
    /// Most sequences one batched pass takes (1: every pass alone, one at a time, in arrival
    /// order: the unbatched baseline).
    pub max_sequences: usize,
    /// How long a queued pass waits for sequences that have not queued theirs yet (host work
    /// between passes) before a batch runs without them.
    pub wait: Duration,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_rows: 1024,
            max_sequences: 256,
            wait: Duration::from_millis(2),
        }
    }
}

/// One batched pass, as reported to [`PassBatcher::set_report`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchReport {
    /// Sequences in the pass.
    pub sequences: usize,
    /// Rows (Σ tokens).
    pub rows: usize,
    pub elapsed: Duration,
}

type Report = Arc<dyn Fn(&BatchReport) + Send + Sync>;

/// A KV cache lent by a thread waiting in [`PassBatcher::run`] to the thread that runs its pass.
struct LentKv<K>(NonNull<K>);

// SAFETY: the cache is only touched by the one thread running the batched pass, while the lending
// thread waits for that pass's outputs (module doc); `K: Send` lets it be used from that thread.
unsafe impl<K: Send> Send for LentKv<K> {}

struct Queued<B: Backend> {
    ticket: u64,
    kv: LentKv<B::Kv>,
    tokens: Vec<u32>,
    window: Window,
    want: ForwardRequest,
    /// [`Model::batch_class`] of its pass.
    class: Option<u64>,
    since: Instant,
}

struct State<B: Backend> {
    /// Sequences holding a runner ([`PassBatcher::join`]).
    joined: usize,
    queue: VecDeque<Queued<B>>,
    running: bool,
    /// When the last batched pass ended: the sequences it served queue their next passes
    /// from then on, so the next batch waits for them from then, not from its oldest pass.
    free_since: Instant,
    done: HashMap<u64, Result<ForwardOutput, ModelError>>,
    next_ticket: u64,
}

/// The batcher of one engine (one model on one backend).
pub struct PassBatcher<B: Backend> {
    state: Mutex<State<B>>,
    wake: Condvar,
    limits: Mutex<BatchLimits>,
    report: Mutex<Option<Report>>,
}

impl<B: Backend> Default for PassBatcher<B> {
    fn default() -> Self {
        PassBatcher {
            state: Mutex::new(State {
                joined: 0,
                queue: VecDeque::new(),
                running: false,
                free_since: Instant::now(),
                done: HashMap::new(),
                next_ticket: 0,
            }),
            wake: Condvar::new(),
            limits: Mutex::new(BatchLimits::default()),
            report: Mutex::new(None),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks can panic half-way through an update.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<B: Backend> PassBatcher<B> {
    pub fn set_limits(&self, limits: BatchLimits) {
        *lock(&self.limits) = BatchLimits {
            max_rows: limits.max_rows.max(1),
            max_sequences: limits.max_sequences.max(1),
            ..limits
        };
    }

    pub fn limits(&self) -> BatchLimits {
        *lock(&self.limits)
    }

    /// Calls `report` after every batched pass (a server's metrics).
    pub fn set_report(&self, report: impl Fn(&BatchReport) + Send + Sync + 'static) {
        *lock(&self.report) = Some(Arc::new(report));
    }

    /// A runner for one sequence's passes; the sequence counts as joined until it is dropped.
    pub fn join<'a>(&'a self, backend: &'a B, model: &'a Model<B>) -> BatchedPasses<'a, B> {
        lock(&self.state).joined += 1;
        BatchedPasses {
            batcher: self,
            backend,
            model,
        }
    }

    fn leave(&self) {
        lock(&self.state).joined -= 1;
        // Those waiting for this sequence's pass wait no longer.
        self.wake.notify_all();
    }

    /// Queues one pass and waits for its outputs, leading a batched pass when it is time.
    fn run(
        &self,
        backend: &B,
        model: &Model<B>,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        let limits = self.limits();
        let mut st = lock(&self.state);
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(Queued {
            ticket,
            kv: LentKv(NonNull::from(kv)),
            tokens: tokens.to_vec(),
            window,
            want: want.clone(),
            class: model.batch_class(backend, tokens.len(), want),
            since: Instant::now(),
        });
        self.wake.notify_all();
        loop {
            if let Some(out) = st.done.remove(&ticket) {
                return out;
            }
            if st.running || st.queue.is_empty() {
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let since = st
                .queue
                .front()
                .map_or(st.free_since, |q| q.since.max(st.free_since));
            let waited = since.elapsed();
            if st.queue.len() < st.joined && waited < limits.wait {
                st = self
                    .wake
                    .wait_timeout(st, limits.wait - waited)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let batch = take_batch(&mut st.queue, limits);
            st.running = true;
            drop(st);
            let started = Instant::now();
            let rows = batch.iter().map(|q| q.tokens.len()).sum();
            let sequences = batch.len();
            let tickets: Vec<u64> = batch.iter().map(|q| q.ticket).collect();
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| run_batch(backend, model, batch)));
            st = lock(&self.state);
            st.running = false;
            st.free_since = Instant::now();
            let panicked = match outcome {
                Ok(outs) => {
                    st.done.extend(outs);
                    None
                }
                Err(p) => {
                    for t in tickets {
                        st.done.insert(t, Err(ModelError::BatchPanicked));
                    }
                    Some(p)
                }
            };
            self.wake.notify_all();
            if let Some(p) = panicked {
                drop(st);
                std::panic::resume_unwind(p);
            }
            let report = lock(&self.report).clone();
            if let Some(r) = report {
                drop(st);
                r(&BatchReport {
                    sequences,
                    rows,
                    elapsed: started.elapsed(),
                });
                st = lock(&self.state);
            }
        }
    }
}

/// The oldest queued pass and those that may share its pass (same batch class, in arrival order,
/// within the limits); a pass of no class runs alone.
fn take_batch<B: Backend>(queue: &mut VecDeque<Queued<B>>, limits: BatchLimits) -> Vec<Queued<B>> {
    let first = queue.pop_front().expect("the queue is not empty");
    let mut rows = first.tokens.len();
    let class = first.class;
    let mut batch = vec![first];
    if class.is_none() {
        return batch;
    }
    let mut i = 0;
    while i < queue.len() && batch.len() < limits.max_sequences {
        let q = &queue[i];
        if q.class == class && rows + q.tokens.len() <= limits.max_rows {
            rows += q.tokens.len();
            batch.push(queue.remove(i).expect("index in range"));
        } else {
            i += 1;
        }
    }
    batch
}

/// Runs the passes of `batch` as one pass (each checked alone first; on a failure, one by one).
fn run_batch<B: Backend>(
    backend: &B,
    model: &Model<B>,
    batch: Vec<Queued<B>>,
) -> Vec<(u64, Result<ForwardOutput, ModelError>)> {
    let mut results = Vec::with_capacity(batch.len());
    let mut ok = Vec::with_capacity(batch.len());
    for mut q in batch {
        // SAFETY: the lending thread waits in `PassBatcher::run` until this batch's outputs are
        // posted; until then this thread is the cache's only user (module doc).
        let kv = unsafe { q.kv.0.as_mut() };
        match model.check_pass(backend, kv, &q.tokens, q.window, &q.want) {
            Ok(()) => ok.push((q, kv)),
            Err(e) => results.push((q.ticket, Err(e))),
        }
    }
    if ok.len() == 1 {
        let (q, kv) = ok.pop().expect("one pass");
        let out = model.forward(backend, kv, &q.tokens, q.window, &q.want);
        results.push((q.ticket, out));
        return results;
    }
    if ok.is_empty() {
        return results;
    }
    let mut seqs: Vec<SeqPass<'_, B>> = ok
        .iter_mut()
        .map(|(q, kv)| SeqPass {
            kv: &mut **kv,
            tokens: &q.tokens,
            window: q.window,
            want: &q.want,
        })
        .collect();
    match model.forward_batch(backend, &mut seqs) {
        Ok(outs) => {
            drop(seqs);
            results.extend(
                ok.iter()
                    .map(|(q, _)| q.ticket)
                    .zip(outs.into_iter().map(Ok)),
            );
        }
        Err(_) => {
            drop(seqs);
            for (q, kv) in ok {
                let out = model.forward(backend, kv, &q.tokens, q.window, &q.want);
                results.push((q.ticket, out));
            }
        }
    }
    results
}

/// One sequence's passes through the batcher ([`PassBatcher::join`]).
pub struct BatchedPasses<'a, B: Backend> {
    batcher: &'a PassBatcher<B>,
    backend: &'a B,
    model: &'a Model<B>,
}

impl<B: Backend> PassRunner<B> for BatchedPasses<'_, B> {
    fn run(
        &mut self,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        self.batcher
            .run(self.backend, self.model, kv, tokens, window, want)
    }
}

impl<B: Backend> Drop for BatchedPasses<'_, B> {
    fn drop(&mut self) {
        self.batcher.leave();
    }
}
