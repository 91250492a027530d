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

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::metrics::{Gauges, Metrics};
use crate::arch::AttentionKind;
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
    let per_position = match config.attention {
        AttentionKind::Standard => 2 * config.kv_dim(),
        AttentionKind::Cca => 2 * config.kv_dim() + config.cca_conv_dim() + config.kv_dim() / 2,
    };
    (capacity as u64)
        .saturating_mul(per_position as u64)
        .saturating_mul(config.num_layers as u64)
        .saturating_mul(4)
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The wait queue is full; try again later.
    QueueFull,
    /// The request's KV cache alone is larger than the whole budget.
    TooLarge { need: u64, budget: u64 },
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
    request: GenerationRequest,
    kv: u64,
    arrived: Instant,
    cancel: CancelToken,
    events: mpsc::UnboundedSender<JobEvent>,
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
        engine.set_batch_report(move |r| {
            m.batch_size.observe(r.sequences as f64);
            m.batch_rows.observe(r.rows as f64);
            m.pass_seconds.observe_duration(r.elapsed);
        });
        Scheduler {
            inner: Arc::new(Inner {
                engine,
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
        let (id, start) = {
            let mut st = lock(&inner.state);
            if st.closed {
                return Err(Rejection::Closed);
            }
            if kv > inner.limits.kv_budget {
                return Err(Rejection::TooLarge {
                    need: kv,
                    budget: inner.limits.kv_budget,
                });
            }
            let id = st.next_id;
            st.next_id += 1;
            let job = Job {
                id,
                request,
                kv,
                arrived,
                cancel: cancel.clone(),
                events: tx,
            };
            if st.queue.is_empty() && inner.fits(&st, kv) {
                (id, Some(inner.reserve(&mut st, job)))
            } else if st.queue.len() >= inner.limits.max_queue {
                inner.metrics.rejected_queue_full.add(1);
                return Err(Rejection::QueueFull);
            } else {
                st.queue.push_back(job);
                (id, None)
            }
        };
        if let Some(job) = start {
            Inner::spawn(inner.clone(), job);
        }
        Ok(JobHandle {
            id,
            cancel,
            inner: inner.clone(),
            events: rx,
            finished: false,
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
            let _ = job.events.send(JobEvent::Done(Ok(cancelled_output())));
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
    fn fits(&self, st: &State, kv: u64) -> bool {
        st.running < self.limits.max_batch
            && st.kv_in_use.saturating_add(kv) <= self.limits.kv_budget
    }

    /// Counts `job` as running; the caller spawns it after releasing the lock.
    fn reserve(&self, st: &mut State, job: Job) -> Job {
        st.running += 1;
        st.kv_in_use += job.kv;
        st.live.push((job.id, job.cancel.clone()));
        job
    }

    /// A sequence ended: free its slot and KV, admit what now fits from the queue's head.
    fn release(self: &Arc<Self>, id: u64, kv: u64) {
        let start = {
            let mut st = lock(&self.state);
            st.running -= 1;
            st.kv_in_use -= kv;
            st.live.retain(|(i, _)| *i != id);
            let mut start = Vec::new();
            while let Some(head) = st.queue.front() {
                if !self.fits(&st, head.kv) {
                    break;
                }
                let job = st.queue.pop_front().expect("front exists");
                start.push(self.reserve(&mut st, job));
            }
            start
        };
        for job in start {
            Inner::spawn(self.clone(), job);
        }
    }

    /// The client of job `id` went away: drop it from the queue, or stop its generation.
    fn cancel(&self, id: u64, token: &CancelToken) {
        token.cancel();
        let removed = {
            let mut st = lock(&self.state);
            let before = st.queue.len();
            st.queue.retain(|j| j.id != id);
            before != st.queue.len()
        };
        if removed {
            self.metrics.cancelled.add(1);
        }
    }

    /// Runs `job` on a thread of its own until it ends, then releases its slot.
    fn spawn(inner: Arc<Self>, job: Job) {
        let (id, kv) = (job.id, job.kv);
        inner
            .metrics
            .queue_wait
            .observe_duration(job.arrived.elapsed());
        let events = job.events.clone();
        let runner = inner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("edgediff-seq-{id}"))
            .spawn(move || runner.run(job));
        if let Err(e) = spawned {
            tracing::error!("could not start a generation thread: {e}");
            let _ = events.send(JobEvent::Crashed);
            inner.release(id, kv);
        }
    }

    fn run(self: Arc<Self>, job: Job) {
        let metrics = &self.metrics;
        let mut last_piece: Option<Instant> = None;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.engine.generate_batched(&job.request, &mut |e| {
                if let Event::Text(t) = e {
                    let now = Instant::now();
                    match last_piece {
                        None => metrics
                            .time_to_first_token
                            .observe_duration(now - job.arrived),
                        Some(t0) => metrics.inter_token.observe_duration(now - t0),
                    }
                    last_piece = Some(now);
                    // A client that went away no longer listens; its cancel token stops us.
                    let _ = job.events.send(JobEvent::Text(t));
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
                tracing::error!("generation {} panicked", job.id);
                JobEvent::Crashed
            }
        };
        // Free the slot first: a client that has its answer finds the sequence gone.
        self.release(job.id, job.kv);
        let _ = job.events.send(event);
    }
}
