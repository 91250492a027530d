//! DiffusionGemma's uniform-noise canvas sampler (transformers `generation_diffusion_gemma.py`,
//! 5.17: `EntropyBoundSampler`, `LinearTemperatureScheduleLogitsProcessor`,
//! `StableAndConfidentStoppingCriteria`), on the host over [`CanvasModel`]'s passes.
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

use crate::backend::Backend;
use crate::decode::sampling::Rng;
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
        CanvasParams {
            max_new_tokens: 256,
            steps: 48,
            entropy_bound: 0.1,
            t_min: 0.4,
            t_max: 0.8,
            stability: 1,
            confidence: 0.005,
            eos: None,
            pad: 0,
        }
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

/// What one generation did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CanvasOutcome {
    /// Committed tokens (whole canvases; after an EOS, pad).
    pub tokens: Vec<u32>,
    /// Denoising steps run per canvas.
    pub steps: Vec<usize>,
    /// Whether an EOS ended generation.
    pub finished: bool,
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
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let argmax = logits.iter().position(|&l| l == max).unwrap_or(0) as u32;
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let log_z = max + sum.ln();
    let entropy = -logits
        .iter()
        .zip(&exp)
        .map(|(l, e)| (e / sum) * (l - log_z))
        .sum::<f32>();
    let target = u * sum;
    let mut acc = 0.0f32;
    let mut sampled = (logits.len() - 1) as u32;
    for (i, e) in exp.iter().enumerate() {
        acc += e;
        if acc > target {
            sampled = i as u32;
            break;
        }
    }
    (entropy, argmax, sampled)
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

/// Generates after `prompt` (encoded at positions `0..`), canvas by canvas.
pub fn generate<B: Backend>(
    b: &B,
    model: &CanvasModel<B>,
    kv: &mut B::Kv,
    prompt: &[u32],
    p: &CanvasParams,
    draws: &mut dyn CanvasDraws,
) -> Result<CanvasOutcome, CanvasError> {
    p.validate()?;
    let c = &model.config;
    let len = c
        .block
        .canvas
        .as_ref()
        .map(|k| k.length)
        .ok_or_else(|| CanvasError::Params("the model has no canvas decoder".into()))?;
    let vocab = c.vocab_size;
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    let mut out = CanvasOutcome::default();
    model.encode(b, kv, prompt, 0, &ForwardRequest::default())?;
    let mut pos = prompt.len();
    let canvases = p.max_new_tokens.div_ceil(len);
    for canvas_index in 0..canvases {
        let mut canvas = draws.noise(len, vocab);
        let mut argmax_canvas = canvas.clone();
        let mut self_cond: Option<Vec<f32>> = None;
        // The argmax canvases of the last `stability` steps (none yet: never equal).
        let mut history: Vec<Option<Vec<u32>>> = vec![None; p.stability];
        let mut steps = 0;
        for remaining in (1..=p.steps).rev() {
            steps += 1;
            let logits = model
                .denoise(b, kv, &canvas, pos, self_cond.as_deref(), &want)?
                .logits
                .ok_or_else(|| CanvasError::Params("the pass returned no logits".into()))?;
            let t = p.temperature(remaining);
            let tempered: Vec<f32> = logits.iter().map(|l| l / t).collect();
            let u = draws.uniforms(len);
            let (mut entropy, mut argmax, mut sampled) = (vec![], vec![], vec![]);
            for (row, &ui) in tempered.chunks(vocab).zip(&u) {
                let (h, a, s) = position_draw(row, ui);
                entropy.push(h);
                argmax.push(a);
                sampled.push(s);
            }
            let accept = accept_by_entropy(&entropy, p.entropy_bound);
            let noise = draws.noise(len, vocab);
            for i in 0..len {
                canvas[i] = if accept[i] { sampled[i] } else { noise[i] };
            }
            let stable = history.iter().all(|h| h.as_ref() == Some(&argmax));
            if p.stability > 0 {
                history.remove(0);
                history.push(Some(argmax.clone()));
            }
            let confident = entropy.iter().sum::<f32>() / (len as f32) < p.confidence;
            argmax_canvas = argmax;
            self_cond = Some(tempered);
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
        if eos_at.is_some() {
            out.finished = true;
            break;
        }
        // The committed canvas joins the cache (transformers encodes it when the next canvas
        // starts; after the last one there is none).
        if canvas_index + 1 < canvases {
            model.encode(b, kv, &argmax_canvas, pos, &ForwardRequest::default())?;
            pos += len;
        }
    }
    Ok(out)
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
