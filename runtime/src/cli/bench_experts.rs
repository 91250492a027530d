//! `edgediff bench experts`: hit rate and bytes paged against expert-pool size, eviction policy
//! and step prefetch. One decode records the routing trace (paging is exact, so the trace is the
//! same for every pool); each configuration replays it through the real pager.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;

use super::generate::{resolve_model, DecodingArgs};
use crate::backend::cpu::{CpuBackend, CpuExpertPool, CpuExperts};
use crate::engine::{Engine, LoadedEngine, Prompt};
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
}

const BUILTIN_PROMPTS: [&str; 3] = ["fn main() {", "The history of the town", "def parse(path):"];

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = resolve_model(a.model.as_deref())?;
    let file =
        Arc::new(EdmFile::open(&path).with_context(|| format!("opening {}", path.display()))?);
    let c = file.header.metadata.config.clone();
    let moe_layers = file.header.experts.len();
    anyhow::ensure!(moe_layers > 0, "the model has no MoE layers");
    let all = moe_layers * c.moe.num_experts;
    let expert_bytes = file.header.experts[0].length;
    let policies = a
        .policies
        .iter()
        .map(|p| p.parse::<Eviction>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
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
    let prompts: Vec<String> = match &a.prompts {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        None => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    let (mut tokens, mut forwards, t0) = (0, 0, std::time::Instant::now());
    for p in &prompts {
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
        for &policy in &policies {
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
                }));
            }
        }
    }
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
