// Elementwise kernels, one invocation per output value (grids folded into x·y for large sizes):
// add (a += b), swiglu (a[t, c] = silu(b[t, c]) · b[t, I + c] for b = [T, 2I] gate rows first) and
// fill (a u32 pattern: NaN poisoning of outputs in tests).

struct EwParams {
    n: u32,
    cols: u32,
    pattern: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: EwParams;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> words: array<u32>;

fn flat_index(lid: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * 64u + lid;
}

@compute @workgroup_size(64)
fn add(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        a[i] += b[i];
    }
}

@compute @workgroup_size(64)
fn swiglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        let t = i / p.cols;
        let c = i % p.cols;
        let g = b[t * 2u * p.cols + c];
        a[i] = g / (1.0 + exp(-g)) * b[t * 2u * p.cols + p.cols + c];
    }
}

@compute @workgroup_size(64)
fn fill(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        words[i] = p.pattern;
    }
}
