//! OLMoE (`olmoe`; the layout EMO uses): q/k RMSNorm over the whole projection, optional clip of
//! q/k/v, full RoPE, softmax top-k router (no renormalisation by default), every layer MoE with
//! experts of `intermediate_size`.
//! Source: transformers `models/olmoe/modeling_olmoe.py`.

use super::hf::{truthy, HfConfig, HfLayout, QkvNames};
use super::{Family, ImportError};
use crate::model::{Architecture, Gating, ModelConfig, MoeConfig, QkNorm};

pub const FAMILY: Family =
    Family::new(&[("olmoe", Architecture::Olmoe)], &LAYOUT, |c, _| config(c));

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
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let head_dim = hidden / heads.max(1);
    let clip = match c.get("clip_qkv") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| ImportError::Config("olmoe: clip_qkv is not a number".into()))?
                as f32,
        ),
    };
    Ok(ModelConfig {
        architecture: Architecture::Olmoe,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: c.usize("num_hidden_layers")?,
        num_heads: heads,
        num_kv_heads: c.usize_or("num_key_value_heads", heads)?,
        head_dim,
        rope_theta: c.rope_theta(10000.0)?,
        rotary_dim: head_dim,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-5)?,
        max_position: c.usize_or("max_position_embeddings", 4096)?,
        qk_norm: QkNorm::Whole,
        clip_qkv: clip,
        moe: MoeConfig {
            num_experts: c.usize("num_experts")?,
            top_k: c.usize("num_experts_per_tok")?,
            expert_ffn: c.usize("intermediate_size")?,
            shared_ffn: 0,
            gating: Gating::Softmax {
                renormalize: c.bool_or("norm_topk_prob", false)?,
            },
            router_bias: false,
        },
        dense_ffn: 0,
        dense_layers: Vec::new(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        attention: Default::default(),
        router: Default::default(),
        residual: Default::default(),
        embedding: Default::default(),
        sliding: Default::default(),
        block: Default::default(),
    })
}
