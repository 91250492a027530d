//! The model: weights loaded onto a backend and the forward pass, written once for every family.
//!
//! Per layer: `h = norm(x)`; fused qkv projection; q/k norm + RoPE; attention over the KV cache;
//! output projection; `x += attn`; `h = norm(x)`; dense SwiGLU MLP or routed experts (+ shared
//! expert); `x += ffn`. Then the final norm and the LM head reduced to per-position statistics.
//! Config enums pick the pieces: CCA instead of q/k norm + RoPE (the projection is convolved over
//! time with state kept in the cache), an MLP router with EDA (a router state carried from one MoE
//! layer to the next) and a skip expert, scaled residuals instead of adds, an affine embedding.
//! Tensor names are the canonical ones of docs/FORMAT.md, written by `import/`.

pub mod canvas;

use std::ops::Range;
use std::sync::Arc;

// The description of a model lives below the backends and the file format (crate::arch); the
// model re-exports it, so `model::ModelConfig` and `model::names` stay the public paths.
pub use crate::arch::names;
pub use crate::arch::{
    Architecture, AttentionKind, ConfigError, EmbeddingKind, Gating, ModelConfig, MoeConfig,
    Prediction, QkNorm, ResidualKind, RouterKind, SlidingAttention,
};

use crate::backend::{
    AttnMask, Backend, BackendError, BlockRouting, CcaParams, CcaWeights, CommitParams,
    MlpRouterParams, MlpRouterWeights, PositionStats, SeqAttention,
};
use crate::format::{DType, EdmFile, FormatError, TensorView};

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
    #[error(
        "block routing within {experts} experts per layer: the router picks {top_k} per token, \
         so a block needs at least {top_k} (--block-experts)"
    )]
    BlockExperts { experts: usize, top_k: usize },
    #[error("{0} runs one sequence a pass; it cannot share a batched pass")]
    BatchMix(&'static str),
    #[error("a batched pass this sequence's pass was part of panicked")]
    BatchPanicked,
}

struct Mlp<B: Backend> {
    gate_up: B::Weight,
    down: B::Weight,
}

struct MlpRouter<B: Backend> {
    down: B::Weight,
    down_bias: B::Weight,
    eda_scale: Option<B::Weight>,
    norm: B::Weight,
    fc1: B::Weight,
    fc1_bias: B::Weight,
    fc2: B::Weight,
    fc2_bias: B::Weight,
}

enum FeedForward<B: Backend> {
    Dense(Mlp<B>),
    Moe {
        /// The linear router, or the MLP router's output projection.
        router: B::Weight,
        router_bias: Option<B::Weight>,
        mlp_router: Option<MlpRouter<B>>,
        experts: B::Experts,
        shared: Option<Mlp<B>>,
    },
}

struct Cca<B: Backend> {
    conv_dw: B::Weight,
    conv_dw_bias: B::Weight,
    conv_grouped: B::Weight,
    conv_grouped_bias: B::Weight,
    temp: B::Weight,
}

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    qkv: B::Weight,
    q_norm: Option<B::Weight>,
    k_norm: Option<B::Weight>,
    cca: Option<Cca<B>>,
    o: B::Weight,
    /// `[4, H]` scales of the two residual joins (`ResidualKind::Scaled`).
    residuals: Option<(B::Weight, B::Weight)>,
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
    /// Block-level expert routing of this pass (`None`: exact routing).
    pub blocks: Option<BlockRouting>,
    /// Compute every row as a pass of this many rows would (`None`: of the pass's own rows): a
    /// backend whose kernels sum a row differently at different row counts (the GPU's word-a-lane
    /// gemvs for a few rows, wide ones with 8-bit activation codes for more) then chooses them as
    /// for that many rows, as it does for a batched pass's sequences. Lossless speculative
    /// decoding verifies with `Some(1)`, so its verification rows sum as AR's one-row passes do.
    pub rows_as: Option<usize>,
}

impl ForwardRequest {
    /// The rows a pass of `tokens` tokens asking this computes each row as
    /// ([`ForwardRequest::rows_as`]).
    pub fn kernel_rows(&self, tokens: usize) -> usize {
        self.rows_as.map_or(tokens, |r| r.clamp(1, tokens.max(1)))
    }
}

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub file: Arc<EdmFile>,
    embed: B::Weight,
    embed_affine: Option<B::Weight>,
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
        let n = self.config.router_classes();
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
        // Every dense weight is read below, in order: its flash reads start now, together.
        file.will_need_tensors();
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
        let embed_affine = match c.embedding {
            EmbeddingKind::Plain => None,
            EmbeddingKind::Affine => Some(get(names::EMBED_AFFINE, &[2, h])?),
            // Gemma's scaled embedding comes with the sandwich block: `canvas::CanvasModel`.
            EmbeddingKind::Scaled => {
                return Err(backend
                    .unsupported("a DiffusionGemma file (model::canvas)")
                    .into())
            }
        };
        let first_moe = (0..c.num_layers).find(|&l| c.is_moe_layer(l));
        let classes = c.router_classes();
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let n = |s: &str| names::layer(l, s);
            let cca = match c.attention {
                AttentionKind::Standard => None,
                AttentionKind::Cca => {
                    let ch = c.cca_conv_dim();
                    Some(Cca {
                        conv_dw: get(&n(names::CONV_DW), &[ch, 2])?,
                        conv_dw_bias: get(&n(names::CONV_DW_BIAS), &[ch])?,
                        conv_grouped: get(&n(names::CONV_GROUPED), &[ch, 2 * c.head_dim])?,
                        conv_grouped_bias: get(&n(names::CONV_GROUPED_BIAS), &[ch])?,
                        temp: get(&n(names::CCA_TEMP), &[c.num_kv_heads])?,
                    })
                }
            };
            let residuals = match c.residual {
                ResidualKind::Add => None,
                ResidualKind::Scaled => Some((
                    get(&n(names::ATTN_RESIDUAL), &[4, h])?,
                    get(&n(names::FFN_RESIDUAL), &[4, h])?,
                )),
            };
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
                let (router_in, mlp_router) = match c.router {
                    RouterKind::Linear => (h, None),
                    RouterKind::ScaledNorm => {
                        return Err(backend
                            .unsupported("the scaled-norm router (model::canvas)")
                            .into())
                    }
                    RouterKind::MlpEda { hidden: r } => (
                        r,
                        Some(MlpRouter {
                            down: get(&n(names::ROUTER_DOWN), &[r, h])?,
                            down_bias: get(&n(names::ROUTER_DOWN_BIAS), &[r])?,
                            eda_scale: if Some(l) == first_moe {
                                None
                            } else {
                                Some(get(&n(names::ROUTER_EDA), &[r])?)
                            },
                            norm: get(&n(names::ROUTER_NORM), &[r])?,
                            fc1: get(&n(names::ROUTER_FC1), &[r, r])?,
                            fc1_bias: get(&n(names::ROUTER_FC1_BIAS), &[r])?,
                            fc2: get(&n(names::ROUTER_FC2), &[r, r])?,
                            fc2_bias: get(&n(names::ROUTER_FC2_BIAS), &[r])?,
                        }),
                    ),
                };
                FeedForward::Moe {
                    router: get(&n(names::ROUTER), &[classes, router_in])?,
                    router_bias: if c.moe.router_bias {
                        Some(get(&n(names::ROUTER_BIAS), &[classes])?)
                    } else {
                        None
                    },
                    mlp_router,
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
                cca,
                o: get(&n(names::O), &[h, c.q_dim()])?,
                residuals,
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
            embed_affine,
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
        let mut seqs = [SeqPass {
            kv,
            tokens,
            window,
            want,
        }];
        let mut out = self.forward_batch(b, &mut seqs)?;
        Ok(out.pop().expect("one output per sequence"))
    }

    /// Runs several sequences' passes as one batched pass and returns each one's output, in
    /// order. Row-wise work (embedding, norms, projections, router, experts, LM head) runs once
    /// over the rows of all sequences, so each weight is read once for the batch; q/k norm + RoPE
    /// (or CCA), the K/V store and attention run per sequence against its own cache, at its own
    /// positions and mask. Every op computes each row from that row alone, so a sequence's
    /// outputs are those of its pass run alone wherever the backend's kernels sum a row the same
    /// way at the batch's row count: the passes must be of one [`Model::batch_class`] (the CPU
    /// backend: any; the GPU backend chooses its kernels as one sequence's pass alone would,
    /// [`Backend::begin_forward`], which holds for passes whose row counts choose alike).
    ///
    /// Block-level routing (`want.blocks`) groups rows across the pass, so a pass that asks for it
    /// runs alone; so does a pass of no class, and passes of different classes do not mix
    /// ([`ModelError::BatchMix`] otherwise).
    pub fn forward_batch(
        &self,
        b: &B,
        seqs: &mut [SeqPass<'_, B>],
    ) -> Result<Vec<ForwardOutput>, ModelError> {
        // A GPU pass over paged experts that met a non-resident one asks to be run again (see
        // backend/gpu/experts.rs); the re-run brings experts in layer by layer and cannot miss.
        // Running it again is harmless: it rewrites the same K/V positions.
        let mut tries = 0;
        loop {
            match self.forward_once(b, seqs, Vec::new()) {
                Err(ModelError::Backend(BackendError::RerunPass)) if tries < 2 => tries += 1,
                r => return r,
            }
        }
    }

    /// Whether `tokens` in `window` fit `kv` and the model (what a pass checks before it runs):
    /// a batch checks each sequence first, so one bad request fails alone.
    pub fn check_pass(
        &self,
        b: &B,
        kv: &B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let Window { start, kv_len, .. } = window;
        let end = start + tokens.len();
        let limit = b.kv_capacity(kv).min(c.max_position);
        if tokens.is_empty() {
            return Err(ModelError::NoTokens);
        }
        if let Some(bl) = &want.blocks {
            check_block_experts(c, bl.experts)?;
        }
        if end > limit || kv_len > limit || kv_len < end {
            return Err(ModelError::Context {
                start,
                end: end.max(kv_len),
                limit,
            });
        }
        Ok(())
    }

    /// Which passes a pass of `tokens` tokens asking `want` may share a batched pass with: those
    /// of the same class ([`Backend::batch_class`]; `None`: it runs alone). Block-level routing
    /// groups a pass's rows, so such a pass runs alone.
    pub fn batch_class(&self, b: &B, tokens: usize, want: &ForwardRequest) -> Option<u64> {
        if want.blocks.is_some() {
            return None;
        }
        let head = want.rows.as_ref().map_or(tokens, |r| r.len());
        // Computed as fewer rows (`rows_as`): the class of those rows, where the pass's own row
        // counts may share a batched pass at all (the backend may keep some alone: an LM head too
        // large for one chunk).
        let (rows, head_rows) = (want.kernel_rows(tokens), want.kernel_rows(head));
        if (rows, head_rows) != (tokens, head) {
            b.batch_class(&self.config, tokens, head)?;
        }
        b.batch_class(&self.config, rows, head_rows)
    }

    /// One denoising step recorded on the backend and not read back (decode/chain.rs and
    /// decode/ar.rs chain several in one submission): the pass over `tokens` in `window` — or,
    /// with `step.ids_from_canvas`, over the canvas's input ids, `tokens` then giving only their
    /// count —, the LM-head statistics of `rows` left where they were computed
    /// ([`Backend::lm_head_stats_kept`]), and the commit step on the canvas
    /// ([`Backend::commit_step`]). The same forward pass as [`Model::forward`], op for op; only
    /// where the ids come from and where the statistics go differ. [`Backend::read_canvas`] reads
    /// the outcome. Passes that page experts cannot be chained ([`Model::chains_steps`]).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_step(
        &self,
        b: &B,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        rows: Range<usize>,
        blocks: Option<BlockRouting>,
        step: DenoiseStep<'_, B>,
    ) -> Result<(), ModelError> {
        let want = ForwardRequest {
            rows: Some(rows),
            blocks,
            ..Default::default()
        };
        let mut seqs = [SeqPass {
            kv,
            tokens,
            window,
            want: &want,
        }];
        self.denoise_steps(b, &mut seqs, vec![step])
    }

    /// [`Model::denoise_step`] for several sequences in one batched pass
    /// ([`Model::forward_batch`]'s rules: one [`Model::batch_class`], each row as alone):
    /// `steps[i]` is sequence `i`'s, each reading its ids from its own canvas
    /// (`ids_from_canvas`), and each sequence's wanted rows (`want.rows`) go through the LM head
    /// together, then each canvas takes its commit step from its own rows. Several sequences'
    /// AR steps chain this way in one submission (crate::batch).
    pub fn denoise_steps(
        &self,
        b: &B,
        seqs: &mut [SeqPass<'_, B>],
        steps: Vec<DenoiseStep<'_, B>>,
    ) -> Result<(), ModelError> {
        if steps.len() != seqs.len() || steps.is_empty() {
            return Err(ModelError::BatchMix("a step for each sequence"));
        }
        self.forward_once(b, seqs, steps).map(|_| ())
    }

    /// Whether this model's passes can be chained on `b` ([`Model::denoise_step`]): none reads
    /// routing back mid-way (exact paging does, to bring missing experts in).
    pub fn chains_steps(&self, b: &B) -> bool {
        self.layers.iter().all(|l| match &l.ffn {
            FeedForward::Moe { experts, .. } => !b.experts_paged(experts),
            FeedForward::Dense(_) => true,
        })
    }

    fn forward_once(
        &self,
        b: &B,
        seqs: &mut [SeqPass<'_, B>],
        mut steps: Vec<DenoiseStep<'_, B>>,
    ) -> Result<Vec<ForwardOutput>, ModelError> {
        let c = &self.config;
        if seqs.is_empty() {
            return Err(ModelError::NoTokens);
        }
        for s in seqs.iter() {
            self.check_pass(b, s.kv, s.tokens, s.window, s.want)?;
        }
        let alone = seqs.len() == 1;
        // Batched steps read their ids from their canvases (their host tokens give only counts).
        if !alone && steps.iter().any(|s| s.ids_from_canvas.is_none()) {
            return Err(ModelError::BatchMix(
                "a denoising step with host tokens chained on the device",
            ));
        }
        if !alone && seqs.iter().any(|s| s.want.blocks.is_some()) {
            return Err(ModelError::BatchMix("block-level expert routing"));
        }
        if !alone {
            // The backend computes each row as alone only for passes of one class.
            let class = |s: &SeqPass<'_, B>| self.batch_class(b, s.tokens.len(), s.want);
            let first = class(&seqs[0]);
            if first.is_none() || seqs.iter().any(|s| class(s) != first) {
                return Err(ModelError::BatchMix("a pass of another batch class"));
            }
        }
        // Rows of sequence i: offsets[i]..offsets[i + 1].
        let mut offsets = vec![0];
        for s in seqs.iter() {
            offsets.push(offsets[offsets.len() - 1] + s.tokens.len());
        }
        let tokens: Vec<u32> = if alone {
            seqs[0].tokens.to_vec()
        } else {
            seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect()
        };
        let largest = seqs
            .iter()
            .map(|s| s.want.kernel_rows(s.tokens.len()))
            .max()
            .unwrap_or(0);
        let eps = c.rms_norm_eps as f32;
        b.begin_forward(tokens.len(), largest)?;
        let mut x = match steps.as_slice() {
            []
            | [DenoiseStep {
                ids_from_canvas: None,
                ..
            }] => b.embed(&self.embed, &tokens)?,
            [DenoiseStep {
                canvas,
                ids_from_canvas: Some(from),
                ..
            }] => b.embed_canvas(&self.embed, canvas, *from, tokens.len())?,
            many => {
                let parts = many
                    .iter()
                    .zip(seqs.iter())
                    .map(|(st, s)| {
                        let from = st.ids_from_canvas.unwrap_or(0);
                        b.embed_canvas(&self.embed, st.canvas, from, s.tokens.len())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                b.stack_rows(&parts.iter().collect::<Vec<_>>())?
            }
        }; // (T, H)
        if let Some(a) = &self.embed_affine {
            b.embed_affine(&mut x, a)?;
        }
        // The fused-norm forward (Backend::fuses_norms): the residual stream `x` goes un-normed
        // into the ops that norm it as they read it, and `h` (the normed stream) is `None`
        // between a residual add and the op that norms it.
        let fuse = b.fuses_norms();
        let mut h = match fuse {
            true => None,
            false => Some(b.rms_norm(&x, &self.layers[0].attn_norm, eps)?),
        };
        let mut outs: Vec<ForwardOutput> = seqs.iter().map(|_| ForwardOutput::default()).collect();
        // EDA: each MLP router adds a learned share of the previous MoE layer's router state.
        let mut router_state: Option<B::Act> = None;
        let blocks = seqs[0].want.blocks.filter(|_| alone);
        let want_routing = seqs.iter().any(|s| s.want.routing);
        for (l, layer) in self.layers.iter().enumerate() {
            // (T, (nq + 2 nkv) · hd)
            let mut qkv = match h.take() {
                Some(h) => b.matmul(&layer.qkv, &h)?,
                None => b.matmul_normed(&layer.qkv, &x, &layer.attn_norm, eps)?,
            };
            let attn = if alone {
                let s = &mut seqs[0];
                self.attend(b, l, layer, &mut qkv, s.kv, s.window)? // (T, nq · hd)
            } else if layer.cca.is_none() {
                let mut parts: Vec<SeqAttention<'_, B::Kv>> = seqs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, s)| SeqAttention {
                        kv: &mut *s.kv,
                        rows: offsets[i]..offsets[i + 1],
                        start: s.window.start,
                        kv_len: s.window.kv_len,
                        mask: s.window.mask,
                    })
                    .collect();
                b.rope_attention_seqs(
                    &mut qkv,
                    layer.q_norm.as_ref(),
                    layer.k_norm.as_ref(),
                    &mut parts,
                    l,
                    c,
                )?
            } else {
                let mut parts = Vec::with_capacity(seqs.len());
                for (i, s) in seqs.iter_mut().enumerate() {
                    let mut q = b.rows_of(&qkv, offsets[i]..offsets[i + 1])?;
                    parts.push(self.attend(b, l, layer, &mut q, s.kv, s.window)?);
                }
                b.stack_rows(&parts.iter().collect::<Vec<_>>())?
            };
            // A plain residual into a dense MLP, fused: the o projection and the MLP's down
            // projection add into `x`, the gate/up gemv norms it (`h` stays un-normed).
            if let (FeedForward::Dense(m), true) = (&layer.ffn, fuse && layer.residuals.is_none()) {
                b.matmul_add(&layer.o, &attn, &mut x)?;
                b.mlp_add(&m.gate_up, &m.down, &mut x, &layer.ffn_norm, eps)?;
                continue;
            }
            // A plain residual into a plain-routed MoE, fused: the o projection adds into `x`,
            // and the router's gemv norms it (and hands the experts the normed rows).
            let fused_moe = match &layer.ffn {
                FeedForward::Moe {
                    router,
                    router_bias,
                    mlp_router: None,
                    ..
                } if fuse && layer.residuals.is_none() => Some((router, router_bias.as_ref())),
                _ => None,
            };
            let (h_ffn, mut routed) = match fused_moe {
                Some((router, bias)) => {
                    b.matmul_add(&layer.o, &attn, &mut x)?;
                    let (hf, r) =
                        b.route_normed(&x, &layer.ffn_norm, eps, router, bias, c, blocks.as_ref())?;
                    (hf, Some(r))
                }
                None => {
                    let o = b.matmul(&layer.o, &attn)?; // (T, H)
                    let hf = match &layer.residuals {
                        None => b.add_rms_norm(&mut x, &o, &layer.ffn_norm, eps)?,
                        Some((s, _)) => {
                            b.scaled_residual_norm(&mut x, &o, s, &layer.ffn_norm, eps)?
                        }
                    };
                    (hf, None)
                }
            };
            let h_ffn = &h_ffn;
            let next_norm = self
                .layers
                .get(l + 1)
                .map_or(&self.final_norm, |n| &n.attn_norm);
            // The FFN's output, unless the backend added it to the residual and normed it already.
            let ffn = match &layer.ffn {
                FeedForward::Dense(m) => Some(b.mlp(&m.gate_up, &m.down, h_ffn)?),
                FeedForward::Moe {
                    router,
                    router_bias,
                    mlp_router,
                    experts,
                    shared,
                } => {
                    let routing = match (routed.take(), mlp_router, router_bias) {
                        (Some(r), _, _) => r,
                        (None, None, _) => match &blocks {
                            None => b.route(h_ffn, router, router_bias.as_ref(), c)?,
                            Some(bl) => {
                                b.route_within_blocks(h_ffn, router, router_bias.as_ref(), c, bl)?
                            }
                        },
                        (None, Some(m), Some(bias)) => {
                            let (routing, state) = b.route_mlp(
                                h_ffn,
                                MlpRouterWeights {
                                    down: &m.down,
                                    down_bias: &m.down_bias,
                                    eda_scale: m.eda_scale.as_ref(),
                                    norm: &m.norm,
                                    fc1: &m.fc1,
                                    fc1_bias: &m.fc1_bias,
                                    fc2: &m.fc2,
                                    fc2_bias: &m.fc2_bias,
                                    out: router,
                                    bias,
                                },
                                router_state.as_ref().filter(|_| m.eda_scale.is_some()),
                                MlpRouterParams {
                                    experts: c.moe.num_experts,
                                    top_k: c.moe.top_k,
                                    eps,
                                    blocks,
                                },
                            )?;
                            router_state = Some(state);
                            routing
                        }
                        (None, Some(_), None) => {
                            return Err(FormatError::MissingTensor(names::layer(
                                l,
                                names::ROUTER_BIAS,
                            ))
                            .into())
                        }
                    };
                    if want_routing {
                        let (ids, w) = b.routing_to_host(&routing)?;
                        // `[T, k]` rows, split back per sequence.
                        let k = ids.len() / offsets[seqs.len()].max(1);
                        for (i, s) in seqs.iter().enumerate() {
                            if s.want.routing {
                                let r = offsets[i] * k..offsets[i + 1] * k;
                                outs[i]
                                    .routing
                                    .push((l, ids[r.clone()].to_vec(), w[r].to_vec()));
                            }
                        }
                    }
                    // The routed sum adds the shared experts in its last step; the GPU
                    // computes them inside its expert kernels at few tokens per expert.
                    let shared = shared.as_ref().map(|s| (&s.gate_up, &s.down));
                    match (&layer.residuals, shared) {
                        (None, _) if fuse => {
                            b.moe_add(h_ffn, &routing, experts, shared, &mut x)?;
                            None
                        }
                        (None, _) => {
                            h = Some(b.moe_add_rms_norm(
                                h_ffn, &routing, experts, shared, &mut x, next_norm, eps,
                            )?);
                            None
                        }
                        (Some(_), _) => Some(b.moe_ffn(h_ffn, &routing, experts, shared)?),
                    }
                }
            };
            if let Some(ffn) = ffn {
                // (A plain residual under the fused forward took the paths above.)
                h = match &layer.residuals {
                    None => Some(b.add_rms_norm(&mut x, &ffn, next_norm, eps)?),
                    Some((_, s)) => Some(b.scaled_residual_norm(&mut x, &ffn, s, next_norm, eps)?),
                };
            }
        }
        let h = match h {
            Some(h) => h,
            None => b.rms_norm(&x, &self.final_norm, eps)?,
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let rows: Vec<Range<usize>> = seqs
            .iter()
            .map(|s| s.want.rows.clone().unwrap_or(0..s.tokens.len()))
            .collect();
        if alone && !steps.is_empty() {
            let stats = b.lm_head_stats_kept(&h, head, rows[0].clone())?;
            let step = &mut steps[0];
            b.commit_step(step.canvas, &stats, &step.commit)?;
            return Ok(outs);
        }
        if alone {
            outs[0].stats = b.lm_head_stats(&h, head, rows[0].clone())?;
            if seqs[0].want.logits {
                outs[0].logits = Some(b.logits(&h, head, rows[0].clone())?);
            }
            return Ok(outs);
        }
        // The wanted rows of every sequence, gathered, through the LM head once.
        for (i, r) in rows.iter().enumerate() {
            if r.start > r.end || r.end > seqs[i].tokens.len() {
                return Err(BackendError::Shape {
                    op: "lm_head_stats",
                    detail: format!("rows {r:?} of {}", seqs[i].tokens.len()),
                }
                .into());
            }
        }
        let n: usize = rows.iter().map(|r| r.len()).sum();
        let largest_head = rows
            .iter()
            .zip(seqs.iter())
            .map(|(r, s)| s.want.kernel_rows(r.len()))
            .max()
            .unwrap_or(0);
        b.begin_head(n, largest_head)?;
        let (stats, logits) = if n == 0 {
            (Vec::new(), Some(Vec::new()))
        } else {
            let picked: Vec<Range<usize>> = rows
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.is_empty())
                .map(|(i, r)| offsets[i] + r.start..offsets[i] + r.end)
                .collect();
            let gathered = b.gather_rows(&h, &picked)?;
            if !steps.is_empty() {
                // Batched steps: each canvas commits from its own rows of the kept statistics.
                let kept = b.lm_head_stats_kept(&gathered, head, 0..n)?;
                let mut row0 = 0;
                for (st, r) in steps.iter_mut().zip(&rows) {
                    let mine = b.stats_rows(&kept, row0..row0 + r.len())?;
                    b.commit_step(st.canvas, &mine, &st.commit)?;
                    row0 += r.len();
                }
                return Ok(outs);
            }
            let stats = b.lm_head_stats(&gathered, head, 0..n)?;
            let logits = if seqs.iter().any(|s| s.want.logits) {
                Some(b.logits(&gathered, head, 0..n)?)
            } else {
                None
            };
            (stats, logits)
        };
        let mut stats = stats.into_iter();
        let vocab = c.vocab_size;
        let mut row0 = 0;
        for (i, r) in rows.iter().enumerate() {
            outs[i].stats = stats.by_ref().take(r.len()).collect();
            if let (Some(all), true) = (&logits, seqs[i].want.logits) {
                outs[i].logits = Some(all[row0 * vocab..(row0 + r.len()) * vocab].to_vec());
            }
            row0 += r.len();
        }
        Ok(outs)
    }

    /// q/k norm + RoPE (or CCA's convolutions) of one sequence's rows at its positions, its K/V
    /// written to its cache, and its attention over that cache.
    fn attend(
        &self,
        b: &B,
        l: usize,
        layer: &Layer<B>,
        qkv: &mut B::Act,
        kv: &mut B::Kv,
        window: Window,
    ) -> Result<B::Act, ModelError> {
        let c = &self.config;
        let Window {
            start,
            kv_len,
            mask,
        } = window;
        let Some(w) = &layer.cca else {
            return Ok(b.rope_attention(
                qkv,
                layer.q_norm.as_ref(),
                layer.k_norm.as_ref(),
                kv,
                l,
                c,
                start,
                kv_len,
                mask,
            )?);
        };
        b.cca_qkv(
            qkv,
            CcaWeights {
                conv_dw: &w.conv_dw,
                conv_dw_bias: &w.conv_dw_bias,
                conv_grouped: &w.conv_grouped,
                conv_grouped_bias: &w.conv_grouped_bias,
                temp: &w.temp,
            },
            kv,
            CcaParams::for_layer(c, l, start),
        )?;
        Ok(b.attention(qkv, kv, l, c, start, kv_len, mask)?)
    }
}

/// The device side of a denoising step ([`Model::denoise_step`]).
pub struct DenoiseStep<'a, B: Backend> {
    pub canvas: &'a mut B::Canvas,
    /// `Some(from)`: the pass reads its ids from the canvas, the input ids of its cells
    /// `from..from + tokens` (a block's chained step: 0, the whole block; AR's chained step: the
    /// cells at its position). `None`: the pass's host tokens are uploaded (the first step of a
    /// submission, whose window also holds a fused clean pass or the prompt).
    pub ids_from_canvas: Option<usize>,
    pub commit: CommitParams,
}

/// One sequence's part of a batched pass ([`Model::forward_batch`]): its tokens in its window,
/// against its own KV cache, with its own request.
pub struct SeqPass<'a, B: Backend> {
    pub kv: &'a mut B::Kv,
    pub tokens: &'a [u32],
    pub window: Window,
    pub want: &'a ForwardRequest,
}

/// `--block-experts N` must leave each token its top-k: a typed error otherwise.
pub fn check_block_experts(c: &ModelConfig, experts: usize) -> Result<(), ModelError> {
    if experts < c.moe.top_k.max(1) {
        return Err(ModelError::BlockExperts {
            experts,
            top_k: c.moe.top_k,
        });
    }
    Ok(())
}

pub(crate) fn check_expert_shapes(
    file: &EdmFile,
    c: &ModelConfig,
    l: usize,
) -> Result<(), ModelError> {
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
