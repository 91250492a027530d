// The core of the wide gemvs (gemv_wide.wgsl, moe_gemv_wide.wgsl): a weight row read 16 bytes at
// a time (a vec4<u32> "chunk": 32 q4 values, exactly one quantisation group, 16 q8 values, half of
// one, or 4 f32 values), so one scale multiplies a whole chunk's sum, against activation rows
// staged in shared memory chunk-major (vec4 v of chunk c at v · chunks + c: neighbouring lanes
// read neighbouring vec4s). A workgroup of 128 invocations is 128 / L row groups of L lanes
// (WideMat.lanes: 64 or 16); a row group works 4 weight rows, lane j their chunks j, j + L, …,
// the four rows' chunks loaded before their arithmetic. Each (row, token) sum is Σ over the lane's
// chunks of scale · (Σ code · x), then the lanes' partials (vec4 over the block's ≤ 4 tokens) in a
// fixed two-level order — the same arithmetic however many tokens share the block.
// Nibbles and bytes become floats through the exponent trick (2^23 + c as a bit pattern, minus
// 2^23), not integer conversions, which run at a fraction of the float rate on NVIDIA.
// QACT (q4 weights only): the activations are staged as 8-bit codes instead, 32 values (one
// weight chunk) a power-of-two scale, and a chunk's sum is integer dot products of its nibbles
// against the codes (dot4I8Packed: 8 a chunk, where the float path turns 32 nibbles into floats
// and does 32 multiply-adds a token) — llama.cpp's q4 × q8 product, with a scale the CPU
// reproduces exactly (runtime/src/backend/q8_act.rs). A (token, chunk) takes three vec4s at
// t · 3 · cpr + c + {0, cpr, 2 · cpr}: the codes for the chunk's weight words 0–1, then 2–3 (per
// word: its even values' codes, then its odd values', as the nibble masks pick them), then
// (scale, bits of 8 · Σ codes).
// The including kernel defines wide_chunk(i) (vec4 i of the weights), wide_word(i) (word i, for
// the scales), wide_x(t, g) (vec4 g of the block's activation row t) and wide_code(t, j) (vec4 j
// of that row's codes, where they were made once).

#include "half"
#include "probe"

override WTYPE: u32 = 3u;
override QACT: bool = false;
// With QACT: the codes were made once for the pass (gemv_wide.wgsl q8_codes) and the staging
// copies them (the including kernel defines wide_code(t, j)); the kernels' gemv_wide under
// MODE_CODES does the same from a runtime flag.
override QCODES: bool = false;
const WIDE_F32: u32 = 0u;
const WIDE_Q8: u32 = 2u;
const WIDE_WG: u32 = 128u;
// Staged activations (16 KB, the WebGPU default workgroup storage), reused for the partial sums:
// [0, 512) lanes' partials, [512, 640) level-1 sums, [768, 800) row sums.
const WIDE_XS: u32 = 1024u;
var<workgroup> xs: array<vec4<f32>, WIDE_XS>;

const EXP_BIAS: u32 = 0x4B000000u;

// One weight matrix: its chunks from vec4 `base4`, scales from word `scales`, rows of `k` values,
// `lanes` invocations a row.
struct WideMat {
    base4: u32,
    scales: u32,
    k: u32,
    lanes: u32,
}

fn chunk_vals() -> u32 {
    if (WTYPE == WIDE_F32) {
        return 4u;
    }
    return select(32u, 16u, WTYPE == WIDE_Q8);
}

fn row_chunks(m: WideMat) -> u32 {
    return m.k / chunk_vals();
}

// One word's codes as floats: 8 q4 codes (nibble − 8; lo the first four, hi the next) or 4 q8
// codes (signed bytes, in lo).
struct Codes {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn word_codes(c: u32) -> Codes {
    if ((PROBE & 1u) != 0u && WTYPE != WIDE_F32) {
        return Codes(vec4<f32>(probe_float(c)), vec4<f32>(0.0));
    }
    let w = vec4<u32>(c);
    if (WTYPE == WIDE_Q8) {
        let u = ((w >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u)) ^ vec4<u32>(128u);
        return Codes(bitcast<vec4<f32>>(u | vec4<u32>(EXP_BIAS)) - vec4<f32>(8388736.0),
            vec4<f32>(0.0));
    }
    let l = ((w >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) | vec4<u32>(EXP_BIAS);
    let h = ((w >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)) | vec4<u32>(EXP_BIAS);
    return Codes(bitcast<vec4<f32>>(l) - vec4<f32>(8388616.0),
        bitcast<vec4<f32>>(h) - vec4<f32>(8388616.0));
}

// Σ code · x over one word's codes `k` against its activations `lo` (and, q4, `hi`).
fn codes_dot(k: Codes, lo: vec4<f32>, hi: vec4<f32>) -> f32 {
    if ((PROBE & 1u) != 0u && WTYPE != WIDE_F32) {
        return k.lo.x * lo.x;
    }
    if (WTYPE == WIDE_Q8) {
        return dot(k.lo, lo);
    }
    return dot(k.lo, lo) + dot(k.hi, hi);
}

fn word_dot_v(c: u32, lo: vec4<f32>, hi: vec4<f32>) -> f32 {
    return codes_dot(word_codes(c), lo, hi);
}

// Σ code · x over chunk `w` against its activations x[0 .. chunk_vals() / 4] (vec4 v: values
// 4v .. 4v + 3 of the chunk); the caller applies the scale. Every wide kernel sums a chunk
// through this one expression, so the staged and the register-tiled kernels agree bit for bit.
fn chunk_dot_v(w: vec4<u32>, x: array<vec4<f32>, 8>) -> f32 {
    if (WTYPE == WIDE_F32) {
        return dot(bitcast<vec4<f32>>(w), x[0]);
    }
    if (WTYPE == WIDE_Q8) {
        return ((word_dot_v(w.x, x[0], x[0]) + word_dot_v(w.y, x[1], x[1]))
            + word_dot_v(w.z, x[2], x[2])) + word_dot_v(w.w, x[3], x[3]);
    }
    return ((word_dot_v(w.x, x[0], x[1]) + word_dot_v(w.y, x[2], x[3]))
        + word_dot_v(w.z, x[4], x[5])) + word_dot_v(w.w, x[6], x[7]);
}

// Σ code · x over chunk `w` against its staged activations from xs[base] (stride `cs` between
// the chunk's vec4s); the caller applies the scale.
fn chunk_dot(w: vec4<u32>, base: u32, cs: u32) -> f32 {
    // Written out, not looped: constant indices keep `x` in registers on every driver.
    var x: array<vec4<f32>, 8>;
    x[0] = xs[base];
    if (WTYPE != WIDE_F32) {
        x[1] = xs[base + cs];
        x[2] = xs[base + 2u * cs];
        x[3] = xs[base + 3u * cs];
    }
    if (WTYPE != WIDE_F32 && WTYPE != WIDE_Q8) {
        x[4] = xs[base + 4u * cs];
        x[5] = xs[base + 5u * cs];
        x[6] = xs[base + 6u * cs];
        x[7] = xs[base + 7u * cs];
    }
    return chunk_dot_v(w, x);
}

// The scale of chunk `c` of row `row` (1 for f32 weights).
fn chunk_scale(m: WideMat, row: u32, c: u32) -> f32 {
    if (WTYPE == WIDE_F32 || (PROBE & 1u) != 0u) {
        return 1.0;
    }
    var g = row * row_chunks(m) + c;
    if (WTYPE == WIDE_Q8) {
        g = g / 2u;
    }
    return unpack_half2(wide_word(m.scales + g / 2u))[g & 1u];
}

// vec4s of xs between one staged token and the next.
fn tok_stride(m: WideMat) -> u32 {
    if (QACT) {
        return 3u * row_chunks(m);
    }
    return m.k / 4u;
}

// One word's codes for four values: round to nearest (ties to even) of x · inv, within ±127.
fn q8_word(a: f32, b: f32, c: f32, d: f32, inv: f32) -> u32 {
    return pack4xI8(vec4<i32>(clamp(round(vec4<f32>(a, b, c, d) * inv), vec4<f32>(-127.0),
        vec4<f32>(127.0))));
}

// One chunk's QACT staging (layout above) from its 32 values v (vec4 j: values 4j .. 4j + 3):
// codes for words 0–1, codes for words 2–3, (scale, bits of 8 · Σ codes). q8_codes and every
// staging make a chunk's codes through this one function, so codes made once equal codes made
// in place bit for bit.
struct Q8Chunk {
    q0: vec4<f32>,
    q1: vec4<f32>,
    dm: vec4<f32>,
}

fn q8_encode(v: array<vec4<f32>, 8>) -> Q8Chunk {
    let a = max(max(max(abs(v[0]), abs(v[1])), max(abs(v[2]), abs(v[3]))),
        max(max(abs(v[4]), abs(v[5])), max(abs(v[6]), abs(v[7]))));
    // amax < 2^e (e from amax's exponent field; zero and subnormals as 2^-100): scale
    // 2^(e − 7), so the largest code is 64 … 128, 128 clamped to 127.
    let amax = max(max(a.x, a.y), max(a.z, a.w));
    let e = clamp(i32((bitcast<u32>(amax) >> 23u) & 255u) - 126, -100, 120);
    let inv = bitcast<f32>(u32(134 - e) << 23u);
    let scale = bitcast<f32>(u32(120 + e) << 23u);
    var q: array<u32, 8>;
    for (var w = 0u; w < 4u; w++) {
        let lo = v[2u * w];
        let hi = v[2u * w + 1u];
        q[2u * w] = q8_word(lo.x, lo.z, hi.x, hi.z, inv);
        q[2u * w + 1u] = q8_word(lo.y, lo.w, hi.y, hi.w, inv);
    }
    var sum = 0;
    for (var w = 0u; w < 8u; w++) {
        sum += dot4I8Packed(q[w], 0x01010101u);
    }
    return Q8Chunk(bitcast<vec4<f32>>(vec4<u32>(q[0], q[1], q[2], q[3])),
        bitcast<vec4<f32>>(vec4<u32>(q[4], q[5], q[6], q[7])),
        vec4<f32>(scale, bitcast<f32>(8 * sum), 0.0, 0.0));
}

// Stages the block's activation rows 0 .. nt as QACT's codes (layout above); a barrier follows.
// Under QCODES the codes were made once (q8_codes) and are copied (wide_stage_codes).
fn wide_stage_q8(lid: u32, m: WideMat, nt: u32) {
    if (QCODES) {
        wide_stage_codes(lid, m, nt);
        return;
    }
    let cpr = row_chunks(m);
    for (var i = lid; i < nt * cpr; i += WIDE_WG) {
        let t = i / cpr;
        let c = i % cpr;
        // Written out: constant indices keep the values in registers.
        var v: array<vec4<f32>, 8>;
        if ((PROBE & 2u) == 0u) {
            v[0] = wide_x(t, c * 8u);
            v[1] = wide_x(t, c * 8u + 1u);
            v[2] = wide_x(t, c * 8u + 2u);
            v[3] = wide_x(t, c * 8u + 3u);
            v[4] = wide_x(t, c * 8u + 4u);
            v[5] = wide_x(t, c * 8u + 5u);
            v[6] = wide_x(t, c * 8u + 6u);
            v[7] = wide_x(t, c * 8u + 7u);
        } else {
            for (var j = 0u; j < 8u; j++) {
                v[j] = vec4<f32>(1e-3);
            }
        }
        let q = q8_encode(v);
        let b = t * 3u * cpr + c;
        xs[b] = q.q0;
        xs[b + cpr] = q.q1;
        xs[b + 2u * cpr] = q.dm;
    }
    workgroupBarrier();
}

// Stages the block's rows 0 .. nt from codes made once (wide_code(t, j): vec4 j of the block's
// row t, 3 · cpr a row, the staging layout), a barrier following. Every load is issued before
// the first store (a constant trip count; xs holds at most 8 vec4s an invocation), so the copy
// waits on one load's latency, not on a chain of them.
fn wide_stage_codes(lid: u32, m: WideMat, nt: u32) {
    let per = 3u * row_chunks(m);
    let total = nt * per;
    var v: array<vec4<f32>, 8>;
    for (var j = 0u; j < 8u; j++) {
        // Workgroup-uniform: no per-lane branch around the loads.
        if (j * WIDE_WG < total) {
            let i = min(lid + j * WIDE_WG, total - 1u);
            v[j] = wide_code(i / per, i % per);
        }
    }
    for (var j = 0u; j < 8u; j++) {
        let i = lid + j * WIDE_WG;
        if (i < total) {
            xs[i] = v[j];
        }
    }
    workgroupBarrier();
}

// Σ nibble · code over a q4 chunk `w` against its codes q0 (words 0–1) and q1 (2–3); the caller
// subtracts 8 · Σ codes (the nibbles' offset).
fn q8_chunk_dot(w: vec4<u32>, q0: vec4<u32>, q1: vec4<u32>) -> i32 {
    let lo = w & vec4<u32>(0x0F0F0F0Fu);
    let hi = (w >> vec4<u32>(4u)) & vec4<u32>(0x0F0F0F0Fu);
    return ((dot4I8Packed(lo.x, q0.x) + dot4I8Packed(hi.x, q0.y))
        + (dot4I8Packed(lo.y, q0.z) + dot4I8Packed(hi.y, q0.w)))
        + ((dot4I8Packed(lo.z, q1.x) + dot4I8Packed(hi.z, q1.y))
        + (dot4I8Packed(lo.w, q1.z) + dot4I8Packed(hi.w, q1.w)));
}

// Token t's sums over chunk c of four weight rows (chunks w0 .. w3), before the weight scales:
// staged at b = t · tok_stride + c.
fn chunk_sums(w0: vec4<u32>, w1: vec4<u32>, w2: vec4<u32>, w3: vec4<u32>, b: u32, cpr: u32)
    -> vec4<f32> {
    if (QACT) {
        let q0 = bitcast<vec4<u32>>(xs[b]);
        let q1 = bitcast<vec4<u32>>(xs[b + cpr]);
        let dm = xs[b + 2u * cpr];
        let i = vec4<i32>(q8_chunk_dot(w0, q0, q1), q8_chunk_dot(w1, q0, q1),
            q8_chunk_dot(w2, q0, q1), q8_chunk_dot(w3, q0, q1)) - vec4<i32>(bitcast<i32>(dm.y));
        // Exact: |i| < 2^24 and the scale a power of two.
        return vec4<f32>(i) * dm.x;
    }
    return vec4<f32>(chunk_dot(w0, b, cpr), chunk_dot(w1, b, cpr), chunk_dot(w2, b, cpr),
        chunk_dot(w3, b, cpr));
}

// Stages the block's activation rows 0 .. nt (wide_x) chunk-major (QACT: as codes); a barrier
// follows.
fn wide_stage(lid: u32, m: WideMat, nt: u32) {
    if (QACT) {
        wide_stage_q8(lid, m, nt);
        return;
    }
    let kv = m.k / 4u;
    let vpc = chunk_vals() / 4u;
    let cpr = row_chunks(m);
    for (var i = lid; i < nt * kv; i += WIDE_WG) {
        let t = i / kv;
        let g = i % kv;
        var v = vec4<f32>(1e-3);
        if ((PROBE & 2u) == 0u || WTYPE == WIDE_F32) {
            v = wide_x(t, g);
        }
        xs[t * kv + (g % vpc) * cpr + g / vpc] = v;
    }
    workgroupBarrier();
}

// Accumulates token t's share `d` of each row into the accumulators' component t (select keeps
// the component index constant; the other components add +0, which changes no value).
fn at_token(t: u32, d: f32) -> vec4<f32> {
    return select(vec4<f32>(0.0), vec4<f32>(d), vec4<u32>(t) == vec4<u32>(0u, 1u, 2u, 3u));
}

// Row sums of the staged block for this row group's 4 rows `rows` (≥ `n`: none, their slots hold
// garbage the callers never store): after the call
// xs[768 + s] holds row slot s = group · 4 + r (vec4 over the block's tokens) for s < 512 / L,
// and the call ends with a barrier.
fn wide_rows(lid: u32, m: WideMat, rows: vec4<u32>, n: u32, nt: u32) {
    let a = wide_partials(lid, m, rows, n, nt);
    wide_reduce(lid, m.lanes, a.r0, a.r1, a.r2, a.r3);
}

// One lane's partial sums of its row group's 4 rows (vec4 over the block's tokens), before
// wide_reduce adds the lanes'; reads the staged block and leaves xs as it was.
struct RowPartials {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

fn wide_partials(lid: u32, m: WideMat, rows: vec4<u32>, n: u32, nt: u32) -> RowPartials {
    let l = m.lanes;
    let lane = lid % l;
    let cpr = row_chunks(m);
    let ts = tok_stride(m);
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    // Rows past n read row n − 1 (their sums are never stored), so the loads sit in no branch:
    // NVIDIA's compiler serializes loads under a per-lane test (attention's K/V loads ran 2.5x
    // faster without theirs).
    let rc = min(rows, vec4<u32>(n - 1u));
    for (var c = lane; c < cpr; c += l) {
        let w0 = wide_chunk(m.base4 + rc.x * cpr + c);
        let w1 = wide_chunk(m.base4 + rc.y * cpr + c);
        let w2 = wide_chunk(m.base4 + rc.z * cpr + c);
        let w3 = wide_chunk(m.base4 + rc.w * cpr + c);
        let s = vec4<f32>(chunk_scale(m, rc.x, c), chunk_scale(m, rc.y, c), chunk_scale(m, rc.z, c),
            chunk_scale(m, rc.w, c));
        for (var t = 0u; t < nt; t++) {
            let d = chunk_sums(w0, w1, w2, w3, t * ts + c, cpr) * s;
            a0 += at_token(t, d.x);
            a1 += at_token(t, d.y);
            a2 += at_token(t, d.z);
            a3 += at_token(t, d.w);
        }
    }
    return RowPartials(a0, a1, a2, a3);
}

// Adds the lanes' partials a0 .. a3 (rows r = 0 .. 3 of this row group, vec4 over four tokens) in
// a fixed two-level order: after the call xs[768 + s] holds row slot s = group · 4 + r for
// s < 512 / L, and the call ends with a barrier. It begins with one, so xs may still be in use.
fn wide_reduce(lid: u32, l: u32, a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>) {
    let lane = lid % l;
    let grp = lid / l;
    workgroupBarrier();
    let base = grp * 4u * l + lane;
    xs[base] = a0;
    xs[base + l] = a1;
    xs[base + 2u * l] = a2;
    xs[base + 3u * l] = a3;
    workgroupBarrier();
    // Level 1: invocation i sums 4 lanes of slot i / (L / 4); level 2: slot s its L / 4 sums.
    let per = l / 4u;
    let b1 = (lid / per) * l + (lid % per) * 4u;
    xs[512u + lid] = ((xs[b1] + xs[b1 + 1u]) + xs[b1 + 2u]) + xs[b1 + 3u];
    workgroupBarrier();
    if (lid < 512u / l) {
        var s = vec4<f32>(0.0);
        for (var j = 0u; j < per; j++) {
            s += xs[512u + lid * per + j];
        }
        xs[768u + lid] = s;
    }
    workgroupBarrier();
}
