//! DiffusionGemma's two passes over one set of weights (transformers' `modeling_diffusion_gemma.py`,
//! 5.17; docs/FORMAT.md "DiffusionGemma"):
//!
//! - **encode**: a causal pass over committed text at positions `start..start+T` that writes the
//!   KV cache (sliding layers see the `window` keys up to and including the query);
//! - **denoise**: a bidirectional pass over a canvas at `start..start+C` that reads the cached
//!   prefix (sliding layers: its last `window − 1` positions, as transformers' sliding cache layers
//!   hold them; global layers: all of it) and the whole canvas. Its K/V go to the cache at the
//!   canvas's positions as scratch, which the next encode of the committed canvas overwrites.
//!   The canvas input is `post_norm(e·√H + sc)`, where `sc` is the self-conditioning GeGLU block
//!   over `pre_norm(softmax(previous logits) · E · √H)` (0 on a first step, without logits).
//!
//! Every layer (Gemma 4's sandwich block, shared by both passes):
//! ```text
//! x += attn_post_norm(o · attention(heads(qkv · attn_norm(x))))
//! f  = mlp_post_norm(GeGLU(ffn_norm(x))) + moe_post_norm(experts_GeGLU(moe_norm(x); route(x)))
//! x  = (x + ffn_post_norm(f)) · layer_scalar
//! ```
//! with per-head q/k RMSNorm, weightless v norm, score scale 1; sliding layers of `head_dim`
//! with full RoPE θ_local, global layers of `global.head_dim` with K = V and proportional RoPE;
//! the router on the raw residual (`RouterKind::ScaledNorm`). Logits: `final_norm`, the tied
//! embedding, `cap · tanh(· / cap)`.
//!
//! The layer is a different block from [`super::Model`]'s (norms after each block, the dense
//! MLP beside the experts, two passes with different attention rules and inputs), so it is its
//! own small model over the same backend ops; the ops it adds are the backend's (CPU reference in
//! `backend/cpu/gemma.rs`, GPU kernels in `backend/gpu/ops/{gemma,heads,soft_embed}.rs`).

use std::sync::Arc;

use super::{names, ForwardOutput, ForwardRequest, ModelConfig, ModelError};
use crate::arch::{FfnLayout, NormLayout, RouterKind};
use crate::backend::draw::{CanvasHeadParams, RowDraw};
use crate::backend::{AttnMask, Backend, BackendError, HeadsParams, ScaledRouterParams};
use crate::format::{DType, EdmFile, TensorView};

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    qkv: B::Weight,
    q_norm: B::Weight,
    k_norm: B::Weight,
    o: B::Weight,
    attn_post_norm: B::Weight,
    ffn_norm: B::Weight,
    mlp_gate_up: B::Weight,
    mlp_down: B::Weight,
    mlp_post_norm: B::Weight,
    moe_norm: B::Weight,
    moe_post_norm: B::Weight,
    ffn_post_norm: B::Weight,
    router: B::Weight,
    router_scale: B::Weight,
    expert_scale: B::Weight,
    experts: B::Experts,
    /// `layer_scalar` of the canvas decoder, then of the encoder (transformers keeps one buffer
    /// per module; checkpoints may differ).
    scalar: [f32; 2],
}

struct SelfCond<B: Backend> {
    norm: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
}

/// Which of the two passes runs.
enum Pass<'a, A> {
    Encode,
    Denoise { self_cond: SelfCondIn<'a, A> },
}

/// The decoder pass's self-conditioning input.
enum SelfCondIn<'a, A> {
    /// The first step: none.
    None,
    /// The previous step's tempered logits `[C, vocab]` on the host.
    Logits(&'a [f32]),
    /// Their soft embeddings, already where the pass runs ([`Backend::canvas_head`]).
    Embedded(&'a A),
}

pub struct CanvasModel<B: Backend> {
    pub config: ModelConfig,
    pub file: Arc<EdmFile>,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Weight,
    /// Weight of the weightless norms (ones).
    ones: B::Weight,
    self_cond: SelfCond<B>,
    embed_scale: f32,
}

impl<B: Backend> CanvasModel<B> {
    /// Loads every weight (all experts resident).
    pub fn load(backend: &B, file: Arc<EdmFile>) -> Result<Self, ModelError> {
        let f = file.clone();
        Self::load_with_experts(backend, file, &mut |l| {
            backend.load_experts(&f, l, &|_| true)
        })
    }

    /// Loads every dense weight; each layer's experts come from `experts(layer)` (e.g. paged
    /// through a bounded pool, `experts::paging::load_paged_canvas`).
    pub fn load_with_experts(
        backend: &B,
        file: Arc<EdmFile>,
        experts: &mut dyn FnMut(usize) -> Result<B::Experts, BackendError>,
    ) -> Result<Self, ModelError> {
        let c = file.header.metadata.config.clone();
        let unsupported = |what: &'static str| -> ModelError { backend.unsupported(what).into() };
        if c.block.norms != NormLayout::Sandwich
            || c.block.ffn != FfnLayout::DenseAndMoe
            || c.router != RouterKind::ScaledNorm
        {
            return Err(unsupported("a canvas model without the sandwich block"));
        }
        if !backend.has_canvas_ops() {
            return Err(unsupported("DiffusionGemma's canvas ops"));
        }
        let canvas = c
            .block
            .canvas
            .clone()
            .ok_or_else(|| unsupported("a canvas model without a canvas decoder"))?;
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
                // Uploaded: host memory keeps no copy of the dense weights (as `Model::load`).
                file.release_view(view.bytes);
            }
            Ok(w)
        };
        let ones_data = vec![1.0f32; h];
        let ones = backend.load_weight(TensorView {
            name: "ones",
            dtype: DType::F32,
            shape: &[h],
            bytes: bytemuck::cast_slice(&ones_data),
        })?;
        let (e, f) = (c.moe.num_experts, c.dense_ffn);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let n = |s: &str| names::layer(l, s);
            let g = c.attn_of(l);
            super::check_expert_shapes(&file, &c, l)?;
            let scalar_name = n(names::LAYER_SCALAR);
            let view = file.tensor(&scalar_name)?;
            let scalar = match (view.shape, view.to_f32()?.as_slice()) {
                ([2, 1], &[dec, enc]) => [dec, enc],
                (s, _) => {
                    return Err(ModelError::TensorShape {
                        name: scalar_name,
                        got: s.to_vec(),
                        want: vec![2, 1],
                    })
                }
            };
            layers.push(Layer {
                attn_norm: get(&n(names::ATTN_NORM), &[h])?,
                qkv: get(&n(names::QKV), &[g.proj_dim(), h])?,
                q_norm: get(&n(names::Q_NORM), &[g.head_dim])?,
                k_norm: get(&n(names::K_NORM), &[g.head_dim])?,
                o: get(&n(names::O), &[h, g.q_dim()])?,
                attn_post_norm: get(&n(names::ATTN_POST_NORM), &[h])?,
                ffn_norm: get(&n(names::FFN_NORM), &[h])?,
                mlp_gate_up: get(&n(names::MLP_GATE_UP), &[2 * f, h])?,
                mlp_down: get(&n(names::MLP_DOWN), &[h, f])?,
                mlp_post_norm: get(&n(names::MLP_POST_NORM), &[h])?,
                moe_norm: get(&n(names::MOE_NORM), &[h])?,
                moe_post_norm: get(&n(names::MOE_POST_NORM), &[h])?,
                ffn_post_norm: get(&n(names::FFN_POST_NORM), &[h])?,
                router: get(&n(names::ROUTER), &[e, h])?,
                router_scale: get(&n(names::ROUTER_SCALE), &[h])?,
                expert_scale: get(&n(names::EXPERT_SCALE), &[e])?,
                experts: experts(l)?,
                scalar,
            });
        }
        let sc = canvas.self_cond_ffn;
        Ok(CanvasModel {
            embed: get(names::EMBED, &[v, h])?,
            final_norm: get(names::FINAL_NORM, &[h])?,
            self_cond: SelfCond {
                norm: get(names::SELF_COND_NORM, &[h])?,
                gate_up: get(names::SELF_COND_GATE_UP, &[2 * sc, h])?,
                down: get(names::SELF_COND_DOWN, &[h, sc])?,
            },
            embed_scale: (h as f64).sqrt() as f32,
            ones,
            layers,
            config: c,
            file,
        })
    }

    pub fn new_kv(&self, backend: &B, capacity: usize) -> Result<B::Kv, ModelError> {
        Ok(backend.new_kv(&self.config, capacity.min(self.config.max_position))?)
    }

    /// The encoder pass: `tokens` (committed text) at `start..`, causal; writes their K/V.
    pub fn encode(
        &self,
        b: &B,
        kv: &mut B::Kv,
        tokens: &[u32],
        start: usize,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        self.pass(b, kv, tokens, start, Pass::Encode, want)
    }

    /// The decoder pass over `canvas` at `start..` (the committed prefix `0..start` cached by
    /// [`CanvasModel::encode`]), with the previous step's logits `[C, vocab]` for
    /// self-conditioning (`None` on the first step).
    pub fn denoise(
        &self,
        b: &B,
        kv: &mut B::Kv,
        canvas: &[u32],
        start: usize,
        self_cond: Option<&[f32]>,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        if let Some(l) = self_cond {
            if l.len() != canvas.len() * self.config.vocab_size {
                return Err(BackendError::Shape {
                    op: "denoise",
                    detail: format!(
                        "{} self-conditioning logits for a canvas of {} over {} tokens",
                        l.len(),
                        canvas.len(),
                        self.config.vocab_size
                    ),
                }
                .into());
            }
        }
        let self_cond = self_cond.map_or(SelfCondIn::None, SelfCondIn::Logits);
        self.pass(b, kv, canvas, start, Pass::Denoise { self_cond }, want)
    }

    /// One step of the canvas sampler: the decoder pass over `canvas` (as
    /// [`CanvasModel::denoise`]) with the self-conditioning input the previous step's
    /// [`Backend::canvas_head`] left (`None` on the first step), then this step's head at
    /// `temperature`: a draw per canvas position for `uniforms` and, with `next_input`, the next
    /// step's input.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_step(
        &self,
        b: &B,
        kv: &mut B::Kv,
        canvas: &[u32],
        start: usize,
        self_cond: Option<&B::Act>,
        temperature: f32,
        uniforms: &[f32],
        next_input: bool,
    ) -> Result<(Vec<RowDraw>, Option<B::Act>), ModelError> {
        let self_cond = self_cond.map_or(SelfCondIn::None, SelfCondIn::Embedded);
        let pass = Pass::Denoise { self_cond };
        let p = CanvasHeadParams {
            cap: self.config.block.logit_softcap,
            temperature,
            embed_scale: self.embed_scale,
            next_input,
        };
        let plain = ForwardRequest::default();
        rerun_if_asked(|| {
            let (h, _) = self.pass_once(b, kv, canvas, start, &pass, &plain)?;
            Ok(b.canvas_head(&h, &self.embed, p, uniforms)?)
        })
    }

    fn pass(
        &self,
        b: &B,
        kv: &mut B::Kv,
        tokens: &[u32],
        start: usize,
        pass: Pass<'_, B::Act>,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        rerun_if_asked(|| {
            let (h, mut out) = self.pass_once(b, kv, tokens, start, &pass, want)?;
            self.head(b, &h, tokens.len(), want, &mut out)?;
            Ok(out)
        })
    }

    fn pass_once(
        &self,
        b: &B,
        kv: &mut B::Kv,
        tokens: &[u32],
        start: usize,
        pass: &Pass<'_, B::Act>,
        want: &ForwardRequest,
    ) -> Result<(B::Act, ForwardOutput), ModelError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ModelError::NoTokens);
        }
        let end = start + tokens.len();
        let limit = b.kv_capacity(kv).min(c.max_position);
        if end > limit {
            return Err(ModelError::Context { start, end, limit });
        }
        if want.blocks.is_some() {
            return Err(b.unsupported("block routing of a canvas model").into());
        }
        let eps = c.rms_norm_eps as f32;
        let act = c.block.activation;
        // A pass of its own (the GPU resets what a batched pass left, e.g. its row class).
        b.begin_forward(tokens.len(), tokens.len())?;
        let mut x = b.embed(&self.embed, tokens)?; // (T, H)
        b.scale(&mut x, self.embed_scale)?;
        let (mask, window_at_start, decoder) = match pass {
            Pass::Encode => (AttnMask::Causal, false, false),
            Pass::Denoise { self_cond } => {
                let fresh;
                let soft = match self_cond {
                    SelfCondIn::None => None,
                    SelfCondIn::Logits(logits) => {
                        fresh = b.soft_embed(logits, &self.embed, self.embed_scale)?;
                        Some(&fresh)
                    }
                    SelfCondIn::Embedded(soft) => Some(*soft),
                };
                if let Some(soft) = soft {
                    let normed = b.rms_norm(soft, &self.self_cond.norm, eps)?;
                    let signal =
                        b.gated_mlp(&self.self_cond.gate_up, &self.self_cond.down, &normed, act)?;
                    b.add(&mut x, &signal)?;
                }
                // Without logits the block's signal is 0 (every piece maps 0 to 0).
                x = b.rms_norm(&x, &self.ones, eps)?;
                (AttnMask::Bidirectional, true, true)
            }
        };
        let scale = c.block.attn_scale;
        let mut out = ForwardOutput::default();
        for (l, layer) in self.layers.iter().enumerate() {
            let geom = c.attn_of(l);
            let p = HeadsParams {
                layer: l,
                geom,
                eps,
                v_norm: c.block.v_norm,
                scale: scale.unwrap_or(1.0 / (geom.head_dim as f32).sqrt()),
                start,
                kv_len: end,
                mask,
                window_at_start,
            };
            let h = b.rms_norm(&x, &layer.attn_norm, eps)?;
            let proj = b.matmul(&layer.qkv, &h)?; // (T, q + k [+ v])
            let qkv = b.prepare_heads(&proj, &layer.q_norm, &layer.k_norm, p)?;
            let attn = b.attention_heads(&qkv, kv, p)?; // (T, heads · hd)
            let o = b.matmul(&layer.o, &attn)?;
            let o = b.rms_norm(&o, &layer.attn_post_norm, eps)?;
            b.add(&mut x, &o)?;

            let hd = b.rms_norm(&x, &layer.ffn_norm, eps)?;
            let dense = b.gated_mlp(&layer.mlp_gate_up, &layer.mlp_down, &hd, act)?;
            let mut f = b.rms_norm(&dense, &layer.mlp_post_norm, eps)?;
            let routing = b.route_scaled(
                &x,
                &layer.router,
                &layer.router_scale,
                &layer.expert_scale,
                ScaledRouterParams {
                    experts: c.moe.num_experts,
                    top_k: c.moe.top_k,
                    eps,
                },
            )?;
            if want.routing {
                let (ids, w) = b.routing_to_host(&routing)?;
                out.routing.push((l, ids, w));
            }
            let he = b.rms_norm(&x, &layer.moe_norm, eps)?;
            let moe = b.moe_act(&he, &routing, &layer.experts, act)?;
            let moe = b.rms_norm(&moe, &layer.moe_post_norm, eps)?;
            b.add(&mut f, &moe)?;
            let f = b.rms_norm(&f, &layer.ffn_post_norm, eps)?;
            b.add(&mut x, &f)?;
            let s = layer.scalar[if decoder { 0 } else { 1 }];
            if s != 1.0 {
                b.scale(&mut x, s)?;
            }
        }
        let h = b.rms_norm(&x, &self.final_norm, eps)?;
        Ok((h, out))
    }

    /// The logits a pass returns (and their statistics) from its final rows `h`.
    fn head(
        &self,
        b: &B,
        h: &B::Act,
        tokens: usize,
        want: &ForwardRequest,
        out: &mut ForwardOutput,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let rows = want.rows.clone().unwrap_or(0..tokens);
        match c.block.logit_softcap {
            Some(cap) => {
                out.stats = b.lm_head_stats_softcap(h, &self.embed, rows.clone(), cap)?;
                if want.logits {
                    out.logits = Some(b.logits_softcap(h, &self.embed, rows, cap)?);
                }
            }
            None => {
                out.stats = b.lm_head_stats(h, &self.embed, rows.clone())?;
                if want.logits {
                    out.logits = Some(b.logits(h, &self.embed, rows)?);
                }
            }
        }
        Ok(())
    }
}

/// Runs `run` again (twice at most) when a GPU pass over paged experts met a non-resident one
/// (`BackendError::RerunPass`, as in `Model::forward_batch`, backend/gpu/experts.rs): the re-run
/// brings experts in layer by layer and cannot miss; it rewrites the same K/V positions.
fn rerun_if_asked<R>(mut run: impl FnMut() -> Result<R, ModelError>) -> Result<R, ModelError> {
    let mut tries = 0;
    loop {
        match run() {
            Err(ModelError::Backend(BackendError::RerunPass)) if tries < 2 => tries += 1,
            r => return r,
        }
    }
}
