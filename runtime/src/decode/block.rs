//! Block diffusion for block-causal models (LLaDA2, SDAR; REFERENCES.md "Caches": committed
//! blocks are exact KV, one pass over the finished clean block writes it).
//!
//! Blocks of `B` positions are aligned to absolute position 0, as the model's `BlockCausal(B)`
//! mask is: when the prompt ends inside a block, that block is completed by generated tokens and
//! its prompt tokens are part of it. Each block starts all-mask and is denoised in steps; a step
//! runs the current block (kv_len = block end) against the exact cached prefix, and the commit
//! policy fills some of its masks.
//!
//! The clean pass over a finished block is fused into the next block's first step: the window
//! is `[finished block, clean | next block, masks]`. Under the block-causal mask the finished
//! block's queries see only themselves and the prefix, so their K/V are exactly what a separate
//! clean pass writes, and the next block sees them in the same pass. The prompt's prefill is
//! fused the same way. A block therefore costs its steps and nothing more; `reuse_last_kv` keeps
//! the K/V of the block's last step instead (approximate: written while masks were present).
//!
//! With [`super::Prediction::NextToken`], position j is predicted by row j − 1; the first position of a
//! block is then predicted by the last row of the previous block, which the fused pass computes
//! exactly. With block size 1 that makes every step one forward over the previous token: AR.
//!
//! Every step of a block asks for the statistics of the same rows — from the row that predicts
//! the block's first masked position (when the block began) to the block's end — so the steps
//! after the first have one shape: the block's tokens against the exact cached prefix. That is
//! what lets [`super::chain`] record them back to back on the device, and the LM head then
//! computes the same rows (with the same kernels) in both loops, so their tokens agree bit for bit.

use crate::backend::{AttnMask, Backend};
use crate::model::Window;

use super::chain;
use super::denoise::BlockCanvas;
use super::{BlockOptions, DecodeError, DecoderDetails, PassBlocks, Session};

pub(super) fn run<B: Backend>(
    s: &mut Session<'_, B>,
    prompt: &[u32],
    o: &BlockOptions,
) -> Result<DecoderDetails, DecodeError> {
    let b = o.block_size;
    let mask = s.mask_id("block")?;
    let attn = AttnMask::BlockCausal(b);
    let (p, end) = (prompt.len(), s.end);
    let prediction = s.prediction();
    // Committed tokens: the prompt, then each finished block.
    let mut seq = prompt.to_vec();
    // K/V of positions below this are exact.
    let mut clean_upto = 0;
    let mut block_start = p / b * b;
    let (mut blocks, mut steps) = (0, 0);
    let mut chained = chain::Plan::new(s, o, prediction);
    while block_start < end && s.running() {
        let block_end = (block_start + b).min(end);
        let mut block = BlockCanvas::new(
            block_start,
            block_end,
            &seq[block_start..],
            p,
            &s.params.policy,
        );
        blocks += 1;
        let mut block_kv_written = false;
        let mut going = true;
        let Some(&first_masked) = block.masked().first() else {
            break; // a block of prompt only cannot happen: it starts at or before the prompt's end
        };
        let first_row = prediction.row_for(first_masked);
        loop {
            let masked = block.masked();
            if masked.is_empty() || !going || !s.running() {
                break;
            }
            // NextToken may need nothing of the block itself (block size 1: only the last
            // committed token's row).
            let needs_block = masked.iter().any(|&j| prediction.row_for(j) >= block_start);
            let start = clean_upto.min(first_row);
            let window_end = if needs_block { block_end } else { block_start };
            let mut tokens = seq[start..block_start].to_vec();
            if needs_block {
                tokens.extend((block_start..block_end).map(|q| block.input(q, mask)));
            }
            let window = Window::block(start, window_end - start, attn);
            let rows = first_row - start..window_end - start;
            let blocks = PassBlocks::Aligned { size: b, origin: 0 };
            if let Some(plan) = chained.as_mut() {
                // The block's remaining steps on the device, from this one on.
                let run = plan.run_block(s, &mut block, &tokens, window, rows.clone(), blocks)?;
                if let Some(done) = run {
                    // Stopped or not, the session knows (finish is set when it stopped).
                    clean_upto = clean_upto.max(block_start);
                    block_kv_written = true;
                    steps += done.steps;
                    break;
                }
            }
            let rows = s.forward(&tokens, window, rows, blocks)?;
            clean_upto = clean_upto.max(block_start);
            block_kv_written = needs_block;
            steps += 1;
            let preds = masked
                .iter()
                .map(|&j| (j, rows[prediction.row_for(j) - first_row].clone()))
                .collect();
            going = block.commit_step(s, preds);
        }
        if !block.masked().is_empty() {
            break; // stopped mid-block
        }
        seq.extend_from_slice(&block.tokens(mask)[seq.len() - block_start..]);
        if o.reuse_last_kv && block_kv_written {
            clean_upto = block.end();
        }
        block_start = block_end;
    }
    Ok(DecoderDetails::Block { blocks, steps })
}
