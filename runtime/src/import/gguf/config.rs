//! GGUF metadata (`{arch}.block_count`, `{arch}.attention.head_count`, …) → [`ModelConfig`] and
//! decoding defaults, per llama.cpp architecture name. The dense families run as AR models; the
//! two diffusion families (LLaDA-MoE `llada-moe`, LLaDA2 / Ling `bailingmoe2`) predict in place.

use crate::format::gguf::{GgufFile, MetaValue};
use crate::import::dense::no_experts;
use crate::import::ImportError;
use crate::model::{Architecture, Gating, ModelConfig, MoeConfig, Prediction, QkNorm};

/// The GGUF architectures edgediff converts.
pub const SUPPORTED: &str = "llama, qwen3, qwen3moe, olmoe, llada-moe, bailingmoe2";

/// A GGUF architecture, as llama.cpp names it, and what edgediff makes of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub gguf: &'static str,
    pub arch: Architecture,
    /// llama.cpp's converter permuted q/k rows for its interleaved RoPE (llama only).
    pub permuted_qk: bool,
    pub prediction: Prediction,
}

pub fn family(name: &str) -> Result<Family, ImportError> {
    let f = |gguf, arch, permuted_qk, prediction| Family {
        gguf,
        arch,
        permuted_qk,
        prediction,
    };
    use Architecture as A;
    use Prediction::{InPlace, NextToken};
    Ok(match name {
        "llama" => f("llama", A::Llama, true, NextToken),
        "qwen3" => f("qwen3", A::Qwen3, false, NextToken),
        "qwen3moe" => f("qwen3moe", A::Qwen3Moe, false, NextToken),
        "olmoe" => f("olmoe", A::Olmoe, false, NextToken),
        // Qwen3-MoE's shape (per-head q/k norm, softmax top-k without renormalisation), trained
        // as a masked-diffusion model (llama.cpp runs it with non-causal attention).
        "llada-moe" => f("llada-moe", A::Qwen3Moe, false, InPlace),
        "bailingmoe2" => f("bailingmoe2", A::Llada2Moe, false, InPlace),
        "qwen2" => {
            return Err(ImportError::Unsupported(
                "GGUF architecture qwen2: biases on the q/k/v projections are not implemented"
                    .into(),
            ))
        }
        other => {
            return Err(ImportError::UnsupportedArchitecture(format!(
                "{other} (GGUF; supported: {SUPPORTED})"
            )))
        }
    })
}

/// Typed reads of `{arch}.…` keys with errors naming the key.
struct Keys<'a> {
    f: &'a GgufFile,
    arch: &'a str,
}

impl Keys<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }
    fn get(&self, k: &str) -> Option<&MetaValue> {
        self.f.get(&self.key(k))
    }
    fn err(&self, k: &str, detail: &str) -> ImportError {
        ImportError::Config(format!("GGUF metadata '{}' {detail}", self.key(k)))
    }
    fn usize(&self, k: &str) -> Result<usize, ImportError> {
        let v = self.get(k).ok_or_else(|| self.err(k, "is missing"))?;
        v.as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                self.err(
                    k,
                    "is not a non-negative integer (per-layer arrays are not supported)",
                )
            })
    }
    fn usize_or(&self, k: &str, default: usize) -> Result<usize, ImportError> {
        match self.get(k) {
            None => Ok(default),
            Some(_) => self.usize(k),
        }
    }
    fn f64_or(&self, k: &str, default: f64) -> Result<f64, ImportError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(k, "is not a number")),
        }
    }
    fn bool_or(&self, k: &str, default: bool) -> Result<bool, ImportError> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(k, "is not a boolean")),
        }
    }
}

fn has_tensor(f: &GgufFile, suffix: &str) -> bool {
    f.header.tensors.iter().any(|t| t.name.ends_with(suffix))
}

/// The model config of a GGUF file of family `fam`.
pub fn model_config(f: &GgufFile, fam: Family) -> Result<ModelConfig, ImportError> {
    let k = Keys { f, arch: fam.gguf };
    let hidden = k.usize("embedding_length")?;
    let heads = k.usize("attention.head_count")?;
    let head_dim = k.usize_or("attention.key_length", hidden / heads.max(1))?;
    if k.usize_or("attention.value_length", head_dim)? != head_dim {
        return Err(ImportError::Unsupported(
            "value heads of another size than key heads".into(),
        ));
    }
    let layers = k.usize("block_count")?;
    let rotary_dim = k.usize_or("rope.dimension_count", head_dim)?;
    if let Some(kind) = k.get("rope.scaling.type").and_then(MetaValue::as_str) {
        let factor = k.f64_or("rope.scaling.factor", 1.0)?;
        if kind != "none" && factor != 1.0 {
            return Err(ImportError::Unsupported(format!(
                "RoPE scaling '{kind}' × {factor}"
            )));
        }
    }
    if k.usize_or("nextn_predict_layers", 0)? > 0 {
        return Err(ImportError::Unsupported(
            "multi-token-prediction (NextN) layers".into(),
        ));
    }
    let vocab = f
        .tensor_info("token_embd.weight")
        .map(|t| t.shape()[0])
        .ok_or_else(|| ImportError::MissingTensor("token_embd.weight".into()))?;
    let experts = k.usize_or("expert_count", 0)?;
    let expert_ffn = k.usize_or("expert_feed_forward_length", 0)?;
    let top_k = k.usize_or("expert_used_count", 0)?;
    let moe = |gating, shared_ffn, router_bias| MoeConfig {
        num_experts: experts,
        top_k,
        expert_ffn,
        shared_ffn,
        gating,
        router_bias,
    };
    let dense_ffn = k.usize_or("feed_forward_length", 0)?;
    let (qk_norm, moe, dense_layers, clip_qkv) = match fam.gguf {
        "llama" => (QkNorm::None, no_experts(), (0..layers).collect(), None),
        "qwen3" => (QkNorm::PerHead, no_experts(), (0..layers).collect(), None),
        // llama.cpp renormalises qwen3moe's top-k weights; llada-moe's not.
        "qwen3moe" | "llada-moe" => (
            QkNorm::PerHead,
            moe(
                Gating::Softmax {
                    renormalize: fam.gguf == "qwen3moe",
                },
                0,
                false,
            ),
            Vec::new(),
            None,
        ),
        "olmoe" => {
            let clip = k.get("attention.clamp_kqv").and_then(MetaValue::as_f64);
            (
                QkNorm::Whole,
                moe(Gating::Softmax { renormalize: false }, 0, false),
                Vec::new(),
                clip.map(|c| c as f32),
            )
        }
        "bailingmoe2" => {
            if k.usize_or("expert_gating_func", 2)? != 2 {
                return Err(ImportError::Unsupported(
                    "bailingmoe2 with a softmax router".into(),
                ));
            }
            let shared = k.usize_or("expert_shared_count", 0)?
                * k.usize_or("expert_shared_feed_forward_length", expert_ffn)?;
            let gating = Gating::SigmoidGrouped {
                groups: k.usize_or("expert_group_count", 1)?,
                top_groups: k.usize_or("expert_group_used_count", 1)?,
                scale: k.f64_or("expert_weights_scale", 1.0)? as f32,
                renormalize: k.bool_or("expert_weights_norm", true)?,
            };
            let leading = k.usize_or("leading_dense_block_count", 0)?.min(layers);
            (
                QkNorm::PerHead,
                // The selection bias is optional in llama.cpp's loader.
                moe(gating, shared, has_tensor(f, ".exp_probs_b.bias")),
                (0..leading).collect(),
                None,
            )
        }
        other => unreachable!("family() admits {other}"),
    };
    let config = ModelConfig {
        architecture: fam.arch,
        vocab_size: vocab,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: k.usize_or("attention.head_count_kv", heads)?,
        head_dim,
        rope_theta: k.f64_or("rope.freq_base", 10000.0)?,
        rotary_dim,
        rms_norm_eps: k.f64_or("attention.layer_norm_rms_epsilon", 1e-6)?,
        max_position: k.usize_or("context_length", 4096)?,
        qk_norm,
        clip_qkv,
        moe,
        dense_ffn,
        dense_layers,
        tie_embeddings: f.tensor_info("output.weight").is_none(),
        attention: Default::default(),
        router: Default::default(),
        residual: Default::default(),
        embedding: Default::default(),
        sliding: Default::default(),
        block: Default::default(),
    };
    config
        .validate()
        .map_err(|e| ImportError::Config(e.to_string()))?;
    Ok(config)
}
