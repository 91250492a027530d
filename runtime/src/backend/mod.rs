//! The op interface between the model and the hardware. Ops are coarse and fused (a norm with its
//! residual add, q/k norm with RoPE, routing in one call, all experts of a layer in one call, the LM
//! head with its statistics) so the GPU backend can run each as one or a few dispatches recorded into
//! one submission. The CPU backend implements the same ops plainly in f32 and is the oracle.

pub mod cpu;
pub mod draw;
pub mod gpu;
pub mod kv_meter;
pub mod q8_act;
mod shapes;

use crate::arch::{Activation, Gating, LayerAttention, ModelConfig};
use crate::format::{FormatError, TensorView};

/// Which keys a query may see. Positions are absolute, so the rule is the same with or without
/// cached keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnMask {
    /// key ≤ query.
    Causal,
    /// Every key in the window.
    Bidirectional,
    /// Bidirectional inside blocks of `B` positions (aligned to position 0), causal across them.
    BlockCausal(usize),
    /// Causal up to `draft_start`; from there on the positions form one bidirectional draft region
    /// that also sees everything before it (TiDAR-style verify-and-draft pass).
    CausalThenBidirectional { draft_start: usize },
}

impl AttnMask {
    pub fn visible(self, query: usize, key: usize) -> bool {
        match self {
            AttnMask::Causal => key <= query,
            AttnMask::Bidirectional => true,
            AttnMask::BlockCausal(b) => key / b <= query / b,
            AttnMask::CausalThenBidirectional { draft_start } => {
                key <= query || (query >= draft_start && key >= draft_start)
            }
        }
    }
}

impl std::str::FromStr for AttnMask {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "causal" => Ok(AttnMask::Causal),
            "bidirectional" => Ok(AttnMask::Bidirectional),
            _ => match s.strip_prefix("block:").map(str::parse::<usize>) {
                Some(Ok(b)) if b > 0 => Ok(AttnMask::BlockCausal(b)),
                _ => Err(format!(
                    "unknown mask '{s}' (expected causal, bidirectional or block:N with N > 0)"
                )),
            },
        }
    }
}

/// Number of candidates kept per position by the statistics reduction.
pub const TOP_K: usize = 8;

/// What the decoder needs from one position's logits: a few bytes instead of a vocabulary row.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionStats {
    pub argmax: u32,
    /// softmax probability of the argmax.
    pub p_max: f32,
    /// Entropy of the softmax distribution, in nats.
    pub entropy: f32,
    /// p(top-1) − p(top-2).
    pub margin: f32,
    /// The `TOP_K` most probable tokens with their probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("position {pos} is past the KV cache capacity {capacity}")]
    CacheFull { pos: usize, capacity: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("layer {layer} expert {expert} is not available (pruned from this model)")]
    ExpertUnavailable { layer: usize, expert: usize },
    /// Exact paging on the GPU ran a pass optimistically and the router picked an expert that was
    /// not resident; the pass must run again (the model's forward does so, layer-synchronously).
    #[error("the router picked experts that were not resident; the pass must run again")]
    RerunPass,
    #[error("GPU: {0}")]
    Gpu(String),
    /// The backend has no implementation of this op yet (a family whose pieces only the CPU
    /// reference runs so far).
    #[error("the {op} op is not implemented on the {backend} backend yet")]
    Unsupported { op: &'static str, backend: String },
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Shape and position of one CCA attention pass ([`Backend::cca_qkv`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CcaParams {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Leading dims of each head RoPE rotates (rotate-half layout).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    /// Absolute position of the first row.
    pub start: usize,
}

impl CcaParams {
    pub fn for_layer(c: &ModelConfig, layer: usize, start: usize) -> Self {
        CcaParams {
            layer,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            rotary_dim: c.rotary_dim,
            rope_theta: c.rope_theta_of(layer),
            start,
        }
    }
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// The weights of one CCA layer besides its projection.
pub struct CcaWeights<'a, W> {
    /// Depthwise conv over time, `[q_dim + kv_dim, 2]` (tap for the previous position first).
    pub conv_dw: &'a W,
    pub conv_dw_bias: &'a W,
    /// Grouped conv over time, one group per head: `[q_dim + kv_dim, head_dim · 2]`, row c holds
    /// `(input channel j of c's head, tap)` at `j · 2 + tap`.
    pub conv_grouped: &'a W,
    pub conv_grouped_bias: &'a W,
    /// Key temperature per KV head, `[kv_heads]`.
    pub temp: &'a W,
}

/// Sizes of an MLP router ([`Backend::route_mlp`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlpRouterParams {
    /// Routed experts; the router has one class more, the skip expert.
    pub experts: usize,
    pub top_k: usize,
    pub eps: f32,
    /// Block-level routing: each block's tokens choose among its experts (and the skip class).
    pub blocks: Option<BlockRouting>,
}

/// The weights of one MLP router.
pub struct MlpRouterWeights<'a, W> {
    pub down: &'a W,
    pub down_bias: &'a W,
    /// EDA's per-channel weight of the previous MoE layer's router state (`None` in the first).
    pub eda_scale: Option<&'a W>,
    pub norm: &'a W,
    pub fc1: &'a W,
    pub fc1_bias: &'a W,
    pub fc2: &'a W,
    pub fc2_bias: &'a W,
    /// `[experts + 1, hidden]`.
    pub out: &'a W,
    /// Selection-only bias, `[experts + 1]`.
    pub bias: &'a W,
}

/// Block-level expert routing of one pass (`--block-experts N`, dMoE / EMO; docs/RESULTS.md
/// "Block-level routing"): the pass's rows from `first_row` on fall into blocks, and every token of
/// a block routes only within the `experts` experts per layer with the largest router probability
/// mass summed over the block's tokens; rows before `first_row` route exactly and add no mass.
/// Row `t ≥ first_row` is in block `(t + phase) / size − (first_row + phase) / size`.
///
/// The mass of a token is its routing distribution over the selectable experts: the softmax
/// probabilities the router chooses from (the selection bias included, so pruned experts have
/// none); for sigmoid gating the scores σ(logit) normalised to sum 1 over the experts the bias
/// does not mask. The block's mask is 0 on its experts and [`BLOCK_MASKED`] elsewhere, added to
/// the selection bias. With grouped sigmoid gating and `experts` < the expert count, the block's
/// experts replace the group limit (all groups count): both bound the experts a token may reach,
/// and keeping both could leave a token fewer than top-k experts inside its groups.
/// With `experts` ≥ the expert count every mask is 0 and routing is exact, bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRouting {
    pub experts: usize,
    pub first_row: usize,
    pub size: usize,
    pub phase: usize,
}

/// The selection bias of an expert outside its block's set (the value pruning uses: finite, so
/// sums stay NaN-free, and far below any real score).
pub const BLOCK_MASKED: f32 = -1e30;

impl BlockRouting {
    /// Blocks of `size` absolute positions that start at positions ≡ `origin` (mod `size`), for a
    /// pass whose first row sits at position `start`; every row is in a block.
    pub fn aligned(experts: usize, start: usize, size: usize, origin: usize) -> Self {
        let size = size.max(1);
        BlockRouting {
            experts,
            first_row: 0,
            size,
            phase: (start % size + size - origin % size) % size,
        }
    }

    /// Rows `first_row..` form one block; the rows before route exactly.
    pub fn tail(experts: usize, first_row: usize) -> Self {
        BlockRouting {
            experts,
            first_row,
            size: 1 << 30,
            phase: 0,
        }
    }

    /// The block of `row`, `None` for an exactly routed row.
    pub fn block_of(&self, row: usize) -> Option<usize> {
        (row >= self.first_row)
            .then(|| (row + self.phase) / self.size - (self.first_row + self.phase) / self.size)
    }

    /// Blocks over a pass of `rows` rows.
    pub fn blocks(&self, rows: usize) -> usize {
        rows.checked_sub(1)
            .and_then(|last| self.block_of(last))
            .map_or(0, |b| b + 1)
    }

    /// Whether the masks restrict anything for a router of `num_experts` experts.
    pub fn restricts(&self, num_experts: usize) -> bool {
        self.experts < num_experts
    }

    /// The gating a token of a block routes with: grouped sigmoid gating drops its group limit
    /// when the block's experts restrict.
    pub fn gating(&self, gating: Gating, num_experts: usize) -> Gating {
        match gating {
            Gating::SigmoidGrouped {
                groups,
                scale,
                renormalize,
                ..
            } if self.restricts(num_experts) => Gating::SigmoidGrouped {
                groups,
                top_groups: groups,
                scale,
                renormalize,
            },
            g => g,
        }
    }
}

/// One attention layer of explicit geometry ([`Backend::prepare_heads`],
/// [`Backend::attention_heads`]): DiffusionGemma's layers differ in head size, KV heads and RoPE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadsParams {
    pub layer: usize,
    pub geom: LayerAttention,
    pub eps: f32,
    /// RMSNorm without a weight over each v head.
    pub v_norm: bool,
    /// Score scale.
    pub scale: f32,
    /// Absolute position of the first row; the rows' K/V are cached at `start..start+T`.
    pub start: usize,
    /// Keys `0..kv_len` are candidates; `mask` and the window decide.
    pub kv_len: usize,
    pub mask: AttnMask,
    /// Where a sliding window ends: `false`, at the query (key `j` visible iff `q − j < window`
    /// or `j > q`); `true`, at the pass's first row for keys before it (the canvas decoder:
    /// every canvas row sees the `window − 1` cached positions before `start`, as transformers'
    /// sliding cache layers hold them, and the whole canvas).
    pub window_at_start: bool,
}

/// Sizes of a scaled-norm router ([`Backend::route_scaled`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaledRouterParams {
    pub experts: usize,
    pub top_k: usize,
    pub eps: f32,
}

/// The commit rule a backend applies by itself after a denoising step ([`Backend::commit_step`]):
/// the greedy forms of `decode::CommitPolicy` that carry nothing from step to step but the step
/// count (credit keeps a ledger and sampling a host RNG stream: those stay on the host), and
/// `Next`, AR's step (decode/ar.rs): the cell `stats_from` — the canvas's first masked cell —
/// takes its greedy token from statistics row 0 and no other cell commits (a cell already known
/// stays as it is); the EOS rule applies as with the block rules.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CommitRule {
    Threshold { threshold: f32 },
    FixedSteps { steps: usize },
    EntropyBound { gamma: f32 },
    Margin { margin: f32 },
    Next,
}

/// One block's commit step on the device ([`Backend::commit_step`]): greedy choice, the rule, and
/// dInfer's EOS rule, over the cells of a [`Backend::Canvas`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommitParams {
    pub rule: CommitRule,
    /// The input id of a masked cell (written to the canvas's tokens for the next pass).
    pub mask: u32,
    /// Once a cell at or after `output_from` holds this id, every later cell becomes it (`None`:
    /// the rule is off, as with `ignore_eos`).
    pub eos: Option<u32>,
    /// Cells before this index are prompt.
    pub output_from: usize,
    /// The cell whose statistics are row 0 of the step's [`Backend::Stats`]; cell `i` reads row
    /// `i − stats_from`. Cells before it must be known from the start ([`CommitRule::Next`]: by
    /// this step).
    pub stats_from: usize,
}

impl CommitParams {
    /// Shape check shared by the backends: a canvas of `n` cells whose first masked cell was
    /// `first_masked` when it was made and on which `recorded` steps were recorded before this
    /// one, against statistics of `rows` rows.
    pub fn check(&self, n: usize, first_masked: usize, recorded: usize, rows: usize) -> Result<()> {
        let fits = match self.rule {
            // One row is read, for one cell. A step of this rule commits at most that cell, so
            // after `recorded` steps the first masked cell is at most `first_masked + recorded`
            // (the check cannot see the device's cells, only the steps asked for): a cell further
            // on would leave masked cells before the one committed — not AR's step.
            CommitRule::Next => {
                rows >= 1
                    && self.stats_from < n
                    && self.stats_from <= first_masked.saturating_add(recorded)
            }
            _ => self.stats_from <= first_masked && rows.saturating_add(self.stats_from) >= n,
        };
        if !fits {
            return Err(BackendError::Shape {
                op: "commit_step",
                detail: format!(
                    "{:?}: statistics of {rows} rows from cell {} for {n} cells, the first masked \
                     {first_masked}, {recorded} steps recorded",
                    self.rule, self.stats_from
                ),
            });
        }
        if let CommitRule::FixedSteps { steps: 0 } = self.rule {
            return Err(BackendError::Shape {
                op: "commit_step",
                detail: "fixed steps 0".into(),
            });
        }
        Ok(())
    }
}

/// A [`Backend::Canvas`] read back: its step count, its cells (`None`: masked), and the cells after
/// each of the steps asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct CanvasState {
    pub steps: usize,
    pub cells: Vec<Option<u32>>,
    /// `history[k]`: the cells after step `first + k + 1` of the block, for the range read.
    pub history: Vec<Vec<Option<u32>>>,
}

/// One sequence's share of [`Backend::rope_attention_seqs`].
pub struct SeqAttention<'a, K> {
    pub kv: &'a mut K,
    /// Its rows of the batched pass.
    pub rows: std::ops::Range<usize>,
    pub start: usize,
    pub kv_len: usize,
    pub mask: AttnMask,
}

/// [`Backend::gather_rows`] as row copies stacked.
pub fn gather_rows_by_copies<B: Backend + ?Sized>(
    b: &B,
    x: &B::Act,
    ranges: &[std::ops::Range<usize>],
) -> Result<B::Act> {
    let parts = ranges
        .iter()
        .map(|r| b.rows_of(x, r.clone()))
        .collect::<Result<Vec<_>>>()?;
    b.stack_rows(&parts.iter().collect::<Vec<_>>())
}

/// [`Backend::rope_attention_seqs`] one sequence at a time: its rows copied out, attended, and
/// stacked back.
pub fn rope_attention_each<B: Backend + ?Sized>(
    b: &B,
    qkv: &B::Act,
    q_norm: Option<&B::Weight>,
    k_norm: Option<&B::Weight>,
    seqs: &mut [SeqAttention<'_, B::Kv>],
    layer: usize,
    config: &ModelConfig,
) -> Result<B::Act> {
    let mut parts = Vec::with_capacity(seqs.len());
    for s in seqs.iter_mut() {
        let mut q = b.rows_of(qkv, s.rows.clone())?;
        parts.push(b.rope_attention(
            &mut q, q_norm, k_norm, s.kv, layer, config, s.start, s.kv_len, s.mask,
        )?);
    }
    b.stack_rows(&parts.iter().collect::<Vec<_>>())
}

/// One backend: weight storage, activations, KV cache and the ops of the forward pass.
/// Activations are `[tokens, features]`, row-major.
pub trait Backend {
    /// A weight matrix `[out, in]` or vector, in the file's type.
    type Weight;
    /// An activation matrix `[rows, cols]`.
    type Act;
    /// The routed experts of one layer.
    type Experts;
    /// The K/V cache of every layer.
    type Kv;
    /// Router output for a batch of tokens: top-k expert ids and weights per token.
    type Routing;
    /// A block being denoised where the backend keeps it ([`Backend::new_canvas`]): its cells
    /// (token or masked), the next pass's input ids, its step count and each step's cells.
    type Canvas;
    /// Per-position statistics left where the backend computed them ([`Backend::lm_head_stats_kept`]).
    type Stats;

    fn name(&self) -> String;

    /// Called as a model starts loading, with a key naming it: a backend that compiles kernels
    /// may start on those this model needed before (the GPU's pipeline store), so the work
    /// overlaps the load instead of the first passes.
    fn prepare_for_model(&self, _model_key: &str) {}
    /// Called after a generation: a backend may keep what it learned for later runs (the GPU's
    /// compiled pipelines, where a store is configured). Cheap when nothing is new.
    fn keep_caches(&self) {}

    fn load_weight(&self, view: TensorView<'_>) -> Result<Self::Weight>;
    /// Whether [`Backend::load_weight`] copies a weight out of host memory for good (into GPU
    /// buffers), so the model file's mapped pages under it can be dropped once it returns.
    fn weights_leave_host(&self) -> bool {
        false
    }
    /// Loads the experts of `layer` that `resident` allows; the others must never be read.
    fn load_experts(
        &self,
        file: &std::sync::Arc<crate::format::EdmFile>,
        layer: usize,
        resident: &dyn Fn(usize) -> bool,
    ) -> Result<Self::Experts>;
    fn new_kv(&self, config: &ModelConfig, capacity: usize) -> Result<Self::Kv>;
    fn kv_capacity(&self, kv: &Self::Kv) -> usize;
    /// Sets aside room for `positions` KV-cache positions of `config` that later [`Backend::new_kv`]
    /// caches are carved from, so that a batched pass can attend for all its sequences at once
    /// ([`Backend::rope_attention_seqs`]); a cache that no longer fits gets its own memory. Replaces
    /// an earlier reservation (caches already in it keep theirs). Returns the positions set aside:
    /// 0 where the backend gains nothing from it (the CPU) or the model does not suit it.
    fn reserve_kv(&self, _config: &ModelConfig, _positions: usize) -> Result<usize> {
        Ok(0)
    }

    /// Called before the ops of one forward pass over `tokens` positions, of which one sequence
    /// has at most `largest` (a batched pass, [`crate::model::Model::forward_batch`]; a single
    /// sequence's pass has `largest == tokens`). A backend whose kernels sum a row differently
    /// at different row counts chooses them as for `largest` rows, so each sequence's rows come
    /// out as its pass alone computes them.
    fn begin_forward(&self, _tokens: usize, _largest: usize) -> Result<()> {
        Ok(())
    }

    /// Called before the LM head of a batched pass over `rows` gathered rows, of which one
    /// sequence has at most `largest` (the rows it wants; alone, its LM head runs over those):
    /// as [`Backend::begin_forward`], for the LM head's kernels.
    fn begin_head(&self, _rows: usize, _largest: usize) -> Result<()> {
        Ok(())
    }

    /// Which passes may share a batched pass: those of the same class, each row computed exactly
    /// as in its pass alone ([`Backend::begin_forward`], [`Backend::begin_head`]). A pass has
    /// `rows` rows and wants `head_rows` of them through the LM head. `None`: it runs alone.
    fn batch_class(&self, _config: &ModelConfig, _rows: usize, _head_rows: usize) -> Option<u64> {
        Some(0)
    }

    /// A copy of rows `rows` of `x` (one sequence's rows of a batched pass).
    fn rows_of(&self, x: &Self::Act, rows: std::ops::Range<usize>) -> Result<Self::Act>;
    /// The rows of `parts`, one after another (the sequences of a batched pass, back together).
    fn stack_rows(&self, parts: &[&Self::Act]) -> Result<Self::Act>;
    /// Rows `ranges` of `x`, one range after another (the rows a batched pass's sequences want
    /// from its LM head).
    fn gather_rows(&self, x: &Self::Act, ranges: &[std::ops::Range<usize>]) -> Result<Self::Act> {
        gather_rows_by_copies(self, x, ranges)
    }

    /// Rows of the embedding table.
    fn embed(&self, table: &Self::Weight, tokens: &[u32]) -> Result<Self::Act>;
    /// RMSNorm of each row: x / sqrt(mean(x²) + eps) · w.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Weight, eps: f32) -> Result<Self::Act>;
    /// x += delta, then returns rms_norm(x).
    fn add_rms_norm(
        &self,
        x: &mut Self::Act,
        delta: &Self::Act,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act>;
    /// x += delta.
    fn add(&self, x: &mut Self::Act, delta: &Self::Act) -> Result<()>;
    /// y = x · Wᵀ for W `[out, in]`.
    fn matmul(&self, w: &Self::Weight, x: &Self::Act) -> Result<Self::Act>;
    /// SwiGLU MLP with fused gate/up `[2I, H]` (gate rows first) and down `[H, I]`.
    fn mlp(&self, gate_up: &Self::Weight, down: &Self::Weight, x: &Self::Act) -> Result<Self::Act>;
    /// In place on the fused qkv rows `[T, (nq + 2 nkv) · hd]`: optional clip, q/k norm, RoPE at
    /// positions `start..start+T`.
    fn qk_norm_rope(
        &self,
        qkv: &mut Self::Act,
        q_norm: Option<&Self::Weight>,
        k_norm: Option<&Self::Weight>,
        config: &ModelConfig,
        start: usize,
    ) -> Result<()>;
    /// Writes the block's K/V (from `qkv`) into the cache at `start..start+T`, then attends each
    /// query to the cached keys `0..kv_len` allowed by `mask`. Returns `[T, nq · hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        qkv: &Self::Act,
        kv: &mut Self::Kv,
        layer: usize,
        config: &ModelConfig,
        start: usize,
        kv_len: usize,
        mask: AttnMask,
    ) -> Result<Self::Act>;
    /// One attention layer from its fused qkv rows: [`Backend::qk_norm_rope`] then
    /// [`Backend::attention`] (same arguments, same results, the same K/V left in the cache). One
    /// op so a backend can store the K/V from its RoPE kernel instead of a separate pass.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        qkv: &mut Self::Act,
        q_norm: Option<&Self::Weight>,
        k_norm: Option<&Self::Weight>,
        kv: &mut Self::Kv,
        layer: usize,
        config: &ModelConfig,
        start: usize,
        kv_len: usize,
        mask: AttnMask,
    ) -> Result<Self::Act> {
        self.qk_norm_rope(qkv, q_norm, k_norm, config, start)?;
        self.attention(qkv, kv, layer, config, start, kv_len, mask)
    }
    /// [`Backend::rope_attention`] of several sequences' rows of one batched pass (`qkv` holds
    /// them one after another, `seqs` in that order), each against its own cache at its own
    /// positions and mask; returns their attention outputs in the same rows. Each sequence's
    /// rows and cache come out as its pass alone computes them. By default one sequence at a
    /// time; a backend may serve them all with one dispatch ([`Backend::reserve_kv`]).
    fn rope_attention_seqs(
        &self,
        qkv: &mut Self::Act,
        q_norm: Option<&Self::Weight>,
        k_norm: Option<&Self::Weight>,
        seqs: &mut [SeqAttention<'_, Self::Kv>],
        layer: usize,
        config: &ModelConfig,
    ) -> Result<Self::Act> {
        rope_attention_each(self, qkv, q_norm, k_norm, seqs, layer, config)
    }
    /// Router logits → top-k experts and weights per token.
    fn route(
        &self,
        x: &Self::Act,
        router: &Self::Weight,
        bias: Option<&Self::Weight>,
        config: &ModelConfig,
    ) -> Result<Self::Routing>;
    /// [`Backend::route`] with block-level routing (see [`BlockRouting`]).
    fn route_within_blocks(
        &self,
        _x: &Self::Act,
        _router: &Self::Weight,
        _bias: Option<&Self::Weight>,
        _config: &ModelConfig,
        _blocks: &BlockRouting,
    ) -> Result<Self::Routing> {
        Err(self.unsupported("route_within_blocks"))
    }
    /// Σ_k weight_k · expert_k(x) per token.
    fn moe(
        &self,
        x: &Self::Act,
        routing: &Self::Routing,
        experts: &Self::Experts,
    ) -> Result<Self::Act>;
    /// `moe` plus the shared experts' output `shared` (the same sum, then one add; a backend may
    /// fuse the add into its last step).
    fn moe_plus_shared(
        &self,
        x: &Self::Act,
        routing: &Self::Routing,
        experts: &Self::Experts,
        shared: &Self::Act,
    ) -> Result<Self::Act> {
        let mut y = self.moe(x, routing, experts)?;
        self.add(&mut y, shared)?;
        Ok(y)
    }
    /// [`Backend::moe_plus_shared`] of the shared experts' SwiGLU MLP over `x` (`gate_up`
    /// `[2I, H]`, `down` `[H, I]`): a backend may compute that MLP inside its routed-expert kernels
    /// (one pass over the layer's expert weights instead of separate dense matmuls).
    fn moe_shared_mlp(
        &self,
        x: &Self::Act,
        routing: &Self::Routing,
        experts: &Self::Experts,
        gate_up: &Self::Weight,
        down: &Self::Weight,
    ) -> Result<Self::Act> {
        let ys = self.mlp(gate_up, down, x)?;
        self.moe_plus_shared(x, routing, experts, &ys)
    }
    /// The MoE FFN of a layer: [`Backend::moe_shared_mlp`] when `shared` holds the shared
    /// experts' (gate_up, down), else [`Backend::moe`].
    fn moe_ffn(
        &self,
        h: &Self::Act,
        routing: &Self::Routing,
        experts: &Self::Experts,
        shared: Option<(&Self::Weight, &Self::Weight)>,
    ) -> Result<Self::Act> {
        match shared {
            Some((gate_up, down)) => self.moe_shared_mlp(h, routing, experts, gate_up, down),
            None => self.moe(h, routing, experts),
        }
    }
    /// The MoE FFN of a layer — [`Backend::moe_shared_mlp`] when `shared` holds the shared
    /// experts' (gate_up, down), else [`Backend::moe`] — added to the residual `x`, which is then
    /// RMS-normed by `norm`: the next sublayer's input, as [`Backend::add_rms_norm`] returns it. A
    /// backend may fold the add and the norm into the MoE's last step.
    #[allow(clippy::too_many_arguments)]
    fn moe_add_rms_norm(
        &self,
        h: &Self::Act,
        routing: &Self::Routing,
        experts: &Self::Experts,
        shared: Option<(&Self::Weight, &Self::Weight)>,
        x: &mut Self::Act,
        norm: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act> {
        let y = self.moe_ffn(h, routing, experts, shared)?;
        self.add_rms_norm(x, &y, norm, eps)
    }
    /// Whether this pass (after [`Backend::begin_forward`]) runs the fused-norm forward: the
    /// residual stream's norms folded into the ops that read it ([`Backend::matmul_normed`],
    /// [`Backend::route_normed`]) and its adds into the ops that produce them
    /// ([`Backend::matmul_add`], [`Backend::moe_add`]), instead of [`Backend::add_rms_norm`]
    /// between them. The results agree to rounding (a norm summed in another order).
    fn fuses_norms(&self) -> bool {
        false
    }
    /// `matmul(w, rms_norm(x, norm))`.
    fn matmul_normed(
        &self,
        w: &Self::Weight,
        x: &Self::Act,
        norm: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act> {
        let h = self.rms_norm(x, norm, eps)?;
        self.matmul(w, &h)
    }
    /// `x += matmul(w, a)`.
    fn matmul_add(&self, w: &Self::Weight, a: &Self::Act, x: &mut Self::Act) -> Result<()> {
        let y = self.matmul(w, a)?;
        self.add(x, &y)
    }
    /// `h = rms_norm(x, norm)` and its routing ([`Backend::route`], or
    /// [`Backend::route_within_blocks`] where `blocks` is given: a block-routed pass takes the
    /// same fused kernels as an exactly routed one, so the two agree bit for bit where the blocks
    /// keep every expert).
    #[allow(clippy::too_many_arguments)]
    fn route_normed(
        &self,
        x: &Self::Act,
        norm: &Self::Weight,
        eps: f32,
        router: &Self::Weight,
        bias: Option<&Self::Weight>,
        config: &ModelConfig,
        blocks: Option<&BlockRouting>,
    ) -> Result<(Self::Act, Self::Routing)> {
        let h = self.rms_norm(x, norm, eps)?;
        let routing = match blocks {
            None => self.route(&h, router, bias, config)?,
            Some(bl) => self.route_within_blocks(&h, router, bias, config, bl)?,
        };
        Ok((h, routing))
    }
    /// `x += mlp(gate_up, down, rms_norm(x, norm))`: a dense FFN sublayer of the fused-norm
    /// forward.
    fn mlp_add(
        &self,
        gate_up: &Self::Weight,
        down: &Self::Weight,
        x: &mut Self::Act,
        norm: &Self::Weight,
        eps: f32,
    ) -> Result<()> {
        let h = self.rms_norm(x, norm, eps)?;
        let y = self.mlp(gate_up, down, &h)?;
        self.add(x, &y)
    }
    /// [`Backend::moe_add_rms_norm`] without the norm: `x +=` the layer's MoE FFN of `h`.
    fn moe_add(
        &self,
        h: &Self::Act,
        routing: &Self::Routing,
        experts: &Self::Experts,
        shared: Option<(&Self::Weight, &Self::Weight)>,
        x: &mut Self::Act,
    ) -> Result<()> {
        let y = self.moe_ffn(h, routing, experts, shared)?;
        self.add(x, &y)
    }
    /// CCA attention inputs, in place: `proj` rows `[q | k | v_current | v_delayed]` (the fused
    /// projection, `[T, q_dim + 2 kv_dim]`) become `[q | k | v]` as [`Backend::attention`] reads
    /// them. The raw `[q; k]` rows and delayed-v rows of positions `start..start+T` are written into
    /// `kv`'s per-position state, and those of the two positions before `start` are read from it,
    /// so a pass resumed at any cached position (a rolled-back draft included) sees exactly the
    /// state a full recompute would.
    fn cca_qkv(
        &self,
        _proj: &mut Self::Act,
        _w: CcaWeights<'_, Self::Weight>,
        _kv: &mut Self::Kv,
        _p: CcaParams,
    ) -> Result<()> {
        Err(self.unsupported("cca_qkv"))
    }
    /// MLP router with EDA: returns the routing and this layer's router state, which the next
    /// MoE layer takes as `eda`. A chosen skip class is reported as expert `experts`, weight 0.
    fn route_mlp(
        &self,
        _x: &Self::Act,
        _w: MlpRouterWeights<'_, Self::Weight>,
        _eda: Option<&Self::Act>,
        _p: MlpRouterParams,
    ) -> Result<(Self::Routing, Self::Act)> {
        Err(self.unsupported("route_mlp"))
    }
    /// Scaled residual, then the next norm: `x = (delta + s[0]) ⊙ s[1] + (x + s[2]) ⊙ s[3]` for
    /// `scales` `[4, H]`; returns rms_norm(x).
    fn scaled_residual_norm(
        &self,
        _x: &mut Self::Act,
        _delta: &Self::Act,
        _scales: &Self::Weight,
        _norm: &Self::Weight,
        _eps: f32,
    ) -> Result<Self::Act> {
        Err(self.unsupported("scaled_residual_norm"))
    }
    /// `x = (x + a[0]) ⊙ a[1]` for `affine` `[2, H]` (ZAYA1's input embedding).
    fn embed_affine(&self, _x: &mut Self::Act, _affine: &Self::Weight) -> Result<()> {
        Err(self.unsupported("embed_affine"))
    }
    /// Whether this backend has every op of DiffusionGemma's canvas model (`model::canvas`):
    /// [`Backend::prepare_heads`] through [`Backend::logits_softcap`]. A model is refused at load
    /// where it has not, so a pass never stops halfway.
    fn has_canvas_ops(&self) -> bool {
        false
    }
    /// Per-head q/k RMSNorm (weights `[head_dim]`), optional weightless v norm and RoPE of a layer
    /// of explicit geometry: the fused projection `[T, proj_dim]` (`[q | k | v]`, or `[q | k]` with
    /// v = k's projection) becomes `[T, q | k | v]` as [`Backend::attention_heads`] reads it.
    fn prepare_heads(
        &self,
        _proj: &Self::Act,
        _q_norm: &Self::Weight,
        _k_norm: &Self::Weight,
        _p: HeadsParams,
    ) -> Result<Self::Act> {
        Err(self.unsupported("prepare_heads"))
    }
    /// [`Backend::attention`] for a layer of explicit geometry (cache rows of the layer's own
    /// width), with the score scale and window rule of `p`. Returns `[T, heads · head_dim]`.
    fn attention_heads(
        &self,
        _qkv: &Self::Act,
        _kv: &mut Self::Kv,
        _p: HeadsParams,
    ) -> Result<Self::Act> {
        Err(self.unsupported("attention_heads"))
    }
    /// A gated MLP with activation `act` (`Silu` is [`Backend::mlp`]).
    fn gated_mlp(
        &self,
        _gate_up: &Self::Weight,
        _down: &Self::Weight,
        _x: &Self::Act,
        _act: Activation,
    ) -> Result<Self::Act> {
        Err(self.unsupported("gated_mlp"))
    }
    /// [`Backend::moe`] with experts of activation `act`.
    fn moe_act(
        &self,
        _x: &Self::Act,
        _routing: &Self::Routing,
        _experts: &Self::Experts,
        _act: Activation,
    ) -> Result<Self::Act> {
        Err(self.unsupported("moe_act"))
    }
    /// The scaled-norm router (`RouterKind::ScaledNorm`) on the raw residual `x`: weightless
    /// RMSNorm, `⊙ scale · H^-½`, `proj` `[E, H]`, softmax, top-k renormalised, × `expert_scale`.
    fn route_scaled(
        &self,
        _x: &Self::Act,
        _proj: &Self::Weight,
        _scale: &Self::Weight,
        _expert_scale: &Self::Weight,
        _p: ScaledRouterParams,
    ) -> Result<Self::Routing> {
        Err(self.unsupported("route_scaled"))
    }
    /// `x ·= s`.
    fn scale(&self, _x: &mut Self::Act, _s: f32) -> Result<()> {
        Err(self.unsupported("scale"))
    }
    /// Soft embeddings of the canvas decoder's self-conditioning: `softmax(logits) · table · s`
    /// for host `logits` `[rows, vocab]` and the embedding `table` `[vocab, H]`.
    fn soft_embed(&self, _logits: &[f32], _table: &Self::Weight, _s: f32) -> Result<Self::Act> {
        Err(self.unsupported("soft_embed"))
    }
    /// One step of the canvas sampler (`decode::canvas`) at the end of a decoder pass: the tied
    /// head's logits of the final rows `x` `[C, H]` (`table` `[V, H]`), capped and divided by the
    /// temperature (`p`); per row its [`draw::RowDraw`] for `uniforms[row]`
    /// ([`draw::row_draw`]); and the next step's self-conditioning input
    /// `softmax(tempered) · table · embed_scale` `[C, H]` (as [`Backend::soft_embed`] of them;
    /// `None` unless `p.next_input`).
    /// The logits need not leave the backend: a canvas of 256 over a vocabulary of 262,144 is
    /// 268 MB of them a step.
    fn canvas_head(
        &self,
        _x: &Self::Act,
        _table: &Self::Weight,
        _p: draw::CanvasHeadParams,
        _uniforms: &[f32],
    ) -> Result<(Vec<draw::RowDraw>, Option<Self::Act>)> {
        Err(self.unsupported("canvas_head"))
    }
    /// [`Backend::lm_head_stats`] of logits capped as `cap · tanh(logits / cap)`.
    fn lm_head_stats_softcap(
        &self,
        _x: &Self::Act,
        _head: &Self::Weight,
        _rows: std::ops::Range<usize>,
        _cap: f32,
    ) -> Result<Vec<PositionStats>> {
        Err(self.unsupported("lm_head_stats_softcap"))
    }
    /// [`Backend::logits`] capped as `cap · tanh(logits / cap)`.
    fn logits_softcap(
        &self,
        _x: &Self::Act,
        _head: &Self::Weight,
        _rows: std::ops::Range<usize>,
        _cap: f32,
    ) -> Result<Vec<f32>> {
        Err(self.unsupported("logits_softcap"))
    }
    /// A canvas of `cells` (`None`: masked; the next pass reads `mask` there), at step 0.
    fn new_canvas(&self, _cells: &[Option<u32>], _mask: u32) -> Result<Self::Canvas> {
        Err(self.unsupported("new_canvas"))
    }
    /// One denoising step's decisions on `canvas` from `stats` (see [`CommitParams`]): each masked
    /// cell's greedy token, the rule's choice among them, the EOS rule; the step count goes up by
    /// one and the step's cells are kept. A canvas with no masked cell is left as it is. The
    /// decisions are those of the decoder's host step on the same statistics, bit for bit.
    fn commit_step(
        &self,
        _canvas: &mut Self::Canvas,
        _stats: &Self::Stats,
        _p: &CommitParams,
    ) -> Result<()> {
        Err(self.unsupported("commit_step"))
    }
    /// The canvas's state, with the cells after steps `steps` (block-relative, 0-based) of its
    /// history; steps not taken yet are left out.
    fn read_canvas(
        &self,
        _canvas: &Self::Canvas,
        _steps: std::ops::Range<usize>,
    ) -> Result<CanvasState> {
        Err(self.unsupported("read_canvas"))
    }
    /// The canvases' states as [`Backend::read_canvas`] gives each (the steps `steps[i]` of
    /// canvas `i`), read back together: the sequences of a batched chain of steps
    /// ([`crate::model::Model::denoise_steps`]) cost one round trip, not one each.
    fn read_canvases(
        &self,
        canvases: &[&Self::Canvas],
        steps: &[std::ops::Range<usize>],
    ) -> Result<Vec<CanvasState>> {
        canvases
            .iter()
            .zip(steps)
            .map(|(c, s)| self.read_canvas(c, s.clone()))
            .collect()
    }
    /// Rows `rows` of `stats`, as statistics of their own (row 0 the first of them): each
    /// sequence's rows of a batched pass's LM head, for its own [`Backend::commit_step`]. A typed
    /// error unless the rows lie within `stats`.
    fn stats_rows(
        &self,
        _stats: &Self::Stats,
        _rows: std::ops::Range<usize>,
    ) -> Result<Self::Stats> {
        Err(self.unsupported("stats_rows"))
    }
    /// [`Backend::embed`] of the input ids of the canvas's cells `from..from + t`, read where the
    /// canvas lives (a block's steps embed the whole canvas, AR's steps the cells at their
    /// position); a typed error unless `1 ≤ t` and `from + t ≤` its cells.
    fn embed_canvas(
        &self,
        _table: &Self::Weight,
        _canvas: &Self::Canvas,
        _from: usize,
        _t: usize,
    ) -> Result<Self::Act> {
        Err(self.unsupported("embed_canvas"))
    }
    /// [`Backend::lm_head_stats`] left where it was computed, for [`Backend::commit_step`].
    fn lm_head_stats_kept(
        &self,
        _x: &Self::Act,
        _head: &Self::Weight,
        _rows: std::ops::Range<usize>,
    ) -> Result<Self::Stats> {
        Err(self.unsupported("lm_head_stats_kept"))
    }
    /// Host statistics as [`Backend::Stats`] (tests of the commit step).
    fn upload_stats(&self, _stats: &[PositionStats]) -> Result<Self::Stats> {
        Err(self.unsupported("upload_stats"))
    }
    /// Whether the backend records passes and submits them later (a GPU): several denoising steps
    /// chained on a canvas then cost one host round trip instead of one each.
    fn records_passes(&self) -> bool {
        false
    }
    /// Whether a pass over `experts` must read routing back mid-way (exact paging): such passes
    /// cannot be chained without the host.
    fn experts_paged(&self, _experts: &Self::Experts) -> bool {
        false
    }
    /// The error of an op this backend does not have.
    fn unsupported(&self, op: &'static str) -> BackendError {
        BackendError::Unsupported {
            op,
            backend: self.name(),
        }
    }
    /// Routing on the host, `(ids, weights)` of `[T, top_k]`, for profiles and paging.
    fn routing_to_host(&self, routing: &Self::Routing) -> Result<(Vec<u32>, Vec<f32>)>;
    /// LM head over the (already normalised) rows in `rows`, reduced to per-position statistics.
    fn lm_head_stats(
        &self,
        x: &Self::Act,
        head: &Self::Weight,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<PositionStats>>;
    /// Full logits `[rows, vocab]` (debugging, parity tests, exact sampling).
    fn logits(
        &self,
        x: &Self::Act,
        head: &Self::Weight,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<f32>>;
}

/// Statistics of one row of logits, shared by every backend that reduces on the host and by tests.
pub fn stats_from_logits(logits: &[f32]) -> PositionStats {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for &l in logits {
        sum += ((l - max) as f64).exp();
    }
    let log_z = max as f64 + sum.ln();
    let mut entropy = 0f64;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(TOP_K + 1);
    for (i, &l) in logits.iter().enumerate() {
        let lp = l as f64 - log_z;
        let p = lp.exp();
        entropy -= p * lp;
        if best.len() < TOP_K || p as f32 > best[best.len() - 1].1 {
            let at = best.partition_point(|&(_, q)| q >= p as f32);
            best.insert(at, (i as u32, p as f32));
            best.truncate(TOP_K);
        }
    }
    let p1 = best.first().map_or(0.0, |b| b.1);
    let p2 = best.get(1).map_or(0.0, |b| b.1);
    PositionStats {
        argmax: best.first().map_or(0, |b| b.0),
        p_max: p1,
        entropy: entropy as f32,
        margin: p1 - p2,
        top: best,
    }
}
