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
//! A sequence may queue a chain of AR steps instead of a pass ([`ArChain`], decode/ar.rs): chains
//! batch with chains of the same class, and the leader records step i of every chain in the batch
//! as one batched pass ([`Model::denoise_steps`]), all steps in one submission, then reads the
//! canvases back together — one host round trip for many tokens of every sequence.
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

use crate::backend::{Backend, CanvasState};
use crate::decode::{ArChain, DeviceSteps, PassRunner};
use crate::model::{
    DenoiseStep, ForwardOutput, ForwardRequest, Model, ModelError, SeqPass, Window,
};

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

/// One batched pass, or one batched chain of AR steps, as reported to
/// [`PassBatcher::add_report`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchReport {
    /// Sequences in the pass.
    pub sequences: usize,
    /// Rows (Σ tokens) of its first pass.
    pub rows: usize,
    /// Passes: 1, or the steps of a chain (its sequences' most).
    pub passes: usize,
    pub elapsed: Duration,
}

type Report = Arc<dyn Fn(&BatchReport) + Send + Sync>;

/// Names a report added by [`PassBatcher::add_report`], to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchReportId(u64);

/// The reports listening to an engine's batched passes (one per server sharing the engine).
#[derive(Default)]
struct Listeners {
    next_id: u64,
    all: Vec<(BatchReportId, Report)>,
}

/// A KV cache lent by a thread waiting in [`PassBatcher::run`] to the thread that runs its pass.
struct LentKv<K>(NonNull<K>);

// SAFETY: the cache is only touched by the one thread running the batched pass, while the lending
// thread waits for that pass's outputs (module doc); `K: Send` lets it be used from that thread.
unsafe impl<K: Send> Send for LentKv<K> {}

/// What a sequence queues: one pass, or a chain of AR steps ([`ArChain`]).
enum Job {
    Pass {
        tokens: Vec<u32>,
        window: Window,
        want: ForwardRequest,
    },
    Chain(ArChain),
}

/// What it gets back.
enum Done {
    Pass(Result<ForwardOutput, ModelError>),
    Chain(Result<CanvasState, ModelError>),
}

impl Job {
    /// Rows of its (first) pass.
    fn rows(&self) -> usize {
        match self {
            Job::Pass { tokens, .. } => tokens.len(),
            Job::Chain(c) => c.width(),
        }
    }

    /// [`Model::batch_class`] of its pass, and whether it is a chain (chains batch with chains
    /// only).
    fn class<B: Backend>(&self, backend: &B, model: &Model<B>) -> Option<(bool, u64)> {
        match self {
            Job::Pass { tokens, want, .. } => model
                .batch_class(backend, tokens.len(), want)
                .map(|c| (false, c)),
            Job::Chain(c) => model
                .batch_class(backend, c.width(), &c.want())
                .map(|k| (true, k)),
        }
    }
}

impl Done {
    /// The error outcome of a job of the kind given (`chain`).
    fn failed(chain: bool, e: ModelError) -> Done {
        match chain {
            false => Done::Pass(Err(e)),
            true => Done::Chain(Err(e)),
        }
    }
}

struct Queued<B: Backend> {
    ticket: u64,
    kv: LentKv<B::Kv>,
    job: Job,
    /// [`Job::class`].
    class: Option<(bool, u64)>,
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
    done: HashMap<u64, Done>,
    next_ticket: u64,
}

/// The batcher of one engine (one model on one backend).
pub struct PassBatcher<B: Backend> {
    state: Mutex<State<B>>,
    wake: Condvar,
    limits: Mutex<BatchLimits>,
    reports: Mutex<Listeners>,
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
            reports: Mutex::default(),
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

    /// Calls `report` after every batched pass (a server's metrics) until it is removed. Each
    /// listener added gets every pass: two servers on one engine each see the passes they
    /// shared, and neither takes the other's reports away.
    pub fn add_report(
        &self,
        report: impl Fn(&BatchReport) + Send + Sync + 'static,
    ) -> BatchReportId {
        let mut l = lock(&self.reports);
        let id = BatchReportId(l.next_id);
        l.next_id += 1;
        l.all.push((id, Arc::new(report)));
        id
    }

    /// Stops the report `id` (a server shutting down); an unknown id is ignored.
    pub fn remove_report(&self, id: BatchReportId) {
        lock(&self.reports).all.retain(|(i, _)| *i != id);
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
        let job = Job::Pass {
            tokens: tokens.to_vec(),
            window,
            want: want.clone(),
        };
        match self.queue_and_wait(backend, model, kv, job) {
            Done::Pass(out) => out,
            Done::Chain(_) => unreachable!("a pass's ticket gets a pass's outputs"),
        }
    }

    /// Queues one chain of AR steps and waits for its canvas, leading a batched chain when it is
    /// time.
    fn run_chain(
        &self,
        backend: &B,
        model: &Model<B>,
        kv: &mut B::Kv,
        chain: &ArChain,
    ) -> Result<CanvasState, ModelError> {
        match self.queue_and_wait(backend, model, kv, Job::Chain(chain.clone())) {
            Done::Chain(out) => out,
            Done::Pass(_) => unreachable!("a chain's ticket gets a chain's canvas"),
        }
    }

    fn queue_and_wait(&self, backend: &B, model: &Model<B>, kv: &mut B::Kv, job: Job) -> Done {
        let limits = self.limits();
        let mut st = lock(&self.state);
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let class = job.class(backend, model);
        st.queue.push_back(Queued {
            ticket,
            kv: LentKv(NonNull::from(kv)),
            job,
            class,
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
            let rows = batch.iter().map(|q| q.job.rows()).sum();
            let sequences = batch.len();
            let passes = batch
                .iter()
                .map(|q| match &q.job {
                    Job::Pass { .. } => 1,
                    Job::Chain(c) => c.steps,
                })
                .max()
                .unwrap_or(1);
            let tickets: Vec<u64> = batch.iter().map(|q| q.ticket).collect();
            // A batch is of one kind (chains share a class with chains only).
            let chains = matches!(batch[0].job, Job::Chain(_));
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
                        st.done
                            .insert(t, Done::failed(chains, ModelError::BatchPanicked));
                    }
                    Some(p)
                }
            };
            self.wake.notify_all();
            if let Some(p) = panicked {
                drop(st);
                std::panic::resume_unwind(p);
            }
            let reports: Vec<Report> = lock(&self.reports)
                .all
                .iter()
                .map(|(_, r)| r.clone())
                .collect();
            if !reports.is_empty() {
                drop(st);
                let report = BatchReport {
                    sequences,
                    rows,
                    passes,
                    elapsed: started.elapsed(),
                };
                for r in reports {
                    r(&report);
                }
                st = lock(&self.state);
            }
        }
    }
}

/// The oldest queued pass and those that may share its pass (same batch class, in arrival order,
/// within the limits); a pass of no class runs alone.
fn take_batch<B: Backend>(queue: &mut VecDeque<Queued<B>>, limits: BatchLimits) -> Vec<Queued<B>> {
    let first = queue.pop_front().expect("the queue is not empty");
    let mut rows = first.job.rows();
    let class = first.class;
    let mut batch = vec![first];
    if class.is_none() {
        return batch;
    }
    let mut i = 0;
    while i < queue.len() && batch.len() < limits.max_sequences {
        let q = &queue[i];
        if q.class == class && rows + q.job.rows() <= limits.max_rows {
            rows += q.job.rows();
            batch.push(queue.remove(i).expect("index in range"));
        } else {
            i += 1;
        }
    }
    batch
}

/// Runs `batch` (all passes, or all chains) together.
fn run_batch<B: Backend>(backend: &B, model: &Model<B>, batch: Vec<Queued<B>>) -> Vec<(u64, Done)> {
    let mut results = Vec::with_capacity(batch.len());
    let mut passes = Vec::with_capacity(batch.len());
    let mut chains = Vec::with_capacity(batch.len());
    for q in batch {
        // SAFETY: the lending thread waits in `PassBatcher::queue_and_wait` until this batch's
        // outputs are posted; until then this thread is the cache's only user (module doc).
        let kv = unsafe { &mut *q.kv.0.as_ptr() };
        let checked = match &q.job {
            Job::Pass {
                tokens,
                window,
                want,
            } => model.check_pass(backend, kv, tokens, *window, want),
            Job::Chain(c) => check_chain(backend, model, kv, c),
        };
        match (checked, q.job) {
            (Err(e), job) => {
                let chain = matches!(job, Job::Chain(_));
                results.push((q.ticket, Done::failed(chain, e)));
            }
            (
                Ok(()),
                Job::Pass {
                    tokens,
                    window,
                    want,
                },
            ) => passes.push((q.ticket, kv, tokens, window, want)),
            (Ok(()), Job::Chain(c)) => chains.push((q.ticket, kv, c)),
        }
    }
    run_passes(backend, model, passes, &mut results);
    run_chains(backend, model, chains, &mut results);
    results
}

type Pass<'k, K> = (u64, &'k mut K, Vec<u32>, Window, ForwardRequest);

/// Runs `ok` as one pass (each already checked alone; on a failure, one by one).
fn run_passes<B: Backend>(
    backend: &B,
    model: &Model<B>,
    mut ok: Vec<Pass<'_, B::Kv>>,
    results: &mut Vec<(u64, Done)>,
) {
    if ok.len() == 1 {
        let (ticket, kv, tokens, window, want) = ok.pop().expect("one pass");
        let out = model.forward(backend, kv, &tokens, window, &want);
        results.push((ticket, Done::Pass(out)));
        return;
    }
    if ok.is_empty() {
        return;
    }
    let mut seqs: Vec<SeqPass<'_, B>> = ok
        .iter_mut()
        .map(|(_, kv, tokens, window, want)| SeqPass {
            kv: &mut **kv,
            tokens,
            window: *window,
            want,
        })
        .collect();
    match model.forward_batch(backend, &mut seqs) {
        Ok(outs) => {
            drop(seqs);
            results.extend(
                ok.iter()
                    .map(|p| p.0)
                    .zip(outs.into_iter().map(|o| Done::Pass(Ok(o)))),
            );
        }
        Err(_) => {
            drop(seqs);
            for (ticket, kv, tokens, window, want) in ok {
                let out = model.forward(backend, kv, &tokens, window, &want);
                results.push((ticket, Done::Pass(out)));
            }
        }
    }
}

/// Whether `chain` fits `kv` and the model: its last step's pass checked as a pass alone (every
/// earlier step's window lies inside it), and at least one step.
fn check_chain<B: Backend>(
    backend: &B,
    model: &Model<B>,
    kv: &B::Kv,
    chain: &ArChain,
) -> Result<(), ModelError> {
    if chain.steps == 0 {
        return Err(ModelError::NoTokens);
    }
    let count = vec![0; chain.width()];
    let last = chain.window(chain.steps - 1);
    model.check_pass(backend, kv, &count, last, &chain.want())
}

type Chain<'k, K> = (u64, &'k mut K, ArChain);

/// Runs the chains `ok` together (each already checked alone; on a failure, one by one).
fn run_chains<B: Backend>(
    backend: &B,
    model: &Model<B>,
    mut ok: Vec<Chain<'_, B::Kv>>,
    results: &mut Vec<(u64, Done)>,
) {
    if ok.is_empty() {
        return;
    }
    match chain_together(backend, model, &mut ok) {
        Ok(states) => results.extend(
            ok.iter()
                .map(|c| c.0)
                .zip(states.into_iter().map(|s| Done::Chain(Ok(s)))),
        ),
        Err(e) if ok.len() == 1 => results.push((ok[0].0, Done::Chain(Err(e)))),
        Err(_) => {
            for one in ok {
                let mut one = [one];
                let out = chain_together(backend, model, &mut one).map(|mut s| s.remove(0));
                results.push((one[0].0, Done::Chain(out)));
            }
        }
    }
}

/// Records the chains' steps, step `i` of every chain with more than `i` steps as one batched
/// pass ([`Model::denoise_steps`]), all into one submission, then reads their canvases back in
/// one round trip. A step rewrites the K/V positions it covers, so running a chain again after a
/// failure starts from the same cache.
fn chain_together<B: Backend>(
    backend: &B,
    model: &Model<B>,
    chains: &mut [Chain<'_, B::Kv>],
) -> Result<Vec<CanvasState>, ModelError> {
    let mut canvases = chains
        .iter()
        .map(|(_, _, c)| backend.new_canvas(&c.cells(), c.mask.unwrap_or(0)))
        .collect::<Result<Vec<_>, _>>()?;
    let most = chains.iter().map(|c| c.2.steps).max().unwrap_or(0);
    let wants: Vec<ForwardRequest> = chains.iter().map(|c| c.2.want()).collect();
    // Host tokens give only the passes' row counts: the ids come from the canvases.
    let counts: Vec<Vec<u32>> = chains.iter().map(|c| vec![0; c.2.width()]).collect();
    for i in 0..most {
        let mut seqs = Vec::with_capacity(chains.len());
        let mut steps = Vec::with_capacity(chains.len());
        for (j, ((_, kv, c), canvas)) in chains.iter_mut().zip(canvases.iter_mut()).enumerate() {
            if c.steps <= i {
                continue;
            }
            seqs.push(SeqPass {
                kv: &mut **kv,
                tokens: &counts[j],
                window: c.window(i),
                want: &wants[j],
            });
            steps.push(DenoiseStep {
                canvas,
                ids_from_canvas: Some(i),
                commit: c.commit(i),
            });
        }
        model.denoise_steps(backend, &mut seqs, steps)?;
    }
    let refs: Vec<&B::Canvas> = canvases.iter().collect();
    let ranges: Vec<std::ops::Range<usize>> = chains.iter().map(|c| 0..c.2.steps).collect();
    Ok(backend.read_canvases(&refs, &ranges)?)
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

    fn chains_batched(&self, steps: DeviceSteps) -> bool {
        steps.wanted(self.backend) && self.model.chains_steps(self.backend)
    }

    fn run_chain(&mut self, kv: &mut B::Kv, chain: &ArChain) -> Result<CanvasState, ModelError> {
        self.batcher.run_chain(self.backend, self.model, kv, chain)
    }
}

impl<B: Backend> Drop for BatchedPasses<'_, B> {
    fn drop(&mut self) {
        self.batcher.leave();
    }
}
