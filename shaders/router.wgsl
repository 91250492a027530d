// The MoE router's selection, one workgroup of 64 per token, over logits [T, E] computed just before
// by the matmul family (gemv / gemm of matmul.wgsl: the router weight read by the whole GPU, not by
// one workgroup per token), then
//   softmax gating (0): p = softmax(logits + bias); choose the top_k p; weights p, optionally
//     renormalised to sum 1;
//   sigmoid grouped gating (1): s = sigmoid(logits); choose on s + bias, only inside the best
//     top_groups of `groups` groups (a group scores the sum of its two best; the others are −∞);
//     weights are the unbiased s, optionally renormalised (sum + 1e-20), times `scale`.
// Ties go to the lower index, as in the CPU reference. E ≤ 1024, groups ≤ 64, top_k ≤ 64.
// Layout: invocation l owns experts e ≡ l (mod 64); it loads four of them at a time (all loads
// issued together). A group's two best come from 64 / groups invocations each scanning a share of
// it, merged by one invocation per group; a group is kept when fewer than top_groups groups beat it.
// Selection without a barrier per pick: each selection part (lib/reduce_*: a subgroup, or the
// whole workgroup without subgroups) picks its own best L = min(top_k, its experts) in L rounds
// of a part argmax over each invocation's best not-yet-picked expert (a u32 key ordered like the
// f32 value, so the argmax is one integer max and one min), into a list in shared memory; after
// one barrier each listed candidate counts the candidates better than it — its rank, and the
// top_k are those of rank < top_k — and after another, invocation j writes pick j.
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
// What the selection chooses on (each invocation writes and reads only its own experts).
var<workgroup> choice: array<f32, 1024>;
// Each invocation's two best of its share of a group, then the group scores and kept flags.
var<workgroup> pair_sh: array<vec2<f32>, 64>;
var<workgroup> group_score: array<f32, 64>;
var<workgroup> keep_group: array<u32, 64>;
// The parts' lists of picks (key, expert), part · L + round.
var<workgroup> list_key: array<u32, 1024>;
var<workgroup> list_id: array<u32, 1024>;
var<workgroup> picked: array<u32, 64>;
var<workgroup> picked_w: array<f32, 64>;

// The selection bias of token t for expert e: the router's bias, plus the block's mask.
fn sel_bias(t: u32, e: u32) -> f32 {
    var b = 0.0;
    if (e >= p.ne) {
        return b;
    }
    if (p.has_bias != 0u) {
        b = bias[e];
    }
    if (p.block_size != 0u && t >= p.block_first) {
        let g = (t + p.block_phase) / p.block_size - (p.block_first + p.block_phase) / p.block_size;
        b += block_mask[g * p.ne + e];
    }
    return b;
}

fn logit(t: u32, e: u32) -> f32 {
    if (e >= p.ne) {
        return 0.0;
    }
    return logits[t * p.ne + e];
}

// An f32's place in the total order as a u32 (larger value, larger key; −0 is +0). Valid keys
// are > 0: 0 is "no expert".
fn okey(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let k = select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
    return select(k, 0x80000000u, b == 0x80000000u);
}

fn better(k: u32, i: u32, bk: u32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || k > bk || (k == bk && i < bi));
}

// Expert e's selection value, weight and the running max (softmax) of its owner.
fn put_value(e: u32, d: f32, sb: f32, sel: bool, lmax: ptr<function, f32>) {
    if (e >= p.ne) {
        return;
    }
    if (p.gating == 0u) {
        var x = d;
        if (sel) {
            x += sb;
        }
        *lmax = max(*lmax, x);
        weight_of[e] = x;
    } else {
        let s = 1.0 / (1.0 + exp(-d));
        weight_of[e] = s;
        choice[e] = select(s, s + sb, sel);
    }
}

struct Cand {
    k: u32,
    i: u32,
}

// (k, e) as c's new value if it is strictly behind (bk, bi) in (key desc, index asc) order and
// better than c.
fn consider(c: ptr<function, Cand>, k: u32, e: u32, bk: u32, bi: u32) {
    let behind = bi == NONE || k < bk || (k == bk && e > bi);
    if (e < p.ne && behind && better(k, e, (*c).k, (*c).i)) {
        *c = Cand(k, e);
    }
}

// The invocation's best expert strictly behind (bk, bi): the first four from registers, the
// rest (E > 256) from shared memory.
fn best_behind(lid: u32, keys: vec4<u32>, bk: u32, bi: u32) -> Cand {
    var c = Cand(0u, NONE);
    consider(&c, keys.x, lid, bk, bi);
    consider(&c, keys.y, lid + 64u, bk, bi);
    consider(&c, keys.z, lid + 128u, bk, bi);
    consider(&c, keys.w, lid + 192u, bk, bi);
    for (var e = lid + 256u; e < p.ne; e += 64u) {
        consider(&c, okey(choice[e]), e, bk, bi);
    }
    return c;
}

// Folds v into the two best (b.x ≥ b.y).
fn top2(b: vec2<f32>, v: f32) -> vec2<f32> {
    if (v > b.x) {
        return vec2<f32>(v, b.x);
    } else if (v > b.y) {
        return vec2<f32>(b.x, v);
    }
    return b;
}

@compute @workgroup_size(64)
fn route(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let lid = lane.id;
    let in_block = p.block_size != 0u && t >= p.block_first;
    let sel = p.has_bias != 0u || in_block;
    let top_groups = select(p.top_groups, p.block_top_groups, in_block);
    var lmax = neg_inf();
    for (var e0 = lid; e0 < p.ne; e0 += 256u) {
        let d = vec4<f32>(logit(t, e0), logit(t, e0 + 64u), logit(t, e0 + 128u), logit(t, e0 + 192u));
        var sb = vec4<f32>(0.0);
        if (sel) {
            sb = vec4<f32>(sel_bias(t, e0), sel_bias(t, e0 + 64u), sel_bias(t, e0 + 128u), sel_bias(t, e0 + 192u));
        }
        put_value(e0, d.x, sb.x, sel, &lmax);
        put_value(e0 + 64u, d.y, sb.y, sel, &lmax);
        put_value(e0 + 128u, d.z, sb.z, sel, &lmax);
        put_value(e0 + 192u, d.w, sb.w, sel, &lmax);
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
    } else {
        workgroupBarrier();
        let per = p.ne / p.groups;
        // q invocations a group, each scanning every q-th of its experts.
        let q = 64u / p.groups;
        let g = lid / q;
        let r = lid % q;
        var b = vec2<f32>(neg_inf());
        if (g < p.groups) {
            for (var e = g * per + r; e < (g + 1u) * per; e += q) {
                b = top2(b, choice[e]);
            }
        }
        pair_sh[lid] = b;
        workgroupBarrier();
        if (lid < p.groups) {
            var gb = vec2<f32>(neg_inf());
            for (var i = lid * q; i < (lid + 1u) * q; i++) {
                let o = pair_sh[i];
                gb = top2(top2(gb, o.x), o.y);
            }
            group_score[lid] = gb.x + gb.y;
        }
        workgroupBarrier();
        // A group is kept when fewer than top_groups groups beat it (ties: lower index) — the set
        // that top_groups iterated argmaxes pick.
        if (lid < p.groups) {
            let v = group_score[lid];
            var rank = 0u;
            for (var o = 0u; o < p.groups; o++) {
                let w = group_score[o];
                if (w > v || (w == v && o < lid)) {
                    rank += 1u;
                }
            }
            keep_group[lid] = select(0u, 1u, rank < top_groups);
        }
        workgroupBarrier();
        for (var e = lid; e < p.ne; e += 64u) {
            if (keep_group[e / per] == 0u) {
                choice[e] = neg_inf();
            }
        }
    }
    // Only this invocation's experts so far: no barrier before the rounds.
    var keys = vec4<u32>(0u);
    if (lid < p.ne) {
        keys.x = okey(choice[lid]);
    }
    if (lid + 64u < p.ne) {
        keys.y = okey(choice[lid + 64u]);
    }
    if (lid + 128u < p.ne) {
        keys.z = okey(choice[lid + 128u]);
    }
    if (lid + 192u < p.ne) {
        keys.w = okey(choice[lid + 192u]);
    }
    let parts = sel_parts(lane);
    let part = sel_part(lane);
    let len = min(p.top_k, (64u / parts) * ((p.ne + 63u) / 64u));
    var cur = best_behind(lid, keys, 0u, NONE);
    for (var j = 0u; j < len; j++) {
        let w = sel_argmax_key(cur.k, cur.i, lane);
        if (w != NONE && w == cur.i) {
            list_key[part * len + j] = cur.k;
            list_id[part * len + j] = w;
            cur = best_behind(lid, keys, cur.k, w);
        } else if (w == NONE && sel_lead(lane)) {
            list_id[part * len + j] = NONE;
        }
    }
    workgroupBarrier();
    let cands = parts * len;
    for (var c = lid; c < cands; c += 64u) {
        let i = list_id[c];
        if (i != NONE) {
            let k = list_key[c];
            var rank = 0u;
            for (var o = 0u; o < cands; o++) {
                if (better(list_key[o], list_id[o], k, i)) {
                    rank += 1u;
                }
            }
            if (rank < p.top_k) {
                picked[rank] = i;
                picked_w[rank] = weight_of[i];
            }
        }
    }
    workgroupBarrier();
    for (var j = lid; j < p.top_k; j += 64u) {
        var sum = 0.0;
        for (var i = 0u; i < p.top_k; i++) {
            sum += picked_w[i];
        }
        if (p.gating != 0u) {
            sum += 1e-20;
        }
        var w = picked_w[j];
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
