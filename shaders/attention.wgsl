// Attention over the KV cache.
// kv_store: copies the block's k and v (from the fused qkv rows) into the layer's caches
//   [capacity][kv_dim] at rows start .. start + T.
// attend: flash-decoding. One workgroup of 64 per (q head, token, split): a split is a range of
//   `chunk` keys (a multiple of 64), walked 64 keys at a time (one per invocation: score = q·k ·
//   scale, four independent partial sums over the head dims); a running max and sum rescale the
//   output accumulator (each invocation owns head dims lane, lane + 64, …; hd ≤ 256), so no T × L
//   matrix exists anywhere. With one split the workgroup writes the normalised output; with more it
//   writes its partial (m, s, acc[hd]) to part[(t · nq + h) · splits + split] (hd + 2 floats each)
//   and attend_combine (one workgroup per (q head, token)) merges the splits by their maxima. The
//   host picks the splits so that short query blocks against a long cache still fill the GPU.
//   GQA: q head h reads kv head h / (nq / nkv). Every mask kind sees a prefix of the keys:
//     causal: pos + 1; bidirectional: kv_len; block-causal(b): (pos / b + 1)·b;
//     causal-then-bidirectional(d): kv_len from d on, pos + 1 before; all capped at kv_len.

#include "reduce"

struct AttnParams {
    t: u32,
    nq: u32,
    nkv: u32,
    hd: u32,
    start: u32,
    kv_len: u32,
    mask: u32,
    mask_arg: u32,
    scale: f32,
    kv_dim: u32,
    splits: u32,
    chunk: u32,
}

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> k_read: array<f32>;
@group(0) @binding(6) var<storage, read> v_read: array<f32>;
@group(0) @binding(7) var<storage, read_write> part: array<f32>;

@compute @workgroup_size(64)
fn kv_store(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (i >= p.t * p.kv_dim) {
        return;
    }
    let t = i / p.kv_dim;
    let c = i % p.kv_dim;
    let qd = p.nq * p.hd;
    let src = t * (qd + 2u * p.kv_dim) + qd + c;
    let dst = (p.start + t) * p.kv_dim + c;
    k_cache[dst] = qkv[src];
    v_cache[dst] = qkv[src + p.kv_dim];
}

fn visible_len(pos: u32) -> u32 {
    var n = pos + 1u;
    if (p.mask == 1u) {
        n = p.kv_len;
    } else if (p.mask == 2u) {
        n = (pos / p.mask_arg + 1u) * p.mask_arg;
    } else if (p.mask == 3u && pos >= p.mask_arg) {
        n = p.kv_len;
    }
    return min(n, p.kv_len);
}

var<workgroup> q_sh: array<f32, 256>;
var<workgroup> p_sh: array<f32, 64>;

@compute @workgroup_size(64)
fn attend(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let t = wid.y;
    let split = wid.z;
    let pos = p.start + t;
    let kvh = h / (p.nq / p.nkv);
    let qd = p.nq * p.hd;
    let row = t * (qd + 2u * p.kv_dim);
    for (var d = lane.id; d < p.hd; d += 64u) {
        q_sh[d] = qkv[row + h * p.hd + d];
    }
    workgroupBarrier();
    let limit = visible_len(pos);
    let lo = split * p.chunk;
    let hi = min(lo + p.chunk, limit);
    let koff = kvh * p.hd;
    let hd4 = p.hd & ~3u;
    var m = neg_inf();
    var s = 0.0;
    var acc = vec4<f32>(0.0);
    for (var j0 = lo; j0 < hi; j0 += 64u) {
        let j = j0 + lane.id;
        var sc = neg_inf();
        if (j < hi) {
            let kb = j * p.kv_dim + koff;
            var d4 = vec4<f32>(0.0);
            for (var i = 0u; i < hd4; i += 4u) {
                let q = vec4<f32>(q_sh[i], q_sh[i + 1u], q_sh[i + 2u], q_sh[i + 3u]);
                let k = vec4<f32>(k_read[kb + i], k_read[kb + i + 1u], k_read[kb + i + 2u], k_read[kb + i + 3u]);
                d4 += q * k;
            }
            var d = (d4.x + d4.y) + (d4.z + d4.w);
            for (var i = hd4; i < p.hd; i++) {
                d += q_sh[i] * k_read[kb + i];
            }
            sc = d * p.scale;
        }
        let mn = max(m, wg_max(sc, lane));
        var pj = 0.0;
        if (j < hi) {
            pj = exp(sc - mn);
        }
        p_sh[lane.id] = pj;
        let cs = wg_sum(pj, lane);
        let alpha = select(exp(m - mn), 0.0, m == neg_inf());
        s = s * alpha + cs;
        acc *= alpha;
        let n = min(64u, hi - j0);
        for (var jj = 0u; jj < n; jj++) {
            let vb = (j0 + jj) * p.kv_dim + koff;
            let pp = p_sh[jj];
            for (var c = 0u; c < 4u; c++) {
                let d = lane.id + 64u * c;
                if (d < p.hd) {
                    acc[c] += pp * v_read[vb + d];
                }
            }
        }
        m = mn;
        workgroupBarrier();
    }
    if (p.splits == 1u) {
        for (var c = 0u; c < 4u; c++) {
            let d = lane.id + 64u * c;
            if (d < p.hd) {
                out[t * qd + h * p.hd + d] = select(0.0, acc[c] / s, s > 0.0);
            }
        }
        return;
    }
    let pb = ((t * p.nq + h) * p.splits + split) * (p.hd + 2u);
    if (lane.id == 0u) {
        part[pb] = m;
        part[pb + 1u] = s;
    }
    for (var c = 0u; c < 4u; c++) {
        let d = lane.id + 64u * c;
        if (d < p.hd) {
            part[pb + 2u + d] = acc[c];
        }
    }
}

@compute @workgroup_size(64)
fn attend_combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let t = wid.y;
    let qd = p.nq * p.hd;
    let pb = (t * p.nq + h) * p.splits * (p.hd + 2u);
    var mx = neg_inf();
    for (var i = 0u; i < p.splits; i++) {
        mx = max(mx, part[pb + i * (p.hd + 2u)]);
    }
    var s = 0.0;
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < p.splits; i++) {
        let b = pb + i * (p.hd + 2u);
        let mi = part[b];
        let w = select(exp(mi - mx), 0.0, mi == neg_inf());
        s += w * part[b + 1u];
        for (var c = 0u; c < 4u; c++) {
            let d = lid + 64u * c;
            if (d < p.hd) {
                acc[c] += w * part[b + 2u + d];
            }
        }
    }
    for (var c = 0u; c < 4u; c++) {
        let d = lid + 64u * c;
        if (d < p.hd) {
            out[t * qd + h * p.hd + d] = select(0.0, acc[c] / s, s > 0.0);
        }
    }
}
