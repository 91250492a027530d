// The MoE router's selection, one workgroup of 64 per token, over logits [T, E] computed just before
// by the matmul family (gemv / gemm of matmul.wgsl: the router weight read by the whole GPU, not by
// one workgroup per token), then
//   softmax gating (0): p = softmax(logits + bias); choose the top_k p; weights p, optionally
//     renormalised to sum 1;
//   sigmoid grouped gating (1): s = sigmoid(logits); choose on s + bias, only inside the best
//     top_groups of `groups` groups (a group scores the sum of its two best; the others are −∞);
//     weights are the unbiased s, optionally renormalised (sum + 1e-20), times `scale`.
// Ties go to the lower index, as in the CPU reference. The top_k experts are iterated workgroup
// argmaxes (wg_argmax of lib/reduce_*: subgroup max/min where available), pick j the best behind
// pick j − 1, so nothing is re-marked between picks; the kept groups are those with fewer than
// top_groups better groups (each group's rank counted by one invocation). E ≤ 1024, top_k ≤ 64.
// Block-level routing (block_size > 0): row t ≥ block_first also adds its block's mask row
// (router_blocks.wgsl, [blocks, E]; block (t + block_phase) / block_size − (block_first +
// block_phase) / block_size) to the selection bias, and keeps block_top_groups groups.

#include "reduce"

struct RouterParams {
    t: u32,
    ne: u32,
    top_k: u32,
    gating: u32,
    renorm: u32,
    has_bias: u32,
    groups: u32,
    top_groups: u32,
    scale: f32,
    block_size: u32,
    block_phase: u32,
    block_first: u32,
    block_top_groups: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const MAX_E: u32 = 1024u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: RouterParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> block_mask: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> ids_out: array<u32>;
@group(0) @binding(5) var<storage, read_write> weights_out: array<f32>;

var<workgroup> weight_of: array<f32, 1024>;
// What the top-k selections choose on: experts at [0, E), group scores at [GROUPS, GROUPS + groups).
var<workgroup> choice: array<f32, 2048>;
const GROUPS: u32 = 1024u;
var<workgroup> picked: array<u32, 64>;
var<workgroup> keep_group: array<u32, 1024>;

// The selection bias of token t for expert e: the router's bias, plus the block's mask.
fn sel_bias(t: u32, e: u32) -> f32 {
    var b = 0.0;
    if (p.has_bias != 0u) {
        b = bias[e];
    }
    if (p.block_size != 0u && t >= p.block_first) {
        let g = (t + p.block_phase) / p.block_size - (p.block_first + p.block_phase) / p.block_size;
        b += block_mask[g * p.ne + e];
    }
    return b;
}

fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}

@compute @workgroup_size(64)
fn route(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let lid = lane.id;
    let in_block = p.block_size != 0u && t >= p.block_first;
    let sel = p.has_bias != 0u || in_block;
    let top_groups = select(p.top_groups, p.block_top_groups, in_block);
    var lmax = neg_inf();
    for (var e = lid; e < p.ne; e += 64u) {
        var d = logits[t * p.ne + e];
        if (p.gating == 0u) {
            if (sel) {
                d += sel_bias(t, e);
            }
            lmax = max(lmax, d);
            weight_of[e] = d;
        } else {
            let s = 1.0 / (1.0 + exp(-d));
            weight_of[e] = s;
            choice[e] = select(s, s + sel_bias(t, e), sel);
        }
    }
    if (p.gating == 0u) {
        let mx = wg_max(lmax, lane);
        var sum = 0.0;
        for (var e = lid; e < p.ne; e += 64u) {
            let x = exp(weight_of[e] - mx);
            weight_of[e] = x;
            sum += x;
        }
        let total = wg_sum(sum, lane);
        for (var e = lid; e < p.ne; e += 64u) {
            let pr = weight_of[e] / total;
            weight_of[e] = pr;
            choice[e] = pr;
        }
        workgroupBarrier();
    } else {
        workgroupBarrier();
        let per = p.ne / p.groups;
        for (var g = lid; g < p.groups; g += 64u) {
            var b1 = neg_inf();
            var b2 = neg_inf();
            for (var e = g * per; e < (g + 1u) * per; e++) {
                let v = choice[e];
                if (v > b1) {
                    b2 = b1;
                    b1 = v;
                } else if (v > b2) {
                    b2 = v;
                }
            }
            choice[GROUPS + g] = b1 + b2;
        }
        workgroupBarrier();
        // A group is kept when fewer than top_groups groups beat it (ties: lower index) — the set
        // that top_groups iterated argmaxes pick.
        for (var g = lid; g < p.groups; g += 64u) {
            let v = choice[GROUPS + g];
            var rank = 0u;
            for (var o = 0u; o < p.groups; o++) {
                if (better(choice[GROUPS + o], o, v, g)) {
                    rank += 1u;
                }
            }
            keep_group[g] = select(0u, 1u, rank < top_groups);
        }
        workgroupBarrier();
        // Each invocation masks only the experts it scans below (e ≡ lid mod 64).
        for (var e = lid; e < p.ne; e += 64u) {
            if (keep_group[e / per] == 0u) {
                choice[e] = neg_inf();
            }
        }
    }
    // The j-th pick is the best expert strictly behind pick j − 1 in (value desc, index asc) order:
    // nothing is marked, so each step is one workgroup argmax.
    var pv = 0.0;
    var pi = NONE;
    for (var j = 0u; j < p.top_k; j++) {
        var bv = 0.0;
        var bi = NONE;
        for (var e = lid; e < p.ne; e += 64u) {
            let v = choice[e];
            let behind = pi == NONE || v < pv || (v == pv && e > pi);
            if (behind && better(v, e, bv, bi)) {
                bv = v;
                bi = e;
            }
        }
        let e = wg_argmax(bv, bi, lane);
        if (lid == 0u) {
            picked[j] = e;
        }
        pi = e;
        pv = choice[e];
    }
    workgroupBarrier();
    if (lid == 0u) {
        var sum = 0.0;
        for (var j = 0u; j < p.top_k; j++) {
            sum += weight_of[picked[j]];
        }
        if (p.gating != 0u) {
            sum += 1e-20;
        }
        for (var j = 0u; j < p.top_k; j++) {
            var w = weight_of[picked[j]];
            if (p.renorm != 0u) {
                w /= sum;
            }
            if (p.gating != 0u) {
                w *= p.scale;
            }
            ids_out[t * p.top_k + j] = picked[j];
            weights_out[t * p.top_k + j] = w;
        }
    }
}
