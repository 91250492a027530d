// y = x · Wᵀ for weights W [n, k] in file layout (f32, f16, q8, q4; override WTYPE, see
// lib/dequant.wgsl), dequantized in the inner loop; x [t, k] and y f32.
//
// Entry points of the family (the gemv entries live in gemv.wgsl):
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
#include "moe_meta"
#include "gate_act"

@group(0) @binding(4) var<storage, read> slots: array<u32>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<uniform> ep: ExpertParams;

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
                out[(first + i) * ep.n + col] = gate_act(g) * u;
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
