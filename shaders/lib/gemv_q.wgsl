// The core of the quant-group gemv kernels (gemv.wgsl dense, moe_gemv_q.wgsl routed experts): q4
// and q8 weights (WTYPE 3 / 2; lib/dequant.wgsl's file layout: codes in u32 words, then one f16
// scale per group of 32 along k) read as 16-byte vec4<u32>s, activations as vec4<f32>s.
//
// A workgroup of 64 is 4 row slots × 16 lanes along k. An invocation holds 4 weight rows and takes
// one whole quant group of each per step (q4: one vec4 load, q8: two), two steps' loads issued
// before their arithmetic; a row's 16 lanes read neighbouring groups (256 contiguous bytes for q4).
// The 4 rows share every activation load, up to 4 activation rows at a time. Partial sums meet in
// `part` and are summed in lane order (row_sum).
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
const RPT: u32 = 4u;
const NO_ROW: u32 = 0xffffffffu;

// One quantized matrix of `w4`: codes from word `base` (a multiple of 4), scales from word
// `scales`, rows of k values, n rows.
struct QMat {
    base: u32,
    scales: u32,
    k: u32,
    n: u32,
}

// [row slot · RPT + r][lane] partial sums, one vec4 over the activation rows.
var<workgroup> part: array<vec4<f32>, 256>;

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

// This invocation's partial sums of weight rows `rows` (≥ m.n: none) against activation rows
// `xrows` ([_, m.k] f32; NO_ROW: none), over its groups, into part.
fn rows_partial(m: QMat, rows: vec4<u32>, xrows: vec4<u32>, lid: u32) {
    let lane = lid % LANES;
    let groups = m.k / 32u;
    let ok = rows < vec4<u32>(m.n);
    // Rows out of range read row 0; their sums are dropped.
    let rr = select(vec4<u32>(0u), rows, ok);
    let xq = m.k / 4u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var g = lane;
    for (; g + LANES < groups; g += 2u * LANES) {
        var q0: array<Group, 4>;
        var q1: array<Group, 4>;
        for (var r = 0u; r < RPT; r++) {
            q0[r] = load_group(m, rr[r], g);
            q1[r] = load_group(m, rr[r], g + LANES);
        }
        for (var t = 0u; t < 4u; t++) {
            if (xrows[t] != NO_ROW) {
                let xb = xrows[t] * xq + g * 8u;
                for (var r = 0u; r < RPT; r++) {
                    acc[r][t] += group_dot(q0[r], xb) + group_dot(q1[r], xb + LANES * 8u);
                }
            }
        }
    }
    if (g < groups) {
        var q0: array<Group, 4>;
        for (var r = 0u; r < RPT; r++) {
            q0[r] = load_group(m, rr[r], g);
        }
        for (var t = 0u; t < 4u; t++) {
            if (xrows[t] != NO_ROW) {
                let xb = xrows[t] * xq + g * 8u;
                for (var r = 0u; r < RPT; r++) {
                    acc[r][t] += group_dot(q0[r], xb);
                }
            }
        }
    }
    let slot = lid / LANES;
    for (var r = 0u; r < RPT; r++) {
        part[(slot * RPT + r) * LANES + lane] = select(vec4<f32>(0.0), acc[r], ok[r]);
    }
}

// Σ over the lanes of workgroup row j (slot · RPT + r), in lane order.
fn row_sum(j: u32) -> vec4<f32> {
    var s = vec4<f32>(0.0);
    for (var l = 0u; l < LANES; l++) {
        s += part[j * LANES + l];
    }
    return s;
}

// Weight rows of a [gate; up] matrix (I = n / 2) for invocation `lid` whose workgroup serves the
// columns c0 .. c0 + 8: gate c, c + 1, up c, c + 1 with c = c0 + 2 · slot (≥ n: none).
fn swiglu_rows(c0: u32, n: u32, lid: u32) -> vec4<u32> {
    let inter = n / 2u;
    let c = c0 + (lid / LANES) * 2u;
    return vec4<u32>(
        select(n, c, c < inter),
        select(n, c + 1u, c + 1u < inter),
        select(n, inter + c, c < inter),
        select(n, inter + c + 1u, c + 1u < inter),
    );
}

// silu(gate) · up of column c0 + j (j < 8) for activation row i, after swiglu_rows' partials.
fn swiglu_out(j: u32, i: u32) -> f32 {
    let jr = (j / 2u) * RPT + j % 2u;
    let g = row_sum(jr)[i];
    let u = row_sum(jr + 2u)[i];
    return g / (1.0 + exp(-g)) * u;
}
