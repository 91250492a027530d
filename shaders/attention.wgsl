// Attention over the KV cache.
// kv_store: copies the block's k and v (from the fused qkv rows) into the layer's caches
//   [capacity][kv_dim] at rows start .. start + T.
// attend: one workgroup of 64 per (q head, token), flash-style: keys in chunks of 64 (one per
//   invocation: score = q·k · scale), a running max and sum rescale the output accumulator (each
//   invocation owns head dims lane, lane + 64, …; hd ≤ 256), so no T × L matrix exists anywhere.
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
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> k_read: array<f32>;
@group(0) @binding(6) var<storage, read> v_read: array<f32>;

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
    let pos = p.start + t;
    let kvh = h / (p.nq / p.nkv);
    let qd = p.nq * p.hd;
    let row = t * (qd + 2u * p.kv_dim);
    for (var d = lane.id; d < p.hd; d += 64u) {
        q_sh[d] = qkv[row + h * p.hd + d];
    }
    workgroupBarrier();
    let limit = visible_len(pos);
    let koff = kvh * p.hd;
    var m = neg_inf();
    var s = 0.0;
    var acc = vec4<f32>(0.0);
    for (var j0 = 0u; j0 < limit; j0 += 64u) {
        let j = j0 + lane.id;
        var sc = neg_inf();
        if (j < limit) {
            let kb = j * p.kv_dim + koff;
            var d = 0.0;
            for (var i = 0u; i < p.hd; i++) {
                d += q_sh[i] * k_read[kb + i];
            }
            sc = d * p.scale;
        }
        let mn = max(m, wg_max(sc, lane));
        var pj = 0.0;
        if (j < limit) {
            pj = exp(sc - mn);
        }
        p_sh[lane.id] = pj;
        let cs = wg_sum(pj, lane);
        let alpha = select(exp(m - mn), 0.0, m == neg_inf());
        s = s * alpha + cs;
        acc *= alpha;
        let n = min(64u, limit - j0);
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
    for (var c = 0u; c < 4u; c++) {
        let d = lane.id + 64u * c;
        if (d < p.hd) {
            out[t * qd + h * p.hd + d] = select(0.0, acc[c] / s, s > 0.0);
        }
    }
}
