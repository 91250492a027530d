//! Decoding: from a prompt's ids to generated ids, as strategies over the one forward pass.
//!
//! Every decoder asks the model for the same thing — `forward(tokens, window, mask)` → per-position
//! statistics — and differs only in which positions it feeds, which cached keys it lets them see,
//! and which predictions it commits:
//! - [`DecoderKind::Block`]: block diffusion for block-causal models (LLaDA2, SDAR) with an exact KV
//!   cache of committed blocks (`block`);
//! - [`DecoderKind::Bidirectional`]: LLaDA-style masked diffusion over a fixed-length canvas with
//!   Fast-dLLM's prefix or dual cache (`bidirectional`);
//! - [`DecoderKind::Speculative`]: TiDAR-style self-speculation, one pass verifying the last draft
//!   with causal logits and drafting the next block (`speculative`);
//! - [`DecoderKind::Ar`]: one token per forward, the baseline of every speedup figure (`ar`);
//! - [`DecoderKind::Canvas`]: DiffusionGemma's uniform-noise canvas sampler over
//!   `model::canvas::CanvasModel` (its own two passes, so it runs through [`canvas::decode`],
//!   not [`decode`]).
//!
//! Commit policies ([`policy`]) and token choice ([`sampling`]) are small pure functions over the
//! statistics. This layer knows ids only: text, stop strings and chat templates live in
//! `engine`, which watches the committed ids through an [`Observer`].

mod ar;
mod bidirectional;
mod block;
pub mod canvas;
mod chain;
pub(crate) mod denoise;
pub mod policy;
pub mod sampling;
mod speculative;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use canvas::CanvasOptions;
pub use policy::{Candidate, CommitPolicy, CreditLedger};
pub use sampling::{Rng, Sampling};

use crate::backend::{Backend, BlockRouting, PositionStats};
use crate::model::{ForwardOutput, ForwardRequest, Model, ModelError, Window};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{name} = {value} is invalid: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("a prompt of {prompt} tokens plus {max_new} new tokens exceeds the context of {context} positions")]
    ContextTooLong {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the {decoder} decoder needs a mask token, and the model file names none")]
    NoMaskToken { decoder: &'static str },
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "the {decoder} decoder cannot run a {architecture} model; it decodes with: {supported}"
    )]
    WrongDecoder {
        decoder: &'static str,
        architecture: String,
        supported: &'static str,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl DecodeError {
    pub fn invalid(name: &'static str, value: impl ToString, expected: &'static str) -> Self {
        DecodeError::InvalidParameter {
            name,
            value: value.to_string(),
            expected,
        }
    }
}

pub use crate::model::Prediction;

/// Where the block and AR decoders decide their steps ([`DecodeParams::device_steps`]): a block
/// diffusion denoising step, or an AR token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSteps {
    /// On the device, several steps per submission, where the backend records passes (a GPU)
    /// and the step allows it (greedy choice; passes run alone, not batched; no exact paging;
    /// block diffusion also: threshold, fixed-steps, entropy-bound or margin policy, a model
    /// predicting masks in place, not `reuse_last_kv`); on the host otherwise.
    #[default]
    Auto,
    /// Always on the host, one round trip per step (the reference, and for debugging).
    Host,
    /// On the device wherever the step allows it, on any backend (the CPU included: tests compare
    /// the two loops there too).
    Device,
}

impl DeviceSteps {
    /// Whether steps should chain on `b`, where the step allows it.
    pub fn wanted<B: Backend>(self, b: &B) -> bool {
        match self {
            DeviceSteps::Host => false,
            DeviceSteps::Auto => b.records_passes(),
            DeviceSteps::Device => true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockOptions {
    pub block_size: usize,
    /// Skip the clean pass over a finished block and keep the K/V its last denoising step wrote
    /// (computed while some of its positions were still masks: an approximation).
    pub reuse_last_kv: bool,
}

/// Which K/V the bidirectional decoder reuses between the steps of a block (Fast-dLLM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BidirectionalCache {
    /// Every step is a full pass over prompt + canvas (the uncached LLaDA baseline).
    None,
    /// A full pass at each block start; steps run the block and everything after it, reusing
    /// the prefix K/V.
    Prefix,
    /// Like `Prefix`, and the suffix K/V is frozen too: steps run the block alone.
    Dual,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BidirectionalOptions {
    pub block_size: usize,
    pub cache: BidirectionalCache,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpeculativeOptions {
    /// Tokens drafted per pass (TiDAR and ZAYA1-Diffusion use 16).
    pub draft_len: usize,
    /// Logit mixing weight: the target is β·AR + (1−β)·diffusion; 1 is lossless.
    pub beta: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecoderKind {
    Block(BlockOptions),
    Bidirectional(BidirectionalOptions),
    Speculative(SpeculativeOptions),
    Ar,
    /// DiffusionGemma's canvas sampler (canvas models only).
    Canvas(CanvasOptions),
}

impl DecoderKind {
    pub fn name(&self) -> &'static str {
        match self {
            DecoderKind::Block(_) => "block",
            DecoderKind::Bidirectional(_) => "bidirectional",
            DecoderKind::Speculative(_) => "speculative",
            DecoderKind::Ar => "ar",
            DecoderKind::Canvas(_) => "canvas",
        }
    }

    /// The decoder with its main options, for tables and logs.
    pub fn label(&self) -> String {
        match self {
            DecoderKind::Block(o) => format!(
                "block B={}{}",
                o.block_size,
                if o.reuse_last_kv { " reuse-kv" } else { "" }
            ),
            DecoderKind::Bidirectional(o) => format!(
                "bidirectional B={} {}",
                o.block_size,
                match o.cache {
                    BidirectionalCache::None => "no-cache",
                    BidirectionalCache::Prefix => "prefix-cache",
                    BidirectionalCache::Dual => "dual-cache",
                }
            ),
            DecoderKind::Speculative(o) if o.beta >= 1.0 => {
                format!("speculative k={} lossless", o.draft_len)
            }
            DecoderKind::Speculative(o) => {
                format!("speculative k={} β={}", o.draft_len, o.beta)
            }
            DecoderKind::Ar => "ar".into(),
            DecoderKind::Canvas(o) => format!(
                "canvas steps={} γ={} t={}→{}",
                o.steps, o.entropy_bound, o.t_max, o.t_min
            ),
        }
    }

    /// Whether the commit policy plays a part (it does for the diffusion decoders).
    pub fn uses_policy(&self) -> bool {
        matches!(self, DecoderKind::Block(_) | DecoderKind::Bidirectional(_))
    }
}

/// Cancels a generation from anywhere (another thread, an event callback). The decoder checks
/// it before every forward pass, so it stops within one step.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Everything about how to decode, independent of text.
#[derive(Clone, Debug)]
pub struct DecodeParams {
    pub decoder: DecoderKind,
    pub policy: CommitPolicy,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Keep going past EOS (benchmarks of a fixed length).
    pub ignore_eos: bool,
    pub prediction: Prediction,
    pub cancel: Option<CancelToken>,
    /// Report the block state after every step ([`Observer::canvas`]).
    pub canvas_events: bool,
    /// Block-level expert routing (`--block-experts N`): every token of a block routes only within
    /// the N experts per MoE layer with the largest router mass over the block's tokens. Which
    /// rows form a block is each decoder's (`PassBlocks`); `None` routes exactly.
    pub block_experts: Option<usize>,
    /// Where the block and AR decoders decide their steps: chained on the device or one by one
    /// on the host (same tokens either way; [`DeviceSteps`]).
    pub device_steps: DeviceSteps,
}

impl Default for DecodeParams {
    fn default() -> Self {
        DecodeParams {
            decoder: DecoderKind::Block(BlockOptions {
                block_size: 32,
                reuse_last_kv: false,
            }),
            policy: CommitPolicy::default(),
            sampling: Sampling::greedy(),
            max_new_tokens: 128,
            ignore_eos: false,
            prediction: Prediction::InPlace,
            cancel: None,
            canvas_events: false,
            block_experts: None,
            device_steps: DeviceSteps::Auto,
        }
    }
}

impl DecodeParams {
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.max_new_tokens == 0 {
            return Err(DecodeError::invalid("max_new_tokens", 0, "at least 1"));
        }
        match self.decoder {
            DecoderKind::Block(BlockOptions { block_size: 0, .. })
            | DecoderKind::Bidirectional(BidirectionalOptions { block_size: 0, .. }) => {
                return Err(DecodeError::invalid("block_size", 0, "at least 1"));
            }
            DecoderKind::Speculative(o) => {
                if o.draft_len == 0 {
                    return Err(DecodeError::invalid("draft_len", 0, "at least 1"));
                }
                if !(0.0..=1.0).contains(&o.beta) {
                    return Err(DecodeError::invalid("beta", o.beta, "within [0, 1]"));
                }
            }
            DecoderKind::Canvas(o) => o.validate()?,
            _ => {}
        }
        if self.block_experts == Some(0) {
            return Err(DecodeError::invalid("block_experts", 0, "at least 1"));
        }
        self.policy.validate()?;
        self.sampling.validate()
    }
}

/// Which rows of a pass form the blocks of block-level routing (used only with
/// [`DecodeParams::block_experts`]). The rule is the same for every token, whichever pass computes
/// it: a block's clean re-pass and the prompt's prefill route per block like a denoising step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PassBlocks {
    /// Blocks of `size` positions starting at positions ≡ `origin` (mod `size`); every row is in
    /// one (block diffusion: the attention mask's blocks; bidirectional: the canvas's blocks).
    Aligned { size: usize, origin: usize },
    /// Rows from `first_row` on are one block; the rows before route exactly (speculative: the
    /// causal verify rows stay exact, so β = 1 stays AR's tokens, and the draft is the block).
    Tail { first_row: usize },
    /// Every row routes exactly (AR has no blocks).
    Exact,
}

/// The model's special ids the decoders use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub mask: Option<u32>,
    pub eos: Option<u32>,
}

/// Whether generation goes on after an observer saw new tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// One position of the block being decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// A prompt or committed token.
    Known(u32),
    Masked,
    /// A speculative draft not yet verified.
    Draft(u32),
}

/// The block being decoded, after a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Canvas {
    /// Absolute position of `cells[0]`.
    pub start: usize,
    pub cells: Vec<Cell>,
    /// Forward passes so far in this generation.
    pub forward_passes: usize,
}

/// Watches a generation: committed ids in sequence order and, when asked for, each step's block.
pub trait Observer {
    /// Ids appended to the output since the last call (EOS left out). `Flow::Stop` ends the
    /// generation (a stop string matched).
    fn committed(&mut self, ids: &[u32]) -> Flow;
    fn canvas(&mut self, _canvas: &Canvas) {}
    /// Asked before each forward pass (from the same check that looks at the cancel token): a
    /// server's scheduler waits here for this generation's turn, so many generations share the
    /// device one pass at a time. `Flow::Stop` ends the generation without the pass (cancelled
    /// while waiting). Asked again before [`Observer::pass_done`], the turn is already held.
    fn pass_turn(&mut self) -> Flow {
        Flow::Continue
    }
    /// The pass of the turn ran, or the generation ended holding the turn: give it back.
    fn pass_done(&mut self) {}
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    /// `max_new_tokens` reached.
    Length,
    /// The observer stopped it (a stop string).
    Stop,
    Cancelled,
}

/// What each decoder did, beyond the common counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderDetails {
    Block {
        blocks: usize,
        steps: usize,
    },
    Bidirectional {
        blocks: usize,
        steps: usize,
        /// Passes over the whole canvas (block starts, or every step without a cache).
        full_passes: usize,
    },
    Speculative {
        passes: usize,
        /// Draft tokens offered for verification and accepted.
        drafted: usize,
        accepted: usize,
    },
    Ar,
    Canvas {
        canvases: usize,
        /// Denoising steps over all canvases.
        steps: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct DecodeOutcome {
    /// Generated ids, EOS left out.
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Forward passes, the prompt's included.
    pub forward_passes: usize,
    /// Σ tokens over all forward passes: the work done.
    pub positions_processed: usize,
    /// From the start until the first generated token was committed in order.
    pub time_to_first_token: Option<Duration>,
    pub elapsed: Duration,
    pub details: DecoderDetails,
}

/// Runs a decoder's forward passes: one at a time ([`SoloPasses`]), or handed to a batcher that
/// runs them together with other sequences' passes as one batched pass
/// (`crate::batch::PassBatcher`). Either way a pass's outputs are those of the pass alone.
pub trait PassRunner<B: Backend> {
    fn run(
        &mut self,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError>;

    /// The backend and model when passes run alone ([`SoloPasses`]): the block and AR decoders
    /// may then chain their steps on the device (`Model::denoise_step`) themselves. `None` by
    /// default.
    fn solo(&self) -> Option<(&B, &Model<B>)> {
        None
    }

    /// Whether [`PassRunner::run_chain`] chains AR steps on the device where `steps` allows it
    /// (a batcher on a backend that records passes; false by default).
    fn chains_batched(&self, _steps: DeviceSteps) -> bool {
        false
    }

    /// Runs `chain` — several AR steps of one sequence, chained on the device — together with
    /// other sequences' chains, each step one batched pass (crate::batch): the canvas read back.
    /// Only where [`PassRunner::chains_batched`] said so.
    fn run_chain(
        &mut self,
        _kv: &mut B::Kv,
        _chain: &ArChain,
    ) -> Result<crate::backend::CanvasState, ModelError> {
        Err(ModelError::BatchMix("AR steps chained outside a batcher"))
    }
}

/// `steps` AR steps of one sequence chained on the device ([`PassRunner::run_chain`]), the
/// host loop's passes one for one: a canvas of `1 + steps` cells, cell 0 the last committed
/// token (at position `at`), cell `j` the token at `at + j`. Step `i` embeds cells `i..i + w`
/// (`w` = 2 for an in-place model, `[token, mask]`; 1 for a next-token one) at position `at + i`
/// and commits the greedy token of its last row into cell `i + 1` (`CommitRule::Next`), the
/// next step's input (decode/ar.rs says why that is the host loop's token, bit for bit).
#[derive(Clone, Debug, PartialEq)]
pub struct ArChain {
    pub at: usize,
    pub last: u32,
    /// The mask an in-place model predicts through; `None`: next-token prediction.
    pub mask: Option<u32>,
    pub steps: usize,
    /// Where EOS ends the sequence (the canvas then fills with it; `None`: EOS ignored).
    pub eos: Option<u32>,
}

impl ArChain {
    /// Rows of each step's pass.
    pub fn width(&self) -> usize {
        1 + usize::from(self.mask.is_some())
    }

    /// The canvas it starts from.
    pub fn cells(&self) -> Vec<Option<u32>> {
        let mut cells = vec![None; self.steps + 1];
        cells[0] = Some(self.last);
        cells
    }

    /// Step `i`'s window.
    pub fn window(&self, i: usize) -> Window {
        Window::block(self.at + i, self.width(), crate::backend::AttnMask::Causal)
    }

    /// What each step's pass wants: its last row's statistics.
    pub fn want(&self) -> ForwardRequest {
        let w = self.width();
        ForwardRequest {
            rows: Some(w - 1..w),
            ..Default::default()
        }
    }

    /// Step `i`'s commit.
    pub fn commit(&self, i: usize) -> crate::backend::CommitParams {
        crate::backend::CommitParams {
            rule: crate::backend::CommitRule::Next,
            mask: self.mask.unwrap_or(0),
            eos: self.eos,
            output_from: 1,
            stats_from: i + 1,
        }
    }
}

/// Every pass runs at once, alone.
pub struct SoloPasses<'a, B: Backend> {
    pub backend: &'a B,
    pub model: &'a Model<B>,
}

impl<B: Backend> PassRunner<B> for SoloPasses<'_, B> {
    fn run(
        &mut self,
        kv: &mut B::Kv,
        tokens: &[u32],
        window: Window,
        want: &ForwardRequest,
    ) -> Result<ForwardOutput, ModelError> {
        self.model.forward(self.backend, kv, tokens, window, want)
    }

    fn solo(&self) -> Option<(&B, &Model<B>)> {
        Some((self.backend, self.model))
    }
}

/// Decodes up to `params.max_new_tokens` after `prompt`, reporting committed ids to `observer`.
/// `kv` must hold at least `prompt.len() + max_new_tokens` positions; its contents are
/// overwritten.
pub fn decode<B: Backend>(
    backend: &B,
    model: &Model<B>,
    kv: &mut B::Kv,
    prompt: &[u32],
    special: SpecialIds,
    params: &DecodeParams,
    observer: &mut dyn Observer,
) -> Result<DecodeOutcome, DecodeError> {
    let mut solo = SoloPasses { backend, model };
    decode_with(
        backend, model, kv, prompt, special, params, observer, &mut solo,
    )
}

/// [`decode`] with its passes run by `passes` (e.g. batched with other sequences').
#[allow(clippy::too_many_arguments)]
pub fn decode_with<B: Backend>(
    backend: &B,
    model: &Model<B>,
    kv: &mut B::Kv,
    prompt: &[u32],
    special: SpecialIds,
    params: &DecodeParams,
    observer: &mut dyn Observer,
    passes: &mut dyn PassRunner<B>,
) -> Result<DecodeOutcome, DecodeError> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(DecodeError::EmptyPrompt);
    }
    if let Some(n) = params.block_experts {
        crate::model::check_block_experts(&model.config, n)?;
    }
    let vocab = model.config.vocab_size;
    let special_ids = special.mask.iter().chain(special.eos.iter());
    if let Some(&id) = prompt
        .iter()
        .chain(special_ids)
        .find(|&&t| t as usize >= vocab)
    {
        return Err(DecodeError::TokenOutOfRange { id, vocab });
    }
    let context = backend.kv_capacity(kv).min(model.config.max_position);
    let end = prompt.len().saturating_add(params.max_new_tokens);
    if end > context {
        return Err(DecodeError::ContextTooLong {
            prompt: prompt.len(),
            max_new: params.max_new_tokens,
            context,
        });
    }
    let mut s = Session {
        kv,
        params,
        special,
        observer,
        passes,
        end,
        rng: Rng::new(params.sampling.seed),
        forwards: 0,
        positions: 0,
        out: Delivery::new(),
    };
    let details = match &params.decoder {
        DecoderKind::Block(o) => block::run(&mut s, prompt, o),
        DecoderKind::Bidirectional(o) => bidirectional::run(&mut s, prompt, o),
        DecoderKind::Speculative(o) => speculative::run(&mut s, prompt, o),
        DecoderKind::Ar => ar::run(&mut s, prompt),
        DecoderKind::Canvas(_) => Err(DecodeError::WrongDecoder {
            decoder: "canvas",
            architecture: model.config.architecture.hf_name().to_string(),
            supported: "block, bidirectional, speculative or ar",
        }),
    };
    // A turn taken by the last `running()` check whose pass never came.
    s.observer.pass_done();
    let details = details?;
    Ok(s.out.outcome(s.forwards, s.positions, details))
}

/// What a generation has delivered and why it ended — the output rule every decoder shares (the
/// masked-diffusion decoders through [`Session`], the canvas sampler through its watch).
pub(crate) struct Delivery {
    started: Instant,
    first_token: Option<Duration>,
    generated: Vec<u32>,
    finish: Option<FinishReason>,
}

impl Delivery {
    pub(crate) fn new() -> Self {
        Delivery {
            started: Instant::now(),
            first_token: None,
            generated: Vec::new(),
            finish: None,
        }
    }

    /// False once the generation has finished or was cancelled; checked before every forward, so
    /// this is also where the observer's pass turn is taken ([`Observer::pass_turn`]).
    pub(crate) fn running(
        &mut self,
        observer: &mut dyn Observer,
        cancel: Option<&CancelToken>,
    ) -> bool {
        if self.finish.is_none() && observer.pass_turn() == Flow::Stop {
            self.finish = Some(FinishReason::Cancelled);
        }
        if self.finish.is_none() && cancel.is_some_and(|c| c.is_cancelled()) {
            self.finish = Some(FinishReason::Cancelled);
        }
        self.finish.is_none()
    }

    /// Appends ids that are now final and in order to the output: stops at `eos` (`None`: EOS is
    /// ignored), at `max_new_tokens`, or when the observer says so. Returns whether generation goes
    /// on.
    pub(crate) fn deliver(
        &mut self,
        ids: &[u32],
        eos: Option<u32>,
        max_new_tokens: usize,
        observer: &mut dyn Observer,
    ) -> bool {
        if self.finish.is_some() {
            return false;
        }
        let mut take = 0;
        for &id in ids {
            if Some(id) == eos {
                self.finish = Some(FinishReason::Eos);
                break;
            }
            take += 1;
            if self.generated.len() + take >= max_new_tokens {
                self.finish = Some(FinishReason::Length);
                break;
            }
        }
        if take > 0 {
            self.first_token
                .get_or_insert_with(|| self.started.elapsed());
            self.generated.extend_from_slice(&ids[..take]);
            if observer.committed(&ids[..take]) == Flow::Stop {
                self.finish = Some(FinishReason::Stop);
            }
        }
        self.finish.is_none()
    }

    pub(crate) fn outcome(
        self,
        forward_passes: usize,
        positions_processed: usize,
        details: DecoderDetails,
    ) -> DecodeOutcome {
        DecodeOutcome {
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            forward_passes,
            positions_processed,
            time_to_first_token: self.first_token,
            elapsed: self.started.elapsed(),
            details,
            tokens: self.generated,
        }
    }
}

/// The state every decoder shares: the model and its cache, counters, output bookkeeping.
struct Session<'a, B: Backend> {
    kv: &'a mut B::Kv,
    params: &'a DecodeParams,
    special: SpecialIds,
    observer: &'a mut dyn Observer,
    passes: &'a mut dyn PassRunner<B>,
    /// One past the last position this generation may fill.
    end: usize,
    rng: Rng,
    forwards: usize,
    positions: usize,
    out: Delivery,
}

impl<B: Backend> Session<'_, B> {
    fn mask_id(&self, decoder: &'static str) -> Result<u32, DecodeError> {
        self.special
            .mask
            .ok_or(DecodeError::NoMaskToken { decoder })
    }

    fn prediction(&self) -> Prediction {
        self.params.prediction
    }

    /// False once the generation has finished or was cancelled; checked before every forward, so
    /// this is also where the observer's pass turn is taken ([`Observer::pass_turn`]).
    fn running(&mut self) -> bool {
        self.out
            .running(&mut *self.observer, self.params.cancel.as_ref())
    }

    /// The block-level routing of a pass starting at position `start` (`None`: exact routing).
    fn block_routing(&self, blocks: PassBlocks, start: usize) -> Option<BlockRouting> {
        self.params.block_experts.and_then(|n| match blocks {
            PassBlocks::Aligned { size, origin } => {
                Some(BlockRouting::aligned(n, start, size, origin))
            }
            PassBlocks::Tail { first_row } => Some(BlockRouting::tail(n, first_row)),
            PassBlocks::Exact => None,
        })
    }

    /// One forward pass; returns the statistics of `rows` (relative to the window).
    fn forward(
        &mut self,
        tokens: &[u32],
        window: Window,
        rows: Range<usize>,
        blocks: PassBlocks,
    ) -> Result<Vec<PositionStats>, DecodeError> {
        self.forward_as(tokens, window, rows, blocks, None)
    }

    /// [`Session::forward`], each row computed as a pass of `rows_as` rows would
    /// ([`ForwardRequest::rows_as`]).
    fn forward_as(
        &mut self,
        tokens: &[u32],
        window: Window,
        rows: Range<usize>,
        blocks: PassBlocks,
        rows_as: Option<usize>,
    ) -> Result<Vec<PositionStats>, DecodeError> {
        let want = ForwardRequest {
            rows: Some(rows),
            blocks: self.block_routing(blocks, window.start),
            rows_as,
            ..Default::default()
        };
        let out = self.passes.run(self.kv, tokens, window, &want);
        self.observer.pass_done();
        let out = out?;
        self.forwards += 1;
        self.positions += tokens.len();
        Ok(out.stats)
    }

    /// Appends ids that are now final and in order to the output: stops at EOS, at
    /// `max_new_tokens`, or when the observer says so. Returns whether generation goes on.
    fn deliver(&mut self, ids: &[u32]) -> bool {
        let eos = self.special.eos.filter(|_| !self.params.ignore_eos);
        self.out
            .deliver(ids, eos, self.params.max_new_tokens, &mut *self.observer)
    }

    fn emit_canvas(&mut self, start: usize, cells: Vec<Cell>) {
        if self.params.canvas_events {
            let canvas = Canvas {
                start,
                cells,
                forward_passes: self.forwards,
            };
            self.observer.canvas(&canvas);
        }
    }
}
