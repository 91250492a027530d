// Attention heads of a layer with its own geometry (DiffusionGemma: sliding layers of head_dim
// 256 with full RoPE, global layers of head_dim 512 with K = V and proportional RoPE; the CPU
// reference is backend/cpu/gemma.rs prepare_heads / attention_heads).
// - prepare_heads (one workgroup of 64 per (row, head slot); slots: q heads, k heads, v heads):
//   out [T, q | k | v] from the fused projection [T, q | k (| v)]: q and k heads RMS-normed with
//   their weight and rotated (pairs (i, i + offset), i < pairs, by the host's cos/sin table
//   [T, pairs] computed in f64 like the CPU's angle); v heads from the v rows, or k's raw rows
//   when has_v = 0 (K = V), RMS-normed without a weight when v_norm, else copied.
// - heads_store (one invocation per value): the pass's k / v heads into the layer's caches at
//   start..start+T (rows of kv_heads · head_dim).
// - attend_heads (one workgroup of 64 per (row, q head)): scores over the cached keys 0..kv_len
//   that the mask (0 causal, 1 bidirectional) and the window allow (window_at_start: keys before
//   `start` visible within window − 1 of it, the canvas decoder's rule; else within window − 1 of
//   the query), an online softmax, the weighted values. Lanes split the head's dimensions
//   (head_dim ≤ 512: 8 per lane), four keys' dot products are one workgroup sum (of a vec4): plain,
//   correct for any head size, not tiled (docs/PERF.md). The keys are split over the grid's z (flash-decoding:
//   split z walks keys [z · chunk, (z + 1) · chunk)), so a few rows against a long cache still fill
//   the GPU — one row of DiffusionGemma-26B is 16 workgroups, and each walked all 512+ keys one
//   workgroup sum at a time. With one split the workgroup writes its output; with more, its
//   (max, sum, accumulator) to part[((t · heads + h) · splits + z) · (head_dim + 2)], and
// - attend_heads_combine (one workgroup of 64 per (row, q head)) merges the splits by their maxima.

#include "reduce"

struct HeadsParams {
    t: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    has_v: u32,
    v_norm: u32,
    pairs: u32,
    offset: u32,
    eps: f32,
    scale: f32,
    start: u32,
    kv_len: u32,
    mask: u32,
    window: u32,
    window_at_start: u32,
    proj_dim: u32,
    // attend_heads: key splits (the grid's z) and keys per split.
    splits: u32,
    chunk: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: HeadsParams;
@group(0) @binding(1) var<storage, read> proj: array<f32>;
@group(0) @binding(2) var<storage, read> q_norm: array<f32>;
@group(0) @binding(3) var<storage, read> k_norm: array<f32>;
@group(0) @binding(4) var<storage, read> cos_sin: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> qkv: array<f32>;
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(9) var<storage, read> k_read: array<f32>;
@group(0) @binding(10) var<storage, read> v_read: array<f32>;
@group(0) @binding(11) var<storage, read_write> part: array<f32>;

const MAX_PER_LANE: u32 = 8u;

// The normed value d of slot `kind` (0 q, 1 k, 2 v) from source offset `src`.
fn normed(kind: u32, src: u32, d: u32, inv: f32) -> f32 {
    let x = proj[src + d];
    if (kind == 0u) {
        return x * inv * q_norm[d];
    }
    if (kind == 1u) {
        return x * inv * k_norm[d];
    }
    if (p.v_norm != 0u) {
        return x * inv;
    }
    return x;
}

@compute @workgroup_size(64)
fn prepare_heads(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let slot = wid.y;
    let hd = p.head_dim;
    let qd = p.heads * hd;
    let kd = p.kv_heads * hd;
    var kind = 0u;
    var src = t * p.proj_dim + slot * hd;
    var dst = t * (qd + 2u * kd) + slot * hd;
    if (slot >= p.heads + p.kv_heads) {
        kind = 2u;
        let j = slot - p.heads - p.kv_heads;
        src = t * p.proj_dim + qd + select(0u, kd, p.has_v != 0u) + j * hd;
    } else if (slot >= p.heads) {
        kind = 1u;
    }
    var ss = 0.0;
    for (var d = lane.id; d < hd; d += 64u) {
        let x = proj[src + d];
        ss += x * x;
    }
    let total = wg_sum(ss, lane);
    let inv = 1.0 / sqrt(total / f32(hd) + p.eps);
    let rope = kind != 2u && p.pairs > 0u;
    for (var d = lane.id; d < hd; d += 64u) {
        let rotated = rope && (d < p.pairs || (d >= p.offset && d < p.offset + p.pairs));
        if (!rotated) {
            out[dst + d] = normed(kind, src, d, inv);
        }
    }
    if (rope) {
        for (var i = lane.id; i < p.pairs; i += 64u) {
            let a = normed(kind, src, i, inv);
            let b = normed(kind, src, i + p.offset, inv);
            let cs = cos_sin[t * p.pairs + i];
            out[dst + i] = a * cs.x - b * cs.y;
            out[dst + i + p.offset] = b * cs.x + a * cs.y;
        }
    }
}

@compute @workgroup_size(64)
fn heads_store(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = (wid.x + wid.y * nwg.x) * 64u + lid;
    let kd = p.kv_heads * p.head_dim;
    if (i >= p.t * kd) {
        return;
    }
    let t = i / kd;
    let c = i % kd;
    let row = t * (p.heads * p.head_dim + 2u * kd) + p.heads * p.head_dim;
    k_cache[(p.start + t) * kd + c] = qkv[row + c];
    v_cache[(p.start + t) * kd + c] = qkv[row + kd + c];
}

fn visible(pos: u32, j: u32) -> bool {
    if (p.mask == 0u && j > pos) {
        return false;
    }
    if (p.window == 0u) {
        return true;
    }
    if (p.window_at_start != 0u) {
        return j >= p.start || p.start - j < p.window;
    }
    return j > pos || pos - j < p.window;
}

@compute @workgroup_size(64)
fn attend_heads(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let h = wid.y;
    let hd = p.head_dim;
    let qd = p.heads * hd;
    let kd = p.kv_heads * hd;
    let kvh = h / (p.heads / p.kv_heads);
    let pos = p.start + t;
    let q0 = t * (qd + 2u * kd) + h * hd;
    var q: array<f32, 8>;
    var acc: array<f32, 8>;
    for (var i = 0u; i < MAX_PER_LANE; i++) {
        let d = lane.id + 64u * i;
        q[i] = select(0.0, qkv[q0 + min(d, hd - 1u)], d < hd);
        acc[i] = 0.0;
    }
    var m = neg_inf();
    var l = 0.0;
    let z = wid.z;
    let j_end = min(p.kv_len, (z + 1u) * p.chunk);
    // Four keys a round: their partial dot products go through one workgroup sum (a vec4), so
    // a round pays the sum's barriers once instead of four times; the online softmax then takes
    // the round's visible keys one at a time, in key order.
    for (var j0 = z * p.chunk; j0 < j_end; j0 += 4u) {
        var part = vec4<f32>(0.0);
        var seen = vec4<bool>(false);
        for (var c = 0u; c < 4u; c++) {
            let j = j0 + c;
            if (j < j_end && visible(pos, j)) {
                seen[c] = true;
                let k0 = j * kd + kvh * hd;
                for (var i = 0u; i < MAX_PER_LANE; i++) {
                    let d = lane.id + 64u * i;
                    if (d < hd) {
                        part[c] += q[i] * k_read[k0 + d];
                    }
                }
            }
        }
        let sc = wg_sum4(part, lane) * p.scale;
        for (var c = 0u; c < 4u; c++) {
            if (!seen[c]) {
                continue;
            }
            let s = sc[c];
            let k0 = (j0 + c) * kd + kvh * hd;
            let m_new = max(m, s);
            let corr = exp(m - m_new);
            let e = exp(s - m_new);
            l = l * corr + e;
            for (var i = 0u; i < MAX_PER_LANE; i++) {
                let d = lane.id + 64u * i;
                if (d < hd) {
                    acc[i] = acc[i] * corr + e * v_read[k0 + d];
                }
            }
            m = m_new;
        }
    }
    if (p.splits > 1u) {
        let pb = ((t * p.heads + h) * p.splits + z) * (hd + 2u);
        if (lane.id == 0u) {
            part[pb] = m;
            part[pb + 1u] = l;
        }
        for (var i = 0u; i < MAX_PER_LANE; i++) {
            let d = lane.id + 64u * i;
            if (d < hd) {
                part[pb + 2u + d] = acc[i];
            }
        }
        return;
    }
    let o0 = t * qd + h * hd;
    for (var i = 0u; i < MAX_PER_LANE; i++) {
        let d = lane.id + 64u * i;
        if (d < hd) {
            out[o0 + d] = select(0.0, acc[i] / l, l > 0.0);
        }
    }
}

@compute @workgroup_size(64)
fn attend_heads_combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let h = wid.y;
    let hd = p.head_dim;
    let stride = hd + 2u;
    let pb = (t * p.heads + h) * p.splits * stride;
    var mx = neg_inf();
    for (var z = 0u; z < p.splits; z++) {
        mx = max(mx, part[pb + z * stride]);
    }
    var l = 0.0;
    var acc: array<f32, 8>;
    for (var i = 0u; i < MAX_PER_LANE; i++) {
        acc[i] = 0.0;
    }
    for (var z = 0u; z < p.splits; z++) {
        let b = pb + z * stride;
        let mz = part[b];
        let w = select(exp(mz - mx), 0.0, mz == neg_inf());
        l += w * part[b + 1u];
        for (var i = 0u; i < MAX_PER_LANE; i++) {
            let d = lid + 64u * i;
            if (d < hd) {
                acc[i] += w * part[b + 2u + d];
            }
        }
    }
    let o0 = t * p.heads * hd + h * hd;
    for (var i = 0u; i < MAX_PER_LANE; i++) {
        let d = lid + 64u * i;
        if (d < hd) {
            out[o0 + d] = select(0.0, acc[i] / l, l > 0.0);
        }
    }
}
