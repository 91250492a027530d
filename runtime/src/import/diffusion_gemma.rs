//! DiffusionGemma (`diffusion_gemma`; google/diffusiongemma-26B-A4B: a Gemma-4 26B-A4B MoE, 30
//! layers, 128 experts top-8 beside a dense GeGLU MLP in every layer, sliding-window layers 5:1
//! with global ones of head_dim 512, K = V and proportional RoPE 0.25, logit softcap 30, tied
//! head). One set of text weights serves a causal encoder (writes the KV cache) and a
//! bidirectional canvas decoder (reads it) with a self-conditioning block of its own; the math is
//! in `model/canvas.rs` and docs/FORMAT.md "DiffusionGemma".
//! Sources: transformers `models/diffusion_gemma/{configuration,modeling,generation}_diffusion_gemma.py`
//! (5.17): <https://github.com/huggingface/transformers/tree/main/src/transformers/models/diffusion_gemma>.
//!
//! The checkpoint keeps the decoder's copy of the shared weights (`model.decoder.*`; the encoder's
//! are tied to them and not saved) and one `layer_scalar` buffer per encoder and decoder layer
//! (buffers are not tied), stored here as `layers.{l}.layer_scalar` `[2, 1]` (decoder, encoder).
//! The vision tower (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`) is left out:
//! edgediff imports the text model.

use serde_json::Value;

use super::family::{CheckpointTensor, Family, Role};
use super::hf::{truthy, HfConfig, HfLayout, QkvNames};
use super::{ImportError, PlannedTensor};
use crate::arch::{
    names, Activation, Architecture, AttentionKind, BlockPieces, CanvasConfig, EmbeddingKind,
    FfnLayout, Gating, GlobalAttention, ModelConfig, MoeConfig, NormLayout, QkNorm, ResidualKind,
    RouterKind, SlidingAttention,
};
use crate::format::CanvasSampler;

pub const FAMILY: Family = Family {
    plan: Some(plan),
    checkpoint_tensors: Some(checkpoint_tensors),
    ignored: Some(is_vision_tensor),
    // The canvas of 256 is the block the sampler commits.
    block_size: Some(256),
    ..Family::new(
        &[("diffusion_gemma", Architecture::DiffusionGemma)],
        &LAYOUT,
        |c, _| config(c),
    )
};

/// The names the shared converter reads directly (experts); the rest is listed by [`plan`].
pub const LAYOUT: HfLayout = HfLayout {
    embed: "model.decoder.embed_tokens.weight",
    final_norm: "model.decoder.norm.weight",
    lm_head: "lm_head.weight",
    layers: "model.decoder.layers",
    attn_norm: "input_layernorm.weight",
    qkv: QkvNames::Separate {
        q: "self_attn.q_proj.weight",
        k: "self_attn.k_proj.weight",
        v: "self_attn.v_proj.weight",
    },
    q_norm: "self_attn.q_norm.weight",
    k_norm: "self_attn.k_norm.weight",
    o: "self_attn.o_proj.weight",
    ffn_norm: "pre_feedforward_layernorm.weight",
    router: "router.proj.weight",
    router_bias: None,
    experts: "experts",
    shared: None,
    dense_mlp: "mlp",
};

const ENCODER_LAYERS: &str = "model.encoder.language_model.layers";
const SELF_COND: &str = "model.decoder.self_conditioning";

fn is_vision_tensor(name: &str) -> bool {
    name.starts_with("model.encoder.vision_tower.")
        || name.starts_with("model.encoder.embed_vision.")
}

fn err(detail: String) -> ImportError {
    ImportError::Config(format!("diffusion_gemma: {detail}"))
}

/// A number under `rope_parameters.{kind}`, or its default.
fn rope_num(p: Option<&Value>, kind: &str, key: &str, default: f64) -> Result<f64, ImportError> {
    match p.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .ok_or_else(|| err(format!("rope_parameters.{kind}.{key} is not a number"))),
    }
}

/// The global layers' `head_dim` and KV heads: `per_layer_config` as transformers writes it, or
/// the `global_head_dim` / `num_global_key_value_heads` fields it reads from.
fn global_geometry(
    t: &HfConfig,
    types: &[bool],
    kv_heads: usize,
) -> Result<(usize, usize), ImportError> {
    let fallback_kv = if t.bool_or("attention_k_eq_v", true)? {
        t.usize_or("num_global_key_value_heads", kv_heads)?
    } else {
        kv_heads
    };
    let fallback = (t.usize_or("global_head_dim", 512)?, fallback_kv);
    let Some(per) = t.get("per_layer_config").filter(|v| !v.is_null()) else {
        return Ok(fallback);
    };
    let per = per
        .as_object()
        .ok_or_else(|| err("per_layer_config is not an object".into()))?;
    let mut found: Option<(usize, usize)> = None;
    for (key, entry) in per {
        let l: usize = key
            .parse()
            .map_err(|_| err(format!("per_layer_config key '{key}' is not a layer index")))?;
        let sliding = *types
            .get(l)
            .ok_or_else(|| err(format!("per_layer_config names layer {l}")))?;
        let get = |k: &str, d: usize| -> Result<usize, ImportError> {
            match entry.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v
                    .as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| err(format!("per_layer_config.{l}.{k} is not a count"))),
            }
        };
        if let Some(other) = entry.as_object().and_then(|o| {
            o.keys()
                .find(|k| !matches!(k.as_str(), "head_dim" | "num_key_value_heads"))
        }) {
            return Err(ImportError::Unsupported(format!(
                "diffusion_gemma: per_layer_config.{l}.{other}"
            )));
        }
        if sliding {
            return Err(ImportError::Unsupported(format!(
                "diffusion_gemma: per-layer overrides of sliding layer {l}"
            )));
        }
        let g = (
            get("head_dim", fallback.0)?,
            get("num_key_value_heads", kv_heads)?,
        );
        if found.is_some_and(|f| f != g) {
            return Err(ImportError::Unsupported(
                "diffusion_gemma: global layers of different geometries".into(),
            ));
        }
        found = Some(g);
    }
    Ok(found.unwrap_or(fallback))
}

fn config(c: &HfConfig) -> Result<ModelConfig, ImportError> {
    let text = c
        .get("text_config")
        .filter(|v| v.is_object())
        .ok_or_else(|| err("no text_config object".into()))?;
    let t = HfConfig {
        json: text,
        family: c.family,
    };
    t.refuse_if("attention_bias", truthy)?;
    t.refuse_if("hidden_activation", |v| {
        v.as_str() != Some("gelu_pytorch_tanh")
    })?;
    // "all" makes the encoder bidirectional with a symmetric window; text-only "vision" is causal.
    t.refuse_if("use_bidirectional_attention", |v| v.as_str() == Some("all"))?;
    t.refuse_if("use_clipped_linears", truthy)?;
    if !t.bool_or("tie_word_embeddings", true)? || !c.bool_or("tie_word_embeddings", true)? {
        return Err(ImportError::Unsupported(
            "diffusion_gemma: an untied LM head".into(),
        ));
    }
    let hidden = t.usize_or("hidden_size", 2304)?;
    let layers = t.usize_or("num_hidden_layers", 30)?;
    let heads = t.usize_or("num_attention_heads", 8)?;
    let kv_heads = t.usize_or("num_key_value_heads", 4)?;
    let head_dim = t.usize_or("head_dim", 256)?;
    // transformers: every 6th layer global (5:1), and the last one always.
    let mut types: Vec<bool> = match t.get("layer_types") {
        None | Some(Value::Null) => (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(err(format!("unknown layer type {v}"))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err("layer_types is not a list".into())),
    };
    if types.len() != layers {
        return Err(err(format!(
            "{} layer_types for {layers} layers",
            types.len()
        )));
    }
    if let Some(last) = types.last_mut() {
        *last = false;
    }
    let (global_hd, global_kv) = global_geometry(&t, &types, kv_heads)?;
    let ropes = t.get("rope_parameters").filter(|v| v.is_object());
    let rope_of = |kind: &str| ropes.and_then(|r| r.get(kind)).filter(|v| v.is_object());
    let (local, global) = (rope_of("sliding_attention"), rope_of("full_attention"));
    for (kind, p, want) in [
        ("sliding_attention", local, "default"),
        ("full_attention", global, "proportional"),
    ] {
        let ty = p
            .and_then(|p| p.get("rope_type"))
            .and_then(Value::as_str)
            .unwrap_or(want);
        if ty != want || rope_num(p, kind, "factor", 1.0)? != 1.0 {
            return Err(ImportError::Unsupported(format!(
                "diffusion_gemma: {kind} RoPE '{ty}' (edgediff reads '{want}', factor 1)"
            )));
        }
    }
    if rope_num(local, "sliding_attention", "partial_rotary_factor", 1.0)? != 1.0 {
        return Err(ImportError::Unsupported(
            "diffusion_gemma: partial RoPE on sliding layers".into(),
        ));
    }
    let factor = rope_num(global, "full_attention", "partial_rotary_factor", 0.25)?;
    if !(0.0..=1.0).contains(&factor) {
        return Err(err(format!("partial_rotary_factor {factor}")));
    }
    // transformers: int(factor * head_dim // 2).
    let rope_pairs = (factor * global_hd as f64 / 2.0).floor() as usize;
    let softcap = match t.get("final_logit_softcapping") {
        None => Some(30.0),
        Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| err("final_logit_softcapping is not a number".into()))?
                as f32,
        ),
    };
    let dense_ffn = t.usize_or("intermediate_size", 9216)?;
    let sliding_layers: Vec<usize> = (0..layers).filter(|&l| types[l]).collect();
    Ok(ModelConfig {
        architecture: Architecture::DiffusionGemma,
        vocab_size: t.usize_or("vocab_size", 262_144)?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rope_theta: rope_num(global, "full_attention", "rope_theta", 1_000_000.0)?,
        rotary_dim: head_dim,
        rms_norm_eps: t.f64_or("rms_norm_eps", 1e-6)?,
        max_position: t.usize_or("max_position_embeddings", 131_072)?,
        qk_norm: QkNorm::PerHead,
        clip_qkv: None,
        moe: MoeConfig {
            num_experts: t.usize("num_experts")?,
            top_k: t.usize("top_k_experts")?,
            expert_ffn: t.usize("moe_intermediate_size")?,
            shared_ffn: 0,
            gating: Gating::Softmax { renormalize: true },
            router_bias: false,
        },
        dense_ffn,
        dense_layers: Vec::new(),
        tie_embeddings: true,
        attention: AttentionKind::Standard,
        router: RouterKind::ScaledNorm,
        residual: ResidualKind::Add,
        embedding: EmbeddingKind::Scaled,
        sliding: Some(SlidingAttention {
            window: t.usize_or("sliding_window", 512)?,
            rope_theta: rope_num(local, "sliding_attention", "rope_theta", 10_000.0)?,
            layers: sliding_layers,
        }),
        block: BlockPieces {
            activation: Activation::GeluTanh,
            norms: NormLayout::Sandwich,
            ffn: FfnLayout::DenseAndMoe,
            attn_scale: Some(1.0),
            v_norm: true,
            global: Some(GlobalAttention {
                head_dim: global_hd,
                kv_heads: global_kv,
                k_eq_v: true,
                rope_pairs,
            }),
            logit_softcap: softcap,
            canvas: Some(CanvasConfig {
                length: c.usize_or("canvas_length", 256)?,
                self_cond_ffn: dense_ffn,
            }),
        },
    })
}

/// Checkpoint name of a per-layer decoder tensor.
fn dec(l: usize, s: &str) -> String {
    LAYOUT.layer(l, s)
}

/// The model file's dense tensors and their checkpoint sources (experts go the shared way).
fn plan(c: &ModelConfig) -> Vec<PlannedTensor> {
    let (h, v, f) = (c.hidden_size, c.vocab_size, c.dense_ffn);
    let e = c.moe.num_experts;
    let sc = c.block.canvas.as_ref().map_or(f, |k| k.self_cond_ffn);
    let mut p = vec![PlannedTensor::matrix(names::EMBED, [v, h], &[LAYOUT.embed])];
    for l in 0..c.num_layers {
        let n = |s: &str| names::layer(l, s);
        let d = |s: &str| dec(l, s);
        let g = c.attn_of(l);
        let norm = |ours: &str, theirs: &str| PlannedTensor::f32(n(ours), [h], &[&d(theirs)]);
        p.push(norm(names::ATTN_NORM, "input_layernorm.weight"));
        let (q, k, vp) = (
            d("self_attn.q_proj.weight"),
            d("self_attn.k_proj.weight"),
            d("self_attn.v_proj.weight"),
        );
        let qkv: Vec<&str> = if g.has_v {
            vec![&q, &k, &vp]
        } else {
            vec![&q, &k]
        };
        p.push(PlannedTensor::matrix(
            n(names::QKV),
            [g.proj_dim(), h],
            &qkv,
        ));
        p.push(PlannedTensor::f32(
            n(names::Q_NORM),
            [g.head_dim],
            &[&d("self_attn.q_norm.weight")],
        ));
        p.push(PlannedTensor::f32(
            n(names::K_NORM),
            [g.head_dim],
            &[&d("self_attn.k_norm.weight")],
        ));
        p.push(PlannedTensor::matrix(
            n(names::O),
            [h, g.q_dim()],
            &[&d("self_attn.o_proj.weight")],
        ));
        p.push(norm(
            names::ATTN_POST_NORM,
            "post_attention_layernorm.weight",
        ));
        p.push(norm(names::FFN_NORM, "pre_feedforward_layernorm.weight"));
        p.push(PlannedTensor::matrix(
            n(names::MLP_GATE_UP),
            [2 * f, h],
            &[&d("mlp.gate_proj.weight"), &d("mlp.up_proj.weight")],
        ));
        p.push(PlannedTensor::matrix(
            n(names::MLP_DOWN),
            [h, f],
            &[&d("mlp.down_proj.weight")],
        ));
        p.push(norm(
            names::MLP_POST_NORM,
            "post_feedforward_layernorm_1.weight",
        ));
        p.push(norm(names::MOE_NORM, "pre_feedforward_layernorm_2.weight"));
        p.push(norm(
            names::MOE_POST_NORM,
            "post_feedforward_layernorm_2.weight",
        ));
        p.push(norm(
            names::FFN_POST_NORM,
            "post_feedforward_layernorm.weight",
        ));
        p.push(PlannedTensor::f32(
            n(names::ROUTER),
            [e, h],
            &[&d("router.proj.weight")],
        ));
        p.push(norm(names::ROUTER_SCALE, "router.scale"));
        p.push(PlannedTensor::f32(
            n(names::EXPERT_SCALE),
            [e],
            &[&d("router.per_expert_scale")],
        ));
        p.push(PlannedTensor::f32(
            n(names::LAYER_SCALAR),
            [2, 1],
            &[
                &d("layer_scalar"),
                &format!("{ENCODER_LAYERS}.{l}.layer_scalar"),
            ],
        ));
    }
    p.push(PlannedTensor::f32(
        names::SELF_COND_NORM,
        [h],
        &[&format!("{SELF_COND}.pre_norm.weight")],
    ));
    p.push(PlannedTensor::matrix(
        names::SELF_COND_GATE_UP,
        [2 * sc, h],
        &[
            &format!("{SELF_COND}.gate_proj.weight"),
            &format!("{SELF_COND}.up_proj.weight"),
        ],
    ));
    p.push(PlannedTensor::matrix(
        names::SELF_COND_DOWN,
        [h, sc],
        &[&format!("{SELF_COND}.down_proj.weight")],
    ));
    p.push(PlannedTensor::f32(
        names::FINAL_NORM,
        [h],
        &[LAYOUT.final_norm],
    ));
    p
}

/// Every text checkpoint tensor (synthetic checkpoints), experts fused as transformers stores them.
fn checkpoint_tensors(c: &ModelConfig) -> Vec<CheckpointTensor> {
    let (h, v, f) = (c.hidden_size, c.vocab_size, c.dense_ffn);
    let (e, i) = (c.moe.num_experts, c.moe.expert_ffn);
    let sc = c.block.canvas.as_ref().map_or(f, |k| k.self_cond_ffn);
    let mut t: Vec<CheckpointTensor> = vec![(LAYOUT.embed.into(), vec![v, h], Role::Embedding)];
    for l in 0..c.num_layers {
        let d = |s: &str| dec(l, s);
        let g = c.attn_of(l);
        let mut push = |s: &str, shape: Vec<usize>, role| t.push((d(s), shape, role));
        for norm in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight",
            "post_feedforward_layernorm.weight",
            "post_feedforward_layernorm_1.weight",
            "pre_feedforward_layernorm_2.weight",
            "post_feedforward_layernorm_2.weight",
            "router.scale",
        ] {
            push(norm, vec![h], Role::Scale);
        }
        push("self_attn.q_proj.weight", vec![g.q_dim(), h], Role::Linear);
        push("self_attn.k_proj.weight", vec![g.kv_dim(), h], Role::Linear);
        if g.has_v {
            push("self_attn.v_proj.weight", vec![g.kv_dim(), h], Role::Linear);
        }
        push("self_attn.q_norm.weight", vec![g.head_dim], Role::Scale);
        push("self_attn.k_norm.weight", vec![g.head_dim], Role::Scale);
        push("self_attn.o_proj.weight", vec![h, g.q_dim()], Role::Linear);
        push("mlp.gate_proj.weight", vec![f, h], Role::Linear);
        push("mlp.up_proj.weight", vec![f, h], Role::Linear);
        push("mlp.down_proj.weight", vec![h, f], Role::Linear);
        push("router.proj.weight", vec![e, h], Role::Linear);
        push("router.per_expert_scale", vec![e], Role::Scale);
        push("experts.gate_up_proj", vec![e, 2 * i, h], Role::Linear);
        push("experts.down_proj", vec![e, h, i], Role::Linear);
        push("layer_scalar", vec![1], Role::Scale);
        t.push((
            format!("{ENCODER_LAYERS}.{l}.layer_scalar"),
            vec![1],
            Role::Scale,
        ));
    }
    t.push((format!("{SELF_COND}.pre_norm.weight"), vec![h], Role::Scale));
    t.push((
        format!("{SELF_COND}.gate_proj.weight"),
        vec![sc, h],
        Role::Linear,
    ));
    t.push((
        format!("{SELF_COND}.up_proj.weight"),
        vec![sc, h],
        Role::Linear,
    ));
    t.push((
        format!("{SELF_COND}.down_proj.weight"),
        vec![h, sc],
        Role::Linear,
    ));
    t.push((LAYOUT.final_norm.into(), vec![h], Role::Scale));
    t
}

/// The canvas sampler's settings from the checkpoint's generation_config.json (transformers'
/// `DiffusionGemmaGenerationConfig`); a missing file or a null field keeps transformers' default.
pub fn sampler(dir: &std::path::Path) -> Result<CanvasSampler, ImportError> {
    let mut s = CanvasSampler::default();
    let path = dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(s);
    };
    let g: Value = serde_json::from_str(&text)
        .map_err(|e| ImportError::Config(format!("generation_config.json: {e}")))?;
    let bad = |field: &str, v: &Value, want: &str| {
        ImportError::Config(format!(
            "generation_config.json: `{field}` is {v}; expected {want}"
        ))
    };
    let count = |field: &str, min: u64| -> Result<Option<usize>, ImportError> {
        match g.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n >= min => Ok(Some(n as usize)),
                _ => Err(bad(field, v, &format!("an integer >= {min}"))),
            },
        }
    };
    let positive = |v: Option<&Value>, field: &str| -> Result<Option<f32>, ImportError> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x as f32)),
                _ => Err(bad(field, v, "a number > 0")),
            },
        }
    };
    if let Some(n) = count("max_denoising_steps", 1)? {
        s.steps = n;
    }
    if let Some(n) = count("stability_threshold", 0)? {
        s.stability = n;
    }
    let sampler = g.get("sampler_config").filter(|v| !v.is_null());
    if let Some(b) = positive(
        sampler.and_then(|c| c.get("entropy_bound")),
        "sampler_config.entropy_bound",
    )? {
        s.entropy_bound = b;
    }
    if let Some(t) = positive(g.get("t_min"), "t_min")? {
        s.t_min = t;
    }
    if let Some(t) = positive(g.get("t_max"), "t_max")? {
        s.t_max = t;
    }
    match g.get("confidence_threshold") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => s.confidence = x as f32,
            _ => return Err(bad("confidence_threshold", v, "a number")),
        },
    }
    Ok(s)
}
