// DiffusionGemma's self-conditioning input: soft embeddings out[r, c] = s · Σ_v softmax(L[r])_v ·
// E[v, c] of the previous step's logits L [rows, V] and the embedding table E [V, H] in its file
// layout (lib/dequant.wgsl).
// - soft_max (one workgroup of 64 per row): L[r] becomes softmax(L[r]) in place (max, Σ exp).
// - soft_embed (a workgroup per 16 rows × 64 columns, grid [⌈H/64⌉, ⌈rows/16⌉]): the rows of one
//   table chunk [v0, v0 + vrows) (a table larger than one binding is split by rows) add
//   s · Σ_v p[r, v] · E[v, c] to out (`accumulate` 0 on the first chunk: it writes); tiling below.

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

// A tile of TR rows × 64 columns per workgroup, one column per invocation with TR row sums in
// registers: each step stages p[r0.., v..v + TV) in shared memory and dequantizes each E[v, c]
// once for all TR rows, so the table is read rows / TR times per pass instead of once per row.
// Each output still sums its terms in ascending v, one at a time, as the CPU reference does.
const TR: u32 = 16u;
const TV: u32 = 64u;
var<workgroup> p_tile: array<f32, 1024>; // [TR][TV]

@compute @workgroup_size(64)
fn soft_embed(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let c = wid.x * 64u + lid;
    let r0 = wid.y * TR;
    let m = WMat(0u, p.scales, p.cols);
    var acc: array<f32, 16>;
    for (var i = 0u; i < TR; i++) {
        acc[i] = 0.0;
    }
    for (var vb = 0u; vb < p.vrows; vb += TV) {
        let n = min(TV, p.vrows - vb);
        for (var k = lid; k < TR * TV; k += 64u) {
            let i = k / TV;
            let j = k % TV;
            var x = 0.0;
            if (r0 + i < p.rows && j < n) {
                x = probs_in[(r0 + i) * p.vocab + p.v0 + vb + j];
            }
            p_tile[k] = x;
        }
        workgroupBarrier();
        if (c < p.cols) {
            for (var j = 0u; j < n; j++) {
                let w = w_at(m, vb + j, c);
                for (var i = 0u; i < TR; i++) {
                    acc[i] += p_tile[i * TV + j] * w;
                }
            }
        }
        workgroupBarrier();
    }
    if (c >= p.cols) {
        return;
    }
    for (var i = 0u; i < TR; i++) {
        let r = r0 + i;
        if (r >= p.rows) {
            break;
        }
        let o = (p.out_row0 + r) * p.cols + c;
        if (p.accumulate != 0u) {
            out[o] += p.s * acc[i];
        } else {
            out[o] = p.s * acc[i];
        }
    }
}
