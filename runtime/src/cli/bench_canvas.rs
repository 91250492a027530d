//! `edgediff bench forward` for a canvas model (DiffusionGemma): its two passes on the GPU after
//! `--context` cached positions — the encoder over `t` committed tokens (causal; as the decoder runs
//! it, without LM-head rows) and a denoising
//! pass over a canvas of `t` (bidirectional, reading the cache) with the statistics only; then the
//! sampler's whole step, self-conditioned on the step before, two ways side by side: the host
//! sampler as it ran before 252c6c6 (`[t, vocab]` logits read back, tempered, drawn and sent up
//! again) and the step's head on the device (`Backend::canvas_head`, what the decoder runs now).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use super::bench_common::{breakdown, emit_json, entry_list, values, Common, EntryTimes};
use crate::backend::gpu::GpuBackend;
use crate::format::EdmFile;
use crate::model::canvas::CanvasModel;
use crate::model::ForwardRequest;

/// One timed pass kind at one size.
struct Row {
    tokens: usize,
    pass: &'static str,
    wall_ms: f64,
    dispatches: u64,
    /// GPU µs per entry point over one pass (empty without timestamp queries).
    parts: EntryTimes,
}

pub fn run(c: &Common, g: GpuBackend, file: Arc<EdmFile>) -> anyhow::Result<()> {
    let model = CanvasModel::load(&g, file.clone()).context("loading the canvas model")?;
    let cfg = model.config.clone();
    let vocab = cfg.vocab_size as u64;
    let most = c.tokens.iter().max().copied().unwrap_or(1);
    let capacity = c.context + most;
    let mut kv = model.new_kv(&g, capacity)?;
    let tokens: Vec<u32> = values(capacity, 3)
        .iter()
        .map(|v| ((v.abs() * vocab as f32) as u64 % vocab) as u32)
        .collect();
    let stats = ForwardRequest::default();
    // The encoder pass as the canvas decoder runs it: the cache only, no LM-head rows.
    let encode_only = ForwardRequest {
        rows: Some(0..0),
        ..Default::default()
    };
    let logits = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    let mut at = 0;
    while at < c.context {
        let n = 256.min(c.context - at);
        model.encode(&g, &mut kv, &tokens[at..at + n], at, &stats)?;
        at += n;
    }
    let iters = c.iters.max(1);
    let mut rows = Vec::new();
    for &t in &c.tokens {
        let block = &tokens[c.context..c.context + t];
        let u: Vec<f32> = values(t, 5).iter().map(|v| v.abs().fract()).collect();
        let temperature = 0.6;
        // The self-conditioning input each step kind carries to its next step.
        let mut host_logits: Option<Vec<f32>> = None;
        let mut device_soft = None;
        let mut run = |kv: &mut _, pass: usize| -> anyhow::Result<()> {
            match pass {
                0 => {
                    model.encode(&g, kv, block, c.context, &encode_only)?;
                }
                1 => {
                    model.denoise(&g, kv, block, c.context, None, &stats)?;
                }
                2 => {
                    let out =
                        model.denoise(&g, kv, block, c.context, host_logits.as_deref(), &logits)?;
                    let tempered: Vec<f32> = out
                        .logits
                        .context("the pass returned no logits")?
                        .iter()
                        .map(|l| l / temperature)
                        .collect();
                    for (row, &ui) in tempered.chunks(cfg.vocab_size).zip(&u) {
                        std::hint::black_box(crate::backend::draw::row_draw(row, ui));
                    }
                    host_logits = Some(tempered);
                }
                _ => {
                    let (draws, soft) = model.denoise_step(
                        &g,
                        kv,
                        block,
                        c.context,
                        device_soft.as_ref(),
                        temperature,
                        &u,
                        true,
                    )?;
                    std::hint::black_box(draws);
                    device_soft = soft;
                }
            }
            Ok(())
        };
        for (i, pass) in [
            "encode",
            "denoise (stats)",
            "canvas step, host sampler (before)",
            "canvas step, device head",
        ]
        .into_iter()
        .enumerate()
        {
            run(&mut kv, i)?; // warm-up (and the first self-conditioning input)
            let d0 = g.dispatches();
            let t0 = Instant::now();
            for _ in 0..iters {
                run(&mut kv, i)?;
            }
            let wall_ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let dispatches = (g.dispatches() - d0) / iters as u64;
            // Every pass reads something back at its end: no other wait is needed.
            let parts = breakdown(&g, || run(&mut kv, i), &|| Ok(()))?;
            rows.push(Row {
                tokens: t,
                pass,
                wall_ms,
                dispatches,
                parts,
            });
        }
    }
    let out = json!({
        "device": g.device_name(),
        "model": file.path().display().to_string(),
        "architecture": cfg.architecture.hf_name(),
        "context": c.context,
        "passes": rows.iter().map(|r| json!({
            "tokens": r.tokens,
            "pass": r.pass,
            "wall_ms": r.wall_ms,
            "dispatches": r.dispatches,
            "tokens_per_s": r.tokens as f64 / r.wall_ms * 1e3,
            "gpu_us": r.parts.iter().map(|(l, n, us)| json!({
                "entry": l, "dispatches": n, "us": us,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if emit_json(c, &out)? {
        return Ok(());
    }
    println!(
        "device: {}\nmodel: {} ({}, {} layers), context {} tokens, {} iterations\n",
        g.device_name(),
        file.path().display(),
        cfg.architecture.hf_name(),
        cfg.num_layers,
        c.context,
        iters,
    );
    println!("| tokens | pass | ms / pass | dispatches | tokens/s |\n|---:|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {} | {:.1} |",
            r.tokens,
            r.pass,
            r.wall_ms,
            r.dispatches,
            r.tokens as f64 / r.wall_ms * 1e3
        );
    }
    if rows.iter().any(|r| !r.parts.is_empty()) {
        println!("\nGPU µs per entry point, one pass (dispatches):");
        for r in &rows {
            println!(
                "- {} tokens, {}: {}",
                r.tokens,
                r.pass,
                entry_list(&r.parts)
            );
        }
    }
    Ok(())
}
