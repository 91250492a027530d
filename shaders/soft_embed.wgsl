// DiffusionGemma's self-conditioning input: soft embeddings out[r, c] = s · Σ_v softmax(L[r])_v ·
// E[v, c] of the previous step's logits L [rows, V] and the embedding table E [V, H] in its file
// layout (lib/dequant.wgsl).
// - soft_max (one workgroup of 64 per row): L[r] becomes softmax(L[r]) in place (max, Σ exp).
// - soft_embed (one invocation per output value): the rows of one table chunk [v0, v0 + vrows)
//   (a table larger than one binding is split by rows) add s · Σ_v p[r, v] · E[v, c] to out
//   (`accumulate` 0 on the first chunk: it writes). A plain loop over the vocabulary per output
//   value: correct on every device, not yet a tiled product (docs/PERF.md).

#include "reduce"
#include "dequant"

struct SoftEmbedParams {
    rows: u32,
    cols: u32,
    vocab: u32,
    v0: u32,
    vrows: u32,
    scales: u32,
    accumulate: u32,
    out_row0: u32,
    s: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: SoftEmbedParams;
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;
@group(0) @binding(2) var<storage, read> w_words: array<u32>;
@group(0) @binding(3) var<storage, read> probs_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn w_word(i: u32) -> u32 {
    return w_words[i];
}

@compute @workgroup_size(64)
fn soft_max(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.vocab;
    var m = neg_inf();
    for (var v = lane.id; v < p.vocab; v += 64u) {
        m = max(m, probs[b + v]);
    }
    let mx = wg_max(m, lane);
    var sum = 0.0;
    for (var v = lane.id; v < p.vocab; v += 64u) {
        let e = exp(probs[b + v] - mx);
        probs[b + v] = e;
        sum += e;
    }
    let total = wg_sum(sum, lane);
    for (var v = lane.id; v < p.vocab; v += 64u) {
        probs[b + v] = probs[b + v] / total;
    }
}

@compute @workgroup_size(64)
fn soft_embed(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (i >= p.rows * p.cols) {
        return;
    }
    let r = i / p.cols;
    let c = i % p.cols;
    let m = WMat(0u, p.scales, p.cols);
    var acc = 0.0;
    for (var v = 0u; v < p.vrows; v++) {
        acc += probs_in[r * p.vocab + p.v0 + v] * w_at(m, v, c);
    }
    let o = (p.out_row0 + r) * p.cols + c;
    if (p.accumulate != 0u) {
        out[o] += p.s * acc;
    } else {
        out[o] = p.s * acc;
    }
}
