// RMSNorm per row: out = x / sqrt(mean(x²) + eps) · w, one workgroup of 64 per row (rows of
// `cols` values, w f32). add_rms_norm first adds the residual in place (x += delta) and normalises
// the sum: the residual stream and the next layer's normalised input in one pass.

#include "reduce"

struct NormParams {
    cols: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: NormParams;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> x_rw: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;

@compute @workgroup_size(64)
fn rms_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    var ss = 0.0;
    for (var i = lane.id; i < p.cols; i += 64u) {
        let v = x[b + i];
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(p.cols) + p.eps);
    for (var i = lane.id; i < p.cols; i += 64u) {
        out[b + i] = x[b + i] * inv * w[i];
    }
}

@compute @workgroup_size(64)
fn add_rms_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    var ss = 0.0;
    for (var i = lane.id; i < p.cols; i += 64u) {
        let v = x_rw[b + i] + delta[b + i];
        x_rw[b + i] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(p.cols) + p.eps);
    for (var i = lane.id; i < p.cols; i += 64u) {
        out[b + i] = x_rw[b + i] * inv * w[i];
    }
}
