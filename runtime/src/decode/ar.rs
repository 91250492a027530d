//! Autoregressive decoding, one token per forward pass: the baseline of every speedup figure
//! (DESIGN.md, "Decoding").
//!
//! The first pass runs the whole prompt (its last row gives the first token); each later pass
//! runs only the token just chosen against the exact causal cache. For an in-place model (LLaDA2)
//! the token is predicted by a mask appended after it: the pass is `[last token, mask]`, which
//! also writes the last token's exact K/V — still one pass per token.

use crate::backend::{AttnMask, Backend};
use crate::model::Window;

use super::{DecodeError, DecoderDetails, PassBlocks, Prediction, Session};

pub(super) fn run<B: Backend>(
    s: &mut Session<'_, B>,
    prompt: &[u32],
) -> Result<DecoderDetails, DecodeError> {
    let mask = match s.prediction().causal() {
        Prediction::NextToken => None,
        _ => Some(s.mask_id("ar")?),
    };
    let mut seq = prompt.to_vec();
    let mut clean_upto = 0;
    while seq.len() < s.end && s.running() {
        let mut tokens = seq[clean_upto..].to_vec();
        tokens.extend(mask);
        let len = tokens.len();
        let rows = s.forward(
            &tokens,
            Window::block(clean_upto, len, AttnMask::Causal),
            len - 1..len,
            PassBlocks::Exact,
        )?;
        clean_upto = seq.len();
        let sampling = s.params.sampling;
        let (token, _) = sampling.choose(&rows[0], &mut s.rng);
        seq.push(token);
        if !s.deliver(&[token]) {
            break;
        }
    }
    Ok(DecoderDetails::Ar)
}
