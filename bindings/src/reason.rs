//! Markovian RSA through the SDK: `Engine.reason(query, config, listener)` runs
//! `edgediff::reason` on a background thread and streams its events to a foreign
//! [`ReasonListener`] (Kotlin wraps it in a `Flow<ReasonEvent>`, Swift in an
//! `AsyncThrowingStream`); the returned [`TaskHandle`] cancels the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use edgediff::decode::CancelToken;
use edgediff::reason::{self, Extractor, ReasonError, RsaConfig, RsaOutput, Selection};

use crate::engine::Engine;
use crate::error::{catch_panic, EdgeDiffError};
use crate::task::TaskHandle;

/// A reasoning run's settings (see `edgediff::reason::RsaConfig`); defaults as the CLI's.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ReasonConfig {
    /// N: traces per round.
    #[uniffi(default = 8)]
    pub n: u32,
    /// K: previous-round traces each aggregation prompt carries (at most N).
    #[uniffi(default = 4)]
    pub k: u32,
    /// T: aggregation rounds after round 0 (0: majority of N).
    #[uniffi(default = 2)]
    pub rounds: u32,
    /// τ: tokens of each carried trace's end.
    #[uniffi(default = 4096)]
    pub tail_tokens: u32,
    /// β: thinking tokens before the end-of-thinking marker is forced.
    #[uniffi(default = 8192)]
    pub think_budget: u32,
    /// Answer tokens after thinking ends.
    #[uniffi(default = 512)]
    pub max_tokens: u32,
    #[uniffi(default = 0.8)]
    pub temperature: f32,
    #[uniffi(default = 0.95)]
    pub top_p: f32,
    #[uniffi(default = 0)]
    pub seed: u64,
    /// Answers are the last match of this regex (its first group) instead of the last \boxed{}.
    #[uniffi(default)]
    pub answer_regex: Option<String>,
    /// Select by one final aggregation trace instead of a majority vote.
    #[uniffi(default = false)]
    pub aggregate: bool,
    /// Text forced at the end of thinking (None: the model's `</think>`, else "\n\nFinal answer:").
    #[uniffi(default)]
    pub think_marker: Option<String>,
}

impl Default for ReasonConfig {
    fn default() -> Self {
        let d = RsaConfig::default();
        ReasonConfig {
            n: d.n as u32,
            k: d.k as u32,
            rounds: d.rounds as u32,
            tail_tokens: d.tail_tokens as u32,
            think_budget: d.think_budget as u32,
            max_tokens: d.max_tokens as u32,
            temperature: d.temperature,
            top_p: d.top_p,
            seed: d.seed,
            answer_regex: None,
            aggregate: false,
            think_marker: None,
        }
    }
}

impl ReasonConfig {
    fn runtime(&self, cancel: &CancelToken, engine: &Engine) -> RsaConfig {
        let extractor = match &self.answer_regex {
            Some(r) => Extractor::Regex(r.clone()),
            None => Extractor::Boxed,
        };
        let mut decoding = engine.runtime().default_decoding();
        decoding.cancel = Some(cancel.clone());
        RsaConfig {
            n: self.n as usize,
            k: self.k as usize,
            rounds: self.rounds as usize,
            tail_tokens: self.tail_tokens as usize,
            think_budget: self.think_budget as usize,
            max_tokens: self.max_tokens as usize,
            selection: if self.aggregate {
                Selection::Aggregate(extractor)
            } else {
                Selection::Majority(extractor)
            },
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            think_marker: self.think_marker.clone(),
            decoding: Some(decoding),
        }
    }
}

/// One answer and how many traces gave it.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct ReasonVote {
    pub answer: String,
    pub count: u32,
}

fn votes(v: &[reason::Vote]) -> Vec<ReasonVote> {
    v.iter()
        .map(|v| ReasonVote {
            answer: v.answer.clone(),
            count: v.count as u32,
        })
        .collect()
}

/// Streamed while a run goes (mirrors `edgediff::reason::ReasonEvent`).
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum ReasonEvent {
    RoundStarted {
        round: u32,
        traces: u32,
    },
    TraceStarted {
        round: u32,
        trace: u32,
        parents: Vec<u32>,
        prompt_tokens: u32,
    },
    TraceText {
        round: u32,
        trace: u32,
        text: String,
    },
    TraceFinished {
        round: u32,
        trace: u32,
        tokens: u32,
        forced_end_of_thinking: bool,
        answer: Option<String>,
    },
    RoundDone {
        round: u32,
        votes: Vec<ReasonVote>,
        tokens: u32,
        peak_kv_bytes: u64,
    },
}

impl From<reason::ReasonEvent> for ReasonEvent {
    fn from(e: reason::ReasonEvent) -> Self {
        use reason::ReasonEvent as R;
        match e {
            R::RoundStarted { round, traces } => ReasonEvent::RoundStarted {
                round: round as u32,
                traces: traces as u32,
            },
            R::TraceStarted {
                round,
                trace,
                parents,
                prompt_tokens,
            } => ReasonEvent::TraceStarted {
                round: round as u32,
                trace: trace as u32,
                parents: parents.into_iter().map(|p| p as u32).collect(),
                prompt_tokens: prompt_tokens as u32,
            },
            R::TraceText { round, trace, text } => ReasonEvent::TraceText {
                round: round as u32,
                trace: trace as u32,
                text,
            },
            R::TraceFinished {
                round,
                trace,
                tokens,
                forced_end_of_thinking,
                answer,
            } => ReasonEvent::TraceFinished {
                round: round as u32,
                trace: trace as u32,
                tokens: tokens as u32,
                forced_end_of_thinking,
                answer,
            },
            R::RoundDone {
                round,
                votes: v,
                tokens,
                peak_kv_bytes,
            } => ReasonEvent::RoundDone {
                round: round as u32,
                votes: votes(&v),
                tokens: tokens as u32,
                peak_kv_bytes,
            },
        }
    }
}

/// A finished run: the answer, the deciding votes and the totals.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ReasonResult {
    pub answer: Option<String>,
    pub votes: Vec<ReasonVote>,
    pub traces: u32,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub forward_passes: u64,
    /// The most KV-cache bytes allocated at once (measured from the backend's allocations).
    pub peak_kv_bytes: u64,
    pub elapsed_ms: u64,
}

impl From<&RsaOutput> for ReasonResult {
    fn from(o: &RsaOutput) -> Self {
        let t = &o.totals;
        ReasonResult {
            answer: o.answer.clone(),
            votes: votes(&o.votes),
            traces: t.traces as u32,
            prompt_tokens: t.prompt_tokens as u64,
            generated_tokens: t.generated_tokens as u64,
            forward_passes: t.forward_passes as u64,
            peak_kv_bytes: t.peak_kv_bytes,
            elapsed_ms: t.elapsed.as_millis() as u64,
        }
    }
}

impl From<ReasonError> for EdgeDiffError {
    fn from(e: ReasonError) -> Self {
        match e {
            ReasonError::Engine(e) => e.into(),
            // Cancellation ends a run without a result: the listener hears it as an error.
            e @ ReasonError::Cancelled => EdgeDiffError::Cancelled(e.to_string()),
            e @ ReasonError::Template => EdgeDiffError::Unsupported(e.to_string()),
            e => EdgeDiffError::InvalidArgument(e.to_string()),
        }
    }
}

/// Implemented by the app. Called on the run's own thread, in order: any number of `on_event`,
/// then exactly one of `on_finished` or `on_error` (a cancelled run: `on_error` with
/// `EdgeDiffError::Cancelled`).
#[uniffi::export(foreign)]
pub trait ReasonListener: Send + Sync {
    /// Throwing cancels the run and reports the exception through `on_error`.
    fn on_event(&self, event: ReasonEvent) -> Result<(), EdgeDiffError>;
    fn on_finished(&self, result: ReasonResult) -> Result<(), EdgeDiffError>;
    fn on_error(&self, error: EdgeDiffError) -> Result<(), EdgeDiffError>;
}

#[uniffi::export]
impl Engine {
    /// Starts a Markovian RSA run on `query` (one user turn through the chat template) on a
    /// background thread and returns at once; events stream to `listener`. A bad configuration
    /// fails here, before anything runs.
    pub fn reason(
        self: Arc<Self>,
        query: String,
        config: ReasonConfig,
        listener: Arc<dyn ReasonListener>,
    ) -> Result<Arc<TaskHandle>, EdgeDiffError> {
        let cancel = CancelToken::new();
        let rsa = config.runtime(&cancel, &self);
        rsa.validate()?;
        let finished = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(TaskHandle::new(cancel.clone(), finished.clone()));
        std::thread::Builder::new()
            .name("edgediff-reason".into())
            .spawn(move || {
                let mut listener_error = None;
                let result = catch_panic(|| {
                    let out = self.runtime().reason(&query, &rsa, &mut |event| {
                        if listener_error.is_none() {
                            if let Err(e) = listener.on_event(event.into()) {
                                listener_error = Some(e);
                                cancel.cancel();
                            }
                        }
                    })?;
                    Ok(ReasonResult::from(&out))
                });
                let end = match (listener_error, result) {
                    (Some(e), _) | (None, Err(e)) => Err(e),
                    (None, Ok(r)) => Ok(r),
                };
                finished.store(true, Ordering::Release);
                let _ = match end {
                    Ok(r) => listener.on_finished(r),
                    Err(e) => listener.on_error(e),
                };
            })
            .map_err(|e| EdgeDiffError::Internal(format!("cannot start a thread: {e}")))?;
        Ok(handle)
    }
}
