// y = x · Wᵀ for token blocks (5–32 activation rows: diffusion blocks, batched passes, the LM head
// of a block) with q4 or q8 weights (WTYPE 3 / 2, lib/dequant.wgsl's layout), x [t, k] and y f32:
// each weight chunk is read once for up to CHUNK_T tokens, whose partial sums stay in registers.
// gemv_wide.wgsl stages its activations in shared memory, which holds only 4096 values, so a
// 2048-wide row takes token blocks of two and re-reads the weight (and restages) every two tokens;
// here the activations come straight from memory (the block's rows stay in L1/L2: 16 rows of
// 2048 are 128 KB) and nothing waits on a staging barrier.
// Tiling: 128 invocations, 512 / L weight rows a workgroup (L = p.lanes, 16), a row group of L
// lanes works 4 rows, lane j their chunks j, j + L, …; workgroup z is a block of CHUNK_T tokens
// (an override, 4 or 8: ops/matmul.rs picks). A lane takes a chunk word by word: the four rows'
// codes of a word are made once and used for every token of the block (made per token, the
// compiler kept all 128 of a chunk's codes live: 255 registers a thread). Workgroups fold into
// x × y past 65535.
// Sums: each chunk summed as lib/wide_gemv.wgsl chunk_dot_v sums it (same word expressions, same
// order), the same chunk order a lane and the same lane reduction (wide_reduce) as gemv_wide, so
// every (row, token) result equals gemv_wide's bit for bit, whichever tokens share a block
// (ops/batch_class.rs).
// Fusions: MODE_ACCUM adds the result to `out` (the residual); no norm (the fused-norm forward's
// gemvs stay on gemv_wide, which sees whole rows as it stages them).

#include "matmul_params"
#include "wide_gemv"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer as w4, for the scales.
@group(0) @binding(4) var<storage, read> w_words: array<u32>;

// Tokens a workgroup holds in registers (4 or 8).
override CHUNK_T: u32 = 8u;

fn wide_chunk(i: u32) -> vec4<u32> {
    return w4[i];
}

fn wide_word(i: u32) -> u32 {
    return w_words[i];
}

// lib/wide_gemv.wgsl's staging reads activations through this; this kernel stages none.
fn wide_x(t: u32, g: u32) -> vec4<f32> {
    return x_act[t * (p.k / 4u) + g];
}

// One word's activations: q4 two vec4s (lo, hi), q8 one (lo).
struct WordX {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// The activations of word `i` of chunk `c` of activation row `r`.
fn word_x(r: u32, c: u32, i: u32, kv: u32) -> WordX {
    if ((PROBE & 2u) != 0u) {
        return WordX(vec4<f32>(1e-3), vec4<f32>(1e-3));
    }
    if (WTYPE == WIDE_Q8) {
        return WordX(x_act[r * kv + c * 4u + i], vec4<f32>(0.0));
    }
    let b = r * kv + c * 8u + 2u * i;
    return WordX(x_act[b], x_act[b + 1u]);
}

fn skinny_store(i: u32, v: f32) {
    if ((p.mode & MODE_ACCUM) != 0u) {
        out[i] = out[i] + v;
    } else {
        out[i] = v;
    }
}

// Partial sums of the group's rows 0 .. 3 (r0 .. r3), each a vec4 over four tokens. Named
// accumulators, not an array: an array indexed in loops went to local memory on NVIDIA (256
// bytes a thread, the kernel 2-3x slower than the wide gemv; H100, 2026-12-06).
struct Quad {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

// The four rows' codes of one word.
struct RowCodes {
    k0: Codes,
    k1: Codes,
    k2: Codes,
    k3: Codes,
}

// Adds word i's dot products with token j's (0 .. 3) activations (row `r`, chunk c) to the
// chunk sums `a`: component j of each row, the others +0.
fn word_add(a: Quad, j: u32, k: RowCodes, r: u32, c: u32, i: u32, kv: u32) -> Quad {
    let x = word_x(r, c, i, kv);
    return Quad(a.r0 + at_token(j, codes_dot(k.k0, x.lo, x.hi)),
        a.r1 + at_token(j, codes_dot(k.k1, x.lo, x.hi)),
        a.r2 + at_token(j, codes_dot(k.k2, x.lo, x.hi)),
        a.r3 + at_token(j, codes_dot(k.k3, x.lo, x.hi)));
}

// Adds the scaled chunk sums `cs` of tokens 0 .. 3 (vec4 over tokens a row) to `a`, token by
// token as gemv_wide adds them.
fn chunk_add(a: Quad, cs: Quad, s: vec4<f32>) -> Quad {
    var o = a;
    for (var j = 0u; j < 4u; j++) {
        let d = vec4<f32>(cs.r0[j], cs.r1[j], cs.r2[j], cs.r3[j]) * s;
        o = Quad(o.r0 + at_token(j, d.x), o.r1 + at_token(j, d.y), o.r2 + at_token(j, d.z),
            o.r3 + at_token(j, d.w));
    }
    return o;
}

// Reduces quad `a` (tokens q0 .. q0 + 3 of the block) over the lanes and stores its rows.
fn quad_store(lid: u32, a: Quad, row_base: u32, t0: u32, q0: u32, nt: u32) {
    let l = p.lanes;
    wide_reduce(lid, l, a.r0, a.r1, a.r2, a.r3);
    let n = row_base + lid;
    if (lid < 512u / l && n < p.n) {
        let s = xs[768u + lid];
        for (var j = 0u; j < 4u; j++) {
            if (q0 + j < nt) {
                skinny_store((t0 + q0 + j) * p.out_stride + p.out_col0 + n, s[j]);
            }
        }
    }
}

// One block of tokens t0 .. t0 + nt (nt ≤ CHUNK_T) against the workgroup's rows from row_base.
fn skinny_block(lid: u32, row_base: u32, t0: u32, nt: u32) {
    let l = p.lanes;
    let m = WideMat(0u, p.scales, p.k, l);
    let lane = lid % l;
    let cpr = row_chunks(m);
    let kv = p.k / 4u;
    // Rows past n read row n − 1 and tokens past nt the block's last (their sums are never
    // stored), so no load sits under a per-lane test.
    let rows = vec4<u32>(row_base + (lid / l) * 4u) + vec4<u32>(0u, 1u, 2u, 3u);
    let rc = min(rows, vec4<u32>(p.n - 1u));
    let xr = p.x_row0 + t0;
    let last = nt - 1u;
    let z = vec4<f32>(0.0);
    var a0 = Quad(z, z, z, z);
    var a1 = Quad(z, z, z, z);
    for (var c = lane; c < cpr; c += l) {
        let w0 = wide_chunk(rc.x * cpr + c);
        let w1 = wide_chunk(rc.y * cpr + c);
        let w2 = wide_chunk(rc.z * cpr + c);
        let w3 = wide_chunk(rc.w * cpr + c);
        let s = vec4<f32>(chunk_scale(m, rc.x, c), chunk_scale(m, rc.y, c), chunk_scale(m, rc.z, c),
            chunk_scale(m, rc.w, c));
        // Word by word (each word's codes made once for every token), the chunk's sums in
        // chunk_dot_v's order: ((w0 + w1) + w2) + w3, from +0 (which changes no sum but a zero's
        // sign, and the accumulators take +0 and −0 alike).
        var s0 = Quad(z, z, z, z);
        var s1 = Quad(z, z, z, z);
        for (var i = 0u; i < 4u; i++) {
            let k = RowCodes(word_codes(w0[i]), word_codes(w1[i]), word_codes(w2[i]),
                word_codes(w3[i]));
            for (var j = 0u; j < 4u; j++) {
                s0 = word_add(s0, j, k, xr + min(j, last), c, i, kv);
                if (CHUNK_T > 4u) {
                    s1 = word_add(s1, j, k, xr + min(4u + j, last), c, i, kv);
                }
            }
        }
        a0 = chunk_add(a0, s0, s);
        if (CHUNK_T > 4u) {
            a1 = chunk_add(a1, s1, s);
        }
    }
    quad_store(lid, a0, row_base, t0, 0u, nt);
    if (CHUNK_T > 4u) {
        quad_store(lid, a1, row_base, t0, 4u, nt);
    }
}

// Workgroup z takes p.tile_t consecutive blocks of CHUNK_T tokens (≥ 1; ops/matmul.rs sets more
// than one for weights too large for L2, the LM head: a block after the first re-reads the rows
// this workgroup just read, from L1/L2, where blocks along z would read them from memory again).
@compute @workgroup_size(128)
fn gemv_skinny(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row_base = (wid.x + wid.y * nwg.x) * (512u / p.lanes);
    let per = max(p.tile_t, 1u);
    for (var b = 0u; b < per; b++) {
        let t0 = (wid.z * per + b) * CHUNK_T;
        if (t0 >= p.t) {
            break;
        }
        skinny_block(lid, row_base, t0, min(p.t - t0, CHUNK_T));
    }
}
