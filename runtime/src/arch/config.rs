//! One architecture description for every supported family. Qwen3-MoE, OLMoE and LLaDA2 (BailingMoeV2)
//! differ only in the values here; the forward pass reads them and never the family name. The dense
//! families (Llama, Qwen2, Qwen3) are the degenerate case: every layer in `dense_layers`, no experts.
//! ZAYA1 is the same model with other pieces chosen: CCA attention, an MLP router with EDA and a skip
//! expert, scaled residuals, an affine input embedding and per-layer RoPE θ / sliding windows.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    Qwen3Moe,
    Olmoe,
    Llada2Moe,
    /// Zyphra's ZAYA1 (`zaya`): CCA attention, MLP router with EDA, top-1 of 16 experts + skip.
    Zaya,
    /// Google's DiffusionGemma (`diffusion_gemma`): a Gemma-4 MoE run as a causal encoder writing
    /// the KV cache and a bidirectional canvas decoder with self-conditioning.
    DiffusionGemma,
    /// Dense decoder-only families: no experts, every layer a SwiGLU MLP.
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// The MoE families every backend runs (the ones the expert machinery and the GPU are tested
    /// on).
    pub const ALL: [Architecture; 4] = [
        Architecture::Qwen3Moe,
        Architecture::Olmoe,
        Architecture::Llada2Moe,
        Architecture::Zaya,
    ];

    /// The `model_type` of the Hugging Face config (the name in files and messages; the
    /// `model_type`s each family reads, aliases included, are listed in `import::FAMILIES`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Olmoe => "olmoe",
            Architecture::Llada2Moe => "llada2_moe",
            Architecture::Zaya => "zaya",
            Architecture::DiffusionGemma => "diffusion_gemma",
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// Which position a row of logits predicts. A property of how a checkpoint was trained, so it is
/// stored with the model's decoding defaults (and a request can override it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The logits at a masked position predict the token at that position (LLaDA, LLaDA2, SDAR).
    InPlace,
    /// The logits at position i predict position i + 1, as in an AR model (and in diffusion models
    /// adapted from one with the token shift: Dream, Fast-dLLM v2).
    NextToken,
    /// Masked positions predict in place, causal rows predict the next token: a model trained with
    /// a mixed diffusion + AR loss on one set of weights (TiDAR-style; edgediff's default model).
    Hybrid,
}

impl Prediction {
    /// The convention of a model family's checkpoints when the file does not name one: LLaDA2 is
    /// a masked-diffusion model trained in place; the Qwen3-MoE and OLMoE checkpoints edgediff
    /// meets are AR models (EMO) or AR-initialised.
    pub fn for_architecture(arch: Architecture) -> Self {
        match arch {
            // The canvas decoder's logits predict their own positions.
            Architecture::Llada2Moe | Architecture::DiffusionGemma => Prediction::InPlace,
            Architecture::Qwen3Moe
            | Architecture::Olmoe
            | Architecture::Zaya
            | Architecture::Llama
            | Architecture::Qwen2
            | Architecture::Qwen3 => Prediction::NextToken,
        }
    }

    /// The convention of rows at masked positions.
    pub fn masked(self) -> Self {
        match self {
            Prediction::Hybrid => Prediction::InPlace,
            p => p,
        }
    }

    /// The convention of rows of a causal pass over clean tokens.
    pub fn causal(self) -> Self {
        match self {
            Prediction::Hybrid => Prediction::NextToken,
            p => p,
        }
    }

    /// The row (at a masked position) whose logits predict position `pos` (≥ 1).
    pub fn row_for(self, pos: usize) -> usize {
        match self.masked() {
            Prediction::NextToken => pos - 1,
            _ => pos,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Prediction::InPlace => "in_place",
            Prediction::NextToken => "next_token",
            Prediction::Hybrid => "hybrid",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Prediction::InPlace,
            Prediction::NextToken,
            Prediction::Hybrid,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// How q and k are normalised before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` values, one weight vector shared by all heads (Qwen3, LLaDA2).
    PerHead,
    /// RMSNorm over the whole q (or k) projection of a token (OLMoE).
    Whole,
}

/// How router logits become expert choices and weights.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Gating {
    /// softmax over all experts, top-k, optionally renormalised to sum 1 (Qwen3-MoE, OLMoE). A
    /// router bias, when present (pruned models), is added to the logits before the softmax.
    Softmax { renormalize: bool },
    /// sigmoid scores; `score + bias` chooses, limited to the best `top_groups` of `groups` groups
    /// (a group scores the sum of its two best); weights are the unbiased scores, optionally
    /// renormalised, times `scale` (LLaDA2, DeepSeek-V3).
    SigmoidGrouped {
        groups: usize,
        top_groups: usize,
        scale: f32,
        renormalize: bool,
    },
}

/// How a layer turns its normed input into attention q, k and v.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttentionKind {
    /// One fused `[q; k; v]` projection, optional q/k norm, RoPE.
    #[default]
    Standard,
    /// Compressed convolutional attention (ZAYA1, arXiv:2510.04476): the fused projection holds
    /// `[q; k; v_current; v_delayed]`; q/k get a causal depthwise then grouped (one group per head)
    /// convolution over time, both kernel 2, plus residual means per KV group; v is half the
    /// current token's projection, half the previous token's; q/k are L2-normalised to √head_dim,
    /// k times a learned temperature per KV head; then partial rotate-half RoPE. Needs per-sequence
    /// state beyond K/V (the raw [q; k] rows and delayed v of earlier positions), kept in the cache.
    Cca,
}

/// How the normed residual becomes router logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RouterKind {
    /// `router · h`, then `moe.gating`.
    #[default]
    Linear,
    /// ZAYA1: `r = down · h + b` (plus `eda_scale ⊙ r` of the previous MoE layer, from the second
    /// MoE layer on: EDA, a recurrence across depth), RMSNorm, two GELU(erf) layers with biases,
    /// an output projection to `num_experts + 1` classes, softmax. Top-`top_k` of
    /// `p + router_bias` picks; weights are `p` (not renormalised). The last class is the skip
    /// expert: it contributes 0 and is reported as expert id `num_experts`.
    MlpEda { hidden: usize },
    /// DiffusionGemma: on the raw residual (not the FFN's normed input), `RMSNorm(x)` without a
    /// weight, `⊙ scale · hidden^-½`, `router ·`, softmax, top-k, renormalised to sum 1, then each
    /// weight times its expert's learned `expert_scale`.
    ScaledNorm,
}

/// How a block's output joins the residual stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResidualKind {
    /// `x + y`.
    #[default]
    Add,
    /// ZAYA1: `(y + y_bias) ⊙ y_scale + (x + x_bias) ⊙ x_scale`, learned per channel.
    Scaled,
}

/// How token embeddings enter the first layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingKind {
    #[default]
    Plain,
    /// ZAYA1: `(e + bias) ⊙ scale`, learned per channel.
    Affine,
    /// Gemma: `e · √hidden_size` (the scale rounded to f32, as transformers' f32 buffer holds it).
    Scaled,
}

/// Layers that attend through a sliding window, with their own RoPE θ (ZAYA1's `hybrid_sliding`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlidingAttention {
    /// Keys at most `window − 1` positions before the query are visible (transformers' span,
    /// the query included); the mask's own rule applies on top.
    pub window: usize,
    pub rope_theta: f64,
    pub layers: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub expert_ffn: usize,
    /// Intermediate size of the shared expert (0: none). Several shared experts are one wider MLP.
    pub shared_ffn: usize,
    pub gating: Gating,
    /// Whether the router has a selection bias vector (`router_bias`): LLaDA2's expert bias, or the
    /// mask of a pruned model.
    pub router_bias: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    /// Leading dims of each head that RoPE rotates (`head_dim` for full RoPE), rotate-half layout.
    pub rotary_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position: usize,
    pub qk_norm: QkNorm,
    /// OLMoE's optional clamp of q, k and v to ±clip.
    #[serde(default)]
    pub clip_qkv: Option<f32>,
    pub moe: MoeConfig,
    /// Intermediate size of dense (non-MoE) layers.
    pub dense_ffn: usize,
    /// Layers whose FFN is a dense SwiGLU MLP instead of MoE.
    #[serde(default)]
    pub dense_layers: Vec<usize>,
    pub tie_embeddings: bool,
    #[serde(default)]
    pub attention: AttentionKind,
    #[serde(default)]
    pub router: RouterKind,
    #[serde(default)]
    pub residual: ResidualKind,
    #[serde(default)]
    pub embedding: EmbeddingKind,
    #[serde(default)]
    pub sliding: Option<SlidingAttention>,
    /// Gemma-style block pieces (DiffusionGemma); all off for the other families and older files.
    #[serde(default)]
    pub block: BlockPieces,
}

/// The activation of gated MLPs (dense, shared and routed experts): `act(gate) ⊙ up`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU.
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Where a layer normalises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormLayout {
    /// `x += f(norm(x))` for attention and FFN.
    #[default]
    Pre,
    /// Gemma's sandwich: `x += post_attn_norm(attn(norm(x)))`; the FFN block's output is normed
    /// again before its add (`ffn_post_norm`), and the layer ends with `x ·= layer_scalar`.
    Sandwich,
}

/// What a layer's feed-forward block is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnLayout {
    /// Dense MLP or routed experts (+ shared), per `dense_layers`.
    #[default]
    Single,
    /// DiffusionGemma: a dense MLP on `ffn_norm(x)` and the routed experts on `moe_norm(x)` side by
    /// side, each with its own post-norm, summed (`mlp_post_norm(mlp) + moe_post_norm(moe)`).
    DenseAndMoe,
}

/// RoPE of one layer: pairs `(i, i + offset)` for `i < pairs` rotate by `pos · θ^(−2i/denom)`; the
/// other dims pass unchanged. Rotate-half over the first `rotary_dim` dims is
/// `pairs = offset = rotary_dim / 2, denom = rotary_dim`; Gemma's "proportional" RoPE of global
/// layers pairs across the whole head (`offset = head_dim / 2, denom = head_dim`) and rotates only
/// `pairs = ⌊factor · head_dim / 2⌋` of them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    pub pairs: usize,
    pub offset: usize,
    pub denom: usize,
}

/// The attention of layers outside `sliding.layers` when it differs from the base geometry
/// (DiffusionGemma's global layers: head_dim 512, 2 KV heads, K = V, proportional RoPE).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GlobalAttention {
    pub head_dim: usize,
    pub kv_heads: usize,
    /// No v projection: v is the k projection's output (before k's norm and RoPE).
    pub k_eq_v: bool,
    /// Rotated pairs of the proportional RoPE (θ is `rope_theta`).
    pub rope_pairs: usize,
}

/// The uniform-noise canvas decoder of DiffusionGemma: a bidirectional pass over `length` canvas
/// tokens that reads the committed prefix's cache, with a self-conditioning block fed with the
/// previous step's logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CanvasConfig {
    pub length: usize,
    /// Intermediate size of the self-conditioning GeGLU block.
    pub self_cond_ffn: usize,
}

/// Pieces of Gemma-style blocks; the default (all off) is every other family.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockPieces {
    pub activation: Activation,
    pub norms: NormLayout,
    pub ffn: FfnLayout,
    /// Attention score scale (`None`: `head_dim^-½`; Gemma 4: 1, its q/k norms set the scale).
    pub attn_scale: Option<f32>,
    /// RMSNorm without a weight over each v head.
    pub v_norm: bool,
    pub global: Option<GlobalAttention>,
    /// Final logits `cap · tanh(logits / cap)`.
    pub logit_softcap: Option<f32>,
    pub canvas: Option<CanvasConfig>,
}

/// The attention geometry of one layer ([`ModelConfig::attn_of`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Whether the fused projection holds v rows (false: v = k's projection).
    pub has_v: bool,
    pub rope: Rope,
    pub window: Option<usize>,
}

impl LayerAttention {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Rows of the fused projection.
    pub fn proj_dim(&self) -> usize {
        self.q_dim() + self.kv_dim() * if self.has_v { 2 } else { 1 }
    }
}

/// A config that cannot describe a runnable model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid model config: {0}")]
pub struct ConfigError(pub String);

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Bytes of the KV cache a backend allocates for `capacity` positions: f32 K and V for every
    /// layer and position (plus ZAYA1's per-position CCA state).
    pub fn kv_bytes(&self, capacity: usize) -> u64 {
        let per_position = match self.attention {
            AttentionKind::Standard => 2 * self.kv_dim(),
            AttentionKind::Cca => 2 * self.kv_dim() + self.cca_conv_dim() + self.kv_dim() / 2,
        };
        (capacity as u64)
            .saturating_mul(per_position as u64)
            .saturating_mul(self.num_layers as u64)
            .saturating_mul(4)
    }
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer)
    }
    /// The sliding window of `layer`, if it is a sliding-window layer.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        self.sliding
            .as_ref()
            .filter(|s| s.layers.contains(&layer))
            .map(|s| s.window)
    }
    /// Attention geometry of `layer`: the base one, or the global layers' own.
    pub fn attn_of(&self, layer: usize) -> LayerAttention {
        let window = self.window_of(layer);
        let theta = self.rope_theta_of(layer);
        match &self.block.global {
            Some(g) if window.is_none() => LayerAttention {
                heads: self.num_heads,
                kv_heads: g.kv_heads,
                head_dim: g.head_dim,
                has_v: !g.k_eq_v,
                rope: Rope {
                    theta,
                    pairs: g.rope_pairs,
                    offset: g.head_dim / 2,
                    denom: g.head_dim,
                },
                window,
            },
            _ => LayerAttention {
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
                has_v: true,
                rope: Rope {
                    theta,
                    pairs: self.rotary_dim / 2,
                    offset: self.rotary_dim / 2,
                    denom: self.rotary_dim,
                },
                window,
            },
        }
    }
    /// Width of one cached K (and V) row of `layer`.
    pub fn kv_dim_of(&self, layer: usize) -> usize {
        self.attn_of(layer).kv_dim()
    }
    /// RoPE θ of `layer`.
    pub fn rope_theta_of(&self, layer: usize) -> f64 {
        match &self.sliding {
            Some(s) if s.layers.contains(&layer) => s.rope_theta,
            _ => self.rope_theta,
        }
    }
    /// Router classes: the experts, plus the skip expert of an MLP router.
    pub fn router_classes(&self) -> usize {
        match self.router {
            RouterKind::Linear => self.moe.num_experts,
            RouterKind::MlpEda { .. } => self.moe.num_experts + 1,
            RouterKind::ScaledNorm => self.moe.num_experts,
        }
    }
    /// Width of the raw `[q; k]` rows a CCA layer keeps per position for its convolution.
    pub fn cca_conv_dim(&self) -> usize {
        self.q_dim() + self.kv_dim()
    }
    /// Whether any layer routes to experts (false for the dense families).
    pub fn has_experts(&self) -> bool {
        (0..self.num_layers).any(|l| self.is_moe_layer(l))
    }

    /// Checks the invariants the forward pass relies on, so a lying header is an error here and not
    /// an out-of-bounds index later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        let limits = [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_layers", self.num_layers, 1 << 10),
            ("num_heads", self.num_heads, 1 << 10),
            ("num_kv_heads", self.num_kv_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            ("max_position", self.max_position, 1 << 24),
        ];
        for (name, v, max) in limits {
            if v == 0 || v > max {
                return fail(format!("{name} = {v} is outside 1..={max}"));
            }
        }
        let any_moe = self.has_experts();
        // A dense model has no router: zero experts is its only valid description.
        let (lo, max) = if any_moe { (1, 1 << 14) } else { (0, 0) };
        if self.moe.num_experts < lo || self.moe.num_experts > max {
            return fail(format!(
                "num_experts = {} is outside {lo}..={max} for a model with{} MoE layers",
                self.moe.num_experts,
                if any_moe { "" } else { "out" }
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fail(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.rotary_dim == 0
            || self.rotary_dim > self.head_dim
            || !self.rotary_dim.is_multiple_of(2)
        {
            return fail(format!(
                "rotary_dim {} must be even and within 1..={}",
                self.rotary_dim, self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return fail(format!("rope_theta {} must be > 1", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return fail(format!("rms_norm_eps {} must be > 0", self.rms_norm_eps));
        }
        let m = &self.moe;
        if any_moe && (m.top_k == 0 || m.top_k > m.num_experts) {
            return fail(format!(
                "top_k {} must be within 1..={}",
                m.top_k, m.num_experts
            ));
        }
        if let (
            true,
            Gating::SigmoidGrouped {
                groups,
                top_groups,
                scale,
                ..
            },
        ) = (any_moe, m.gating)
        {
            if groups == 0
                || !m.num_experts.is_multiple_of(groups)
                || top_groups == 0
                || top_groups > groups
            {
                return fail(format!(
                    "group-limited routing needs groups dividing {} experts and 1 <= top_groups <= groups (got {groups}, {top_groups})",
                    m.num_experts
                ));
            }
            if (m.num_experts / groups) * top_groups < m.top_k || (m.num_experts / groups) < 2 {
                return fail("top_groups groups hold fewer experts than top_k".into());
            }
            if !scale.is_finite() {
                return fail("routed scaling factor is not finite".into());
            }
        }
        if let Some(&l) = self.dense_layers.iter().find(|&&l| l >= self.num_layers) {
            return fail(format!("dense layer {l} >= num_layers {}", self.num_layers));
        }
        if any_moe && m.expert_ffn == 0 {
            return fail("expert_ffn is 0".into());
        }
        if !self.dense_layers.is_empty() && self.dense_ffn == 0 {
            return fail("dense_ffn is 0 but there are dense layers".into());
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return fail(format!("clip_qkv {c} must be > 0"));
            }
        }
        if self.attention == AttentionKind::Cca {
            if !self.kv_dim().is_multiple_of(2) {
                return fail(format!(
                    "CCA splits v into current and delayed halves: kv_dim {} must be even",
                    self.kv_dim()
                ));
            }
            if self.qk_norm != QkNorm::None || self.clip_qkv.is_some() {
                return fail("CCA attention has its own q/k normalisation: qk_norm must be none and clip_qkv unset".into());
            }
        }
        if let RouterKind::MlpEda { hidden } = self.router {
            if hidden == 0 || hidden > 1 << 16 {
                return fail(format!("router hidden size {hidden} is outside 1..=65536"));
            }
            if !self.moe.router_bias {
                return fail(
                    "the MLP router selects with its bias: router_bias must be set".into(),
                );
            }
        }
        if let Some(s) = &self.sliding {
            if s.window == 0 {
                return fail("sliding window is 0".into());
            }
            if !(s.rope_theta.is_finite() && s.rope_theta > 1.0) {
                return fail(format!("sliding rope_theta {} must be > 1", s.rope_theta));
            }
            if let Some(&l) = s.layers.iter().find(|&&l| l >= self.num_layers) {
                return fail(format!(
                    "sliding layer {l} >= num_layers {}",
                    self.num_layers
                ));
            }
        }
        self.validate_block()
    }

    fn validate_block(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        let b = &self.block;
        if let Some(g) = &b.global {
            if g.head_dim == 0 || g.head_dim > 1 << 12 || !g.head_dim.is_multiple_of(2) {
                return fail(format!(
                    "global head_dim {} must be even and within 2..=4096",
                    g.head_dim
                ));
            }
            if g.kv_heads == 0 || !self.num_heads.is_multiple_of(g.kv_heads) {
                return fail(format!(
                    "num_heads {} is not a multiple of the global layers' kv_heads {}",
                    self.num_heads, g.kv_heads
                ));
            }
            if g.rope_pairs > g.head_dim / 2 {
                return fail(format!(
                    "global RoPE rotates {} pairs of a {}-dim head",
                    g.rope_pairs, g.head_dim
                ));
            }
        }
        if let Some(s) = b.attn_scale {
            if !(s.is_finite() && s > 0.0) {
                return fail(format!("attention scale {s} must be > 0"));
            }
        }
        if let Some(cap) = b.logit_softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return fail(format!("logit softcap {cap} must be > 0"));
            }
        }
        let gemma_router = self.router == RouterKind::ScaledNorm;
        let sandwich = b.norms == NormLayout::Sandwich;
        let parallel = b.ffn == FfnLayout::DenseAndMoe;
        // The sandwich block is written for its own FFN layout and router; other combinations
        // have no model that uses them, so a file claiming one is refused here.
        if sandwich != parallel || parallel != gemma_router {
            return fail(
                "sandwich norms, the dense-and-MoE FFN and the scaled-norm router come together (DiffusionGemma)".into(),
            );
        }
        if parallel {
            if self.dense_ffn == 0 || !self.dense_layers.is_empty() || self.moe.shared_ffn != 0 {
                return fail("the dense-and-MoE FFN needs dense_ffn > 0, no dense-only layers and no shared expert".into());
            }
            if self.moe.router_bias || self.attention != AttentionKind::Standard {
                return fail(
                    "the dense-and-MoE block takes standard attention and no router bias".into(),
                );
            }
        }
        if let Some(c) = &b.canvas {
            if c.length == 0 || c.self_cond_ffn == 0 || !sandwich {
                return fail("a canvas decoder needs a length, a self-conditioning block and the sandwich block".into());
            }
        }
        Ok(())
    }

    /// Parameters stored, and parameters touched per token (dense + top-k routed + shared).
    pub fn parameter_counts(&self) -> (u64, u64) {
        let h = self.hidden_size as u64;
        let attn = h * self.qkv_dim() as u64 + self.q_dim() as u64 * h;
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_embeddings { 0 } else { embed };
        let expert = 3 * h * self.moe.expert_ffn as u64;
        let shared = 3 * h * self.moe.shared_ffn as u64;
        let router = h * self.moe.num_experts as u64;
        let (mut total, mut active) = (embed + head, embed.min(h) + head);
        // The canvas decoder's self-conditioning block.
        let self_cond = self
            .block
            .canvas
            .as_ref()
            .map_or(0, |c| 3 * h * c.self_cond_ffn as u64);
        total += self_cond;
        active += self_cond;
        for l in 0..self.num_layers {
            let attn = match self.block.global {
                // Layers of their own geometry (DiffusionGemma's global layers).
                Some(_) => {
                    let g = self.attn_of(l);
                    h * (g.proj_dim() + g.q_dim()) as u64
                }
                None => attn,
            };
            total += attn;
            active += attn;
            if self.block.ffn == FfnLayout::DenseAndMoe {
                // The dense MLP runs beside the experts in every layer.
                total += 3 * h * self.dense_ffn as u64;
                active += 3 * h * self.dense_ffn as u64;
            }
            if self.is_moe_layer(l) {
                total += expert * self.moe.num_experts as u64 + shared + router;
                active += expert * self.moe.top_k as u64 + shared + router;
            } else {
                total += 3 * h * self.dense_ffn as u64;
                active += 3 * h * self.dense_ffn as u64;
            }
        }
        (total, active)
    }
}
