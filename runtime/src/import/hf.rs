//! What every Hugging Face family shares: the declarative name layout of a checkpoint and typed
//! access to config.json fields. A family module is a layout constant plus a config function.

use serde_json::Value;

use super::ImportError;

/// How a family stores q, k and v.
#[derive(Clone, Copy, Debug)]
pub enum QkvNames {
    Separate {
        q: &'static str,
        k: &'static str,
        v: &'static str,
    },
    /// One `[q; k; v]` projection (rows: all q heads, then k heads, then v heads).
    Fused(&'static str),
}

/// Checkpoint names of a family, relative to the layer prefix where they are per layer.
#[derive(Clone, Copy, Debug)]
pub struct HfLayout {
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    /// `{layers}.{l}.` prefixes every per-layer name.
    pub layers: &'static str,
    pub attn_norm: &'static str,
    pub qkv: QkvNames,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    pub o: &'static str,
    pub ffn_norm: &'static str,
    pub router: &'static str,
    pub router_bias: Option<&'static str>,
    /// `{experts}.{e}.gate_proj.weight` (Hub) or fused `{experts}.gate_up_proj` (transformers 5).
    pub experts: &'static str,
    pub shared: Option<&'static str>,
    /// Dense layers' MLP prefix.
    pub dense_mlp: &'static str,
}

impl HfLayout {
    pub fn layer(&self, l: usize, name: &str) -> String {
        format!("{}.{l}.{name}", self.layers)
    }
}

/// Typed reads of config.json with errors naming the field.
pub struct HfConfig<'a> {
    pub json: &'a Value,
    pub family: &'static str,
}

impl HfConfig<'_> {
    fn err(&self, field: &str, detail: &str) -> ImportError {
        ImportError::Config(format!("{}: field '{field}' {detail}", self.family))
    }

    pub fn get(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize, ImportError> {
        self.get(field)
            .ok_or_else(|| self.err(field, "is missing"))?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| self.err(field, "is not a non-negative integer"))
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize, ImportError> {
        if self.get(field).is_none() {
            return Ok(default);
        }
        self.usize(field)
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64, ImportError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(field, "is not a number")),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool, ImportError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, "is not a boolean")),
        }
    }

    pub fn str_or<'s>(&'s self, field: &str, default: &'s str) -> Result<&'s str, ImportError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.err(field, "is not a string")),
        }
    }

    pub fn usize_list(&self, field: &str) -> Result<Vec<usize>, ImportError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.err(field, "is not a list of integers")),
            Some(_) => Err(self.err(field, "is not a list")),
        }
    }

    /// RoPE base: transformers 5 writes it under `rope_parameters`, older configs at the top level.
    /// Any scaling other than the default changes the math and is refused.
    pub fn rope_theta(&self, default: f64) -> Result<f64, ImportError> {
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(p) = self.get(key) {
                let kind = p
                    .get("rope_type")
                    .or_else(|| p.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(ImportError::Unsupported(format!(
                        "{}: RoPE scaling '{kind}' ({key})",
                        self.family
                    )));
                }
                if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
                    return Ok(t);
                }
            }
        }
        self.f64_or("rope_theta", default)
    }

    /// Refuses a config field whose value changes the math in a way edgediff does not implement.
    pub fn refuse_if(
        &self,
        field: &str,
        changes_math: impl Fn(&Value) -> bool,
    ) -> Result<(), ImportError> {
        match self.get(field) {
            Some(v) if changes_math(v) => Err(ImportError::Unsupported(format!(
                "{}: config field '{field}' = {v} is not supported",
                self.family
            ))),
            _ => Ok(()),
        }
    }
}

pub fn truthy(v: &Value) -> bool {
    v.as_bool().unwrap_or(false)
}
