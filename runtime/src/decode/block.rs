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

use crate::backend::{AttnMask, Backend};
use crate::model::Window;

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
        loop {
            let masked = block.masked();
            if masked.is_empty() || !going || !s.running() {
                break;
            }
            let first_row = prediction.row_for(masked[0]);
            // NextToken may need nothing of the block itself (block size 1: only the last
            // committed token's row).
            let needs_block = masked.iter().any(|&j| prediction.row_for(j) >= block_start);
            let start = clean_upto.min(first_row);
            let window_end = if needs_block { block_end } else { block_start };
            let mut tokens = seq[start..block_start].to_vec();
            if needs_block {
                tokens.extend((block_start..block_end).map(|q| block.input(q, mask)));
            }
            let rows = s.forward(
                &tokens,
                Window::block(start, window_end - start, attn),
                first_row - start..window_end - start,
                PassBlocks::Aligned { size: b, origin: 0 },
            )?;
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
