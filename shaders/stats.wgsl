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
var<private> tv: array<f32, 8>;
var<private> ti: array<u32, 8>;

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
    for (var k = 0u; k < 8u; k++) {
        tv[k] = neg_inf();
        ti[k] = NONE;
    }
}

// Inserts (v, i) into the sorted candidates: a bubble through all 8 with constant indices (the
// same result as shifting the worse ones down), so the candidates stay in registers.
fn push(v: f32, i: u32) {
    if (!better(v, i, tv[7], ti[7])) {
        return;
    }
    var cv = v;
    var ci = i;
    for (var k = 0u; k < 8u; k++) {
        if (better(cv, ci, tv[k], ti[k])) {
            let ov = tv[k];
            let oi = ti[k];
            tv[k] = cv;
            ti[k] = ci;
            cv = ov;
            ci = oi;
        }
    }
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
    for (var k = 0u; k < 8u; k++) {
        sh_v[lid * 8u + k] = tv[k];
        sh_i[lid * 8u + k] = ti[k];
    }
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let o = lid + s;
            fold(sh_m[o], sh_s[o], sh_w[o]);
            // The partner's candidates are sorted: the first that does not get in ends it.
            for (var k = 0u; k < 8u; k++) {
                let v = sh_v[o * 8u + k];
                let i = sh_i[o * 8u + k];
                if (!better(v, i, tv[7], ti[7])) {
                    break;
                }
                push(v, i);
            }
            sh_m[lid] = tm;
            sh_s[lid] = ts;
            sh_w[lid] = tw;
            for (var k = 0u; k < 8u; k++) {
                sh_v[lid * 8u + k] = tv[k];
                sh_i[lid * 8u + k] = ti[k];
            }
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
        for (var k = 0u; k < 8u; k++) {
            partials[o + 4u + k] = tv[k];
            partials[o + 12u + k] = bitcast<f32>(ti[k]);
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
            if (!better(v, i, tv[7], ti[7])) {
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
        var pr = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        for (var k = 0u; k < 8u; k++) {
            if (ti[k] != NONE) {
                pr[k] = exp(tv[k] - log_z);
            }
            out[o + 4u + k] = ti[k];
            out[o + 12u + k] = bitcast<u32>(pr[k]);
        }
        out[o] = ti[0];
        out[o + 1u] = bitcast<u32>(pr[0]);
        out[o + 2u] = bitcast<u32>(ls - tw / ts);
        out[o + 3u] = bitcast<u32>(pr[0] - pr[1]);
    }
}
