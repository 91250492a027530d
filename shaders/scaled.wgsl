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

// The joined value of column i of the row at b (delta, x and the four scale rows).
fn joined(b: u32, i: u32) -> f32 {
    let n = p.cols;
    return (delta[b + i] + s[i]) * s[n + i] + (x[b + i] + s[2u * n + i]) * s[3u * n + i];
}

// Both loops take four columns per step with all their loads issued first (a row of 2048 is 32
// columns deep per invocation: one at a time, a 1-token pass waits on each load in turn); each
// invocation still adds its squares in ascending column order.
@compute @workgroup_size(64)
fn scaled_residual_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    let n = p.cols;
    var ss = 0.0;
    var i = lane.id;
    for (; i + 192u < n; i += 256u) {
        let v0 = joined(b, i);
        let v1 = joined(b, i + 64u);
        let v2 = joined(b, i + 128u);
        let v3 = joined(b, i + 192u);
        x[b + i] = v0;
        x[b + i + 64u] = v1;
        x[b + i + 128u] = v2;
        x[b + i + 192u] = v3;
        ss += v0 * v0;
        ss += v1 * v1;
        ss += v2 * v2;
        ss += v3 * v3;
    }
    for (; i < n; i += 64u) {
        let v = joined(b, i);
        x[b + i] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(n) + p.eps);
    i = lane.id;
    for (; i + 192u < n; i += 256u) {
        let v0 = x[b + i];
        let v1 = x[b + i + 64u];
        let v2 = x[b + i + 128u];
        let v3 = x[b + i + 192u];
        let w0 = w[i];
        let w1 = w[i + 64u];
        let w2 = w[i + 128u];
        let w3 = w[i + 192u];
        out[b + i] = v0 * inv * w0;
        out[b + i + 64u] = v1 * inv * w1;
        out[b + i + 128u] = v2 * inv * w2;
        out[b + i + 192u] = v3 * inv * w3;
    }
    for (; i < n; i += 64u) {
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
