//! DiffusionGemma's uniform-noise canvas sampler (transformers `generation_diffusion_gemma.py`,
//! 5.17: `EntropyBoundSampler`, `LinearTemperatureScheduleLogitsProcessor`,
//! `StableAndConfidentStoppingCriteria`) over [`CanvasModel`]'s passes. Each step's head (the
//! tempered logits, their per-position draws and the next step's self-conditioning input) runs
//! where the pass runs ([`crate::backend::Backend::canvas_head`]): only the draws come back, and
//! the acceptance and renoising below run on the host over one value per position.
//!
//! Per canvas of `C` positions after the committed text at `P`:
//! 1. the canvas starts as `C` uniform random tokens; no self-conditioning logits;
//! 2. for `n = N, N−1, …, 1` (the steps *remaining*): logits of the canvas pass, divided by the
//!    temperature `t = t_min + (t_max − t_min) · n / N`; a token sampled per position from their
//!    softmax; the argmax canvas; the positions sorted by entropy (ascending) accept their sampled
//!    token while `Σ_{i≤k} H_i − H_k ≤ entropy_bound` (the lowest one always), every other position
//!    takes a fresh uniform token; stop when the argmax canvas equals the one of each of the last
//!    `stability` steps and the mean entropy is below `confidence`; the tempered logits feed the
//!    next step's self-conditioning;
//! 3. the last argmax canvas is committed (tokens after its first EOS become pad, and generation
//!    ends there), encoded into the cache, and the next canvas starts.
//!
//! Randomness comes from a [`CanvasDraws`]: the default draws from the project's SplitMix64; a test
//! injects the draws transformers made (noise canvases and one uniform per sampled position,
//! turned into a token by inverse CDF on both sides).

use crate::backend::draw::row_draw;
use crate::backend::Backend;
use crate::decode::sampling::Rng;
use crate::decode::{
    Canvas, Cell, DecodeError, DecodeOutcome, DecodeParams, DecoderDetails, DecoderKind, Delivery,
    Flow, Observer, SpecialIds,
};
use crate::format::CanvasSampler;
use crate::model::canvas::CanvasModel;
use crate::model::{ForwardRequest, ModelError};

/// The sampler's settings; [`Default`] is transformers' (`_get_default_generation_params`).
#[derive(Clone, Debug, PartialEq)]
pub struct CanvasParams {
    pub max_new_tokens: usize,
    /// Denoising steps per canvas at most (N).
    pub steps: usize,
    pub entropy_bound: f32,
    /// Temperature at the last step and at the first.
    pub t_min: f32,
    pub t_max: f32,
    /// Steps the argmax canvas must repeat (0: stability is not required).
    pub stability: usize,
    /// Mean entropy (tempered logits, nats) below which a stable canvas stops.
    pub confidence: f32,
    pub eos: Option<u32>,
    pub pad: u32,
}

impl Default for CanvasParams {
    fn default() -> Self {
        CanvasOptions::default().params(256, None, 0)
    }
}

/// Where the sampler's randomness comes from.
pub trait CanvasDraws {
    /// `len` uniform tokens in `0..vocab` (a fresh canvas, or the noise of a renoising step).
    fn noise(&mut self, len: usize, vocab: usize) -> Vec<u32>;
    /// One uniform in `[0, 1)` per position to sample from its distribution.
    fn uniforms(&mut self, len: usize) -> Vec<f32>;
}

/// Draws from a seeded SplitMix64 ([`Rng`]).
pub struct SeededDraws(pub Rng);

impl CanvasDraws for SeededDraws {
    fn noise(&mut self, len: usize, vocab: usize) -> Vec<u32> {
        (0..len)
            .map(|_| (self.0.next_u64() % vocab as u64) as u32)
            .collect()
    }
    fn uniforms(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.0.next_f32()).collect()
    }
}

/// Watches a generation from inside the sampler loop: the engine streams committed canvases,
/// honours cancellation and takes a server's pass turns through it. Every method has a default
/// that changes nothing, so [`generate`] runs unwatched.
pub trait CanvasWatch {
    /// Asked before every forward pass (encode or denoising step); `Flow::Stop` ends the
    /// generation without that pass ([`CanvasOutcome::stopped`]).
    fn before_pass(&mut self) -> Flow {
        Flow::Continue
    }
    /// The pass asked for by the last [`CanvasWatch::before_pass`] ran (or failed).
    fn after_pass(&mut self, _tokens: usize) {}
    /// A denoising step's result: the canvas the next step starts from and which positions
    /// kept their sampled token (the others hold fresh noise).
    fn step(&mut self, _start: usize, _canvas: &[u32], _accepted: &[bool]) {}
    /// A canvas was committed (pad after an EOS); `Flow::Stop` ends the generation after it.
    fn committed(&mut self, _tokens: &[u32]) -> Flow {
        Flow::Continue
    }
}

/// Watches nothing.
pub struct Unwatched;

impl CanvasWatch for Unwatched {}

/// What one generation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CanvasOutcome {
    /// Committed tokens (whole canvases; after an EOS, pad).
    pub tokens: Vec<u32>,
    /// Denoising steps run per canvas (a canvas cut short by the watcher included).
    pub steps: Vec<usize>,
    /// Whether an EOS ended generation.
    pub finished: bool,
    /// Whether the watcher ended generation (before a pass, or after a committed canvas).
    pub stopped: bool,
    /// Forward passes run (encodes and denoising steps).
    pub forward_passes: usize,
    /// Σ tokens over all forward passes.
    pub positions: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CanvasError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("canvas sampler: {0}")]
    Params(String),
}

impl CanvasParams {
    pub fn validate(&self) -> Result<(), CanvasError> {
        let bad = |m: String| Err(CanvasError::Params(m));
        if self.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if !(self.entropy_bound.is_finite() && self.entropy_bound > 0.0) {
            return bad(format!("entropy bound {} must be > 0", self.entropy_bound));
        }
        if !(self.t_min > 0.0
            && self.t_max > 0.0
            && self.t_min.is_finite()
            && self.t_max.is_finite())
        {
            return bad(format!(
                "temperatures {} .. {} must be > 0",
                self.t_min, self.t_max
            ));
        }
        if !self.confidence.is_finite() {
            return bad("confidence threshold is not finite".into());
        }
        Ok(())
    }

    /// The temperature with `remaining` steps left.
    pub fn temperature(&self, remaining: usize) -> f32 {
        self.t_min + (self.t_max - self.t_min) * (remaining as f32 / self.steps as f32)
    }
}

/// Per position of tempered logits `[C, V]`: entropy (nats), argmax (first of ties) and the token
/// a uniform `u` picks by inverse CDF (the first whose cumulative probability exceeds `u`).
pub fn position_draw(logits: &[f32], u: f32) -> (f32, u32, u32) {
    let d = row_draw(logits, u);
    (d.entropy, d.argmax, d.sampled)
}

/// The entropy-bound acceptance: which positions take their sampled token.
pub fn accept_by_entropy(entropy: &[f32], bound: f32) -> Vec<bool> {
    let mut order: Vec<usize> = (0..entropy.len()).collect();
    order.sort_by(|&a, &b| entropy[a].total_cmp(&entropy[b]).then(a.cmp(&b)));
    let mut accept = vec![false; entropy.len()];
    let mut cumulative = 0.0f32;
    for &i in &order {
        cumulative += entropy[i];
        // Sorted ascending, so the current entropy is the running maximum.
        if cumulative - entropy[i] <= bound {
            accept[i] = true;
        }
    }
    accept
}

/// The canvas length of `model` (its config's).
pub fn canvas_length<B: Backend>(model: &CanvasModel<B>) -> Result<usize, CanvasError> {
    model
        .config
        .block
        .canvas
        .as_ref()
        .map(|k| k.length)
        .filter(|&l| l > 0)
        .ok_or_else(|| CanvasError::Params("the model has no canvas decoder".into()))
}

/// KV positions a generation of `max_new_tokens` after `prompt` tokens fills: whole canvases
/// (the last one runs at full length, as transformers' does, and its denoising steps write its
/// K/V as scratch).
pub fn positions_needed(prompt: usize, max_new_tokens: usize, canvas: usize) -> usize {
    prompt.saturating_add(
        max_new_tokens
            .div_ceil(canvas.max(1))
            .saturating_mul(canvas),
    )
}

/// Generates after `prompt` (encoded at positions `0..`), canvas by canvas.
pub fn generate<B: Backend>(
    b: &B,
    model: &CanvasModel<B>,
    kv: &mut B::Kv,
    prompt: &[u32],
    p: &CanvasParams,
    draws: &mut dyn CanvasDraws,
) -> Result<CanvasOutcome, CanvasError> {
    generate_watched(b, model, kv, prompt, p, draws, &mut Unwatched)
}

/// [`generate`] reporting to `watch` (passes, steps, committed canvases) and stopping when it
/// says so.
pub fn generate_watched<B: Backend>(
    b: &B,
    model: &CanvasModel<B>,
    kv: &mut B::Kv,
    prompt: &[u32],
    p: &CanvasParams,
    draws: &mut dyn CanvasDraws,
    watch: &mut dyn CanvasWatch,
) -> Result<CanvasOutcome, CanvasError> {
    p.validate()?;
    let len = canvas_length(model)?;
    let vocab = model.config.vocab_size;
    let mut out = CanvasOutcome::default();
    // The encoder passes only fill the cache: no LM-head rows (the head of an empty row range is
    // still the pass's end, where paged expert pools settle).
    let encode_only = ForwardRequest {
        rows: Some(0..0),
        ..Default::default()
    };
    // One forward pass, between the watcher's turn and its report.
    macro_rules! pass {
        ($tokens:expr, $run:expr) => {{
            if watch.before_pass() == Flow::Stop {
                out.stopped = true;
                return Ok(out);
            }
            let r = $run;
            watch.after_pass($tokens);
            let r = r?;
            out.forward_passes += 1;
            out.positions += $tokens;
            r
        }};
    }
    pass!(prompt.len(), model.encode(b, kv, prompt, 0, &encode_only));
    let mut pos = prompt.len();
    let canvases = p.max_new_tokens.div_ceil(len);
    for canvas_index in 0..canvases {
        let mut canvas = draws.noise(len, vocab);
        let mut argmax_canvas = canvas.clone();
        // The previous step's soft embeddings, left where the passes run (Backend::canvas_head).
        let mut self_cond: Option<B::Act> = None;
        // The argmax canvases of the last `stability` steps (none yet: never equal).
        let mut history: Vec<Option<Vec<u32>>> = vec![None; p.stability];
        let mut steps = 0;
        for remaining in (1..=p.steps).rev() {
            if watch.before_pass() == Flow::Stop {
                out.steps.push(steps);
                out.stopped = true;
                return Ok(out);
            }
            steps += 1;
            let t = p.temperature(remaining);
            let u = draws.uniforms(len);
            // After the last allowed step no step reads the soft embeddings.
            let next = remaining > 1;
            let r = model.denoise_step(b, kv, &canvas, pos, self_cond.as_ref(), t, &u, next);
            watch.after_pass(len);
            out.forward_passes += 1;
            out.positions += len;
            let (rows, soft) = r?;
            let entropy: Vec<f32> = rows.iter().map(|d| d.entropy).collect();
            let argmax: Vec<u32> = rows.iter().map(|d| d.argmax).collect();
            let sampled: Vec<u32> = rows.iter().map(|d| d.sampled).collect();
            let accept = accept_by_entropy(&entropy, p.entropy_bound);
            let noise = draws.noise(len, vocab);
            for i in 0..len {
                canvas[i] = if accept[i] { sampled[i] } else { noise[i] };
            }
            watch.step(pos, &canvas, &accept);
            let stable = history.iter().all(|h| h.as_ref() == Some(&argmax));
            if p.stability > 0 {
                history.remove(0);
                history.push(Some(argmax.clone()));
            }
            let confident = entropy.iter().sum::<f32>() / (len as f32) < p.confidence;
            argmax_canvas = argmax;
            self_cond = soft;
            if stable && confident {
                break;
            }
        }
        out.steps.push(steps);
        // Commit the argmax canvas; after its first EOS, pad, and generation ends.
        let eos_at = p
            .eos
            .and_then(|e| argmax_canvas.iter().position(|&t| t == e));
        if let Some(i) = eos_at {
            argmax_canvas[i + 1..].iter_mut().for_each(|t| *t = p.pad);
        }
        out.tokens.extend_from_slice(&argmax_canvas);
        let flow = watch.committed(&argmax_canvas);
        if eos_at.is_some() {
            out.finished = true;
            break;
        }
        if flow == Flow::Stop {
            out.stopped = true;
            break;
        }
        // The committed canvas joins the cache (transformers encodes it when the next canvas
        // starts; after the last one there is none).
        if canvas_index + 1 < canvases {
            pass!(len, model.encode(b, kv, &argmax_canvas, pos, &encode_only));
            pos += len;
        }
    }
    Ok(out)
}

/// The canvas decoder's settings in [`crate::decode::DecodeParams`] (`DecoderKind::Canvas`);
/// [`Default`] is transformers' (`max_denoising_steps` 48, entropy bound 0.1, temperatures
/// 0.8 → 0.4, stability 1, confidence 0.005). The canvas length is the model's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CanvasOptions {
    /// Denoising steps per canvas at most.
    pub steps: usize,
    pub entropy_bound: f32,
    pub t_min: f32,
    pub t_max: f32,
    pub stability: usize,
    pub confidence: f32,
}

impl Default for CanvasOptions {
    fn default() -> Self {
        CanvasSampler::default().into()
    }
}

impl From<CanvasSampler> for CanvasOptions {
    fn from(s: CanvasSampler) -> Self {
        CanvasOptions {
            steps: s.steps,
            entropy_bound: s.entropy_bound,
            t_min: s.t_min,
            t_max: s.t_max,
            stability: s.stability,
            confidence: s.confidence,
        }
    }
}

impl CanvasOptions {
    /// The sampler's parameters for a generation of `max_new_tokens`.
    pub fn params(&self, max_new_tokens: usize, eos: Option<u32>, pad: u32) -> CanvasParams {
        CanvasParams {
            max_new_tokens,
            steps: self.steps,
            entropy_bound: self.entropy_bound,
            t_min: self.t_min,
            t_max: self.t_max,
            stability: self.stability,
            confidence: self.confidence,
            eos,
            pad,
        }
    }

    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.steps == 0 {
            return Err(DecodeError::invalid("steps", 0, "at least 1"));
        }
        if !(self.entropy_bound.is_finite() && self.entropy_bound > 0.0) {
            return Err(DecodeError::invalid(
                "entropy_bound",
                self.entropy_bound,
                "a finite number > 0",
            ));
        }
        for (name, t) in [("t_min", self.t_min), ("t_max", self.t_max)] {
            if !(t.is_finite() && t > 0.0) {
                return Err(DecodeError::invalid(name, t, "a finite temperature > 0"));
            }
        }
        if !self.confidence.is_finite() {
            return Err(DecodeError::invalid(
                "confidence",
                self.confidence,
                "a finite entropy",
            ));
        }
        Ok(())
    }
}

impl From<CanvasError> for DecodeError {
    fn from(e: CanvasError) -> Self {
        match e {
            CanvasError::Model(m) => DecodeError::Model(m),
            CanvasError::Params(p) => DecodeError::Unsupported(p),
        }
    }
}

/// The canvas decoder as the engine runs it: `params.decoder` must be
/// [`DecoderKind::Canvas`]; the sampler draws from `params.sampling.seed`; committed canvases go
/// to `observer` in order (EOS left out, cut at `max_new_tokens`); `params.cancel` and the
/// observer's pass turns are asked before every pass, so a cancel ends it within one step.
#[allow(clippy::too_many_arguments)]
pub fn decode<B: Backend>(
    backend: &B,
    model: &CanvasModel<B>,
    kv: &mut B::Kv,
    prompt: &[u32],
    special: SpecialIds,
    pad: u32,
    params: &DecodeParams,
    observer: &mut dyn Observer,
) -> Result<DecodeOutcome, DecodeError> {
    let DecoderKind::Canvas(options) = params.decoder else {
        return Err(DecodeError::WrongDecoder {
            decoder: params.decoder.name(),
            architecture: model.config.architecture.hf_name().to_string(),
            supported: "canvas",
        });
    };
    params.validate()?;
    if prompt.is_empty() {
        return Err(DecodeError::EmptyPrompt);
    }
    if params.block_experts.is_some() {
        return Err(DecodeError::Unsupported(
            "block-level expert routing (--block-experts) is not implemented for the canvas decoder"
                .into(),
        ));
    }
    let vocab = model.config.vocab_size;
    if let Some(&id) = prompt
        .iter()
        .chain(special.eos.iter())
        .chain(std::iter::once(&pad))
        .find(|&&t| t as usize >= vocab)
    {
        return Err(DecodeError::TokenOutOfRange { id, vocab });
    }
    let len = canvas_length(model)?;
    let context = backend.kv_capacity(kv).min(model.config.max_position);
    if positions_needed(prompt.len(), params.max_new_tokens, len) > context {
        return Err(DecodeError::ContextTooLong {
            prompt: prompt.len(),
            max_new: params.max_new_tokens.div_ceil(len) * len,
            context,
        });
    }
    let eos = special.eos.filter(|_| !params.ignore_eos);
    let p = options.params(params.max_new_tokens, eos, pad);
    let mut draws = SeededDraws(Rng::new(params.sampling.seed));
    let mut w = EngineWatch {
        observer,
        params,
        eos,
        out: Delivery::new(),
        forwards: 0,
    };
    let out = generate_watched(backend, model, kv, prompt, &p, &mut draws, &mut w);
    // A turn taken by the last `before_pass` whose pass never came.
    w.observer.pass_done();
    let out = out?;
    let details = DecoderDetails::Canvas {
        canvases: out.steps.len(),
        steps: out.steps.iter().sum(),
    };
    Ok(w.out.outcome(out.forward_passes, out.positions, details))
}

/// The engine's [`Observer`] seen from the sampler: pass turns and cancellation before every
/// pass, committed canvases delivered the way the other decoders deliver (EOS ends, left out;
/// `max_new_tokens` cuts).
struct EngineWatch<'a> {
    observer: &'a mut dyn Observer,
    params: &'a DecodeParams,
    eos: Option<u32>,
    out: Delivery,
    forwards: usize,
}

impl CanvasWatch for EngineWatch<'_> {
    fn before_pass(&mut self) -> Flow {
        flow(
            self.out
                .running(&mut *self.observer, self.params.cancel.as_ref()),
        )
    }

    fn after_pass(&mut self, _tokens: usize) {
        self.forwards += 1;
        self.observer.pass_done();
    }

    fn step(&mut self, start: usize, canvas: &[u32], accepted: &[bool]) {
        if self.params.canvas_events {
            // Accepted samples are tentative (a later step may resample them); the other
            // positions hold noise, shown as masks.
            let cells = canvas
                .iter()
                .zip(accepted)
                .map(|(&t, &a)| if a { Cell::Draft(t) } else { Cell::Masked })
                .collect();
            self.observer.canvas(&Canvas {
                start,
                cells,
                forward_passes: self.forwards,
            });
        }
    }

    fn committed(&mut self, ids: &[u32]) -> Flow {
        flow(self.out.deliver(
            ids,
            self.eos,
            self.params.max_new_tokens,
            &mut *self.observer,
        ))
    }
}

fn flow(going: bool) -> Flow {
    if going {
        Flow::Continue
    } else {
        Flow::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_bound_accepts_the_lowest_and_stops_at_the_bound() {
        // Sorted: 0.01 (i=2), 0.05 (i=0), 0.3 (i=3), 2.0 (i=1): prefix sums minus the current
        // entry: 0, 0.01, 0.06, 0.36 → bound 0.1 accepts i = 2, 0, 3.
        assert_eq!(
            accept_by_entropy(&[0.05, 2.0, 0.01, 0.3], 0.1),
            vec![true, false, true, true]
        );
        // The lowest is always accepted, however large.
        assert_eq!(accept_by_entropy(&[5.0, 7.0], 0.1), vec![true, false]);
    }

    #[test]
    fn inverse_cdf_picks_by_cumulative_probability() {
        let logits = [0.0f32, (3.0f32).ln(), 0.0]; // probabilities 0.2, 0.6, 0.2
        assert_eq!(position_draw(&logits, 0.1).2, 0);
        assert_eq!(position_draw(&logits, 0.5).2, 1);
        assert_eq!(position_draw(&logits, 0.9).2, 2);
        let (h, a, _) = position_draw(&logits, 0.0);
        assert_eq!(a, 1);
        let want = -(0.4f32 * 0.2f32.ln() + 0.6 * 0.6f32.ln());
        assert!((h - want).abs() < 1e-5);
    }

    #[test]
    fn temperature_runs_from_t_max_to_t_min() {
        let p = CanvasParams::default();
        assert!((p.temperature(48) - 0.8).abs() < 1e-6);
        assert!((p.temperature(1) - (0.4 + 0.4 / 48.0)).abs() < 1e-6);
        assert!(CanvasParams {
            steps: 0,
            ..p.clone()
        }
        .validate()
        .is_err());
        assert!(CanvasParams {
            entropy_bound: 0.0,
            ..p
        }
        .validate()
        .is_err());
    }
}
