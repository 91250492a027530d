// The GEMV expert kernels (moe_gemv.wgsl's grid columns and expert lookups, lib/expert_begin.wgsl)
// with an octet of 8 invocations a weight row and 16-byte loads: y = x · Wᵀ for the expert's few
// tokens, q4/q8 weights in file layout through the slot table.
//
// Why: the word-a-lane kernel spends ≈ 70 instructions on every 4-byte weight word (a scale load
// and decode per octet of values, an address and a bounds test per activation row) and keeps only
// 16 bytes of weights in flight an invocation. Here an invocation works whole 16-byte chunks (one
// q4 group of 32 values, or half a q8 group: one scale a chunk, applied once per chunk and token),
// issues DEPTH chunks' loads before their arithmetic (64 bytes in flight at DEPTH 4), and decodes
// each chunk once for all of the pass's CHUNK_T tokens.
//
// Layout: a workgroup of 256 invocations is 32 octets, octet r works weight row r of the block,
// lane o of the octet the row's chunks o, o + 8, o + 16, … (neighbouring lanes read neighbouring
// 16 bytes: an octet reads 128 contiguous bytes a round). A chunk's 32 (q4) or 16 (q8) values are
// consecutive; its activations are read as vec4s from x_act (row-major [rows, k], L1 hits: the
// block's 32 rows read the same ones). Per token, a lane's partial is Σ over its chunks in
// ascending order of scale · (Σ code · x, in a fixed order), and the octet's 8 partials meet in
// octet_sum4 — so a (row, token) sum is the same whatever tokens share the pass.
// - expert_gate_up_octet: 16 columns a workgroup (grid y): octets 0..15 the gate rows c0 + r,
//   16..31 the up rows; writes h[slot, c] = act(gate) · up for each of the expert's assignments.
// - expert_down_octet: 32 rows of down [H, I] a workgroup, writes y[slot, n].
// Rows hold whole chunks (k a multiple of 32), and chunks start on 16-byte boundaries: the host
// takes these kernels only for q4/q8 parts whose word offset in a slot is a multiple of 4.

#include "dequant"
#include "moe_meta"
#include "gate_act"
#include "reduce"

@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> slots: array<u32>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<uniform> ep: ExpertParams;
@group(0) @binding(7) var<storage, read> shared_w: array<u32>;
// Bindings 1 and 7 again, as vec4s for the chunks.
@group(0) @binding(8) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> shared_w4: array<vec4<u32>>;

const NONE: u32 = 0xffffffffu;
// Tokens a pass over the block's rows (1, 2 or 4): registers hold CHUNK_T tokens' sums.
override CHUNK_T: u32 = 2u;
// Chunks whose loads an invocation issues before their arithmetic (2, 4 or 8).
override DEPTH: u32 = 4u;

// The gate rows' sums of expert_gate_up_octet, [16 columns] × 4 tokens.
var<workgroup> gate_sums: array<vec4<f32>, 16>;

#include "expert_begin"

fn w_word(i: u32) -> u32 {
    if (is_shared) {
        return shared_w[i];
    }
    return w_words[i];
}

fn w_chunk(i: u32) -> vec4<u32> {
    if (is_shared) {
        return shared_w4[i];
    }
    return w4[i];
}

// Values a chunk holds.
fn chunk_len() -> u32 {
    return select(16u, 32u, WTYPE == W_Q4);
}

// The scale of chunk `g` (the matrix's g-th, row-major) of the matrix whose scales start at word
// `scales`.
fn chunk_scale(scales: u32, g: u32) -> f32 {
    if ((PROBE & 1u) != 0u) {
        return 1.0;
    }
    let grp = select(g / 2u, g, WTYPE == W_Q4);
    return unpack_half2(w_word(scales + grp / 2u))[grp & 1u];
}

// The chunk's values as 8 vec4s (q4: codes − 8; q8: the 16 signed codes in the first four).
struct Vals {
    v0: vec4<f32>,
    v1: vec4<f32>,
    v2: vec4<f32>,
    v3: vec4<f32>,
    v4: vec4<f32>,
    v5: vec4<f32>,
    v6: vec4<f32>,
    v7: vec4<f32>,
}

fn chunk_vals(w: vec4<u32>) -> Vals {
    if ((PROBE & 1u) != 0u) {
        let f = vec4<f32>(probe_float(w.x), probe_float(w.y), probe_float(w.z), probe_float(w.w));
        return Vals(f, f, f, f, f, f, f, f);
    }
    if (WTYPE == W_Q4) {
        return Vals(q4x4(w.x, 0u), q4x4(w.x, 16u), q4x4(w.y, 0u), q4x4(w.y, 16u),
            q4x4(w.z, 0u), q4x4(w.z, 16u), q4x4(w.w, 0u), q4x4(w.w, 16u));
    }
    let z = vec4<f32>(0.0);
    return Vals(sext8x4(w.x), sext8x4(w.y), sext8x4(w.z), sext8x4(w.w), z, z, z, z);
}

// Σ code · x of chunk values `v` against activation row `r` (NONE: 0) from value k.
fn vals_dot(v: Vals, r: u32, k: u32) -> f32 {
    if (r == NONE) {
        return 0.0;
    }
    if ((PROBE & 2u) != 0u) {
        return dot(v.v0 + v.v1, vec4<f32>(1e-3));
    }
    let b = (r * ep.k + k) / 4u;
    let s = (dot(v.v0, x_act[b]) + dot(v.v1, x_act[b + 1u]))
        + (dot(v.v2, x_act[b + 2u]) + dot(v.v3, x_act[b + 3u]));
    if (WTYPE != W_Q4) {
        return s;
    }
    return s + ((dot(v.v4, x_act[b + 4u]) + dot(v.v5, x_act[b + 5u]))
        + (dot(v.v6, x_act[b + 6u]) + dot(v.v7, x_act[b + 7u])));
}

// acc (a vec4 over the pass's tokens) plus chunk `c` of row `row`'s share for tokens xr.
fn chunk_acc(acc: vec4<f32>, w: vec4<u32>, scale: f32, c: u32, xr: vec4<u32>) -> vec4<f32> {
    let v = chunk_vals(w);
    let k = c * chunk_len();
    var d = vec4<f32>(0.0);
    d.x = vals_dot(v, xr.x, k);
    if (CHUNK_T > 1u) {
        d.y = vals_dot(v, xr.y, k);
    }
    if (CHUNK_T > 2u) {
        d.z = vals_dot(v, xr.z, k);
        d.w = vals_dot(v, xr.w, k);
    }
    return acc + d * scale;
}

// The octet's sums of weight row `row` (NONE: zeros, but the octet still takes part in the
// reduction, whose trip counts are uniform) with activation rows xr, for its lane o.
fn row_sums(row: u32, xr: vec4<u32>, o: u32, lane: Lane) -> vec4<f32> {
    let cpr = ep.k / chunk_len();
    let base4 = ex_base / 4u + select(row, 0u, row == NONE) * cpr;
    let sbase = select(row, 0u, row == NONE) * cpr;
    var acc = vec4<f32>(0.0);
    var c = o;
    if (row != NONE) {
        for (; DEPTH >= 4u && c + 24u < cpr; c += 32u) {
            let w0 = w_chunk(base4 + c);
            let w1 = w_chunk(base4 + c + 8u);
            let w2 = w_chunk(base4 + c + 16u);
            let w3 = w_chunk(base4 + c + 24u);
            let s0 = chunk_scale(ex_scales, sbase + c);
            let s1 = chunk_scale(ex_scales, sbase + c + 8u);
            let s2 = chunk_scale(ex_scales, sbase + c + 16u);
            let s3 = chunk_scale(ex_scales, sbase + c + 24u);
            acc = chunk_acc(acc, w0, s0, c, xr);
            acc = chunk_acc(acc, w1, s1, c + 8u, xr);
            acc = chunk_acc(acc, w2, s2, c + 16u, xr);
            acc = chunk_acc(acc, w3, s3, c + 24u, xr);
        }
        for (; c + 8u < cpr; c += 16u) {
            let w0 = w_chunk(base4 + c);
            let w1 = w_chunk(base4 + c + 8u);
            let s0 = chunk_scale(ex_scales, sbase + c);
            let s1 = chunk_scale(ex_scales, sbase + c + 8u);
            acc = chunk_acc(acc, w0, s0, c, xr);
            acc = chunk_acc(acc, w1, s1, c + 8u, xr);
        }
        for (; c < cpr; c += 8u) {
            acc = chunk_acc(acc, w_chunk(base4 + c), chunk_scale(ex_scales, sbase + c), c, xr);
        }
    }
    return octet_sum4(acc, lane);
}

@compute @workgroup_size(256)
fn expert_gate_up_octet(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lane.id;
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let r = lid / 8u;
    let o = lid % 8u;
    let c = wid.y * 16u + r % 16u;
    // Octets 0..15: gate rows, 16..31: up rows of the same columns.
    let row = select(NONE, select(ep.n + c, c, r < 16u), c < ep.n);
    for (var t0 = 0u; t0 < cnt; t0 += CHUNK_T) {
        var xr = vec4<u32>(NONE);
        for (var i = 0u; i < CHUNK_T; i++) {
            if (t0 + i < cnt) {
                xr[i] = expert_token(first, t0 + i);
            }
        }
        let s = row_sums(row, xr, o, lane);
        if (r < 16u && o == 0u) {
            gate_sums[r] = s;
        }
        workgroupBarrier();
        if (r >= 16u && o < CHUNK_T && c < ep.n && t0 + o < cnt) {
            out[(first + t0 + o) * ep.n + c] = gate_act(gate_sums[r - 16u][o]) * s[o];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn expert_down_octet(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lane.id;
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let o = lid % 8u;
    let n = wid.y * 32u + lid / 8u;
    let row = select(NONE, n, n < ep.n);
    for (var t0 = 0u; t0 < cnt; t0 += CHUNK_T) {
        var xr = vec4<u32>(NONE);
        for (var i = 0u; i < CHUNK_T; i++) {
            if (t0 + i < cnt) {
                xr[i] = first + t0 + i;
            }
        }
        let s = row_sums(row, xr, o, lane);
        if (o < CHUNK_T && n < ep.n && t0 + o < cnt) {
            out[(first + t0 + o) * ep.n + n] = s[o];
        }
    }
}
