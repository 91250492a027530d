//! `edgediff synth`

use std::path::PathBuf;

use anyhow::Context;

use crate::format::DType;
use crate::model::Architecture;
use crate::synth::SynthSpec;

#[derive(clap::Args)]
pub struct Args {
    /// Model family.
    #[arg(long, value_parser = ["qwen3_moe", "olmoe", "llada2_moe", "zaya", "diffusion_gemma", "llama", "qwen2", "qwen3"])]
    pub arch: String,
    /// Start from a preset shape: `tiny` (default), `llada2-mini` (LLaDA2.0-mini's shapes),
    /// `zaya1-8b` (ZAYA1-8B's shapes; --arch zaya), `smollm2-135m` (SmolLM2-135M's; --arch llama)
    /// or `26b-a4b` (DiffusionGemma 26B-A4B's; --arch diffusion_gemma).
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "llada2-mini", "zaya1-8b", "smollm2-135m", "26b-a4b"])]
    pub preset: String,
    /// Decoder layers (overrides the preset; likewise every shape flag below).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size (residual stream width).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Query heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (GQA: a divisor of --heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Dimensions per head.
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Routed experts per MoE layer.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts each token is routed to.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Intermediate size of one routed expert.
    #[arg(long)]
    pub expert_ffn: Option<usize>,
    /// Always-on shared experts per MoE layer (LLaDA2).
    #[arg(long)]
    pub shared_experts: Option<usize>,
    /// Leading dense layers.
    #[arg(long)]
    pub dense_layers: Option<usize>,
    /// Intermediate size of the dense MLP layers.
    #[arg(long)]
    pub dense_ffn: Option<usize>,
    /// Model vocabulary (embedding and LM-head rows).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Vocabulary of the trained BPE tokenizer (≤ --vocab).
    #[arg(long)]
    pub tokenizer_vocab: Option<usize>,
    /// Default diffusion block size written into the file (1: an AR model).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Context length the model declares, in positions (a pass's cached + new tokens must fit
    /// it; the presets: 512 for tiny shapes, the real model's otherwise).
    #[arg(long)]
    pub max_position: Option<usize>,
    /// Seed of the random weights (the same seed writes the same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight type of the model file.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "q8", "q4"])]
    pub dtype: String,
    /// Output model file.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Also write the model as a Hugging Face checkpoint (f32 safetensors) into this directory.
    #[arg(long)]
    pub hf_out: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let arch = crate::import::architecture(&a.arch).context("unknown architecture")?;
    let mut s = match a.preset.as_str() {
        "llada2-mini" => SynthSpec {
            arch,
            ..SynthSpec::llada2_mini()
        },
        "zaya1-8b" if arch == Architecture::Zaya => SynthSpec::zaya1_8b(),
        "zaya1-8b" => anyhow::bail!("--preset zaya1-8b goes with --arch zaya"),
        "smollm2-135m" if arch == Architecture::Llama => SynthSpec::smollm2_135m(),
        "smollm2-135m" => anyhow::bail!("--preset smollm2-135m goes with --arch llama"),
        "26b-a4b" if arch == Architecture::DiffusionGemma => SynthSpec::diffusion_gemma_26b_a4b(),
        "26b-a4b" => anyhow::bail!("--preset 26b-a4b goes with --arch diffusion_gemma"),
        _ => SynthSpec::tiny(arch),
    };
    let set = |dst: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    set(&mut s.layers, a.layers);
    set(&mut s.hidden, a.hidden);
    set(&mut s.heads, a.heads);
    set(&mut s.kv_heads, a.kv_heads);
    set(&mut s.head_dim, a.head_dim);
    set(&mut s.experts, a.experts);
    set(&mut s.top_k, a.top_k);
    set(&mut s.expert_ffn, a.expert_ffn);
    set(&mut s.shared_experts, a.shared_experts);
    set(&mut s.dense_layers, a.dense_layers);
    set(&mut s.dense_ffn, a.dense_ffn);
    set(&mut s.vocab, a.vocab);
    set(&mut s.tokenizer_vocab, a.tokenizer_vocab);
    set(&mut s.block_size, a.block_size);
    set(&mut s.max_position, a.max_position);
    s.seed = a.seed;
    if arch == Architecture::Olmoe && a.head_dim.is_none() {
        s.head_dim = s.hidden / s.heads.max(1);
    }
    if a.output.is_none() && a.hf_out.is_none() {
        anyhow::bail!("nothing to write: give -o model.edm and/or --hf-out DIR");
    }
    let model = crate::synth::build(&s).context("building the synthetic model")?;
    if let Some(dir) = &a.hf_out {
        crate::synth::write_hf(&model, dir)
            .with_context(|| format!("writing {}", dir.display()))?;
        println!("wrote Hugging Face checkpoint {}", dir.display());
    }
    if let Some(out) = &a.output {
        let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg)?;
        let bar = super::progress_bar(0, "generating");
        let sum = crate::synth::write_edm(&model, out, dtype, &|d, t| {
            bar.set_length(t);
            bar.set_position(d);
        })
        .with_context(|| format!("writing {}", out.display()))?;
        bar.finish_and_clear();
        let (total, active) = model.meta.config.parameter_counts();
        println!(
            "wrote {} ({}, {} params, {} active per token, {dtype})",
            sum.path.display(),
            super::human_bytes(sum.bytes),
            total,
            active
        );
    }
    Ok(())
}
