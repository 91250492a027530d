// DiffusionGemma's self-conditioning input: soft embeddings out[r, c] = s · Σ_v softmax(L[r])_v ·
// E[v, c] of the previous step's logits L [rows, V] and the embedding table E [V, H] in its file
// layout (lib/dequant.wgsl).
// - soft_max (one workgroup of 64 per row): L[r] becomes softmax(L[r]) in place (max, Σ exp).
// - soft_embed (a workgroup per 16 rows × 64 columns × one vocabulary split, grid [⌈H/64⌉,
//   ⌈rows/16⌉, parts]): split z of one table chunk [v0, v0 + vrows) (a table larger than one
//   binding is split by rows), vocabulary rows [z · vsplit, (z + 1) · vsplit) of it, writes its
//   partial Σ_v p[r, v] · E[v, c] to part[z, r, c]; tiling below. The splits are what fill the GPU:
//   one canvas row is ⌈H/64⌉ = 44 column tiles on DiffusionGemma-26B, each of which walked all
//   262,144 vocabulary rows alone (≈ 300 ms a step on an H100).
// - soft_embed_sum (one invocation per output): out[r, c] = s · Σ_z part[z, r, c], z ascending
//   (`accumulate` 0 on the table's first chunk: it writes, later chunks add).

#include "grid"
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
    // Vocabulary rows per split of the chunk, and the splits (soft_embed's grid z).
    vsplit: u32,
    parts: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: SoftEmbedParams;
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;
@group(0) @binding(2) var<storage, read> w_words: array<u32>;
@group(0) @binding(3) var<storage, read> probs_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read_write> part: array<f32>;

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
// Each split sums its terms in ascending v, one at a time; soft_embed_sum adds the splits in
// ascending order (the CPU reference sums one run: the f32 rounding differs, not the terms).
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
    let v_end = min(p.vrows, (wid.z + 1u) * p.vsplit);
    for (var vb = wid.z * p.vsplit; vb < v_end; vb += TV) {
        let n = min(TV, v_end - vb);
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
        part[(wid.z * p.rows + r) * p.cols + c] = acc[i];
    }
}

@compute @workgroup_size(64)
fn soft_embed_sum(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.rows * p.cols) {
        return;
    }
    var sum = 0.0;
    for (var z = 0u; z < p.parts; z++) {
        sum += part[z * p.rows * p.cols + i];
    }
    let o = p.out_row0 * p.cols + i;
    if (p.accumulate != 0u) {
        out[o] += p.s * sum;
    } else {
        out[o] = p.s * sum;
    }
}
