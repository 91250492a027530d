// Elementwise kernels, one invocation per output value (grids folded into x·y for large sizes):
// add (a += b), swiglu (a[t, c] = silu(b[t, c]) · b[t, I + c] for b = [T, 2I] gate rows first) and
// fill (a u32 pattern: NaN poisoning of outputs in tests) and copy16 (dst = src, 16 bytes per
// invocation: the compute-shader yardstick of the device's copy bandwidth, next to
// copy_buffer_to_buffer, which some drivers run on a slower copy engine) and gather_rows
// (a[i, c] = b[src_rows[i], c]: rows of a batched pass picked for its LM head, inside the compute
// pass where buffer copies would end it) and chase (one invocation follows p.n links of the chain
// in `words`, i = words[i] from i = p.pattern, and writes where it ended to words[p.cols]: each
// load waits for the previous one, so the time is the memory's latency — backend/gpu/yardsticks.rs).

#include "grid"

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
@group(0) @binding(4) var<storage, read> src16: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read_write> dst16: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> src_rows: array<u32>;

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

// p.n: 16-byte units to copy.
@compute @workgroup_size(64)
fn copy16(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        dst16[i] = src16[i];
    }
}

// p.n: values of a, p.cols: values a row.
@compute @workgroup_size(64)
fn gather_rows(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i < p.n) {
        a[i] = b[src_rows[i / p.cols] * p.cols + i % p.cols];
    }
}

@compute @workgroup_size(64)
fn chase(@builtin(local_invocation_index) lid: u32) {
    if (lid != 0u) {
        return;
    }
    var i = p.pattern;
    for (var k = 0u; k < p.n; k++) {
        i = words[i];
    }
    words[p.cols] = i;
}
