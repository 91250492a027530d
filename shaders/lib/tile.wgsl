// The tiled y = x · Wᵀ core shared by the dense and the expert kernels. A workgroup of 64
// invocations computes a TILE_T × TILE_N block: TILE_T activation rows (from `x_act`, rows of
// m.cols values) against TILE_N weight rows (from `w_words` in file layout, see dequant). Which rows
// take part is written by the caller into tile_xrow / tile_wrow (NONE: padding, reads as 0), so the
// same core serves a plain matmul, rows gathered by a token list and the gate/up pairs of SwiGLU.
// K advances 32 values per step: the weight tile is dequantized once into shared memory (row
// stride 33 against bank conflicts) and reused by all TILE_T activation rows. Invocation i owns
// activation rows 4·(i / 16) + 0..4 and weight rows 4·(i % 16) + 0..4: acc[4·a + b].

#include "dequant"

const TILE_T: u32 = 16u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 32u;
const TILE_WS: u32 = 33u;
const NONE: u32 = 0xffffffffu;

var<workgroup> tile_x: array<f32, 512>;
var<workgroup> tile_w: array<f32, 2112>;
var<workgroup> tile_xrow: array<u32, 16>;
var<workgroup> tile_wrow: array<u32, 64>;
var<private> acc: array<f32, 16>;

fn tile_run(m: WMat, lid: u32) {
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    let tt = lid / 16u;
    let tn = lid % 16u;
    for (var k0 = 0u; k0 < m.cols; k0 += TILE_K) {
        for (var i = lid; i < TILE_T * TILE_K; i += 64u) {
            let r = tile_xrow[i / TILE_K];
            let k = k0 + i % TILE_K;
            var v = 0.0;
            if (r != NONE && k < m.cols) {
                v = x_act[r * m.cols + k];
            }
            tile_x[i] = v;
        }
        for (var i = lid; i < TILE_N * 4u; i += 64u) {
            let n = i / 4u;
            let o = i % 4u;
            let r = tile_wrow[n];
            var q = Oct(vec4<f32>(0.0), vec4<f32>(0.0));
            if (r != NONE && k0 + o * 8u < m.cols) {
                q = w_oct(m, r, k0 + o * 8u);
            }
            let p = n * TILE_WS + o * 8u;
            tile_w[p] = q.lo.x;
            tile_w[p + 1u] = q.lo.y;
            tile_w[p + 2u] = q.lo.z;
            tile_w[p + 3u] = q.lo.w;
            tile_w[p + 4u] = q.hi.x;
            tile_w[p + 5u] = q.hi.y;
            tile_w[p + 6u] = q.hi.z;
            tile_w[p + 7u] = q.hi.w;
        }
        workgroupBarrier();
        let xb = tt * 4u * TILE_K;
        let wb = tn * 4u * TILE_WS;
        for (var k = 0u; k < TILE_K; k++) {
            let x = vec4<f32>(
                tile_x[xb + k],
                tile_x[xb + TILE_K + k],
                tile_x[xb + 2u * TILE_K + k],
                tile_x[xb + 3u * TILE_K + k],
            );
            let w = vec4<f32>(
                tile_w[wb + k],
                tile_w[wb + TILE_WS + k],
                tile_w[wb + 2u * TILE_WS + k],
                tile_w[wb + 3u * TILE_WS + k],
            );
            for (var a = 0u; a < 4u; a++) {
                acc[4u * a] += x[a] * w.x;
                acc[4u * a + 1u] += x[a] * w.y;
                acc[4u * a + 2u] += x[a] * w.z;
                acc[4u * a + 3u] += x[a] * w.w;
            }
        }
        workgroupBarrier();
    }
}
