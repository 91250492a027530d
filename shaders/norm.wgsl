// RMSNorm per row: out = x / sqrt(mean(x²) + eps) · w, one workgroup of 256 per row (rows of
// `cols` values, w f32). add_rms_norm first adds the residual in place (x += delta) and normalises
// the sum: the residual stream and the next layer's normalised input in one pass. Layout and sum
// order: lib/row_norm.wgsl (a row's values in registers, one round of loads).

#include "row_norm"

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

// Quads of x, x_rw, delta and w at row base b (columns past the row read as 0: quad_in, quad_mask).
fn x_quad(b: u32, c: vec4<u32>) -> vec4<f32> {
    let k = b + quad_in(c, p.cols);
    return quad_mask(vec4<f32>(x[k.x], x[k.y], x[k.z], x[k.w]), c, p.cols);
}

fn xrw_quad(b: u32, c: vec4<u32>) -> vec4<f32> {
    let k = b + quad_in(c, p.cols);
    return quad_mask(vec4<f32>(x_rw[k.x], x_rw[k.y], x_rw[k.z], x_rw[k.w]), c, p.cols);
}

fn delta_quad(b: u32, c: vec4<u32>) -> vec4<f32> {
    let k = b + quad_in(c, p.cols);
    return quad_mask(vec4<f32>(delta[k.x], delta[k.y], delta[k.z], delta[k.w]), c, p.cols);
}

fn w_quad(c: vec4<u32>) -> vec4<f32> {
    let k = quad_in(c, p.cols);
    return quad_mask(vec4<f32>(w[k.x], w[k.y], w[k.z], w[k.w]), c, p.cols);
}

fn store_out(b: u32, c: vec4<u32>, v: vec4<f32>) {
    if (c.x < p.cols) { out[b + c.x] = v.x; }
    if (c.y < p.cols) { out[b + c.y] = v.y; }
    if (c.z < p.cols) { out[b + c.z] = v.z; }
    if (c.w < p.cols) { out[b + c.w] = v.w; }
}

fn store_xrw(b: u32, c: vec4<u32>, v: vec4<f32>) {
    if (c.x < p.cols) { x_rw[b + c.x] = v.x; }
    if (c.y < p.cols) { x_rw[b + c.y] = v.y; }
    if (c.z < p.cols) { x_rw[b + c.z] = v.z; }
    if (c.w < p.cols) { x_rw[b + c.w] = v.w; }
}

@compute @workgroup_size(256)
fn rms_norm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    let c0 = quad_cols(lid, 0u);
    let c1 = quad_cols(lid, 1u);
    let c2 = quad_cols(lid, 2u);
    let c3 = quad_cols(lid, 3u);
    let v0 = x_quad(b, c0);
    let v1 = x_quad(b, c1);
    let v2 = x_quad(b, c2);
    let v3 = x_quad(b, c3);
    let w0 = w_quad(c0);
    let w1 = w_quad(c1);
    let w2 = w_quad(c2);
    let w3 = w_quad(c3);
    var ss = add_squares(add_squares(add_squares(add_squares(0.0, v0), v1), v2), v3);
    for (var c = NORM_REG + lid; c < p.cols; c += NORM_WG) {
        let v = x[b + c];
        ss += v * v;
    }
    let inv = 1.0 / sqrt(norm_total(ss, lid) / f32(p.cols) + p.eps);
    store_out(b, c0, v0 * inv * w0);
    store_out(b, c1, v1 * inv * w1);
    store_out(b, c2, v2 * inv * w2);
    store_out(b, c3, v3 * inv * w3);
    for (var c = NORM_REG + lid; c < p.cols; c += NORM_WG) {
        out[b + c] = x[b + c] * inv * w[c];
    }
}

@compute @workgroup_size(256)
fn add_rms_norm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.cols;
    let c0 = quad_cols(lid, 0u);
    let c1 = quad_cols(lid, 1u);
    let c2 = quad_cols(lid, 2u);
    let c3 = quad_cols(lid, 3u);
    let v0 = xrw_quad(b, c0) + delta_quad(b, c0);
    let v1 = xrw_quad(b, c1) + delta_quad(b, c1);
    let v2 = xrw_quad(b, c2) + delta_quad(b, c2);
    let v3 = xrw_quad(b, c3) + delta_quad(b, c3);
    let w0 = w_quad(c0);
    let w1 = w_quad(c1);
    let w2 = w_quad(c2);
    let w3 = w_quad(c3);
    store_xrw(b, c0, v0);
    store_xrw(b, c1, v1);
    store_xrw(b, c2, v2);
    store_xrw(b, c3, v3);
    var ss = add_squares(add_squares(add_squares(add_squares(0.0, v0), v1), v2), v3);
    for (var c = NORM_REG + lid; c < p.cols; c += NORM_WG) {
        let v = x_rw[b + c] + delta[b + c];
        x_rw[b + c] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(norm_total(ss, lid) / f32(p.cols) + p.eps);
    store_out(b, c0, v0 * inv * w0);
    store_out(b, c1, v1 * inv * w1);
    store_out(b, c2, v2 * inv * w2);
    store_out(b, c3, v3 * inv * w3);
    // Each column past NORM_REG is read back by the invocation that wrote it.
    for (var c = NORM_REG + lid; c < p.cols; c += NORM_WG) {
        out[b + c] = x_rw[b + c] * inv * w[c];
    }
}
