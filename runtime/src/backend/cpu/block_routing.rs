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
        .map(|m| keep_largest(m, blocks.experts))
        .collect()
}

/// The masks of an MLP router (ZAYA1's), `[blocks][classes]`, from its class probabilities
/// `probs` `[rows, classes]` (the softmax it chooses from before adding the balancing `bias`): a
/// token's mass is its probability of each routed expert the bias does not mask; the skip class
/// (the last) is no expert to keep resident and is never masked.
pub fn mlp_block_masks(
    probs: &[f32],
    classes: usize,
    bias: &[f32],
    blocks: &BlockRouting,
) -> Vec<Vec<f32>> {
    let experts = classes - 1;
    let rows = probs.len() / classes;
    let mut mass = vec![vec![0f32; experts]; blocks.blocks(rows)];
    for t in 0..rows {
        let Some(g) = blocks.block_of(t) else {
            continue;
        };
        for (e, m) in mass[g].iter_mut().enumerate() {
            if bias[e] > MASKED_BELOW {
                *m += probs[t * classes + e];
            }
        }
    }
    mass.iter()
        .map(|m| {
            let mut mask = keep_largest(m, blocks.experts);
            mask.push(0.0);
            mask
        })
        .collect()
}

/// 0 on the `keep` entries of largest mass, [`BLOCK_MASKED`] elsewhere; ranked by mass, ties to
/// the lower index (as every top-k here).
fn keep_largest(mass: &[f32], keep: usize) -> Vec<f32> {
    let mut order: Vec<usize> = (0..mass.len()).collect();
    order.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]).then(a.cmp(&b)));
    let mut mask = vec![BLOCK_MASKED; mass.len()];
    for &e in order.iter().take(keep) {
        mask[e] = 0.0;
    }
    mask
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
    fn an_mlp_router_block_keeps_experts_by_probability_and_never_masks_skip() {
        // Three experts + skip; expert 2 is pruned (bias -1e30) and must not be kept even with
        // the largest probability; rows 0-1 form the block.
        let probs = [
            0.1, 0.2, 0.6, 0.1, //
            0.3, 0.1, 0.5, 0.1,
        ];
        let bias = [0.0, 0.0, -1e30, 0.0];
        let m = mlp_block_masks(&probs, 4, &bias, &BlockRouting::tail(1, 0));
        assert_eq!(m, vec![vec![0.0, BLOCK_MASKED, BLOCK_MASKED, 0.0]]);
        let two = mlp_block_masks(&probs, 4, &bias, &BlockRouting::tail(2, 0));
        assert_eq!(two, vec![vec![0.0, 0.0, BLOCK_MASKED, 0.0]]);
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
