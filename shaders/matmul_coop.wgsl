// Tensor-core y = x · Wᵀ for token blocks (the block-diffusion decoder's 16–32-token passes, 64-token
// blocks, prefill, `bench kernels --matmul-n`): cooperative matrices f16 × f16 → f32, 16 × 16 × 16,
// subgroup scope (wgpu's EXPERIMENTAL_COOPERATIVE_MATRIX; composed only where the device lends it,
// see device.rs). Same bindings and params as matmul.wgsl's gemm (its `_pad` here `tile_t`, the
// tile's activation rows): weights W [n, k] in file layout (override WTYPE, lib/dequant.wgsl; the
// host sends f16, q8 and q4 weights), x [t, k] and y f32, output rows a column range
// (out_stride, out_col0) of a wider matrix.
//
// Tiling: a workgroup of 256 invocations (8 subgroups of exactly 32, checked when the device is
// chosen) computes tile_t activation rows × 128 weight rows, tile_t one of (uniform branches):
//   64: subgroup s owns the 32 × 32 block at activation rows 32·(s / 4), weight rows 32·(s % 4):
//       2 × 2 accumulator fragments (c_ij: activation rows 16·i, weight rows 16·j of that block);
//   32: subgroup s owns activation rows 0..32 × weight rows 16·s: fragments c00 and c10;
//   16: subgroup s owns activation rows 0..16 × weight rows 16·s: fragment c00.
// The host picks the smallest tile that holds the block (ops/matmul.rs), so a 16-token pass wastes
// no tensor-core work on padding rows. K advances 32 values a step (one quantisation group). Shared
// tiles are f16, one row per activation or weight row, k contiguous, rows padded to CS = 40 halves
// (80 bytes: the 8 rows of a fragment load start in distinct banks): the activation tiles are the
// A operand read row-major, the weight tiles the B operand (k × n) read column-major.
//
// Accuracy (f32 reference, relative L2 ≤ 1e-4 in the tests, exact tokens end to end): activations
// are split x = hi + lo·2⁻¹⁰: hi is x with its mantissa cut to f16's 10 bits by a bit mask (exact
// in f16; a round trip through f16 lost lo altogether on NVIDIA's driver, H200 2026-11), lo the
// exact rest scaled by 2¹⁰ into f16's normal range; each has its own f16 tile and accumulators
// (c_ij, l_ij). f16 weights are exact in f16: c += x_hi·w, l += x_lo·w. A q8/q4 weight is
// code · scale (code − 8 for q4), exact in f32 (≤ 8 × 11 significant bits) but not in f16, so it is
// split the same way, w = w_hi + w_lo·2⁻¹⁰, into two weight tiles (w_lo exact: ≤ 8 bits left):
// c += x_hi·w_hi, l += x_lo·w_hi + x_hi·w_lo, dropping only x_lo·w_lo (2⁻²² relative) — three
// multiplies a fragment instead of two, and the accumulators never leave the tensor cores between
// K steps (no per-group scaling pass through shared memory). The next step's global loads (two
// weight octets and one activation octet an invocation) are issued before the current step's
// multiplies. Results go through a per-subgroup 16 × 16 f32 scratch (c, then l) to bounds-checked
// stores, so any t, n, k works.
// Split along K (grid z, k_chunk values each, a multiple of 32) where the tiles alone would leave
// most of the GPU idle (a [3072 × 2048] weight at 32 tokens is 24 workgroups): each split writes
// its partial rows at z · split_rows of a scratch, and matmul.wgsl's split_sum adds them.
// Every coop index and stride is a `let` of its own.

enable f16;
enable wgpu_cooperative_matrix;

#include "dequant"
#include "matmul_io"


const CT: u32 = 64u;
const CN: u32 = 128u;
const CK: u32 = 32u;
const CS: u32 = 40u;

var<workgroup> cx_hi: array<f16, 2560>;
var<workgroup> cx_lo: array<f16, 2560>;
var<workgroup> cw: array<f16, 5120>;
var<workgroup> cw_lo: array<f16, 5120>;
var<workgroup> cc: array<f32, 2048>;

// Activations k..k+8 of tile row `row` (absolute row index t0 + r); zeros past t or k.
fn coop_load_x(row: u32, k: u32) -> Oct {
    let z = vec4<f32>(0.0);
    if (row >= p.t || k >= p.k) {
        return Oct(z, z);
    }
    let b = (p.x_row0 + row) * p.k + k;
    if (k + 8u <= p.k) {
        return Oct(
            vec4<f32>(x_act[b], x_act[b + 1u], x_act[b + 2u], x_act[b + 3u]),
            vec4<f32>(x_act[b + 4u], x_act[b + 5u], x_act[b + 6u], x_act[b + 7u]),
        );
    }
    var v = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var i = 0u; i < 8u; i++) {
        if (k + i < p.k) {
            v[i] = x_act[b + i];
        }
    }
    return Oct(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

// Weights k..k+8 of weight row `row`; zeros past n or k.
fn coop_load_w(m: WMat, row: u32, k: u32) -> Oct {
    if (row < p.n && k < p.k) {
        return w_oct(m, row, k);
    }
    let z = vec4<f32>(0.0);
    return Oct(z, z);
}

// x with its mantissa cut to 10 bits (f16's), so exact in f16 within its range.
fn coop_hi(v: vec4<f32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(bitcast<vec4<u32>>(v) & vec4<u32>(0xffffe000u));
}

// 2¹⁰: lo (below hi's last bit) times this stays in f16's range and above its subnormals.
const LO_SCALE: f32 = 1024.0;

fn coop_store_x(r: u32, o: u32, q: Oct) {
    let b = r * CS + o * 8u;
    let x0 = coop_hi(q.lo);
    let x1 = coop_hi(q.hi);
    let h0 = vec4<f16>(x0);
    let h1 = vec4<f16>(x1);
    let l0 = vec4<f16>((q.lo - x0) * LO_SCALE);
    let l1 = vec4<f16>((q.hi - x1) * LO_SCALE);
    cx_hi[b] = h0.x;
    cx_hi[b + 1u] = h0.y;
    cx_hi[b + 2u] = h0.z;
    cx_hi[b + 3u] = h0.w;
    cx_hi[b + 4u] = h1.x;
    cx_hi[b + 5u] = h1.y;
    cx_hi[b + 6u] = h1.z;
    cx_hi[b + 7u] = h1.w;
    cx_lo[b] = l0.x;
    cx_lo[b + 1u] = l0.y;
    cx_lo[b + 2u] = l0.z;
    cx_lo[b + 3u] = l0.w;
    cx_lo[b + 4u] = l1.x;
    cx_lo[b + 5u] = l1.y;
    cx_lo[b + 6u] = l1.z;
    cx_lo[b + 7u] = l1.w;
}

// Weight octet q of weight row n: f16 weights as they are; quantized ones split into cw (hi, cut
// to f16's mantissa) and cw_lo (the exact rest · LO_SCALE).
fn coop_store_w(n: u32, o: u32, q: Oct) {
    let b = n * CS + o * 8u;
    var x0 = q.lo;
    var x1 = q.hi;
    if (WTYPE != W_F16) {
        x0 = coop_hi(q.lo);
        x1 = coop_hi(q.hi);
        let l0 = vec4<f16>((q.lo - x0) * LO_SCALE);
        let l1 = vec4<f16>((q.hi - x1) * LO_SCALE);
        cw_lo[b] = l0.x;
        cw_lo[b + 1u] = l0.y;
        cw_lo[b + 2u] = l0.z;
        cw_lo[b + 3u] = l0.w;
        cw_lo[b + 4u] = l1.x;
        cw_lo[b + 5u] = l1.y;
        cw_lo[b + 6u] = l1.z;
        cw_lo[b + 7u] = l1.w;
    }
    let h0 = vec4<f16>(x0);
    let h1 = vec4<f16>(x1);
    cw[b] = h0.x;
    cw[b + 1u] = h0.y;
    cw[b + 2u] = h0.z;
    cw[b + 3u] = h0.w;
    cw[b + 4u] = h1.x;
    cw[b + 5u] = h1.y;
    cw[b + 6u] = h1.z;
    cw[b + 7u] = h1.w;
}

// Lane `lane`'s 8 of the 16 × 16 values in the scratch at `io` (row-major).
fn coop_read(io: u32, lane: u32) -> Oct {
    let b = io + lane * 8u;
    return Oct(
        vec4<f32>(cc[b], cc[b + 1u], cc[b + 2u], cc[b + 3u]),
        vec4<f32>(cc[b + 4u], cc[b + 5u], cc[b + 6u], cc[b + 7u]),
    );
}

// hi + lo / LO_SCALE of lane `lane`'s 8 values, written to activation rows t..t+16 × weight rows
// n..n+16 where in bounds (output rows from `orow0`: a split's partial rows).
fn coop_write(hi: Oct, lo: Oct, lane: u32, t: u32, n: u32, orow0: u32) {
    let v0 = hi.lo + lo.lo * (1.0 / LO_SCALE);
    let v1 = hi.hi + lo.hi * (1.0 / LO_SCALE);
    var v = array<f32, 8>(v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w);
    for (var e = 0u; e < 8u; e++) {
        let i = lane * 8u + e;
        let tr = t + i / 16u;
        let nc = n + i % 16u;
        if (tr < p.t && nc < p.n) {
            out[(orow0 + tr) * p.out_stride + p.out_col0 + nc] = v[e];
        }
    }
}

@compute @workgroup_size(256)
fn gemm_coop(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let rows = p.tile_t;
    // Fragment rows along activations (two_t) and along weights (two_n) a subgroup owns.
    let two_t = rows >= 32u;
    let two_n = rows >= 64u;
    let quant = WTYPE != W_F16;
    let n0 = wid.x * CN;
    let t0 = wid.y * rows;
    let m = WMat(0u, p.scales, p.k);
    // This workgroup's range of K (all of it unless split; chunks are whole 32-value steps).
    let kb = wid.z * p.k_chunk;
    let ke = select(p.k, min(kb + p.k_chunk, p.k), p.k_chunk > 0u);
    let orow0 = wid.z * p.split_rows;
    let sg = lid / 32u;
    let lane = lid % 32u;
    var st = 0u;
    var sn = sg * 16u;
    if (two_n) {
        st = (sg / 4u) * 32u;
        sn = (sg % 4u) * 32u;
    }
    // Loader roles: weight rows lr and lr + 64, activation row lr (< rows), octet lo of the step's
    // 32 values.
    let lr = lid / 4u;
    let lo = lid % 4u;
    let xr = select(p.t, t0 + lr, lr < rows);
    var w0 = coop_load_w(m, n0 + lr, kb + lo * 8u);
    var w1 = coop_load_w(m, n0 + lr + 64u, kb + lo * 8u);
    var x0 = coop_load_x(xr, kb + lo * 8u);
    var c00 = coop_mat16x16<f32, C>();
    var c01 = coop_mat16x16<f32, C>();
    var c10 = coop_mat16x16<f32, C>();
    var c11 = coop_mat16x16<f32, C>();
    var l00 = coop_mat16x16<f32, C>();
    var l01 = coop_mat16x16<f32, C>();
    var l10 = coop_mat16x16<f32, C>();
    var l11 = coop_mat16x16<f32, C>();
    for (var k0 = kb; k0 < ke; k0 += CK) {
        coop_store_w(lr, lo, w0);
        coop_store_w(lr + 64u, lo, w1);
        coop_store_x(lr, lo, x0);
        workgroupBarrier();
        let k1 = k0 + CK;
        if (k1 < ke) {
            w0 = coop_load_w(m, n0 + lr, k1 + lo * 8u);
            w1 = coop_load_w(m, n0 + lr + 64u, k1 + lo * 8u);
            x0 = coop_load_x(xr, k1 + lo * 8u);
        }
        for (var kk = 0u; kk < CK; kk += 16u) {
            let s = CS;
            let ia0 = st * CS + kk;
            let ia1 = (st + 16u) * CS + kk;
            let ib0 = sn * CS + kk;
            let ib1 = (sn + 16u) * CS + kk;
            let b0 = coopLoad<coop_mat16x16<f16, B>>(&cw[ib0], s);
            let ah0 = coopLoadT<coop_mat16x16<f16, A>>(&cx_hi[ia0], s);
            let al0 = coopLoadT<coop_mat16x16<f16, A>>(&cx_lo[ia0], s);
            c00 = coopMultiplyAdd(ah0, b0, c00);
            l00 = coopMultiplyAdd(al0, b0, l00);
            if (quant) {
                let bl0 = coopLoad<coop_mat16x16<f16, B>>(&cw_lo[ib0], s);
                l00 = coopMultiplyAdd(ah0, bl0, l00);
                if (two_t) {
                    let ah1 = coopLoadT<coop_mat16x16<f16, A>>(&cx_hi[ia1], s);
                    l10 = coopMultiplyAdd(ah1, bl0, l10);
                }
            }
            if (two_t) {
                let ah1 = coopLoadT<coop_mat16x16<f16, A>>(&cx_hi[ia1], s);
                let al1 = coopLoadT<coop_mat16x16<f16, A>>(&cx_lo[ia1], s);
                c10 = coopMultiplyAdd(ah1, b0, c10);
                l10 = coopMultiplyAdd(al1, b0, l10);
                if (two_n) {
                    let b1 = coopLoad<coop_mat16x16<f16, B>>(&cw[ib1], s);
                    c01 = coopMultiplyAdd(ah0, b1, c01);
                    l01 = coopMultiplyAdd(al0, b1, l01);
                    c11 = coopMultiplyAdd(ah1, b1, c11);
                    l11 = coopMultiplyAdd(al1, b1, l11);
                    if (quant) {
                        let bl1 = coopLoad<coop_mat16x16<f16, B>>(&cw_lo[ib1], s);
                        l01 = coopMultiplyAdd(ah0, bl1, l01);
                        l11 = coopMultiplyAdd(ah1, bl1, l11);
                    }
                }
            }
        }
        workgroupBarrier();
    }
    let io = sg * 256u;
    let s16 = 16u;
    coopStoreT(c00, &cc[io], s16);
    workgroupBarrier();
    let h00 = coop_read(io, lane);
    workgroupBarrier();
    coopStoreT(l00, &cc[io], s16);
    workgroupBarrier();
    coop_write(h00, coop_read(io, lane), lane, t0 + st, n0 + sn, orow0);
    if (two_t) {
        workgroupBarrier();
        coopStoreT(c10, &cc[io], s16);
        workgroupBarrier();
        let h10 = coop_read(io, lane);
        workgroupBarrier();
        coopStoreT(l10, &cc[io], s16);
        workgroupBarrier();
        coop_write(h10, coop_read(io, lane), lane, t0 + st + 16u, n0 + sn, orow0);
    }
    if (two_n) {
        workgroupBarrier();
        coopStoreT(c01, &cc[io], s16);
        workgroupBarrier();
        let h01 = coop_read(io, lane);
        workgroupBarrier();
        coopStoreT(l01, &cc[io], s16);
        workgroupBarrier();
        coop_write(h01, coop_read(io, lane), lane, t0 + st, n0 + sn + 16u, orow0);
        workgroupBarrier();
        coopStoreT(c11, &cc[io], s16);
        workgroupBarrier();
        let h11 = coop_read(io, lane);
        workgroupBarrier();
        coopStoreT(l11, &cc[io], s16);
        workgroupBarrier();
        coop_write(h11, coop_read(io, lane), lane, t0 + st + 16u, n0 + sn + 16u, orow0);
    }
}
