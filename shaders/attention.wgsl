// Attention over the KV cache.
// kv_store: copies the block's k and v (from the fused qkv rows) into the layer's caches
//   [capacity][kv_dim] at rows start .. start + T.
// attend_gqa + attend_merge (the default where head_dim is a multiple of 4 and at most 128):
//   flash-decoding over GQA groups. A slot is one query row (token t, q head h) × one split (a
//   range of `chunk` keys, a multiple of 4) and is worked by an octet of 8 invocations; a 64-wide
//   workgroup holds 8 slots, numbered row-fastest within (kv head, split), so the query heads and
//   tokens that share a kv head read the same K/V rows at the same time (broadcast loads; the
//   cache is read from memory once per split for the whole block). Invocation o of an octet holds
//   the head's vec4 columns o, o + 8, o + 16, o + 24 of q (pre-scaled) in registers, loads the same
//   columns of 4 keys' K and V rows (all loads issued before the arithmetic), and the 4 scores are
//   summed over the octet (octet_sum4: subgroup shuffles, or shared memory without subgroups; the
//   key loop is workgroup-uniform for the latter). Online softmax per slot (running max m, sum l,
//   accumulator over its columns), so no T × L matrix exists anywhere. With one split the slot
//   writes the normalised output; with more it writes (m, l) to part_ml[2·item] and its columns to
//   part4[item · hd/4 ..], item = (t · nq + h) · splits + split, and attend_merge merges the
//   splits by their maxima: each output vec4 column (t, h, c) takes sl lanes (merge_lanes: a power
//   of two ≤ 64, enough that each lane holds ≤ 8 splits), 64 / sl columns a workgroup; a lane folds
//   its splits (their loads all issued together: one memory round trip where splits ≤ 8·sl) and
//   the column's first lane combines the sl partials through shared memory after one barrier.
// attend + attend_combine (the fallback for other head sizes, or subgroups narrower than 8): one
//   workgroup of 64 per (q head, token, split), 64 keys at a time (one per invocation: score =
//   q·k · scale); a running max and sum rescale the output accumulator (each invocation owns head
//   dims lane, lane + 64, …; hd ≤ 256). With more than one split it writes its partial
//   (m, s, acc[hd]) to part[(t · nq + h) · splits + split] (hd + 2 floats each) and attend_combine
//   (one workgroup per (q head, token)) merges them.
// attend_gqa_seqs + attend_merge_seqs: the same over the rows of several sequences of one batched
//   pass whose caches share the layer buffers (the server's KV arena), one dispatch each for all of
//   them. The host's table `seq_tab` gives each sequence its rows, positions, mask, cache base, its
//   own splits and chunk (chosen as for its pass alone) and its first workgroup and split item; a
//   workgroup finds its sequence by a scan of the table (≤ 64 entries; a larger batch takes a
//   dispatch per 64 sequences; the merge's by its own first workgroup mwg0) and works the same
//   slots or columns it works in that sequence's pass alone, so every output is bit for bit the
//   pass alone's.
// A cache may be one range of such a shared buffer: its rows start at cache row `base`.
// The host picks the splits so that short query blocks against a long cache still fill the GPU.
// GQA: q head h reads kv head h / (nq / nkv). Every mask kind sees a prefix of the keys:
//   causal: pos + 1; bidirectional: kv_len; block-causal(b): (pos / b + 1)·b;
//   causal-then-bidirectional(d): kv_len from d on, pos + 1 before; all capped at kv_len.
// A sliding window (window > 0) also hides keys more than window − 1 before the query (keys after
//   it follow the mask alone, as the CPU reference has it): those are masked inside the key loops
//   rather than skipped, so the split arithmetic stays that of the prefix.

#include "grid"
#include "reduce"
#include "probe"

struct AttnParams {
    t: u32,
    nq: u32,
    nkv: u32,
    hd: u32,
    start: u32,
    kv_len: u32,
    mask: u32,
    mask_arg: u32,
    scale: f32,
    kv_dim: u32,
    splits: u32,
    chunk: u32,
    window: u32,
    // The cache's first row (a range of a shared layer buffer).
    base: u32,
    // The _seqs kernels: entries of seq_tab; their t is the batch's rows and their splits the
    // grid's workgroups.
    seqs: u32,
    _pad2: u32,
}

// One sequence's share of a batched dispatch; a pass alone is the share params_seq() makes.
struct SeqAttn {
    // Its first row in the batch's qkv and out rows, and its row count.
    row0: u32,
    t: u32,
    start: u32,
    kv_len: u32,
    mask: u32,
    mask_arg: u32,
    // Its first row in the layer caches.
    base: u32,
    splits: u32,
    chunk: u32,
    // Its first workgroup of attend_gqa_seqs' grid and its first split item in part4 / part_ml.
    wg0: u32,
    item0: u32,
    // Its first workgroup of attend_merge_seqs' grid.
    mwg0: u32,
}

@group(0) @binding(0) var<uniform> p: AttnParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> k_read: array<f32>;
@group(0) @binding(6) var<storage, read> v_read: array<f32>;
@group(0) @binding(7) var<storage, read_write> part: array<f32>;
@group(0) @binding(8) var<storage, read> k4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> v4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> part4: array<vec4<f32>>;
@group(0) @binding(11) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(12) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read> seq_tab: array<SeqAttn>;

fn params_seq() -> SeqAttn {
    return SeqAttn(0u, p.t, p.start, p.kv_len, p.mask, p.mask_arg, p.base, p.splits, p.chunk, 0u, 0u, 0u);
}

@compute @workgroup_size(64)
fn kv_store(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= p.t * p.kv_dim) {
        return;
    }
    let t = i / p.kv_dim;
    let c = i % p.kv_dim;
    let qd = p.nq * p.hd;
    let src = t * (qd + 2u * p.kv_dim) + qd + c;
    let dst = (p.base + p.start + t) * p.kv_dim + c;
    k_cache[dst] = qkv[src];
    v_cache[dst] = qkv[src + p.kv_dim];
}

fn visible_len(s: SeqAttn, pos: u32) -> u32 {
    var n = pos + 1u;
    if (s.mask == 1u) {
        n = s.kv_len;
    } else if (s.mask == 2u) {
        n = (pos / s.mask_arg + 1u) * s.mask_arg;
    } else if (s.mask == 3u && pos >= s.mask_arg) {
        n = s.kv_len;
    }
    return min(n, s.kv_len);
}

// The first key a query at `pos` sees under the sliding window.
fn window_lo(pos: u32) -> u32 {
    if (p.window == 0u || pos + 1u < p.window) {
        return 0u;
    }
    return pos + 1u - p.window;
}

var<workgroup> q_sh: array<f32, 256>;
var<workgroup> p_sh: array<f32, 64>;

@compute @workgroup_size(64)
fn attend(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let t = wid.y;
    let split = wid.z;
    let pos = p.start + t;
    let kvh = h / (p.nq / p.nkv);
    let qd = p.nq * p.hd;
    let row = t * (qd + 2u * p.kv_dim);
    for (var d = lane.id; d < p.hd; d += 64u) {
        q_sh[d] = qkv[row + h * p.hd + d];
    }
    workgroupBarrier();
    let limit = visible_len(params_seq(), pos);
    let wlo = window_lo(pos);
    let lo = split * p.chunk;
    let hi = min(lo + p.chunk, limit);
    let koff = kvh * p.hd;
    let hd4 = p.hd & ~3u;
    var m = neg_inf();
    var s = 0.0;
    var acc = vec4<f32>(0.0);
    for (var j0 = lo; j0 < hi; j0 += 64u) {
        let j = j0 + lane.id;
        var sc = neg_inf();
        let seen = j < hi && j >= wlo;
        if (seen) {
            let kb = (p.base + j) * p.kv_dim + koff;
            var d4 = vec4<f32>(0.0);
            for (var i = 0u; i < hd4; i += 4u) {
                let q = vec4<f32>(q_sh[i], q_sh[i + 1u], q_sh[i + 2u], q_sh[i + 3u]);
                let k = vec4<f32>(k_read[kb + i], k_read[kb + i + 1u], k_read[kb + i + 2u], k_read[kb + i + 3u]);
                d4 += q * k;
            }
            var d = (d4.x + d4.y) + (d4.z + d4.w);
            for (var i = hd4; i < p.hd; i++) {
                d += q_sh[i] * k_read[kb + i];
            }
            sc = d * p.scale;
        }
        let mn = max(m, wg_max(sc, lane));
        var pj = 0.0;
        if (seen) {
            pj = exp(sc - mn);
        }
        p_sh[lane.id] = pj;
        let cs = wg_sum(pj, lane);
        let alpha = select(exp(m - mn), 0.0, m == neg_inf());
        s = s * alpha + cs;
        acc *= alpha;
        let n = min(64u, hi - j0);
        for (var jj = 0u; jj < n; jj++) {
            let vb = (p.base + j0 + jj) * p.kv_dim + koff;
            let pp = p_sh[jj];
            for (var c = 0u; c < 4u; c++) {
                let d = lane.id + 64u * c;
                if (d < p.hd) {
                    acc[c] += pp * v_read[vb + d];
                }
            }
        }
        m = mn;
        workgroupBarrier();
    }
    if (p.splits == 1u) {
        for (var c = 0u; c < 4u; c++) {
            let d = lane.id + 64u * c;
            if (d < p.hd) {
                out[t * qd + h * p.hd + d] = select(0.0, acc[c] / s, s > 0.0);
            }
        }
        return;
    }
    let pb = ((t * p.nq + h) * p.splits + split) * (p.hd + 2u);
    if (lane.id == 0u) {
        part[pb] = m;
        part[pb + 1u] = s;
    }
    for (var c = 0u; c < 4u; c++) {
        let d = lane.id + 64u * c;
        if (d < p.hd) {
            part[pb + 2u + d] = acc[c];
        }
    }
}

@compute @workgroup_size(64)
fn attend_combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let t = wid.y;
    let qd = p.nq * p.hd;
    let pb = (t * p.nq + h) * p.splits * (p.hd + 2u);
    var mx = neg_inf();
    for (var i = 0u; i < p.splits; i++) {
        mx = max(mx, part[pb + i * (p.hd + 2u)]);
    }
    var s = 0.0;
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < p.splits; i++) {
        let b = pb + i * (p.hd + 2u);
        let mi = part[b];
        let w = select(exp(mi - mx), 0.0, mi == neg_inf());
        s += w * part[b + 1u];
        for (var c = 0u; c < 4u; c++) {
            let d = lid + 64u * c;
            if (d < p.hd) {
                acc[c] += w * part[b + 2u + d];
            }
        }
    }
    for (var c = 0u; c < 4u; c++) {
        let d = lid + 64u * c;
        if (d < p.hd) {
            out[t * qd + h * p.hd + d] = select(0.0, acc[c] / s, s > 0.0);
        }
    }
}

// Four vec4 columns of one head row: o, o + 8, o + 16, o + 24 (zero past hd/4).
struct Row4 {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
    d: vec4<f32>,
}

fn row4_zero() -> Row4 {
    return Row4(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
}

// GQA_CLAMP 1 (the default, KernelChoice::attn_clamp): the K/V loads of attend_gqa are
// unconditional — keys past the visible ones read the last cached row, columns past the head its
// last column, instead of being skipped — so no branch surrounds them, which NVIDIA's compiler
// would serialize (H100, 20-layer LLaDA2.0-mini q4: attend_gqa 471 → 293 µs a 1-token pass, 1,368
// → 559 at 16 tokens, 2,240 → 839 at 32; 168 → 128 registers). Those keys' scores are masked to
// -inf as before and their V rows weighted by 0 (cached data, finite); columns past the head meet
// q's zeros or are never stored. The same values as 0, the loads under the tests.
override GQA_CLAMP: u32 = 1u;

fn row_k_all(base: u32, o: u32, hv: u32) -> Row4 {
    let l = hv - 1u;
    return Row4(k4[base + min(o, l)], k4[base + min(o + 8u, l)], k4[base + min(o + 16u, l)],
        k4[base + min(o + 24u, l)]);
}

fn row_v_all(base: u32, o: u32, hv: u32) -> Row4 {
    let l = hv - 1u;
    return Row4(v4[base + min(o, l)], v4[base + min(o + 8u, l)], v4[base + min(o + 16u, l)],
        v4[base + min(o + 24u, l)]);
}

fn row_k(base: u32, o: u32, hv: u32, ok: bool) -> Row4 {
    var r = row4_zero();
    if ((PROBE & 8u) != 0u) {
        return Row4(vec4<f32>(1e-3), vec4<f32>(1e-3), vec4<f32>(1e-3), vec4<f32>(1e-3));
    }
    if (ok) {
        if (o < hv) {
            r.a = k4[base + o];
        }
        if (o + 8u < hv) {
            r.b = k4[base + o + 8u];
        }
        if (o + 16u < hv) {
            r.c = k4[base + o + 16u];
        }
        if (o + 24u < hv) {
            r.d = k4[base + o + 24u];
        }
    }
    return r;
}

fn row_v(base: u32, o: u32, hv: u32, ok: bool) -> Row4 {
    var r = row4_zero();
    if ((PROBE & 8u) != 0u) {
        return Row4(vec4<f32>(1e-3), vec4<f32>(1e-3), vec4<f32>(1e-3), vec4<f32>(1e-3));
    }
    if (ok) {
        if (o < hv) {
            r.a = v4[base + o];
        }
        if (o + 8u < hv) {
            r.b = v4[base + o + 8u];
        }
        if (o + 16u < hv) {
            r.c = v4[base + o + 16u];
        }
        if (o + 24u < hv) {
            r.d = v4[base + o + 24u];
        }
    }
    return r;
}

fn q_col(base: u32, c: u32, hv: u32) -> vec4<f32> {
    if (c >= hv) {
        return vec4<f32>(0.0);
    }
    let i = base + 4u * c;
    return vec4<f32>(qkv[i], qkv[i + 1u], qkv[i + 2u], qkv[i + 3u]) * p.scale;
}

fn dot_row(q: Row4, k: Row4) -> f32 {
    return (dot(q.a, k.a) + dot(q.b, k.b)) + (dot(q.c, k.c) + dot(q.d, k.d));
}

fn put_col(i: u32, v: vec4<f32>, to_out: bool) {
    if (to_out) {
        out4[i] = v;
    } else {
        part4[i] = v;
    }
}

fn put_row(base: u32, o: u32, hv: u32, r: Row4, f: f32, to_out: bool) {
    if (o < hv) {
        put_col(base + o, r.a * f, to_out);
    }
    if (o + 8u < hv) {
        put_col(base + o + 8u, r.b * f, to_out);
    }
    if (o + 16u < hv) {
        put_col(base + o + 16u, r.c * f, to_out);
    }
    if (o + 24u < hv) {
        put_col(base + o + 24u, r.d * f, to_out);
    }
}

// Slot `slot` of sequence s (its rows, positions, mask and splits), worked by this octet.
fn gqa_slot(lane: Lane, s: SeqAttn, slot: u32) {
    let g = p.nq / p.nkv;
    let rows = g * s.t;
    let items = p.nkv * s.splits * rows;
    let o = lane.id % 8u;
    let live = slot < items;
    let sl = min(slot, items - 1u);
    let r = sl % rows;
    let split = (sl / rows) % s.splits;
    let kvh = sl / (rows * s.splits);
    let t = r / g;
    let h = kvh * g + r % g;
    let qd = p.nq * p.hd;
    let hv = p.hd / 4u;
    let qb = (s.row0 + t) * (qd + 2u * p.kv_dim) + h * p.hd;
    let q = Row4(q_col(qb, o, hv), q_col(qb, o + 8u, hv), q_col(qb, o + 16u, hv), q_col(qb, o + 24u, hv));
    let lo = split * s.chunk;
    let hi = select(lo, max(lo, min(lo + s.chunk, visible_len(s, s.start + t))), live);
    let kv4 = p.kv_dim / 4u;
    let kb = s.base * kv4 + kvh * hv;
    var m = neg_inf();
    var l = 0.0;
    var acc = row4_zero();
    // Workgroup-uniform trip count (the shared-memory octet_sum4 has barriers); keys past hi are
    // masked.
    for (var j0 = 0u; j0 < s.chunk; j0 += 4u) {
        let j = lo + j0;
        let wlo = window_lo(s.start + t);
        let ok = vec4<bool>(j < hi && j >= wlo, j + 1u < hi && j + 1u >= wlo, j + 2u < hi && j + 2u >= wlo, j + 3u < hi && j + 3u >= wlo);
        var k0: Row4;
        var k1: Row4;
        var k2: Row4;
        var k3: Row4;
        var v0: Row4;
        var v1: Row4;
        var v2: Row4;
        var v3: Row4;
        let jl = max(s.kv_len, 1u) - 1u;
        let b = vec4<u32>(min(vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(jl))) * kv4 + vec4<u32>(kb);
        if (GQA_CLAMP != 0u && (PROBE & 8u) == 0u) {
            k0 = row_k_all(b.x, o, hv);
            k1 = row_k_all(b.y, o, hv);
            k2 = row_k_all(b.z, o, hv);
            k3 = row_k_all(b.w, o, hv);
            v0 = row_v_all(b.x, o, hv);
            v1 = row_v_all(b.y, o, hv);
            v2 = row_v_all(b.z, o, hv);
            v3 = row_v_all(b.w, o, hv);
        } else {
            k0 = row_k(j * kv4 + kb, o, hv, ok.x);
            k1 = row_k((j + 1u) * kv4 + kb, o, hv, ok.y);
            k2 = row_k((j + 2u) * kv4 + kb, o, hv, ok.z);
            k3 = row_k((j + 3u) * kv4 + kb, o, hv, ok.w);
            v0 = row_v(j * kv4 + kb, o, hv, ok.x);
            v1 = row_v((j + 1u) * kv4 + kb, o, hv, ok.y);
            v2 = row_v((j + 2u) * kv4 + kb, o, hv, ok.z);
            v3 = row_v((j + 3u) * kv4 + kb, o, hv, ok.w);
        }
        let part_dot = vec4<f32>(dot_row(q, k0), dot_row(q, k1), dot_row(q, k2), dot_row(q, k3));
        let sc = select(vec4<f32>(neg_inf()), octet_sum4(part_dot, lane), ok);
        let mn = max(m, max(max(sc.x, sc.y), max(sc.z, sc.w)));
        if (mn > neg_inf()) {
            let alpha = select(exp(m - mn), 0.0, m == neg_inf());
            let pj = select(vec4<f32>(0.0), exp(sc - vec4<f32>(mn)), ok);
            l = l * alpha + ((pj.x + pj.y) + (pj.z + pj.w));
            acc.a = acc.a * alpha + (pj.x * v0.a + pj.y * v1.a) + (pj.z * v2.a + pj.w * v3.a);
            acc.b = acc.b * alpha + (pj.x * v0.b + pj.y * v1.b) + (pj.z * v2.b + pj.w * v3.b);
            acc.c = acc.c * alpha + (pj.x * v0.c + pj.y * v1.c) + (pj.z * v2.c + pj.w * v3.c);
            acc.d = acc.d * alpha + (pj.x * v0.d + pj.y * v1.d) + (pj.z * v2.d + pj.w * v3.d);
            m = mn;
        }
    }
    if (!live) {
        return;
    }
    if (s.splits == 1u) {
        put_row(((s.row0 + t) * qd + h * p.hd) / 4u, o, hv, acc, select(0.0, 1.0 / l, l > 0.0), true);
        return;
    }
    let item = s.item0 + (t * p.nq + h) * s.splits + split;
    if (o == 0u) {
        part_ml[2u * item] = m;
        part_ml[2u * item + 1u] = l;
    }
    put_row(item * hv, o, hv, acc, 1.0, false);
}

@compute @workgroup_size(64)
fn attend_gqa(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    gqa_slot(lane, params_seq(), (wid.x + wid.y * nwg.x) * 8u + lane.id / 8u);
}

// The sequence whose workgroups include workgroup `wg` (the table is in wg0 order).
fn seq_of_group(wg: u32) -> u32 {
    var s = 0u;
    for (var i = 1u; i < p.seqs; i++) {
        if (seq_tab[i].wg0 <= wg) {
            s = i;
        }
    }
    return s;
}

@compute @workgroup_size(64)
fn attend_gqa_seqs(lane: Lane, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let wg = wid.x + wid.y * nwg.x;
    // Past the last sequence's groups (a 2-D grid rounds up): the whole workgroup leaves.
    if (wg >= p.splits) {
        return;
    }
    let s = seq_tab[seq_of_group(wg)];
    gqa_slot(lane, s, (wg - s.wg0) * 8u + lane.id / 8u);
}

// Split lanes of one merged output column: enough that each holds at most MERGE_BATCH splits,
// a power of two ≤ 64 (so a workgroup holds whole columns). A function of the sequence's splits
// alone: a sequence's merge arithmetic is the same in a batched pass and alone.
const MERGE_BATCH: u32 = 8u;

fn merge_lanes(splits: u32) -> u32 {
    let n = (splits + MERGE_BATCH - 1u) / MERGE_BATCH;
    var sl = 1u;
    while (sl < n && sl < 64u) {
        sl *= 2u;
    }
    return sl;
}

// One split's partial: its max, sum and one vec4 column of its accumulator.
struct Part {
    m: f32,
    l: f32,
    a: vec4<f32>,
}

// Split s of the item at b (of n splits); none (max -inf, zeros) where !ok. The loads read split
// min(s, n − 1) whatever ok is and select after, so no branch surrounds them (see GQA_CLAMP).
fn load_part(b: u32, s: u32, n: u32, hv: u32, c: u32, ok: bool) -> Part {
    let i = b + min(s, n - 1u);
    let m = part_ml[2u * i];
    let l = part_ml[2u * i + 1u];
    let a = part4[i * hv + c];
    return Part(select(neg_inf(), m, ok), select(0.0, l, ok), select(vec4<f32>(0.0), a, ok));
}

fn part_w(q: Part, mn: f32) -> f32 {
    return select(exp(q.m - mn), 0.0, q.m == neg_inf());
}

var<workgroup> mrg_m: array<f32, 64>;
var<workgroup> mrg_l: array<f32, 64>;
var<workgroup> mrg_acc: array<vec4<f32>, 64>;

// Workgroup `wg` (counted from the sequence's first) of sequence s's merge: 64 / sl output columns,
// sl lanes each. Lane r of a column folds splits r, r + sl, … (MERGE_BATCH at a time, all their
// loads issued before the arithmetic: one memory round trip for up to 8·sl splits) into its own
// (max, sum, acc); the column's first lane then combines the sl lane partials by their maxima
// through shared memory. Every invocation must call it (one barrier).
fn merge_group(lid: u32, wg: u32, s: SeqAttn, in_grid: bool) {
    let hv = p.hd / 4u;
    let sl = merge_lanes(s.splits);
    let r = lid % sl;
    let item = wg * (64u / sl) + lid / sl;
    let live = in_grid && item < s.t * p.nq * hv && s.splits > 1u;
    let b = s.item0 + (item / hv) * s.splits;
    let c = item % hv;
    var m = neg_inf();
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var i0 = 0u; live && r + i0 * sl < s.splits; i0 += MERGE_BATCH) {
        let s0 = r + i0 * sl;
        let n = s.splits;
        let q0 = load_part(b, s0, n, hv, c, true);
        let q1 = load_part(b, s0 + sl, n, hv, c, s0 + sl < n);
        let q2 = load_part(b, s0 + 2u * sl, n, hv, c, s0 + 2u * sl < n);
        let q3 = load_part(b, s0 + 3u * sl, n, hv, c, s0 + 3u * sl < n);
        let q4 = load_part(b, s0 + 4u * sl, n, hv, c, s0 + 4u * sl < n);
        let q5 = load_part(b, s0 + 5u * sl, n, hv, c, s0 + 5u * sl < n);
        let q6 = load_part(b, s0 + 6u * sl, n, hv, c, s0 + 6u * sl < n);
        let q7 = load_part(b, s0 + 7u * sl, n, hv, c, s0 + 7u * sl < n);
        let bm = max(max(max(q0.m, q1.m), max(q2.m, q3.m)), max(max(q4.m, q5.m), max(q6.m, q7.m)));
        let mn = max(m, bm);
        if (mn > neg_inf()) {
            let alpha = select(exp(m - mn), 0.0, m == neg_inf());
            let w0 = part_w(q0, mn);
            let w1 = part_w(q1, mn);
            let w2 = part_w(q2, mn);
            let w3 = part_w(q3, mn);
            let w4 = part_w(q4, mn);
            let w5 = part_w(q5, mn);
            let w6 = part_w(q6, mn);
            let w7 = part_w(q7, mn);
            l = l * alpha + (((w0 * q0.l + w1 * q1.l) + (w2 * q2.l + w3 * q3.l)) + ((w4 * q4.l + w5 * q5.l) + (w6 * q6.l + w7 * q7.l)));
            acc = acc * alpha + (((w0 * q0.a + w1 * q1.a) + (w2 * q2.a + w3 * q3.a)) + ((w4 * q4.a + w5 * q5.a) + (w6 * q6.a + w7 * q7.a)));
            m = mn;
        }
    }
    mrg_m[lid] = m;
    mrg_l[lid] = l;
    mrg_acc[lid] = acc;
    workgroupBarrier();
    if (!live || r != 0u) {
        return;
    }
    var mx = neg_inf();
    for (var k = 0u; k < sl; k++) {
        mx = max(mx, mrg_m[lid + k]);
    }
    var lt = 0.0;
    var at = vec4<f32>(0.0);
    for (var k = 0u; k < sl; k++) {
        let mk = mrg_m[lid + k];
        let w = select(exp(mk - mx), 0.0, mk == neg_inf());
        lt += w * mrg_l[lid + k];
        at += w * mrg_acc[lid + k];
    }
    out4[s.row0 * p.nq * hv + item] = select(vec4<f32>(0.0), at / lt, lt > 0.0);
}

@compute @workgroup_size(64)
fn attend_merge(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    merge_group(lid, wid.x + wid.y * nwg.x, params_seq(), true);
}

// The sequence whose merge workgroups include workgroup `wg` (the table is in mwg0 order; a
// sequence of one split has none, and its mwg0 is the next one's).
fn seq_of_merge_group(wg: u32) -> u32 {
    var s = 0u;
    for (var i = 1u; i < p.seqs; i++) {
        if (seq_tab[i].mwg0 <= wg) {
            s = i;
        }
    }
    return s;
}

@compute @workgroup_size(64)
fn attend_merge_seqs(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let wg = wid.x + wid.y * nwg.x;
    let s = seq_tab[seq_of_merge_group(wg)];
    // Past the last sequence's groups (a 2-D grid rounds up; p.splits is the merge's workgroups)
    // nobody is live, but all reach the barrier.
    merge_group(lid, wg - min(wg, s.mwg0), s, wg < p.splits);
}
