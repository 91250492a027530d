//! The HTTP layer: routes, the API key, body limits, JSON in, JSON or server-sent events out.
//!
//! Every handler ends in a response, errors included, in OpenAI's error shape; a request's
//! generation belongs to its [`JobHandle`], so a client that goes away (the connection closes, the
//! handler or the event stream is dropped) cancels it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::metrics::Metrics;
use super::openai::{
    finish_reason, ApiError, ChatRequest, CompletionRequest, Endpoint, Piece, Prepared,
    RequestLimits, Usage,
};
use super::scheduler::{JobEvent, JobHandle, Rejection, Scheduler};
use crate::engine::EngineError;

pub struct AppState {
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    pub model_id: Arc<str>,
    pub api_key: Option<String>,
    pub limits: RequestLimits,
    pub created: u64,
}

pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compares without stopping at the first differing byte (the key's length may leak, not its
/// content).
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(
            ApiError::new(401, "invalid_request_error", "Incorrect API key provided.")
                .with_code("invalid_api_key"),
        ),
        None => Err(ApiError::new(
            401,
            "invalid_request_error",
            "No API key provided: send it as `Authorization: Bearer <key>`.",
        )
        .with_code("invalid_api_key")),
    }
}

fn body_error(r: BytesRejection) -> ApiError {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            413,
            "invalid_request_error",
            "the request body is too large",
        )
        .with_code("request_too_large")
    } else {
        ApiError::new(status.as_u16(), "invalid_request_error", r.body_text())
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid request: {e}"), None))
}

pub(super) fn rejection(r: Rejection) -> ApiError {
    match r {
        Rejection::QueueFull => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                429,
                "rate_limit_error",
                "the server is at capacity and its wait queue is full; retry later",
            )
            .with_code("rate_limit_exceeded")
        },
        Rejection::TooLarge { need, budget } => ApiError::bad_request(
            format!(
                "this request's KV cache needs {need} bytes, more than the server's whole KV \
                 budget of {budget} bytes (--kv-memory); ask for fewer max_tokens or a shorter prompt"
            ),
            Some("max_tokens"),
        )
        .with_code("kv_budget_exceeded"),
        Rejection::TooWide { traces, max_batch } => ApiError::bad_request(
            format!(
                "a round of {traces} reasoning traces needs {traces} sequences at once, more \
                 than the server runs (--max-batch {max_batch}); ask for a smaller n"
            ),
            Some("edgediff"),
        )
        .with_code("max_batch_exceeded"),
        Rejection::Closed => ApiError {
            retry_after: Some(5),
            ..ApiError::new(503, "server_error", "the server is shutting down")
        },
    }
}

fn engine_error(e: &EngineError) -> ApiError {
    match e {
        EngineError::Decode(d) => ApiError::bad_request(d.to_string(), None),
        e => ApiError::new(500, "server_error", format!("generation failed: {e}")),
    }
}

fn crashed() -> ApiError {
    ApiError::new(500, "server_error", "the generation failed unexpectedly")
}

async fn chat(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate(&s, Endpoint::Chat, &headers, body).await;
    s.metrics
        .request_done(Endpoint::Chat.name(), r.status().as_u16());
    r
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate(&s, Endpoint::Completion, &headers, body).await;
    s.metrics
        .request_done(Endpoint::Completion.name(), r.status().as_u16());
    r
}

async fn generate(
    s: &Arc<AppState>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    if let Err(e) = authorize(s, headers) {
        return e.into_response();
    }
    let body = match body {
        Ok(b) => b,
        Err(r) => return body_error(r).into_response(),
    };
    if endpoint == Endpoint::Chat && super::reason::requested(&body) {
        return super::reason::chat(s, body, arrived).await;
    }
    // Tokenizing and templating a long prompt is CPU work: off the async workers.
    let state = s.clone();
    let prepared = tokio::task::spawn_blocking(move || -> Result<Prepared, ApiError> {
        let engine = state.scheduler.engine();
        match endpoint {
            Endpoint::Chat => parse::<ChatRequest>(&body)?.prepare(engine, &state.limits),
            Endpoint::Completion => {
                parse::<CompletionRequest>(&body)?.prepare(engine, &state.limits)
            }
        }
    })
    .await;
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => return crashed().into_response(),
    };
    let handle = match s
        .scheduler
        .submit(prepared.request, prepared.capacity, arrived)
    {
        Ok(h) => h,
        Err(r) => return rejection(r).into_response(),
    };
    let reply = Reply {
        endpoint,
        id: format!("{}{:016x}", endpoint.id_prefix(), rand_id()),
        created: now_secs(),
        model: s.model_id.clone(),
        prompt_tokens: prepared.prompt_tokens,
    };
    if prepared.stream {
        stream(reply, handle, prepared.include_usage).into_response()
    } else {
        whole(reply, handle).await
    }
}

/// A request id: unique enough to tell requests apart in logs.
pub(super) fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What every chunk or answer of one request repeats.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: Arc<str>,
    prompt_tokens: usize,
}

impl Reply {
    fn chunk(&self, piece: Piece<'_>) -> String {
        self.endpoint
            .chunk(&self.id, self.created, &self.model, piece)
            .to_string()
    }
}

/// A non-streamed answer: waits for the end. Dropping this future (the client went away) drops
/// the handle, which cancels the generation.
async fn whole(reply: Reply, mut handle: JobHandle) -> Response {
    let mut text = String::new();
    loop {
        match handle.next().await {
            Some(JobEvent::Text(t)) => text.push_str(&t),
            Some(JobEvent::Done(Ok(out))) => {
                let usage = Usage::new(reply.prompt_tokens, out.stats.new_tokens);
                let body = reply.endpoint.response(
                    &reply.id,
                    reply.created,
                    &reply.model,
                    &text,
                    finish_reason(out.finish_reason),
                    &usage,
                );
                return Json(body).into_response();
            }
            Some(JobEvent::Done(Err(e))) => return engine_error(&e).into_response(),
            Some(JobEvent::Crashed) | None => return crashed().into_response(),
        }
    }
}

/// A streamed answer as server-sent events: `data: {chunk}` per piece of text, a last chunk with
/// the finish reason, the usage when asked for, then `data: [DONE]`. The stream owns the handle:
/// when the connection closes, the stream is dropped and the generation cancelled.
fn stream(reply: Reply, handle: JobHandle, include_usage: bool) -> impl IntoResponse {
    struct St {
        reply: Reply,
        handle: JobHandle,
        include_usage: bool,
        pending: VecDeque<String>,
        ended: bool,
    }
    let mut pending = VecDeque::new();
    if reply.endpoint == Endpoint::Chat {
        pending.push_back(reply.chunk(Piece::Text {
            text: "",
            role: true,
            finish: None,
        }));
    }
    let st = St {
        reply,
        handle,
        include_usage,
        pending,
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
            match st.handle.next().await {
                Some(JobEvent::Text(t)) => {
                    let c = st.reply.chunk(Piece::Text {
                        text: &t,
                        role: false,
                        finish: None,
                    });
                    st.pending.push_back(c);
                }
                Some(JobEvent::Done(Ok(out))) => {
                    let finish = finish_reason(out.finish_reason);
                    let end = st.reply.chunk(Piece::Text {
                        text: "",
                        role: false,
                        finish: Some(finish),
                    });
                    st.pending.push_back(end);
                    if st.include_usage {
                        let usage = Usage::new(st.reply.prompt_tokens, out.stats.new_tokens);
                        st.pending.push_back(st.reply.chunk(Piece::Usage(&usage)));
                    }
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(JobEvent::Done(Err(e))) => {
                    st.pending.push_back(engine_error(&e).body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(JobEvent::Crashed) | None => {
                    st.pending.push_back(crashed().body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(events)
}

async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = match authorize(&s, &headers) {
        Err(e) => e.into_response(),
        Ok(()) => Json(serde_json::json!({
            "object": "list",
            "data": [{
                "id": &*s.model_id,
                "object": "model",
                "created": s.created,
                "owned_by": "edgediff",
            }],
        }))
        .into_response(),
    };
    s.metrics.request_done("models", r.status().as_u16());
    r
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let g = s.scheduler.gauges();
    Json(serde_json::json!({
        "status": "ok",
        "model": &*s.model_id,
        "running": g.running,
        "queued": g.queued,
    }))
    .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let text = s.metrics.render(&s.scheduler.gauges());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::new(404, "invalid_request_error", "no such endpoint").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        405,
        "invalid_request_error",
        "method not allowed on this endpoint",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secreT", b"secret"));
        assert!(!same_key(b"secret1", b"secret"));
        assert!(!same_key(b"", b"secret"));
    }
}
