// The tiled y = x · Wᵀ core shared by the dense and the expert kernels. A workgroup of 64
// invocations computes a TILE_T × TILE_N block: TILE_T activation rows (from `x_act`, rows of
// m.cols values) against TILE_N weight rows (from `w_words` in file layout, see dequant). Which rows
// take part is written by the caller into tile_xrow / tile_wrow (NONE: padding, reads as 0), so the
// same core serves a plain matmul, rows gathered by a token list and the gate/up pairs of SwiGLU.
// K advances 32 values per step: the weight tile is dequantized once into shared memory and reused
// by all TILE_T activation rows. Shared tiles are k-major vec4s (tile_x4[k·4 + r/4] holds
// activation rows r..r+4 at k, tile_w4[k·16 + n/4] weight rows n..n+4), so each k costs an
// invocation two 16-byte shared loads for 16 FMAs. The next step's global loads (4 weight octets
// and 8 activations per invocation) are issued before the current step's arithmetic, so memory
// latency overlaps compute. Invocation i owns activation rows 4·(i / 16) + a and weight rows
// 4·(i % 16) + b, a, b < 4, accumulated in registers: tile_acc(a)[b]. The accumulators are four
// named vec4s, never an array indexed at run time (that would spill to local memory).

#include "dequant"

const TILE_T: u32 = 16u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 32u;
const NONE: u32 = 0xffffffffu;

var<workgroup> tile_x4: array<vec4<f32>, 128>;
var<workgroup> tile_w4: array<vec4<f32>, 512>;
var<workgroup> tile_xrow: array<u32, 16>;
var<workgroup> tile_wrow: array<u32, 64>;
var<private> acc0: vec4<f32>;
var<private> acc1: vec4<f32>;
var<private> acc2: vec4<f32>;
var<private> acc3: vec4<f32>;

fn tile_acc(a: u32) -> vec4<f32> {
    return select(select(acc3, acc2, a == 2u), select(acc1, acc0, a == 0u), a < 2u);
}

// Octet o (lid % 4) of weight row n at step k0.
fn tile_load_w(m: WMat, n: u32, k0: u32, o: u32) -> Oct {
    let r = tile_wrow[n];
    let k = k0 + o * 8u;
    if (r != NONE && k < m.cols) {
        return w_oct(m, r, k);
    }
    return Oct(vec4<f32>(0.0), vec4<f32>(0.0));
}

fn tile_load_x(m: WMat, r: u32, k: u32) -> f32 {
    let row = tile_xrow[r];
    if (row != NONE && k < m.cols) {
        return x_act[row * m.cols + k];
    }
    return 0.0;
}

fn tile_store_w(n: u32, o: u32, q: Oct) {
    let b = o * 8u * 16u + n / 4u;
    let c = n % 4u;
    tile_w4[b][c] = q.lo.x;
    tile_w4[b + 16u][c] = q.lo.y;
    tile_w4[b + 32u][c] = q.lo.z;
    tile_w4[b + 48u][c] = q.lo.w;
    tile_w4[b + 64u][c] = q.hi.x;
    tile_w4[b + 80u][c] = q.hi.y;
    tile_w4[b + 96u][c] = q.hi.z;
    tile_w4[b + 112u][c] = q.hi.w;
}

fn tile_store_x(r: u32, k: u32, v: f32) {
    tile_x4[k * 4u + r / 4u][r % 4u] = v;
}

fn tile_run(m: WMat, lid: u32) {
    acc0 = vec4<f32>(0.0);
    acc1 = vec4<f32>(0.0);
    acc2 = vec4<f32>(0.0);
    acc3 = vec4<f32>(0.0);
    let tt = lid / 16u;
    let tn = lid % 16u;
    // Loader roles: weight rows wn + 16·j, octet wo; activation row xr at k = xk + 4·j.
    let wn = lid / 4u;
    let wo = lid % 4u;
    let xr = lid % 16u;
    let xk = lid / 16u;
    var w0 = tile_load_w(m, wn, 0u, wo);
    var w1 = tile_load_w(m, wn + 16u, 0u, wo);
    var w2 = tile_load_w(m, wn + 32u, 0u, wo);
    var w3 = tile_load_w(m, wn + 48u, 0u, wo);
    var x0 = tile_load_x(m, xr, xk);
    var x1 = tile_load_x(m, xr, xk + 4u);
    var x2 = tile_load_x(m, xr, xk + 8u);
    var x3 = tile_load_x(m, xr, xk + 12u);
    var x4 = tile_load_x(m, xr, xk + 16u);
    var x5 = tile_load_x(m, xr, xk + 20u);
    var x6 = tile_load_x(m, xr, xk + 24u);
    var x7 = tile_load_x(m, xr, xk + 28u);
    for (var k0 = 0u; k0 < m.cols; k0 += TILE_K) {
        tile_store_w(wn, wo, w0);
        tile_store_w(wn + 16u, wo, w1);
        tile_store_w(wn + 32u, wo, w2);
        tile_store_w(wn + 48u, wo, w3);
        tile_store_x(xr, xk, x0);
        tile_store_x(xr, xk + 4u, x1);
        tile_store_x(xr, xk + 8u, x2);
        tile_store_x(xr, xk + 12u, x3);
        tile_store_x(xr, xk + 16u, x4);
        tile_store_x(xr, xk + 20u, x5);
        tile_store_x(xr, xk + 24u, x6);
        tile_store_x(xr, xk + 28u, x7);
        workgroupBarrier();
        let k1 = k0 + TILE_K;
        if (k1 < m.cols) {
            w0 = tile_load_w(m, wn, k1, wo);
            w1 = tile_load_w(m, wn + 16u, k1, wo);
            w2 = tile_load_w(m, wn + 32u, k1, wo);
            w3 = tile_load_w(m, wn + 48u, k1, wo);
            x0 = tile_load_x(m, xr, k1 + xk);
            x1 = tile_load_x(m, xr, k1 + xk + 4u);
            x2 = tile_load_x(m, xr, k1 + xk + 8u);
            x3 = tile_load_x(m, xr, k1 + xk + 12u);
            x4 = tile_load_x(m, xr, k1 + xk + 16u);
            x5 = tile_load_x(m, xr, k1 + xk + 20u);
            x6 = tile_load_x(m, xr, k1 + xk + 24u);
            x7 = tile_load_x(m, xr, k1 + xk + 28u);
        }
        for (var k = 0u; k < TILE_K; k++) {
            let x = tile_x4[k * 4u + tt];
            let w = tile_w4[k * 16u + tn];
            acc0 += x.x * w;
            acc1 += x.y * w;
            acc2 += x.z * w;
            acc3 += x.w * w;
        }
        workgroupBarrier();
    }
}
