// The core of the quant-group gemv kernels (gemv.wgsl dense, moe_gemv_q.wgsl routed experts): q4
// and q8 weights (WTYPE 3 / 2; lib/dequant.wgsl's file layout: codes in u32 words, then one f16
// scale per group of 32 along k) read as 16-byte vec4<u32>s, activations as vec4<f32>s.
//
// A workgroup of 64 is 4 weight rows × 16 lanes along k (the octet gemv's grid). An invocation
// takes one whole quant group per step (q4: one 16-byte vec4 load, q8: two) where the octet gemv
// takes one u32, four steps' loads issued before their arithmetic; a row's 16 lanes read
// neighbouring groups (256 contiguous bytes for q4), up to 4 activation rows at a time. Partial
// sums meet in `part` and are summed in lane order (row_sum). (4 rows per invocation sharing the
// activation loads measured 1.2–2× slower on the H200: a quarter of the workgroups, too few warps
// in flight per SM — docs/PERF.md.)
//
// Needs k % 32 == 0 and a matrix base on a 16-byte boundary (base % 4 == 0 words); scales may sit
// anywhere. The including kernel declares nothing of its own at bindings 1–3.

#include "half"

@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

override WTYPE: u32 = 3u;
const W_Q8: u32 = 2u;
const LANES: u32 = 16u;
const NO_ROW: u32 = 0xffffffffu;

// One quantized matrix of `w4`: codes from word `base` (a multiple of 4), scales from word
// `scales`, rows of k values, n rows.
struct QMat {
    base: u32,
    scales: u32,
    k: u32,
    n: u32,
}

// [workgroup row][lane] partial sums, one vec4 over the activation rows.
var<workgroup> part: array<vec4<f32>, 64>;

// The codes of one group: q4 in .a (four words), q8 in .a then .b (eight words), and its scale.
struct Group {
    a: vec4<u32>,
    b: vec4<u32>,
    s: f32,
}

fn group_scale(m: QMat, gi: u32) -> f32 {
    let word = m.scales + gi / 2u;
    return unpack_half2(w4[word / 4u][word % 4u])[gi & 1u];
}

fn load_group(m: QMat, row: u32, g: u32) -> Group {
    let gi = row * (m.k / 32u) + g;
    if (WTYPE == W_Q8) {
        let v = m.base / 4u + 2u * gi;
        return Group(w4[v], w4[v + 1u], group_scale(m, gi));
    }
    return Group(w4[m.base / 4u + gi], vec4<u32>(0u), group_scale(m, gi));
}

fn nib_lo(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>((vec4<u32>(w) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) - vec4<i32>(8));
}

fn nib_hi(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>((vec4<u32>(w) >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)) - vec4<i32>(8));
}

fn sext8x4(w: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(w << 24u, w << 16u, w << 8u, w));
    return vec4<f32>(v >> vec4<u32>(24u));
}

// Σ over the group of code · x times its scale; x from vec4 index xb (8 vec4s: 32 values).
fn group_dot(q: Group, xb: u32) -> f32 {
    var s = 0.0;
    if (WTYPE == W_Q8) {
        for (var i = 0u; i < 4u; i++) {
            s += dot(sext8x4(q.a[i]), x4[xb + i]) + dot(sext8x4(q.b[i]), x4[xb + 4u + i]);
        }
    } else {
        for (var i = 0u; i < 4u; i++) {
            s += dot(nib_lo(q.a[i]), x4[xb + 2u * i]) + dot(nib_hi(q.a[i]), x4[xb + 2u * i + 1u]);
        }
    }
    return s * q.s;
}

// This invocation's partial sums of weight row `row` (≥ m.n: none) against activation rows
// `xrows` ([_, m.k] f32; NO_ROW: none), over its groups (lane, lane + 16, …; four loaded before
// their arithmetic), into part[lid].
fn row_partial(m: QMat, row: u32, xrows: vec4<u32>, lid: u32) {
    let lane = lid % LANES;
    let groups = m.k / 32u;
    let ok = row < m.n;
    // A row out of range reads row 0; its sums are dropped.
    let r = select(0u, row, ok);
    let xq = m.k / 4u;
    var acc = vec4<f32>(0.0);
    var g = lane;
    for (; g + 3u * LANES < groups; g += 4u * LANES) {
        let q0 = load_group(m, r, g);
        let q1 = load_group(m, r, g + LANES);
        let q2 = load_group(m, r, g + 2u * LANES);
        let q3 = load_group(m, r, g + 3u * LANES);
        for (var t = 0u; t < 4u; t++) {
            if (xrows[t] != NO_ROW) {
                let xb = xrows[t] * xq + g * 8u;
                acc[t] += group_dot(q0, xb) + group_dot(q1, xb + LANES * 8u)
                    + group_dot(q2, xb + 2u * LANES * 8u) + group_dot(q3, xb + 3u * LANES * 8u);
            }
        }
    }
    for (; g < groups; g += LANES) {
        let q = load_group(m, r, g);
        for (var t = 0u; t < 4u; t++) {
            if (xrows[t] != NO_ROW) {
                acc[t] += group_dot(q, xrows[t] * xq + g * 8u);
            }
        }
    }
    part[lid] = select(vec4<f32>(0.0), acc, ok);
}

// Σ over the lanes of workgroup row j, in lane order.
fn row_sum(j: u32) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    for (var l = 0u; l < LANES; l++) {
        s += part[j * LANES + l];
    }
    return s;
}

// Weight row of invocation `lid` in a [gate; up] matrix (I = n / 2) whose workgroup serves
// columns c0, c0 + 1: workgroup rows gate c0, gate c0 + 1, up c0, up c0 + 1 (≥ n: none).
fn swiglu_row(c0: u32, n: u32, lid: u32) -> u32 {
    let j = lid / LANES;
    let c = c0 + (j & 1u);
    return select(n, select(n / 2u + c, c, j < 2u), c < n / 2u);
}

// silu(gate) · up of column c0 + j (j < 2) for activation row i, after swiglu_row's partials.
fn swiglu_out(j: u32, i: u32) -> f32 {
    let g = row_sum(j)[i];
    let u = row_sum(2u + j)[i];
    return g / (1.0 + exp(-g)) * u;
}
