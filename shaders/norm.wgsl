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

// The loops issue four loads per invocation before their arithmetic (a row of 2048 is 32 loads
// deep per invocation: one at a time, a 1-token pass waits on each in turn); each invocation still
// adds its values in ascending order, so the sums are those of the plain loop.

@compute @workgroup_size(64)
fn rms_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    var ss = 0.0;
    var i = lane.id;
    for (; i + 192u < p.cols; i += 256u) {
        let v0 = x[b + i];
        let v1 = x[b + i + 64u];
        let v2 = x[b + i + 128u];
        let v3 = x[b + i + 192u];
        ss += v0 * v0;
        ss += v1 * v1;
        ss += v2 * v2;
        ss += v3 * v3;
    }
    for (; i < p.cols; i += 64u) {
        let v = x[b + i];
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(p.cols) + p.eps);
    i = lane.id;
    for (; i + 192u < p.cols; i += 256u) {
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
    for (; i < p.cols; i += 64u) {
        out[b + i] = x[b + i] * inv * w[i];
    }
}

@compute @workgroup_size(64)
fn add_rms_norm(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    var ss = 0.0;
    var i = lane.id;
    for (; i + 192u < p.cols; i += 256u) {
        let x0 = x_rw[b + i];
        let x1 = x_rw[b + i + 64u];
        let x2 = x_rw[b + i + 128u];
        let x3 = x_rw[b + i + 192u];
        let d0 = delta[b + i];
        let d1 = delta[b + i + 64u];
        let d2 = delta[b + i + 128u];
        let d3 = delta[b + i + 192u];
        let v0 = x0 + d0;
        let v1 = x1 + d1;
        let v2 = x2 + d2;
        let v3 = x3 + d3;
        x_rw[b + i] = v0;
        x_rw[b + i + 64u] = v1;
        x_rw[b + i + 128u] = v2;
        x_rw[b + i + 192u] = v3;
        ss += v0 * v0;
        ss += v1 * v1;
        ss += v2 * v2;
        ss += v3 * v3;
    }
    for (; i < p.cols; i += 64u) {
        let v = x_rw[b + i] + delta[b + i];
        x_rw[b + i] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(ss, lane) / f32(p.cols) + p.eps);
    i = lane.id;
    for (; i + 192u < p.cols; i += 256u) {
        let v0 = x_rw[b + i];
        let v1 = x_rw[b + i + 64u];
        let v2 = x_rw[b + i + 128u];
        let v3 = x_rw[b + i + 192u];
        let w0 = w[i];
        let w1 = w[i + 64u];
        let w2 = w[i + 128u];
        let w3 = w[i + 192u];
        out[b + i] = v0 * inv * w0;
        out[b + i + 64u] = v1 * inv * w1;
        out[b + i + 128u] = v2 * inv * w2;
        out[b + i + 192u] = v3 * inv * w3;
    }
    for (; i < p.cols; i += 64u) {
        out[b + i] = x_rw[b + i] * inv * w[i];
    }
}
