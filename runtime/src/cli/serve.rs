//! `edgediff serve`: the OpenAI-compatible HTTP server (runtime/src/serve/) on one model.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use super::generate::{resolve_model, DecodingArgs, ModelArgs};
use crate::experts::KeepSpec;
use crate::serve::{Limits, RequestLimits, ServeConfig};

/// Where the API key comes from when `--api-key` is absent.
pub const API_KEY_ENV: &str = "EDGEDIFF_API_KEY";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The server's decoding defaults; a request's fields and its "edgediff" object override
    /// them. --max-tokens is the cap: a request asking for more gets this many.
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 every interface.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// API key clients must send as `Authorization: Bearer <key>` on /v1/* (default: the
    /// EDGEDIFF_API_KEY environment variable; neither: no key needed). /health and /metrics are open.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Most sequences decoding at once (each with its own KV cache).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// KV-cache memory all running sequences may reserve together (512MiB, 2GB, bytes); a
    /// request reserves f32 K/V for its prompt plus max_tokens.
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
    /// Most requests waiting for admission; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body; larger ones get 413.
    #[arg(long, default_value = "1MiB")]
    pub max_body: String,
    /// Most sequences one batched forward pass takes (default: --max-batch); 1 runs every pass
    /// alone, one at a time (the unbatched baseline, for comparisons).
    #[arg(long)]
    pub pass_sequences: Option<usize>,
    /// Most rows (tokens of all its sequences) one batched forward pass takes; a larger pass
    /// (a long prompt) runs alone.
    #[arg(long, default_value_t = 1024)]
    pub pass_rows: usize,
    /// The model name the API reports (default: the model file's name without .edm).
    #[arg(long)]
    pub model_name: Option<String>,
}

fn bytes(flag: &str, s: &str) -> anyhow::Result<u64> {
    match s.parse::<KeepSpec>() {
        Ok(KeepSpec::Bytes(b)) => Ok(b),
        Ok(KeepSpec::PerLayer(n)) => Ok(n as u64),
        _ => anyhow::bail!("{flag} {s}: expected bytes such as 512MiB, 2GB or 1048576"),
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition is process-wide and has no memory effects; a server
    // must see a client's closed socket as a write error, not die of SIGPIPE (main() restores the
    // default disposition for the pipeline commands).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    if a.max_batch == 0 {
        anyhow::bail!("--max-batch 0: at least 1 sequence must be able to run");
    }
    if a.pass_sequences == Some(0) || a.pass_rows == 0 {
        anyhow::bail!("--pass-sequences / --pass-rows 0: a pass takes at least 1");
    }
    let kv_budget = bytes("--kv-memory", &a.kv_memory)?;
    let max_body = bytes("--max-body", &a.max_body)?;
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (a.host.as_str(), a.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("--host {}: not an address this machine resolves", a.host))?;
    let path = resolve_model(a.model.model.as_deref())?;
    let engine = a.model.load(&a.decoding)?;
    engine.set_batch_limits(crate::batch::BatchLimits {
        max_rows: a.pass_rows,
        max_sequences: a.pass_sequences.unwrap_or(a.max_batch),
        ..Default::default()
    });
    let per_request = crate::serve::kv_bytes(
        engine.config(),
        engine
            .config()
            .max_position
            .min(a.decoding.max_tokens + 512),
    );
    // The running sequences' caches as ranges of one arena, so a batched pass attends for all of
    // them in one dispatch: as much as --max-batch such requests take, at most the budget.
    // EDGEDIFF_KV_ARENA=0: caches of their own (the behaviour before, for side-by-side runs).
    let arena_off = std::env::var("EDGEDIFF_KV_ARENA").is_ok_and(|v| v == "0");
    let arena_bytes = if arena_off {
        0
    } else {
        kv_budget.min(per_request.saturating_mul(a.max_batch as u64))
    };
    let arena = engine
        .reserve_kv(arena_bytes)
        .context("reserving the KV arena")?;
    let model_id = a.model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "edgediff".into())
    });
    let defaults = a.decoding.params(&engine);
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var(API_KEY_ENV).ok())
        .filter(|k| !k.is_empty());
    let config = ServeConfig {
        model_id: model_id.clone(),
        api_key,
        limits: Limits {
            max_batch: a.max_batch,
            kv_budget,
            max_queue: a.max_queue,
        },
        request: RequestLimits {
            max_tokens: a.decoding.max_tokens,
            defaults: defaults.clone(),
        },
        max_body_bytes: usize::try_from(max_body).unwrap_or(usize::MAX),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let bound = listener.local_addr()?;
        eprintln!(
            "edgediff serve: {model_id} ({}) on {}, listening on http://{bound}\n\
             edgediff serve: max batch {} (a batched pass: <= {} sequences, <= {} rows), KV budget \
             {} (a 512-token prompt with --max-tokens {} reserves {}; {}), queue {}, key {}",
            defaults.decoder.label(),
            engine.backend_name(),
            config.limits.max_batch,
            a.pass_sequences.unwrap_or(a.max_batch),
            a.pass_rows,
            super::human_bytes(kv_budget),
            a.decoding.max_tokens,
            super::human_bytes(per_request),
            if arena > 0 {
                format!("{arena} positions in one GPU arena")
            } else {
                "caches of their own".to_string()
            },
            config.limits.max_queue,
            if config.api_key.is_some() {
                "required"
            } else {
                "none"
            },
        );
        crate::serve::run(Arc::new(engine), config, listener, shutdown_signal())
            .await
            .context("serving")
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    eprintln!("edgediff serve: shutting down");
}
