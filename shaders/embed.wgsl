// Embedding gather: out[t, c] = table[ids[ids_at + t], c], dequantized from the table's file layout
// (see lib/dequant.wgsl). A table larger than one binding is split by rows; each dispatch serves the
// ids that fall in its chunk [row0, row0 + rows). One invocation per output value.
// embed: the ids are the pass's uploaded input (ids_at 0). embed_device_ids: the ids are already on
//   the device — a denoising canvas's input ids, written by the commit kernel of denoise.wgsl — so a
//   chained denoising step needs no upload; the same gather behind a plain storage binding.

#include "grid"
#include "dequant"

struct EmbedParams {
    t: u32,
    cols: u32,
    row0: u32,
    rows: u32,
    scales: u32,
    ids_at: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: EmbedParams;
@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn w_word(i: u32) -> u32 {
    return w_words[i];
}

fn gather(i: u32) {
    if (i >= p.t * p.cols) {
        return;
    }
    let t = i / p.cols;
    let c = i % p.cols;
    let id = ids[p.ids_at + t];
    if (id >= p.row0 && id - p.row0 < p.rows) {
        out[i] = w_at(WMat(0u, p.scales, p.cols), id - p.row0, c);
    }
}

@compute @workgroup_size(64)
fn embed(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    gather(flat_index(lid, wid, nwg));
}

@compute @workgroup_size(64)
fn embed_device_ids(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    gather(flat_index(lid, wid, nwg));
}
