//! The model: weights loaded onto a backend and the forward pass, written once for every family.
//!
//! Per layer: `h = norm(x)`; fused qkv projection; q/k norm + RoPE; attention over the KV cache;
//! output projection; `x += attn`; `h = norm(x)`; dense SwiGLU MLP or routed experts (+ shared
//! expert); `x += ffn`. Then the final norm and the LM head reduced to per-position statistics.
//! Tensor names are the canonical ones of docs/FORMAT.md, written by `import/`.

mod config;

use std::ops::Range;
use std::sync::Arc;

pub use config::{Architecture, ConfigError, Gating, ModelConfig, MoeConfig, Prediction, QkNorm};

use crate::backend::{AttnMask, Backend, BackendError, PositionStats};
use crate::format::{DType, EdmFile, FormatError, TensorView};

/// Canonical tensor names inside a model file.
pub mod names {
    pub const EMBED: &str = "embed";
    pub const FINAL_NORM: &str = "final_norm";
    pub const LM_HEAD: &str = "lm_head";
    pub fn layer(l: usize, what: &str) -> String {
        format!("layers.{l}.{what}")
    }
    pub const ATTN_NORM: &str = "attn_norm";
    pub const QKV: &str = "attn.qkv";
    pub const Q_NORM: &str = "attn.q_norm";
    pub const K_NORM: &str = "attn.k_norm";
    pub const O: &str = "attn.o";
    pub const FFN_NORM: &str = "ffn_norm";
    pub const MLP_GATE_UP: &str = "mlp.gate_up";
    pub const MLP_DOWN: &str = "mlp.down";
    pub const ROUTER: &str = "moe.router";
    pub const ROUTER_BIAS: &str = "moe.router_bias";
    pub const SHARED_GATE_UP: &str = "moe.shared.gate_up";
    pub const SHARED_DOWN: &str = "moe.shared.down";
    /// Parts of one routed expert.
    pub const EXPERT_GATE_UP: &str = "gate_up";
    pub const EXPERT_DOWN: &str = "down";
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("tensor '{name}' has shape {got:?}, the config needs {want:?}")]
    TensorShape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error(
        "forward over positions {start}..{end} does not fit the KV cache / context of {limit}"
    )]
    Context {
        start: usize,
        end: usize,
        limit: usize,
    },
    #[error("empty token list")]
    NoTokens,
}

struct Mlp<B: Backend> {
    gate_up: B::Weight,
    down: B::Weight,
}

enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Moe {
        router: B::Weight,
        router_bias: Option<B::Weight>,
        experts: B::Experts,
        shared: Option<Mlp<B>>,
    },
}

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    qkv: B::Weight,
    q_norm: Option<B::Weight>,
    k_norm: Option<B::Weight>,
    o: B::Weight,
    ffn_norm: B::Weight,
    ffn: FeedForward<B>,
}

/// What a forward pass returns.
#[derive(Clone, Debug, Default)]
pub struct ForwardOutput {
    /// Statistics of the requested rows.
    pub stats: Vec<PositionStats>,
    /// Full logits `[rows, vocab]` when asked for.
    pub logits: Option<Vec<f32>>,
    /// Per MoE layer, the `(ids, weights)` of the routing when asked for (profiles, paging).
    pub routing: Vec<(usize, Vec<u32>, Vec<f32>)>,
}

/// Where a forward pass sits: its tokens occupy positions `start..start+T`, their K/V are written
/// to the cache there, and each query attends to the cached positions `0..kv_len` that `mask`
/// allows (`kv_len ≥ start + T`; larger values let a block see cached positions after it, as
/// Fast-dLLM's dual cache does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub kv_len: usize,
    pub mask: AttnMask,
}

impl Window {
    /// A block at `start` seeing everything up to its own end.
    pub fn block(start: usize, len: usize, mask: AttnMask) -> Self {
        Window {
            start,
            kv_len: start + len,
            mask,
        }
    }
}

/// What to compute besides the hidden states.
#[derive(Clone, Debug, Default)]
pub struct ForwardRequest {
    /// Rows (relative to the block) whose statistics are wanted; `None` = all.
    pub rows: Option<Range<usize>>,
    pub logits: bool,
    pub routing: bool,
}

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub file: Arc<EdmFile>,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Weight,
    /// `None` when tied to the embedding.
    lm_head: Option<B::Weight>,
}

impl<B: Backend> Model<B> {
    /// Loads every dense weight and the experts `resident(layer, expert)` allows.
    pub fn load(
        backend: &B,
        file: Arc<EdmFile>,
        resident: &dyn Fn(usize, usize) -> bool,
    ) -> Result<Self, ModelError> {
        let f = file.clone();
        Self::load_with_experts(backend, file, &mut |l| {
            backend.load_experts(&f, l, &|e| resident(l, e))
        })
    }

    /// Replaces the router's selection bias of the given MoE layers (a resident set's mask, see
    /// `experts::prune::masked_router_biases`) and turns the bias on for every layer that got one.
    pub fn set_router_biases(
        &mut self,
        backend: &B,
        biases: &[(usize, Vec<f32>)],
    ) -> Result<(), ModelError> {
        let n = self.config.moe.num_experts;
        for (l, bias) in biases {
            let name = names::layer(*l, names::ROUTER_BIAS);
            let Some(FeedForward::Moe { router_bias, .. }) =
                self.layers.get_mut(*l).map(|x| &mut x.ffn)
            else {
                return Err(FormatError::MissingTensor(format!(
                    "{name} (layer {l} has no router)"
                ))
                .into());
            };
            if bias.len() != n {
                return Err(ModelError::TensorShape {
                    name,
                    got: vec![bias.len()],
                    want: vec![n],
                });
            }
            let view = TensorView {
                name: &name,
                dtype: DType::F32,
                shape: &[n],
                bytes: bytemuck::cast_slice(bias),
            };
            *router_bias = Some(backend.load_weight(view)?);
        }
        if !biases.is_empty() {
            self.config.moe.router_bias = true;
        }
        Ok(())
    }

    /// Loads every dense weight; each MoE layer's experts come from `experts(layer)` (e.g. paged
    /// through a pool instead of loaded up front).
    pub fn load_with_experts(
        backend: &B,
        file: Arc<EdmFile>,
        experts: &mut dyn FnMut(usize) -> Result<B::Experts, BackendError>,
    ) -> Result<Self, ModelError> {
        let c = file.header.metadata.config.clone();
        let (h, v) = (c.hidden_size, c.vocab_size);
        let get = |name: &str, want: &[usize]| -> Result<B::Weight, ModelError> {
            let view = file.tensor(name)?;
            if view.shape != want {
                return Err(ModelError::TensorShape {
                    name: name.into(),
                    got: view.shape.to_vec(),
                    want: want.to_vec(),
                });
            }
            let w = backend.load_weight(view)?;
            if backend.weights_leave_host() {
                // Uploaded: host memory keeps no copy of the dense weights.
                file.release_view(view.bytes);
            }
            Ok(w)
        };
        let mlp = |l: usize, gu: &str, down: &str, inter: usize| -> Result<Mlp<B>, ModelError> {
            Ok(Mlp {
                gate_up: get(&names::layer(l, gu), &[2 * inter, h])?,
                down: get(&names::layer(l, down), &[h, inter])?,
            })
        };
        let embed = get(names::EMBED, &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let n = |s: &str| names::layer(l, s);
            let (q_norm, k_norm) = match c.qk_norm {
                QkNorm::None => (None, None),
                QkNorm::PerHead => (
                    Some(get(&n(names::Q_NORM), &[c.head_dim])?),
                    Some(get(&n(names::K_NORM), &[c.head_dim])?),
                ),
                QkNorm::Whole => (
                    Some(get(&n(names::Q_NORM), &[c.q_dim()])?),
                    Some(get(&n(names::K_NORM), &[c.kv_dim()])?),
                ),
            };
            let ffn = if c.is_moe_layer(l) {
                check_expert_shapes(&file, &c, l)?;
                FeedForward::Moe {
                    router: get(&n(names::ROUTER), &[c.moe.num_experts, h])?,
                    router_bias: if c.moe.router_bias {
                        Some(get(&n(names::ROUTER_BIAS), &[c.moe.num_experts])?)
                    } else {
                        None
                    },
                    experts: experts(l)?,
                    shared: if c.moe.shared_ffn > 0 {
                        Some(mlp(
                            l,
                            names::SHARED_GATE_UP,
                            names::SHARED_DOWN,
                            c.moe.shared_ffn,
                        )?)
                    } else {
                        None
                    },
                }
            } else {
                FeedForward::Dense(mlp(l, names::MLP_GATE_UP, names::MLP_DOWN, c.dense_ffn)?)
            };
            layers.push(Layer {
                attn_norm: get(&n(names::ATTN_NORM), &[h])?,
                qkv: get(&n(names::QKV), &[c.qkv_dim(), h])?,
                q_norm,
                k_norm,
                o: get(&n(names::O), &[h, c.q_dim()])?,
                ffn_norm: get(&n(names::FFN_NORM), &[h])?,
                ffn,
            });
        }
        let final_norm = get(names::FINAL_NORM, &[h])?;
        let lm_head = if c.tie_embeddings {
            None
        } else {
            Some(get(names::LM_HEAD, &[v, h])?)
        };
        Ok(Model {
            config: c,
            file,
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    pub fn new_kv(&self, backend: &B, capacity: usize) -> Result<B::Kv, ModelError> {
        Ok(backend.new_kv(&self.config, capacity.min(self.config.max_position))?)
    }

    /// Runs `tokens` in `window` (see [`Window`]).
    pub fn forward(
        &self,
        b: &B,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        // A GPU pass over paged experts that met a non-resident one asks to be run again (see
        // backend/gpu/experts.rs); the re-run brings experts in layer by layer and cannot miss.
        // Running it again is harmless: it rewrites the same K/V positions.
        let mut tries = 0;
        loop {
            match self.forward_once(b, kv, tokens, window, want) {
                Err(ModelError::Backend(BackendError::RerunPass)) if tries < 2 => tries += 1,
                r => return r,
            }
        }
    }

    fn forward_once(
        &self,
        b: &B,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        let c = &self.config;
        let Window {
            start,
            kv_len,
            mask,
        } = window;
        let end = start + tokens.len();
        let limit = b.kv_capacity(kv).min(c.max_position);
        if tokens.is_empty() {
            return Err(ModelError::NoTokens);
        }
        if end > limit || kv_len > limit || kv_len < end {
            return Err(ModelError::Context {
                start,
                end: end.max(kv_len),
                limit,
            });
        }
        let eps = c.rms_norm_eps as f32;
        b.begin_forward(tokens.len())?;
        let mut x = b.embed(&self.embed, tokens)?; // (T, H)
        let mut h = b.rms_norm(&x, &self.layers[0].attn_norm, eps)?;
        let mut out = ForwardOutput::default();
        for (l, layer) in self.layers.iter().enumerate() {
            let mut qkv = b.matmul(&layer.qkv, &h)?; // (T, (nq + 2 nkv) · hd)
            b.qk_norm_rope(
                &mut qkv,
                layer.q_norm.as_ref(),
                layer.k_norm.as_ref(),
                c,
                start,
            )?;
            let attn = b.attention(&qkv, kv, l, c, start, kv_len, mask)?; // (T, nq · hd)
            let o = b.matmul(&layer.o, &attn)?; // (T, H)
            h = b.add_rms_norm(&mut x, &o, &layer.ffn_norm, eps)?;
            let ffn = match &layer.ffn {
                FeedForward::Dense(m) => b.mlp(&m.gate_up, &m.down, &h)?,
                FeedForward::Moe {
                    router,
                    router_bias,
                    experts,
                    shared,
                } => {
                    let routing = b.route(&h, router, router_bias.as_ref(), c)?;
                    if want.routing {
                        let (ids, w) = b.routing_to_host(&routing)?;
                        out.routing.push((l, ids, w));
                    }
                    match shared {
                        // The shared experts first, so the routed sum can add them in its last
                        // step (one kernel fewer on the GPU).
                        Some(s) => {
                            let ys = b.mlp(&s.gate_up, &s.down, &h)?;
                            b.moe_plus_shared(&h, &routing, experts, &ys)?
                        }
                        None => b.moe(&h, &routing, experts)?,
                    }
                }
            };
            let next_norm = self
                .layers
                .get(l + 1)
                .map_or(&self.final_norm, |n| &n.attn_norm);
            h = b.add_rms_norm(&mut x, &ffn, next_norm, eps)?;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let rows = want.rows.clone().unwrap_or(0..tokens.len());
        out.stats = b.lm_head_stats(&h, head, rows.clone())?;
        if want.logits {
            out.logits = Some(b.logits(&h, head, rows)?);
        }
        Ok(out)
    }
}

fn check_expert_shapes(file: &EdmFile, c: &ModelConfig, l: usize) -> Result<(), ModelError> {
    let (h, i) = (c.hidden_size, c.moe.expert_ffn);
    let table = file
        .expert_table(l)
        .ok_or_else(|| FormatError::MissingTensor(format!("expert table of layer {l}")))?;
    for (part, want) in [
        (names::EXPERT_GATE_UP, [2 * i, h]),
        (names::EXPERT_DOWN, [h, i]),
    ] {
        let p =
            table.parts.iter().find(|p| p.name == part).ok_or_else(|| {
                FormatError::MissingTensor(format!("layer {l} expert part {part}"))
            })?;
        if p.shape != want {
            return Err(ModelError::TensorShape {
                name: format!("layers.{l}.experts.{part}"),
                got: p.shape.clone(),
                want: want.to_vec(),
            });
        }
    }
    Ok(())
}
