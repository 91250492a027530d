//! Bidirectional masked diffusion (LLaDA-style) with the generation length fixed up front.
//!
//! The canvas is the prompt followed by `max_new_tokens` masks, all attending to all. It is
//! denoised in blocks of `B` positions from the prompt's end (LLaDA's semi-autoregressive
//! schedule): a block's masks are filled by the commit policy before the next block starts.
//! Caches (REFERENCES.md "Caches", Fast-dLLM):
//! - [`BidirectionalCache::None`]: every step is a full pass;
//! - [`BidirectionalCache::Prefix`]: a full pass at each block start (also the block's first
//!   step), then steps run `[block | suffix]` and reuse the prefix K/V from that full pass;
//! - [`BidirectionalCache::Dual`]: steps run the block alone, with kv_len = canvas length: the
//!   suffix K/V of the block-start pass are frozen too. Fast-dLLM issues #11 and #52 report it is
//!   often slower in practice; it is here to measure.
//!
//! Cached K/V are approximate here (the prefix's keys depend on the suffix, which changes): that
//! is Fast-dLLM's bargain, not an exact cache.

use crate::backend::{AttnMask, Backend};
use crate::model::Window;

use super::denoise::BlockCanvas;
use super::{
    BidirectionalCache, BidirectionalOptions, DecodeError, DecoderDetails, PassBlocks, Session,
};

pub(super) fn run<B: Backend>(
    s: &mut Session<'_, B>,
    prompt: &[u32],
    o: &BidirectionalOptions,
) -> Result<DecoderDetails, DecodeError> {
    let mask = s.mask_id("bidirectional")?;
    let (p, total) = (prompt.len(), s.end);
    let prediction = s.prediction();
    let mut seq = prompt.to_vec();
    let (mut blocks, mut steps, mut full_passes) = (0, 0, 0);
    let mut block_start = p;
    while block_start < total && s.running() {
        let block_end = (block_start + o.block_size).min(total);
        let mut block = BlockCanvas::new(block_start, block_end, &[], p, &s.params.policy);
        blocks += 1;
        let mut block_steps = 0;
        let mut going = true;
        loop {
            let masked = block.masked();
            if masked.is_empty() || !going || !s.running() {
                break;
            }
            let first_row = prediction.row_for(masked[0]);
            let (start, window_end) = match (o.cache, block_steps) {
                (BidirectionalCache::None, _) | (_, 0) => (0, total),
                (BidirectionalCache::Prefix, _) => (block_start.min(first_row), total),
                (BidirectionalCache::Dual, _) => (block_start.min(first_row), block_end),
            };
            if start == 0 && window_end == total {
                full_passes += 1;
            }
            let tokens: Vec<u32> = (start..window_end)
                .map(|q| match q {
                    q if q < block_start => seq[q],
                    q if q < block_end => block.input(q, mask),
                    _ => mask,
                })
                .collect();
            let window = Window {
                start,
                kv_len: total,
                mask: AttnMask::Bidirectional,
            };
            let blocks = PassBlocks::Aligned {
                size: o.block_size,
                origin: p,
            };
            let rows = s.forward(
                &tokens,
                window,
                first_row - start..block_end - start,
                blocks,
            )?;
            block_steps += 1;
            steps += 1;
            let preds = masked
                .iter()
                .map(|&j| (j, rows[prediction.row_for(j) - first_row].clone()))
                .collect();
            going = block.commit_step(s, preds);
        }
        if !block.masked().is_empty() {
            break;
        }
        seq.extend(block.tokens(mask));
        block_start = block_end;
    }
    Ok(DecoderDetails::Bidirectional {
        blocks,
        steps,
        full_passes,
    })
}
