// y = x · Wᵀ for few activation rows (1–16, f32 weights up to 64) with q4, q8 or f32 weights
// (WTYPE 3 / 2 / 0, lib/dequant.wgsl's layout), x [t, k] and y f32 — gemv.wgsl's job with the wide loads a memory-bound gemv needs on a
// large GPU (lib/wide_gemv.wgsl: 16-byte chunks, one scale a chunk, activations staged in shared
// memory and reused by four rows a lane group).
// Tiling: 128 invocations, 512 / L weight rows a workgroup (L = p.lanes: 4–16 by row length, or
// 64 for the f32 routers' few rows; ops/matmul.rs wide_shape / row_lanes pick; gemv_wide works
// ROW_SETS such sets against each staged block), workgroups folded
// into x × y past 65535, and
// token blocks of p.tile_t rows (tile_t · k ≤ 4096, at most 4), each staged once: workgroup z
// works blocks z, z + nwg.z, … (ops/matmul.rs wide_grid: a matrix with enough row groups to fill the
// GPU, the LM head, takes one z and loops over every block, so its weights come from DRAM once and
// from cache for the later blocks; a small one spreads its blocks over z to fill the GPU). A
// (row, token) sum does not depend on which tokens share its block or which workgroup works it, so
// a batched pass's rows equal each pass alone bit for bit (ops/batch_class.rs).
// - gemv_wide: rows n of W.
// - gemv_wide_swiglu: a dense MLP's fused [gate; up] (p.n = 2I rows); a row group works gate c,
//   gate c + 1, up c, up c + 1 and writes silu(gate) · up into h[t, out_col0 + c].
// Fusions (p.mode, lib/matmul_params.wgsl): MODE_NORM stages x · norm_w and sums the staged rows'
// squares (each block row is staged whole), the results then scaled by the row's 1 / rms;
// MODE_ACCUM adds the result to `out`; MODE_HOUT (gemv_wide) has the grid's first workgroup of
// each token block also write the normed rows (x · inv_rms · norm_w, norm.wgsl's product order)
// to `hout` — the router's gemv hands the experts their input, and the layer loses its norm
// dispatch.
// QACT (q4, lib/wide_gemv.wgsl): 8-bit activation codes; with MODE_NORM each block row's 1 / rms
// is summed first (q8_norm_first) and the codes made from the normed rows.
// - q8_codes: makes those codes once for a pass (a workgroup a row, an invocation a chunk, the
//   staging's arithmetic and order, so the same bits) into `hout` as token rows of 3 · k / 32
//   vec4s (the staging layout); gemv_wide and gemv_wide_swiglu under MODE_CODES, and the wide
//   expert kernels under QCODES, then copy a block's codes into shared memory instead of reading,
//   norming and quantizing its floats — where every workgroup of a matrix did that for the same
//   rows (ops/matmul.rs `q8_codes` and its callers decide).

#include "matmul_params"
#include "wide_gemv"

// Row sets a gemv_wide workgroup works against each staged block, 512 / L rows each (ops/matmul.rs
// `row_sets`: the weight-type argument's third byte, at most 4). A matrix the grid reads once over
// many token blocks (the LM head of a 16–32-row pass: 2,456 workgroups, each staging every block)
// then stages each block for more rows, in fewer workgroups; each set's sums are the ones it
// would have alone.
override ROW_SETS: u32 = 1u;

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// The same buffer as w4, for the scales.
@group(0) @binding(4) var<storage, read> w_words: array<u32>;
// MODE_NORM's weight (k values) and MODE_HOUT's normed rows ([t, k]) or q8_codes' codes; dummies
// otherwise.
@group(0) @binding(5) var<storage, read> norm_w: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> hout: array<vec4<f32>>;

// The block's first activation row.
var<private> blk_row0: u32;
// MODE_NORM: Σ x² of the values this invocation staged, component t for block row t.
var<private> wss: vec4<f32>;
// MODE_NORM with QACT: each block row's 1 / rms, applied as the row is staged (the codes are made
// from the normed values), so the sums need none after.
var<private> row_inv: vec4<f32>;

fn wide_chunk(i: u32) -> vec4<u32> {
    return w4[i];
}

fn wide_word(i: u32) -> u32 {
    return w_words[i];
}

fn wide_x(t: u32, g: u32) -> vec4<f32> {
    let v = x_act[(blk_row0 + t) * (p.k / 4u) + g];
    if ((p.mode & MODE_NORM) == 0u) {
        return v;
    }
    wss += at_token(t, dot(v, v));
    if (QACT) {
        // norm.wgsl's product order: (x · inv_rms) · w.
        return v * row_inv[t] * norm_w[g];
    }
    return v * norm_w[g];
}

// MODE_NORM with QACT: sets row_inv from the block rows' squares (summed the float path's way, so
// the same 1 / rms) before the codes are made; a barrier follows. Otherwise row_inv is 1.
fn q8_norm_first(lid: u32, nt: u32) {
    row_inv = vec4<f32>(1.0);
    if (!QACT || (p.mode & MODE_NORM) == 0u) {
        return;
    }
    let kv = p.k / 4u;
    for (var i = lid; i < nt * kv; i += WIDE_WG) {
        let v = x_act[(blk_row0 + i / kv) * kv + i % kv];
        wss += at_token(i / kv, dot(v, v));
    }
    row_inv = wide_inv_rms(lid);
    // xs is staged next.
    workgroupBarrier();
}

// Each block row's 1 / rms after wide_rows (1 without MODE_NORM): QACT has it from
// q8_norm_first (its staging added to wss again).
fn rows_inv(lid: u32) -> vec4<f32> {
    if (QACT) {
        return row_inv;
    }
    return wide_inv_rms(lid);
}

// MODE_NORM: each block row's 1 / rms from the invocations' staged squares (a fixed two-level
// order), for every invocation; 1 otherwise. After wide_rows: its lane partials' region of xs is
// free, and its row sums (xs[768 ..]) stay.
fn wide_inv_rms(lid: u32) -> vec4<f32> {
    if ((p.mode & MODE_NORM) == 0u) {
        return vec4<f32>(1.0);
    }
    xs[lid] = wss;
    workgroupBarrier();
    if (lid < 16u) {
        var s = vec4<f32>(0.0);
        for (var j = 0u; j < 8u; j++) {
            s += xs[lid * 8u + j];
        }
        xs[128u + lid] = s;
    }
    workgroupBarrier();
    var s = vec4<f32>(0.0);
    for (var j = 0u; j < 16u; j++) {
        s += xs[128u + j];
    }
    return vec4<f32>(1.0) / sqrt(s / f32(p.k) + vec4<f32>(p.norm_eps));
}

// Writes (MODE_ACCUM: adds) one result.
fn wide_store(i: u32, v: f32) {
    if ((p.mode & MODE_ACCUM) != 0u) {
        out[i] = out[i] + v;
    } else {
        out[i] = v;
    }
}

// Vec4 j of the block's row t in codes q8_codes made (MODE_CODES: x_act holds them, from row 0).
fn wide_code(t: u32, j: u32) -> vec4<f32> {
    return x_act[(blk_row0 + t) * (3u * p.k / 32u) + j];
}

// Stages the block's rows t0 .. t0 + nt: from q8_codes' codes under MODE_CODES, else as
// lib/wide_gemv.wgsl makes them (a folded norm's 1 / rms first, with QACT); a barrier follows.
fn stage_block(lid: u32, m: WideMat, t0: u32, nt: u32) {
    wss = vec4<f32>(0.0);
    if (QACT && (p.mode & MODE_CODES) != 0u) {
        row_inv = vec4<f32>(1.0);
        wide_stage_codes(lid, m, nt);
        return;
    }
    q8_norm_first(lid, nt);
    wide_stage(lid, m, nt);
}

// QACT's codes of activation row p.x_row0 + r, one workgroup a row r < p.t (grid folded as the
// gemvs'), an invocation a 32-value chunk (rows of at most WIDE_STAGE values: 128 chunks), into
// hout row r (3 · k / 32 vec4s, the staging layout). MODE_NORM: the row normed first, its sum of
// squares in the order of the gemvs' staging (q8_norm_first, wide_inv_rms) for a row at place
// r % p.tile_t of its token block, so the codes equal theirs bit for bit.
@compute @workgroup_size(128)
fn q8_codes(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let r = group_id(wid, nwg);
    if (r >= p.t) {
        return;
    }
    let m = WideMat(0u, p.scales, p.k, p.lanes);
    let kv = p.k / 4u;
    let cpr = row_chunks(m);
    let x0 = (p.x_row0 + r) * kv;
    var inv = 1.0;
    if ((p.mode & MODE_NORM) != 0u) {
        // q8_norm_first lays the block's rows end to end and gives invocation lid the values
        // i ≡ lid (mod 128), ascending: here the row's g ≡ lid − (r % tile) · kv.
        let g0 = (lid + WIDE_WG - ((r % p.tile_t) * kv) % WIDE_WG) % WIDE_WG;
        var v: array<vec4<f32>, 8>;
        for (var j = 0u; j < 8u; j++) {
            v[j] = x_act[x0 + min(g0 + j * WIDE_WG, kv - 1u)];
        }
        var s = 0.0;
        for (var j = 0u; j < 8u; j++) {
            if (g0 + j * WIDE_WG < kv) {
                s += dot(v[j], v[j]);
            }
        }
        // wide_inv_rms's two levels.
        xs[lid] = vec4<f32>(s, 0.0, 0.0, 0.0);
        workgroupBarrier();
        if (lid < 16u) {
            var s1 = 0.0;
            for (var j = 0u; j < 8u; j++) {
                s1 += xs[lid * 8u + j].x;
            }
            xs[128u + lid].x = s1;
        }
        workgroupBarrier();
        var s2 = 0.0;
        for (var j = 0u; j < 16u; j++) {
            s2 += xs[128u + j].x;
        }
        inv = 1.0 / sqrt(s2 / f32(p.k) + p.norm_eps);
    }
    // Invocations past the row's chunks load its last one and store nothing.
    let c = min(lid, cpr - 1u);
    var v: array<vec4<f32>, 8>;
    for (var j = 0u; j < 8u; j++) {
        v[j] = x_act[x0 + c * 8u + j];
    }
    if ((p.mode & MODE_NORM) != 0u) {
        for (var j = 0u; j < 8u; j++) {
            // norm.wgsl's product order: (x · inv_rms) · w.
            v[j] = v[j] * inv * norm_w[c * 8u + j];
        }
    }
    let q = q8_encode(v);
    if (lid < cpr) {
        let b = r * 3u * cpr + lid;
        hout[b] = q.q0;
        hout[b + cpr] = q.q1;
        hout[b + 2u * cpr] = q.dm;
    }
}

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

@compute @workgroup_size(128)
fn gemv_wide(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let m = WideMat(0u, p.scales, p.k, p.lanes);
    let row_base = group_id(wid, nwg) * (512u / p.lanes) * ROW_SETS;
    for (var blk = wid.z; blk * p.tile_t < p.t; blk += nwg.z) {
        wide_block(lid, group_id(wid, nwg) == 0u, m, row_base, blk * p.tile_t);
        // The next block stages over xs, which this one's stores still read.
        workgroupBarrier();
    }
}

// gemv_wide's token block from row t0.
fn wide_block(lid: u32, first: bool, m: WideMat, row_base: u32, t0: u32) {
    let nt = min(p.t - t0, p.tile_t);
    blk_row0 = p.x_row0 + t0;
    stage_block(lid, m, t0, nt);
    let per = 512u / p.lanes;
    let group_rows = vec4<u32>((lid / p.lanes) * 4u) + vec4<u32>(0u, 1u, 2u, 3u);
    var inv = vec4<f32>(1.0);
    if (ROW_SETS == 1u) {
        // One set: the plain order, with no array of partials for the compiler to keep.
        wide_rows(lid, m, vec4<u32>(row_base) + group_rows, p.n, nt);
        inv = store_set(lid, row_base, t0, nt);
    } else {
        // Every set's partials first: the reductions reuse xs, which holds the staged block.
        var parts: array<RowPartials, 4>;
        for (var rs = 0u; rs < ROW_SETS; rs++) {
            let rows = vec4<u32>(row_base + rs * per) + group_rows;
            parts[rs] = wide_partials(lid, m, rows, p.n, nt);
        }
        for (var rs = 0u; rs < ROW_SETS; rs++) {
            let a = parts[rs];
            wide_reduce(lid, p.lanes, a.r0, a.r1, a.r2, a.r3);
            inv = store_set(lid, row_base + rs * per, t0, nt);
        }
    }
    if ((p.mode & MODE_HOUT) != 0u && first) {
        let kv = p.k / 4u;
        for (var i = lid; i < nt * kv; i += WIDE_WG) {
            let t = i / kv;
            let g = i % kv;
            hout[(t0 + t) * kv + g] = x_act[(blk_row0 + t) * kv + g] * inv[t] * norm_w[g];
        }
    }
}

// Stores the reduced row sums of one set (rows base .. base + 512 / L) for the block's nt rows
// from t0; returns each block row's 1 / rms (rows_inv).
fn store_set(lid: u32, base: u32, t0: u32, nt: u32) -> vec4<f32> {
    let inv = rows_inv(lid);
    // QACT's codes were made from the normed rows.
    let after = select(inv, vec4<f32>(1.0), QACT);
    if (lid < 512u / p.lanes && base + lid < p.n) {
        let s = xs[768u + lid] * after;
        for (var t = 0u; t < nt; t++) {
            wide_store((t0 + t) * p.out_stride + p.out_col0 + base + lid, s[t]);
        }
    }
    return inv;
}

@compute @workgroup_size(128)
fn gemv_wide_swiglu(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let m = WideMat(0u, p.scales, p.k, p.lanes);
    // Columns c0, c0 + 1 a row group: 256 / L columns a workgroup.
    let col_base = group_id(wid, nwg) * (256u / p.lanes);
    for (var blk = wid.z; blk * p.tile_t < p.t; blk += nwg.z) {
        swiglu_block(lid, m, col_base, blk * p.tile_t);
        // The next block stages over xs, which this one's stores still read.
        workgroupBarrier();
    }
}

// gemv_wide_swiglu's token block from row t0.
fn swiglu_block(lid: u32, m: WideMat, col_base: u32, t0: u32) {
    let inter = p.n / 2u;
    let nt = min(p.t - t0, p.tile_t);
    let c0 = col_base + (lid / p.lanes) * 2u;
    let cols = vec4<u32>(c0, c0 + 1u, c0, c0 + 1u);
    let rows = select(vec4<u32>(p.n), cols + vec4<u32>(0u, 0u, inter, inter), cols < vec4<u32>(inter));
    blk_row0 = p.x_row0 + t0;
    stage_block(lid, m, t0, nt);
    wide_rows(lid, m, rows, p.n, nt);
    // QACT's codes were made from the normed rows.
    let inv = select(rows_inv(lid), vec4<f32>(1.0), QACT);
    // Row slot g · 4 + r: r 0 / 1 the gate of columns 2g, 2g + 1 of the workgroup, 2 / 3 their up.
    let c = col_base + lid;
    if (lid < 256u / p.lanes && c < inter) {
        let slot = (lid / 2u) * 4u + lid % 2u;
        let g = xs[768u + slot] * inv;
        let u = xs[768u + slot + 2u] * inv;
        for (var t = 0u; t < nt; t++) {
            out[(t0 + t) * p.out_stride + p.out_col0 + c] = g[t] / (1.0 + exp(-g[t])) * u[t];
        }
    }
}
