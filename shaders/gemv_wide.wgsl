// y = x · Wᵀ for few activation rows (1–16, f32 weights up to 64) with q4, q8 or f32 weights
// (WTYPE 3 / 2 / 0, lib/dequant.wgsl's layout), x [t, k] and y f32 — gemv.wgsl's job with the wide loads a memory-bound gemv needs on a
// large GPU (lib/wide_gemv.wgsl: 16-byte chunks, one scale a chunk, activations staged in shared
// memory and reused by four rows a lane group).
// Tiling: 128 invocations, 512 / L weight rows a workgroup (L = p.lanes: 16, or 64 for the f32
// routers' few rows; ops/matmul.rs wide_gemv picks), workgroups folded into x × y past 65535, and
// token blocks of p.tile_t rows (tile_t · k ≤ 4096, at most 4) along z, each staged once. A
// (row, token) sum does not depend on which tokens share its block, so a batched pass's rows equal
// each pass alone bit for bit (ops/batch_class.rs).
// - gemv_wide: rows n of W.
// - gemv_wide_swiglu: a dense MLP's fused [gate; up] (p.n = 2I rows); a row group works gate c,
//   gate c + 1, up c, up c + 1 and writes silu(gate) · up into h[t, out_col0 + c].

#include "matmul_params"
#include "wide_gemv"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer as w4, for the scales.
@group(0) @binding(4) var<storage, read> w_words: array<u32>;

// The block's first activation row.
var<private> blk_row0: u32;

fn wide_chunk(i: u32) -> vec4<u32> {
    return w4[i];
}

fn wide_word(i: u32) -> u32 {
    return w_words[i];
}

fn wide_x(t: u32, g: u32) -> vec4<f32> {
    return x_act[(blk_row0 + t) * (p.k / 4u) + g];
}

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

@compute @workgroup_size(128)
fn gemv_wide(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let m = WideMat(0u, p.scales, p.k, p.lanes);
    let t0 = wid.z * p.tile_t;
    let nt = min(p.t - t0, p.tile_t);
    let row_base = group_id(wid, nwg) * (512u / p.lanes);
    blk_row0 = p.x_row0 + t0;
    wide_stage(lid, m, nt);
    let row0 = row_base + (lid / p.lanes) * 4u;
    wide_rows(lid, m, vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), p.n, nt);
    if (lid < 512u / p.lanes && row_base + lid < p.n) {
        let s = xs[768u + lid];
        for (var t = 0u; t < nt; t++) {
            out[(t0 + t) * p.out_stride + p.out_col0 + row_base + lid] = s[t];
        }
    }
}

@compute @workgroup_size(128)
fn gemv_wide_swiglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let m = WideMat(0u, p.scales, p.k, p.lanes);
    let inter = p.n / 2u;
    let t0 = wid.z * p.tile_t;
    let nt = min(p.t - t0, p.tile_t);
    // Columns c0, c0 + 1 a row group: 256 / L columns a workgroup.
    let col_base = group_id(wid, nwg) * (256u / p.lanes);
    let c0 = col_base + (lid / p.lanes) * 2u;
    let cols = vec4<u32>(c0, c0 + 1u, c0, c0 + 1u);
    let rows = select(vec4<u32>(p.n), cols + vec4<u32>(0u, 0u, inter, inter), cols < vec4<u32>(inter));
    blk_row0 = p.x_row0 + t0;
    wide_stage(lid, m, nt);
    wide_rows(lid, m, rows, p.n, nt);
    // Row slot g · 4 + r: r 0 / 1 the gate of columns 2g, 2g + 1 of the workgroup, 2 / 3 their up.
    let c = col_base + lid;
    if (lid < 256u / p.lanes && c < inter) {
        let slot = (lid / 2u) * 4u + lid % 2u;
        let g = xs[768u + slot];
        let u = xs[768u + slot + 2u];
        for (var t = 0u; t < nt; t++) {
            out[(t0 + t) * p.out_stride + p.out_col0 + c] = g[t] / (1.0 + exp(-g[t])) * u[t];
        }
    }
}
