//! `edgediff bench experts`: hit rate and bytes paged against expert-pool size, eviction policy
//! and step prefetch. One decode records the routing trace (paging is exact, so the trace is the
//! same for every pool); each configuration replays it through the real pager.
//!
//! `--live cpu|gpu` then decodes the same prompts for real with the experts paged through a pool
//! of each size, policy, prefetch setting and number of read-ahead threads (`--readers`, GPU) on
//! that backend: tokens/s, hit rate, bytes read, stall time, GPU re-runs, peak RSS and peak GPU
//! buffer bytes (dense weights + expert pool + KV + activations) per row, plus an all-resident
//! baseline. Tokens are checked equal to the baseline's (paging is exact). With `--no-replay` no
//! CPU model is loaded, so the peaks are the live rows' own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;

use super::generate::{peak_rss_kib, resolve_model, DecodingArgs};
use crate::backend::cpu::{CpuBackend, CpuExpertPool, CpuExperts};
use crate::backend::gpu::pool::{gpu_bytes, reset_peak_gpu_bytes};
use crate::backend::gpu::{GpuBackend, GpuOptions};
use crate::backend::Backend;
use crate::decode::DecodeParams;
use crate::engine::{Engine, LoadedEngine, Prompt};
use crate::experts::paging::{stored_experts, PagedLoad};
use crate::experts::trace::{replay, ReplayConfig, RoutingTrace};
use crate::experts::{Eviction, Pager};
use crate::format::EdmFile;
use crate::model::Model;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (default: models/default.edm).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompts, one per line (default: a few built-in ones).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Pool sizes, in percent of all routed experts.
    #[arg(long, value_delimiter = ',', default_value = "100,50,25,12.5")]
    pub pools: Vec<f64>,
    #[arg(long, value_delimiter = ',', default_value = "lru,lfu,least-stale")]
    pub policies: Vec<String>,
    /// Also write the rows as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also decode for real with experts paged on this backend (cpu or gpu).
    #[arg(long)]
    pub live: Option<String>,
    /// Skip the trace replay (live runs only).
    #[arg(long)]
    pub no_replay: bool,
    /// Read-ahead threads of the GPU pool, one row each (0: reads on the decoding thread).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub readers: Vec<usize>,
}

const BUILTIN_PROMPTS: [&str; 3] = ["fn main() {", "The history of the town", "def parse(path):"];

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model.as_deref())?;
    let file =
        Arc::new(EdmFile::open(&path).with_context(|| format!("opening {}", path.display()))?);
    anyhow::ensure!(
        !file.header.experts.is_empty(),
        "the model has no MoE layers"
    );
    a.decoding.check(file.header.metadata.config.max_position)?;
    let policies = a
        .policies
        .iter()
        .map(|p| p.parse::<Eviction>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prompts: Vec<String> = match &a.prompts {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    let mut rows = Vec::new();
    if !a.no_replay {
        rows = replay_rows(&a, &path, &file, &policies, &prompts)?;
    }
    if let Some(backend) = &a.live {
        println!();
        let live = match backend.as_str() {
            "cpu" => live_rows(&a, &file, &prompts, &policies, &|| Ok(CpuBackend))?,
            "gpu" => live_rows(&a, &file, &prompts, &policies, &|| {
                Ok(GpuBackend::new(&GpuOptions::from_env())?)
            })?,
            other => anyhow::bail!("--live {other}: expected cpu or gpu"),
        };
        rows.extend(live);
    }
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(())
}

/// Records the routing trace of a CPU decode and replays it through the pager for every pool
/// size, policy and prefetch setting.
fn replay_rows(
    a: &Args,
    path: &std::path::Path,
    file: &Arc<EdmFile>,
    policies: &[Eviction],
    prompts: &[String],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let c = file.header.metadata.config.clone();
    let moe_layers = file.header.experts.len();
    let all = moe_layers * c.moe.num_experts;
    let expert_bytes = file.header.experts[0].length;
    let pool = Arc::new(Mutex::new(CpuExpertPool::new(Pager::new(
        all,
        c.num_layers,
        Eviction::Lru,
    ))));
    pool.lock().expect("fresh").trace = Some(RoutingTrace::default());
    let model = Model::load_with_experts(&CpuBackend, file.clone(), &mut |l| {
        Ok(CpuExperts::paged(file.clone(), l, pool.clone()))
    })?;
    let engine = LoadedEngine::Cpu(Engine::with_model(CpuBackend, model)?);
    let params = a.decoding.params(&engine);
    let (mut tokens, mut forwards, t0) = (0, 0, std::time::Instant::now());
    for p in prompts {
        let mut req = engine.request(Prompt::Text(p.clone()));
        req.decoding = params.clone();
        let out = engine.generate(&req, &mut |_| {})?;
        tokens += out.stats.new_tokens;
        forwards += out.stats.forward_passes;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let trace = pool
        .lock()
        .expect("not poisoned")
        .trace
        .take()
        .unwrap_or_default();
    let per_pass = trace.requests() as f64 / trace.forwards.len().max(1) as f64 / moe_layers as f64;
    println!(
        "{}: {} prompts, {tokens} tokens in {forwards} forward passes ({:.1} tokens/s on the CPU, all experts resident); {} MoE layers × {} experts of {} bytes; {:.1} distinct experts per layer per pass; peak RSS {} MiB",
        path.display(),
        prompts.len(),
        tokens as f64 / elapsed,
        moe_layers,
        c.moe.num_experts,
        expert_bytes,
        per_pass,
        peak_rss_kib().unwrap_or(0) / 1024
    );
    println!();
    println!("| pool | slots | policy | prefetch | hit rate | misses | paged MiB | prefetched | evictions |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &pct in &a.pools {
        let slots = ((all as f64 * pct / 100.0).round() as usize).max(c.moe.top_k);
        for &policy in policies {
            for prefetch in [false, true] {
                let s = replay(
                    &trace,
                    c.num_layers,
                    ReplayConfig {
                        slots,
                        policy,
                        prefetch,
                    },
                );
                let paged = (s.misses + s.prefetched) * expert_bytes;
                println!(
                    "| {pct}% | {slots} | {policy:?} | {} | {:.1}% | {} | {:.1} | {} | {} |",
                    if prefetch { "step" } else { "off" },
                    100.0 * s.hit_rate(),
                    s.misses,
                    paged as f64 / 1048576.0,
                    s.prefetched,
                    s.evictions
                );
                rows.push(serde_json::json!({
                    "pool_percent": pct, "slots": slots, "policy": policy, "prefetch": prefetch,
                    "hit_rate": s.hit_rate(), "misses": s.misses, "hits": s.hits,
                    "bytes_paged": paged, "prefetched": s.prefetched, "evictions": s.evictions,
                    "experts_per_layer_pass": per_pass, "tokens": tokens, "forwards": forwards,
                    "block_experts": params.block_experts,
                }));
            }
        }
    }
    Ok(rows)
}

fn rss_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak-RSS mark (Linux ≥ 4.0), so each live row reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One live decode of every prompt: (tokens, new tokens, seconds).
fn decode<B: Backend>(
    engine: &Engine<B>,
    prompts: &[String],
    params: &DecodeParams,
) -> anyhow::Result<(Vec<Vec<u32>>, usize, f64)> {
    let t0 = std::time::Instant::now();
    let mut all = Vec::new();
    let mut n = 0;
    for p in prompts {
        let mut req = engine.request(Prompt::Text(p.clone()));
        req.decoding = params.clone();
        let out = engine.generate(&req, &mut |_| {})?;
        n += out.stats.new_tokens;
        all.push(out.tokens);
    }
    Ok((all, n, t0.elapsed().as_secs_f64()))
}

/// Live rows on the backend `make` opens (a fresh one per row, so GPU memory starts empty).
fn live_rows<B: PagedLoad>(
    a: &Args,
    file: &Arc<EdmFile>,
    prompts: &[String],
    policies: &[Eviction],
    make: &dyn Fn() -> anyhow::Result<B>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let c = &file.header.metadata.config;
    let all = stored_experts(file);
    let expert_file_bytes: u64 = file
        .header
        .experts
        .iter()
        .map(|t| t.length * t.offsets.iter().flatten().count() as u64)
        .sum();
    let dense_mib =
        (file.file_len() - file.data_start()).saturating_sub(expert_file_bytes) as f64 / 1048576.0;
    let b = make()?;
    println!(
        "live on {}: dense weights {dense_mib:.1} MiB (loaded once), {all} routed experts ({:.1} MiB in the file)",
        b.name(),
        expert_file_bytes as f64 / 1048576.0
    );
    reset_peak_rss();
    reset_peak_gpu_bytes();
    let baseline = Engine::new(b, file.clone())?;
    let params = &a.decoding.params_for(&baseline);
    // The first decode in the process also compiles pipelines (driver caches): warm up first.
    decode(&baseline, &prompts[..1], params)?;
    let (want, n, secs) = decode(&baseline, prompts, params)?;
    drop(baseline);
    let base_peak = rss_kib("VmHWM:").unwrap_or(0);
    let base_gpu = gpu_bytes().1;
    println!();
    println!("| pool | slots | policy | prefetch | read-ahead | tokens/s | hit rate | misses | read MiB | read ahead | stall ms | re-runs | peak RSS MiB | peak GPU MiB | RSS + GPU MiB | pool MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| all resident | {all} | - | - | - | {:.2} | - | - | - | - | - | - | {} | {:.1} | {:.1} | {:.1} |",
        n as f64 / secs,
        base_peak / 1024,
        base_gpu as f64 / 1048576.0,
        (base_peak * 1024 + base_gpu) as f64 / 1048576.0,
        expert_file_bytes as f64 / 1048576.0
    );
    let mut rows = vec![serde_json::json!({
        "live": true, "backend": "all resident", "tokens_per_second": n as f64 / secs,
        "peak_rss_kib": base_peak, "peak_gpu_bytes": base_gpu, "expert_bytes": expert_file_bytes,
    })];
    // Step prefetch and read-ahead are the GPU pool's; the CPU pages on demand only.
    let gpu = std::any::type_name::<B>().contains("Gpu");
    let prefetch_modes: &[bool] = if gpu { &[false, true] } else { &[false] };
    let readers: &[usize] = if gpu { &a.readers } else { &[0] };
    for &pct in &a.pools {
        let slots = ((all as f64 * pct / 100.0).round() as usize).max(c.moe.top_k);
        for &policy in policies {
            for &prefetch in prefetch_modes {
                for &threads in readers {
                    let b = make()?;
                    reset_peak_rss();
                    reset_peak_gpu_bytes();
                    let (model, paging) = b.load_paged(file, slots, policy, prefetch, threads)?;
                    let engine = Engine::with_model(b, model)?;
                    let (got, n, secs) = decode(&engine, prompts, params)?;
                    anyhow::ensure!(
                        got == want,
                        "paged tokens differ from the all-resident ones ({pct}%, {policy:?})"
                    );
                    let s = paging.stats();
                    let peak = rss_kib("VmHWM:").unwrap_or(0);
                    let peak_gpu = gpu_bytes().1;
                    let pool_bytes = paging.pool_bytes(file);
                    println!(
                        "| {pct}% | {slots} | {policy:?} | {} | {threads} | {:.2} | {:.1}% | {} | {:.1} | {} | {:.1} | {} | {} | {:.1} | {:.1} | {:.1} |",
                        if prefetch { "step" } else { "off" },
                        n as f64 / secs,
                        100.0 * s.hit_rate(),
                        s.misses,
                        s.bytes_read as f64 / 1048576.0,
                        s.read_ahead,
                        s.stall.as_secs_f64() * 1e3,
                        s.repasses,
                        peak / 1024,
                        peak_gpu as f64 / 1048576.0,
                        (peak * 1024 + peak_gpu) as f64 / 1048576.0,
                        pool_bytes as f64 / 1048576.0,
                    );
                    rows.push(serde_json::json!({
                        "live": true, "pool_percent": pct, "slots": slots, "policy": policy,
                        "prefetch": prefetch, "readers": threads,
                        "tokens_per_second": n as f64 / secs,
                        "hit_rate": s.hit_rate(), "hits": s.hits, "misses": s.misses,
                        "bytes_read": s.bytes_read, "read_ahead": s.read_ahead,
                        "stall_ms": s.stall.as_secs_f64() * 1e3,
                        "repasses": s.repasses, "prefetched": s.prefetched,
                        "evictions": s.evictions, "peak_rss_kib": peak,
                        "peak_gpu_bytes": peak_gpu, "pool_bytes": pool_bytes,
                        "dense_mib": dense_mib,
                    }));
                }
            }
        }
    }
    Ok(rows)
}
