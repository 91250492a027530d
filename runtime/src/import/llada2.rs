//! LLaDA2.0 (`llada2_moe` / `bailing_moe_v2`): fused query_key_value, per-head q/k RMSNorm, partial
//! RoPE, sigmoid router with a selection bias and group-limited top-k, routed scaling, shared
//! experts, the first `first_k_dense_replace` layers dense. Block-causal attention at inference.
//! Source: inclusionAI's `modeling_llada2_moe.py` (router math as transformers' `deepseek_v3`).
//! Two config extensions for upcycled checkpoints (training/smollm2): `use_qk_norm: false` (no q/k
//! norm tensors, as a Llama base has none) and `moe_shared_expert_intermediate_size`, a shared
//! expert whose width is not a multiple of the routed experts' width.

use super::hf::{truthy, HfConfig, HfLayout, QkvNames};
use super::{Family, ImportError};
use crate::model::{Architecture, Gating, ModelConfig, MoeConfig, QkNorm};

/// inclusionAI's checkpoints say `llada2_moe`; BailingMoeV2 ones `bailing_moe_v2` (or `bailing_moe`).
pub const FAMILY: Family = Family::new(
    &[
        ("llada2_moe", Architecture::Llada2Moe),
        ("bailing_moe_v2", Architecture::Llada2Moe),
        ("bailing_moe", Architecture::Llada2Moe),
    ],
    &LAYOUT,
    |c, _| config(c),
);

pub const LAYOUT: HfLayout = HfLayout {
    embed: "model.word_embeddings.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layers: "model.layers",
    attn_norm: "input_layernorm.weight",
    qkv: QkvNames::Fused("attention.query_key_value.weight"),
    q_norm: "attention.query_layernorm.weight",
    k_norm: "attention.key_layernorm.weight",
    o: "attention.dense.weight",
    ffn_norm: "post_attention_layernorm.weight",
    router: "mlp.gate.weight",
    router_bias: Some("mlp.gate.expert_bias"),
    experts: "mlp.experts",
    shared: Some("mlp.shared_experts"),
    dense_mlp: "mlp",
};

pub fn config(c: &HfConfig) -> Result<ModelConfig, ImportError> {
    c.refuse_if("use_qkv_bias", truthy)?;
    c.refuse_if("use_bias", truthy)?;
    c.refuse_if("score_function", |v| v.as_str() != Some("sigmoid"))?;
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let head_dim = c.usize_or("head_dim", hidden / heads.max(1))?;
    let layers = c.usize("num_hidden_layers")?;
    let factor = c.f64_or("partial_rotary_factor", 1.0)?;
    let rotary_dim = c.usize_or("rotary_dim", (head_dim as f64 * factor) as usize)?;
    let experts = c.usize("num_experts")?;
    let moe_ffn = c.usize("moe_intermediate_size")?;
    let first_dense = c.usize_or("first_k_dense_replace", 0)?.min(layers);
    let shared_ffn = match c.get("moe_shared_expert_intermediate_size") {
        Some(_) => c.usize("moe_shared_expert_intermediate_size")?,
        None => moe_ffn * c.usize_or("num_shared_experts", 0)?,
    };
    let qk_norm = if c.bool_or("use_qk_norm", true)? {
        QkNorm::PerHead
    } else {
        QkNorm::None
    };
    Ok(ModelConfig {
        architecture: Architecture::Llada2Moe,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: c.usize_or("num_key_value_heads", heads)?,
        head_dim,
        rope_theta: c.rope_theta(600000.0)?,
        rotary_dim,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        max_position: c.usize_or("max_position_embeddings", 32768)?,
        qk_norm,
        clip_qkv: None,
        moe: MoeConfig {
            num_experts: experts,
            top_k: c.usize("num_experts_per_tok")?,
            expert_ffn: moe_ffn,
            shared_ffn,
            gating: Gating::SigmoidGrouped {
                groups: c.usize_or("n_group", 1)?,
                top_groups: c.usize_or("topk_group", 1)?,
                scale: c.f64_or("routed_scaling_factor", 1.0)? as f32,
                renormalize: c.bool_or("norm_topk_prob", true)?,
            },
            router_bias: true,
        },
        dense_ffn: c.usize_or("intermediate_size", 0)?,
        dense_layers: (0..first_dense).collect(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        attention: Default::default(),
        router: Default::default(),
        residual: Default::default(),
        embedding: Default::default(),
        sliding: Default::default(),
        block: Default::default(),
    })
}
