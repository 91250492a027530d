//! `bench batch`: what a batched pass saves on the GPU. S sequences, each with its own KV cache
//! holding `--context` positions, each run a pass of t tokens (a diffusion block at t > 1): the S
//! passes one after another (as without batching), then the same passes as one batched pass
//! (`Model::forward_batch`, as the server's batcher runs them). Reports milliseconds, aggregate
//! tokens/s and dispatches of both, and whether every sequence's statistics came out of the
//! batched pass bit for bit as alone. The batched pass runs twice: with every sequence's cache in
//! buffers of its own (attention one sequence at a time) and with the caches as ranges of one KV
//! arena (`Backend::reserve_kv`, as the server keeps them: one attention dispatch for all). Passes
//! the backend keeps apart (no batch class, e.g. under `EDGEDIFF_BATCH_BLOCKS=0`) are reported as
//! such.

use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::bench_common::{emit_json, shape_list, shapes_json, tally, values, Common, ShapeTimes};
use crate::backend::gpu::GpuBackend;
use crate::backend::{AttnMask, Backend};
use crate::model::{ForwardOutput, ForwardRequest, Model, SeqPass, Window};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// Sequences per batched pass.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
    pub sequences: Vec<usize>,
    /// Also list GPU µs by dispatch shape (entry point and workgroup grid) of one batched pass
    /// (the arena's where there is one) at each point, or of the pass alone for one sequence
    #[arg(long)]
    pub shapes: bool,
    /// Each pass wants only its last row's statistics, as an AR step on a diffusion model does
    /// (two rows: the token it commits, then the mask whose logits it reads), instead of every
    /// row's: the LM head then runs over one row a sequence, as in `edgediff serve`
    #[arg(long)]
    pub last_row: bool,
}

/// One (tokens, sequences) point.
struct Point {
    tokens: usize,
    sequences: usize,
    alone_ms: f64,
    /// `None`: the passes do not share a batched pass on this backend.
    batched_ms: Option<f64>,
    alone_dispatches: u64,
    batched_dispatches: Option<u64>,
    /// The batched pass over caches in one arena.
    arena_ms: Option<f64>,
    arena_dispatches: Option<u64>,
    exact: Option<bool>,
    /// `--shapes`: GPU µs by dispatch shape of one pass at this point.
    shapes: ShapeTimes,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.common;
    let file = super::bench::model_file(c)?;
    let g = super::bench::gpu()?;
    let model = Model::load(&g, file.clone(), &|_, _| true).context("loading the model")?;
    let vocab = model.config.vocab_size as u64;
    let most = a.sequences.iter().copied().max().unwrap_or(1).max(1);
    let capacity = c.context + c.tokens.iter().copied().max().unwrap_or(1);
    // Every sequence its own tokens (its context, then its blocks).
    let tokens: Vec<Vec<u32>> = (0..most)
        .map(|s| {
            values(capacity, 3 + s as u64)
                .iter()
                .map(|v| ((v.abs() * vocab as f32) as u64 % vocab) as u32)
                .collect()
        })
        .collect();
    let mask = AttnMask::BlockCausal(32);
    let prefill = |kv: &mut _, t: &[u32]| -> anyhow::Result<()> {
        let mut at = 0;
        while at < c.context {
            let n = 64.min(c.context - at);
            let w = Window::block(at, n, mask);
            model.forward(&g, kv, &t[at..at + n], w, &ForwardRequest::default())?;
            at += n;
        }
        Ok(())
    };
    let mut kvs = Vec::with_capacity(most);
    for t in &tokens {
        let mut kv = model.new_kv(&g, capacity)?;
        prefill(&mut kv, t)?;
        kvs.push(kv);
    }
    // The same caches again, as ranges of one arena (0 positions: the model keeps its own).
    let reserved = g.reserve_kv(&model.config, most * capacity)?;
    let mut arena_kvs = Vec::with_capacity(most);
    if reserved > 0 {
        for t in &tokens {
            let mut kv = model.new_kv(&g, capacity)?;
            prefill(&mut kv, t)?;
            arena_kvs.push(kv);
        }
    }
    g.reserve_kv(&model.config, 0)?;
    let iters = c.iters.max(1);
    let mut points = Vec::new();
    for &t in &c.tokens {
        let want = ForwardRequest {
            rows: a.last_row.then(|| t.saturating_sub(1)..t),
            ..ForwardRequest::default()
        };
        let window = Window::block(c.context, t, mask);
        let block = |s: usize| &tokens[s][c.context..c.context + t];
        for &n in &a.sequences {
            let n = n.max(1);
            let alone = |kv: &mut [_]| -> anyhow::Result<Vec<ForwardOutput>> {
                kv.iter_mut()
                    .enumerate()
                    .map(|(s, kv)| Ok(model.forward(&g, kv, block(s), window, &want)?))
                    .collect()
            };
            let batched = |kv: &mut [_]| -> anyhow::Result<Vec<ForwardOutput>> {
                let mut passes: Vec<SeqPass<'_, GpuBackend>> = kv
                    .iter_mut()
                    .enumerate()
                    .map(|(s, kv)| SeqPass {
                        kv,
                        tokens: block(s),
                        window,
                        want: &want,
                    })
                    .collect();
                Ok(model.forward_batch(&g, &mut passes)?)
            };
            // Milliseconds and dispatches of `f` a time, and whether its first outputs equal alone's.
            let time = |f: &dyn Fn(&mut [_]) -> anyhow::Result<Vec<ForwardOutput>>,
                        kv: &mut [_],
                        reference: &[ForwardOutput]|
             -> anyhow::Result<(f64, u64, bool)> {
                let outs = f(kv)?; // also the warm-up
                let exact = outs.iter().zip(reference).all(|(b, a)| b.stats == a.stats);
                let d0 = g.dispatches();
                let t0 = Instant::now();
                for _ in 0..iters {
                    f(kv)?;
                }
                let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
                Ok((ms, (g.dispatches() - d0) / iters as u64, exact))
            };
            // GPU µs by dispatch shape of one call of `f` (empty without timestamps).
            let shapes_of = |f: &dyn Fn(&mut [_]) -> anyhow::Result<Vec<ForwardOutput>>,
                             kv: &mut [_]|
             -> anyhow::Result<ShapeTimes> {
                let mut out = ShapeTimes::new();
                if a.shapes && g.start_timing(4096) {
                    f(kv)?;
                    for (tag, ns) in g.finish_timing_tagged()? {
                        tally(&mut out, tag, ns / 1e3);
                    }
                }
                Ok(out)
            };
            let reference = alone(&mut kvs[..n])?;
            let (alone_ms, alone_dispatches, _) = time(&alone, &mut kvs[..n], &reference)?;
            let shares = n > 1 && model.batch_class(&g, t, &want).is_some();
            let mut point = Point {
                tokens: t,
                sequences: n,
                alone_ms,
                batched_ms: None,
                alone_dispatches,
                batched_dispatches: None,
                arena_ms: None,
                arena_dispatches: None,
                exact: None,
                shapes: ShapeTimes::new(),
            };
            if shares {
                let (ms, d, exact) = time(&batched, &mut kvs[..n], &reference)?;
                (point.batched_ms, point.batched_dispatches) = (Some(ms), Some(d));
                let mut all_exact = exact;
                if !arena_kvs.is_empty() {
                    let (ms, d, exact) = time(&batched, &mut arena_kvs[..n], &reference)?;
                    (point.arena_ms, point.arena_dispatches) = (Some(ms), Some(d));
                    all_exact &= exact;
                }
                point.exact = Some(all_exact);
                point.shapes = match arena_kvs.is_empty() {
                    true => shapes_of(&batched, &mut kvs[..n])?,
                    false => shapes_of(&batched, &mut arena_kvs[..n])?,
                };
            } else if n == 1 {
                point.shapes = shapes_of(&alone, &mut kvs[..1])?;
            }
            points.push(point);
        }
    }
    let rate = |p: &Point, ms: f64| (p.tokens * p.sequences) as f64 / ms * 1e3;
    let out = json!({
        "device": g.device_name(),
        "model": file.path().display().to_string(),
        "context": c.context,
        "last_row": a.last_row,
        "points": points.iter().map(|p| json!({
            "tokens": p.tokens,
            "sequences": p.sequences,
            "alone_ms": p.alone_ms,
            "batched_ms": p.batched_ms,
            "alone_tokens_per_s": rate(p, p.alone_ms),
            "batched_tokens_per_s": p.batched_ms.map(|ms| rate(p, ms)),
            "alone_dispatches": p.alone_dispatches,
            "batched_dispatches": p.batched_dispatches,
            "arena_ms": p.arena_ms,
            "arena_tokens_per_s": p.arena_ms.map(|ms| rate(p, ms)),
            "arena_dispatches": p.arena_dispatches,
            "exact": p.exact,
            "shapes": shapes_json(&p.shapes),
        })).collect::<Vec<_>>(),
    });
    if emit_json(c, &out)? {
        return Ok(());
    }
    println!(
        "{} on {}, {} cached positions a sequence; {}\n",
        file.path().display(),
        g.device_name(),
        c.context,
        if a.last_row {
            "each pass wants its last row's statistics (as an AR step)"
        } else {
            "each pass wants every row's statistics"
        }
    );
    println!("| tokens a pass | sequences | one after another: ms / tokens/s / dispatches | batched, own caches | batched, one KV arena | speed-up (arena vs one after another) | batched = alone |");
    println!("|---:|---:|---|---|---|---:|---|");
    let cell = |p: &Point, ms: Option<f64>, d: Option<u64>| match (ms, d) {
        (Some(ms), Some(d)) => format!("{ms:.2} / {:.0} / {d}", rate(p, ms)),
        _ => "—".into(),
    };
    for p in &points {
        let alone = cell(p, Some(p.alone_ms), Some(p.alone_dispatches));
        let best = p.arena_ms.or(p.batched_ms);
        let (batched, arena, speedup, exact) = match (best, p.exact) {
            (Some(ms), Some(e)) => (
                cell(p, p.batched_ms, p.batched_dispatches),
                cell(p, p.arena_ms, p.arena_dispatches),
                format!("{:.2}×", p.alone_ms / ms),
                if e { "yes" } else { "NO" }.to_string(),
            ),
            _ if p.sequences == 1 => ("—".into(), "—".into(), "—".into(), "—".into()),
            _ => (
                "apart (no batch class)".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ),
        };
        println!(
            "| {} | {} | {alone} | {batched} | {arena} | {speedup} | {exact} |",
            p.tokens, p.sequences
        );
    }
    if points.iter().any(|p| !p.shapes.is_empty()) {
        println!("\nGPU µs by dispatch shape of one pass (entry [workgroups x×y×z], dispatches):");
        for p in points.iter().filter(|p| !p.shapes.is_empty()) {
            println!(
                "- {} tokens × {} sequences: {}",
                p.tokens,
                p.sequences,
                shape_list(&p.shapes)
            );
        }
    }
    if points.iter().any(|p| p.exact == Some(false)) {
        anyhow::bail!("a batched pass differed from its passes alone");
    }
    Ok(())
}
