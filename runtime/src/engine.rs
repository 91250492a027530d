//! The engine: one model file opened on a backend, turning requests into streamed text.
//!
//! [`Engine<B>`] is generic over the backend and holds the model, the tokenizer and the chat
//! template; [`LoadedEngine`] is what [`LoadedEngine::load`] returns for a backend chosen at run
//! time ([`BackendChoice`]), so callers (CLI, bindings) are written once for every backend. A
//! request carries a prompt (text, chat turns or ids), the decoding parameters and stop strings;
//! the engine streams [`Event`]s while the decoder commits tokens and returns the text with
//! [`GenerationStats`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::cpu::CpuBackend;
use crate::backend::gpu::{list_adapters, GpuBackend, GpuOptions};
use crate::backend::Backend;
use crate::batch::{BatchLimits, BatchReport, BatchReportId, PassBatcher};
use crate::decode::{
    self, BlockOptions, Canvas, CommitPolicy, DecodeError, DecodeParams, DecoderDetails,
    DecoderKind, FinishReason, Flow, Observer, Prediction, Sampling, SpecialIds,
};
use crate::experts::paging::PagedLoad;
use crate::experts::{
    Eviction, ExpertMemory, ExpertPaging, ExpertsError, KeepSpec, PagerStats, Profile,
};
use crate::format::{EdmFile, FormatError, Metadata};
use crate::model::canvas::CanvasModel;
use crate::model::{Model, ModelConfig, ModelError};
use crate::tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Experts(#[from] ExpertsError),
    #[error("the {backend} backend is not available: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },
}

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// The GPU when a hardware adapter is usable, else the CPU (with a one-line notice on
    /// stderr). A software adapter (lavapipe, WARP) is not chosen: it runs our kernels slower than
    /// the CPU backend runs the same model. `EDGEDIFF_ADAPTER` set to an adapter counts as asking
    /// for that adapter, software or not.
    #[default]
    Auto,
    Cpu,
    /// The GPU the device layer chooses (a software adapter when it is the only one); none is an
    /// [`EngineError::BackendUnavailable`].
    Gpu,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "gpu" => Ok(BackendChoice::Gpu),
            _ => Err(format!("unknown backend '{s}' (expected auto, cpu or gpu)")),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct EngineConfig {
    pub backend: BackendChoice,
    /// Page routed experts through a pool of this size (exact: the same tokens, less memory);
    /// `None` loads every expert.
    pub expert_memory: Option<ExpertMemory>,
    /// Keep only the experts a domain profile selects (EMO-style pruning at load time, the same
    /// selection and router mask as `edgediff prune` without writing a file): the others are never
    /// loaded, paged or read. Approximate, unlike paging.
    pub resident: Option<ResidentProfile>,
    /// Block-level expert routing for every request by default
    /// ([`DecodeParams::block_experts`]; a request may override it): each block's tokens route
    /// within the N experts per layer with the largest router mass over the block. Approximate.
    pub block_experts: Option<usize>,
}

/// A resident set chosen at load time: `keep` per MoE layer by router-probability mass in `profile`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidentProfile {
    /// A profile from `edgediff profile`, recorded on this model.
    pub profile: std::path::PathBuf,
    pub keep: KeepSpec,
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Plain text, encoded with the tokenizer's special tokens (e.g. a leading BOS).
    Text(String),
    /// Chat turns, rendered with the model's chat template plus the generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub decoding: DecodeParams,
    /// Generation ends before the first occurrence of any of these; the text returned and
    /// streamed stops short of it.
    pub stop: Vec<String>,
}

/// Streamed while a generation runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Text that became final (committed in order, complete characters, not part of a
    /// possible stop string).
    Text(String),
    /// The block after a denoising step (only when `decoding.canvas_events` is set).
    Canvas(Canvas),
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Forward passes, the prompt's included.
    pub forward_passes: usize,
    /// Σ tokens over all forward passes.
    pub positions_processed: usize,
    /// new_tokens / forward_passes (AR: 1).
    pub tokens_per_forward: f64,
    pub time_to_first_token: Option<Duration>,
    pub elapsed: Duration,
    pub tokens_per_second: f64,
    pub decoder: DecoderDetails,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOutput {
    pub text: String,
    /// Generated ids (EOS left out; a stop string's tokens included).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
}

/// Paces a generation's forward passes: a server's scheduler lets many generations take turns on
/// one device, a pass at a time (see `serve::scheduler`). [`Engine::generate`] runs unpaced.
pub trait Pacer {
    /// Waits for this generation's turn to run a pass; false ends the generation without it
    /// (cancelled while waiting, `FinishReason::Cancelled`). Called again while the turn is held,
    /// it returns true at once.
    fn turn(&mut self) -> bool;
    /// The pass ran (or the generation ended holding the turn): the next generation may go.
    /// Called without a turn held, it does nothing.
    fn done(&mut self);
}

/// No pacing: every pass runs as soon as the decoder asks.
struct Unpaced;

impl Pacer for Unpaced {
    fn turn(&mut self) -> bool {
        true
    }
    fn done(&mut self) {}
}

/// The weights an engine decodes with: the one forward pass of every masked/block-diffusion and
/// AR family, or DiffusionGemma's encoder + canvas decoder (the canvas decoder only).
enum Weights<B: Backend> {
    Masked(Model<B>),
    Canvas(CanvasModel<B>),
}

impl<B: Backend> Weights<B> {
    fn config(&self) -> &ModelConfig {
        match self {
            Weights::Masked(m) => &m.config,
            Weights::Canvas(m) => &m.config,
        }
    }
    fn file(&self) -> &Arc<EdmFile> {
        match self {
            Weights::Masked(m) => &m.file,
            Weights::Canvas(m) => &m.file,
        }
    }
}

/// A model on backend `B` with its tokenizer and chat template.
pub struct Engine<B: Backend> {
    backend: B,
    model: Weights<B>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    paging: Option<ExpertPaging>,
    block_experts: Option<usize>,
    /// Joins the passes of generations running at once ([`Engine::generate_batched`]).
    batcher: PassBatcher<B>,
}

impl<B: Backend> Engine<B> {
    /// Loads every weight of `file` onto `backend` (a canvas model, DiffusionGemma, into
    /// [`CanvasModel`]).
    pub fn new(backend: B, file: Arc<EdmFile>) -> Result<Self, EngineError> {
        if is_canvas_model(&file.header.metadata.config) {
            let model = CanvasModel::load(&backend, file)?;
            return Self::with_weights(backend, Weights::Canvas(model));
        }
        let model = Model::load(&backend, file, &|_, _| true)?;
        Self::with_model(backend, model)
    }

    /// An engine over a model loaded some other way (e.g. with experts paged through a pool).
    pub fn with_model(backend: B, model: Model<B>) -> Result<Self, EngineError> {
        Self::with_weights(backend, Weights::Masked(model))
    }

    /// An engine over a canvas model (DiffusionGemma); it decodes with the canvas decoder.
    pub fn with_canvas_model(backend: B, model: CanvasModel<B>) -> Result<Self, EngineError> {
        Self::with_weights(backend, Weights::Canvas(model))
    }

    fn with_weights(backend: B, model: Weights<B>) -> Result<Self, EngineError> {
        let file = model.file();
        let tokenizer = Tokenizer::from_json(file.blob("tokenizer.json")?)?;
        let template = match &file.header.metadata.chat_template {
            Some(src) => ChatTemplate::new(src.clone())?,
            None => ChatTemplate::fallback(),
        };
        Ok(Engine {
            backend,
            model,
            tokenizer,
            template,
            paging: None,
            block_experts: None,
            batcher: PassBatcher::default(),
        })
    }

    /// Opens `file` as `config` says: every expert loaded, or paged through a pool of
    /// `config.expert_memory` (LRU eviction, previous-step prefetch on the GPU).
    pub fn open(backend: B, file: Arc<EdmFile>, config: &EngineConfig) -> Result<Self, EngineError>
    where
        B: PagedLoad,
    {
        backend.prepare_for_model(&model_key(&file));
        if is_canvas_model(&file.header.metadata.config) {
            // Expert paging works as for the other models (exact); the approximate expert
            // options are not wired to the canvas model.
            let refused = [
                (
                    config.resident.is_some(),
                    "a resident profile (--resident-profile)",
                ),
                (
                    config.block_experts.is_some(),
                    "block-level expert routing (--block-experts)",
                ),
            ];
            if let Some((_, what)) = refused.iter().find(|(on, _)| *on) {
                return Err(DecodeError::Unsupported(format!(
                    "{what} is not implemented for a DiffusionGemma (canvas) model"
                ))
                .into());
            }
            let Some(memory) = config.expert_memory else {
                return Self::new(backend, file);
            };
            let (model, paging) =
                crate::experts::paging::load_paged_canvas(&backend, &file, memory, Eviction::Lru)?;
            let mut engine = Self::with_canvas_model(backend, model)?;
            engine.paging = Some(paging);
            return Ok(engine);
        }
        if let Some(n) = config.block_experts {
            crate::model::check_block_experts(&file.header.metadata.config, n)?;
        }
        let set = match &config.resident {
            Some(r) => {
                let profile = Profile::load(&r.profile, &file)?;
                Some(crate::experts::prune::resident_from_profile(
                    &file, &profile, r.keep,
                )?)
            }
            None => None,
        };
        let (mut model, paging) = match config.expert_memory {
            Some(memory) => {
                let (m, p) = crate::experts::load_paged(&backend, &file, memory, Eviction::Lru)?;
                (m, Some(p))
            }
            None => {
                let keep = |l: usize, e: usize| set.as_ref().is_none_or(|s| s.is_resident(l, e));
                (Model::load(&backend, file.clone(), &keep)?, None)
            }
        };
        if let Some(set) = &set {
            // Paged or not, the router never picks a dropped expert, so none is ever paged in.
            let biases = crate::experts::prune::masked_router_biases(&file, set)?;
            model.set_router_biases(&backend, &biases)?;
        }
        let mut engine = Self::with_model(backend, model)?;
        engine.paging = paging;
        engine.block_experts = config.block_experts;
        Ok(engine)
    }

    /// The expert pool's statistics since load, when experts are paged.
    pub fn expert_stats(&self) -> Option<PagerStats> {
        self.paging.as_ref().map(ExpertPaging::stats)
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    pub fn metadata(&self) -> &Metadata {
        &self.model.file().header.metadata
    }
    /// True for a canvas model (DiffusionGemma), which decodes with the canvas decoder only.
    pub fn is_canvas_model(&self) -> bool {
        matches!(self.model, Weights::Canvas(_))
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The model file's decoding defaults: block diffusion with its block size and threshold (AR
    /// when the block size is 1), its prediction convention (else its family's), greedy; for a
    /// canvas model the canvas decoder with the file's sampler settings (the checkpoint's
    /// generation_config.json, else transformers' defaults).
    pub fn default_decoding(&self) -> DecodeParams {
        let d = &self.metadata().decoding;
        if self.is_canvas_model() {
            return DecodeParams {
                decoder: DecoderKind::Canvas(d.canvas.unwrap_or_default().into()),
                prediction: Prediction::InPlace,
                ..DecodeParams::default()
            };
        }
        let block_size = d.block_size.max(1);
        DecodeParams {
            decoder: if block_size == 1 {
                DecoderKind::Ar
            } else {
                DecoderKind::Block(BlockOptions {
                    block_size,
                    reuse_last_kv: false,
                })
            },
            policy: CommitPolicy::Threshold {
                threshold: d.threshold,
            },
            sampling: Sampling::greedy(),
            prediction: d
                .prediction
                .unwrap_or_else(|| Prediction::for_architecture(self.config().architecture)),
            block_experts: self.block_experts,
            ..DecodeParams::default()
        }
    }

    /// A request for `prompt` with the model's defaults.
    pub fn request(&self, prompt: Prompt) -> GenerationRequest {
        GenerationRequest {
            prompt,
            decoding: self.default_decoding(),
            stop: Vec::new(),
        }
    }

    /// The prompt's ids: chat turns go through the chat template.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let ids = match prompt {
            Prompt::Text(t) if t.is_empty() => Vec::new(),
            Prompt::Text(t) => self.tokenizer.encode(t, true)?,
            Prompt::Chat(turns) if turns.is_empty() => Vec::new(),
            Prompt::Chat(turns) => {
                let special = self.metadata().special_tokens;
                let name = |id: Option<u32>| {
                    id.and_then(|i| self.tokenizer.id_to_token(i))
                        .unwrap_or_default()
                };
                let text =
                    self.template
                        .render(turns, true, &name(special.bos), &name(special.eos))?;
                self.tokenizer.encode(&text, false)?
            }
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(DecodeError::EmptyPrompt.into());
        }
        Ok(ids)
    }

    /// Generates, streaming [`Event`]s to `on_event`. Cancelling `decoding.cancel` (from any
    /// thread, or from `on_event`) ends it within one step with `FinishReason::Cancelled`.
    /// Mean AR negative log-likelihood per token of `continuation` after `prompt` (token ids), from
    /// one causal pass: how `bench decode` scores each decoder's output with the same model, so a
    /// decoder that trades exactness for speed shows its cost. Only meaningful where the model's
    /// causal rows predict the next token.
    pub fn continuation_nll(
        &self,
        prompt: &[u32],
        continuation: &[u32],
    ) -> Result<f64, EngineError> {
        let Weights::Masked(model) = &self.model else {
            return Err(DecodeError::Unsupported(
                "continuation NLL needs causal next-token rows, which a canvas model's passes \
                 do not give"
                    .into(),
            )
            .into());
        };
        let context = model.config.max_position;
        if prompt.len() + continuation.len() > context {
            return Err(DecodeError::ContextTooLong {
                prompt: prompt.len(),
                max_new: continuation.len(),
                context,
            }
            .into());
        }
        Ok(crate::eval::continuation_nll(
            &self.backend,
            model,
            prompt,
            continuation,
        )?)
    }

    pub fn generate(
        &self,
        request: &GenerationRequest,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        self.generate_paced(request, &mut Unpaced, on_event)
    }

    /// [`Engine::generate`] with every forward pass waiting for `pacer`'s turn.
    pub fn generate_paced(
        &self,
        request: &GenerationRequest,
        pacer: &mut dyn Pacer,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        let out = self.generate_with(request, pacer, false, on_event);
        self.backend.keep_caches();
        out
    }

    /// [`Engine::generate`] whose forward passes run batched with those of every other
    /// generation running through this method at the same time (on other threads): one pass
    /// reads the weights for all of them (continuous batching, see [`crate::batch`]). The tokens
    /// are those of [`Engine::generate`] (greedy and seeded sampling alike).
    pub fn generate_batched(
        &self,
        request: &GenerationRequest,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        let out = self.generate_with(request, &mut Unpaced, true, on_event);
        self.backend.keep_caches();
        out
    }

    /// Decodes `requests` together, their passes batched ([`Engine::generate_batched`], one
    /// thread each); `on_event(i, event)` streams request `i`'s events. Results in order.
    pub fn generate_many(
        &self,
        requests: &[GenerationRequest],
        on_event: &(dyn Fn(usize, Event) + Sync),
    ) -> Vec<Result<GenerationOutput, EngineError>>
    where
        Self: Sync,
    {
        std::thread::scope(|scope| {
            let handles: Vec<_> = requests
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    scope.spawn(move || self.generate_batched(r, &mut |e| on_event(i, e)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// How batched passes form ([`Engine::generate_batched`]).
    pub fn set_batch_limits(&self, limits: BatchLimits) {
        self.batcher.set_limits(limits);
    }

    /// Sets aside `bytes` of KV cache that the caches of later generations are carved from, so
    /// that a batched pass attends for all its sequences at once (`Backend::reserve_kv`). Returns
    /// the positions set aside: 0 where the backend or the model gains nothing from it.
    pub fn reserve_kv(&self, bytes: u64) -> Result<usize, EngineError> {
        let c = self.config();
        let positions = usize::try_from(bytes / c.kv_bytes(1).max(1)).unwrap_or(usize::MAX);
        let reserved = self.backend.reserve_kv(c, positions);
        Ok(reserved.map_err(ModelError::from)?)
    }

    /// Calls `report` after every batched pass, until [`Engine::remove_batch_report`].
    pub fn add_batch_report(
        &self,
        report: impl Fn(&BatchReport) + Send + Sync + 'static,
    ) -> BatchReportId {
        self.batcher.add_report(report)
    }

    pub fn remove_batch_report(&self, id: BatchReportId) {
        self.batcher.remove_report(id);
    }

    fn generate_with(
        &self,
        request: &GenerationRequest,
        pacer: &mut dyn Pacer,
        batched: bool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        let prompt = self.encode_prompt(&request.prompt)?;
        let params = &request.decoding;
        let special = self.metadata().special_tokens;
        let special = SpecialIds {
            mask: special.mask,
            eos: special.eos,
        };
        // Checked before the cache is allocated, so an oversized request costs nothing.
        params.validate()?;
        let capacity = match &self.model {
            Weights::Canvas(m) => {
                let len = decode::canvas::canvas_length(m).map_err(DecodeError::from)?;
                decode::canvas::positions_needed(prompt.len(), params.max_new_tokens, len)
            }
            Weights::Masked(_) => prompt.len().saturating_add(params.max_new_tokens),
        };
        let context = self.config().max_position;
        if capacity > context {
            return Err(DecodeError::ContextTooLong {
                prompt: prompt.len(),
                max_new: capacity - prompt.len(),
                context,
            }
            .into());
        }
        let mut sink = TextSink {
            stream: self.tokenizer.stream_decoder(true),
            stop: &request.stop,
            held: String::new(),
            text: String::new(),
            on_event,
            pacer,
            error: None,
            stopped: false,
        };
        let outcome = match &self.model {
            Weights::Masked(model) => {
                let mut kv = model.new_kv(&self.backend, capacity)?;
                let mut solo = decode::SoloPasses {
                    backend: &self.backend,
                    model,
                };
                let mut joined;
                let passes: &mut dyn decode::PassRunner<B> = if batched {
                    joined = self.batcher.join(&self.backend, model);
                    &mut joined
                } else {
                    &mut solo
                };
                decode::decode_with(
                    &self.backend,
                    model,
                    &mut kv,
                    &prompt,
                    special,
                    params,
                    &mut sink,
                    passes,
                )?
            }
            // A canvas model's passes run alone (its two passes have no batched form yet).
            Weights::Canvas(model) => {
                let mut kv = model.new_kv(&self.backend, capacity)?;
                let pad = self.metadata().special_tokens.pad.unwrap_or(0);
                decode::canvas::decode(
                    &self.backend,
                    model,
                    &mut kv,
                    &prompt,
                    special,
                    pad,
                    params,
                    &mut sink,
                )?
            }
        };
        if let Some(e) = sink.error.take() {
            return Err(e.into());
        }
        sink.finish()?;
        let new_tokens = outcome.tokens.len();
        let secs = outcome.elapsed.as_secs_f64();
        Ok(GenerationOutput {
            text: std::mem::take(&mut sink.text),
            finish_reason: outcome.finish_reason,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                new_tokens,
                forward_passes: outcome.forward_passes,
                positions_processed: outcome.positions_processed,
                tokens_per_forward: new_tokens as f64 / outcome.forward_passes.max(1) as f64,
                time_to_first_token: outcome.time_to_first_token,
                elapsed: outcome.elapsed,
                tokens_per_second: if secs > 0.0 {
                    new_tokens as f64 / secs
                } else {
                    0.0
                },
                decoder: outcome.details,
            },
            tokens: outcome.tokens,
        })
    }
}

/// Whether `config` describes a canvas model (DiffusionGemma's encoder + canvas decoder).
pub fn is_canvas_model(config: &ModelConfig) -> bool {
    config.block.canvas.is_some()
}

/// A name for a model file that backends may keep things under between runs (the GPU's pipeline
/// list): its configuration and size, so a model converted again with other shapes or types gets
/// a name of its own.
fn model_key(file: &EdmFile) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    format!("{:?}", file.header.metadata.config).hash(&mut h);
    file.file_len().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// An engine on the backend chosen at load time.
// The variants differ in size, but an engine is made once per model and never moved in a hot
// path; boxing would only add a `Box::new` to every caller that builds one.
#[allow(clippy::large_enum_variant)]
pub enum LoadedEngine {
    Cpu(Engine<CpuBackend>),
    Gpu(Engine<GpuBackend>),
}

macro_rules! with_engine {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            LoadedEngine::Cpu($e) => $body,
            LoadedEngine::Gpu($e) => $body,
        }
    };
}

/// The backend [`BackendChoice`] resolves to on this machine.
pub enum BackendPick {
    Gpu(Box<GpuBackend>),
    /// The CPU; `notice` says why when the GPU was wanted (`Auto`) but not taken.
    Cpu {
        notice: Option<String>,
    },
}

impl BackendPick {
    /// Resolves `choice` with the device options of the environment (`EDGEDIFF_ADAPTER`,
    /// `EDGEDIFF_GPU_DISABLE`). Only a forced GPU that cannot start is an error.
    pub fn resolve(choice: BackendChoice) -> Result<BackendPick, EngineError> {
        Self::resolve_with(choice, &GpuOptions::from_env())
    }

    /// [`BackendPick::resolve`] with explicit device options.
    pub fn resolve_with(
        choice: BackendChoice,
        opts: &GpuOptions,
    ) -> Result<BackendPick, EngineError> {
        match choice {
            BackendChoice::Cpu => Ok(BackendPick::Cpu { notice: None }),
            BackendChoice::Gpu => GpuBackend::new(opts)
                .map(|g| BackendPick::Gpu(Box::new(g)))
                .map_err(|e| EngineError::BackendUnavailable {
                    backend: "gpu",
                    reason: e.to_string(),
                }),
            BackendChoice::Auto => {
                let cpu = |why: String| BackendPick::Cpu {
                    notice: Some(format!("{why}; running on the CPU backend")),
                };
                // Listing adapters is cheap; opening a device on one we would not keep is not.
                let adapters = match list_adapters(opts) {
                    Ok(a) => a,
                    Err(e) => return Ok(cpu(format!("no usable GPU ({e})"))),
                };
                match adapters.iter().find(|a| a.chosen) {
                    None => Ok(cpu("no usable GPU adapter".into())),
                    Some(a) if a.is_software() && opts.adapter.is_none() => Ok(cpu(format!(
                        "only a software GPU adapter ({}) is present, slower than the CPU backend \
                         (--backend gpu uses it anyway)",
                        a.name
                    ))),
                    Some(_) => Ok(match GpuBackend::new(opts) {
                        Ok(g) => BackendPick::Gpu(Box::new(g)),
                        Err(e) => cpu(format!("the GPU did not start ({e})")),
                    }),
                }
            }
        }
    }
}

impl LoadedEngine {
    /// Opens a model file on the backend `config` chooses. When `Auto` settles for the CPU, it
    /// says so in one line on stderr, so a command run on a machine without a GPU still explains
    /// its speed.
    pub fn load(path: impl AsRef<Path>, config: &EngineConfig) -> Result<Self, EngineError> {
        let file = Arc::new(EdmFile::open(path)?);
        let notice = |n: &str| eprintln!("edgediff: {n}");
        match BackendPick::resolve(config.backend)? {
            BackendPick::Cpu { notice: why } => {
                if let Some(n) = why {
                    notice(&n);
                }
                Ok(LoadedEngine::Cpu(Engine::open(CpuBackend, file, config)?))
            }
            BackendPick::Gpu(g) => match Engine::open(*g, file.clone(), config) {
                Ok(e) => Ok(LoadedEngine::Gpu(e)),
                // Auto promised to run anywhere: a model the GPU cannot hold (device limits, a
                // lost device) still runs on the CPU. A broken file fails there again, typed.
                Err(e) if config.backend == BackendChoice::Auto => {
                    notice(&format!(
                        "the GPU could not load the model ({e}); running on the CPU backend"
                    ));
                    Ok(LoadedEngine::Cpu(Engine::open(CpuBackend, file, config)?))
                }
                Err(e) => Err(e),
            },
        }
    }

    /// The expert pool's statistics since load, when experts are paged.
    pub fn expert_stats(&self) -> Option<PagerStats> {
        with_engine!(self, e => e.expert_stats())
    }

    /// True when the model runs on the GPU backend.
    pub fn on_gpu(&self) -> bool {
        matches!(self, LoadedEngine::Gpu(_))
    }

    pub fn generate(
        &self,
        request: &GenerationRequest,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        with_engine!(self, e => e.generate(request, on_event))
    }
    pub fn generate_paced(
        &self,
        request: &GenerationRequest,
        pacer: &mut dyn Pacer,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        with_engine!(self, e => e.generate_paced(request, pacer, on_event))
    }
    pub fn generate_batched(
        &self,
        request: &GenerationRequest,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<GenerationOutput, EngineError> {
        with_engine!(self, e => e.generate_batched(request, on_event))
    }
    /// Decodes `requests` together, their passes batched ([`Engine::generate_many`]).
    pub fn generate_many(
        &self,
        requests: &[GenerationRequest],
        on_event: &(dyn Fn(usize, Event) + Sync),
    ) -> Vec<Result<GenerationOutput, EngineError>> {
        with_engine!(self, e => e.generate_many(requests, on_event))
    }
    pub fn set_batch_limits(&self, limits: BatchLimits) {
        with_engine!(self, e => e.set_batch_limits(limits))
    }
    pub fn reserve_kv(&self, bytes: u64) -> Result<usize, EngineError> {
        with_engine!(self, e => e.reserve_kv(bytes))
    }
    pub fn add_batch_report(
        &self,
        report: impl Fn(&BatchReport) + Send + Sync + 'static,
    ) -> BatchReportId {
        with_engine!(self, e => e.add_batch_report(report))
    }
    pub fn remove_batch_report(&self, id: BatchReportId) {
        with_engine!(self, e => e.remove_batch_report(id))
    }
    pub fn request(&self, prompt: Prompt) -> GenerationRequest {
        with_engine!(self, e => e.request(prompt))
    }
    pub fn continuation_nll(
        &self,
        prompt: &[u32],
        continuation: &[u32],
    ) -> Result<f64, EngineError> {
        with_engine!(self, e => e.continuation_nll(prompt, continuation))
    }
    pub fn default_decoding(&self) -> DecodeParams {
        with_engine!(self, e => e.default_decoding())
    }
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        with_engine!(self, e => e.encode_prompt(prompt))
    }
    pub fn backend_name(&self) -> String {
        with_engine!(self, e => e.backend_name())
    }
    pub fn is_canvas_model(&self) -> bool {
        with_engine!(self, e => e.is_canvas_model())
    }
    pub fn config(&self) -> &ModelConfig {
        with_engine!(self, e => e.config())
    }
    pub fn metadata(&self) -> &Metadata {
        with_engine!(self, e => e.metadata())
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        with_engine!(self, e => e.tokenizer())
    }
}

/// Turns committed ids into final text: detokenizes incrementally and holds back any tail that
/// could still become a stop string.
struct TextSink<'a, 'f> {
    stream: StreamDecoder<'a>,
    stop: &'a [String],
    /// Decoded text not handed out yet (a possible stop string's beginning).
    held: String,
    text: String,
    on_event: &'f mut dyn FnMut(Event),
    pacer: &'f mut dyn Pacer,
    error: Option<TokenizerError>,
    stopped: bool,
}

impl TextSink<'_, '_> {
    fn take(&mut self, new: &str) -> Flow {
        self.held.push_str(new);
        let hit = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.held[..at].to_string();
            self.held.clear();
            self.emit(out);
            self.stopped = true;
            return Flow::Stop;
        }
        let keep = held_back(&self.held, self.stop);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        self.emit(out);
        Flow::Continue
    }

    fn emit(&mut self, text: String) {
        if !text.is_empty() {
            self.text.push_str(&text);
            (self.on_event)(Event::Text(text));
        }
    }

    /// End of generation: everything left is final.
    fn finish(&mut self) -> Result<(), TokenizerError> {
        if self.stopped {
            return Ok(());
        }
        let rest = self.stream.finish()?;
        if self.take(&rest) == Flow::Continue {
            let held = std::mem::take(&mut self.held);
            self.emit(held);
        }
        Ok(())
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string.
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut keep = 0;
    for s in stop {
        for (i, _) in text.char_indices() {
            let tail = &text[i..];
            if tail.len() < s.len() && s.starts_with(tail) {
                keep = keep.max(tail.len());
                break;
            }
        }
    }
    keep
}

impl Observer for TextSink<'_, '_> {
    fn committed(&mut self, ids: &[u32]) -> Flow {
        match self.stream.push(ids) {
            Ok(text) => self.take(&text),
            Err(e) => {
                self.error = Some(e);
                Flow::Stop
            }
        }
    }

    fn canvas(&mut self, canvas: &Canvas) {
        (self.on_event)(Event::Canvas(canvas.clone()));
    }

    fn pass_turn(&mut self) -> Flow {
        if self.pacer.turn() {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }

    fn pass_done(&mut self) {
        self.pacer.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<LoadedEngine>();
        shareable::<Engine<CpuBackend>>();
        shareable::<Engine<GpuBackend>>();
        shareable::<GenerationRequest>();
    }

    #[test]
    fn held_back_keeps_a_possible_stop_string_start() {
        let stop = vec!["\n\nUser:".to_string()];
        assert_eq!(held_back("hello\n\nUs", &stop), 4);
        assert_eq!(held_back("hello", &stop), 0);
        assert_eq!(held_back("hello\n", &stop), 1);
        assert_eq!(held_back("héllo", &["lo!".to_string()]), 2);
    }

    #[test]
    fn text_sink_stops_before_the_stop_string_across_pieces() {
        let tok_json = crate::tokenizer::train::train_bpe(
            "abc def",
            300,
            &crate::tokenizer::train::SpecialTokens::default(),
        )
        .unwrap();
        let tok = Tokenizer::from_json(tok_json.as_bytes()).unwrap();
        let mut events = Vec::new();
        let stop = vec!["STOP".to_string()];
        let mut on_event = |e: Event| events.push(e);
        let mut sink = TextSink {
            stream: tok.stream_decoder(true),
            stop: &stop,
            held: String::new(),
            text: String::new(),
            on_event: &mut on_event,
            pacer: &mut Unpaced,
            error: None,
            stopped: false,
        };
        assert_eq!(sink.take("one ST"), Flow::Continue);
        assert_eq!(sink.take("O"), Flow::Continue);
        assert_eq!(sink.take("P two"), Flow::Stop);
        assert_eq!(sink.text, "one ");
        sink.finish().unwrap();
        assert_eq!(sink.text, "one ");
        drop(sink);
        assert_eq!(events, [Event::Text("one ".into())]);
    }
}
