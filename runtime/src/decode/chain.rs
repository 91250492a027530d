//! The block decoder's denoising steps chained on the device (issue 13 step 4): a block's canvas
//! lives where the backend computes ([`Backend::new_canvas`]), each step is a forward pass whose
//! statistics stay there and a commit op that writes the next pass's input ids
//! ([`Model::denoise_step`]), and several steps are recorded into one submission. The host reads
//! back only the canvas — its cells after each step of the submission — and replays those steps
//! through the same [`BlockCanvas`] bookkeeping as the host loop: canvas events, streaming of
//! committed tokens, the EOS / length / stop rules. The tokens are the host loop's, bit for bit:
//! the device applies the same rules to the same statistics (backend/gpu/ops/denoise.rs), and
//! every pass has the host loop's shape (decode/block.rs).
//!
//! What changes is when the host looks: committed tokens stream at the end of each submission and
//! cancellation is checked between submissions. A step on a finished block changes nothing, so
//! passes recorded past a block's end are wasted work, never wrong (the K/V they write is that of
//! the finished block, rewritten by the next block's fused clean pass before anything reads it —
//! which is why `reuse_last_kv` stays on the host). How many steps a submission records is an
//! estimate: the masked cells left over the tokens a step has committed on average so far in this
//! generation, at most the steps the block can still take (each commits at least one cell; fixed
//! steps: exactly its remaining steps, so that policy wastes nothing).
//!
//! Stays on the host: sampled decoding (its draws come from the host's seeded stream), credit
//! (a ledger and `powf` fusion whose last bits a GPU's `pow` need not match), next-token models
//! (their window changes shape as the block's first cell commits), batched passes (a batcher runs
//! them), exact expert paging (a pass reads routing back), and canvases the backend cannot hold
//! (more than 256 cells on the GPU).

use std::ops::Range;

use crate::backend::{Backend, CommitParams, CommitRule};
use crate::model::{DenoiseStep, ModelError, Window};

use super::denoise::BlockCanvas;
use super::{BlockOptions, DecodeError, PassBlocks, Prediction, Session};

/// Steps the first submission of a generation records, before any step has shown how many
/// tokens a step commits.
const FIRST_GUESS: usize = 4;

/// A generation whose block steps run chained on the device.
pub(super) struct Plan {
    rule: CommitRule,
    /// Cells committed and steps replayed so far in this generation (the rate estimate).
    committed: usize,
    steps: usize,
}

/// What [`Plan::run_block`] did.
pub(super) struct Done {
    /// Steps replayed (each one host step's worth).
    pub steps: usize,
}

impl Plan {
    /// The plan when `s` may chain its block steps ([`DeviceSteps`]), `None` for the host loop.
    pub fn new<B: Backend>(
        s: &Session<'_, B>,
        o: &BlockOptions,
        prediction: Prediction,
    ) -> Option<Plan> {
        let p = s.params;
        let (b, model) = s.passes.solo()?;
        let wanted = p.device_steps.wanted(b);
        let allowed = p.sampling.is_greedy()
            && prediction.masked() == Prediction::InPlace
            && !o.reuse_last_kv
            && model.chains_steps(b);
        let rule = p.policy.device_rule().filter(|_| wanted && allowed)?;
        Some(Plan {
            rule,
            committed: 0,
            steps: 0,
        })
    }

    /// Steps to record in the next submission for a block with `masked` cells left after
    /// `steps_done` steps.
    fn per_submission(&self, masked: usize, steps_done: usize) -> usize {
        let most = match self.rule {
            CommitRule::FixedSteps { steps } => masked.min(steps.saturating_sub(steps_done).max(1)),
            _ => masked,
        };
        let estimate = match self.committed {
            0 => FIRST_GUESS,
            c => (masked * self.steps).div_ceil(c),
        };
        estimate.clamp(1, most.max(1))
    }

    /// Runs the rest of `block` on the device, from the step the host loop would run next —
    /// `tokens` in `window`, statistics of `rows` (its fused clean pass included) — on; the steps
    /// after it run the block's cells alone, their ids read from the canvas. `None` (nothing run)
    /// when the backend cannot hold the block's canvas: the host loop goes on with it.
    pub fn run_block<B: Backend>(
        &mut self,
        s: &mut Session<'_, B>,
        block: &mut BlockCanvas,
        tokens: &[u32],
        window: Window,
        rows: Range<usize>,
        blocks: PassBlocks,
    ) -> Result<Option<Done>, DecodeError> {
        let mask = s.mask_id("block")?;
        let n = block.cells().len();
        let block_start = block.end() - n;
        let commit = CommitParams {
            rule: self.rule,
            mask,
            eos: s.special.eos.filter(|_| !s.params.ignore_eos),
            output_from: block.eos_from(),
            // The first row predicts the block's first masked cell (in place).
            stats_from: window.start + rows.start - block_start,
        };
        let (b, _) = s.passes.solo().expect("planned for passes run alone");
        let Ok(mut canvas) = b.new_canvas(block.cells(), mask) else {
            return Ok(None);
        };
        // The chained steps: the block alone against the exact cached prefix.
        let block_tokens: Vec<u32> = block.cells().iter().map(|c| c.unwrap_or(mask)).collect();
        let block_window = Window::block(block_start, n, window.mask);
        let block_rows = commit.stats_from..n;
        let (mut taken, mut replayed, mut going) = (0, 0, true);
        while going && !block.masked().is_empty() {
            // The caller checked before the first submission.
            if taken > 0 && !s.running() {
                break;
            }
            let k = self.per_submission(block.masked().len(), taken);
            let recorded = (|| -> Result<_, ModelError> {
                let (b, model) = s.passes.solo().expect("planned for passes run alone");
                for i in 0..k {
                    let first = taken == 0 && i == 0;
                    let (t, w, r) = if first {
                        (tokens, window, rows.clone())
                    } else {
                        (&block_tokens[..], block_window, block_rows.clone())
                    };
                    let step = DenoiseStep {
                        canvas: &mut canvas,
                        ids_from_canvas: (!first).then_some(0),
                        commit,
                    };
                    let routing = s.block_routing(blocks, w.start);
                    model.denoise_step(b, s.kv, t, w, r, routing, step)?;
                    s.forwards += 1;
                    s.positions += t.len();
                }
                Ok(b.read_canvas(&canvas, taken..taken + k)?)
            })();
            s.observer.pass_done();
            let state = recorded?;
            taken = state.steps;
            for cells in &state.history {
                let before = block.masked().len();
                going = block.replay_step(s, cells);
                replayed += 1;
                self.steps += 1;
                self.committed += before - block.masked().len();
                if !going {
                    break;
                }
            }
        }
        Ok(Some(Done { steps: replayed }))
    }
}
