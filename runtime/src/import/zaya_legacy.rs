//! ZAYA1's legacy alternating layout (Zyphra's original checkpoints: `2L` layers, even = CCA
//! attention, odd = MoE under `zaya_block`, one `input_norm` and one `res_scale` each, experts as
//! `local_experts.{e}.linear_fc{1,2}`), read as the merged decoder-layer layout [`super::zaya`]
//! plans. The mapping is transformers' `convert_zaya_weights_to_hf.py`
//! (<https://github.com/huggingface/transformers/blob/ee11687e407ec1318741e1bb77ef617a1da193da/src/transformers/models/zaya/convert_zaya_weights_to_hf.py>):
//! layer `n` → decoder layer `n / 2`; a `res_scale` scales the merge *before* its block, so an
//! attention layer's belongs to the previous decoder layer's `post_mlp_residual_scale` (layer 0's
//! is the input embedding's affine, the top-level `model.res_scale` the last layer's); experts
//! stack into `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`. One departure: that converter
//! renames `rmsnorm_eda` to `router_mlp.rmsnorm_eda`, which transformers 5.17's `ZayaRouterMLP`
//! calls `norm`; we follow the model that loads. config.json is rewritten the same way
//! (`convert_config`). Nothing is copied: [`LegacySource`] answers merged names from the legacy
//! tensors.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::source::{Encoded, TensorSource};
use super::ImportError;
use crate::format::DType;

/// Whether a checkpoint's names are the legacy layout's.
pub fn is_legacy<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|n| {
        n.contains(".zaya_block.") || n.contains(".res_scale.") || n.starts_with("model.res_scale.")
    })
}

/// Where one legacy tensor goes in the merged layout.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// A plain rename.
    Rename(String),
    /// Expert `index` of a fused `[E, …]` tensor.
    Expert { fused: String, index: usize },
}

/// Prefix renames inside a layer, first match wins (the converter's `_rename_common`, with
/// `rmsnorm_eda` → `router_mlp.norm`).
const RENAMES: [(&str, &str); 14] = [
    (
        "self_attn.qkv.conv_qk.0.",
        "self_attn.qkv_proj.conv_qk_depthwise.",
    ),
    (
        "self_attn.qkv.conv_qk.1.",
        "self_attn.qkv_proj.conv_qk_grouped.",
    ),
    ("self_attn.qkv.temp", "self_attn.qk_norm.temp"),
    ("self_attn.qkv.linear_q.", "self_attn.qkv_proj.q_proj."),
    ("self_attn.qkv.linear_k.", "self_attn.qkv_proj.k_proj."),
    (
        "self_attn.qkv.val_proj1.",
        "self_attn.qkv_proj.v_proj_current.",
    ),
    (
        "self_attn.qkv.val_proj2.",
        "self_attn.qkv_proj.v_proj_delayed.",
    ),
    ("self_attn.qkv.", "self_attn.qkv_proj."),
    (
        "zaya_block.router.rmsnorm_eda.",
        "mlp.gate.router_mlp.norm.",
    ),
    (
        "zaya_block.router.router_mlp.0.",
        "mlp.gate.router_mlp.fc1.",
    ),
    (
        "zaya_block.router.router_mlp.2.",
        "mlp.gate.router_mlp.fc2.",
    ),
    (
        "zaya_block.router.router_mlp.4.",
        "mlp.gate.router_mlp.out_proj.",
    ),
    ("zaya_block.router.", "mlp.gate."),
    ("zaya_block.", "mlp."),
];

/// The merged name of legacy tensor `name` in a checkpoint of `old_layers` alternating layers.
pub fn merged_name(name: &str, old_layers: usize) -> Result<Target, ImportError> {
    let bad = || {
        ImportError::Unsupported(format!(
            "zaya: '{name}' does not fit the legacy alternating attention/MoE layout the \
             checkpoint's other tensors use"
        ))
    };
    if let Some(part) = name.strip_prefix("model.res_scale.") {
        let last = (old_layers / 2).checked_sub(1).ok_or_else(bad)?;
        return Ok(Target::Rename(format!(
            "model.layers.{last}.post_mlp_residual_scale.{part}"
        )));
    }
    let Some(tail) = name.strip_prefix("model.layers.") else {
        return Ok(Target::Rename(name.to_string()));
    };
    let (n, rest) = tail.split_once('.').ok_or_else(bad)?;
    let n: usize = n.parse().map_err(|_| bad())?;
    let l = n / 2;
    if let Some(e) = rest.strip_prefix("zaya_block.experts.local_experts.") {
        let (index, proj) = e.split_once('.').ok_or_else(bad)?;
        let index = index.parse().map_err(|_| bad())?;
        let proj = match proj {
            "linear_fc1.weight" => "gate_up_proj",
            "linear_fc2.weight" => "down_proj",
            _ => return Err(bad()),
        };
        if n.is_multiple_of(2) {
            return Err(bad());
        }
        let fused = format!("model.layers.{l}.mlp.experts.{proj}");
        return Ok(Target::Expert { fused, index });
    }
    let rest = RENAMES
        .iter()
        .find_map(|(old, new)| rest.strip_prefix(old).map(|r| format!("{new}{r}")))
        .unwrap_or_else(|| rest.to_string());
    let attention = n.is_multiple_of(2);
    let merged = if let Some(part) = rest.strip_prefix("res_scale.") {
        match (attention, l) {
            (true, 0) => format!("model.input_{part}"),
            (true, _) => format!("model.layers.{}.post_mlp_residual_scale.{part}", l - 1),
            (false, _) => format!("model.layers.{l}.post_attention_residual_scale.{part}"),
        }
    } else if let Some(part) = rest.strip_prefix("input_norm.") {
        let norm = if attention {
            "input_layernorm"
        } else {
            "post_attention_layernorm"
        };
        format!("model.layers.{l}.{norm}.{part}")
    } else if (attention && rest.starts_with("self_attn."))
        || (!attention && rest.starts_with("mlp."))
    {
        format!("model.layers.{l}.{rest}")
    } else {
        return Err(bad());
    };
    Ok(Target::Rename(merged))
}

/// Where a merged name's values come from.
enum Origin {
    One(String),
    /// The experts' legacy tensors, in expert order.
    Stacked(Vec<String>),
}

/// A legacy checkpoint seen through merged names.
pub struct LegacySource<S> {
    inner: S,
    origin: HashMap<String, Origin>,
}

impl<S: TensorSource> LegacySource<S> {
    /// Maps every tensor of `inner` (a legacy checkpoint of `old_layers` layers). Experts must be
    /// numbered 0.. without a gap; a missing one is named.
    pub fn new(inner: S, old_layers: usize) -> Result<Self, ImportError> {
        let mut origin = HashMap::new();
        let mut experts: HashMap<String, Vec<(usize, String)>> = HashMap::new();
        for name in inner.names() {
            match merged_name(&name, old_layers)? {
                Target::Rename(m) => {
                    origin.insert(m, Origin::One(name));
                }
                Target::Expert { fused, index } => {
                    experts.entry(fused).or_default().push((index, name))
                }
            }
        }
        for (fused, mut parts) in experts {
            parts.sort();
            if let Some((want, (_, have))) = parts.iter().enumerate().find(|(e, p)| p.0 != *e) {
                // Expert `want` is absent: name it as the legacy checkpoint would.
                let missing = have.replacen(
                    &format!("local_experts.{}.", parts[want].0),
                    &format!("local_experts.{want}."),
                    1,
                );
                return Err(ImportError::MissingTensor(missing));
            }
            origin.insert(
                fused,
                Origin::Stacked(parts.into_iter().map(|p| p.1).collect()),
            );
        }
        Ok(LegacySource { inner, origin })
    }
}

impl<S: TensorSource> TensorSource for LegacySource<S> {
    fn has(&self, name: &str) -> bool {
        self.origin.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.origin.keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ImportError> {
        match self.origin.get(name) {
            None => Err(ImportError::MissingTensor(name.to_string())),
            Some(Origin::One(src)) => self.inner.get(src),
            Some(Origin::Stacked(parts)) => {
                let mut shape = Vec::new();
                let mut all = Vec::new();
                for p in parts {
                    let (s, v) = self.inner.get(p)?;
                    if all.is_empty() {
                        shape = s;
                    } else if s != shape {
                        return Err(ImportError::Shape {
                            name: p.clone(),
                            got: s,
                            want: shape,
                        });
                    }
                    all.extend(v);
                }
                shape.insert(0, parts.len());
                Ok((shape, all))
            }
        }
    }

    fn suggested_dtype(&self, name: &str) -> Option<DType> {
        match self.origin.get(name)? {
            Origin::One(src) => self.inner.suggested_dtype(src),
            Origin::Stacked(_) => None,
        }
    }

    fn encoded(&self, name: &str, dtype: DType) -> Result<Option<Encoded>, ImportError> {
        match self.origin.get(name) {
            Some(Origin::One(src)) => self.inner.encoded(src, dtype),
            _ => Ok(None),
        }
    }
}

/// A legacy config.json rewritten as the merged layout's (the converter's `convert_config`):
/// half the layers, per-layer lists halved, the old key names read as fallbacks.
pub fn merged_config(old: &Value) -> Result<Value, ImportError> {
    let bad = |what: &str| ImportError::Config(format!("zaya (legacy layout): {what}"));
    let Value::Object(o) = old else {
        return Err(bad("config.json is not an object"));
    };
    let mut m: Map<String, Value> = o.clone();
    let old_layers = o
        .get("num_hidden_layers")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("num_hidden_layers missing"))? as usize;
    if !old_layers.is_multiple_of(2) {
        return Err(bad(
            "num_hidden_layers must be even (alternating attention/MoE)",
        ));
    }
    let layers = old_layers / 2;
    let halve = |list: &Vec<Value>, what: &str| -> Result<Vec<Value>, ImportError> {
        match list.len() {
            n if n == old_layers => Ok(list.iter().step_by(2).cloned().collect()),
            n if n == layers => Ok(list.clone()),
            _ => Err(bad(&format!(
                "{what} matches neither the old nor the new layer count"
            ))),
        }
    };
    let windows: Vec<u64> = match o.get("swa_layers") {
        Some(Value::Array(a)) => a
            .iter()
            .map(Value::as_u64)
            .collect::<Option<_>>()
            .ok_or_else(|| bad("swa_layers holds a non-integer"))?,
        _ => Vec::new(),
    };
    let types: Vec<Value> = match o.get("layer_types") {
        Some(Value::Array(a)) => halve(a, "layer_types")?
            .into_iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(json!("hybrid")),
                Some("sliding_attention") => Ok(json!("hybrid_sliding")),
                _ => Err(bad(&format!("layer type {t}"))),
            })
            .collect::<Result<_, _>>()?,
        _ if windows.is_empty() => vec![json!("hybrid"); layers],
        _ => {
            let w: Vec<Value> = windows.iter().map(|&w| json!(w)).collect();
            halve(&w, "swa_layers")?
                .iter()
                .map(|w| {
                    json!(if w.as_u64() == Some(0) {
                        "hybrid"
                    } else {
                        "hybrid_sliding"
                    })
                })
                .collect()
        }
    };
    let get = |k: &str| o.get(k).filter(|v| !v.is_null()).cloned();
    if let Some(ffn) = get("intermediate_size").or_else(|| get("ffn_hidden_size")) {
        let ffn = ffn
            .as_u64()
            .ok_or_else(|| bad("intermediate_size is not an integer"))?;
        m.insert("moe_intermediate_size".into(), json!(ffn / 2));
    }
    for (new, old_key) in [
        ("num_experts_per_tok", "moe_router_topk"),
        ("rms_norm_eps", "norm_epsilon"),
        ("router_hidden_size", "zaya_mlp_expansion"),
    ] {
        if let Some(v) = get(new).or_else(|| get(old_key)) {
            m.insert(new.into(), v);
        }
    }
    if get("sliding_window").is_none() {
        // The original counts previous tokens; transformers' window includes the current one.
        if let Some(w) = windows.iter().copied().filter(|&w| w > 0).max() {
            m.insert("sliding_window".into(), json!(w + 1));
        }
    }
    let rope = |theta: Value| json!({"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5});
    m.insert(
        "rope_parameters".into(),
        json!({
            "hybrid": rope(get("rope_theta").unwrap_or(json!(5_000_000.0))),
            "hybrid_sliding": rope(get("swa_rotary_base").unwrap_or(json!(10_000.0))),
        }),
    );
    for k in [
        "cca",
        "num_query_groups",
        "intermediate_size",
        "ffn_hidden_size",
        "moe_router_topk",
        "norm_epsilon",
        "zaya_mlp_expansion",
        "rope_scaling",
        "swa_layers",
        "rope_theta",
        "swa_rotary_base",
    ] {
        m.remove(k);
    }
    m.insert("num_hidden_layers".into(), json!(layers));
    m.insert("layer_types".into(), Value::Array(types));
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rename(name: &str) -> String {
        match merged_name(name, 6).unwrap() {
            Target::Rename(m) => m,
            t => panic!("{name}: {t:?}"),
        }
    }

    #[test]
    fn legacy_names_map_as_transformers_converter_maps_them() {
        let cases = [
            (
                "model.layers.4.self_attn.qkv.linear_q.weight",
                "model.layers.2.self_attn.qkv_proj.q_proj.weight",
            ),
            (
                "model.layers.2.self_attn.qkv.conv_qk.1.bias",
                "model.layers.1.self_attn.qkv_proj.conv_qk_grouped.bias",
            ),
            (
                "model.layers.0.self_attn.qkv.temp",
                "model.layers.0.self_attn.qk_norm.temp",
            ),
            (
                "model.layers.3.input_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "model.layers.2.input_norm.weight",
                "model.layers.1.input_layernorm.weight",
            ),
            (
                "model.layers.0.res_scale.hidden_states_scale",
                "model.input_hidden_states_scale",
            ),
            (
                "model.layers.4.res_scale.residual_bias",
                "model.layers.1.post_mlp_residual_scale.residual_bias",
            ),
            (
                "model.layers.5.res_scale.residual_bias",
                "model.layers.2.post_attention_residual_scale.residual_bias",
            ),
            (
                "model.res_scale.hidden_states_bias",
                "model.layers.2.post_mlp_residual_scale.hidden_states_bias",
            ),
            (
                "model.layers.1.zaya_block.router.rmsnorm_eda.weight",
                "model.layers.0.mlp.gate.router_mlp.norm.weight",
            ),
            (
                "model.layers.5.zaya_block.router.router_mlp.4.weight",
                "model.layers.2.mlp.gate.router_mlp.out_proj.weight",
            ),
            (
                "model.layers.3.zaya_block.router.balancing_biases",
                "model.layers.1.mlp.gate.balancing_biases",
            ),
            ("model.embed_tokens.weight", "model.embed_tokens.weight"),
        ];
        for (old, new) in cases {
            assert_eq!(rename(old), new, "{old}");
        }
        assert_eq!(
            merged_name(
                "model.layers.3.zaya_block.experts.local_experts.7.linear_fc2.weight",
                6
            )
            .unwrap(),
            Target::Expert {
                fused: "model.layers.1.mlp.experts.down_proj".into(),
                index: 7
            }
        );
        // Experts on an attention layer, or MoE names on one, are errors, not silent renames.
        for bad in [
            "model.layers.2.zaya_block.experts.local_experts.0.linear_fc1.weight",
            "model.layers.2.zaya_block.router.balancing_biases",
            "model.layers.3.self_attn.o_proj.weight",
        ] {
            assert!(merged_name(bad, 6).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_legacy_config_halves_its_layers_and_reads_the_old_keys() {
        let old = json!({
            "model_type": "zaya", "num_hidden_layers": 6, "swa_layers": [0, 0, 63, 63, 0, 0],
            "ffn_hidden_size": 48, "moe_router_topk": 1, "norm_epsilon": 1e-5,
            "zaya_mlp_expansion": 20, "rope_theta": 5e6, "swa_rotary_base": 1e4,
        });
        let new = merged_config(&old).unwrap();
        assert_eq!(new["num_hidden_layers"], 3);
        assert_eq!(
            new["layer_types"],
            json!(["hybrid", "hybrid_sliding", "hybrid"])
        );
        assert_eq!(new["sliding_window"], 64);
        assert_eq!(new["moe_intermediate_size"], 24);
        assert_eq!(new["router_hidden_size"], 20);
        assert_eq!(new["rope_parameters"]["hybrid_sliding"]["rope_theta"], 1e4);
        assert!(new.get("swa_layers").is_none());
        let odd = json!({"model_type": "zaya", "num_hidden_layers": 5});
        assert!(merged_config(&odd).is_err());
    }
}
