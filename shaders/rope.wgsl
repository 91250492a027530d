// q/k normalisation and partial RoPE, in place on the fused qkv rows [T, (nq + 2·nkv)·hd]. In
// order, as the CPU reference does it:
//   1. RMSNorm of q and k — per head (one hd-vector shared by all heads; norm = 1) or over the whole
//      q / k projection (norm = 2) — or none (norm = 0);
//   2. optional clip of q, k and v to ±clip (OLMoE);
//   3. rotate-half RoPE of the first 2·rot_half dims of every q and k head at position start + t.
// qk_norm_rope (norm 0 and 1): one workgroup of 64 per (head, token) — grid nq + nkv heads, plus
//   the nkv v heads when clipping — hd ≤ 256; invocation l holds the rotated pairs (i, i + rot_half)
//   for i = l and l + 64 and the unrotated dims 2·rot_half + l + 64·m, so a rotation never leaves
//   the invocation: its elements, their norm weights and cos/sin are loaded (one round trip) before
//   any arithmetic, and the per-head norm's sum is the only workgroup step.
// qk_norm_rope_whole (norm 2): one workgroup of 64 per token, the whole projection's sum first.
// qk_norm_rope_store / qk_norm_rope_whole_store: the same, and each token's finished k and v heads
//   are also written to the layer's caches k_cache / v_cache [capacity][nkv·hd] at row start + t —
//   the attention's K/V store folded in (the store kernels always run the v heads). The cache is
//   only written here, never read, so binding it read_write costs nothing. A cache may be one
//   range of a layer buffer several sequences share (the server's KV arena): its rows start at
//   cache row `base`.
// qk_norm_rope_store_seqs / qk_norm_rope_whole_store_seqs: the store kernels over the rows of
//   several sequences of one batched pass, each row's (position, cache row) from the host's row
//   table `row_tab`, so one dispatch serves every sequence (their caches share the layer buffers);
//   each row is computed exactly as its sequence's pass alone computes it.
// cos/sin come from a table [position][rot_half] of vec2 (cos, sin) computed on the host in f64:
// an f32 angle pos·θ^(−2i/d) is off by ~1e-4 rad at position 8192, and GPU sin/cos of large
// arguments are loose.

#include "reduce"

struct RopeParams {
    t: u32,
    nq: u32,
    nkv: u32,
    hd: u32,
    rot_half: u32,
    norm: u32,
    start: u32,
    clip_on: u32,
    clip: f32,
    eps: f32,
    base: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: RopeParams;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> q_norm: array<f32>;
@group(0) @binding(3) var<storage, read> k_norm: array<f32>;
@group(0) @binding(4) var<storage, read> rope: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(6) var<storage, read_write> v_cache: array<f32>;
// (position, cache row) of each row of a batched pass.
@group(0) @binding(7) var<storage, read> row_tab: array<vec2<u32>>;

// Normalises qkv[base .. base + len) with weights starting at w0 of q_norm (q) or k_norm (k).
fn norm_segment(base: u32, len: u32, is_q: bool, lane: Lane) {
    var ss = 0.0;
    for (var i = lane.id; i < len; i += 64u) {
        let v = qkv[base + i];
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(len) + p.eps);
    for (var i = lane.id; i < len; i += 64u) {
        let w = select(k_norm[i], q_norm[i], is_q);
        qkv[base + i] = qkv[base + i] * inv * w;
    }
}

// One invocation's elements of a head: the rotated pairs (i, i + rot_half) for i = lid (a) and
// i = lid + 64 (b), and the unrotated tail 2·rot_half + lid + 64·m (tl[m]), so that a rotation's
// partner is always in the same invocation. hd ≤ 256 needs at most two pairs and four tail slots.
struct HeadVals {
    a: vec2<f32>,
    b: vec2<f32>,
    tl: vec4<f32>,
}

fn pair_ok(i: u32) -> bool {
    return i < p.rot_half;
}

fn tail_ok(m: u32, lid: u32) -> bool {
    return 2u * p.rot_half + lid + 64u * m < p.hd;
}

fn norm_w(i: u32, is_q: bool) -> f32 {
    return select(k_norm[i], q_norm[i], is_q);
}

fn rotate(x: vec2<f32>, cs: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(x.x * cs.x - x.y * cs.y, x.y * cs.x + x.x * cs.y);
}

// Head h of row t (at position pos) after norm, clip and RoPE, in registers (HeadVals' layout);
// the caller writes it back. Every load is issued before any arithmetic, and no element crosses
// invocations: the only barriers are the norm's sum.
fn head_out(lane: Lane, h: u32, t: u32, pos: u32) -> HeadVals {
    let lid = lane.id;
    let rh = p.rot_half;
    let is_q = h < p.nq;
    let is_qk = h < p.nq + p.nkv;
    let base = t * (p.nq + 2u * p.nkv) * p.hd + h * p.hd;
    let tab = pos * rh;
    let t0 = base + 2u * rh + lid;
    var x = HeadVals(vec2<f32>(0.0), vec2<f32>(0.0), vec4<f32>(0.0));
    var w = HeadVals(vec2<f32>(0.0), vec2<f32>(0.0), vec4<f32>(0.0));
    var csa = vec2<f32>(1.0, 0.0);
    var csb = vec2<f32>(1.0, 0.0);
    let ia = lid;
    let ib = lid + 64u;
    let norm = p.norm == 1u && is_qk;
    if (pair_ok(ia)) {
        x.a = vec2<f32>(qkv[base + ia], qkv[base + ia + rh]);
        csa = rope[tab + ia];
        if (norm) {
            w.a = vec2<f32>(norm_w(ia, is_q), norm_w(ia + rh, is_q));
        }
    }
    if (pair_ok(ib)) {
        x.b = vec2<f32>(qkv[base + ib], qkv[base + ib + rh]);
        csb = rope[tab + ib];
        if (norm) {
            w.b = vec2<f32>(norm_w(ib, is_q), norm_w(ib + rh, is_q));
        }
    }
    let wt0 = 2u * rh + lid;
    if (tail_ok(0u, lid)) {
        x.tl.x = qkv[t0];
        if (norm) {
            w.tl.x = norm_w(wt0, is_q);
        }
    }
    if (tail_ok(1u, lid)) {
        x.tl.y = qkv[t0 + 64u];
        if (norm) {
            w.tl.y = norm_w(wt0 + 64u, is_q);
        }
    }
    if (tail_ok(2u, lid)) {
        x.tl.z = qkv[t0 + 128u];
        if (norm) {
            w.tl.z = norm_w(wt0 + 128u, is_q);
        }
    }
    if (tail_ok(3u, lid)) {
        x.tl.w = qkv[t0 + 192u];
        if (norm) {
            w.tl.w = norm_w(wt0 + 192u, is_q);
        }
    }
    if (norm) {
        let ss = (dot(x.a, x.a) + dot(x.b, x.b)) + dot(x.tl, x.tl);
        let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(p.hd) + p.eps);
        x.a = x.a * inv * w.a;
        x.b = x.b * inv * w.b;
        x.tl = x.tl * inv * w.tl;
    }
    if (p.clip_on != 0u) {
        x.a = clamp(x.a, vec2<f32>(-p.clip), vec2<f32>(p.clip));
        x.b = clamp(x.b, vec2<f32>(-p.clip), vec2<f32>(p.clip));
        x.tl = clamp(x.tl, vec4<f32>(-p.clip), vec4<f32>(p.clip));
    }
    if (is_qk) {
        x.a = rotate(x.a, csa);
        x.b = rotate(x.b, csb);
    }
    return x;
}

fn head_base(h: u32, t: u32) -> u32 {
    return t * (p.nq + 2u * p.nkv) * p.hd + h * p.hd;
}

// The at most 8 (index, value) pairs of an invocation's head elements in slot order (HeadVals'
// layout); index 0xffffffff where the slot is empty.
fn slot_of(x: HeadVals, lid: u32, k: u32) -> vec2<u32> {
    let rh = p.rot_half;
    let t0 = 2u * rh + lid;
    var i = 0xffffffffu;
    var v = 0.0;
    switch k {
        case 0u: { if (pair_ok(lid)) { i = lid; v = x.a.x; } }
        case 1u: { if (pair_ok(lid)) { i = lid + rh; v = x.a.y; } }
        case 2u: { if (pair_ok(lid + 64u)) { i = lid + 64u; v = x.b.x; } }
        case 3u: { if (pair_ok(lid + 64u)) { i = lid + 64u + rh; v = x.b.y; } }
        case 4u: { if (tail_ok(0u, lid)) { i = t0; v = x.tl.x; } }
        case 5u: { if (tail_ok(1u, lid)) { i = t0 + 64u; v = x.tl.y; } }
        case 6u: { if (tail_ok(2u, lid)) { i = t0 + 128u; v = x.tl.z; } }
        default: { if (tail_ok(3u, lid)) { i = t0 + 192u; v = x.tl.w; } }
    }
    return vec2<u32>(i, bitcast<u32>(v));
}
@compute @workgroup_size(64)
fn qk_norm_rope(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let x = head_out(lane, wid.x, wid.y, p.start + wid.y);
    let base = head_base(wid.x, wid.y);
    for (var k = 0u; k < 8u; k++) {
        let e = slot_of(x, lane.id, k);
        if (e.x != 0xffffffffu) {
            qkv[base + e.x] = bitcast<f32>(e.y);
        }
    }
}

// Head h of row t at position pos, written back and, for k and v heads, to cache row crow.
fn store_head(lane: Lane, h: u32, t: u32, pos: u32, crow: u32) {
    let x = head_out(lane, h, t, pos);
    let kv_dim = p.nkv * p.hd;
    // Heads nq.. are k heads, then v heads: (h − nq)·hd is the column in [k | v] of this row.
    let col = (h - min(h, p.nq)) * p.hd;
    let base = head_base(h, t);
    let at = select(crow * kv_dim + col, crow * kv_dim + col - kv_dim, h >= p.nq + p.nkv);
    for (var k = 0u; k < 8u; k++) {
        let e = slot_of(x, lane.id, k);
        if (e.x != 0xffffffffu) {
            let v = bitcast<f32>(e.y);
            qkv[base + e.x] = v;
            if (h >= p.nq + p.nkv) {
                v_cache[at + e.x] = v;
            } else if (h >= p.nq) {
                k_cache[at + e.x] = v;
            }
        }
    }
}

@compute @workgroup_size(64)
fn qk_norm_rope_store(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let pos = p.start + wid.y;
    store_head(lane, wid.x, wid.y, pos, p.base + pos);
}

@compute @workgroup_size(64)
fn qk_norm_rope_store_seqs(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let r = row_tab[wid.y];
    store_head(lane, wid.x, wid.y, r.x, r.y);
}

// The whole-projection kernel's work on row t (at position pos), in place.
fn whole_row(lane: Lane, t: u32, pos: u32) {
    let qd = p.nq * p.hd;
    let kd = p.nkv * p.hd;
    let row = t * (qd + 2u * kd);
    if (p.norm == 1u) {
        for (var h = 0u; h < p.nq + p.nkv; h++) {
            norm_segment(row + h * p.hd, p.hd, h < p.nq, lane);
        }
    } else if (p.norm == 2u) {
        norm_segment(row, qd, true, lane);
        norm_segment(row + qd, kd, false, lane);
    }
    // Norm, clip and RoPE each touch elements another invocation wrote in the step before.
    storageBarrier();
    workgroupBarrier();
    if (p.clip_on != 0u) {
        for (var i = lane.id; i < qd + 2u * kd; i += 64u) {
            qkv[row + i] = clamp(qkv[row + i], -p.clip, p.clip);
        }
    }
    storageBarrier();
    workgroupBarrier();
    let pairs = (p.nq + p.nkv) * p.rot_half;
    let tab = pos * p.rot_half;
    for (var j = lane.id; j < pairs; j += 64u) {
        let i = j % p.rot_half;
        let base = row + (j / p.rot_half) * p.hd;
        let cs = rope[tab + i];
        let a = qkv[base + i];
        let b = qkv[base + i + p.rot_half];
        qkv[base + i] = a * cs.x - b * cs.y;
        qkv[base + i + p.rot_half] = b * cs.x + a * cs.y;
    }
}

@compute @workgroup_size(64)
fn qk_norm_rope_whole(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    whole_row(lane, wid.x, p.start + wid.x);
}

// Row t at position pos, then its k and v to cache row crow.
fn whole_store(lane: Lane, t: u32, pos: u32, crow: u32) {
    whole_row(lane, t, pos);
    // The rotation's pairs were written by other invocations.
    storageBarrier();
    workgroupBarrier();
    let kv_dim = p.nkv * p.hd;
    let src = t * (p.nq * p.hd + 2u * kv_dim) + p.nq * p.hd;
    let dst = crow * kv_dim;
    for (var i = lane.id; i < kv_dim; i += 64u) {
        k_cache[dst + i] = qkv[src + i];
        v_cache[dst + i] = qkv[src + kv_dim + i];
    }
}

@compute @workgroup_size(64)
fn qk_norm_rope_whole_store(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let pos = p.start + wid.x;
    whole_store(lane, wid.x, pos, p.base + pos);
}

@compute @workgroup_size(64)
fn qk_norm_rope_whole_store_seqs(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let r = row_tab[wid.x];
    whole_store(lane, wid.x, r.x, r.y);
}
