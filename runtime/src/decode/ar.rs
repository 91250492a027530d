//! Autoregressive decoding, one token per forward pass: the baseline of every speedup figure
//! (DESIGN.md, "Decoding").
//!
//! The first pass runs the whole prompt (its last row gives the first token); each later pass
//! runs only the token just chosen against the exact causal cache. For an in-place model (LLaDA2)
//! the token is predicted by a mask appended after it: the pass is `[last token, mask]`, which
//! also writes the last token's exact K/V — still one pass per token.
//!
//! Chained on the device (issue 13), as the block decoder's steps are (decode/chain.rs): one pass
//! per token still, but several recorded into one submission, so the host's round trip no longer
//! bounds tokens/s. A submission owns a canvas of `1 + K` cells ([`Backend::new_canvas`]): cell 0
//! the last committed token, cell `j` the token at the position `j` after it. Step 0 is the pass
//! the host loop would run next (host tokens: the prompt at first); step `i ≥ 1` embeds the
//! canvas's cells from `i` on ([`DenoiseStep::ids_from_canvas`]) — `[cell i, cell i + 1]`, the
//! latter still masked, for an in-place model; `[cell i]` for a next-token one — and every step's
//! commit ([`CommitRule::Next`]) writes the greedy token of its last row into cell `i + 1`, the
//! next step's input. The host reads the canvas's history back once per submission and delivers
//! the tokens one step at a time through the host loop's bookkeeping (EOS, length, stop strings),
//! so the tokens are the host loop's, bit for bit: every pass has the host loop's shape and the
//! commit is its greedy choice on the same statistics. Committed tokens stream, and cancellation is
//! checked, between submissions.
//!
//! The cache is the host loop's too: each step writes the exact K/V of its position (and an
//! in-place pass the mask's after it, rewritten by the next step), so between submissions the
//! next one's first pass starts where the host loop's next pass would. When EOS or a stop ends
//! generation mid-submission, the passes recorded after it have also written K/V from the last
//! token's position on, where the host loop left a mask's or nothing; nothing reads them (a
//! generation rewrites its cache from position 0).
//!
//! Batched (a server's sequences, crate::batch): after its prompt's pass, a sequence hands the
//! batcher chains of steps ([`ArChain`]: the same canvas, and step 0 too embeds from it — cells 0
//! and 1 are `[last token, mask]`, the host loop's next pass), and the batcher records step `i` of
//! every chain in its batch as one batched pass, all steps in one submission: each row as its pass
//! alone computes it, so the tokens are still the host loop's. Chains there stay short
//! ([`BATCHED_MOST_STEPS`]): a request that arrives meanwhile waits for the chain to end before its
//! prompt's pass runs.
//!
//! Stays on the host: sampled decoding (its draws come from the host's seeded stream), exact
//! expert paging (a pass reads routing back), and a canvas the backend cannot hold.

use crate::backend::{AttnMask, Backend, BackendError, CommitParams, CommitRule};
use crate::model::{DenoiseStep, ModelError, Window};

use super::{ArChain, DecodeError, DecoderDetails, PassBlocks, Prediction, Session};

/// Steps (tokens) of the chained submissions: the first records one, so the first token streams
/// as soon as the host loop's would (an H100 measured 63-79 ms to the first token on the host
/// loop and 193-200 ms with a first submission of 8 steps, LLaDA2.0-mini shape); the second
/// [`FIRST_STEPS`], each later one twice the one before, up to [`MOST_STEPS`]. Steps recorded
/// past EOS or a stop string are wasted passes, never wrong tokens (EOS fills the canvas and later
/// steps change nothing; tokens past a stop are never delivered): starting small bounds the waste
/// of short answers, doubling lets a long generation pay its host round trip once per many tokens.
const FIRST_STEPS: usize = 8;
const MOST_STEPS: usize = 64;
/// The most steps of a batched chain: every sequence of the batch waits for its longest chain,
/// and so does a request that arrives meanwhile (its prompt's pass runs between chains).
/// `EDGEDIFF_BATCH_CHAIN_STEPS=<n>` (1–64) sets it for benchmarks.
const BATCHED_MOST_STEPS: usize = 16;

fn batched_most_steps() -> usize {
    static STEPS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *STEPS.get_or_init(|| {
        std::env::var("EDGEDIFF_BATCH_CHAIN_STEPS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=MOST_STEPS).contains(n))
            .unwrap_or(BATCHED_MOST_STEPS)
    })
}

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
    // Steps of the next chained submission; `None`: the host loop.
    let mut chained = chains(s).then_some(1);
    // Steps of the next batched chain; `None`: passes one by one through the batcher.
    let mut batched =
        (chained.is_none() && chains_batched(s)).then_some(FIRST_STEPS.min(batched_most_steps()));
    while seq.len() < s.end && s.running() {
        // After the prompt's pass: the next pass is [last token (+ mask)], a chain's step 0.
        if let (Some(k), true) = (batched, clean_upto + 1 == seq.len()) {
            let chain = ArChain {
                at: clean_upto,
                last: seq[clean_upto],
                mask,
                steps: k.min(s.end - seq.len()),
                eos: s.special.eos.filter(|_| !s.params.ignore_eos),
            };
            let out = s.passes.run_chain(s.kv, &chain);
            s.observer.pass_done();
            let state = out?;
            s.forwards += chain.steps;
            s.positions += chain.steps * chain.width();
            if !deliver_history(s, &state, &mut seq, &mut clean_upto)? {
                break;
            }
            batched = Some((2 * k).min(batched_most_steps()));
            continue;
        }
        let mut tokens = seq[clean_upto..].to_vec();
        tokens.extend(mask);
        let len = tokens.len();
        let window = Window::block(clean_upto, len, AttnMask::Causal);
        if let Some(k) = chained {
            let steps = k.min(s.end - seq.len());
            let run = Chain {
                tokens: &tokens,
                window,
                mask,
                steps,
            };
            match run.submit(s, &mut seq, &mut clean_upto)? {
                Some(true) => {
                    chained = Some((2 * k).clamp(FIRST_STEPS, MOST_STEPS));
                    continue;
                }
                Some(false) => break,
                // The backend cannot hold the canvas: this pass and the rest on the host.
                None => chained = None,
            }
        }
        let rows = s.forward(&tokens, window, len - 1..len, PassBlocks::Exact)?;
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

/// Whether `s` chains its passes on the device: as the block decoder's [`super::chain::Plan`]
/// decides, less what concerns blocks.
fn chains<B: Backend>(s: &Session<'_, B>) -> bool {
    let Some((b, model)) = s.passes.solo() else {
        return false;
    };
    s.params.device_steps.wanted(b) && s.params.sampling.is_greedy() && model.chains_steps(b)
}

/// Whether `s`'s batcher chains its steps ([`super::PassRunner::chains_batched`]): greedy only,
/// as [`chains`].
fn chains_batched<B: Backend>(s: &Session<'_, B>) -> bool {
    s.params.sampling.is_greedy() && s.passes.chains_batched(s.params.device_steps)
}

/// Delivers the tokens of a chain's steps one at a time through the host loop's bookkeeping,
/// leaving `seq` and `clean_upto` as the host loop leaves them after as many passes: whether
/// generation goes on.
fn deliver_history<B: Backend>(
    s: &mut Session<'_, B>,
    state: &crate::backend::CanvasState,
    seq: &mut Vec<u32>,
    clean_upto: &mut usize,
) -> Result<bool, DecodeError> {
    // Steps after the canvas filled with EOS left no history: the EOS before them ends it.
    for (i, cells) in state.history.iter().enumerate() {
        let Some(&Some(token)) = cells.get(i + 1) else {
            let detail = format!("AR step {i} left cell {} masked", i + 1);
            let e = BackendError::Shape {
                op: "commit_step",
                detail,
            };
            return Err(ModelError::from(e).into());
        };
        // The host loop's state after this step's pass: K/V exact below the token's
        // position; the next pass — this submission's next step, or the next submission's
        // first — rewrites from there, the mask position an in-place pass wrote included.
        *clean_upto = seq.len();
        seq.push(token);
        if !s.deliver(&[token]) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One chained submission: its first pass over the host loop's next `tokens` in `window`, and
/// `steps` passes in all (each one token).
struct Chain<'t> {
    tokens: &'t [u32],
    window: Window,
    mask: Option<u32>,
    steps: usize,
}

impl Chain<'_> {
    /// Records and runs the submission, then delivers its tokens, leaving `seq` and `clean_upto`
    /// as the host loop leaves them after as many passes: whether generation goes on, `None`
    /// (nothing run) when the backend cannot hold the canvas.
    fn submit<B: Backend>(
        &self,
        s: &mut Session<'_, B>,
        seq: &mut Vec<u32>,
        clean_upto: &mut usize,
    ) -> Result<Option<bool>, DecodeError> {
        let k = self.steps;
        // Cell j sits at position `at + j`.
        let at = seq.len() - 1;
        // A next-token pass embeds known cells only (step i: cell i, committed by step i − 1), so
        // the id a masked cell would be embedded with is never read there.
        let mask = self.mask.unwrap_or(0);
        let mut cells = vec![None; k + 1];
        cells[0] = seq.last().copied();
        let (b, _) = s.passes.solo().expect("chained only for passes run alone");
        let Ok(mut canvas) = b.new_canvas(&cells, mask) else {
            return Ok(None);
        };
        let eos = s.special.eos.filter(|_| !s.params.ignore_eos);
        // The chained passes' host tokens give only their count (their ids come from the canvas).
        let width = 1 + usize::from(self.mask.is_some());
        let count = vec![mask; width];
        let recorded = (|| -> Result<_, ModelError> {
            let (b, model) = s.passes.solo().expect("chained only for passes run alone");
            for i in 0..k {
                let (tokens, window, ids_from_canvas) = match i {
                    0 => (self.tokens, self.window, None),
                    _ => (
                        &count[..],
                        Window::block(at + i, width, AttnMask::Causal),
                        Some(i),
                    ),
                };
                let step = DenoiseStep {
                    canvas: &mut canvas,
                    ids_from_canvas,
                    commit: CommitParams {
                        rule: CommitRule::Next,
                        mask,
                        eos,
                        // Cell 0 was delivered (or is the prompt's): never output.
                        output_from: 1,
                        stats_from: i + 1,
                    },
                };
                let len = tokens.len();
                let routing = s.block_routing(PassBlocks::Exact, window.start);
                model.denoise_step(b, s.kv, tokens, window, len - 1..len, routing, step)?;
                s.forwards += 1;
                s.positions += len;
            }
            Ok(b.read_canvas(&canvas, 0..k)?)
        })();
        s.observer.pass_done();
        let state = recorded?;
        Ok(Some(deliver_history(s, &state, seq, clean_upto)?))
    }
}
