// DiffusionGemma's small ops over rows of f32 values, one invocation per value (grids folded into
// x·y for large sizes, lib/grid.wgsl):
// - scale: a[i] *= s (the embedding's √H, the layer scalar);
// - geglu: a[t, c] = gelu_tanh(b[t, c]) · b[t, I + c] for b = [T, 2I] gate rows first
//   (elementwise.wgsl's swiglu with PyTorch's tanh GELU, the dense MLP's and self-conditioning's
//   activation; cols = I);
// - softcap: a[i] = s · tanh(a[i] / s) (the final logit cap, before the statistics);
// - expert_scale: a[i] *= b[ids[i]] for routing weights a and ids [T, k] (the scaled-norm
//   router's per-expert scale after the renormalised top-k).

#include "grid"

struct GemmaParams {
    n: u32,
    cols: u32,
    s: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: GemmaParams;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> ids: array<u32>;

// The builtin on a clamped argument: some drivers build tanh from exp and overflow to NaN at
// large |x|; past |x| = 10 tanh is ±1 in f32 anyway.
fn tanh_f32(x: f32) -> f32 {
    return tanh(clamp(x, -10.0, 10.0));
}

fn gelu_tanh(x: f32) -> f32 {
    return 0.5 * x * (1.0 + tanh_f32(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

@compute @workgroup_size(64)
fn scale(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        a[i] *= p.s;
    }
}

@compute @workgroup_size(64)
fn geglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        let t = i / p.cols;
        let c = i % p.cols;
        a[i] = gelu_tanh(b[t * 2u * p.cols + c]) * b[t * 2u * p.cols + p.cols + c];
    }
}

@compute @workgroup_size(64)
fn softcap(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        a[i] = tanh_f32(a[i] / p.s) * p.s;
    }
}

@compute @workgroup_size(64)
fn expert_scale(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        a[i] *= b[ids[i]];
    }
}
