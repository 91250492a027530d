//! Records and enums that cross the boundary: thin mirrors of the runtime's types, converted with
//! `From`. Counts are `u32`/`u64` (Kotlin and Swift have no `usize`), durations milliseconds.

use std::time::Duration;

use edgediff::decode::{
    BidirectionalCache, BidirectionalOptions, BlockOptions, CanvasOptions, CommitPolicy,
    DecoderDetails, DecoderKind, FinishReason, SpeculativeOptions,
};
use edgediff::engine::{self, BackendChoice};
use edgediff::model::ModelConfig;

/// Which compute adapter runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, uniffi::Enum)]
pub enum AdapterPreference {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Gpu,
}

impl From<AdapterPreference> for BackendChoice {
    fn from(a: AdapterPreference) -> Self {
        match a {
            AdapterPreference::Auto => BackendChoice::Auto,
            AdapterPreference::Cpu => BackendChoice::Cpu,
            AdapterPreference::Gpu => BackendChoice::Gpu,
        }
    }
}

/// How to open a model.
#[derive(Clone, Debug, Default, uniffi::Record)]
pub struct EngineConfig {
    /// Upper bound on the bytes of routed experts kept in memory (None: all of them).
    #[uniffi(default)]
    pub expert_memory_budget: Option<u64>,
    /// A routing profile (`edgediff profile`) of this model: only the experts it selects stay in
    /// memory (pruning at load time; the others are never read, and the output changes).
    #[uniffi(default)]
    pub resident_profile_path: Option<String>,
    /// With `resident_profile_path`: experts kept per MoE layer, "25%" (the default), a count
    /// ("32") or a byte budget for the whole model ("1.5GB").
    #[uniffi(default)]
    pub resident_keep: Option<String>,
    /// Block-level expert routing: every token of a block routes only within the N experts per
    /// MoE layer with the largest router mass over the block (fewer experts to page; the output
    /// changes). At least the model's top-k; None routes exactly.
    #[uniffi(default)]
    pub block_experts: Option<u32>,
    #[uniffi(default)]
    pub adapter: Option<AdapterPreference>,
    /// A directory the app owns for compiled GPU pipelines (Android: `context.cacheDir`, iOS:
    /// the Caches directory). Launches after the first build their kernels from it instead of
    /// compiling each one before the first token; many phone drivers keep no such cache of their
    /// own. It holds only files edgediff writes and rewrites; None keeps none. Process-wide: the
    /// last engine loaded with one sets it.
    #[uniffi(default)]
    pub pipeline_cache_dir: Option<String>,
}

/// What a model is, read from its header.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ModelInfo {
    /// The family (`llada2_moe`, `qwen3_moe`, `olmoe`).
    pub architecture: String,
    pub params_total: u64,
    /// Parameters touched per token (dense + top-k routed + shared experts).
    pub params_active: u64,
    pub vocab_size: u32,
    /// Longest prompt + generation, in positions.
    pub context_length: u32,
    /// Default diffusion block size (1: autoregressive).
    pub block_size: u32,
    pub num_layers: u32,
    pub hidden_size: u32,
    /// Routed experts per MoE layer.
    pub num_experts: u32,
    /// Experts routed per token.
    pub experts_per_token: u32,
    /// The compute backend the engine runs on (`cpu`, or the GPU adapter's name).
    pub backend: String,
}

impl ModelInfo {
    pub(crate) fn new(
        config: &ModelConfig,
        decoding: &edgediff::format::DecodingDefaults,
        backend: String,
    ) -> Self {
        let (params_total, params_active) = config.parameter_counts();
        ModelInfo {
            architecture: config.architecture.to_string(),
            params_total,
            params_active,
            vocab_size: to_u32(config.vocab_size),
            context_length: to_u32(config.max_position),
            block_size: to_u32(decoding.block_size),
            num_layers: to_u32(config.num_layers),
            hidden_size: to_u32(config.hidden_size),
            num_experts: to_u32(config.moe.num_experts),
            experts_per_token: to_u32(config.moe.top_k),
            backend,
        }
    }
}

/// Which decoder runs a generation (`DecoderKind`).
#[derive(Clone, Copy, Debug, PartialEq, uniffi::Enum)]
pub enum Decoder {
    /// Block diffusion with an exact KV cache of committed blocks.
    Block { block_size: u32 },
    /// LLaDA-style masked diffusion with Fast-dLLM's prefix or dual cache.
    Bidirectional {
        block_size: u32,
        cache: BidirectionalCacheMode,
    },
    /// TiDAR-style self-speculation; `beta` 1 is lossless, below mixes AR and diffusion logits.
    Speculative { draft_len: u32, beta: f32 },
    /// One token per forward pass.
    Autoregressive,
    /// DiffusionGemma's uniform-noise canvas sampler (the default, and the only decoder, of a
    /// DiffusionGemma model; no other model runs it): each canvas of the model's length starts as
    /// random tokens and is denoised for at most `steps` steps, the temperature falling from
    /// `t_max` towards `t_min`, accepting the lowest-entropy prefix within `entropy_bound`. A
    /// setting left out keeps the model file's (its generation_config, else transformers').
    Canvas {
        #[uniffi(default)]
        steps: Option<u32>,
        #[uniffi(default)]
        entropy_bound: Option<f32>,
        #[uniffi(default)]
        t_max: Option<f32>,
        #[uniffi(default)]
        t_min: Option<f32>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum BidirectionalCacheMode {
    None,
    Prefix,
    Dual,
}

impl Decoder {
    /// The runtime's decoder; the canvas sampler's settings left out come from `default`, the
    /// model's default decoder (transformers' defaults when that is not the canvas sampler, which
    /// the engine then refuses with a typed error: only a canvas model runs it).
    pub(crate) fn kind(self, default: &DecoderKind) -> DecoderKind {
        let Decoder::Canvas {
            steps,
            entropy_bound,
            t_max,
            t_min,
        } = self
        else {
            return self.into();
        };
        let mut o = match default {
            DecoderKind::Canvas(o) => *o,
            _ => CanvasOptions::default(),
        };
        o.steps = steps.map_or(o.steps, |n| n as usize);
        o.entropy_bound = entropy_bound.unwrap_or(o.entropy_bound);
        o.t_max = t_max.unwrap_or(o.t_max);
        o.t_min = t_min.unwrap_or(o.t_min);
        DecoderKind::Canvas(o)
    }
}

impl From<Decoder> for DecoderKind {
    /// The canvas sampler with transformers' defaults for what is left out ([`Decoder::kind`]
    /// takes the model's).
    fn from(d: Decoder) -> Self {
        match d {
            Decoder::Block { block_size } => DecoderKind::Block(BlockOptions {
                block_size: block_size as usize,
                reuse_last_kv: false,
            }),
            Decoder::Bidirectional { block_size, cache } => {
                DecoderKind::Bidirectional(BidirectionalOptions {
                    block_size: block_size as usize,
                    cache: match cache {
                        BidirectionalCacheMode::None => BidirectionalCache::None,
                        BidirectionalCacheMode::Prefix => BidirectionalCache::Prefix,
                        BidirectionalCacheMode::Dual => BidirectionalCache::Dual,
                    },
                })
            }
            Decoder::Speculative { draft_len, beta } => {
                DecoderKind::Speculative(SpeculativeOptions {
                    draft_len: draft_len as usize,
                    beta,
                })
            }
            Decoder::Autoregressive => DecoderKind::Ar,
            Decoder::Canvas { .. } => d.kind(&DecoderKind::Ar),
        }
    }
}

/// Which predicted positions a diffusion step commits (`CommitPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, uniffi::Enum)]
pub enum CommitRule {
    Threshold { threshold: f32 },
    FixedSteps { steps: u32 },
    EntropyBound { gamma: f32 },
    Margin { margin: f32 },
    Credit { threshold: f32 },
}

impl From<CommitRule> for CommitPolicy {
    fn from(r: CommitRule) -> Self {
        match r {
            CommitRule::Threshold { threshold } => CommitPolicy::Threshold { threshold },
            CommitRule::FixedSteps { steps } => CommitPolicy::FixedSteps {
                steps: steps as usize,
            },
            CommitRule::EntropyBound { gamma } => CommitPolicy::EntropyBound { gamma },
            CommitRule::Margin { margin } => CommitPolicy::Margin { margin },
            CommitRule::Credit { threshold } => CommitPolicy::Credit { threshold },
        }
    }
}

/// One generation's settings; every field left out keeps the model file's default.
#[derive(Clone, Debug, Default, PartialEq, uniffi::Record)]
pub struct GenerationConfig {
    /// New tokens at most (None: the runtime's default).
    #[uniffi(default)]
    pub max_new_tokens: Option<u32>,
    /// Keep going past the end-of-sequence token (fixed-length benchmarks).
    #[uniffi(default)]
    pub ignore_eos: bool,
    /// Render the prompt as one user turn through the model's chat template.
    #[uniffi(default)]
    pub chat: bool,
    #[uniffi(default)]
    pub decoder: Option<Decoder>,
    #[uniffi(default)]
    pub commit: Option<CommitRule>,
    /// 0 (the default) is greedy.
    #[uniffi(default)]
    pub temperature: Option<f32>,
    #[uniffi(default)]
    pub top_k: Option<u32>,
    #[uniffi(default)]
    pub top_p: Option<f32>,
    #[uniffi(default)]
    pub seed: Option<u64>,
    /// Generation ends before the first of these; the text stops short of it.
    #[uniffi(default)]
    pub stop: Vec<String>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum FinishReasonKind {
    /// The model produced its end-of-sequence token.
    Eos,
    /// `max_new_tokens` reached.
    Length,
    /// A stop string matched.
    Stop,
    /// `TaskHandle.cancel()` (or the handle's release) ended it.
    Cancelled,
}

impl From<FinishReason> for FinishReasonKind {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Eos => FinishReasonKind::Eos,
            FinishReason::Length => FinishReasonKind::Length,
            FinishReason::Stop => FinishReasonKind::Stop,
            FinishReason::Cancelled => FinishReasonKind::Cancelled,
        }
    }
}

/// Counters of one finished generation (`GenerationStats` + its finish reason).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationStats {
    pub finish_reason: FinishReasonKind,
    pub prompt_tokens: u32,
    pub new_tokens: u32,
    /// Forward passes, the prompt's included.
    pub forward_passes: u32,
    /// Σ tokens over all forward passes.
    pub positions_processed: u64,
    /// new_tokens / forward_passes: the diffusion speedup over AR (1).
    pub tokens_per_forward: f64,
    pub time_to_first_token_ms: Option<f64>,
    pub elapsed_ms: f64,
    pub tokens_per_second: f64,
    /// The decoder with its counters, e.g. `block: 4 blocks, 19 steps`.
    pub decoder: String,
}

impl GenerationStats {
    pub(crate) fn new(s: &engine::GenerationStats, finish: FinishReason) -> Self {
        GenerationStats {
            finish_reason: finish.into(),
            prompt_tokens: to_u32(s.prompt_tokens),
            new_tokens: to_u32(s.new_tokens),
            forward_passes: to_u32(s.forward_passes),
            positions_processed: s.positions_processed as u64,
            tokens_per_forward: s.tokens_per_forward,
            time_to_first_token_ms: s.time_to_first_token.map(millis),
            elapsed_ms: millis(s.elapsed),
            tokens_per_second: s.tokens_per_second,
            decoder: describe(&s.decoder),
        }
    }
}

/// A whole generation at once (`generate_async`).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationResult {
    pub text: String,
    /// Generated ids (EOS left out).
    pub tokens: Vec<u32>,
    pub stats: GenerationStats,
}

impl From<engine::GenerationOutput> for GenerationResult {
    fn from(o: engine::GenerationOutput) -> Self {
        GenerationResult {
            stats: GenerationStats::new(&o.stats, o.finish_reason),
            text: o.text,
            tokens: o.tokens,
        }
    }
}

/// What an engine has done since it was loaded.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct EngineStats {
    pub backend: String,
    /// Generations finished (cancelled ones included, failed ones not).
    pub generations: u64,
    pub tokens_generated: u64,
    /// The most recent finished generation.
    pub last: Option<GenerationStats>,
}

fn describe(d: &DecoderDetails) -> String {
    match *d {
        DecoderDetails::Block { blocks, steps } => format!("block: {blocks} blocks, {steps} steps"),
        DecoderDetails::Bidirectional {
            blocks,
            steps,
            full_passes,
        } => format!("bidirectional: {blocks} blocks, {steps} steps, {full_passes} full passes"),
        DecoderDetails::Speculative {
            passes,
            drafted,
            accepted,
        } => format!("speculative: {passes} passes, {accepted}/{drafted} drafts accepted"),
        DecoderDetails::Ar => "ar".into(),
        DecoderDetails::Canvas { canvases, steps } => {
            format!("canvas: {canvases} canvases, {steps} steps")
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sizes past `u32::MAX` do not occur in a model a phone runs; saturate rather than wrap.
pub(crate) fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
