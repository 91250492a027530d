// y = x · Wᵀ for few activation rows (1–16) with q4 or q8 weights (WTYPE 3 / 2, lib/dequant.wgsl's
// layout), x [t, k] and y f32 — gemv.wgsl's job, with the wide loads a memory-bound gemv needs on a
// large GPU: each invocation reads its weight row 16 bytes at a time (a vec4<u32> "chunk": 32 q4
// values, exactly one quantisation group, or 16 q8 values, half of one), so one scale multiplies a
// whole chunk's sum, and every weight row of the workgroup reuses the activations it loads.
//
// Tiling: a workgroup of 128 invocations works 512 / L weight rows, 4 per row group of L = p.lanes
// invocations (64 for rows of ≥ 64 chunks, else 16; the host picks); lane j of a group walks chunks
// j, j + L, … of its 4 rows, all four rows' chunks loaded before their arithmetic. The block's
// activation rows (workgroup z: TB = p.tile_t rows from z · TB, TB · k ≤ 4096) are staged in shared
// memory chunk-major (vec4 v of chunk c at v · chunks + c), so neighbouring lanes read neighbouring
// vec4s; each (row, token) sum is then Σ over the lane's chunks of scale · (Σ code · x), the lanes'
// partials (vec4 over the block's tokens) summed in a fixed two-level order (4 lanes, then L / 4
// partials) — the same arithmetic however many tokens share the dispatch, so a batched pass's rows
// equal each pass alone bit for bit (ops/batch_class.rs).
// Nibbles and bytes become floats through the exponent trick (2^23 + c as a bit pattern, minus
// 2^23), not integer conversions, which run at a fraction of the float rate on NVIDIA.
// - gemv_wide: rows n of W.
// - gemv_wide_swiglu: a dense MLP's fused [gate; up] (p.n = 2I rows); a row group works gate c,
//   gate c + 1, up c, up c + 1 and writes silu(gate) · up into h[t, out_col0 + c].

#include "matmul_params"
#include "half"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer as w4, for the scales (one f16 per group of 32 values).
@group(0) @binding(4) var<storage, read> w_words: array<u32>;

override WTYPE: u32 = 3u;
const W_Q8: u32 = 2u;

const WG: u32 = 128u;
// Staged activations (16 KB: the WebGPU default workgroup storage), reused for the partial sums.
const XS: u32 = 1024u;
var<workgroup> xs: array<vec4<f32>, XS>;

const EXP_BIAS: u32 = 0x4B000000u;

// Values a chunk holds and the vec4 activations they meet.
fn chunk_vals() -> u32 {
    return select(32u, 16u, WTYPE == W_Q8);
}

// Σ code · x over one word (8 q4 or 4 q8 codes) of a chunk against staged activations from
// xs[b] (its second vec4, q4, at xs[b + cs]): q4 codes are (nibble − 8), q8 codes signed bytes.
fn word_dot(c: u32, b: u32, cs: u32) -> f32 {
    let w = vec4<u32>(c);
    if (WTYPE == W_Q8) {
        let u = ((w >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u)) ^ vec4<u32>(128u);
        return dot(bitcast<vec4<f32>>(u | vec4<u32>(EXP_BIAS)) - vec4<f32>(8388736.0), xs[b]);
    }
    let lo = ((w >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) | vec4<u32>(EXP_BIAS);
    let hi = ((w >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)) | vec4<u32>(EXP_BIAS);
    return dot(bitcast<vec4<f32>>(lo) - vec4<f32>(8388616.0), xs[b])
        + dot(bitcast<vec4<f32>>(hi) - vec4<f32>(8388616.0), xs[b + cs]);
}

// Σ code · x over chunk `w` against its staged activations from xs[base] (stride `cs` between the
// chunk's vec4s); the caller applies the scale.
fn chunk_dot(w: vec4<u32>, base: u32, cs: u32) -> f32 {
    let step = select(2u, 1u, WTYPE == W_Q8) * cs;
    return ((word_dot(w.x, base, cs) + word_dot(w.y, base + step, cs))
        + word_dot(w.z, base + 2u * step, cs)) + word_dot(w.w, base + 3u * step, cs);
}

// The scale of chunk `c` of weight row `row` (rows of `cpr` chunks).
fn chunk_scale(row: u32, c: u32, cpr: u32) -> f32 {
    var g = row * cpr + c;
    if (WTYPE == W_Q8) {
        g = g / 2u;
    }
    return unpack_half2(w_words[p.scales + g / 2u])[g & 1u];
}

// Stages activation rows t0 .. t0 + nt (nt ≤ p.tile_t) chunk-major.
fn stage(lid: u32, t0: u32, nt: u32) {
    let kv = p.k / 4u;
    let vpc = chunk_vals() / 4u;
    let cpr = p.k / chunk_vals();
    for (var i = lid; i < nt * kv; i += WG) {
        let t = i / kv;
        let g = i % kv;
        xs[t * kv + (g % vpc) * cpr + g / vpc] = x_act[(p.x_row0 + t0 + t) * kv + g];
    }
}

// This lane's partial sums (vec4 over the block's tokens) for its group's 4 rows rows[0..4]
// (≥ p.n: none), left in xs[(group · 4 + r) · L + lane] after the call (a barrier inside).
fn partials(lid: u32, rows: vec4<u32>, nt: u32) {
    let l = p.lanes;
    let lane = lid % l;
    let grp = lid / l;
    let cpr = p.k / chunk_vals();
    let kv = p.k / 4u;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    let ok = rows < vec4<u32>(p.n);
    // Row r's chunk c is w4[rows[r] · cpr + c] (rows start on 16-byte boundaries: k % 32 == 0).
    for (var c = lane; c < cpr; c += l) {
        var w0 = vec4<u32>(0u);
        var w1 = vec4<u32>(0u);
        var w2 = vec4<u32>(0u);
        var w3 = vec4<u32>(0u);
        var s = vec4<f32>(0.0);
        if (ok.x) { w0 = w4[rows.x * cpr + c]; s.x = chunk_scale(rows.x, c, cpr); }
        if (ok.y) { w1 = w4[rows.y * cpr + c]; s.y = chunk_scale(rows.y, c, cpr); }
        if (ok.z) { w2 = w4[rows.z * cpr + c]; s.z = chunk_scale(rows.z, c, cpr); }
        if (ok.w) { w3 = w4[rows.w * cpr + c]; s.w = chunk_scale(rows.w, c, cpr); }
        for (var t = 0u; t < nt; t++) {
            let b = t * kv + c;
            let d = vec4<f32>(chunk_dot(w0, b, cpr), chunk_dot(w1, b, cpr), chunk_dot(w2, b, cpr),
                chunk_dot(w3, b, cpr)) * s;
            // Token t's component of each row's accumulator (select keeps the index constant).
            a0 += select(vec4<f32>(0.0), vec4<f32>(d.x), vec4<u32>(t) == vec4<u32>(0u, 1u, 2u, 3u));
            a1 += select(vec4<f32>(0.0), vec4<f32>(d.y), vec4<u32>(t) == vec4<u32>(0u, 1u, 2u, 3u));
            a2 += select(vec4<f32>(0.0), vec4<f32>(d.z), vec4<u32>(t) == vec4<u32>(0u, 1u, 2u, 3u));
            a3 += select(vec4<f32>(0.0), vec4<f32>(d.w), vec4<u32>(t) == vec4<u32>(0u, 1u, 2u, 3u));
        }
    }
    workgroupBarrier();
    let base = grp * 4u * l + lane;
    xs[base] = a0;
    xs[base + l] = a1;
    xs[base + 2u * l] = a2;
    xs[base + 3u * l] = a3;
    workgroupBarrier();
}

// Sums the partials of xs: row slot s (group s / 4, row s % 4) of the workgroup, vec4 over tokens.
// Level 1: invocation i sums 4 lanes' partials of slot i / (L / 4) into xs[512 + i]; level 2: slot
// s sums its L / 4 level-1 sums in order into xs[768 + s] (invocations < 512 / L; others return 0).
fn reduce(lid: u32) -> vec4<f32> {
    let l = p.lanes;
    let per = l / 4u;
    let slot = lid / per;
    let q = lid % per;
    let b = slot * l + q * 4u;
    let s1 = ((xs[b] + xs[b + 1u]) + xs[b + 2u]) + xs[b + 3u];
    workgroupBarrier();
    xs[512u + lid] = s1;
    workgroupBarrier();
    var s = vec4<f32>(0.0);
    if (lid < 512u / l) {
        for (var j = 0u; j < per; j++) {
            s += xs[512u + lid * per + j];
        }
        xs[768u + lid] = s;
    }
    return s;
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
    let t0 = wid.z * p.tile_t;
    let nt = min(p.t - t0, p.tile_t);
    let row0 = group_id(wid, nwg) * (512u / p.lanes) + (lid / p.lanes) * 4u;
    stage(lid, t0, nt);
    workgroupBarrier();
    partials(lid, vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), nt);
    let s = reduce(lid);
    if (lid < 512u / p.lanes) {
        let row = group_id(wid, nwg) * (512u / p.lanes) + lid;
        if (row < p.n) {
            for (var t = 0u; t < nt; t++) {
                out[(t0 + t) * p.out_stride + p.out_col0 + row] = s[t];
            }
        }
    }
}

@compute @workgroup_size(128)
fn gemv_wide_swiglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let inter = p.n / 2u;
    let t0 = wid.z * p.tile_t;
    let nt = min(p.t - t0, p.tile_t);
    // Columns c0, c0 + 1 per row group: 2 · (128 / L) columns per workgroup.
    let c0 = group_id(wid, nwg) * (256u / p.lanes) + (lid / p.lanes) * 2u;
    let gate = vec4<u32>(c0, c0 + 1u, inter + c0, inter + c0 + 1u);
    let rows = select(vec4<u32>(p.n), gate, vec4<u32>(c0, c0 + 1u, c0, c0 + 1u) < vec4<u32>(inter));
    stage(lid, t0, nt);
    workgroupBarrier();
    partials(lid, rows, nt);
    _ = reduce(lid);
    workgroupBarrier();
    // Slot g · 4 + r of xs[768 ..]: r 0 / 1 the gate of columns c0, c0 + 1 of row group g, 2 / 3
    // their up rows.
    if (lid < 256u / p.lanes) {
        let c = group_id(wid, nwg) * (256u / p.lanes) + lid;
        let slot = (lid / 2u) * 4u + lid % 2u;
        let g = xs[768u + slot];
        let u = xs[768u + slot + 2u];
        if (c < inter) {
            for (var t = 0u; t < nt; t++) {
                out[(t0 + t) * p.out_stride + p.out_col0 + c] = g[t] / (1.0 + exp(-g[t])) * u[t];
            }
        }
    }
}
