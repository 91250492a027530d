//! Markovian RSA over HTTP: a chat completion whose `"edgediff"` object holds
//! `"reason": {"n", "k", "rounds", "tail_tokens", "think_budget", "answer_regex", "aggregate",
//! "think_marker"}` (absent fields: the library's defaults) runs `crate::reason` on its one user
//! turn. `max_tokens` is each trace's answer budget; `temperature`, `top_p` and `seed` are every
//! trace's (temperature 0.8 and top_p 0.95 unless given); the other `"edgediff"` knobs choose the
//! decoder. The reply is a `chat.completion` whose content is the text of a last-round trace
//! that gave the selected answer (the final aggregation's with `"aggregate": true`), its usage
//! counts every trace's tokens, and an `"edgediff"` object carries the answer, the votes per round
//! and the measured peak KV.
//!
//! Admission: a run's rounds go through the scheduler like requests ([`SchedulerGate`]): a round
//! of N traces takes N slots and its N caches' KV, waits in the queue when they are not free, and
//! gives them back when its traces end. A run whose largest round could never fit (`n` above
//! `--max-batch`, its KV above `--kv-memory`) is refused at once (400), a full queue is a 429 —
//! both before the reply starts. Its traces' passes are batched with everyone's.
//!
//! `stream: true` sends every [`ReasonEvent`] as an `edgediff.reason.event` chunk
//! (`{"object": "edgediff.reason.event", "choices": [], "event": {"type": "trace_text", …}}`), then the answer
//! as `chat.completion.chunk`s (role + content, then `finish_reason` with the `"edgediff"`
//! summary), the usage when asked for, and `data: [DONE]`. A client that goes away (the handler
//! or the stream is dropped) cancels the run: a queued round leaves the queue, running traces
//! stop before their next pass.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::http::AppState;
use super::openai::{ApiError, ChatRequest, Content, Usage};
use super::scheduler::{Rejection, RoundTicket};
use crate::decode::CancelToken;
use crate::reason::{
    Extractor, ReasonError, ReasonEvent, RoundGate, RoundLease, RoundShape, RsaConfig, RsaOutput,
    Selection,
};

/// The `"reason"` object of the `"edgediff"` extension.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonExtension {
    pub n: Option<usize>,
    pub k: Option<usize>,
    pub rounds: Option<usize>,
    pub tail_tokens: Option<usize>,
    pub think_budget: Option<usize>,
    pub answer_regex: Option<String>,
    pub aggregate: Option<bool>,
    pub think_marker: Option<String>,
}

/// Whether a chat body asks for reasoning (a cheap look before the full parse).
pub(super) fn requested(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .is_some_and(|v| v["edgediff"]["reason"].is_object())
}

fn prepare(
    req: &ChatRequest,
    state: &AppState,
    cancel: &CancelToken,
) -> Result<(String, RsaConfig), ApiError> {
    let ext = req.common.edgediff.as_ref();
    let r = ext.and_then(|e| e.reason.clone()).unwrap_or_default();
    let query = match req.messages.as_slice() {
        [m] if m.role == "user" => match &m.content {
            Some(Content::Text(t)) => t.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "edgediff.reason needs the user turn's content as one string",
                    Some("messages"),
                ))
            }
        },
        _ => {
            return Err(ApiError::bad_request(
                "edgediff.reason takes one user turn (the question)",
                Some("messages"),
            ))
        }
    };
    let engine = state.scheduler.engine();
    let mut decoding = state.limits.defaults.clone();
    if let Some(e) = ext {
        e.apply(&mut decoding, engine)?;
    }
    decoding.cancel = Some(cancel.clone());
    let d = RsaConfig::default();
    let extractor = match r.answer_regex {
        Some(p) => Extractor::Regex(p),
        None => Extractor::Boxed,
    };
    let asked = req.common.max_completion_tokens.or(req.common.max_tokens);
    let config = RsaConfig {
        n: r.n.unwrap_or(d.n),
        k: r.k.unwrap_or(d.k),
        rounds: r.rounds.unwrap_or(d.rounds),
        tail_tokens: r.tail_tokens.unwrap_or(d.tail_tokens),
        think_budget: r.think_budget.unwrap_or(d.think_budget),
        max_tokens: asked.map_or(d.max_tokens.min(state.limits.max_tokens), |a| a as usize),
        selection: if r.aggregate == Some(true) {
            Selection::Aggregate(extractor)
        } else {
            Selection::Majority(extractor)
        },
        temperature: req.common.temperature.unwrap_or(d.temperature),
        top_p: req.common.top_p.unwrap_or(d.top_p),
        seed: req.common.seed.unwrap_or(d.seed),
        think_marker: r.think_marker,
        decoding: Some(decoding),
    };
    config.validate().map_err(|e| reason_error(&e))?;
    Ok((query, config))
}

fn reason_error(e: &ReasonError) -> ApiError {
    match e {
        ReasonError::Engine(_) | ReasonError::Refused(_) => {
            ApiError::new(500, "server_error", e.to_string())
        }
        // A client that went away hears nothing; one still listening was cut off by a shutdown.
        ReasonError::Cancelled => ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                503,
                "server_error",
                "the run was cancelled: the server is shutting down",
            )
        },
        ReasonError::BeyondContext { .. } => ApiError::bad_request(e.to_string(), Some("edgediff"))
            .with_code("context_length_exceeded"),
        _ => ApiError::bad_request(e.to_string(), Some("edgediff")),
    }
}

/// Cancels the run when dropped (the handler or the stream: the client went away) before it ends.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The scheduler as a run's [`RoundGate`]. Round 0's ticket is taken before the reply starts (so
/// a full queue is a 429, not a broken stream); later rounds queue when they come.
struct SchedulerGate {
    state: Arc<AppState>,
    first: Mutex<Option<RoundTicket>>,
    cancel: CancelToken,
}

impl RoundGate for SchedulerGate {
    fn admit(&self, _round: usize, positions: &[usize]) -> Result<RoundLease, ReasonError> {
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
        let ticket = match first {
            Some(t) => t,
            None => self
                .state
                .scheduler
                .submit_round(positions, &self.cancel, Instant::now(), false)
                .map_err(|r| match r {
                    Rejection::Closed => ReasonError::Cancelled,
                    r => ReasonError::Refused(format!("{r:?}")),
                })?,
        };
        match ticket.wait() {
            Some(lease) => Ok(Box::new(lease)),
            None => Err(ReasonError::Cancelled),
        }
    }
}

/// What the run's thread tells the reply.
enum RunMessage {
    Event(ReasonEvent),
    Done(Result<RsaOutput, ReasonError>),
}

/// Answers a chat completion with reasoning (see the module header).
pub(super) async fn chat(state: &Arc<AppState>, body: Bytes, arrived: Instant) -> Response {
    let req = match serde_json::from_slice::<ChatRequest>(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::bad_request(format!("invalid body: {e}"), None).into_response(),
    };
    let cancel = CancelToken::new();
    let (query, config) = match prepare(&req, state, &cancel) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    // Templating and encoding the prompts is CPU work: off the async workers.
    let s = state.clone();
    let (q, c) = (query.clone(), config.clone());
    let shape =
        tokio::task::spawn_blocking(move || s.scheduler.engine().reason_shape(&q, &c)).await;
    let shape = match shape {
        Ok(Ok(shape)) => shape,
        Ok(Err(e)) => return reason_error(&e).into_response(),
        Err(_) => return crashed().into_response(),
    };
    let largest = shape.largest;
    if let Err(r) = state
        .scheduler
        .check_round(largest.traces, largest.positions)
    {
        return admission_error(r, largest).into_response();
    }
    let first = vec![shape.first.positions; shape.first.traces];
    let ticket = match state.scheduler.submit_round(&first, &cancel, arrived, true) {
        Ok(t) => t,
        Err(r) => return admission_error(r, largest).into_response(),
    };
    let guard = CancelOnDrop(cancel.clone());
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = SchedulerGate {
        state: state.clone(),
        first: Mutex::new(Some(ticket)),
        cancel,
    };
    let s = state.clone();
    tokio::task::spawn_blocking(move || {
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
            s.scheduler
                .engine()
                .reason_gated(&query, &config, &gate, &mut |e| {
                    // A client that went away no longer listens; the cancel token stops the run.
                    let _ = tx.send(RunMessage::Event(e));
                })
        }));
        let Ok(out) = run else {
            tracing::error!("a reasoning run panicked");
            // Dropping the sender tells the reply: a 500.
            return;
        };
        let m = &s.metrics;
        match &out {
            Ok(o) => {
                m.prompt_tokens.add(o.totals.prompt_tokens as u64);
                m.completion_tokens.add(o.totals.generated_tokens as u64);
                m.forward_passes.add(o.totals.forward_passes as u64);
            }
            Err(ReasonError::Cancelled) => m.cancelled.add(1),
            Err(_) => {}
        }
        let _ = tx.send(RunMessage::Done(out));
    });
    let reply = ReasonReply {
        id: format!("chatcmpl-rsa{:016x}", super::http::rand_id()),
        created: super::http::now_secs(),
        model: state.model_id.clone(),
    };
    if req.common.stream == Some(true) {
        let include_usage = req
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        stream(reply, rx, guard, include_usage).into_response()
    } else {
        whole(reply, rx, guard).await
    }
}

fn crashed() -> ApiError {
    ApiError::new(500, "server_error", "the run failed unexpectedly")
}

fn admission_error(r: Rejection, largest: RoundShape) -> ApiError {
    match r {
        Rejection::TooLarge { need, budget } => ApiError::bad_request(
            format!(
                "this run's largest round ({} traces of up to {} KV positions each) needs {need} \
                 bytes of KV cache, more than the server's whole KV budget of {budget} bytes \
                 (--kv-memory); ask for a smaller n, tail_tokens, think_budget or max_tokens",
                largest.traces, largest.positions
            ),
            Some("edgediff"),
        )
        .with_code("kv_budget_exceeded"),
        r => super::http::rejection(r),
    }
}

/// What every chunk or answer of one run repeats.
struct ReasonReply {
    id: String,
    created: u64,
    model: Arc<str>,
}

/// A non-streamed answer: waits for the end. Dropping this future (the client went away) drops
/// the guard, which cancels the run.
async fn whole(
    reply: ReasonReply,
    mut rx: mpsc::UnboundedReceiver<RunMessage>,
    guard: CancelOnDrop,
) -> Response {
    let out = loop {
        match rx.recv().await {
            Some(RunMessage::Event(_)) => {}
            Some(RunMessage::Done(out)) => break out,
            None => return crashed().into_response(),
        }
    };
    // Ended: cancelling now is a no-op.
    drop(guard);
    match out {
        Ok(out) => Json(response(&reply, &out)).into_response(),
        Err(e) => reason_error(&e).into_response(),
    }
}

/// A streamed run as server-sent events (see the module header). The stream owns the guard:
/// when the connection closes, the stream is dropped and the run cancelled.
fn stream(
    reply: ReasonReply,
    rx: mpsc::UnboundedReceiver<RunMessage>,
    guard: CancelOnDrop,
    include_usage: bool,
) -> impl IntoResponse {
    struct St {
        reply: ReasonReply,
        rx: mpsc::UnboundedReceiver<RunMessage>,
        _guard: CancelOnDrop,
        include_usage: bool,
        pending: VecDeque<String>,
        ended: bool,
    }
    let st = St {
        reply,
        rx,
        _guard: guard,
        include_usage,
        pending: VecDeque::new(),
        ended: false,
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.ended {
                return None;
            }
            match st.rx.recv().await {
                Some(RunMessage::Event(e)) => {
                    let r = &st.reply;
                    let chunk = serde_json::json!({
                        "id": r.id,
                        "object": "edgediff.reason.event",
                        "created": r.created,
                        "model": &*r.model,
                        // No choices: OpenAI clients iterate past it as past a usage chunk.
                        "choices": [],
                        "event": event_json(&e),
                    });
                    st.pending.push_back(chunk.to_string());
                }
                Some(RunMessage::Done(Ok(out))) => {
                    let end = response(&st.reply, &out);
                    let text = end["choices"][0]["message"]["content"].clone();
                    let chunk = |choices: serde_json::Value| {
                        serde_json::json!({
                            "id": end["id"], "object": "chat.completion.chunk",
                            "created": end["created"], "model": end["model"], "choices": choices,
                        })
                    };
                    st.pending.push_back(
                        chunk(serde_json::json!([{"index": 0, "logprobs": null,
                            "delta": {"role": "assistant", "content": text},
                            "finish_reason": null}]))
                        .to_string(),
                    );
                    let mut last = chunk(serde_json::json!([{"index": 0, "logprobs": null,
                        "delta": {}, "finish_reason": "stop"}]));
                    last["edgediff"] = end["edgediff"].clone();
                    st.pending.push_back(last.to_string());
                    if st.include_usage {
                        let mut usage = chunk(serde_json::json!([]));
                        usage["usage"] = end["usage"].clone();
                        st.pending.push_back(usage.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(RunMessage::Done(Err(e))) => {
                    st.pending.push_back(reason_error(&e).body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
                None => {
                    st.pending.push_back(crashed().body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(events)
}

fn votes_json(v: &[crate::reason::Vote]) -> Vec<serde_json::Value> {
    v.iter()
        .map(|v| serde_json::json!({"answer": v.answer, "count": v.count}))
        .collect()
}

/// A [`ReasonEvent`] as the `event` of a streamed `edgediff.reason.event` chunk.
fn event_json(e: &ReasonEvent) -> serde_json::Value {
    use serde_json::json;
    match e {
        ReasonEvent::RoundStarted { round, traces } => {
            json!({"type": "round_started", "round": round, "traces": traces})
        }
        ReasonEvent::TraceStarted {
            round,
            trace,
            parents,
            prompt_tokens,
        } => json!({"type": "trace_started", "round": round, "trace": trace,
                    "parents": parents, "prompt_tokens": prompt_tokens}),
        ReasonEvent::TraceText { round, trace, text } => {
            json!({"type": "trace_text", "round": round, "trace": trace, "text": text})
        }
        ReasonEvent::TraceFinished {
            round,
            trace,
            tokens,
            forced_end_of_thinking,
            answer,
        } => json!({"type": "trace_finished", "round": round, "trace": trace, "tokens": tokens,
                    "forced_end_of_thinking": forced_end_of_thinking, "answer": answer}),
        ReasonEvent::RoundDone {
            round,
            votes,
            tokens,
            peak_kv_bytes,
        } => json!({"type": "round_done", "round": round, "votes": votes_json(votes),
                    "tokens": tokens, "peak_kv_bytes": peak_kv_bytes}),
    }
}

fn response(reply: &ReasonReply, out: &RsaOutput) -> serde_json::Value {
    let last = out
        .rounds
        .last()
        .map(|r| r.traces.as_slice())
        .unwrap_or(&[]);
    let chosen = last
        .iter()
        .find(|t| t.answer.is_some() && t.answer == out.answer)
        .or(last.first());
    let text = chosen.map_or("", |t| t.text.as_str());
    let t = &out.totals;
    let usage = Usage::new(t.prompt_tokens, t.generated_tokens);
    serde_json::json!({
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": &*reply.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage,
        "edgediff": {
            "answer": out.answer,
            "votes": votes_json(&out.votes),
            "rounds": out.rounds.iter().map(|r| serde_json::json!({
                "votes": votes_json(&r.votes),
                "traces": r.traces.len(),
                "peak_kv_bytes": r.peak_kv_bytes,
            })).collect::<Vec<_>>(),
            "traces": t.traces,
            "forward_passes": t.forward_passes,
            "peak_kv_bytes": t.peak_kv_bytes,
        },
    })
}
