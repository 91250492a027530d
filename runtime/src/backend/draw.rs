//! The canvas sampler's per-position draw (DiffusionGemma, `decode::canvas`) on the host: the
//! reference the GPU's `canvas_draw` kernel (shaders/canvas_draw.wgsl) is held to, and what
//! [`super::Backend::canvas_head`]'s default computes.

/// One canvas position's draw from its tempered logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDraw {
    /// Entropy of the softmax, in nats.
    pub entropy: f32,
    /// The most likely token (the first of ties).
    pub argmax: u32,
    /// The token the position's uniform picks by inverse CDF.
    pub sampled: u32,
}

/// The settings of [`super::Backend::canvas_head`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CanvasHeadParams {
    /// Logits are capped as `cap · tanh(l / cap)` first (`None`: not capped).
    pub cap: Option<f32>,
    /// The capped logits are divided by it (the sampler's temperature of this step).
    pub temperature: f32,
    /// The soft embeddings are multiplied by it (the model's embedding scale).
    pub embed_scale: f32,
    /// Whether to compute the soft embeddings (the next step's input): not after a canvas's last
    /// allowed step.
    pub next_input: bool,
}

/// Entropy, argmax and the inverse-CDF token of tempered logits `[V]` for a uniform `u` in
/// [0, 1): the first token whose running sum of `exp(l − max)` exceeds `u` times their total
/// (the last token if rounding leaves none).
pub fn row_draw(logits: &[f32], u: f32) -> RowDraw {
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
    RowDraw {
        entropy,
        argmax,
        sampled,
    }
}
