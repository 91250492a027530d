// y = x · Wᵀ for weights W [n, k] in file layout (f32, f16, q8, q4; override WTYPE, see
// lib/dequant.wgsl), dequantized in the inner loop; x [t, k] and y f32.
//
// Entry points of the family:
// - gemv: up to 4 activation rows, and up to 16 for weights that stay in L2; bandwidth-bound. A
//   workgroup owns 4 weight rows with 16 invocations each and one block of up to 4 activation rows (workgroup z); an invocation walks
//   its row 8 values (one q4 word) at a time with a stride of 16 octets, so neighbours read
//   neighbouring words (for one activation row, four octets' loads ahead of their arithmetic);
//   partial sums meet in shared memory. Token blocks re-read the weights from
//   L2, but the grid (n/4 × t/4 workgroups) fills the GPU, where 16 × 64 tiles would leave most of
//   it idle for 16 tokens.
// - gemv_swiglu: gemv over a dense MLP's fused [gate; up] weight, writing silu(gate) · up.
// - gemm: blocks of 16 activation rows × 64 weight rows (lib/tile.wgsl), beyond gemv's range.
// - split_sum: y[t, out_col0 + c] = Σ_s x[s · t_rows + t, c] over the `splits` partial outputs
//   [splits · t, n] of a K-split gemm_coop (matmul_coop.wgsl), in split order.
// - expert_gate_up / expert_down: the grouped SwiGLU of one MoE layer on the same tile core. A
//   workgroup serves one routed expert (through the slot table: expert → pool buffer, word offset)
//   for up to 16 of its tokens, so each expert's weights are read once per 16 tokens routed to it.
//   gate_up pairs gate row c with up row I + c in one tile and writes silu(gate)·up; down writes
//   each assignment's expert output. Grids come from moe_dispatch (indirect).
// Output rows may be a column range of a wider matrix (out_stride, out_col0): weights too large for
// one binding are split by rows and run as several dispatches.

#include "grid"
#include "tile"
#include "matmul_io"
#include "act_dot"
#include "moe_meta"

@group(0) @binding(4) var<storage, read> slots: array<u32>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<uniform> ep: ExpertParams;

const GEMV_T: u32 = 4u;

var<workgroup> gemv_part: array<f32, 256>;

fn x_oct_dot(r: u32, k: u32, q: Oct) -> f32 {
    return act_oct_dot(r, k, p.k, q);
}

// This invocation's partial dot products of weight row `row` (≥ p.n: none) with the block's
// activation rows t0 .. t0 + nt, into gemv_part[t · 64 + lid].
fn gemv_partial(row: u32, lid: u32, t0: u32, nt: u32) {
    let lane = lid % 16u;
    let m = WMat(0u, p.scales, p.k);
    var a = vec4<f32>(0.0);
    if (row < p.n) {
        let octs = (p.k + 7u) / 8u;
        let xr = p.x_row0 + t0;
        var o = lane;
        // One activation row (the 1-token forward): four octets' loads before their arithmetic
        // (memory-level parallelism; same order). Token blocks keep the plain loop, which measured
        // faster for them (H200: 4–16 tokens).
        for (; nt == 1u && o + 48u < octs; o += 64u) {
            let q0 = w_oct(m, row, o * 8u);
            let q1 = w_oct(m, row, (o + 16u) * 8u);
            let q2 = w_oct(m, row, (o + 32u) * 8u);
            let q3 = w_oct(m, row, (o + 48u) * 8u);
            a.x += x_oct_dot(xr, o * 8u, q0);
            a.x += x_oct_dot(xr, (o + 16u) * 8u, q1);
            a.x += x_oct_dot(xr, (o + 32u) * 8u, q2);
            a.x += x_oct_dot(xr, (o + 48u) * 8u, q3);
        }
        for (; o < octs; o += 16u) {
            let q = w_oct(m, row, o * 8u);
            for (var t = 0u; t < nt; t++) {
                a[t] += x_oct_dot(xr + t, o * 8u, q);
            }
        }
    }
    for (var t = 0u; t < GEMV_T; t++) {
        gemv_part[t * 64u + lid] = a[t];
    }
}

// Σ over the 16 invocations of workgroup row r for activation row t, in lane order.
fn gemv_sum(r: u32, t: u32) -> f32 {
    var s = 0.0;
    for (var l = 0u; l < 16u; l++) {
        s += gemv_part[t * 64u + r * 16u + l];
    }
    return s;
}

@compute @workgroup_size(64)
fn gemv(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row0 = (wid.x + wid.y * nwg.x) * 4u;
    let t0 = wid.z * GEMV_T;
    let nt = min(p.t - t0, GEMV_T);
    gemv_partial(row0 + lid / 16u, lid, t0, nt);
    workgroupBarrier();
    if (lid < 16u) {
        let r = lid / 4u;
        let t = lid % 4u;
        if (row0 + r < p.n && t < nt) {
            out[(t0 + t) * p.out_stride + p.out_col0 + row0 + r] = gemv_sum(r, t);
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
    gemv_partial(select(p.n, select(inter + c, c, j < 2u), c < inter), lid, t0, nt);
    workgroupBarrier();
    if (lid < 8u) {
        let col = lid / 4u;
        let t = lid % 4u;
        if (c0 + col < inter && t < nt) {
            let g = gemv_sum(col, t);
            let u = gemv_sum(2u + col, t);
            out[(t0 + t) * p.out_stride + p.out_col0 + c0 + col] = g / (1.0 + exp(-g)) * u;
        }
    }
}

@compute @workgroup_size(64)
fn gemm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = wid.x * TILE_N;
    let t0 = wid.y * TILE_T;
    if (lid < TILE_T) {
        tile_xrow[lid] = select(NONE, p.x_row0 + t0 + lid, t0 + lid < p.t);
    }
    tile_wrow[lid] = select(NONE, n0 + lid, n0 + lid < p.n);
    workgroupBarrier();
    tile_run(WMat(0u, p.scales, p.k), lid);
    let tt = lid / 16u;
    let tn = lid % 16u;
    for (var a = 0u; a < 4u; a++) {
        let t = t0 + tt * 4u + a;
        for (var b = 0u; b < 4u; b++) {
            let n = n0 + tn * 4u + b;
            if (t < p.t && n < p.n) {
                out[t * p.out_stride + p.out_col0 + n] = tile_acc(a)[b];
            }
        }
    }
}

@compute @workgroup_size(64)
fn split_sum(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.t * p.n) {
        return;
    }
    let t = i / p.n;
    let c = i % p.n;
    var s = 0.0;
    for (var z = 0u; z < p.splits; z++) {
        s += x_act[(z * p.t + t) * p.n + c];
    }
    out[t * p.out_stride + p.out_col0 + c] = s;
}

var<workgroup> ex_ok: u32;
var<workgroup> ex_e: u32;
var<workgroup> ex_base: u32;

// Reads which expert this workgroup serves; false (uniformly) when its tokens are exhausted or the
// expert lives in another pool buffer than the one bound.
fn expert_begin(lid: u32, wid: vec3<u32>) -> bool {
    if (lid == 0u) {
        let e = route_meta[meta_active(ep.num_experts) + wid.x];
        let s = 2u * (ep.slot0 + e);
        ex_e = e;
        ex_base = slots[s + 1u] + ep.part;
        ex_ok = select(0u, 1u, slots[s] == ep.pool && wid.z * TILE_T < route_meta[meta_counts(ep.num_experts) + e]);
    }
    return workgroupUniformLoad(&ex_ok) != 0u;
}

@compute @workgroup_size(64)
fn expert_gate_up(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let e = ex_e;
    let cnt = route_meta[meta_counts(ep.num_experts) + e];
    let first = route_meta[meta_offsets(ep.num_experts) + e];
    let t0 = wid.z * TILE_T;
    if (lid < TILE_T) {
        var r = NONE;
        if (t0 + lid < cnt) {
            r = route_meta[meta_list(ep.num_experts) + first + t0 + lid] / ep.top_k;
        }
        tile_xrow[lid] = r;
    }
    // Tile row n = 4·q + j: j = 0, 1 gate rows of columns 2q, 2q + 1; j = 2, 3 the matching up rows.
    let j = lid % 4u;
    let c = wid.y * 32u + (lid / 4u) * 2u + (j & 1u);
    tile_wrow[lid] = select(NONE, select(ep.n + c, c, j < 2u), c < ep.n);
    workgroupBarrier();
    tile_run(WMat(ex_base, ex_base + ep.scales, ep.k), lid);
    let tt = lid / 16u;
    let tn = lid % 16u;
    for (var a = 0u; a < 4u; a++) {
        let i = t0 + tt * 4u + a;
        for (var b = 0u; b < 2u; b++) {
            let col = wid.y * 32u + tn * 2u + b;
            if (i < cnt && col < ep.n) {
                let g = tile_acc(a)[b];
                let u = tile_acc(a)[2u + b];
                out[(first + i) * ep.n + col] = g / (1.0 + exp(-g)) * u;
            }
        }
    }
}

@compute @workgroup_size(64)
fn expert_down(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let e = ex_e;
    let cnt = route_meta[meta_counts(ep.num_experts) + e];
    let first = route_meta[meta_offsets(ep.num_experts) + e];
    let t0 = wid.z * TILE_T;
    if (lid < TILE_T) {
        tile_xrow[lid] = select(NONE, first + t0 + lid, t0 + lid < cnt);
    }
    let n0 = wid.y * TILE_N;
    tile_wrow[lid] = select(NONE, n0 + lid, n0 + lid < ep.n);
    workgroupBarrier();
    tile_run(WMat(ex_base, ex_base + ep.scales, ep.k), lid);
    let tt = lid / 16u;
    let tn = lid % 16u;
    for (var a = 0u; a < 4u; a++) {
        let i = t0 + tt * 4u + a;
        for (var b = 0u; b < 4u; b++) {
            let n = n0 + tn * 4u + b;
            if (i < cnt && n < ep.n) {
                out[(first + i) * ep.n + n] = tile_acc(a)[b];
            }
        }
    }
}
