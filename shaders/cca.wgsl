// CCA attention inputs (ZAYA1's compressed convolutional attention), in place on the fused
// projection rows proj [T, W], W = c + kv_dim, c = q_dim + kv_dim: [q | k | v_cur | v_delayed]
// becomes [q | k | v] as attention.wgsl reads it. Three dispatches, because the conv of a position
// reads the raw rows of the one or two before it, which other workgroups write:
// cca_store (one invocation per value): the block's raw [q; k] rows into the layer's conv state
//   [capacity, c] and its delayed-v halves into vd [capacity, kv_dim / 2], at rows start + t.
// cca_conv (one invocation per (t, channel)): z = grouped conv (kernel 2, one group per head, with
//   bias) of the depthwise conv (kernel 2, with bias) over time of the raw rows; positions before
//   0 are zero rows (transformers pads with zeros), so the depthwise output there is its bias.
//   Written to the scratch z [T, c].
// cca_finish (one workgroup of 64 per (head, token), heads = nq + nkv; hd ≤ 256, each invocation
//   owning dims lane, lane + 64, …): q = z + (q_raw + k_raw of its KV head) / 2, k = z + the mean of
//   its group's q residuals; L2-normalised to √hd (norm floored at f32 epsilon, as torch's
//   clamp_min), keys times their KV head's temperature; rotate-half RoPE of the first 2·rot_half
//   dims from the host's f64 cos/sin table (rope.wgsl's). Head 0's workgroup also writes v's
//   second half: the previous position's delayed v (zero at position 0).

#include "grid"
#include "reduce"

struct CcaParams {
    t: u32,
    nq: u32,
    nkv: u32,
    hd: u32,
    rot_half: u32,
    start: u32,
    c: u32,
    w: u32,
    half: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: CcaParams;
@group(0) @binding(1) var<storage, read_write> proj: array<f32>;
@group(0) @binding(2) var<storage, read_write> conv: array<f32>;
@group(0) @binding(3) var<storage, read_write> vd: array<f32>;
@group(0) @binding(4) var<storage, read> conv_r: array<f32>;
@group(0) @binding(5) var<storage, read> vd_r: array<f32>;
@group(0) @binding(6) var<storage, read> dw: array<f32>;
@group(0) @binding(7) var<storage, read> dw_bias: array<f32>;
@group(0) @binding(8) var<storage, read> gw: array<f32>;
@group(0) @binding(9) var<storage, read> g_bias: array<f32>;
@group(0) @binding(10) var<storage, read_write> z: array<f32>;
@group(0) @binding(11) var<storage, read> z_r: array<f32>;
@group(0) @binding(12) var<storage, read> temp: array<f32>;
@group(0) @binding(13) var<storage, read> rope: array<vec2<f32>>;

@compute @workgroup_size(64)
fn cca_store(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let per = p.c + p.half;
    let i = flat_index(lid, wid, nwg);
    if (i >= p.t * per) {
        return;
    }
    let t = i / per;
    let j = i % per;
    let pos = p.start + t;
    if (j < p.c) {
        conv[pos * p.c + j] = proj[t * p.w + j];
    } else {
        vd[pos * p.half + j - p.c] = proj[t * p.w + p.c + p.half + j - p.c];
    }
}

// Raw [q; k] channel ch at position n (i32: −1 and −2 are before the sequence).
fn raw(n: i32, ch: u32) -> f32 {
    if (n < 0) {
        return 0.0;
    }
    return conv_r[u32(n) * p.c + ch];
}

fn depthwise(n: i32, ch: u32) -> f32 {
    return dw[ch * 2u] * raw(n - 1, ch) + dw[ch * 2u + 1u] * raw(n, ch) + dw_bias[ch];
}

// Tap j of channel ch's grouped conv at position n: the group's depthwise outputs at n − 1 and n.
fn conv_term(ch: u32, n: i32, g0: u32, j: u32) -> f32 {
    let tp = gw[(ch * p.hd + j) * 2u];
    let tc = gw[(ch * p.hd + j) * 2u + 1u];
    return tp * depthwise(n - 1, g0 + j) + tc * depthwise(n, g0 + j);
}

@compute @workgroup_size(64)
fn cca_conv(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.t * p.c) {
        return;
    }
    let t = i / p.c;
    let ch = i % p.c;
    let n = i32(p.start + t);
    let g0 = (ch / p.hd) * p.hd;
    var acc = g_bias[ch];
    // Four taps per step, their loads issued before the sums (a head of 128 is 128 dependent
    // steps one at a time); the terms still join acc in ascending j.
    var j = 0u;
    for (; j + 3u < p.hd; j += 4u) {
        let a0 = conv_term(ch, n, g0, j);
        let a1 = conv_term(ch, n, g0, j + 1u);
        let a2 = conv_term(ch, n, g0, j + 2u);
        let a3 = conv_term(ch, n, g0, j + 3u);
        acc += a0;
        acc += a1;
        acc += a2;
        acc += a3;
    }
    for (; j < p.hd; j++) {
        acc += conv_term(ch, n, g0, j);
    }
    z[t * p.c + ch] = acc;
}

var<workgroup> head_sh: array<f32, 256>;

// Head h's (h < nq) q residual at dim d of position pos: (q_raw + k_raw of its KV head) / 2.
fn q_res(pos: u32, h: u32, d: u32) -> f32 {
    let kv = h / (p.nq / p.nkv);
    let b = pos * p.c;
    return (conv_r[b + h * p.hd + d] + conv_r[b + p.nq * p.hd + kv * p.hd + d]) * 0.5;
}

@compute @workgroup_size(64)
fn cca_finish(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let t = wid.y;
    let pos = p.start + t;
    let qd = p.nq * p.hd;
    let group = p.nq / p.nkv;
    var v = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var ss = 0.0;
    for (var r = 0u; r < 4u; r++) {
        let d = lane.id + r * 64u;
        if (d < p.hd) {
            var x = z_r[t * p.c + h * p.hd + d];
            if (h < p.nq) {
                x += q_res(pos, h, d);
            } else {
                let kv = h - p.nq;
                var m = 0.0;
                for (var g = 0u; g < group; g++) {
                    m += q_res(pos, kv * group + g, d);
                }
                x += m / f32(group);
            }
            v[r] = x;
            ss += x * x;
        }
    }
    var f = p.scale / max(sqrt(wg_sum(ss, lane)), 1.1920929e-7);
    if (h >= p.nq) {
        f *= temp[h - p.nq];
    }
    for (var r = 0u; r < 4u; r++) {
        let d = lane.id + r * 64u;
        if (d < p.hd) {
            v[r] *= f;
            head_sh[d] = v[r];
        }
    }
    workgroupBarrier();
    let row = t * p.w + h * p.hd;
    for (var r = 0u; r < 4u; r++) {
        let d = lane.id + r * 64u;
        if (d < p.hd) {
            var o = v[r];
            if (d < p.rot_half) {
                let cs = rope[pos * p.rot_half + d];
                o = head_sh[d] * cs.x - head_sh[d + p.rot_half] * cs.y;
            } else if (d < 2u * p.rot_half) {
                let i = d - p.rot_half;
                let cs = rope[pos * p.rot_half + i];
                o = head_sh[d] * cs.x + head_sh[i] * cs.y;
            }
            proj[row + d] = o;
        }
    }
    if (h == 0u) {
        for (var i = lane.id; i < p.half; i += 64u) {
            var x = 0.0;
            if (pos > 0u) {
                x = vd_r[(pos - 1u) * p.half + i];
            }
            proj[t * p.w + p.c + p.half + i] = x;
        }
    }
}
