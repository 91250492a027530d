// ZAYA1's per-channel affine joins (rows of `cols` f32 values, s/a tables of f32 rows [k, cols]):
// scaled_residual_norm (one workgroup of 64 per row): x = (delta + s[0]) ⊙ s[1] + (x + s[2]) ⊙ s[3]
//   in place, then out = rms_norm(x) · w — the scaled residual join and the next norm in one pass,
//   as norm.wgsl's add_rms_norm does for the plain add.
// embed_affine (one invocation per value): x = (x + a[0]) ⊙ a[1], the input embedding's bias and
//   scale.

#include "grid"
#include "reduce"

struct ScaledParams {
    rows: u32,
    cols: u32,
    eps: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: ScaledParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> delta: array<f32>;
@group(0) @binding(3) var<storage, read> s: array<f32>;
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn scaled_residual_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    let n = p.cols;
    var ss = 0.0;
    for (var i = lane.id; i < n; i += 64u) {
        let v = (delta[b + i] + s[i]) * s[n + i] + (x[b + i] + s[2u * n + i]) * s[3u * n + i];
        x[b + i] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(n) + p.eps);
    for (var i = lane.id; i < n; i += 64u) {
        out[b + i] = x[b + i] * inv * w[i];
    }
}

@compute @workgroup_size(64)
fn embed_affine(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.rows * p.cols) {
        return;
    }
    let c = i % p.cols;
    x[i] = (x[i] + s[c]) * s[p.cols + c];
}
