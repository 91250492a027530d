// y = x · Wᵀ for few activation rows (1–16), weights W [n, k] in file layout (f32, f16, q8, q4;
// override WTYPE, see lib/dequant.wgsl) dequantized in the inner loop; x [t, k] and y f32.
// Bandwidth-bound: the 1-token forward and blocks whose weights stay in L2 (ops/matmul.rs decides).
//
// - gemv: a workgroup of 64 owns 64 / L weight rows with L = p.lanes invocations each (16, or 32
//   or 64 for a single activation row: one round of loads a lane instead of four on a 2048-wide
//   row; 0 reads as 16) and one block of up to 4 activation rows (workgroup z); an invocation walks its
//   row 8 values (one q4 word) at a time with a stride of L octets, so neighbours read
//   neighbouring words (for one activation row, four octets' loads ahead of their arithmetic);
//   partial sums meet in shared memory, summed in lane order — the same sums whatever rows share
//   the block. Token blocks re-read the weights from L2, but the grid (n·L/64 × t/4 workgroups)
//   fills the GPU, where 16 × 64 tiles would leave most of it idle for 16 tokens. The host may cap
//   the grid's row groups (KernelChoice::gemv_max_groups): a workgroup then works every
//   (x · y)-th group in turn, the same sums, so a large matrix (the LM head: 39,296 groups at one
//   row) is not tens of thousands of workgroups that each live for one round of loads.
// - gemv_swiglu: gemv over a dense MLP's fused [gate; up] weight, writing silu(gate) · up (16
//   lanes a row).
// Activations are bound as vec4s (lib/act_dot.wgsl says why); output rows may be a column range of
// a wider matrix (out_stride, out_col0).
// Fusions (p.mode, lib/matmul_params.wgsl; ops/residual.rs): MODE_NORM (gemv, gemv_swiglu) reads
// the activation rows RMS-normed with norm_w — a row's lanes together read all of it, so each lane
// also sums its values' squares and the row's result is inv_rms · Σ w · (x · norm_w), the squares'
// partials added in lane order like the dot products' (k a multiple of 8, ops/matmul.rs checks);
// MODE_ACCUM (gemv) adds the result to `out` (the residual stream: the o projection's
// x += o · W). Together they take the place of a layer's add_rms_norm dispatches.

#include "matmul_params"
#include "act_dot"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// MODE_NORM's weight (k values; a dummy otherwise).
@group(0) @binding(4) var<storage, read> norm_w: array<vec4<f32>>;

fn w_word(i: u32) -> u32 {
    return w_words[i];
}

const GEMV_T: u32 = 4u;
// Activation rows a workgroup's registers serve (4; 1 or 2 for a pass of that many rows:
// ops/matmul.rs sets it per pipeline, kernels::chunk_t); the block (GEMV_T rows, workgroup z) is
// the same. The sums are
// the same either way: only the pipeline's register count changes.
override CHUNK_T: u32 = 4u;
// Octets a lane loads before their arithmetic at one activation row (4 or 8; kernels::depth).
override DEPTH: u32 = 4u;

var<workgroup> gemv_part: array<f32, 256>;
// MODE_NORM: the lanes' partial sums of squares, laid out as gemv_part.
var<workgroup> gemv_ssp: array<f32, 256>;

// MODE_NORM: this invocation's Σ x² of the block's activation rows (component t: row blk_x0 + t).
var<private> nss: vec4<f32>;
var<private> blk_x0: u32;

fn x_oct_dot(r: u32, k: u32, q: Oct) -> f32 {
    if ((p.mode & MODE_NORM) == 0u) {
        return act_oct_dot(r, k, p.k, q);
    }
    let b = (r * p.k + k) >> 2u;
    let lo = x_act[b];
    let hi = x_act[b + 1u];
    let g = k >> 2u;
    let t = r - blk_x0;
    let sq = dot(lo, lo) + dot(hi, hi);
    nss += select(vec4<f32>(0.0), vec4<f32>(sq), vec4<u32>(t) == vec4<u32>(0u, 1u, 2u, 3u));
    return dot(q.lo, lo * norm_w[g]) + dot(q.hi, hi * norm_w[g + 1u]);
}

// MODE_NORM: 1 / rms of block row t from the `lanes` partials of workgroup row r (lane order);
// 1 otherwise.
fn gemv_inv_rms(r: u32, t: u32, lanes: u32) -> f32 {
    if ((p.mode & MODE_NORM) == 0u) {
        return 1.0;
    }
    var s = 0.0;
    for (var l = 0u; l < lanes; l++) {
        s += gemv_ssp[t * 64u + r * lanes + l];
    }
    return 1.0 / sqrt(s / f32(p.k) + p.norm_eps);
}

// Writes (MODE_ACCUM: adds) one result.
fn gemv_store(i: u32, v: f32) {
    if ((p.mode & MODE_ACCUM) != 0u) {
        out[i] = out[i] + v;
    } else {
        out[i] = v;
    }
}

// Invocations per weight row.
fn gemv_lanes() -> u32 {
    return select(16u, p.lanes, p.lanes != 0u);
}

// This invocation's partial dot products of weight row `row` (≥ p.n: none) with the block's
// activation rows t0 .. t0 + nt, walking octets lane, lane + L, … (L = `lanes`), into
// gemv_part[t · 64 + lid].
fn gemv_partial(row: u32, lid: u32, t0: u32, nt: u32, lanes: u32) {
    let lane = lid % lanes;
    let m = WMat(0u, p.scales, p.k);
    var a = vec4<f32>(0.0);
    nss = vec4<f32>(0.0);
    blk_x0 = p.x_row0 + t0;
    if (row < p.n) {
        let octs = (p.k + 7u) / 8u;
        let xr = p.x_row0 + t0;
        var o = lane;
        // One activation row (the 1-token forward): four octets' loads before their arithmetic
        // (memory-level parallelism; same order). Token blocks keep the plain loop, which measured
        // faster for them (H200: 4–16 tokens).
        for (; nt == 1u && DEPTH == 8u && o + 7u * lanes < octs; o += 8u * lanes) {
            let q0 = w_oct(m, row, o * 8u);
            let q1 = w_oct(m, row, (o + lanes) * 8u);
            let q2 = w_oct(m, row, (o + 2u * lanes) * 8u);
            let q3 = w_oct(m, row, (o + 3u * lanes) * 8u);
            let q4 = w_oct(m, row, (o + 4u * lanes) * 8u);
            let q5 = w_oct(m, row, (o + 5u * lanes) * 8u);
            let q6 = w_oct(m, row, (o + 6u * lanes) * 8u);
            let q7 = w_oct(m, row, (o + 7u * lanes) * 8u);
            a.x += x_oct_dot(xr, o * 8u, q0);
            a.x += x_oct_dot(xr, (o + lanes) * 8u, q1);
            a.x += x_oct_dot(xr, (o + 2u * lanes) * 8u, q2);
            a.x += x_oct_dot(xr, (o + 3u * lanes) * 8u, q3);
            a.x += x_oct_dot(xr, (o + 4u * lanes) * 8u, q4);
            a.x += x_oct_dot(xr, (o + 5u * lanes) * 8u, q5);
            a.x += x_oct_dot(xr, (o + 6u * lanes) * 8u, q6);
            a.x += x_oct_dot(xr, (o + 7u * lanes) * 8u, q7);
        }
        for (; nt == 1u && o + 3u * lanes < octs; o += 4u * lanes) {
            let q0 = w_oct(m, row, o * 8u);
            let q1 = w_oct(m, row, (o + lanes) * 8u);
            let q2 = w_oct(m, row, (o + 2u * lanes) * 8u);
            let q3 = w_oct(m, row, (o + 3u * lanes) * 8u);
            a.x += x_oct_dot(xr, o * 8u, q0);
            a.x += x_oct_dot(xr, (o + lanes) * 8u, q1);
            a.x += x_oct_dot(xr, (o + 2u * lanes) * 8u, q2);
            a.x += x_oct_dot(xr, (o + 3u * lanes) * 8u, q3);
        }
        // Two activation rows in a two-row pipeline (an in-place model's AR pass, [last, mask]):
        // the same four-octet rounds, each octet serving both rows.
        for (; CHUNK_T == 2u && nt == 2u && o + 3u * lanes < octs; o += 4u * lanes) {
            let q0 = w_oct(m, row, o * 8u);
            let q1 = w_oct(m, row, (o + lanes) * 8u);
            let q2 = w_oct(m, row, (o + 2u * lanes) * 8u);
            let q3 = w_oct(m, row, (o + 3u * lanes) * 8u);
            a.x += x_oct_dot(xr, o * 8u, q0);
            a.x += x_oct_dot(xr, (o + lanes) * 8u, q1);
            a.x += x_oct_dot(xr, (o + 2u * lanes) * 8u, q2);
            a.x += x_oct_dot(xr, (o + 3u * lanes) * 8u, q3);
            a.y += x_oct_dot(xr + 1u, o * 8u, q0);
            a.y += x_oct_dot(xr + 1u, (o + lanes) * 8u, q1);
            a.y += x_oct_dot(xr + 1u, (o + 2u * lanes) * 8u, q2);
            a.y += x_oct_dot(xr + 1u, (o + 3u * lanes) * 8u, q3);
        }
        for (; o < octs; o += lanes) {
            let q = w_oct(m, row, o * 8u);
            if (CHUNK_T == 1u) {
                a.x += x_oct_dot(xr, o * 8u, q);
            } else if (CHUNK_T == 2u) {
                a.x += x_oct_dot(xr, o * 8u, q);
                if (nt == 2u) {
                    a.y += x_oct_dot(xr + 1u, o * 8u, q);
                }
            } else {
                for (var t = 0u; t < nt; t++) {
                    a[t] += x_oct_dot(xr + t, o * 8u, q);
                }
            }
        }
    }
    for (var t = 0u; t < GEMV_T; t++) {
        gemv_part[t * 64u + lid] = a[t];
        gemv_ssp[t * 64u + lid] = nss[t];
    }
}

// Σ over the `lanes` invocations of workgroup row r for activation row t, in lane order.
fn gemv_sum(r: u32, t: u32, lanes: u32) -> f32 {
    var s = 0.0;
    for (var l = 0u; l < lanes; l++) {
        s += gemv_part[t * 64u + r * lanes + l];
    }
    return s;
}

@compute @workgroup_size(64)
fn gemv(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let lanes = gemv_lanes();
    let rows = 64u / lanes;
    let t0 = wid.z * GEMV_T;
    let nt = min(p.t - t0, GEMV_T);
    // Row groups in turn, every (x · y)-th: one pass where the grid has a workgroup a group, more
    // where the host capped the grid (a large matrix's thousands of short-lived workgroups).
    let groups = (p.n + rows - 1u) / rows;
    let stride = nwg.x * nwg.y;
    for (var g = wid.x + wid.y * nwg.x; g < groups; g += stride) {
        let row0 = g * rows;
        gemv_partial(row0 + lid / lanes, lid, t0, nt, lanes);
        workgroupBarrier();
        if (lid < 4u * rows) {
            let r = lid / 4u;
            let t = lid % 4u;
            if (row0 + r < p.n && t < nt) {
                let s = gemv_sum(r, t, lanes) * gemv_inv_rms(r, t, lanes);
                gemv_store((t0 + t) * p.out_stride + p.out_col0 + row0 + r, s);
            }
        }
        // The partials are written again by the next group.
        if (g + stride < groups) {
            workgroupBarrier();
        }
    }
}

// gemv over a dense MLP's fused [gate; up] weight (p.n = 2I rows), writing
// h[t, out_col0 + c] = silu(gate c) · up c: workgroup rows gate c0, gate c0 + 1, up c0, up c0 + 1
// (as expert_gate_up_gemv pairs them), so the activation needs no dispatch of its own.
@compute @workgroup_size(64)
fn gemv_swiglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let inter = p.n / 2u;
    let c0 = (wid.x + wid.y * nwg.x) * 2u;
    let t0 = wid.z * GEMV_T;
    let nt = min(p.t - t0, GEMV_T);
    let j = lid / 16u;
    let c = c0 + (j & 1u);
    gemv_partial(select(p.n, select(inter + c, c, j < 2u), c < inter), lid, t0, nt, 16u);
    workgroupBarrier();
    if (lid < 8u) {
        let col = lid / 4u;
        let t = lid % 4u;
        if (c0 + col < inter && t < nt) {
            let g = gemv_sum(col, t, 16u) * gemv_inv_rms(col, t, 16u);
            let u = gemv_sum(2u + col, t, 16u) * gemv_inv_rms(2u + col, t, 16u);
            out[(t0 + t) * p.out_stride + p.out_col0 + c0 + col] = g / (1.0 + exp(-g)) * u;
        }
    }
}
