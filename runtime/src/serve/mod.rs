//! `edgediff serve`: an OpenAI-compatible HTTP server over one engine (built with the `serve`
//! feature, which the CLI turns on; the library that phones link stays free of tokio and axum).
//!
//! - [`openai`]: the wire format (requests, responses, chunks, errors) and the `"edgediff"`
//!   extension object of decoding knobs;
//! - [`scheduler`]: admission under `--max-batch` and the KV-memory budget, a bounded wait queue,
//!   one forward pass at a time in round-robin over the sequences in flight, cancellation;
//! - [`metrics`]: Prometheus counters and histograms;
//! - `http`: routes, the API key, body limits, server-sent events;
//! - `reason`: Markovian RSA as an extension of chat completions.
//!
//! An instance is independent of every other (no shared state beyond its engine), so gateways
//! scale out by running more instances behind any HTTP load balancer.

mod http;
pub mod metrics;
pub mod openai;
mod reason;
pub mod scheduler;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::engine::LoadedEngine;
pub use openai::RequestLimits;
pub use scheduler::{kv_bytes, Limits};

/// Everything `edgediff serve` is told.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The `model` the API reports (`/v1/models`, every response).
    pub model_id: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub limits: Limits,
    pub request: RequestLimits,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
}

/// Serves on `listener` until `shutdown` completes; then refuses new requests, cancels the running
/// ones and waits (a few seconds at most) for their threads to end.
pub async fn run(
    engine: Arc<LoadedEngine>,
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let state = Arc::new(http::AppState {
        scheduler: scheduler::Scheduler::new(engine, config.limits, metrics.clone()),
        metrics,
        model_id: config.model_id.into(),
        api_key: config.api_key,
        limits: config.request,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let app = http::router(state.clone(), config.max_body_bytes);
    let closing = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Open streams end when their generations are cancelled, so the graceful shutdown
            // does not wait for them to run to the end.
            closing.scheduler.close();
        })
        .await?;
    let drained =
        tokio::task::spawn_blocking(move || state.scheduler.drain(Duration::from_secs(5)))
            .await
            .unwrap_or(false);
    if !drained {
        tracing::warn!("generations still running at shutdown");
    }
    Ok(())
}

/// A server running on threads of its own (tests, embedding): [`Server::addr`] is where it
/// listens; [`Server::shutdown`] (or dropping it) stops it.
pub struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Binds `addr` (port 0: any free port) and serves `engine` on a two-worker runtime.
    pub fn start(
        engine: Arc<LoadedEngine>,
        config: ServeConfig,
        addr: SocketAddr,
    ) -> std::io::Result<Server> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("edgediff-serve".into())
            .spawn(move || {
                runtime.block_on(run(engine, config, listener, async move {
                    let _ = stopped.await;
                }))
            })?;
        Ok(Server {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the server's threads.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.stop_now()
    }

    fn stop_now(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}
