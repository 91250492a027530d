// Embedding gather of a denoising canvas's input ids, read on the device (the commit kernel of
// denoise.wgsl wrote them), so a chained denoising step needs no upload: out[t, c] =
// table[ids[ids_at + t], c], dequantized from the table's file layout (lib/dequant.wgsl). As in
// embed.wgsl, a table larger than one binding is split by rows and each dispatch serves the ids in
// its chunk [row0, row0 + rows); one invocation per output value. Ids come from the commit kernel
// (a greedy argmax or the mask id, both below the vocabulary), so none is out of range.

#include "grid"
#include "dequant"

struct EmbedCanvasParams {
    t: u32,
    cols: u32,
    row0: u32,
    rows: u32,
    scales: u32,
    ids_at: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: EmbedCanvasParams;
@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn w_word(i: u32) -> u32 {
    return w_words[i];
}

@compute @workgroup_size(64)
fn embed_canvas(
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
    let id = ids[p.ids_at + t];
    if (id >= p.row0 && id - p.row0 < p.rows) {
        out[i] = w_at(WMat(0u, p.scales, p.cols), id - p.row0, c);
    }
}
