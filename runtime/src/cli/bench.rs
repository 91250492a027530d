//! `edgediff bench kernels` and `edgediff bench forward`: the GPU backend measured with GPU
//! timestamps (per dispatch, TIMESTAMP_QUERY) and wall clock, on a real model file or on a
//! synthetic one with LLaDA2.0-mini's shapes (hidden 2048, 16/4 heads of 128, 256 experts top-8 of
//! FFN 512 + 1 shared, dense first layer 5120, vocab 157184) and fewer layers.
//!
//! Both first measure the device's copy bandwidth (read + write bytes per second, the larger of
//! `copy_buffer_to_buffer` and a compute-shader copy — some drivers run buffer copies on a copy
//! engine below the memory's bandwidth): the ceiling a bandwidth-bound pass is judged against.
//! kernels: a dense f16 N×N×N matrix multiply (TFLOP/s), then every op of one layer (dense and
//!   MoE) and the LM head for blocks of 1–64 tokens: GPU µs per call, GFLOP/s and GB/s (weight
//!   bytes read once per call + activations).
//! forward: whole forward passes of blocks of 1–64 tokens on top of a cached context: ms per pass
//!   (submission to statistics on the host), GPU ms (sum of dispatches), tokens/s, and the bytes
//!   the pass must read — every dense weight, the distinct routed experts of the block, the KV
//!   cache — with the effective bandwidth that gives and its share of the copy bandwidth.
//!   Before the passes it also prints the device's yardsticks (backend/gpu/yardsticks.rs): the
//!   dispatch floor (a trivial dispatch behind a barrier, untimed and as the GPU timing measures
//!   it, and the host's µs to record and submit one) and the latency of a dependent load (L2 and
//!   device memory; the far chain allocates up to 256 MiB, capped at the binding limit).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use super::bench_common::{
    breakdown, emit_json, entry_list, shape_list, shapes_json, tally, values, Common, EntryTimes,
    ShapeTimes,
};
use super::limits::check_bench;
use crate::backend::gpu::{CopyBandwidth, GpuBackend, GpuOptions, GpuWeight};
use crate::backend::{AttnMask, Backend};
use crate::format::{DType, EdmFile, TensorView};
use crate::model::{names, ForwardRequest, Model, ModelConfig, Window};
use crate::synth::{self, SynthSpec};

#[derive(clap::Args)]
pub struct KernelsArgs {
    #[command(flatten)]
    pub common: Common,
    /// N of the dense f16 N×N×N matrix multiply (0 skips it).
    #[arg(long, default_value_t = 4096)]
    pub matmul_n: usize,
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub common: Common,
    /// Also list GPU µs by dispatch shape (entry point and workgroup grid), the costliest first:
    /// which matrix of a pass takes the time, where the entry-point list lumps them together
    #[arg(long)]
    pub shapes: bool,
}

/// The model file, its context checked against `--context` and `--tokens` before anything is
/// measured (or the synthetic model written).
pub(super) fn model_file(c: &Common) -> anyhow::Result<Arc<EdmFile>> {
    let path = match &c.model {
        Some(p) => p.clone(),
        None => {
            check_bench(SynthSpec::llada2_mini().max_position, c.context, &c.tokens)?;
            let path = std::env::temp_dir().join(format!(
                "edgediff-bench-llada2-mini-{}l-{}.edm",
                c.layers.max(2),
                c.dtype
            ));
            if !path.exists() {
                let mut spec = SynthSpec::llada2_mini();
                // A dense first layer and at least one MoE layer, so both kinds are measured.
                spec.layers = c.layers.max(2);
                eprintln!(
                    "writing a synthetic {}-layer LLaDA2.0-mini-shaped model ({}) to {}",
                    spec.layers,
                    c.dtype,
                    path.display()
                );
                let m = synth::build(&spec)?;
                let tmp = path.with_extension("partial");
                synth::write_edm(&m, &tmp, c.dtype, &|_, _| {})?;
                std::fs::rename(&tmp, &path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            path
        }
    };
    let file = EdmFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
    check_bench(
        file.header.metadata.config.max_position,
        c.context,
        &c.tokens,
    )?;
    Ok(Arc::new(file))
}

pub(super) fn gpu() -> anyhow::Result<GpuBackend> {
    let g = GpuBackend::new(&GpuOptions::from_env()).context("starting the GPU backend")?;
    eprintln!("device: {}", g.device_name());
    Ok(g)
}

/// Trivial dispatches timed for `bench forward`'s dispatch floor.
const DISPATCH_FLOOR_N: usize = 256;
/// `bench forward`'s load-latency chains: one far under a large GPU's L2, one far over it (or the
/// device's binding limit, if lower), and links a walk.
const LATENCY_NEAR_BYTES: u64 = 4 << 20;
const LATENCY_FAR_BYTES: u64 = 256 << 20;
const LATENCY_STEPS: u32 = 20_000;

/// Copy bandwidth (`None` when skipped), announced on stderr.
fn copy_bandwidth(g: &GpuBackend, c: &Common) -> anyhow::Result<Option<CopyBandwidth>> {
    if c.copy_mib == 0 {
        return Ok(None);
    }
    let bw = g
        .copy_bandwidth(c.copy_mib << 20, c.iters.max(3))
        .context("measuring the copy bandwidth")?;
    eprintln!(
        "copy bandwidth: {} ({} MiB buffers)",
        copy_note(Some(bw)),
        c.copy_mib
    );
    Ok(Some(bw))
}

/// "X GB/s (…)": the device copy bandwidth and how it was found.
fn copy_note(bw: Option<CopyBandwidth>) -> String {
    match bw {
        None => "- GB/s (not measured)".into(),
        Some(b) => format!(
            "{:.1} GB/s (read + write; the larger of a compute-shader copy, {} GB/s, and copy_buffer_to_buffer, {:.1} GB/s)",
            b.best() / 1e9,
            fmt_opt(b.shader_copy.map(|v| v / 1e9), 1),
            b.buffer_copy / 1e9,
        ),
    }
}

fn copy_json(bw: Option<CopyBandwidth>) -> Value {
    json!({
        "copy_gbs": bw.map(|b| b.best() / 1e9),
        "copy_buffer_gbs": bw.map(|b| b.buffer_copy / 1e9),
        "copy_shader_gbs": bw.and_then(|b| b.shader_copy).map(|v| v / 1e9),
    })
}

/// Nanoseconds per call of `op`: (GPU, the sum of its dispatches' timestamps, `None` without
/// TIMESTAMP_QUERY; wall clock), over `iters` calls recorded into one submission.
fn time_op(
    g: &GpuBackend,
    iters: usize,
    mut op: impl FnMut() -> anyhow::Result<()>,
    sync: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<(Option<f64>, f64)> {
    let iters = iters.max(1);
    op()?;
    sync()?;
    let timed = g.start_timing((iters * 64) as u32);
    let t0 = Instant::now();
    for _ in 0..iters {
        op()?;
    }
    sync()?;
    let wall = t0.elapsed().as_secs_f64() * 1e9 / iters as f64;
    let spans = g.finish_timing()?;
    let gpu = timed.then(|| spans.iter().map(|s| s.1).sum::<f64>() / iters as f64);
    Ok((gpu, wall))
}

fn weight_bytes(file: &EdmFile, name: &str) -> u64 {
    file.tensor_entry(name).map_or(0, |t| t.length)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// One measured op of `bench kernels`.
struct KernelRow {
    tokens: usize,
    op: String,
    gpu_ns: Option<f64>,
    wall_ns: f64,
    flops: f64,
    bytes: f64,
}

impl KernelRow {
    /// GPU time when timestamps exist, else wall clock.
    fn ns(&self) -> f64 {
        self.gpu_ns.unwrap_or(self.wall_ns)
    }
    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "op": self.op,
            "gpu_us": self.gpu_ns.map(|v| v / 1e3),
            "wall_us": self.wall_ns / 1e3,
            "flops": self.flops,
            "bytes": self.bytes,
            "gflops": self.flops / self.ns(),
            "gbs": self.bytes / self.ns(),
        })
    }
}

/// The dense f16 N×N×N multiply: an f16 weight [N, N] times N activation rows.
fn dense_matmul(g: &GpuBackend, n: usize, iters: usize) -> anyhow::Result<KernelRow> {
    let w: Vec<u8> = values(n * n, 7)
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let shape = [n, n];
    let w = g.load_weight(TensorView {
        name: "bench.f16",
        dtype: DType::F16,
        shape: &shape,
        bytes: &w,
    })?;
    let x = g.upload_act(n, n, &values(n * n, 8))?;
    let sync = || -> anyhow::Result<()> {
        g.read_act(&x)?;
        Ok(())
    };
    let r = time_op(
        g,
        iters,
        || {
            g.matmul(&w, &x)?;
            Ok(())
        },
        &sync,
    )?;
    // A fast wrong kernel is no result: a few rows of the product against the CPU in f64.
    let y = g.read_act(&g.matmul(&w, &x)?)?;
    let (wv, xv) = (values(n * n, 7), values(n * n, 8));
    let (mut num, mut den) = (0f64, 0f64);
    for r in [0, n / 3, n - 1] {
        for c in 0..n {
            let want: f64 = (0..n)
                .map(|k| half::f16::from_f32(wv[c * n + k]).to_f64() * xv[r * n + k] as f64)
                .sum();
            num += (y[r * n + c] as f64 - want).powi(2);
            den += want * want;
        }
    }
    let err = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    let verdict = if err <= 1e-4 {
        "ok"
    } else {
        "WRONG: above 1e-4"
    };
    Ok(KernelRow {
        tokens: n,
        op: format!(
            "dense matmul f16 {n}×{n}×{n} (3 rows against the CPU: relative L2 {err:.1e}, {verdict})"
        ),
        gpu_ns: r.0,
        wall_ns: r.1,
        flops: 2.0 * (n * n * n) as f64,
        bytes: (n * n * 2 + 2 * n * n * 4) as f64,
    })
}

pub fn run_kernels(a: KernelsArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let file = model_file(c)?;
    let g = gpu()?;
    let copy_bw = copy_bandwidth(&g, c)?;
    let copy = copy_bw.map(|b| b.best());
    let matmul = match a.matmul_n {
        0 => None,
        n => Some(dense_matmul(&g, n, c.iters.min(10)).context("dense f16 matmul")?),
    };
    let cfg: ModelConfig = file.header.metadata.config.clone();
    let (h, l_dense, l_moe) = (
        cfg.hidden_size,
        cfg.dense_layers.first().copied(),
        (0..cfg.num_layers).find(|&l| cfg.is_moe_layer(l)),
    );
    let load = |name: &str| -> anyhow::Result<_> { Ok(g.load_weight(file.tensor(name)?)?) };
    let l_any = l_moe.or(l_dense).unwrap_or(0);
    let n = |l: usize, s: &str| names::layer(l, s);
    let qkv = load(&n(l_any, names::QKV))?;
    let o = load(&n(l_any, names::O))?;
    let norm = load(&n(l_any, names::ATTN_NORM))?;
    let (q_norm, k_norm) = match cfg.qk_norm {
        crate::model::QkNorm::None => (None, None),
        _ => (
            Some(load(&n(l_any, names::Q_NORM))?),
            Some(load(&n(l_any, names::K_NORM))?),
        ),
    };
    let dense = match l_dense {
        Some(l) => Some((
            load(&n(l, names::MLP_GATE_UP))?,
            load(&n(l, names::MLP_DOWN))?,
            weight_bytes(&file, &n(l, names::MLP_GATE_UP))
                + weight_bytes(&file, &n(l, names::MLP_DOWN)),
        )),
        None => None,
    };
    let moe = match l_moe {
        Some(l) => Some((
            l,
            load(&n(l, names::ROUTER))?,
            if cfg.moe.router_bias {
                Some(load(&n(l, names::ROUTER_BIAS))?)
            } else {
                None
            },
            g.load_experts(&file, l, &|_| true)?,
        )),
        None => None,
    };
    let head_name = if cfg.tie_embeddings {
        names::EMBED
    } else {
        names::LM_HEAD
    };
    let head = load(head_name)?;
    let capacity = c.context + c.tokens.iter().max().copied().unwrap_or(1);
    let mut kv = g.new_kv(&cfg, capacity)?;
    let mut rows: Vec<KernelRow> = Vec::new();
    let mut split: Vec<(usize, String, EntryTimes)> = Vec::new();
    for &t in &c.tokens {
        let x = g.upload_act(t, h, &values(t * h, 1))?;
        let sync = || -> anyhow::Result<()> {
            g.read_act(&x)?;
            Ok(())
        };
        let mut row = |op: String, r: (Option<f64>, f64), flops: f64, bytes: f64| {
            rows.push(KernelRow {
                tokens: t,
                op,
                gpu_ns: r.0,
                wall_ns: r.1,
                flops,
                bytes,
            })
        };
        let act = (t * h * 4) as f64;
        let r = time_op(
            &g,
            c.iters,
            || {
                g.rms_norm(&x, &norm, 1e-6)?;
                Ok(())
            },
            &sync,
        )?;
        row("rms_norm".into(), r, 0.0, 2.0 * act);
        let mut mm = |name: &str, w: &GpuWeight, bytes: u64| -> anyhow::Result<()> {
            let xi = g.upload_act(t, w.cols, &values(t * w.cols, 2))?;
            let r = time_op(
                &g,
                c.iters,
                || {
                    g.matmul(w, &xi)?;
                    Ok(())
                },
                &sync,
            )?;
            let flops = 2.0 * (t * w.rows * w.cols) as f64;
            let bytes = bytes as f64 + ((t * (w.rows + w.cols)) * 4) as f64;
            row(
                format!("matmul {name} [{}×{}] {}", w.rows, w.cols, w.dtype),
                r,
                flops,
                bytes,
            );
            Ok(())
        };
        mm("qkv", &qkv, weight_bytes(&file, &n(l_any, names::QKV)))?;
        mm("o", &o, weight_bytes(&file, &n(l_any, names::O)))?;
        let mut qkv_act = g.matmul(&qkv, &x)?;
        let r = time_op(
            &g,
            c.iters,
            || {
                Ok(g.qk_norm_rope(
                    &mut qkv_act,
                    q_norm.as_ref(),
                    k_norm.as_ref(),
                    &cfg,
                    c.context,
                )?)
            },
            &sync,
        )?;
        row(
            "qk_norm_rope".into(),
            r,
            0.0,
            2.0 * (t * cfg.qkv_dim() * 4) as f64,
        );
        let kv_len = c.context + t;
        let r = time_op(
            &g,
            c.iters,
            || {
                g.attention(
                    &qkv_act,
                    &mut kv,
                    l_any,
                    &cfg,
                    c.context,
                    kv_len,
                    AttnMask::BlockCausal(32),
                )?;
                Ok(())
            },
            &sync,
        )?;
        let attn_flops = 4.0 * (t * cfg.num_heads * cfg.head_dim * kv_len) as f64;
        let attn_bytes = 2.0 * (kv_len * cfg.kv_dim() * 4) as f64;
        row(
            format!("attention (kv {kv_len})"),
            r,
            attn_flops,
            attn_bytes,
        );
        if let Some((gu, down, bytes)) = &dense {
            let r = time_op(
                &g,
                c.iters,
                || {
                    g.mlp(gu, down, &x)?;
                    Ok(())
                },
                &sync,
            )?;
            let flops = 2.0 * (t * (gu.rows + down.rows) * gu.cols) as f64;
            row(format!("dense mlp {}", gu.dtype), r, flops, *bytes as f64);
        }
        if let Some((l, router, bias, experts)) = &moe {
            let r = time_op(
                &g,
                c.iters,
                || {
                    g.route(&x, router, bias.as_ref(), &cfg)?;
                    Ok(())
                },
                &sync,
            )?;
            row(
                "route".into(),
                r,
                2.0 * (t * cfg.moe.num_experts * h) as f64,
                weight_bytes(&file, &n(*l, names::ROUTER)) as f64,
            );
            let routing = g.route(&x, router, bias.as_ref(), &cfg)?;
            let (ids, _) = g.routing_to_host(&routing)?;
            let mut distinct = ids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let expert_bytes = file.expert_range(*l, 0).map_or(0, |r| r.1);
            let r = time_op(
                &g,
                c.iters,
                || {
                    g.moe(&x, &routing, experts)?;
                    Ok(())
                },
                &sync,
            )?;
            let parts = breakdown(
                &g,
                || {
                    g.moe(&x, &routing, experts)?;
                    Ok(())
                },
                &sync,
            )?;
            split.push((t, "moe".into(), parts));
            let flops = 2.0 * (ids.len() * 3 * h * cfg.moe.expert_ffn) as f64;
            row(
                format!("moe ({} experts active)", distinct.len()),
                r,
                flops,
                (distinct.len() as u64 * expert_bytes) as f64,
            );
        }
        let r = time_op(
            &g,
            c.iters,
            || {
                g.lm_head_stats(&x, &head, 0..t)?;
                Ok(())
            },
            &|| Ok(()),
        )?;
        let parts = breakdown(
            &g,
            || {
                g.lm_head_stats(&x, &head, 0..t)?;
                Ok(())
            },
            &|| Ok(()),
        )?;
        split.push((t, "lm_head_stats".into(), parts));
        row(
            format!("lm_head_stats [{}×{}] {}", head.rows, head.cols, head.dtype),
            r,
            2.0 * (t * head.rows * head.cols) as f64,
            weight_bytes(&file, head_name) as f64,
        );
    }
    let out = json!({
        "device": g.device_name(),
        "model": file.path().display().to_string(),
        "context": c.context,
        "copy": copy_json(copy_bw),
        "copy_gbs": copy.map(|b| b / 1e9),
        "dense_matmul": matmul.as_ref().map(|m| {
            let mut v = m.json();
            v["tflops"] = json!(m.flops / m.ns() / 1e3);
            v
        }),
        "kernels": rows.iter().map(KernelRow::json).collect::<Vec<_>>(),
        "dispatches": split.iter().map(|(t, op, parts)| json!({
            "tokens": t,
            "op": op,
            "entries": parts.iter().map(|(l, n, us)| json!({"entry": l, "dispatches": n, "gpu_us": us})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if emit_json(c, &out)? {
        return Ok(());
    }
    println!(
        "device: {}\nmodel: {}, context {} tokens, {} iterations\ncopy bandwidth: {}",
        g.device_name(),
        file.path().display(),
        c.context,
        c.iters,
        copy_note(copy_bw),
    );
    if let Some(m) = &matmul {
        println!(
            "{}: {:.2} TFLOP/s ({:.1} µs {}; target ≥ 15 TFLOP/s)",
            m.op,
            m.flops / m.ns() / 1e3,
            m.ns() / 1e3,
            if m.gpu_ns.is_some() { "GPU" } else { "wall" },
        );
    }
    println!(
        "\n| tokens | op | GPU µs | wall µs/call | GFLOP/s | GB/s | % copy BW |\n|---:|---|---:|---:|---:|---:|---:|"
    );
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
            r.tokens,
            r.op,
            fmt_opt(r.gpu_ns.map(|v| v / 1e3), 1),
            r.wall_ns / 1e3,
            r.flops / r.ns(),
            r.bytes / r.ns(),
            fmt_opt(copy.map(|b| 100.0 * r.bytes / r.ns() * 1e9 / b), 0),
        );
    }
    if !split.is_empty() {
        println!("\nGPU µs per entry point, one call (dispatches):");
        for (t, op, parts) in &split {
            let list: Vec<String> = parts
                .iter()
                .map(|(l, n, us)| format!("{l} {us:.1} ({n})"))
                .collect();
            println!("- {t} tokens, {op}: {}", list.join(", "));
        }
    }
    Ok(())
}

/// Bytes a forward pass of `t` tokens after `context` cached ones must read: every dense tensor
/// (the embedding table only for its `t` rows unless it is also the LM head), each MoE layer's
/// distinct routed experts once, and the K and V cache of every layer up to `context + t`.
struct PassBytes {
    dense: u64,
    experts: u64,
    kv: u64,
    /// Distinct routed experts per MoE layer, averaged.
    distinct: f64,
}

fn pass_bytes(
    file: &EdmFile,
    cfg: &ModelConfig,
    t: usize,
    kv_len: usize,
    routing: &[(usize, Vec<u32>, Vec<f32>)],
) -> PassBytes {
    let dense = file
        .header
        .tensors
        .iter()
        .map(|e| {
            if e.name == names::EMBED && !cfg.tie_embeddings {
                (e.length / cfg.vocab_size.max(1) as u64) * t as u64
            } else {
                e.length
            }
        })
        .sum();
    let mut experts = 0;
    let mut distinct_sum = 0usize;
    for (l, ids, _) in routing {
        let mut d = ids.clone();
        d.sort_unstable();
        d.dedup();
        distinct_sum += d.len();
        experts += d
            .iter()
            .map(|&e| file.expert_range(*l, e as usize).map_or(0, |r| r.1))
            .sum::<u64>();
    }
    // The cache is f32 K and V of kv_dim per position per layer.
    let kv = (2 * cfg.num_layers * kv_len * cfg.kv_dim() * 4) as u64;
    PassBytes {
        dense,
        experts,
        kv,
        distinct: distinct_sum as f64 / routing.len().max(1) as f64,
    }
}

/// Host time per forward pass, µs: recording the ops, submitting, waiting for the read-back.
struct HostUs {
    encode: f64,
    submit: f64,
    wait: f64,
}

pub fn run_forward(a: ForwardArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let file = model_file(c)?;
    let g = gpu()?;
    // DiffusionGemma: its encoder and canvas passes (cli/bench_canvas.rs).
    if crate::engine::is_canvas_model(&file.header.metadata.config) {
        return super::bench_canvas::run(c, g, file);
    }
    let copy_bw = copy_bandwidth(&g, c)?;
    let copy = copy_bw.map(|b| b.best());
    // What a kernel of the pass costs before it does anything: the floor its dispatch count sets.
    let floor = g
        .dispatch_floor(DISPATCH_FLOOR_N)
        .context("measuring the dispatch floor")?;
    // And what each dependent round of loads inside a kernel costs.
    let latency = (
        g.load_latency(LATENCY_NEAR_BYTES, LATENCY_STEPS, true)
            .context("measuring the load latency")?,
        g.load_latency(LATENCY_FAR_BYTES, LATENCY_STEPS, false)
            .context("measuring the load latency")?,
    );
    let model = Model::load(&g, file.clone(), &|_, _| true).context("loading the model")?;
    let cfg = model.config.clone();
    let vocab = cfg.vocab_size as u64;
    let capacity = c.context + c.tokens.iter().max().copied().unwrap_or(1);
    let mut kv = model.new_kv(&g, capacity)?;
    let tokens: Vec<u32> = values(capacity, 3)
        .iter()
        .map(|v| ((v.abs() * vocab as f32) as u64 % vocab) as u32)
        .collect();
    let want = ForwardRequest::default();
    let mask = AttnMask::BlockCausal(32);
    let mut at = 0;
    while at < c.context {
        let n = 64.min(c.context - at);
        model.forward(
            &g,
            &mut kv,
            &tokens[at..at + n],
            Window::block(at, n, mask),
            &want,
        )?;
        at += n;
    }
    let mut rows = Vec::new();
    let mut split: Vec<(usize, EntryTimes)> = Vec::new();
    let mut shapes: Vec<(usize, ShapeTimes)> = Vec::new();
    for &t in &c.tokens {
        let block = &tokens[c.context..c.context + t];
        let window = Window::block(c.context, t, mask);
        // The warm-up pass also reports the routing, for the bytes the pass reads.
        let routed = model.forward(
            &g,
            &mut kv,
            block,
            window,
            &ForwardRequest {
                routing: true,
                ..ForwardRequest::default()
            },
        )?;
        let bytes = pass_bytes(&file, &cfg, t, c.context + t, &routed.routing);
        let d0 = g.dispatches();
        let h0 = g.host_times();
        let t0 = Instant::now();
        for _ in 0..c.iters.max(1) {
            model.forward(&g, &mut kv, block, window, &want)?;
        }
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3 / c.iters.max(1) as f64;
        let per = (g.dispatches() - d0) / c.iters.max(1) as u64;
        let h1 = g.host_times();
        let us = |a: u64, b: u64| (b - a) as f64 / 1e3 / c.iters.max(1) as f64;
        let host = HostUs {
            encode: us(h0.encode_ns(), h1.encode_ns()),
            submit: us(h0.submit_ns, h1.submit_ns),
            wait: us(h0.wait_ns, h1.wait_ns),
        };
        // GPU time pass by pass (one query set holds 4096 dispatches).
        let mut gpu_ns = Some(0.0);
        let mut entries: EntryTimes = Vec::new();
        let mut by_shape: ShapeTimes = Vec::new();
        for _ in 0..c.iters.max(1) {
            let timed = g.start_timing(4096);
            model.forward(&g, &mut kv, block, window, &want)?;
            let spans = g.finish_timing_tagged()?;
            gpu_ns = gpu_ns
                .filter(|_| timed)
                .map(|v| v + spans.iter().map(|s| s.1).sum::<f64>());
            for (tag, ns) in spans {
                tally(&mut entries, tag.entry, ns);
                tally(&mut by_shape, tag, ns);
            }
        }
        let n = c.iters.max(1);
        shapes.push((
            t,
            by_shape
                .iter()
                .map(|(tag, d, ns)| (*tag, d / n, ns / 1e3 / n as f64))
                .collect(),
        ));
        split.push((
            t,
            entries
                .iter()
                .map(|(l, d, ns)| (*l, d / n, ns / 1e3 / n as f64))
                .collect(),
        ));
        let gpu_ms = gpu_ns.map(|v| v / 1e6 / c.iters.max(1) as f64);
        rows.push((t, wall_ms, gpu_ms, per, bytes, host));
    }
    let total = |b: &PassBytes| (b.dense + b.experts + b.kv) as f64;
    let gbs = |b: &PassBytes, ms: f64| total(b) / (ms * 1e6);
    let pct = |v: f64| copy.map(|c| 100.0 * v * 1e9 / c);
    {
        let out = json!({
            "device": g.device_name(),
            "model": file.path().display().to_string(),
            "context": c.context,
            "copy": copy_json(copy_bw),
            "copy_gbs": copy.map(|b| b / 1e9),
            "dispatch_floor_us": floor.dependent,
            "dispatch_floor_switching_us": floor.switching,
            "dispatch_floor_timed_us": floor.timed,
            "dispatch_floor_independent_us": floor.independent,
            "host_record_us_per_dispatch": floor.host_record,
            "host_submit_us_per_dispatch": floor.host_submit,
            "load_latency_near_ns": latency.0 .0,
            "load_latency_far_ns": latency.1 .0,
            "load_latency_far_bytes": latency.1 .1,
            "passes": rows.iter().map(|(t, wall, gpu, per, b, host)| json!({
                "tokens": t,
                "wall_ms": wall,
                "gpu_ms": gpu,
                "host_encode_us": host.encode,
                "host_submit_us": host.submit,
                "host_wait_us": host.wait,
                "dispatches": per,
                "tokens_per_s": *t as f64 / wall * 1e3,
                "distinct_experts_per_layer": b.distinct,
                "bytes_dense": b.dense,
                "bytes_experts": b.experts,
                "bytes_kv": b.kv,
                "gbs_wall": gbs(b, *wall),
                "gbs_gpu": gpu.map(|g| gbs(b, g)),
                "pct_copy_wall": pct(gbs(b, *wall)),
                "pct_copy_gpu": gpu.and_then(|g| pct(gbs(b, g))),
            })).collect::<Vec<_>>(),
            "shapes": shapes.iter().map(|(t, parts)| json!({
                "tokens": t,
                "dispatches": shapes_json(parts),
            })).collect::<Vec<_>>(),
        });
        if emit_json(c, &out)? {
            return Ok(());
        }
    }
    println!(
        "device: {}\nmodel: {} ({} layers), context {} tokens, {} iterations\ncopy bandwidth: {}\n\
         dispatch floor: {:.2} µs a dependent dispatch ({:.2} switching between two pipelines), \
         {:.2} µs an independent one ({DISPATCH_FLOOR_N} trivial dispatches in one submission, \
         wall clock; {} µs a dependent one as the kernel timing measures it)\n\
         host: {:.2} µs to record a dispatch, {:.2} µs to submit it (the same chain)\n\
         load latency: {:.0} ns a dependent load over {} MiB read again (cached), {:.0} ns over \
         {} MiB read once (one invocation's chain of loads)\n",
        g.device_name(),
        file.path().display(),
        cfg.num_layers,
        c.context,
        c.iters,
        copy_note(copy_bw),
        floor.dependent,
        floor.switching,
        floor.independent,
        fmt_opt(floor.timed, 2),
        floor.host_record,
        floor.host_submit,
        latency.0 .0,
        latency.0 .1 >> 20,
        latency.1 .0,
        latency.1 .1 >> 20,
    );
    if g.probe() != 0 {
        println!(
            "probe {}: stages left out of the kernels (shaders/lib/probe.wgsl); every value is wrong\n",
            g.probe()
        );
    }
    println!("| tokens | ms / forward | GPU ms | host µs (encode / submit / wait) | dispatches | tokens/s | experts / layer | MB read (dense + experts + KV) | GB/s (wall) | GB/s (GPU) | % copy BW (wall / GPU) |");
    println!("|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|");
    for (t, wall, gpu, per, b, host) in &rows {
        let mb = |v: u64| v as f64 / 1e6;
        println!(
            "| {t} | {wall:.2} | {} | {:.0} / {:.0} / {:.0} | {per} | {:.1} | {:.1} | {:.1} ({:.1} + {:.1} + {:.1}) | {:.1} | {} | {} / {} |",
            fmt_opt(*gpu, 2),
            host.encode,
            host.submit,
            host.wait,
            *t as f64 / wall * 1e3,
            b.distinct,
            total(b) / 1e6,
            mb(b.dense),
            mb(b.experts),
            mb(b.kv),
            gbs(b, *wall),
            fmt_opt(gpu.map(|g| gbs(b, g)), 1),
            fmt_opt(pct(gbs(b, *wall)), 0),
            fmt_opt(gpu.and_then(|g| pct(gbs(b, g))), 0),
        );
    }
    if split.iter().any(|s| !s.1.is_empty()) {
        println!("\nGPU µs per entry point and pass (dispatches per pass):");
        for (t, parts) in &split {
            println!("- {t} tokens: {}", entry_list(parts));
        }
    }
    if a.shapes && shapes.iter().any(|s| !s.1.is_empty()) {
        println!(
            "\nGPU µs per dispatch shape and pass (entry [workgroups x×y×z], dispatches per pass):"
        );
        for (t, parts) in &shapes {
            println!("- {t} tokens: {}", shape_list(parts));
        }
    }
    Ok(())
}
