//! `edgediff generate`: one prompt, text streamed as blocks commit. Also holds what `chat` and
//! `bench decode` share: the model/backend flags, the decoding flags and the default model path.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::decode::{
    BidirectionalCache, BidirectionalOptions, BlockOptions, CanvasOptions, Cell, CommitPolicy,
    DecodeParams, DecoderKind, DeviceSteps, Prediction, Sampling, SpeculativeOptions,
};
use crate::engine::{
    BackendChoice, EngineConfig, Event, GenerationOutput, GenerationStats, LoadedEngine, Prompt,
    ResidentProfile,
};
use crate::experts::{ExpertMemory, PagerStats};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// Where `--model` points when it is not given, relative to the working directory or the
/// executable's checkout.
pub const DEFAULT_MODEL: &str = "models/default.edm";

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Model file (default: models/default.edm in the working directory or the edgediff checkout).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Backend: auto (a hardware GPU when available, else the CPU, with a notice), cpu or gpu (any
    /// adapter, a software one such as lavapipe included).
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Page routed experts from the model file through a pool of this size instead of loading all
    /// of them: bytes (800MiB, 1.5GB, 123456789) or a share of all experts (12.5%). Exact: the
    /// tokens are the same, only memory and time change.
    #[arg(long, value_name = "BYTES|%")]
    pub expert_memory: Option<ExpertMemory>,
    /// Keep only the experts this profile (from `edgediff profile`) selects, --keep of them per
    /// layer: `edgediff prune` at load time, no new file. The others are never read; output changes.
    #[arg(long, value_name = "PROFILE.json")]
    pub resident_profile: Option<PathBuf>,
    /// With --resident-profile: experts kept per MoE layer, a percentage (25%), a count (32) or a
    /// byte budget for the whole model (1.5GB).
    #[arg(long, requires = "resident_profile", default_value = "25%")]
    pub keep: String,
}

impl ModelArgs {
    /// Loads the engine, after checking the decoding flags against the model's context from the
    /// file's header alone (so a flag the model cannot satisfy costs no load).
    pub fn load(&self, decoding: &DecodingArgs) -> anyhow::Result<LoadedEngine> {
        let path = resolve_model(self.model.as_deref())?;
        let header = crate::format::EdmFile::open(&path)
            .with_context(|| format!("loading {}", path.display()))?;
        decoding.check(header.header.metadata.config.max_position)?;
        drop(header);
        self.open()
    }

    /// Loads the engine without the decoding flags' checks (commands with budgets of their own,
    /// such as `reason`, check them against the loaded model).
    pub fn open(&self) -> anyhow::Result<LoadedEngine> {
        let path = resolve_model(self.model.as_deref())?;
        LoadedEngine::load(
            &path,
            &EngineConfig {
                backend: self.backend,
                expert_memory: self.expert_memory,
                resident: match &self.resident_profile {
                    Some(profile) => Some(ResidentProfile {
                        profile: profile.clone(),
                        keep: self.keep.parse()?,
                    }),
                    None => None,
                },
                block_experts: None,
            },
        )
        .with_context(|| format!("loading {}", path.display()))
    }
}

/// `--model`, or the default model: `models/default.edm` under the working directory, next to the
/// executable, or in the checkout the executable was built in (`target/<profile>/..`).
pub fn resolve_model(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let mut candidates = vec![PathBuf::from(DEFAULT_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(3) {
            candidates.push(dir.join(DEFAULT_MODEL));
        }
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    anyhow::bail!(
        "no --model given and no default model found (looked for {}).\n\
         Pass --model path/to/model.edm, convert a checkpoint with `edgediff convert <hf_dir> -o {DEFAULT_MODEL}`, \
         or make a small random test model with `edgediff synth --arch llada2_moe -o {DEFAULT_MODEL}` \
         (its text is gibberish, but every decoder runs on it)",
        looked.join(", ")
    )
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderName {
    Block,
    Bidirectional,
    Speculative,
    Ar,
    /// DiffusionGemma's uniform-noise canvas sampler (the default, and the only decoder, of a
    /// DiffusionGemma model; no other model runs it).
    Canvas,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyName {
    Threshold,
    Fixed,
    Entropy,
    Margin,
    Credit,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheName {
    None,
    Prefix,
    Dual,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionName {
    InPlace,
    NextToken,
    /// Masked rows in place, causal rows next-token (mixed diffusion + AR training).
    Hybrid,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStepsName {
    /// Chained on the GPU where the step allows it (greedy; block diffusion also: threshold,
    /// fixed, entropy or margin policy, in-place masks), else on the host.
    Auto,
    /// One host round trip per step (per token for AR).
    Host,
    /// Chained wherever the step allows it, the CPU backend included (for comparisons).
    Device,
}

#[derive(clap::Args, Clone)]
pub struct DecodingArgs {
    /// Decoder (default: the model's: block diffusion, AR for block size 1, canvas for
    /// DiffusionGemma).
    #[arg(long, value_enum)]
    pub decoder: Option<DecoderName>,
    /// Block size (draft length for the speculative decoder); default from the model file (a
    /// speculative draft of 16 when the model's blocks are single tokens).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Commit policy of the diffusion decoders.
    #[arg(long, value_enum, default_value = "threshold")]
    pub policy: PolicyName,
    /// Confidence threshold τ of the threshold and credit policies; default from the model file.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Denoising steps per block of the fixed-steps policy; default: the model's. Canvas decoder:
    /// most denoising steps per canvas (default 48).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Canvas decoder: entropy bound of its acceptance (default 0.1).
    #[arg(long)]
    pub entropy_bound: Option<f32>,
    /// Canvas decoder: temperature of the first denoising step (default 0.8).
    #[arg(long)]
    pub t_max: Option<f32>,
    /// Canvas decoder: temperature the schedule falls towards at the last step (default 0.4).
    #[arg(long)]
    pub t_min: Option<f32>,
    /// Entropy bound γ of the entropy policy.
    #[arg(long, default_value_t = 0.15)]
    pub gamma: f32,
    /// Minimum p₁ − p₂ of the margin policy.
    #[arg(long, default_value_t = 0.5)]
    pub margin: f32,
    /// Speculative logit mixing: β·AR + (1−β)·diffusion; 1 is lossless.
    #[arg(long, default_value_t = 1.0)]
    pub beta: f32,
    /// K/V reuse of the bidirectional decoder.
    #[arg(long, value_enum, default_value = "prefix")]
    pub cache: CacheName,
    /// Block decoder: keep the last step's K/V instead of fusing a clean pass (approximate).
    #[arg(long)]
    pub reuse_last_kv: bool,
    /// Which position a row of logits predicts (default: the model file's setting, else the
    /// model family's convention).
    #[arg(long, value_enum)]
    pub prediction: Option<PredictionName>,
    /// Sampling temperature; 0 is greedy (the canvas decoder samples on its own schedule:
    /// --t-max, --t-min).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches p (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sample among the k most likely tokens; 0 keeps all candidates (the backend keeps the top 8).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampling RNG: the same seed, prompt and flags give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Keep generating past EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Block-level expert routing: every token of a block routes only within the N experts per
    /// MoE layer with the largest router probability mass summed over the block's tokens (fewer
    /// distinct experts per pass: less to page; approximate). At least the router's top-k; N ≥ the
    /// expert count is exact routing. Blocks: the block decoder's blocks (a finished block's clean
    /// pass and the prompt's prefill route per block too), the bidirectional canvas's blocks, the
    /// speculative draft (its verify rows stay exact); AR is unchanged.
    #[arg(long, value_name = "N")]
    pub block_experts: Option<usize>,
    /// Where block diffusion decides its denoising steps and AR its tokens: several chained on
    /// the device per submission (committed tokens stream and cancellation is checked between
    /// submissions), or one host round trip each. Same tokens either way.
    #[arg(long, value_enum, default_value = "auto")]
    pub device_steps: DeviceStepsName,
}

impl DecodingArgs {
    /// The flags against a model context of `limit` positions, before any prompt is known.
    pub fn check(&self, limit: usize) -> Result<(), super::limits::OptionError> {
        super::limits::check_decoding(limit, self.max_tokens, self.block_size)
    }

    /// `--max-tokens` after a prompt of `prompt` tokens (`what` names it in the error).
    pub fn check_prompt(
        &self,
        engine: &LoadedEngine,
        what: &str,
        prompt: usize,
    ) -> Result<(), super::limits::OptionError> {
        super::limits::check_prompt(engine.config().max_position, what, prompt, self.max_tokens)
    }

    /// The request's decoding parameters: the model's defaults, overridden by the flags.
    pub fn params(&self, engine: &LoadedEngine) -> DecodeParams {
        self.params_from(engine.default_decoding(), &engine.metadata().decoding)
    }

    /// [`DecodingArgs::params`] for an engine of a known backend.
    pub fn params_for<B: crate::backend::Backend>(
        &self,
        engine: &crate::engine::Engine<B>,
    ) -> DecodeParams {
        self.params_from(engine.default_decoding(), &engine.metadata().decoding)
    }

    fn params_from(
        &self,
        mut p: DecodeParams,
        defaults: &crate::format::header::DecodingDefaults,
    ) -> DecodeParams {
        let block_size = self.block_size.unwrap_or(defaults.block_size.max(1));
        let decoder = self.decoder.unwrap_or(match p.decoder {
            DecoderKind::Ar => DecoderName::Ar,
            DecoderKind::Canvas(_) => DecoderName::Canvas,
            _ => DecoderName::Block,
        });
        p.decoder = match decoder {
            DecoderName::Block => DecoderKind::Block(BlockOptions {
                block_size,
                reuse_last_kv: self.reuse_last_kv,
            }),
            DecoderName::Bidirectional => DecoderKind::Bidirectional(BidirectionalOptions {
                block_size,
                cache: match self.cache {
                    CacheName::None => BidirectionalCache::None,
                    CacheName::Prefix => BidirectionalCache::Prefix,
                    CacheName::Dual => BidirectionalCache::Dual,
                },
            }),
            DecoderName::Speculative => DecoderKind::Speculative(SpeculativeOptions {
                draft_len: self.block_size.unwrap_or(defaults.draft_len()),
                beta: self.beta,
            }),
            DecoderName::Ar => DecoderKind::Ar,
            DecoderName::Canvas => {
                let mut o = match p.decoder {
                    DecoderKind::Canvas(o) => o,
                    _ => CanvasOptions::default(),
                };
                o.steps = self.steps.unwrap_or(o.steps);
                o.entropy_bound = self.entropy_bound.unwrap_or(o.entropy_bound);
                o.t_max = self.t_max.unwrap_or(o.t_max);
                o.t_min = self.t_min.unwrap_or(o.t_min);
                DecoderKind::Canvas(o)
            }
        };
        let threshold = self.threshold.unwrap_or(defaults.threshold);
        p.policy = match self.policy {
            PolicyName::Threshold => CommitPolicy::Threshold { threshold },
            PolicyName::Fixed => CommitPolicy::FixedSteps {
                steps: self.steps.unwrap_or(defaults.steps.min(block_size).max(1)),
            },
            PolicyName::Entropy => CommitPolicy::EntropyBound { gamma: self.gamma },
            PolicyName::Margin => CommitPolicy::Margin {
                margin: self.margin,
            },
            PolicyName::Credit => CommitPolicy::Credit { threshold },
        };
        p.sampling = Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        };
        if let Some(pred) = self.prediction {
            p.prediction = match pred {
                PredictionName::InPlace => Prediction::InPlace,
                PredictionName::NextToken => Prediction::NextToken,
                PredictionName::Hybrid => Prediction::Hybrid,
            };
        }
        p.max_new_tokens = self.max_tokens;
        p.ignore_eos = self.ignore_eos;
        if self.block_experts.is_some() {
            p.block_experts = self.block_experts;
        }
        p.device_steps = match self.device_steps {
            DeviceStepsName::Auto => DeviceSteps::Auto,
            DeviceStepsName::Host => DeviceSteps::Host,
            DeviceStepsName::Device => DeviceSteps::Device,
        };
        p
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// The prompt (read from stdin when absent).
    pub prompt: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Apply the model's chat template to the prompt as one user turn.
    #[arg(long)]
    pub chat: bool,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print generation statistics to stderr.
    #[arg(long)]
    pub stats: bool,
    /// Live view of the block being denoised (masks shown as ░), on stderr.
    #[arg(long)]
    pub visual: bool,
    /// Pause after each step of the live view, in milliseconds.
    #[arg(long, default_value_t = 40)]
    pub visual_delay_ms: u64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let prompt = match a.prompt {
        Some(p) => p,
        None => std::io::read_to_string(std::io::stdin()).context("reading the prompt")?,
    };
    let engine = a.model.load(&a.decoding)?;
    let prompt = if a.chat {
        Prompt::Chat(vec![ChatMessage::user(prompt)])
    } else {
        Prompt::Text(prompt)
    };
    let prompt_len = engine.encode_prompt(&prompt)?.len();
    a.decoding.check_prompt(&engine, "the prompt", prompt_len)?;
    let mut request = engine.request(prompt);
    request.decoding = a.decoding.params(&engine);
    request.decoding.canvas_events = a.visual;
    request.stop = a.stop.clone();
    let out = if a.visual {
        let mut view = LiveView::new(engine.tokenizer(), Duration::from_millis(a.visual_delay_ms));
        let out = engine.generate(&request, &mut |e| view.show(e));
        view.clear();
        let out = out?;
        println!("{}", out.text);
        out
    } else {
        let mut stdout = std::io::stdout().lock();
        let out = engine.generate(&request, &mut |e| {
            if let Event::Text(t) = e {
                let _ = stdout.write_all(t.as_bytes());
                let _ = stdout.flush();
            }
        })?;
        writeln!(stdout)?;
        out
    };
    if a.stats {
        eprintln!("{}", stats_report(&request.decoding, &out));
        if let Some(p) = engine.expert_stats() {
            eprintln!("{}", pager_report(&p));
        }
        eprintln!("{}", memory_report());
    }
    Ok(())
}

/// Peak resident host memory of this process (Linux `VmHWM`, KiB), if known.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak host RSS and peak bytes of GPU buffers so far (the memory a deployment needs).
pub fn memory_report() -> String {
    let rss = peak_rss_kib().map(|k| k * 1024);
    let (_, gpu) = crate::backend::gpu::pool::gpu_bytes();
    let mib = |b: u64| b as f64 / 1048576.0;
    match rss {
        Some(r) => format!(
            "memory: peak RSS {:.1} MiB, peak GPU buffers {:.1} MiB, together {:.1} MiB ({:.3} GB)",
            mib(r),
            mib(gpu),
            mib(r + gpu),
            (r + gpu) as f64 / 1e9
        ),
        None => format!("memory: peak GPU buffers {:.1} MiB", mib(gpu)),
    }
}

/// The expert pool's counters, when experts are paged (`--expert-memory`).
pub fn pager_report(s: &PagerStats) -> String {
    format!(
        "experts: {} hits, {} misses ({:.1} % hit rate), {} prefetched ({} used), {} evictions, \
         {:.1} MiB read from flash, {:.1} ms stalled, {} passes re-run, pool {}/{} slots",
        s.hits,
        s.misses,
        s.hit_rate() * 100.0,
        s.prefetched,
        s.prefetch_hits,
        s.evictions,
        s.bytes_read as f64 / 1048576.0,
        s.stall.as_secs_f64() * 1e3,
        s.repasses,
        s.occupied,
        s.slots,
    )
}

/// Human-readable statistics of one generation.
pub fn stats_report(params: &DecodeParams, out: &GenerationOutput) -> String {
    let s: &GenerationStats = &out.stats;
    let ttft = s.time_to_first_token.map_or("-".to_string(), |t| {
        format!("{:.1} ms", t.as_secs_f64() * 1e3)
    });
    let policy = if params.decoder.uses_policy() {
        format!(", {}", params.policy.label())
    } else {
        String::new()
    };
    format!(
        "decoder: {}{policy} ({:?})\n\
         prompt {} tokens, generated {} tokens, finish: {:?}\n\
         forward passes {} ({:.2} tokens/forward), positions processed {}\n\
         time to first token {ttft}, {:.3} s total, {:.1} tokens/s",
        params.decoder.label(),
        s.decoder,
        s.prompt_tokens,
        s.new_tokens,
        out.finish_reason,
        s.forward_passes,
        s.tokens_per_forward,
        s.positions_processed,
        s.elapsed.as_secs_f64(),
        s.tokens_per_second,
    )
}

/// One redrawn terminal line: the end of the committed text, then the block with masks as ░.
struct LiveView<'a> {
    tokenizer: &'a Tokenizer,
    delay: Duration,
    text: String,
    block: String,
    enabled: bool,
}

impl<'a> LiveView<'a> {
    fn new(tokenizer: &'a Tokenizer, delay: Duration) -> Self {
        LiveView {
            tokenizer,
            delay,
            text: String::new(),
            block: String::new(),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn show(&mut self, event: Event) {
        let step = matches!(event, Event::Canvas(_));
        match event {
            Event::Text(t) => self.text.push_str(&t),
            Event::Canvas(c) => {
                self.block = c
                    .cells
                    .iter()
                    .map(|cell| match cell {
                        Cell::Masked => "░".to_string(),
                        Cell::Known(id) => self.piece(*id),
                        Cell::Draft(id) => format!("\x1b[2m{}\x1b[0m", self.piece(*id)),
                    })
                    .collect();
            }
        }
        if !self.enabled {
            return;
        }
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(100);
        let committed = printable(&self.text);
        let room = width.saturating_sub(visible_len(&self.block) + 4);
        let tail: String = {
            let chars: Vec<char> = committed.chars().collect();
            chars[chars.len().saturating_sub(room)..].iter().collect()
        };
        eprint!("\r\x1b[2K{tail} \x1b[7m{}\x1b[0m", self.block);
        let _ = std::io::stderr().flush();
        if step {
            std::thread::sleep(self.delay);
        }
    }

    fn piece(&self, id: u32) -> String {
        printable(&self.tokenizer.decode(&[id], false).unwrap_or_default())
    }

    fn clear(&self) {
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Newlines and control characters as visible symbols, so the view stays on one line.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\t' => '→',
            c if c.is_control() => '·',
            c => c,
        })
        .collect()
}

/// Characters shown, ANSI escapes left out.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}
