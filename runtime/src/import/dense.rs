//! The dense decoder families: Llama (`llama`; SmolLM2 is one), Qwen2 (`qwen2`) and Qwen3 (`qwen3`).
//! One checkpoint layout (transformers' Llama names); GQA, full rotate-half RoPE, RMSNorm, a SwiGLU
//! MLP in every layer, optionally tied embeddings. Qwen3 adds per-head q/k RMSNorm. Qwen2 puts a
//! bias on q, k and v, which edgediff's forward pass has no term for: refused, never dropped.
//! Sources: transformers `models/llama/modeling_llama.py`, `models/qwen2/…`, `models/qwen3/…`.

use super::hf::{truthy, HfConfig, HfLayout};
use super::{Family, ImportError};
use crate::model::{Architecture, Gating, ModelConfig, MoeConfig, QkNorm};

pub const FAMILY: Family = Family::new(
    &[
        ("llama", Architecture::Llama),
        ("qwen2", Architecture::Qwen2),
        ("qwen3", Architecture::Qwen3),
    ],
    &LAYOUT,
    config,
);

/// transformers' Llama names are Qwen3-MoE's without the router and experts, which a dense model
/// never asks for.
pub const LAYOUT: HfLayout = super::qwen3_moe::LAYOUT;

/// The MoE part of a model without experts.
pub fn no_experts() -> MoeConfig {
    MoeConfig {
        num_experts: 0,
        top_k: 0,
        expert_ffn: 0,
        shared_ffn: 0,
        gating: Gating::Softmax { renormalize: false },
        router_bias: false,
    }
}

pub fn config(c: &HfConfig, arch: Architecture) -> Result<ModelConfig, ImportError> {
    c.refuse_if("attention_bias", truthy)?;
    c.refuse_if("mlp_bias", truthy)?;
    c.refuse_if("use_sliding_window", truthy)?;
    if arch == Architecture::Qwen2 {
        return Err(ImportError::Unsupported(
            "qwen2: biases on the q/k/v projections are not implemented".into(),
        ));
    }
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let head_dim = c.usize_or("head_dim", hidden / heads.max(1))?;
    let layers = c.usize("num_hidden_layers")?;
    Ok(ModelConfig {
        architecture: arch,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: c.usize_or("num_key_value_heads", heads)?,
        head_dim,
        rope_theta: c.rope_theta(10000.0)?,
        rotary_dim: head_dim,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        max_position: c.usize_or("max_position_embeddings", 2048)?,
        qk_norm: if arch == Architecture::Qwen3 {
            QkNorm::PerHead
        } else {
            QkNorm::None
        },
        clip_qkv: None,
        moe: no_experts(),
        dense_ffn: c.usize("intermediate_size")?,
        dense_layers: (0..layers).collect(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        attention: Default::default(),
        router: Default::default(),
        residual: Default::default(),
        embedding: Default::default(),
        sliding: Default::default(),
        block: Default::default(),
    })
}
