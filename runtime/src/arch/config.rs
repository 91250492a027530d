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
            Architecture::Llada2Moe => Prediction::InPlace,
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
        for l in 0..self.num_layers {
            total += attn;
            active += attn;
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
