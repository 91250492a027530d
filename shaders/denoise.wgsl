// One denoising step's decisions for a block, on the device, so several steps chain without the
// host (decode/block.rs): from the statistics stats.wgsl leaves (20 words a row) each masked cell
// takes its greedy token (argmax, confidence p_max), the commit rule picks among them, then dInfer's
// EOS rule; the canvas is updated in place and becomes the next pass's input ids. AR's step
// (decode/ar.rs) is the rule NEXT: the one cell p.stats_from, if masked, takes row 0's token.
//
// Canvas layout (u32 words, n cells, see ops/denoise.rs):
//   [0] steps taken, [1] cells still masked (0: done — a later step changes nothing), [2..4) unused,
//   [4, 4 + n) cells (token id, NONE = masked), [4 + n, 4 + 2n) input ids (the mask id where
//   masked), [4 + 2n + s·n, 4 + 2n + (s+1)·n) the cells after step s + 1 (the host replays these).
//
// One workgroup of 256, one invocation per cell (n ≤ 256). Exactness against the host rules
// (decode/policy.rs) is the point, so no comparison goes through float hardware where the host's
// comparison could differ: orderings use integer keys of the f32 bits — `total_key` is Rust's
// total_cmp (sorts and ranks), `order_key` IEEE's order of non-NaN values (-0 = +0, what `>=` and
// f32::max see; no denormal flushing). Ties go to the lower cell, as the host's stable order does.
// Only the entropy bound adds floats: invocation 0 sums in the host's sorted order, f32 adds being
// correctly rounded in WGSL as on the host.

struct CommitParams {
    n: u32,
    stats_from: u32,
    rule: u32,
    steps: u32,
    param: f32,
    eos: u32,
    output_from: u32,
    mask: u32,
    // The stats buffer's row that is this step's row 0 (a batched pass's rows, one sequence's).
    stats_row0: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const NONE: u32 = 0xffffffffu;
const WORDS: u32 = 20u;
const HEAD: u32 = 4u;
// p.rule
const THRESHOLD: u32 = 0u;
const FIXED_STEPS: u32 = 1u;
const ENTROPY_BOUND: u32 = 2u;
const MARGIN: u32 = 3u;
const NEXT: u32 = 4u;

@group(0) @binding(0) var<uniform> p: CommitParams;
@group(0) @binding(1) var<storage, read> stats: array<u32>;
@group(0) @binding(2) var<storage, read_write> canvas: array<u32>;

var<workgroup> sh_left: u32;
var<workgroup> sh_steps: u32;
var<workgroup> sh_cand: array<u32, 256>;
var<workgroup> sh_score: array<f32, 256>;
var<workgroup> sh_order: array<u32, 256>;
var<workgroup> sh_keep: u32;
var<workgroup> sh_eos: atomic<u32>;
var<workgroup> sh_masked: atomic<u32>;

fn total_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

fn order_key(x: f32) -> u32 {
    if (bitcast<u32>(x) == 0x80000000u) {
        return 0x80000000u;
    }
    return total_key(x);
}

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

@compute @workgroup_size(256)
fn commit_step(@builtin(local_invocation_index) i: u32) {
    if (i == 0u) {
        sh_left = canvas[1];
        sh_steps = canvas[0];
        atomicStore(&sh_eos, NONE);
        atomicStore(&sh_masked, 0u);
        sh_keep = 1u;
    }
    // A finished block: nothing changes (the passes recorded after it are wasted, not wrong).
    if (workgroupUniformLoad(&sh_left) == 0u) {
        return;
    }
    let n = p.n;
    // Read through shared memory: invocation 0 rewrites the header at the end.
    let steps = sh_steps;
    var cell = NONE;
    if (i < n) {
        cell = canvas[HEAD + i];
    }
    // NEXT reads one row, for one cell: no other cell is a candidate.
    let cand = i < n && cell == NONE && i >= p.stats_from && (p.rule != NEXT || i == p.stats_from);
    var token = 0u;
    var score = 0.0;
    if (cand) {
        let o = (p.stats_row0 + i - p.stats_from) * WORDS;
        token = stats[o];
        switch p.rule {
            case 2u: { score = bitcast<f32>(stats[o + 2u]); }
            case 3u: { score = bitcast<f32>(stats[o + 3u]); }
            default: { score = bitcast<f32>(stats[o + 1u]); }
        }
    }
    sh_cand[i] = u32(cand);
    sh_score[i] = score;
    workgroupBarrier();

    // Rank among the candidates (fixed steps: descending total order; entropy bound: ascending),
    // the candidate count, and the largest non-NaN score in IEEE order (threshold, margin).
    var count = 0u;
    var rank = 0u;
    var best = order_key(bitcast<f32>(0xff800000u));
    let mine = total_key(score);
    for (var j = 0u; j < n; j++) {
        if (sh_cand[j] == 0u) {
            continue;
        }
        count += 1u;
        let s = sh_score[j];
        if (!is_nan(s)) {
            best = max(best, order_key(s));
        }
        let k = total_key(s);
        var before = false;
        if (p.rule == ENTROPY_BOUND) {
            before = k < mine;
        } else {
            before = k > mine;
        }
        if (before || (k == mine && j < i)) {
            rank += 1u;
        }
    }
    if (cand && p.rule == ENTROPY_BOUND) {
        sh_order[rank] = i;
    }
    workgroupBarrier();
    // EB-sampler: the longest prefix in entropy order with Σ h − max h ≤ γ (h clamped at 0).
    if (i == 0u && p.rule == ENTROPY_BOUND) {
        var sum = 0.0;
        var mx = 0.0;
        var keep = 0u;
        for (var r = 0u; r < count; r++) {
            var h = sh_score[sh_order[r]];
            if (is_nan(h) || order_key(h) < order_key(0.0)) {
                h = 0.0;
            }
            sum += h;
            if (order_key(h) > order_key(mx)) {
                mx = h;
            }
            if (keep > 0u && order_key(sum - mx) > order_key(p.param)) {
                break;
            }
            keep += 1u;
        }
        sh_keep = max(keep, 1u);
    }
    let keep = workgroupUniformLoad(&sh_keep);

    var commit = false;
    switch p.rule {
        case 0u, 3u: {
            // Threshold / margin: score ≥ min(τ, max score).
            let bar = min(order_key(p.param), best);
            commit = cand && !is_nan(score) && order_key(score) >= bar;
        }
        case 4u: {
            commit = cand;
        }
        case 1u: {
            // LLaDA's schedule: ⌈masked / remaining steps⌉, all on the last step or past it.
            let remaining = p.steps - min(p.steps, steps);
            var k = count;
            if (remaining > 1u) {
                k = (count + remaining - 1u) / remaining;
            }
            commit = cand && rank < max(k, 1u);
        }
        default: {
            commit = cand && rank < keep;
        }
    }
    if (commit) {
        cell = token;
    }
    if (p.eos != NONE && i < n && i >= p.output_from && cell == p.eos) {
        atomicMin(&sh_eos, i);
    }
    workgroupBarrier();
    let first_eos = atomicLoad(&sh_eos);
    if (first_eos != NONE && i > first_eos) {
        cell = p.eos;
    }
    if (i < n) {
        canvas[HEAD + i] = cell;
        canvas[HEAD + n + i] = select(cell, p.mask, cell == NONE);
        if (steps < n) {
            canvas[HEAD + 2u * n + steps * n + i] = cell;
        }
        if (cell == NONE) {
            atomicAdd(&sh_masked, 1u);
        }
    }
    workgroupBarrier();
    if (i == 0u) {
        canvas[0] = steps + 1u;
        canvas[1] = atomicLoad(&sh_masked);
    }
}
