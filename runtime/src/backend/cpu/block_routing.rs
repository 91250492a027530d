//! Block-level expert routing on the CPU (the reference of shaders/router_blocks.wgsl): per block
//! of a pass, the router probability mass of its tokens summed per expert, the `experts` largest
//! kept, the rest masked in a selection bias that the ordinary top-k then adds. See
//! [`BlockRouting`] for the rule and what counts as mass.

use super::super::{BlockRouting, BLOCK_MASKED};
use crate::arch::Gating;

/// A selection bias at or below this masks an expert (pruning's −1e30): such an expert gets no
/// sigmoid mass, as it gets no softmax probability.
const MASKED_BELOW: f32 = -1e29;

/// One mask per block of the pass, `[blocks][experts]`: 0 on the block's experts, [`BLOCK_MASKED`]
/// elsewhere. `logits` are the router's `[rows, n]`; `bias` the selection bias the router adds.
pub fn block_masks(
    logits: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    gating: Gating,
    blocks: &BlockRouting,
) -> Vec<Vec<f32>> {
    let rows = logits.len() / n;
    let mut mass = vec![vec![0f32; n]; blocks.blocks(rows)];
    for t in 0..rows {
        let Some(g) = blocks.block_of(t) else {
            continue;
        };
        let row = &logits[t * n..(t + 1) * n];
        let b = |e: usize| bias.map_or(0.0, |b| b[e]);
        match gating {
            // The probabilities route_row chooses from: softmax(logits + bias).
            Gating::Softmax { .. } => {
                let d: Vec<f32> = (0..n).map(|e| row[e] + b(e)).collect();
                let max = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = d.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = exp.iter().sum();
                for (m, x) in mass[g].iter_mut().zip(&exp) {
                    *m += x / sum;
                }
            }
            Gating::SigmoidGrouped { .. } => {
                let s: Vec<f32> = (0..n)
                    .map(|e| {
                        if b(e) > MASKED_BELOW {
                            1.0 / (1.0 + (-row[e]).exp())
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let sum: f32 = s.iter().sum();
                for (m, x) in mass[g].iter_mut().zip(&s) {
                    *m += x / sum;
                }
            }
        }
    }
    mass.iter()
        .map(|m| {
            // Rank by mass, ties to the lower index (as every top-k here).
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| m[b].total_cmp(&m[a]).then(a.cmp(&b)));
            let mut mask = vec![BLOCK_MASKED; n];
            for &e in order.iter().take(blocks.experts) {
                mask[e] = 0.0;
            }
            mask
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_block_keeps_its_largest_mass() {
        // Two blocks of two rows: block 0 leans on experts 1 and 3, block 1 on 0 and 2.
        let logits = [
            0.0, 5.0, 0.0, 4.0, //
            0.0, 4.0, 0.0, 5.0, //
            5.0, 0.0, 4.0, 0.0, //
            4.0, 0.0, 5.0, 0.0,
        ];
        let b = BlockRouting::aligned(2, 0, 2, 0);
        let m = block_masks(&logits, 4, None, Gating::Softmax { renormalize: true }, &b);
        let kept = |mask: &Vec<f32>| (0..4).filter(|&e| mask[e] == 0.0).collect::<Vec<_>>();
        assert_eq!(m.len(), 2);
        assert_eq!(kept(&m[0]), vec![1, 3]);
        assert_eq!(kept(&m[1]), vec![0, 2]);
    }

    #[test]
    fn masked_experts_get_no_sigmoid_mass() {
        let logits = [3.0, 2.0, 1.0, 0.0];
        let bias = [-1e30, 0.0, 0.0, 0.0];
        let g = Gating::SigmoidGrouped {
            groups: 1,
            top_groups: 1,
            scale: 1.0,
            renormalize: true,
        };
        let m = block_masks(&logits, 4, Some(&bias), g, &BlockRouting::tail(2, 0));
        assert_eq!(m[0], vec![BLOCK_MASKED, 0.0, 0.0, BLOCK_MASKED]);
    }

    #[test]
    fn rows_before_the_first_row_are_in_no_block() {
        let b = BlockRouting::tail(4, 3);
        assert_eq!(b.block_of(2), None);
        assert_eq!(b.block_of(3), Some(0));
        assert_eq!(b.block_of(40), Some(0));
        assert_eq!(b.blocks(3), 0);
        assert_eq!(b.blocks(9), 1);
        // Blocks of 4 aligned to position 0, a pass starting at position 6: rows 0–1 finish the
        // block at 4, rows 2–5 are the next.
        let a = BlockRouting::aligned(4, 6, 4, 0);
        let of: Vec<_> = (0..7).map(|t| a.block_of(t).unwrap()).collect();
        assert_eq!(of, vec![0, 0, 1, 1, 1, 1, 2]);
        assert_eq!(a.blocks(7), 3);
        // Aligned to origin 5 instead (a bidirectional canvas after a 5-token prompt).
        let o = BlockRouting::aligned(4, 6, 4, 5);
        let of: Vec<_> = (0..5).map(|t| o.block_of(t).unwrap()).collect();
        assert_eq!(of, vec![0, 0, 0, 1, 1]);
    }
}
