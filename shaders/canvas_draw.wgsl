// The canvas sampler's per-position draw (DiffusionGemma, decode::canvas; the host reference is
// backend/draw.rs row_draw). Over a chunk of capped logits L [rows, V] (canvas rows row0..):
//   L[r] ← L[r] / t in place (the tempered logits, which soft_max + soft_embed then turn into the
//   next step's self-conditioning input), and per row
//   draws[3·(row0 + r) ..] = (entropy in nats as f32 bits, argmax (first of ties), the token
//   uniforms[row0 + r] picks by inverse CDF: the first v whose running Σ exp(L − max) exceeds
//   u · Σ exp(L − max), V − 1 if rounding leaves none).
// One workgroup of 64 per row. Tempering, max and the sums stride over the row (coalesced). The
// inverse CDF needs running sums in index order, so the row is cut into 64 contiguous spans: each
// invocation sums its span, invocation 0 adds the span sums in order to find the span that
// crosses the target and walks on from its start one token at a time. Sums associate differently
// from the host's single running sum, so a draw can differ from the host's only where u falls
// within rounding of a token boundary.

#include "reduce"

struct DrawParams {
    rows: u32,
    vocab: u32,
    row0: u32,
    t: f32,
}

@group(0) @binding(0) var<uniform> p: DrawParams;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> uniforms: array<f32>;
@group(0) @binding(3) var<storage, read_write> draws: array<u32>;

var<workgroup> span_sum: array<f32, 64>;

@compute @workgroup_size(64)
fn canvas_draw(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let b = wid.x * p.vocab;
    var m = neg_inf();
    var mi = 0xffffffffu;
    for (var v = lane.id; v < p.vocab; v += 64u) {
        let x = logits[b + v] / p.t;
        logits[b + v] = x;
        if (x > m) {
            m = x;
            mi = v;
        }
    }
    // Other invocations read these tempered values below (the spans are contiguous).
    storageBarrier();
    let arg = wg_argmax(m, mi, lane);
    let mx = wg_max(m, lane);
    // Entropy relative to the max: ln Σe − Σ e·y / Σe with y = L − max ≤ 0 (no large terms cancel).
    var s = 0.0;
    var sy = 0.0;
    for (var v = lane.id; v < p.vocab; v += 64u) {
        let y = logits[b + v] - mx;
        let e = exp(y);
        s += e;
        sy += e * y;
    }
    let sum = wg_sum(s, lane);
    let sum_y = wg_sum(sy, lane);
    let span = (p.vocab + 63u) / 64u;
    let lo = min(lane.id * span, p.vocab);
    let hi = min(lo + span, p.vocab);
    var part = 0.0;
    for (var v = lo; v < hi; v++) {
        part += exp(logits[b + v] - mx);
    }
    span_sum[lane.id] = part;
    workgroupBarrier();
    if (lane.id != 0u) {
        return;
    }
    var total = 0.0;
    for (var k = 0u; k < 64u; k++) {
        total += span_sum[k];
    }
    let goal = uniforms[p.row0 + wid.x] * total;
    var acc = 0.0;
    var k = 0u;
    for (; k < 63u; k++) {
        if (acc + span_sum[k] > goal) {
            break;
        }
        acc += span_sum[k];
    }
    var pick = p.vocab - 1u;
    for (var v = min(k * span, p.vocab); v < p.vocab; v++) {
        acc += exp(logits[b + v] - mx);
        if (acc > goal) {
            pick = v;
            break;
        }
    }
    let o = 3u * (p.row0 + wid.x);
    draws[o] = bitcast<u32>(log(sum) - sum_y / sum);
    draws[o + 1u] = arg;
    draws[o + 2u] = pick;
}
