// Per-position statistics of LM-head logits [rows, vocab], so the host reads a few bytes per
// position instead of a vocabulary row.
//   stats_partial: one workgroup of 256 per (chunk, row) → a partial of 20 words (a row splits into
//     `chunks` equal chunks, 2048 logits by default, see ops/stats.rs): m (max), s = Σ e^(l−m),
//     w = Σ e^(l−m)·(l−m), the 8 best logits (words 4..12; −∞ where the chunk has fewer) and their
//     ids (words 12..20, as f32 bits; 0xffffffff: none);
//   stats_merge: one workgroup of 256 per row folds the row's partials (8 · chunks candidates and
//     `chunks` (m, s, w)) and writes 20 words: argmax, p_max, entropy, margin (p1 − p2), 8 ids,
//     8 probabilities. With one chunk (chunks = 1) there is no partial pass: the host binds the
//     logits themselves and stats_merge reads the row as stats_partial reads a chunk.
// (m, s, w) merge like online softmax: with M = max m_i, s = Σ s_i·e^(m_i−M) and
// w = Σ e^(m_i−M)·(w_i + (m_i − M)·s_i); then log Z = M + ln s and entropy = ln s − w / s, a sum of
// two non-negative terms (no cancellation). Candidates order by value, ties to the lower id, as the
// CPU reference does.
//
// Why this shape: at one row the two dispatches are latency, not bytes (629 KB of logits at vocab
// 157,184), so each workgroup is one round of loads and a short chain after it. The workgroup's
// items (a chunk's logits, or a row's partial candidates) sit in registers: item q in invocation
// q % 256, slot q / 256, for q < 2048 (eight an invocation; more are re-read in loops). Then:
//   - (m, s, w): the invocation's max, the part's max (a subgroup max), each item's rescaled terms
//     against it, a part sum — no barrier;
//   - top 8: each selection part (lib/reduce_*: a subgroup, or the whole workgroup without
//     subgroups) picks its best 8 in 8 rounds of an integer max/min over u32 keys ordered like the
//     f32 values (each invocation offers its best unpicked item; a picked register's key is
//     zeroed, loop items count only behind the last pick) into a list in shared memory;
//   - one barrier; each listed candidate counts the candidates better than it (its rank) and
//     rank r < 8 writes slot r; the part (M, S, W) fold (a max, then rescaled sums, in part order).
// With subgroups that is one barrier a workgroup (8 parts of 32 on NVIDIA: 64 candidates ranked);
// without, every part step is a shared-memory reduction (two barriers each). A workgroup's result
// depends on its row alone (never on how many rows share the dispatch). Needs subgroups of at least
// 4 invocations where subgroups are used (≤ 64 parts).

#include "reduce"

struct StatsParams {
    rows: u32,
    vocab: u32,
    chunks: u32,
    out_row0: u32,
}

const PART: u32 = 20u;
const NONE: u32 = 0xffffffffu;
const TOP: u32 = 8u;
const WG: u32 = 256u;
// Items held in registers: eight an invocation.
const SPAN: u32 = 2048u;

@group(0) @binding(0) var<uniform> p: StatsParams;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
// Logits (stats_partial, and stats_merge at one chunk) or partials (stats_merge).
@group(0) @binding(3) var<storage, read> src: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

// The workgroup's items: n logits at src[base ..] with ids first + q, or (from_logits false) the
// n = 8 · chunks_in candidates of the partials at src[base ..].
var<private> from_logits: bool;
var<private> base: u32;
var<private> first: u32;
var<private> n: u32;
var<private> chunks_in: u32;

// Each part's (M, S, W) and its 8 picks (key, id), part · 8 + round.
var<workgroup> part_stat: array<vec4<f32>, 64>;
var<workgroup> list: array<vec2<u32>, 512>;

// An f32's place in the total order as a u32 (larger value, larger key; −0 is +0). Keys of items
// are ≥ 1: 0 is "none" (or a picked register).
fn okey(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    let k = select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
    return max(select(k, 0x80000000u, b == 0x80000000u), 1u);
}

// The f32 of a key (okey's inverse; −0 comes back as +0).
fn key_value(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u));
}

fn better(k: u32, i: u32, bk: u32, bi: u32) -> bool {
    return k != 0u && (k > bk || (k == bk && i < bi));
}

// Item q's (key, id); a partial's empty slot (id NONE) has key 0.
fn item(q: u32) -> vec2<u32> {
    if (from_logits) {
        return vec2<u32>(okey(src[base + q]), first + q);
    }
    let o = base + (q / TOP) * PART + q % TOP;
    let i = bitcast<u32>(src[o + 12u]);
    return vec2<u32>(select(0u, okey(src[o + 4u]), i != NONE), i);
}

fn item_or_none(q: u32) -> vec2<u32> {
    if (q < n) {
        return item(q);
    }
    return vec2<u32>(0u, NONE);
}

// Partial c's (m, s, w).
fn triple(c: u32) -> vec3<f32> {
    let o = base + c * PART;
    return vec3<f32>(src[o], src[o + 1u], src[o + 2u]);
}

// An invocation's items in registers: keys (0: none or picked) and ids of slots 0..4 and 4..8.
struct Held {
    k0: vec4<u32>,
    k1: vec4<u32>,
    i0: vec4<u32>,
    i1: vec4<u32>,
}

fn hold(lid: u32) -> Held {
    let a = item_or_none(lid);
    let b = item_or_none(lid + 256u);
    let c = item_or_none(lid + 512u);
    let d = item_or_none(lid + 768u);
    let e = item_or_none(lid + 1024u);
    let f = item_or_none(lid + 1280u);
    let g = item_or_none(lid + 1536u);
    let h = item_or_none(lid + 1792u);
    return Held(
        vec4<u32>(a.x, b.x, c.x, d.x),
        vec4<u32>(e.x, f.x, g.x, h.x),
        vec4<u32>(a.y, b.y, c.y, d.y),
        vec4<u32>(e.y, f.y, g.y, h.y),
    );
}

// e^(l−M) and e^(l−M)·(l − M) of the logit with key k (0: none).
fn exp_term(k: u32, m: f32) -> vec2<f32> {
    if (k == 0u) {
        return vec2<f32>(0.0);
    }
    let d = key_value(k) - m;
    let e = exp(d);
    return vec2<f32>(e, e * d);
}

// The exp_terms of four keys, summed in order.
fn exp_terms(k: vec4<u32>, m: f32) -> vec2<f32> {
    return exp_term(k.x, m) + exp_term(k.y, m) + exp_term(k.z, m) + exp_term(k.w, m);
}

// (s, w) of a partial rescaled to the max m.
fn rescaled(t: vec3<f32>, m: f32) -> vec2<f32> {
    if (t.y > 0.0) {
        let e = exp(t.x - m);
        return vec2<f32>(t.y * e, e * (t.z + (t.x - m) * t.y));
    }
    return vec2<f32>(0.0);
}

struct Cand {
    k: u32,
    i: u32,
    // The register slot (0..8), or TOP: a loop item.
    slot: u32,
}

fn consider(c: ptr<function, Cand>, k: u32, i: u32, slot: u32) {
    if (better(k, i, (*c).k, (*c).i)) {
        *c = Cand(k, i, slot);
    }
}

// The invocation's best unpicked item. Registers: picked ones have key 0. Loop items: those
// strictly behind the last pick `last` (every pick was the invocation's best unpicked item, so the
// unpicked loop items are exactly those); `any` false: nothing picked yet.
fn best_unpicked(lid: u32, h: Held, last: Cand, any: bool) -> Cand {
    var c = Cand(0u, NONE, TOP);
    consider(&c, h.k0.x, h.i0.x, 0u);
    consider(&c, h.k0.y, h.i0.y, 1u);
    consider(&c, h.k0.z, h.i0.z, 2u);
    consider(&c, h.k0.w, h.i0.w, 3u);
    consider(&c, h.k1.x, h.i1.x, 4u);
    consider(&c, h.k1.y, h.i1.y, 5u);
    consider(&c, h.k1.z, h.i1.z, 6u);
    consider(&c, h.k1.w, h.i1.w, 7u);
    for (var q = SPAN + lid; q < n; q += WG) {
        let it = item(q);
        if (!any || it.x < last.k || (it.x == last.k && it.y > last.i)) {
            consider(&c, it.x, it.y, TOP);
        }
    }
    return c;
}

// Everything before the results: each part's (M, S, W) in part_stat and its 8 picks in list, then
// one barrier. Uniform control flow (the part reductions may hold barriers).
fn gather(lane: Lane) {
    let lid = lane.id;
    var h = hold(lid);
    // Partials: invocation lid's first (m, s, w), loaded with the candidates.
    var t0 = vec3<f32>(neg_inf(), 0.0, 0.0);
    if (!from_logits && lid < chunks_in) {
        t0 = triple(lid);
    }
    var ml = neg_inf();
    if (from_logits) {
        let mk = max(h.k0, h.k1);
        let k = max(max(mk.x, mk.y), max(mk.z, mk.w));
        if (k != 0u) {
            ml = key_value(k);
        }
        for (var q = SPAN + lid; q < n; q += WG) {
            ml = max(ml, src[base + q]);
        }
    } else {
        ml = t0.x;
        for (var c = lid + WG; c < chunks_in; c += WG) {
            ml = max(ml, src[base + c * PART]);
        }
    }
    let m = sel256_max(ml, lane);
    var sw = vec2<f32>(0.0);
    if (from_logits) {
        sw = exp_terms(h.k0, m) + exp_terms(h.k1, m);
        for (var q = SPAN + lid; q < n; q += WG) {
            let d = src[base + q] - m;
            let e = exp(d);
            sw += vec2<f32>(e, e * d);
        }
    } else {
        sw = rescaled(t0, m);
        for (var c = lid + WG; c < chunks_in; c += WG) {
            sw += rescaled(triple(c), m);
        }
    }
    let tot = sel256_sum2(sw, lane);
    let part = sel_part(lane);
    if (sel_lead(lane)) {
        part_stat[part] = vec4<f32>(m, tot.x, tot.y, 0.0);
    }
    // The part's best 8: round r's winner is the part's best of the invocations' best unpicked.
    var cur = best_unpicked(lid, h, Cand(0u, NONE, TOP), false);
    for (var r = 0u; r < TOP; r++) {
        let w = sel256_argmax_key(cur.k, cur.i, lane);
        if (w != NONE && w == cur.i) {
            list[part * TOP + r] = vec2<u32>(cur.k, w);
            h.k0 = select(h.k0, vec4<u32>(0u), vec4<u32>(0u, 1u, 2u, 3u) == vec4<u32>(cur.slot));
            h.k1 = select(h.k1, vec4<u32>(0u), vec4<u32>(4u, 5u, 6u, 7u) == vec4<u32>(cur.slot));
            cur = best_unpicked(lid, h, cur, true);
        } else if (w == NONE && sel_lead(lane)) {
            list[part * TOP + r] = vec2<u32>(0u, NONE);
        }
    }
    workgroupBarrier();
}

// The workgroup's (M, S, W) from the parts': their max, then their sums rescaled to it.
fn total(lane: Lane) -> vec3<f32> {
    let parts = sel_parts(lane);
    var m = neg_inf();
    for (var i = 0u; i < parts; i++) {
        m = max(m, part_stat[i].x);
    }
    var sw = vec2<f32>(0.0);
    for (var i = 0u; i < parts; i++) {
        sw += rescaled(part_stat[i].xyz, m);
    }
    return vec3<f32>(m, sw);
}

// Candidate e's rank among the lists (candidates better than it) and the largest key of those.
fn rank_of(e: vec2<u32>, cands: u32) -> vec2<u32> {
    var rank = 0u;
    var above = 0u;
    for (var o = 0u; o < cands; o++) {
        let f = list[o];
        if (better(f.x, f.y, e.x, e.y)) {
            rank += 1u;
            above = max(above, f.x);
        }
    }
    return vec2<u32>(rank, above);
}

@compute @workgroup_size(256)
fn stats_partial(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lane.id;
    let chunk = wid.x;
    let row = wid.y;
    let len = (p.vocab + p.chunks - 1u) / p.chunks;
    let start = min(chunk * len, p.vocab);
    from_logits = true;
    first = start;
    base = row * p.vocab + start;
    n = min(start + len, p.vocab) - start;
    chunks_in = 0u;
    gather(lane);
    let o = (row * p.chunks + chunk) * PART;
    let cands = sel_parts(lane) * TOP;
    for (var c = lid; c < cands; c += WG) {
        let e = list[c];
        if (e.y != NONE) {
            let rank = rank_of(e, cands).x;
            if (rank < TOP) {
                partials[o + 4u + rank] = key_value(e.x);
                partials[o + 12u + rank] = bitcast<f32>(e.y);
            }
        }
    }
    if (lid >= min(n, TOP) && lid < TOP) {
        partials[o + 4u + lid] = neg_inf();
        partials[o + 12u + lid] = bitcast<f32>(NONE);
    }
    if (lid == 0u) {
        let t = total(lane);
        partials[o] = t.x;
        partials[o + 1u] = t.y;
        partials[o + 2u] = t.z;
    }
}

@compute @workgroup_size(256)
fn stats_merge(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lane.id;
    let row = wid.x;
    if (p.chunks == 1u) {
        from_logits = true;
        first = 0u;
        base = row * p.vocab;
        n = p.vocab;
        chunks_in = 0u;
    } else {
        from_logits = false;
        first = 0u;
        base = row * p.chunks * PART;
        n = p.chunks * TOP;
        chunks_in = p.chunks;
    }
    gather(lane);
    let o = (p.out_row0 + row) * PART;
    let valid = min(p.vocab, TOP);
    let cands = sel_parts(lane) * TOP;
    for (var c = lid; c < cands; c += WG) {
        let e = list[c];
        if (e.y != NONE) {
            let ra = rank_of(e, cands);
            let rank = ra.x;
            if (rank < TOP) {
                let t = total(lane);
                let ls = log(t.y);
                let log_z = t.x + ls;
                let pr = exp(key_value(e.x) - log_z);
                out[o + 4u + rank] = e.y;
                out[o + 12u + rank] = bitcast<u32>(pr);
                if (rank == 0u) {
                    out[o] = e.y;
                    out[o + 1u] = bitcast<u32>(pr);
                    out[o + 2u] = bitcast<u32>(ls - t.z / t.y);
                    if (valid < 2u) {
                        // No p2: the margin is p1 − 0.
                        out[o + 3u] = bitcast<u32>(pr);
                    }
                } else if (rank == 1u) {
                    // p1 as the rank-0 invocation computes it, from the one better candidate.
                    let p0 = exp(key_value(ra.y) - log_z);
                    out[o + 3u] = bitcast<u32>(p0 - pr);
                }
            }
        }
    }
    if (lid >= valid && lid < TOP) {
        out[o + 4u + lid] = NONE;
        out[o + 12u + lid] = 0u;
    }
}
