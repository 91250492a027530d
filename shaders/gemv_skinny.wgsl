// y = x · Wᵀ for token blocks (5–32 activation rows: diffusion blocks, batched passes, the LM head
// of a block) with q4 or q8 weights (WTYPE 3 / 2, lib/dequant.wgsl's layout), x [t, k] and y f32:
// each weight chunk is read once for up to CHUNK_T tokens, whose partial sums stay in registers.
// gemv_wide.wgsl stages its activations in shared memory, which holds only 4096 values, so a
// 2048-wide row takes token blocks of two and re-reads the weight (and restages) every two tokens;
// here the activations come straight from memory (the block's rows stay in L1/L2: 16 rows of
// 2048 are 128 KB) and nothing waits on a staging barrier.
// Tiling: 128 invocations, 512 / L weight rows a workgroup (L = p.lanes, 16), a row group of L
// lanes works 4 rows, lane j their chunks j, j + L, …; workgroup z is a block of CHUNK_T tokens
// (an override: 4, 8, 12 or 16; ops/matmul.rs picks the smallest that holds the pass, blocks of 16
// past it). Workgroups fold into x × y past 65535.
// Sums: the same chunk expression (lib/wide_gemv.wgsl chunk_dot_v), the same chunk order a lane
// and the same lane reduction (wide_reduce) as gemv_wide, so every (row, token) result equals
// gemv_wide's bit for bit, whichever tokens share a block (ops/batch_class.rs).
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

// Tokens a workgroup holds in registers (a multiple of 4, at most 16).
override CHUNK_T: u32 = 16u;

fn wide_chunk(i: u32) -> vec4<u32> {
    return w4[i];
}

fn wide_word(i: u32) -> u32 {
    return w_words[i];
}

fn wide_x(t: u32, g: u32) -> vec4<f32> {
    return x_act[t * (p.k / 4u) + g];
}

// The activations of chunk `c` of activation row `r` (vec4s from `b` = r · k / 4 + c · values / 4).
fn x_chunk(b: u32) -> array<vec4<f32>, 8> {
    var x: array<vec4<f32>, 8>;
    if ((PROBE & 2u) != 0u) {
        for (var v = 0u; v < 8u; v++) {
            x[v] = vec4<f32>(1e-3);
        }
        return x;
    }
    x[0] = x_act[b];
    x[1] = x_act[b + 1u];
    x[2] = x_act[b + 2u];
    x[3] = x_act[b + 3u];
    if (WTYPE != WIDE_Q8) {
        x[4] = x_act[b + 4u];
        x[5] = x_act[b + 5u];
        x[6] = x_act[b + 6u];
        x[7] = x_act[b + 7u];
    }
    return x;
}

fn skinny_store(i: u32, v: f32) {
    if ((p.mode & MODE_ACCUM) != 0u) {
        out[i] = out[i] + v;
    } else {
        out[i] = v;
    }
}

// A row group's four weight chunks and their scales.
struct Chunks {
    w0: vec4<u32>,
    w1: vec4<u32>,
    w2: vec4<u32>,
    w3: vec4<u32>,
    s: vec4<f32>,
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

// Adds token j's (0 .. 3) scaled chunk sums of activation row `r` (chunk c) to `a`: each row's
// component j, the others +0 (which changes none: the partials start at +0, never −0).
fn quad_add(a: Quad, j: u32, ch: Chunks, r: u32, c: u32, kv: u32) -> Quad {
    let x = x_chunk(r * kv + c * (chunk_vals() / 4u));
    let d = vec4<f32>(chunk_dot_v(ch.w0, x), chunk_dot_v(ch.w1, x), chunk_dot_v(ch.w2, x),
        chunk_dot_v(ch.w3, x)) * ch.s;
    return Quad(a.r0 + at_token(j, d.x), a.r1 + at_token(j, d.y), a.r2 + at_token(j, d.z),
        a.r3 + at_token(j, d.w));
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

@compute @workgroup_size(128)
fn gemv_skinny(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let l = p.lanes;
    let m = WideMat(0u, p.scales, p.k, l);
    let t0 = wid.z * CHUNK_T;
    let nt = min(p.t - t0, CHUNK_T);
    let row_base = (wid.x + wid.y * nwg.x) * (512u / l);
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
    var a2 = Quad(z, z, z, z);
    var a3 = Quad(z, z, z, z);
    for (var c = lane; c < cpr; c += l) {
        let ch = Chunks(wide_chunk(rc.x * cpr + c), wide_chunk(rc.y * cpr + c),
            wide_chunk(rc.z * cpr + c), wide_chunk(rc.w * cpr + c),
            vec4<f32>(chunk_scale(m, rc.x, c), chunk_scale(m, rc.y, c), chunk_scale(m, rc.z, c),
                chunk_scale(m, rc.w, c)));
        for (var j = 0u; j < 4u; j++) {
            a0 = quad_add(a0, j, ch, xr + min(j, last), c, kv);
            if (CHUNK_T > 4u) {
                a1 = quad_add(a1, j, ch, xr + min(4u + j, last), c, kv);
            }
            if (CHUNK_T > 8u) {
                a2 = quad_add(a2, j, ch, xr + min(8u + j, last), c, kv);
            }
            if (CHUNK_T > 12u) {
                a3 = quad_add(a3, j, ch, xr + min(12u + j, last), c, kv);
            }
        }
    }
    quad_store(lid, a0, row_base, t0, 0u, nt);
    if (CHUNK_T > 4u) {
        quad_store(lid, a1, row_base, t0, 4u, nt);
    }
    if (CHUNK_T > 8u) {
        quad_store(lid, a2, row_base, t0, 8u, nt);
    }
    if (CHUNK_T > 12u) {
        quad_store(lid, a3, row_base, t0, 12u, nt);
    }
}
