//! Admission and pacing: which requests decode now, and whose forward pass runs next.
//!
//! **Admission** happens whenever a sequence ends (or a request arrives): requests are admitted in
//! arrival order while fewer than `max_batch` sequences are in flight and their KV caches fit the
//! KV-memory budget; the rest wait in a bounded queue (full: the request is refused, HTTP 429). A
//! request whose cache alone exceeds the budget is refused at once. A sequence that finishes, fails
//! or is cancelled gives its slot and its KV reservation back at once, and the queue's head moves
//! in — continuous admission, between passes.
//!
//! **Batching**: every admitted sequence decodes on its own thread with its own KV cache and
//! decoder state ([`LoadedEngine::generate_batched`]); its forward passes go to the engine's pass
//! batcher ([`crate::batch`]), which runs the pending passes of the sequences in flight as one
//! batched forward pass (each sequence at its own positions, mask and cache; weights read once for
//! all) and hands each sequence its rows: continuous batching, sequences join and leave between
//! passes. A sequence's tokens are exactly those of the same request decoded alone: each row of a
//! batched pass is computed as in its pass alone (the backend batches only passes whose kernels
//! allow that, `Backend::batch_class`), and the sampler's RNG and the cache are the sequence's
//! own. A cancelled sequence stops before its next pass (a pass already queued runs, one pass at
//! most).
//!
//! **Reasoning runs** (`"edgediff": {"reason": …}`) are admitted a round at a time
//! ([`Scheduler::submit_round`]): a round of N traces takes N slots and the KV of its N caches,
//! waits in the same queue as requests, and holds its [`Lease`] while it decodes; between rounds
//! the room goes back and the next round queues again (behind whatever arrived meanwhile, but not
//! refused for a full queue: the run was admitted once). Its traces' passes go to the same pass
//! batcher.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::metrics::{Gauges, Metrics};
use crate::batch::BatchReportId;
use crate::decode::{CancelToken, FinishReason};
use crate::engine::{EngineError, Event, GenerationOutput, GenerationRequest, LoadedEngine};
use crate::model::ModelConfig;

/// How much the scheduler takes on.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most sequences decoding at once.
    pub max_batch: usize,
    /// Bytes of KV cache all running sequences may reserve together.
    pub kv_budget: u64,
    /// Most requests waiting for admission; more are refused (429).
    pub max_queue: usize,
}

/// Bytes of the KV cache [`crate::model::Model::new_kv`] allocates for `capacity` positions:
/// f32 K and V for every layer and position (plus ZAYA1's per-position CCA state).
pub fn kv_bytes(config: &ModelConfig, capacity: usize) -> u64 {
    config.kv_bytes(capacity)
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The wait queue is full; try again later.
    QueueFull,
    /// The request's KV cache alone is larger than the whole budget.
    TooLarge { need: u64, budget: u64 },
    /// A reasoning round has more traces than `max_batch` sequences can ever run at once.
    TooWide { traces: usize, max_batch: usize },
    /// The server is shutting down.
    Closed,
}

/// What a generation sends back to the request that started it.
#[derive(Debug)]
pub enum JobEvent {
    Text(String),
    Done(Result<GenerationOutput, EngineError>),
    /// The generation thread died (a bug): the request gets a 500, the server goes on.
    Crashed,
}

pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<LoadedEngine>,
    /// This scheduler's listener on the engine's batched passes, removed with it.
    report: BatchReportId,
    limits: Limits,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    kv_in_use: u64,
    queue: VecDeque<Job>,
    next_id: u64,
    closed: bool,
    /// Cancel tokens of running sequences (closing the server cancels them).
    live: Vec<(u64, CancelToken)>,
}

struct Job {
    id: u64,
    /// Sequence slots: 1 for a request, N for a reasoning round.
    width: usize,
    kv: u64,
    arrived: Instant,
    cancel: CancelToken,
    work: Work,
}

enum Work {
    /// A request: the scheduler runs it on a thread of its own.
    Generate {
        request: GenerationRequest,
        events: mpsc::UnboundedSender<JobEvent>,
    },
    /// A reasoning round: admission hands its waiting run a [`Lease`]; the run decodes.
    Round(std::sync::mpsc::Sender<Lease>),
}

/// The room (slots and KV) a reasoning round holds while it decodes; dropping it gives the room
/// back and admits from the queue.
pub struct Lease {
    inner: Arc<Inner>,
    id: u64,
    width: usize,
    kv: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.release(self.id, self.width, self.kv);
    }
}

/// A queued reasoning round ([`Scheduler::submit_round`]); dropping it before it is admitted
/// takes it out of the queue.
pub struct RoundTicket {
    id: u64,
    inner: Arc<Inner>,
    cancel: CancelToken,
    admitted: std::sync::mpsc::Receiver<Lease>,
}

impl RoundTicket {
    /// Blocks until the round is admitted; `None` when the run's cancel token fires first or the
    /// server closes.
    pub fn wait(self) -> Option<Lease> {
        loop {
            match self.admitted.recv_timeout(Duration::from_millis(20)) {
                Ok(lease) => return Some(lease),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.cancel.is_cancelled() {
                        // Drop takes it out of the queue; a lease granted meanwhile is dropped
                        // with the receiver, which gives its room back.
                        return None;
                    }
                }
            }
        }
    }
}

impl Drop for RoundTicket {
    fn drop(&mut self) {
        // Not counted as a cancelled generation here: the run it belongs to is, when it ends.
        self.inner.withdraw(self.id);
    }
}

/// A submitted request: its events, and its cancellation when dropped before the end (the client
/// went away).
pub struct JobHandle {
    id: u64,
    cancel: CancelToken,
    inner: Arc<Inner>,
    pub events: mpsc::UnboundedReceiver<JobEvent>,
    finished: bool,
}

impl JobHandle {
    /// Receives the next event; marks the job finished after its last.
    pub async fn next(&mut self) -> Option<JobEvent> {
        let e = self.events.recv().await;
        if matches!(e, None | Some(JobEvent::Done(_)) | Some(JobEvent::Crashed)) {
            self.finished = true;
        }
        e
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.engine.remove_batch_report(self.report);
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.inner.cancel(self.id, &self.cancel);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave their plain counters half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Scheduler {
    pub fn new(engine: Arc<LoadedEngine>, limits: Limits, metrics: Arc<Metrics>) -> Self {
        let m = metrics.clone();
        let report = engine.add_batch_report(move |r| {
            // A chain of AR steps is `passes` batched passes of its sequences (those whose chains
            // end early drop out of its last steps; counted as in all of them).
            let passes = r.passes.max(1);
            for _ in 0..passes {
                m.batch_size.observe(r.sequences as f64);
                m.batch_rows.observe(r.rows as f64);
                m.pass_seconds.observe_duration(r.elapsed / passes as u32);
            }
        });
        Scheduler {
            inner: Arc::new(Inner {
                engine,
                report,
                limits,
                metrics,
                state: Mutex::new(State::default()),
            }),
        }
    }

    pub fn engine(&self) -> &LoadedEngine {
        &self.inner.engine
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Queues `request` (its KV cache: `capacity` positions); it starts now if it fits.
    pub fn submit(
        &self,
        mut request: GenerationRequest,
        capacity: usize,
        arrived: Instant,
    ) -> Result<JobHandle, Rejection> {
        let inner = &self.inner;
        let kv = kv_bytes(inner.engine.config(), capacity);
        let cancel = CancelToken::new();
        request.decoding.cancel = Some(cancel.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let work = Work::Generate {
            request,
            events: tx,
        };
        let id = inner.enqueue(1, kv, arrived, cancel.clone(), work, true)?;
        Ok(JobHandle {
            id,
            cancel,
            inner: inner.clone(),
            events: rx,
            finished: false,
        })
    }

    /// Whether a reasoning round of `traces` traces of `positions` KV positions each could ever
    /// be admitted (`max_batch` slots, the KV budget).
    pub fn check_round(&self, traces: usize, positions: usize) -> Result<(), Rejection> {
        let limits = self.inner.limits;
        if traces > limits.max_batch {
            return Err(Rejection::TooWide {
                traces,
                max_batch: limits.max_batch,
            });
        }
        let need = kv_bytes(self.inner.engine.config(), positions).saturating_mul(traces as u64);
        if need > limits.kv_budget {
            return Err(Rejection::TooLarge {
                need,
                budget: limits.kv_budget,
            });
        }
        Ok(())
    }

    /// Queues a reasoning round whose traces need `positions` KV positions each; it is admitted
    /// like a request of that many sequences ([`RoundTicket::wait`] returns its [`Lease`]).
    /// `first`: the run's round 0, refused when the queue is full; later rounds of an admitted
    /// run always queue. `cancel` is the run's: it stops the wait, and closing the server fires it.
    pub fn submit_round(
        &self,
        positions: &[usize],
        cancel: &CancelToken,
        arrived: Instant,
        first: bool,
    ) -> Result<RoundTicket, Rejection> {
        let inner = &self.inner;
        let config = inner.engine.config();
        let kv = positions
            .iter()
            .map(|&p| kv_bytes(config, p))
            .fold(0u64, u64::saturating_add);
        let width = positions.len();
        if width > inner.limits.max_batch {
            return Err(Rejection::TooWide {
                traces: width,
                max_batch: inner.limits.max_batch,
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let id = inner.enqueue(width, kv, arrived, cancel.clone(), Work::Round(tx), first)?;
        Ok(RoundTicket {
            id,
            inner: inner.clone(),
            cancel: cancel.clone(),
            admitted: rx,
        })
    }

    /// The gauges `/metrics` reports.
    pub fn gauges(&self) -> Gauges {
        let st = lock(&self.inner.state);
        Gauges {
            running: st.running,
            queued: st.queue.len(),
            kv_bytes_in_use: st.kv_in_use,
            kv_bytes_budget: self.inner.limits.kv_budget,
            max_batch: self.inner.limits.max_batch,
            experts: self.inner.engine.expert_stats(),
        }
    }

    /// Refuses new requests and cancels every queued and running one.
    pub fn close(&self) {
        let (queued, live) = {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            (std::mem::take(&mut st.queue), st.live.clone())
        };
        for job in queued {
            // A queued round's run sees its ticket's sender gone and ends as cancelled.
            if let Work::Generate { events, .. } = job.work {
                let _ = events.send(JobEvent::Done(Ok(cancelled_output())));
            }
        }
        for (_, c) in live {
            c.cancel();
        }
    }

    /// Waits until no sequence runs (after [`Scheduler::close`]), at most `timeout`.
    pub fn drain(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if lock(&self.inner.state).running == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

/// What a queued request that never started reports when the server closes.
fn cancelled_output() -> GenerationOutput {
    GenerationOutput {
        text: String::new(),
        tokens: Vec::new(),
        finish_reason: FinishReason::Cancelled,
        stats: crate::engine::GenerationStats {
            prompt_tokens: 0,
            new_tokens: 0,
            forward_passes: 0,
            positions_processed: 0,
            tokens_per_forward: 0.0,
            time_to_first_token: None,
            elapsed: Duration::ZERO,
            tokens_per_second: 0.0,
            decoder: crate::decode::DecoderDetails::Ar,
        },
    }
}

impl Inner {
    fn fits(&self, st: &State, width: usize, kv: u64) -> bool {
        st.running + width <= self.limits.max_batch
            && st.kv_in_use.saturating_add(kv) <= self.limits.kv_budget
    }

    /// Starts `work` now if it fits and nothing waits before it, else queues it (refused when the
    /// queue is full and `limit_queue`). Returns its id.
    fn enqueue(
        self: &Arc<Self>,
        width: usize,
        kv: u64,
        arrived: Instant,
        cancel: CancelToken,
        work: Work,
        limit_queue: bool,
    ) -> Result<u64, Rejection> {
        let (id, start) = {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(Rejection::Closed);
            }
            if kv > self.limits.kv_budget {
                return Err(Rejection::TooLarge {
                    need: kv,
                    budget: self.limits.kv_budget,
                });
            }
            let id = st.next_id;
            st.next_id += 1;
            let job = Job {
                id,
                width,
                kv,
                arrived,
                cancel,
                work,
            };
            if st.queue.is_empty() && self.fits(&st, width, kv) {
                (id, Some(self.reserve(&mut st, job)))
            } else if limit_queue && st.queue.len() >= self.limits.max_queue {
                self.metrics.rejected_queue_full.add(1);
                return Err(Rejection::QueueFull);
            } else {
                st.queue.push_back(job);
                (id, None)
            }
        };
        if let Some(job) = start {
            Inner::start(self.clone(), job);
        }
        Ok(id)
    }

    /// Counts `job` as running; the caller starts it after releasing the lock.
    fn reserve(&self, st: &mut State, job: Job) -> Job {
        st.running += job.width;
        st.kv_in_use += job.kv;
        st.live.push((job.id, job.cancel.clone()));
        job
    }

    /// A sequence (or a reasoning round) ended: free its slots and KV, admit what now fits from
    /// the queue's head.
    fn release(self: &Arc<Self>, id: u64, width: usize, kv: u64) {
        let start = {
            let mut st = lock(&self.state);
            st.running -= width;
            st.kv_in_use -= kv;
            st.live.retain(|(i, _)| *i != id);
            let mut start = Vec::new();
            while let Some(head) = st.queue.front() {
                if !self.fits(&st, head.width, head.kv) {
                    break;
                }
                let job = st.queue.pop_front().expect("front exists");
                start.push(self.reserve(&mut st, job));
            }
            start
        };
        for job in start {
            Inner::start(self.clone(), job);
        }
    }

    /// Takes job `id` out of the queue; whether it was there.
    fn withdraw(&self, id: u64) -> bool {
        let mut st = lock(&self.state);
        let before = st.queue.len();
        st.queue.retain(|j| j.id != id);
        before != st.queue.len()
    }

    /// The client of job `id` went away: drop it from the queue, or stop its generation.
    fn cancel(&self, id: u64, token: &CancelToken) {
        token.cancel();
        if self.withdraw(id) {
            self.metrics.cancelled.add(1);
        }
    }

    /// An admitted job: a request runs on a thread of its own until it ends, then releases its
    /// slot; a reasoning round's lease goes to its waiting run.
    fn start(inner: Arc<Self>, job: Job) {
        let (id, width, kv) = (job.id, job.width, job.kv);
        inner
            .metrics
            .queue_wait
            .observe_duration(job.arrived.elapsed());
        let (request, events) = match job.work {
            Work::Generate { request, events } => (request, events),
            Work::Round(admitted) => {
                let lease = Lease {
                    inner: inner.clone(),
                    id,
                    width,
                    kv,
                };
                // A run that stopped waiting drops the lease here, which gives the room back.
                let _ = admitted.send(lease);
                return;
            }
        };
        let failed = events.clone();
        let runner = inner.clone();
        let arrived = job.arrived;
        let spawned = std::thread::Builder::new()
            .name(format!("edgediff-seq-{id}"))
            .spawn(move || runner.run(id, kv, arrived, request, events));
        if let Err(e) = spawned {
            tracing::error!("could not start a generation thread: {e}");
            let _ = failed.send(JobEvent::Crashed);
            inner.release(id, width, kv);
        }
    }

    fn run(
        self: Arc<Self>,
        id: u64,
        kv: u64,
        arrived: Instant,
        request: GenerationRequest,
        events: mpsc::UnboundedSender<JobEvent>,
    ) {
        let metrics = &self.metrics;
        let mut last_piece: Option<Instant> = None;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.engine.generate_batched(&request, &mut |e| {
                if let Event::Text(t) = e {
                    let now = Instant::now();
                    match last_piece {
                        None => metrics.time_to_first_token.observe_duration(now - arrived),
                        Some(t0) => metrics.inter_token.observe_duration(now - t0),
                    }
                    last_piece = Some(now);
                    // A client that went away no longer listens; its cancel token stops us.
                    let _ = events.send(JobEvent::Text(t));
                }
            })
        }));
        let event = match result {
            Ok(Ok(out)) => {
                metrics.prompt_tokens.add(out.stats.prompt_tokens as u64);
                metrics.completion_tokens.add(out.stats.new_tokens as u64);
                metrics.forward_passes.add(out.stats.forward_passes as u64);
                if out.finish_reason == FinishReason::Cancelled {
                    metrics.cancelled.add(1);
                }
                JobEvent::Done(Ok(out))
            }
            Ok(Err(e)) => JobEvent::Done(Err(e)),
            Err(_) => {
                tracing::error!("generation {} panicked", id);
                JobEvent::Crashed
            }
        };
        // Free the slot first: a client that has its answer finds the sequence gone.
        self.release(id, 1, kv);
        let _ = events.send(event);
    }
}
