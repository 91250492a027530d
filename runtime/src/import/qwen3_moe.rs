//! Qwen3-MoE (`qwen3_moe`; SDAR-30B-A3B is one): per-head q/k RMSNorm, GQA, full RoPE, softmax top-k
//! router with optional renormalisation, SwiGLU experts, optional dense layers via
//! `mlp_only_layers` / `decoder_sparse_step`.
//! Source: transformers `models/qwen3_moe/modeling_qwen3_moe.py`.

use super::hf::{truthy, HfConfig, HfLayout, QkvNames};
use super::{Family, ImportError};
use crate::model::{Architecture, Gating, ModelConfig, MoeConfig, QkNorm};

pub const FAMILY: Family =
    Family::new(&[("qwen3_moe", Architecture::Qwen3Moe)], &LAYOUT, |c, _| {
        config(c)
    });

pub const LAYOUT: HfLayout = HfLayout {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layers: "model.layers",
    attn_norm: "input_layernorm.weight",
    qkv: QkvNames::Separate {
        q: "self_attn.q_proj.weight",
        k: "self_attn.k_proj.weight",
        v: "self_attn.v_proj.weight",
    },
    q_norm: "self_attn.q_norm.weight",
    k_norm: "self_attn.k_norm.weight",
    o: "self_attn.o_proj.weight",
    ffn_norm: "post_attention_layernorm.weight",
    router: "mlp.gate.weight",
    router_bias: None,
    experts: "mlp.experts",
    shared: None,
    dense_mlp: "mlp",
};

pub fn config(c: &HfConfig) -> Result<ModelConfig, ImportError> {
    c.refuse_if("attention_bias", truthy)?;
    c.refuse_if("use_sliding_window", truthy)?;
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let head_dim = c.usize_or("head_dim", hidden / heads.max(1))?;
    let layers = c.usize("num_hidden_layers")?;
    let sparse_step = c.usize_or("decoder_sparse_step", 1)?.max(1);
    let mlp_only = c.usize_list("mlp_only_layers")?;
    // transformers ≥ 5.17 saves `num_local_experts`; Hub configs say `num_experts`.
    let experts = match c.get("num_experts") {
        Some(_) => c.usize("num_experts")?,
        None => c.usize("num_local_experts")?,
    };
    // transformers: MoE iff not in mlp_only_layers, num_experts > 0 and (l + 1) % step == 0.
    let dense_layers = (0..layers)
        .filter(|l| mlp_only.contains(l) || experts == 0 || !(l + 1).is_multiple_of(sparse_step))
        .collect();
    Ok(ModelConfig {
        architecture: Architecture::Qwen3Moe,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: c.usize_or("num_key_value_heads", heads)?,
        head_dim,
        rope_theta: c.rope_theta(10000.0)?,
        rotary_dim: head_dim,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-6)?,
        max_position: c.usize_or("max_position_embeddings", 32768)?,
        qk_norm: QkNorm::PerHead,
        clip_qkv: None,
        moe: MoeConfig {
            num_experts: experts,
            top_k: c.usize("num_experts_per_tok")?,
            expert_ffn: c.usize("moe_intermediate_size")?,
            shared_ffn: 0,
            gating: Gating::Softmax {
                renormalize: c.bool_or("norm_topk_prob", false)?,
            },
            router_bias: false,
        },
        dense_ffn: c.usize_or("intermediate_size", 0)?,
        dense_layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        attention: Default::default(),
        router: Default::default(),
        residual: Default::default(),
        embedding: Default::default(),
        sliding: Default::default(),
        block: Default::default(),
    })
}
