//! Markovian RSA over HTTP: a chat completion whose `"edgediff"` object holds
//! `"reason": {"n", "k", "rounds", "tail_tokens", "think_budget", "answer_regex", "aggregate",
//! "think_marker"}` (absent fields: the library's defaults) runs `crate::reason` on its one user
//! turn. `max_tokens` is each trace's answer budget; `temperature`, `top_p` and `seed` are every
//! trace's (temperature 0.8 and top_p 0.95 unless given); the other `"edgediff"` knobs choose the
//! decoder. The reply is a `chat.completion` whose content is the text of a last-round trace
//! that gave the selected answer (the final aggregation's with `"aggregate": true`), its usage
//! counts every trace's tokens, and an `"edgediff"` object carries the answer, the votes per round
//! and the measured peak KV. Not streamed (`stream: true` is a 400).
//!
//! A run goes around the scheduler (its traces decode on a blocking thread, their passes not
//! interleaved with other requests' by the pass gate, its KV not counted against `--kv-memory`):
//! when the batched engine lands, `reason::traces::generate_all` submits to it instead. A client
//! that goes away cancels the run.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::http::AppState;
use super::openai::{ApiError, ChatRequest, Content, Usage};
use crate::decode::CancelToken;
use crate::reason::{Extractor, ReasonError, RsaConfig, RsaOutput, Selection};

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
    if req.common.stream == Some(true) {
        return Err(ApiError::bad_request(
            "stream is not supported with edgediff.reason",
            Some("stream"),
        ));
    }
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
        ReasonError::Engine(_) => ApiError::new(500, "server_error", e.to_string()),
        ReasonError::BeyondContext { .. } => ApiError::bad_request(e.to_string(), Some("edgediff"))
            .with_code("context_length_exceeded"),
        _ => ApiError::bad_request(e.to_string(), Some("edgediff")),
    }
}

/// Cancels the run when the handler is dropped (the client went away) before it ends.
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Answers a chat completion with reasoning (see the module header).
pub(super) async fn chat(state: &Arc<AppState>, body: Bytes) -> Response {
    let req = match serde_json::from_slice::<ChatRequest>(&body) {
        Ok(r) => r,
        Err(e) => return ApiError::bad_request(format!("invalid body: {e}"), None).into_response(),
    };
    let cancel = CancelToken::new();
    let (query, config) = match prepare(&req, state, &cancel) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let guard = CancelOnDrop(cancel);
    let s = state.clone();
    let run = tokio::task::spawn_blocking(move || {
        s.scheduler.engine().reason(&query, &config, &mut |_| {})
    })
    .await;
    let out = match run {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return reason_error(&e).into_response(),
        Err(_) => {
            return ApiError::new(500, "server_error", "the run failed unexpectedly")
                .into_response()
        }
    };
    // Ended: cancelling now is a no-op.
    drop(guard);
    Json(response(state, &out)).into_response()
}

fn response(state: &AppState, out: &RsaOutput) -> serde_json::Value {
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
    let votes = |v: &[crate::reason::Vote]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|v| serde_json::json!({"answer": v.answer, "count": v.count}))
            .collect()
    };
    serde_json::json!({
        "id": format!("chatcmpl-rsa{:x}", t.elapsed.as_nanos() as u64 ^ t.generated_tokens as u64),
        "object": "chat.completion",
        "created": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "model": &*state.model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage,
        "edgediff": {
            "answer": out.answer,
            "votes": votes(&out.votes),
            "rounds": out.rounds.iter().map(|r| serde_json::json!({
                "votes": votes(&r.votes),
                "traces": r.traces.len(),
                "peak_kv_bytes": r.peak_kv_bytes,
            })).collect::<Vec<_>>(),
            "traces": t.traces,
            "forward_passes": t.forward_passes,
            "peak_kv_bytes": t.peak_kv_bytes,
        },
    })
}
