// Block-level expert routing's mask (BlockRouting in runtime/src/backend/mod.rs; the CPU reference is
// backend/cpu/block_routing.rs): one workgroup of 64 per block of the pass. It sums its rows' router
// probability mass per expert, keeps the `keep` experts of largest mass (ties to the lower index)
// and writes the block's selection bias mask [blocks, E]: 0 on kept experts, -1e30 elsewhere. The
// route kernel (router.wgsl) adds row t's block mask to the selection bias.
//   softmax gating (0): a row's mass is softmax(logits + bias), what the router chooses from;
//   sigmoid gating (1): sigmoid(logits) normalised to sum 1 over the experts the bias does not mask
//     (bias > -1e29; a pruned expert's is -1e30);
//   MLP router (2, ZAYA1's; E = its classes, the last the skip class): softmax(logits) without the
//     bias (which it adds to the probabilities only to choose), over the routed experts the bias
//     does not mask; the skip class is no expert to keep and its mask is always 0.
// Rows: row t ≥ first_row is in block (t + phase) / size − (first_row + phase) / size, so block g
// holds rows [(base + g)·size − phase, (base + g + 1)·size − phase) ∩ [first_row, t) with
// base = (first_row + phase) / size. Lane l owns experts e ≡ l (mod 64): it accumulates their mass
// row by row (the row max and sum are workgroup reductions), then ranks each of them against all
// E (an expert is kept when fewer than `keep` beat it). E ≤ 1024.

#include "reduce"

struct BlockMaskParams {
    t: u32,
    ne: u32,
    gating: u32,
    has_bias: u32,
    keep: u32,
    first_row: u32,
    size: u32,
    phase: u32,
}

const MASKED: f32 = -1e30;
const MASKED_BELOW: f32 = -1e29;

@group(0) @binding(0) var<uniform> p: BlockMaskParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> mask_out: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;

var<workgroup> mass: array<f32, 1024>;

fn bias_of(e: u32) -> f32 {
    return select(0.0, bias[e], p.has_bias != 0u);
}

@compute @workgroup_size(64)
fn block_mask(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let g = wid.x;
    let lid = lane.id;
    let base = (p.first_row + p.phase) / p.size;
    // In phase-shifted coordinates first (no u32 underflow), then back to rows.
    let lo = max(p.first_row + p.phase, (base + g) * p.size) - p.phase;
    let hi = min(p.t + p.phase, (base + g + 1u) * p.size) - p.phase;
    for (var e = lid; e < p.ne; e += 64u) {
        mass[e] = 0.0;
    }
    for (var r = lo; r < hi; r++) {
        let row = r * p.ne;
        if (p.gating == 2u) {
            var lmax = neg_inf();
            for (var e = lid; e < p.ne; e += 64u) {
                lmax = max(lmax, logits[row + e]);
            }
            let mx = wg_max(lmax, lane);
            var sum = 0.0;
            for (var e = lid; e < p.ne; e += 64u) {
                sum += exp(logits[row + e] - mx);
            }
            let total = wg_sum(sum, lane);
            for (var e = lid; e + 1u < p.ne; e += 64u) {
                if (bias_of(e) > MASKED_BELOW) {
                    mass[e] += exp(logits[row + e] - mx) / total;
                }
            }
        } else if (p.gating == 0u) {
            var lmax = neg_inf();
            for (var e = lid; e < p.ne; e += 64u) {
                lmax = max(lmax, logits[row + e] + bias_of(e));
            }
            let mx = wg_max(lmax, lane);
            var sum = 0.0;
            for (var e = lid; e < p.ne; e += 64u) {
                sum += exp(logits[row + e] + bias_of(e) - mx);
            }
            let total = wg_sum(sum, lane);
            for (var e = lid; e < p.ne; e += 64u) {
                mass[e] += exp(logits[row + e] + bias_of(e) - mx) / total;
            }
        } else {
            var sum = 0.0;
            for (var e = lid; e < p.ne; e += 64u) {
                if (bias_of(e) > MASKED_BELOW) {
                    sum += 1.0 / (1.0 + exp(-logits[row + e]));
                }
            }
            let total = wg_sum(sum, lane);
            for (var e = lid; e < p.ne; e += 64u) {
                if (bias_of(e) > MASKED_BELOW) {
                    mass[e] += (1.0 / (1.0 + exp(-logits[row + e]))) / total;
                }
            }
        }
    }
    workgroupBarrier();
    // The classes that compete for the block's places: all of them, or the MLP router's experts.
    let ranked = select(p.ne, p.ne - 1u, p.gating == 2u);
    for (var e = lid; e < p.ne; e += 64u) {
        let v = mass[e];
        var rank = 0u;
        for (var o = 0u; o < ranked; o++) {
            let w = mass[o];
            if (w > v || (w == v && o < e)) {
                rank += 1u;
            }
        }
        mask_out[g * p.ne + e] = select(MASKED, 0.0, rank < p.keep || e >= ranked);
    }
}
