// Embedding gather: out[t, c] = table[ids[t], c], dequantized from the table's file layout (see
// lib/dequant.wgsl). A table larger than one binding is split by rows; each dispatch serves the
// ids that fall in its chunk [row0, row0 + rows). One invocation per output value.

#include "grid"
#include "dequant"

struct EmbedParams {
    t: u32,
    cols: u32,
    row0: u32,
    rows: u32,
    scales: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: EmbedParams;
@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn w_word(i: u32) -> u32 {
    return w_words[i];
}

@compute @workgroup_size(64)
fn embed(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.t * p.cols) {
        return;
    }
    let t = i / p.cols;
    let c = i % p.cols;
    let id = ids[t];
    if (id >= p.row0 && id - p.row0 < p.rows) {
        out[i] = w_at(WMat(0u, p.scales, p.cols), id - p.row0, c);
    }
}
