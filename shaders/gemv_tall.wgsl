// y = x · Wᵀ for tall q8 / q4 weights W [n, k] (override WTYPE 2 or 3, lib/dequant.wgsl's layout)
// against up to 4 activation rows: an opt-in LM-head gemv (vocabulary × hidden; host side
// ops/matmul.rs tall_gemv, EDGEDIFF_LM_HEAD=tall). It measured slower than matmul.wgsl's gemv on
// the H200 (1 token 403 against 220 µs), so it is not the default.
//
// gemv_tall: a workgroup of 256 owns p.blocks (≤ 8) blocks of 16 weight rows, 16 invocations a
// row. It first copies the activation rows (k · t ≤ 8192 values) into shared memory, once for all
// its blocks; then, block after block, each invocation reads its row in
// vec4<u32> loads (one q4 group of 32 values, or half a q8 group) with a stride of 16 vec4s, so
// neighbours read neighbouring 16 bytes, issuing four loads (and their scales, one per load) ahead
// of the arithmetic. A group's codes are dotted with the activations first and scaled once. Each
// invocation keeps its partial sums of every block; at the end the 16 of a row meet in shared
// memory (the activations' space, reused).
// Weight rows are whole q4/q8 groups (k % 32 == 0), so every row starts on a 16-byte boundary, and
// the weight buffer is padded to 16 bytes (pool.rs), so the scales' last word is in the array.

#include "half"

const W_Q8: u32 = 2u;
const W_Q4: u32 = 3u;

override WTYPE: u32 = 3u;

struct MatmulParams {
    n: u32,
    k: u32,
    t: u32,
    scales: u32,
    x_row0: u32,
    out_stride: u32,
    out_col0: u32,
    blocks: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_act: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const LANES: u32 = 16u;
const ROWS: u32 = 16u;
const XS: u32 = 2048u;
// Most blocks of ROWS rows a workgroup walks (p.blocks, up to this).
const BLOCKS: u32 = 8u;

// Activations [t, k] as vec4s; afterwards the partial sums [256] of each token.
var<workgroup> xs: array<vec4<f32>, XS>;

// Scale of quantization group g (f16 pairs from word p.scales).
fn group_scale(g: u32) -> f32 {
    let sw = p.scales + g / 2u;
    return unpack_half2(w4[sw / 4u][sw % 4u])[g & 1u];
}

// Σ code · x over one vec4 of codes; `xb` is the activations' vec4 index of its first value. The
// words are visited in a rotation that depends on the invocation's lane (and a q4 word's halves in
// a lane-dependent order), so the 8 lanes of a 128-bit shared-memory access hit 8 different
// 16-byte bank groups (neighbouring lanes are 64 or 128 bytes apart).
fn codes_dot(q: vec4<u32>, xb: u32, lane: u32) -> f32 {
    var s = 0.0;
    if (WTYPE == W_Q4) {
        let h = (lane >> 2u) & 1u;
        for (var jj = 0u; jj < 4u; jj++) {
            let j = (jj + lane) & 3u;
            let wd = vec4<u32>(q[j]);
            let lo = vec4<i32>((wd >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) - vec4<i32>(8);
            let hi = vec4<i32>((wd >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)) - vec4<i32>(8);
            let xa = xs[xb + 2u * j + h];
            let xc = xs[xb + 2u * j + 1u - h];
            let ca = select(lo, hi, h == 1u);
            let cc = select(hi, lo, h == 1u);
            s += dot(vec4<f32>(ca), xa) + dot(vec4<f32>(cc), xc);
        }
    } else {
        for (var jj = 0u; jj < 4u; jj++) {
            let j = (jj + (lane >> 1u)) & 3u;
            let wd = q[j];
            let c = bitcast<vec4<i32>>(vec4<u32>(wd << 24u, wd << 16u, wd << 8u, wd)) >> vec4<u32>(24u);
            s += dot(vec4<f32>(c), xs[xb + j]);
        }
    }
    return s;
}

@compute @workgroup_size(256)
fn gemv_tall(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let kv = p.k / 4u;
    let nt = min(p.t, 4u);
    for (var i = lid; i < kv * nt; i += 256u) {
        let t = i / kv;
        let b = (p.x_row0 + t) * p.k + (i % kv) * 4u;
        xs[i] = vec4<f32>(x_act[b], x_act[b + 1u], x_act[b + 2u], x_act[b + 3u]);
    }
    workgroupBarrier();
    let blk = wid.x + wid.y * nwg.x;
    let lane = lid % LANES;
    // Values per vec4 of codes, and in activation vec4s.
    let per = select(16u, 32u, WTYPE == W_Q4);
    let xper = per / 4u;
    let vpr = p.k / per;
    var acc: array<vec4<f32>, BLOCKS>;
    for (var bi = 0u; bi < BLOCKS; bi++) {
        let row = (blk * p.blocks + bi) * ROWS + lid / LANES;
        var a = vec4<f32>(0.0);
        if (bi < p.blocks && row < p.n) {
            let r0 = row * vpr;
            let g0 = row * (p.k / 32u);
            var v = lane;
            for (; v + 3u * LANES < vpr; v += 4u * LANES) {
                let q0 = w4[r0 + v];
                let q1 = w4[r0 + v + LANES];
                let q2 = w4[r0 + v + 2u * LANES];
                let q3 = w4[r0 + v + 3u * LANES];
                let s0 = group_scale(g0 + (v * per) / 32u);
                let s1 = group_scale(g0 + ((v + LANES) * per) / 32u);
                let s2 = group_scale(g0 + ((v + 2u * LANES) * per) / 32u);
                let s3 = group_scale(g0 + ((v + 3u * LANES) * per) / 32u);
                for (var t = 0u; t < 4u; t++) {
                    if (t < nt) {
                        let xb = t * kv + v * xper;
                        var s = s0 * codes_dot(q0, xb, lane);
                        s += s1 * codes_dot(q1, xb + LANES * xper, lane);
                        s += s2 * codes_dot(q2, xb + 2u * LANES * xper, lane);
                        s += s3 * codes_dot(q3, xb + 3u * LANES * xper, lane);
                        a[t] += s;
                    }
                }
            }
            for (; v < vpr; v += LANES) {
                let q = w4[r0 + v];
                let s0 = group_scale(g0 + (v * per) / 32u);
                for (var t = 0u; t < 4u; t++) {
                    if (t < nt) {
                        a[t] += s0 * codes_dot(q, t * kv + v * xper, lane);
                    }
                }
            }
        }
        acc[bi] = a;
    }
    workgroupBarrier();
    for (var bi = 0u; bi < BLOCKS; bi++) {
        xs[bi * 256u + lid] = acc[bi];
    }
    workgroupBarrier();
    // Output (block, row, token) o: the sum of its row's 16 lanes.
    for (var o = lid; o < p.blocks * ROWS * 4u; o += 256u) {
        let bi = o / (ROWS * 4u);
        let r = (o / 4u) % ROWS;
        let t = o % 4u;
        let orow = (blk * p.blocks + bi) * ROWS + r;
        if (orow < p.n && t < nt) {
            var s = 0.0;
            for (var l = 0u; l < LANES; l++) {
                s += xs[bi * 256u + r * LANES + l][t];
            }
            out[t * p.out_stride + p.out_col0 + orow] = s;
        }
    }
}
