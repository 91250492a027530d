// y = x · Wᵀ for q4 and q8 weights W [n, k] and up to 4 activation rows x [t, k] per workgroup
// (more in blocks of 4 along the grid's z), f32 out: the skinny matmuls of a decoding pass, where
// bytes in flight decide the speed. Tiling and layout: lib/gemv_q.wgsl (4 weight rows a
// workgroup, a whole quant group per invocation and step).
// - gemv_q: 4 consecutive rows a workgroup, y[t, out_col0 + row].
// - gemv_q_swiglu: the fused [gate; up] weight of a dense MLP (I = n / 2), 2 columns a workgroup;
//   writes h[t, out_col0 + c] = silu(gate c) · up c, so the MLP needs no activation dispatch.
// Weights start at word 0 of their binding (ops/matmul.rs sends other cases to matmul.wgsl).

#include "matmul_params"
#include "gemv_q"

const TOK: u32 = 4u;

// The block's activation rows (NO_ROW past t).
fn block_rows(t0: u32) -> vec4<u32> {
    let r = vec4<u32>(t0) + vec4<u32>(0u, 1u, 2u, 3u);
    return select(vec4<u32>(NO_ROW), r + vec4<u32>(p.x_row0), r < vec4<u32>(p.t));
}

@compute @workgroup_size(64)
fn gemv_q(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row0 = (wid.x + wid.y * nwg.x) * 4u;
    let t0 = wid.z * TOK;
    let m = QMat(0u, p.scales, p.k, p.n);
    row_partial(m, row0 + lid / LANES, block_rows(t0), lid);
    workgroupBarrier();
    // 4 rows × 4 activation rows: one output each.
    if (lid < 16u) {
        let j = lid / TOK;
        let t = t0 + lid % TOK;
        if (row0 + j < p.n && t < p.t) {
            out[t * p.out_stride + p.out_col0 + row0 + j] = row_sum(j)[lid % TOK];
        }
    }
}

@compute @workgroup_size(64)
fn gemv_q_swiglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let c0 = (wid.x + wid.y * nwg.x) * 2u;
    let t0 = wid.z * TOK;
    let m = QMat(0u, p.scales, p.k, p.n);
    row_partial(m, swiglu_row(c0, p.n, lid), block_rows(t0), lid);
    workgroupBarrier();
    if (lid < 8u) {
        let j = lid / TOK;
        let t = t0 + lid % TOK;
        if (c0 + j < p.n / 2u && t < p.t) {
            out[t * p.out_stride + p.out_col0 + c0 + j] = swiglu_out(j, lid % TOK);
        }
    }
}
