//! `edgediff bench decode`: every decoder and commit policy on the same prompts, the AR baseline in
//! the same run, as a Markdown table (tokens/s, forward passes, tokens per forward, TTFT, and the
//! AR NLL of what each decoder wrote as its quality).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::generate::{DecodingArgs, ModelArgs};
use crate::decode::{
    BidirectionalCache, BidirectionalOptions, BlockOptions, CommitPolicy, DecodeParams,
    DecoderKind, Prediction, SpeculativeOptions,
};
use crate::engine::{LoadedEngine, Prompt};
use crate::tokenizer::ChatMessage;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: Bench,
}

#[derive(clap::Subcommand)]
pub enum Bench {
    /// Decoders and commit policies against the AR baseline.
    Decode(DecodeArgs),
    /// Expert paging: hit rate and bytes paged against pool size, eviction policy and prefetch.
    Experts(Box<super::bench_experts::Args>),
    /// GPU kernels: µs, GFLOP/s and GB/s of every op for blocks of 1–64 tokens.
    Kernels(super::bench::KernelsArgs),
    /// GPU forward passes of blocks of 1–64 tokens on a cached context, after the device's
    /// yardsticks (copy bandwidth, dispatch floor, load latency).
    Forward(super::bench::ForwardArgs),
    /// GPU batched passes: S sequences' blocks one after another against one batched pass.
    Batch(super::bench_batch::Args),
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts, one per line (default: a few built-in ones).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Decoding flags: block size, threshold, steps, γ, margin, sampling, --max-tokens… (the
    /// decoder and policy flags are ignored: every combination runs).
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Apply the chat template to each prompt.
    #[arg(long)]
    pub chat: bool,
    /// Stop at EOS (default: generate exactly --max-tokens, so every row does the same work).
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Extra block-diffusion rows with the threshold policy at each of these τ (a sweep of the
    /// speed/agreement trade-off; the model's own τ always runs).
    #[arg(long, value_delimiter = ',')]
    pub thresholds: Vec<f32>,
    /// β of the speculative rows (1 = lossless; below 1 mixes in the diffusion logits).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 0.5])]
    pub betas: Vec<f32>,
}

const BUILTIN_PROMPTS: [&str; 4] = [
    "The quick brown fox",
    "fn main() {\n    let x =",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
];

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.what {
        Bench::Decode(d) => run_decode(d),
        Bench::Experts(e) => super::bench_experts::run(*e),
        Bench::Kernels(k) => super::bench::run_kernels(k),
        Bench::Forward(f) => super::bench::run_forward(f),
        Bench::Batch(b) => super::bench_batch::run(b),
    }
}

struct Row {
    decoder: String,
    policy: String,
    tokens: usize,
    forwards: usize,
    positions: usize,
    ttft: Duration,
    elapsed: Duration,
    same_as_ar: usize,
    /// GPU read-backs (host round trips) and dispatches over the row (0 on the CPU).
    readbacks: u64,
    dispatches: u64,
    /// Sum over prompts of the mean AR NLL per token of the decoder's output (None where the
    /// model has no next-token logits to score with).
    nll: Option<f64>,
}

fn run_decode(a: DecodeArgs) -> anyhow::Result<()> {
    let engine = a.model.load(&a.decoding)?;
    let prompts: Vec<String> = match &a.prompts {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.replace("\\n", "\n"))
            .collect(),
        None => BUILTIN_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    anyhow::ensure!(!prompts.is_empty(), "no prompts to run");
    let base = a.decoding.params(&engine);
    // A canvas model (DiffusionGemma) decodes with its canvas sampler only: no AR row exists to
    // compare with, so its table has the canvas row alone and no "vs AR".
    let canvas_only = matches!(base.decoder, DecoderKind::Canvas(_));
    let configs = if canvas_only {
        vec![base.clone()]
    } else {
        configurations(&engine, &a, &base)
    };
    let prompt_of = |text: &str| {
        if a.chat {
            Prompt::Chat(vec![ChatMessage::user(text)])
        } else {
            Prompt::Text(text.to_string())
        }
    };
    // Every prompt plus --max-tokens must fit the context: checked before anything runs. The ids
    // are kept for the NLL scoring below (the chat template included when --chat).
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|t| engine.encode_prompt(&prompt_of(t)))
        .collect::<Result<_, _>>()?;
    for (i, ids) in encoded.iter().enumerate() {
        a.decoding
            .check_prompt(&engine, &format!("prompt {}", i + 1), ids.len())?;
    }
    // Warm-up: page the weights in before anything is timed.
    let mut warm = engine.request(prompt_of(&prompts[0]));
    warm.decoding = DecodeParams {
        decoder: if canvas_only {
            base.decoder
        } else {
            DecoderKind::Ar
        },
        max_new_tokens: 4.min(base.max_new_tokens),
        ..base.clone()
    };
    engine.generate(&warm, &mut |_| {})?;
    // Quality: every output scored by the same model's AR (causal next-token) logits, so a decoder
    // that commits tokens AR would not have picked pays in NLL. Masked-prediction models have no
    // such yardstick here.
    let score = base.prediction.causal() == Prediction::NextToken;
    let prompt_ids: Vec<Vec<u32>> = if score { encoded } else { Vec::new() };
    let mut ar_tokens: Vec<Vec<u32>> = Vec::new();
    let mut rows = Vec::new();
    for params in &configs {
        let mut row = Row {
            decoder: match params.block_experts {
                Some(n) if params.decoder != DecoderKind::Ar => {
                    format!("{} block-experts {n}", params.decoder.label())
                }
                _ => params.decoder.label(),
            },
            policy: if params.decoder.uses_policy() {
                params.policy.label()
            } else {
                "—".into()
            },
            tokens: 0,
            forwards: 0,
            positions: 0,
            ttft: Duration::ZERO,
            elapsed: Duration::ZERO,
            same_as_ar: 0,
            readbacks: 0,
            dispatches: 0,
            nll: score.then_some(0.0),
        };
        for (i, text) in prompts.iter().enumerate() {
            let mut request = engine.request(prompt_of(text));
            request.decoding = DecodeParams {
                ignore_eos: !a.stop_at_eos,
                ..params.clone()
            };
            let (r0, d0) = crate::backend::gpu::recorder::activity();
            let out = engine
                .generate(&request, &mut |_| {})
                .with_context(|| format!("{} on prompt {}", row.decoder, i + 1))?;
            let (r1, d1) = crate::backend::gpu::recorder::activity();
            row.readbacks += r1 - r0;
            row.dispatches += d1 - d0;
            if let Some(sum) = row.nll.as_mut() {
                *sum += engine
                    .continuation_nll(&prompt_ids[i], &out.tokens)
                    .with_context(|| format!("scoring {} on prompt {}", row.decoder, i + 1))?;
            }
            let s = &out.stats;
            row.tokens += s.new_tokens;
            row.forwards += s.forward_passes;
            row.positions += s.positions_processed;
            row.ttft += s.time_to_first_token.unwrap_or(s.elapsed);
            row.elapsed += s.elapsed;
            if params.decoder == DecoderKind::Ar {
                ar_tokens.push(out.tokens);
            } else if ar_tokens.get(i) == Some(&out.tokens) {
                row.same_as_ar += 1;
            }
        }
        eprintln!("done: {} {}", row.decoder, row.policy);
        rows.push(row);
    }
    print_table(&engine, &a, &base, &prompts, &rows);
    Ok(())
}

/// AR first, then each diffusion decoder with every policy, then the speculative decoder where
/// the model's logits are next-token ones.
fn configurations(engine: &LoadedEngine, a: &DecodeArgs, base: &DecodeParams) -> Vec<DecodeParams> {
    let flags: &DecodingArgs = &a.decoding;
    let defaults = &engine.metadata().decoding;
    let b = flags.block_size.unwrap_or(defaults.block_size).max(1);
    let threshold = flags.threshold.unwrap_or(defaults.threshold);
    let steps = flags.steps.unwrap_or(defaults.steps.min(b)).max(1);
    let policies = [
        CommitPolicy::Threshold { threshold },
        CommitPolicy::FixedSteps { steps },
        CommitPolicy::EntropyBound { gamma: flags.gamma },
        CommitPolicy::Margin {
            margin: flags.margin,
        },
        CommitPolicy::Credit { threshold },
    ];
    let with = |decoder, policy| DecodeParams {
        decoder,
        policy,
        ..base.clone()
    };
    let block = |reuse_last_kv| {
        DecoderKind::Block(BlockOptions {
            block_size: b,
            reuse_last_kv,
        })
    };
    let mut out = vec![with(DecoderKind::Ar, policies[0])];
    out.extend(policies.iter().map(|&p| with(block(false), p)));
    out.push(with(block(true), policies[0]));
    for &threshold in a.thresholds.iter().filter(|&&t| t != threshold) {
        out.push(with(block(false), CommitPolicy::Threshold { threshold }));
    }
    for cache in [
        BidirectionalCache::None,
        BidirectionalCache::Prefix,
        BidirectionalCache::Dual,
    ] {
        let d = DecoderKind::Bidirectional(BidirectionalOptions {
            block_size: b,
            cache,
        });
        out.push(with(d, policies[0]));
    }
    if base.prediction.causal() == Prediction::NextToken {
        for &beta in &a.betas {
            let d = DecoderKind::Speculative(SpeculativeOptions {
                draft_len: flags.block_size.unwrap_or(defaults.draft_len()),
                beta,
            });
            out.push(with(d, policies[0]));
        }
    }
    out
}

fn print_table(
    engine: &LoadedEngine,
    a: &DecodeArgs,
    base: &DecodeParams,
    prompts: &[String],
    rows: &[Row],
) {
    let c = engine.config();
    let model = a
        .model
        .model
        .as_ref()
        .map_or("models/default.edm".to_string(), |p| {
            p.display().to_string()
        });
    println!(
        "`edgediff bench decode` — {model} ({}, {} layers, hidden {}, {} experts top-{}), backend {}, \
         {} prompts × {} new tokens, prediction {:?}, {}, device steps {:?}\n",
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.moe.num_experts,
        c.moe.top_k,
        engine.backend_name(),
        prompts.len(),
        base.max_new_tokens,
        base.prediction,
        if base.sampling.is_greedy() {
            "greedy".to_string()
        } else {
            format!(
                "temperature {} seed {}",
                base.sampling.temperature, base.sampling.seed
            )
        },
        base.device_steps,
    );
    let tps = |r: &Row| r.tokens as f64 / r.elapsed.as_secs_f64().max(1e-9);
    // configurations() puts AR first: every speedup is against it, measured in this same run.
    let canvas_only = matches!(base.decoder, DecoderKind::Canvas(_));
    let ar = rows.first().map_or(1.0, tps);
    if canvas_only {
        println!("No AR baseline: this model decodes with its canvas sampler only (\"vs AR\" and \"= AR\" are left empty)\n");
    } else if let Some(r) = rows.first() {
        println!(
            "AR baseline: {:.1} tokens/s, {} forwards for {} tokens (\"vs AR\" = tokens/s ÷ this; \"= AR\" = prompts whose tokens equal AR's; \"AR NLL\" = mean NLL per token of the output under the model's own AR logits, lower is likelier, AR greedy's is the reference)\n",
            ar, r.forwards, r.tokens
        );
    }
    // GPU only: read-backs are host round trips (each waits for the GPU).
    println!("| decoder | policy | tokens | forwards | tokens/forward | positions | TTFT ms | tokens/s | vs AR | = AR | AR NLL | round trips | dispatches |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in rows.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            r.decoder,
            r.policy,
            r.tokens,
            r.forwards,
            r.tokens as f64 / r.forwards.max(1) as f64,
            r.positions,
            r.ttft.as_secs_f64() * 1e3 / prompts.len() as f64,
            tps(r),
            if canvas_only {
                "—".to_string()
            } else {
                format!("{:.2}×", tps(r) / ar)
            },
            if i == 0 || canvas_only {
                "—".to_string()
            } else {
                format!("{}/{}", r.same_as_ar, prompts.len())
            },
            r.nll.map_or("—".to_string(), |n| format!(
                "{:.3}",
                n / prompts.len() as f64
            )),
            r.readbacks,
            r.dispatches,
        );
    }
}
