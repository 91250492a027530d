// Per-position statistics of LM-head logits [rows, vocab], so the host reads a few bytes per
// position instead of a vocabulary row. Two passes:
//   stats_partial: one workgroup of 64 per (chunk, row) → a partial of 20 words (a row splits into
//     `chunks` equal chunks, 2048 logits by default, see ops/stats.rs):
//     m (max), s = Σ e^(l−m), w = Σ e^(l−m)·(l−m), the 8 best logits and their ids;
//   stats_merge: one workgroup per row folds the partials and writes 20 words:
//     argmax, p_max, entropy, margin (p1 − p2), 8 ids, 8 probabilities.
// Partials merge like online softmax: with M = max(m1, m2), s = Σ s_i·e^(m_i−M) and
// w = Σ e^(m_i−M)·(w_i + (m_i − M)·s_i); then log Z = M + ln s and entropy = ln s − w / s, a sum of
// two non-negative terms (no cancellation). Candidates order by value, ties to the lower id, as the
// CPU reference does.

struct StatsParams {
    rows: u32,
    vocab: u32,
    chunks: u32,
    out_row0: u32,
}

const PART: u32 = 20u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: StatsParams;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read> parts_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

var<private> tm: f32;
var<private> ts: f32;
var<private> tw: f32;
// The 8 best candidates, best first, as separate scalars: pointers to them (bubble) and constant
// names keep them in registers where an array indexed at run time would sit in local memory.
var<private> tv0: f32;
var<private> tv1: f32;
var<private> tv2: f32;
var<private> tv3: f32;
var<private> tv4: f32;
var<private> tv5: f32;
var<private> tv6: f32;
var<private> tv7: f32;
var<private> ti0: u32;
var<private> ti1: u32;
var<private> ti2: u32;
var<private> ti3: u32;
var<private> ti4: u32;
var<private> ti5: u32;
var<private> ti6: u32;
var<private> ti7: u32;

var<workgroup> sh_m: array<f32, 64>;
var<workgroup> sh_s: array<f32, 64>;
var<workgroup> sh_w: array<f32, 64>;
var<workgroup> sh_v: array<f32, 512>;
var<workgroup> sh_i: array<u32, 512>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}

fn reset() {
    tm = neg_inf();
    ts = 0.0;
    tw = 0.0;
    tv0 = neg_inf();
    tv1 = neg_inf();
    tv2 = neg_inf();
    tv3 = neg_inf();
    tv4 = neg_inf();
    tv5 = neg_inf();
    tv6 = neg_inf();
    tv7 = neg_inf();
    ti0 = NONE;
    ti1 = NONE;
    ti2 = NONE;
    ti3 = NONE;
    ti4 = NONE;
    ti5 = NONE;
    ti6 = NONE;
    ti7 = NONE;
}

// One step of the bubble: candidate (v, i) and the carried (cv, ci) swap when the carried one is
// better.
fn bubble(cv: ptr<function, f32>, ci: ptr<function, u32>, v: ptr<private, f32>, i: ptr<private, u32>) {
    if (better(*cv, *ci, *v, *i)) {
        let ov = *v;
        let oi = *i;
        *v = *cv;
        *i = *ci;
        *cv = ov;
        *ci = oi;
    }
}

// Inserts (v, i) into the sorted candidates: a bubble through all 8 (the same result as shifting
// the worse ones down).
fn push(v: f32, i: u32) {
    if (!better(v, i, tv7, ti7)) {
        return;
    }
    var cv = v;
    var ci = i;
    bubble(&cv, &ci, &tv0, &ti0);
    bubble(&cv, &ci, &tv1, &ti1);
    bubble(&cv, &ci, &tv2, &ti2);
    bubble(&cv, &ci, &tv3, &ti3);
    bubble(&cv, &ci, &tv4, &ti4);
    bubble(&cv, &ci, &tv5, &ti5);
    bubble(&cv, &ci, &tv6, &ti6);
    bubble(&cv, &ci, &tv7, &ti7);
}

// The candidates to shared memory at sh_v / sh_i[b ..].
fn store_cands(b: u32) {
    sh_v[b] = tv0;
    sh_v[b + 1u] = tv1;
    sh_v[b + 2u] = tv2;
    sh_v[b + 3u] = tv3;
    sh_v[b + 4u] = tv4;
    sh_v[b + 5u] = tv5;
    sh_v[b + 6u] = tv6;
    sh_v[b + 7u] = tv7;
    sh_i[b] = ti0;
    sh_i[b + 1u] = ti1;
    sh_i[b + 2u] = ti2;
    sh_i[b + 3u] = ti3;
    sh_i[b + 4u] = ti4;
    sh_i[b + 5u] = ti5;
    sh_i[b + 6u] = ti6;
    sh_i[b + 7u] = ti7;
}

// Folds (m, s, w) into the running (tm, ts, tw).
fn fold(m: f32, s: f32, w: f32) {
    let mx = max(tm, m);
    if (mx == neg_inf()) {
        return;
    }
    var ns = 0.0;
    var nw = 0.0;
    if (ts > 0.0) {
        let a = exp(tm - mx);
        ns += ts * a;
        nw += a * (tw + (tm - mx) * ts);
    }
    if (s > 0.0) {
        let b = exp(m - mx);
        ns += s * b;
        nw += b * (w + (m - mx) * s);
    }
    tm = mx;
    ts = ns;
    tw = nw;
}

// Tree merge of the 64 invocations' states; invocation 0 ends with the total.
fn merge_workgroup(lid: u32) {
    sh_m[lid] = tm;
    sh_s[lid] = ts;
    sh_w[lid] = tw;
    store_cands(lid * 8u);
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let o = lid + s;
            fold(sh_m[o], sh_s[o], sh_w[o]);
            // The partner's candidates are sorted: the first that does not get in ends it.
            for (var k = 0u; k < 8u; k++) {
                let v = sh_v[o * 8u + k];
                let i = sh_i[o * 8u + k];
                if (!better(v, i, tv7, ti7)) {
                    break;
                }
                push(v, i);
            }
            sh_m[lid] = tm;
            sh_s[lid] = ts;
            sh_w[lid] = tw;
            store_cands(lid * 8u);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn stats_partial(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let chunk = wid.x;
    let row = wid.y;
    let base = row * p.vocab;
    let len = (p.vocab + p.chunks - 1u) / p.chunks;
    let end = min((chunk + 1u) * len, p.vocab);
    reset();
    var m = neg_inf();
    for (var i = chunk * len + lid; i < end; i += 64u) {
        m = max(m, logits[base + i]);
    }
    var s = 0.0;
    var w = 0.0;
    for (var i = chunk * len + lid; i < end; i += 64u) {
        let l = logits[base + i];
        let e = exp(l - m);
        s += e;
        w += e * (l - m);
        push(l, i);
    }
    if (s > 0.0) {
        tm = m;
        ts = s;
        tw = w;
    }
    merge_workgroup(lid);
    if (lid == 0u) {
        let o = (row * p.chunks + chunk) * PART;
        partials[o] = tm;
        partials[o + 1u] = ts;
        partials[o + 2u] = tw;
        // Invocation 0's candidates are the total; merge_workgroup left them at sh_v / sh_i[0 ..].
        for (var k = 0u; k < 8u; k++) {
            partials[o + 4u + k] = sh_v[k];
            partials[o + 12u + k] = bitcast<f32>(sh_i[k]);
        }
    }
}

@compute @workgroup_size(64)
fn stats_merge(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let row = wid.x;
    reset();
    for (var c = lid; c < p.chunks; c += 64u) {
        let o = (row * p.chunks + c) * PART;
        fold(parts_in[o], parts_in[o + 1u], parts_in[o + 2u]);
        for (var k = 0u; k < 8u; k++) {
            let v = parts_in[o + 4u + k];
            let i = bitcast<u32>(parts_in[o + 12u + k]);
            if (!better(v, i, tv7, ti7)) {
                break;
            }
            push(v, i);
        }
    }
    merge_workgroup(lid);
    if (lid == 0u) {
        let ls = log(ts);
        let log_z = tm + ls;
        let o = (p.out_row0 + row) * PART;
        // Invocation 0's candidates are the total; merge_workgroup left them at sh_v / sh_i[0 ..].
        var p0 = 0.0;
        var p1 = 0.0;
        for (var k = 0u; k < 8u; k++) {
            var pr = 0.0;
            if (sh_i[k] != NONE) {
                pr = exp(sh_v[k] - log_z);
            }
            if (k == 0u) {
                p0 = pr;
            } else if (k == 1u) {
                p1 = pr;
            }
            out[o + 4u + k] = sh_i[k];
            out[o + 12u + k] = bitcast<u32>(pr);
        }
        out[o] = sh_i[0];
        out[o + 1u] = bitcast<u32>(p0);
        out[o + 2u] = bitcast<u32>(ls - tw / ts);
        out[o + 3u] = bitcast<u32>(p0 - p1);
    }
}
