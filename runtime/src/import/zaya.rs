//! ZAYA1 (`zaya`; Zyphra's ZAYA1-8B: 40 layers, hidden 2048, 8 q / 2 KV heads of 128, top-1 of 16
//! experts of 2048 plus a skip expert, vocab 262,272, tied head). Every layer is CCA attention then
//! MoE. CCA: q, k, v_current, v_delayed projections (fused here into one `attn.qkv`), a depthwise and
//! a per-head grouped conv over time on `[q; k]` (kernels `cca_time0`, `cca_time1`: 2), q/k residual
//! means per KV group, L2 q/k norm to √head_dim with a key temperature per KV head, RoPE on half of
//! each head (rotate-half) with θ per layer type (`hybrid` 5e6, `hybrid_sliding` 1e4, the latter
//! through a sliding window). Router: down-projection to `router_hidden_size`, EDA from the second
//! layer on, RMSNorm, fc1/fc2 with GELU, 17 classes, softmax, selection bias `balancing_biases`.
//! Residual scaling around both blocks; input embedding `(e + bias) ⊙ scale`.
//! Sources: transformers `models/zaya/configuration_zaya.py`, `modeling_zaya.py` (5.17):
//! <https://github.com/huggingface/transformers/tree/main/src/transformers/models/zaya>.
//! This module plans the merged decoder-layer layout transformers loads; a checkpoint in the
//! legacy alternating attention/MoE layout (`convert_zaya_weights_to_hf.py`'s input) is read
//! through [`super::zaya_legacy`], which maps its names (and config.json) onto this one, so both
//! convert to the same file.

use serde_json::Value;

use super::family::{CheckpointTensor, Family, Role};
use super::hf::{truthy, HfConfig, HfLayout, QkvNames};
use super::{ImportError, PlannedTensor};
use crate::model::{
    names, Architecture, AttentionKind, EmbeddingKind, Gating, ModelConfig, MoeConfig, QkNorm,
    ResidualKind, RouterKind, SlidingAttention,
};

/// ZAYA1 plans its own dense tensors (CCA and the MLP router have pieces the shared layout cannot
/// name); a `zaya` checkpoint whose config.json names no block size gets ZAYA1-8B-Diffusion-
/// Preview's 16 (it drafts and verifies blocks of 16: Zyphra's post, REFERENCES.md).
pub const FAMILY: Family = Family {
    plan: Some(plan),
    checkpoint_tensors: Some(checkpoint_tensors),
    block_size: Some(16),
    ..Family::new(&[("zaya", Architecture::Zaya)], &LAYOUT, |c, _| config(c))
};

/// The names the shared converter reads directly (embedding, final norm, head, experts); the
/// attention and router tensors are listed by [`plan`].
pub const LAYOUT: HfLayout = HfLayout {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layers: "model.layers",
    attn_norm: "input_layernorm.weight",
    qkv: QkvNames::Separate {
        q: "self_attn.qkv_proj.q_proj.weight",
        k: "self_attn.qkv_proj.k_proj.weight",
        v: "self_attn.qkv_proj.v_proj_current.weight",
    },
    q_norm: "",
    k_norm: "",
    o: "self_attn.o_proj.weight",
    ffn_norm: "post_attention_layernorm.weight",
    router: "mlp.gate.router_mlp.out_proj.weight",
    router_bias: Some("mlp.gate.balancing_biases"),
    experts: "mlp.experts",
    shared: None,
    dense_mlp: "mlp",
};

const EMBED_SCALE: &str = "model.input_hidden_states_scale";
const EMBED_BIAS: &str = "model.input_hidden_states_bias";
const CCA: &str = "self_attn.qkv_proj";
const GATE: &str = "mlp.gate";

const HYBRID: &str = "hybrid";
const SLIDING: &str = "hybrid_sliding";

/// θ and partial rotary factor of one layer type under `rope_parameters` (nested per type, as
/// transformers writes it; a flat dict applies to every type).
fn rope_of(c: &HfConfig, kind: &str, default_theta: f64) -> Result<(f64, f64), ImportError> {
    let Some(all) = c.get("rope_parameters") else {
        return Ok((default_theta, 0.5));
    };
    let p = all.get(kind).filter(|v| v.is_object()).unwrap_or(all);
    let rope_type = p
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default");
    if rope_type != "default" {
        return Err(ImportError::Unsupported(format!(
            "zaya: RoPE scaling '{rope_type}' ({kind} layers)"
        )));
    }
    let num = |k: &str, d: f64| -> Result<f64, ImportError> {
        match p.get(k) {
            None | Some(Value::Null) => Ok(d),
            Some(v) => v.as_f64().ok_or_else(|| {
                ImportError::Config(format!("zaya: rope_parameters.{kind}.{k} is not a number"))
            }),
        }
    };
    Ok((
        num("rope_theta", default_theta)?,
        num("partial_rotary_factor", 0.5)?,
    ))
}

fn config(c: &HfConfig) -> Result<ModelConfig, ImportError> {
    c.refuse_if("attention_bias", truthy)?;
    c.refuse_if("lm_head_bias", truthy)?;
    c.refuse_if("hidden_act", |v| v.as_str() != Some("silu"))?;
    // Older configs carry the scaling at the top level; rope_of reads only rope_parameters.
    c.refuse_if("rope_scaling", |v| {
        let kind = v.get("rope_type").or_else(|| v.get("type"));
        kind.and_then(Value::as_str).unwrap_or("default") != "default"
    })?;
    for field in ["cca_time0", "cca_time1"] {
        c.refuse_if(field, |v| v.as_u64() != Some(2))?;
    }
    let hidden = c.usize_or("hidden_size", 2048)?;
    let heads = c.usize_or("num_attention_heads", 8)?;
    let head_dim = c.usize_or("head_dim", 128)?;
    let layers = c.usize_or("num_hidden_layers", 40)?;
    let types: Vec<String> = match c.get("layer_types") {
        None => vec![HYBRID.into(); layers],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ImportError::Config("zaya: layer_types is not a list of strings".into())
            })?,
        Some(_) => {
            return Err(ImportError::Config(
                "zaya: layer_types is not a list".into(),
            ))
        }
    };
    if types.len() != layers {
        return Err(ImportError::Config(format!(
            "zaya: {} layer_types for {layers} layers",
            types.len()
        )));
    }
    let mut sliding_layers = Vec::new();
    for (l, t) in types.iter().enumerate() {
        match t.as_str() {
            HYBRID | "full_attention" => {}
            SLIDING | "sliding_attention" => sliding_layers.push(l),
            other => {
                return Err(ImportError::Unsupported(format!(
                    "zaya: layer type '{other}' (layer {l})"
                )))
            }
        }
    }
    let (theta, factor) = rope_of(c, HYBRID, 5_000_000.0)?;
    let sliding = if sliding_layers.is_empty() {
        None
    } else {
        let (s_theta, s_factor) = rope_of(c, SLIDING, 10_000.0)?;
        if s_factor != factor {
            return Err(ImportError::Unsupported(format!(
                "zaya: partial_rotary_factor {s_factor} on sliding layers vs {factor} on full ones"
            )));
        }
        Some(SlidingAttention {
            window: c.usize("sliding_window")?,
            rope_theta: s_theta,
            layers: sliding_layers,
        })
    };
    let experts = c.usize_or("num_experts", 16)?;
    Ok(ModelConfig {
        architecture: Architecture::Zaya,
        vocab_size: c.usize_or("vocab_size", 262_272)?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: c.usize_or("num_key_value_heads", 2)?,
        head_dim,
        rope_theta: theta,
        rotary_dim: (head_dim as f64 * factor) as usize,
        rms_norm_eps: c.f64_or("rms_norm_eps", 1e-5)?,
        max_position: c.usize_or("max_position_embeddings", 131_072)?,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        moe: MoeConfig {
            num_experts: experts,
            top_k: c.usize_or("num_experts_per_tok", 1)?,
            expert_ffn: c.usize_or("moe_intermediate_size", 2048)?,
            shared_ffn: 0,
            // Documentation only: the MLP router's own rule applies (softmax, not renormalised).
            gating: Gating::Softmax { renormalize: false },
            router_bias: true,
        },
        dense_ffn: 0,
        dense_layers: Vec::new(),
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        attention: AttentionKind::Cca,
        router: RouterKind::MlpEda {
            hidden: c.usize_or("router_hidden_size", 256)?,
        },
        residual: ResidualKind::Scaled,
        embedding: EmbeddingKind::Affine,
        sliding,
        block: Default::default(),
    })
}

fn router_hidden(c: &ModelConfig) -> usize {
    match c.router {
        RouterKind::MlpEda { hidden } => hidden,
        RouterKind::Linear | RouterKind::ScaledNorm => 0,
    }
}

/// Every checkpoint tensor of the merged layout, experts fused as transformers stores them.
fn checkpoint_tensors(c: &ModelConfig) -> Vec<CheckpointTensor> {
    let (h, v, hd) = (c.hidden_size, c.vocab_size, c.head_dim);
    let (qd, kd, ch, r) = (c.q_dim(), c.kv_dim(), c.cca_conv_dim(), router_hidden(c));
    let (e, i) = (c.moe.num_experts, c.moe.expert_ffn);
    let mut t = vec![
        (LAYOUT.embed.to_string(), vec![v, h], Role::Embedding),
        (EMBED_SCALE.to_string(), vec![h], Role::Scale),
        (EMBED_BIAS.to_string(), vec![h], Role::Bias),
    ];
    for l in 0..c.num_layers {
        let n = |s: &str| LAYOUT.layer(l, s);
        let cca = |s: &str| n(&format!("{CCA}.{s}"));
        let gate = |s: &str| n(&format!("{GATE}.{s}"));
        t.push((n(LAYOUT.attn_norm), vec![h], Role::Scale));
        t.push((cca("q_proj.weight"), vec![qd, h], Role::Linear));
        t.push((cca("k_proj.weight"), vec![kd, h], Role::Linear));
        t.push((cca("v_proj_current.weight"), vec![kd / 2, h], Role::Linear));
        t.push((cca("v_proj_delayed.weight"), vec![kd / 2, h], Role::Linear));
        t.push((
            cca("conv_qk_depthwise.weight"),
            vec![ch, 1, 2],
            Role::Linear,
        ));
        t.push((cca("conv_qk_depthwise.bias"), vec![ch], Role::Bias));
        t.push((cca("conv_qk_grouped.weight"), vec![ch, hd, 2], Role::Linear));
        t.push((cca("conv_qk_grouped.bias"), vec![ch], Role::Bias));
        t.push((
            n("self_attn.qk_norm.temp"),
            vec![c.num_kv_heads],
            Role::Scale,
        ));
        t.push((n(LAYOUT.o), vec![h, qd], Role::Linear));
        for block in ["post_attention_residual_scale", "post_mlp_residual_scale"] {
            for (part, role) in RESIDUAL_PARTS {
                t.push((n(&format!("{block}.{part}")), vec![h], role));
            }
        }
        t.push((n(LAYOUT.ffn_norm), vec![h], Role::Scale));
        if l > 0 {
            t.push((gate("router_states_scale"), vec![r], Role::Scale));
        }
        t.push((gate("balancing_biases"), vec![e + 1], Role::Bias));
        t.push((gate("down_proj.weight"), vec![r, h], Role::Linear));
        t.push((gate("down_proj.bias"), vec![r], Role::Bias));
        t.push((gate("router_mlp.norm.weight"), vec![r], Role::Scale));
        for fc in ["fc1", "fc2"] {
            t.push((
                gate(&format!("router_mlp.{fc}.weight")),
                vec![r, r],
                Role::Linear,
            ));
            t.push((gate(&format!("router_mlp.{fc}.bias")), vec![r], Role::Bias));
        }
        t.push((
            gate("router_mlp.out_proj.weight"),
            vec![e + 1, r],
            Role::Linear,
        ));
        t.push((
            n("mlp.experts.gate_up_proj"),
            vec![e, 2 * i, h],
            Role::Linear,
        ));
        t.push((n("mlp.experts.down_proj"), vec![e, h, i], Role::Linear));
    }
    t.push((LAYOUT.final_norm.to_string(), vec![h], Role::Scale));
    if !c.tie_embeddings {
        t.push((LAYOUT.lm_head.to_string(), vec![v, h], Role::Linear));
    }
    t
}

/// `ZayaResidualScaling`'s parameters in the order of the `[4, H]` tensor edgediff stores: block
/// output bias and scale, residual bias and scale.
const RESIDUAL_PARTS: [(&str, Role); 4] = [
    ("hidden_states_bias", Role::Bias),
    ("hidden_states_scale", Role::Scale),
    ("residual_bias", Role::Bias),
    ("residual_scale", Role::Scale),
];

/// The model file's dense tensors and their checkpoint sources (experts go the shared way).
fn plan(c: &ModelConfig) -> Vec<PlannedTensor> {
    let (h, v, hd) = (c.hidden_size, c.vocab_size, c.head_dim);
    let (ch, r) = (c.cca_conv_dim(), router_hidden(c));
    let classes = c.router_classes();
    let mut p = vec![
        PlannedTensor::matrix(names::EMBED, [v, h], &[LAYOUT.embed]),
        PlannedTensor::f32(names::EMBED_AFFINE, [2, h], &[EMBED_BIAS, EMBED_SCALE]),
    ];
    for l in 0..c.num_layers {
        let n = |s: &str| LAYOUT.layer(l, s);
        let cca = |s: &str| n(&format!("{CCA}.{s}"));
        let gate = |s: &str| n(&format!("{GATE}.{s}"));
        let ours = |s: &str| names::layer(l, s);
        p.push(PlannedTensor::f32(
            ours(names::ATTN_NORM),
            [h],
            &[&n(LAYOUT.attn_norm)],
        ));
        // One matmul for all four projections: rows q, k, v_current, v_delayed.
        p.push(PlannedTensor::matrix(
            ours(names::QKV),
            [c.qkv_dim(), h],
            &[
                &cca("q_proj.weight"),
                &cca("k_proj.weight"),
                &cca("v_proj_current.weight"),
                &cca("v_proj_delayed.weight"),
            ],
        ));
        p.push(PlannedTensor::f32_reshaped(
            ours(names::CONV_DW),
            [ch, 2],
            &cca("conv_qk_depthwise.weight"),
            &[ch, 1, 2],
        ));
        p.push(PlannedTensor::f32(
            ours(names::CONV_DW_BIAS),
            [ch],
            &[&cca("conv_qk_depthwise.bias")],
        ));
        p.push(PlannedTensor::f32_reshaped(
            ours(names::CONV_GROUPED),
            [ch, 2 * hd],
            &cca("conv_qk_grouped.weight"),
            &[ch, hd, 2],
        ));
        p.push(PlannedTensor::f32(
            ours(names::CONV_GROUPED_BIAS),
            [ch],
            &[&cca("conv_qk_grouped.bias")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::CCA_TEMP),
            [c.num_kv_heads],
            &[&n("self_attn.qk_norm.temp")],
        ));
        p.push(PlannedTensor::matrix(
            ours(names::O),
            [h, c.q_dim()],
            &[&n(LAYOUT.o)],
        ));
        for (ours_name, block) in [
            (names::ATTN_RESIDUAL, "post_attention_residual_scale"),
            (names::FFN_RESIDUAL, "post_mlp_residual_scale"),
        ] {
            let parts: Vec<String> = RESIDUAL_PARTS
                .iter()
                .map(|(part, _)| n(&format!("{block}.{part}")))
                .collect();
            let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
            p.push(PlannedTensor::f32(ours(ours_name), [4, h], &parts));
        }
        p.push(PlannedTensor::f32(
            ours(names::FFN_NORM),
            [h],
            &[&n(LAYOUT.ffn_norm)],
        ));
        if l > 0 {
            p.push(PlannedTensor::f32(
                ours(names::ROUTER_EDA),
                [r],
                &[&gate("router_states_scale")],
            ));
        }
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_DOWN),
            [r, h],
            &[&gate("down_proj.weight")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_DOWN_BIAS),
            [r],
            &[&gate("down_proj.bias")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_NORM),
            [r],
            &[&gate("router_mlp.norm.weight")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_FC1),
            [r, r],
            &[&gate("router_mlp.fc1.weight")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_FC1_BIAS),
            [r],
            &[&gate("router_mlp.fc1.bias")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_FC2),
            [r, r],
            &[&gate("router_mlp.fc2.weight")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_FC2_BIAS),
            [r],
            &[&gate("router_mlp.fc2.bias")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER),
            [classes, r],
            &[&gate("router_mlp.out_proj.weight")],
        ));
        p.push(PlannedTensor::f32(
            ours(names::ROUTER_BIAS),
            [classes],
            &[&gate("balancing_biases")],
        ));
    }
    p.push(PlannedTensor::f32(
        names::FINAL_NORM,
        [h],
        &[LAYOUT.final_norm],
    ));
    if !c.tie_embeddings {
        p.push(PlannedTensor::matrix(
            names::LM_HEAD,
            [v, h],
            &[LAYOUT.lm_head],
        ));
    }
    p
}
