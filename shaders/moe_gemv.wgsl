// The grouped SwiGLU experts of one MoE layer for few tokens per expert: GEMV-like and
// bandwidth-bound (the 1-token forward and blocks up to a few hundred tokens, where each routed
// expert serves a handful of tokens). y = x · Wᵀ per expert, weights W in file layout read through
// the slot table (expert → pool buffer, word offset; WTYPE / decode in lib/dequant.wgsl).
//
// Grid (direct): x = index into the layer's active-expert list (moe_dispatch, lib/moe_meta.wgsl;
// workgroups past the active count, or whose expert lives in another pool buffer than the one
// bound, return at once), y = ep.row_blocks blocks of 4 weight rows, worked in turn (1 by
// default: one block a workgroup). On the direct path (ep.direct: one token,
// every expert resident) there are no lists: x = assignment a, its expert route_meta[a] (the
// router's ids), its scratch row a. A workgroup of 4 · LANES gives each of its four weight rows
// LANES invocations (16; 32 in one-row passes where asked); an invocation walks its row one octet
// (8 values: one q4 word, two q8 words) at a time with a stride of LANES octets, so neighbouring invocations read neighbouring words and every
// weight word is read once per CHUNK_T tokens. The expert's tokens are taken CHUNK_T (1, 2, 4) at a
// time (registers a.x..a.w); more re-read the workgroup's rows from cache. The 16 partial sums of a row meet
// in shared memory, summed in lane order (the order of the dense gemv in matmul.wgsl).
// - expert_gate_up_gemv: rows gate c, gate c + 1, up c, up c + 1 of [gate; up] (2I rows), writes
//   h[slot, c] = silu(gate) · up for each of the expert's assignments (x rows: their tokens).
// - expert_down_gemv: rows n..n + 4 of down [H, I], writes y[slot, n] (x rows: h's slots).
// The shared expert rides along (ExpertParams.shared_x ≠ NONE): grid column shared_x computes it
// from its own weight binding `shared_w` for every token t, into rows assignments + t of h and y,
// so a layer with a shared expert needs no dense MLP dispatches of its own at these token counts.

#include "dequant"
#include "act_dot"
#include "moe_meta"
#include "gate_act"

@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> slots: array<u32>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<uniform> ep: ExpertParams;
@group(0) @binding(7) var<storage, read> shared_w: array<u32>;

const NONE: u32 = 0xffffffffu;
// Invocations a weight row (16, or 32 for one-row passes where KernelChoice::moe_gemv1_lanes asks:
// half the rounds of loads a lane, workgroups of 128); four rows a workgroup either way.
override LANES: u32 = 16u;
// Tokens a pass over the workgroup's rows (1, 2 or 4; ops/moe.rs sets it per pipeline). The
// registers are sized for CHUNK_T tokens' activations, so a pipeline for experts of one token each
// (the 1-token direct path) holds far fewer and more workgroups fit an SM; the sums are the same
// whatever it is (each token's own, octets in the same order).
override CHUNK_T: u32 = 4u;
// Octets whose loads a lane issues before their arithmetic (4 or 8; kernels::depth): more bytes in
// flight a round, more registers. Same sums (octets in the same order).
override DEPTH: u32 = 4u;

var<workgroup> part: array<vec4<f32>, 128>;
#include "expert_begin"

fn w_word(i: u32) -> u32 {
    if (is_shared) {
        return shared_w[i];
    }
    return w_words[i];
}

// Σ of octet k..k+8 of activation row r times q. A NONE row (padding of the pass's tokens)
// reads row 0: its component of the sums is never stored, and the loads sit in no branch
// (NVIDIA's compiler serializes loads under a per-lane test: attention's K/V loads ran 2.5x
// faster without theirs).
fn x_dot(r: u32, k: u32, q: Oct) -> f32 {
    return act_oct_dot(select(r, 0u, r == NONE), k, ep.k, q);
}

// x_dot of q with activation rows xr.x..xr.w (the first CHUNK_T of them; the rest are 0).
fn oct_dots(xr: vec4<u32>, k: u32, q: Oct) -> vec4<f32> {
    var d = vec4<f32>(0.0);
    d.x = x_dot(xr.x, k, q);
    if (CHUNK_T > 1u) {
        d.y = x_dot(xr.y, k, q);
    }
    if (CHUNK_T > 2u) {
        d.z = x_dot(xr.z, k, q);
        d.w = x_dot(xr.w, k, q);
    }
    return d;
}

// This invocation's partial dot products of weight row `row` (NONE: none) with activation rows
// xr.x..xr.w (NONE: padding), into part[lid]. Octets lane, lane + 16, … in ascending order; the
// main loop issues the loads of four octets before their arithmetic (memory-level parallelism).
fn row_partial(m: WMat, row: u32, xr: vec4<u32>, lane: u32, lid: u32) {
    var a = vec4<f32>(0.0);
    if (row != NONE) {
        let octs = (ep.k + 7u) / 8u;
        var o = lane;
        // DEPTH 8: eight octets' loads before their arithmetic (one round for a 1024-wide row).
        for (; DEPTH == 8u && o + 7u * LANES < octs; o += 8u * LANES) {
            let q0 = w_oct(m, row, o * 8u);
            let q1 = w_oct(m, row, (o + LANES) * 8u);
            let q2 = w_oct(m, row, (o + 2u * LANES) * 8u);
            let q3 = w_oct(m, row, (o + 3u * LANES) * 8u);
            let q4 = w_oct(m, row, (o + 4u * LANES) * 8u);
            let q5 = w_oct(m, row, (o + 5u * LANES) * 8u);
            let q6 = w_oct(m, row, (o + 6u * LANES) * 8u);
            let q7 = w_oct(m, row, (o + 7u * LANES) * 8u);
            a += oct_dots(xr, o * 8u, q0);
            a += oct_dots(xr, (o + LANES) * 8u, q1);
            a += oct_dots(xr, (o + 2u * LANES) * 8u, q2);
            a += oct_dots(xr, (o + 3u * LANES) * 8u, q3);
            a += oct_dots(xr, (o + 4u * LANES) * 8u, q4);
            a += oct_dots(xr, (o + 5u * LANES) * 8u, q5);
            a += oct_dots(xr, (o + 6u * LANES) * 8u, q6);
            a += oct_dots(xr, (o + 7u * LANES) * 8u, q7);
        }
        for (; o + 3u * LANES < octs; o += 4u * LANES) {
            let q0 = w_oct(m, row, o * 8u);
            let q1 = w_oct(m, row, (o + LANES) * 8u);
            let q2 = w_oct(m, row, (o + 2u * LANES) * 8u);
            let q3 = w_oct(m, row, (o + 3u * LANES) * 8u);
            a += oct_dots(xr, o * 8u, q0);
            a += oct_dots(xr, (o + LANES) * 8u, q1);
            a += oct_dots(xr, (o + 2u * LANES) * 8u, q2);
            a += oct_dots(xr, (o + 3u * LANES) * 8u, q3);
        }
        for (; o < octs; o += LANES) {
            a += oct_dots(xr, o * 8u, w_oct(m, row, o * 8u));
        }
    }
    part[lid] = a;
}

// Σ over the LANES invocations of workgroup row r, in lane order.
fn row_sum(r: u32) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    for (var l = 0u; l < LANES; l++) {
        s += part[r * LANES + l];
    }
    return s;
}

@compute @workgroup_size(4u * LANES)
fn expert_gate_up_gemv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let m = WMat(ex_base, ex_scales, ep.k);
    // Workgroup row j = lid / LANES: gate (j < 2) or up row of column c0 + (j & 1).
    let j = lid / LANES;
    let lane = lid % LANES;
    for (var rb = 0u; rb < ep.row_blocks; rb++) {
        let c0 = (wid.y * ep.row_blocks + rb) * 2u;
        if (c0 >= ep.n) {
            break;
        }
        let c = c0 + (j & 1u);
        let row = select(NONE, select(ep.n + c, c, j < 2u), c < ep.n);
        for (var t0 = 0u; t0 < cnt; t0 += CHUNK_T) {
            var xr = vec4<u32>(NONE);
            for (var i = 0u; i < CHUNK_T; i++) {
                if (t0 + i < cnt) {
                    xr[i] = expert_token(first, t0 + i);
                }
            }
            row_partial(m, row, xr, lane, lid);
            workgroupBarrier();
            if (lid < 2u * CHUNK_T) {
                let col = lid / CHUNK_T;
                let i = lid % CHUNK_T;
                let g = row_sum(col)[i];
                let u = row_sum(2u + col)[i];
                if (c0 + col < ep.n && t0 + i < cnt) {
                    out[(first + t0 + i) * ep.n + c0 + col] = gate_act(g) * u;
                }
            }
            workgroupBarrier();
        }
    }
}

@compute @workgroup_size(4u * LANES)
fn expert_down_gemv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let m = WMat(ex_base, ex_scales, ep.k);
    let lane = lid % LANES;
    for (var rb = 0u; rb < ep.row_blocks; rb++) {
        let n0 = (wid.y * ep.row_blocks + rb) * 4u;
        if (n0 >= ep.n) {
            break;
        }
        let n = n0 + lid / LANES;
        let row = select(NONE, n, n < ep.n);
        for (var t0 = 0u; t0 < cnt; t0 += CHUNK_T) {
            var xr = vec4<u32>(NONE);
            for (var i = 0u; i < CHUNK_T; i++) {
                if (t0 + i < cnt) {
                    xr[i] = first + t0 + i;
                }
            }
            row_partial(m, row, xr, lane, lid);
            workgroupBarrier();
            if (lid < 4u * CHUNK_T) {
                let r = lid / CHUNK_T;
                let i = lid % CHUNK_T;
                if (n0 + r < ep.n && t0 + i < cnt) {
                    out[(first + t0 + i) * ep.n + n0 + r] = row_sum(r)[i];
                }
            }
            workgroupBarrier();
        }
    }
}
