// ZAYA1's MLP router around the matmul family (which computes its four projections):
// mlp_bias_act (one invocation per value of x [T, n]): x += bias (per column); then, by mode bits,
//   1: EDA — x += prev ⊙ eda_scale (the previous MoE layer's router state), 2: exact GELU
//   (x·Φ(x), erf from Numerical Recipes' Chebyshev fit of erfc, fractional error < 1.2e-7, as the
//   CPU reference computes it in f64).
// mlp_route_select (one invocation per token; classes are few, 17 in ZAYA1): softmax over the
//   logits [T, classes], then the top_k of (probability + selection bias), ties to the lower
//   class; the weight is the probability, not renormalised, and 0 for the skip class (the last,
//   id = experts). Each pick scans for the best class ranked after the previous pick, so no
//   per-token array is needed. Block-level routing (block_size > 0): row t ≥ block_first adds its
//   block's mask row (router_blocks.wgsl, gating 2, [blocks, classes]) to the selection bias first.

#include "grid"

struct MlpRouterParams {
    t: u32,
    n: u32,
    mode: u32,
    classes: u32,
    experts: u32,
    top_k: u32,
    block_size: u32,
    block_phase: u32,
    block_first: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: MlpRouterParams;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> prev: array<f32>;
@group(0) @binding(4) var<storage, read> eda_scale: array<f32>;
@group(0) @binding(5) var<storage, read> logits: array<f32>;
@group(0) @binding(6) var<storage, read_write> ids: array<u32>;
@group(0) @binding(7) var<storage, read_write> weights: array<f32>;
@group(0) @binding(8) var<storage, read> block_mask: array<f32>;

fn erf(v: f32) -> f32 {
    let zz = abs(v);
    let t = 1.0 / (1.0 + 0.5 * zz);
    let poly = -zz * zz - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * exp(poly);
    return select(erfc - 1.0, 1.0 - erfc, v >= 0.0);
}

@compute @workgroup_size(64)
fn mlp_bias_act(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.t * p.n) {
        return;
    }
    let c = i % p.n;
    var v = x[i] + bias[c];
    if ((p.mode & 1u) != 0u) {
        v += prev[i] * eda_scale[c];
    }
    if ((p.mode & 2u) != 0u) {
        v = 0.5 * v * (1.0 + erf(v * 0.70710678118654752));
    }
    x[i] = v;
}

// Whether class a (score sa) ranks before class b (score sb): higher score, then lower id.
fn before(sa: f32, a: u32, sb: f32, b: u32) -> bool {
    return sa > sb || (sa == sb && a < b);
}

@compute @workgroup_size(64)
fn mlp_route_select(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let t = flat_index(lid, wid, nwg);
    if (t >= p.t) {
        return;
    }
    let b = t * p.classes;
    var mx = logits[b];
    for (var e = 1u; e < p.classes; e++) {
        mx = max(mx, logits[b + e]);
    }
    var sum = 0.0;
    for (var e = 0u; e < p.classes; e++) {
        sum += exp(logits[b + e] - mx);
    }
    var mrow = 0xffffffffu;
    if (p.block_size != 0u && t >= p.block_first) {
        let g = (t + p.block_phase) / p.block_size - (p.block_first + p.block_phase) / p.block_size;
        mrow = g * p.classes;
    }
    var last_s = 0.0;
    var last_e = 0xffffffffu;
    for (var j = 0u; j < p.top_k; j++) {
        var best_s = 0.0;
        var best_e = 0xffffffffu;
        for (var e = 0u; e < p.classes; e++) {
            var sb = bias[e];
            if (mrow != 0xffffffffu) {
                sb += block_mask[mrow + e];
            }
            let s = exp(logits[b + e] - mx) / sum + sb;
            let after = last_e == 0xffffffffu || before(last_s, last_e, s, e);
            if (after && (best_e == 0xffffffffu || before(s, e, best_s, best_e))) {
                best_s = s;
                best_e = e;
            }
        }
        last_s = best_s;
        last_e = best_e;
        ids[t * p.top_k + j] = best_e;
        weights[t * p.top_k + j] = select(exp(logits[b + best_e] - mx) / sum, 0.0, best_e == p.experts);
    }
}
