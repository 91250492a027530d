// moe_gemv.wgsl's GEMV expert kernels (the same grid columns and expert lookups,
// lib/expert_begin.wgsl: active-list entry, direct-path assignment, or the shared expert's
// column) with the wide q4/q8 loads of lib/wide_gemv.wgsl: 16-byte chunks, one scale a chunk, the
// expert's tokens staged in shared memory ep.tile_t at a time and reused by four weight rows a
// lane group. 128 invocations, L = ep.lanes a row (16; EDGEDIFF_WIDE_LANES=64 for measurements).
// - expert_gate_up_wide: 256 / L columns a workgroup (grid y; ROW_SETS times that in row sets),
//   a row group gate c, c + 1, up c, c + 1 of [gate; up] (2I rows); writes h[slot, c] =
//   act(gate) · up for each of the expert's assignments (x rows: their tokens).
// - expert_down_wide: 512 / L rows of down [H, I] a workgroup (ROW_SETS times that), writes
//   y[slot, n] (x rows: h's).
// Weight chunks start on 16-byte boundaries: the host takes these kernels only where the part's
// word offset in a slot is a multiple of 4 (slots are 256-byte aligned, quantized rows whole
// groups). A (row, token) sum is the same however the expert's tokens fall into blocks.
// With 8-bit activations (QACT) the x rows may be codes made once for the pass (QCODES,
// ops/moe.rs): the token's codes for gate/up, each assignment's for down. Under QCODES_OUT the
// gate/up kernel writes its rows as down's codes instead of floats (rows of 3 · n / 32 vec4s in
// `out`): a workgroup's 256 / L columns are whole 32-value chunks (L ≤ 8; the host checks), so it
// gathers its activations in shared memory and encodes them with the staging's function — the
// codes a q8_codes pass over the float rows would make, bit for bit.

#include "moe_meta"
#include "gate_act"
#include "wide_gemv"

@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> slots: array<u32>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<uniform> ep: ExpertParams;
@group(0) @binding(7) var<storage, read> shared_w: array<u32>;
// Bindings 1 and 7 again, as vec4s for the chunks.
@group(0) @binding(8) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(9) var<storage, read> shared_w4: array<vec4<u32>>;

const NONE: u32 = 0xffffffffu;

override QCODES_OUT: bool = false;
// Row sets a workgroup works against each staged block (ops/moe.rs, KernelChoice::moe_row_sets:
// the weight-type argument's third byte, at most 4): gate/up 256 / L columns a set, down 512 / L
// rows. The expert's lookup and its tokens' staging are then paid once for more rows, in fewer
// workgroups; every set's partials come first (the reductions reuse xs, which holds the staging),
// and each set's sums are the ones it has alone.
override ROW_SETS: u32 = 1u;

#include "expert_begin"

// Activation rows of the staged block's tokens.
var<private> blk_rows: vec4<u32>;

fn wide_chunk(i: u32) -> vec4<u32> {
    if (is_shared) {
        return shared_w4[i];
    }
    return w4[i];
}

fn wide_word(i: u32) -> u32 {
    if (is_shared) {
        return shared_w[i];
    }
    return w_words[i];
}

fn wide_x(t: u32, g: u32) -> vec4<f32> {
    return x_act[blk_rows[t] * (ep.k / 4u) + g];
}

// QCODES: x_act holds the rows' codes (gemv_wide.wgsl q8_codes), 3 · k / 32 vec4s a row.
fn wide_code(t: u32, j: u32) -> vec4<f32> {
    return x_act[blk_rows[t] * (3u * ep.k / 32u) + j];
}

@compute @workgroup_size(128)
fn expert_gate_up_wide(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let m = WideMat(ex_base / 4u, ex_scales, ep.k, ep.lanes);
    let per = 256u / ep.lanes;
    let wg_base = wid.y * per * ROW_SETS;
    for (var t0 = 0u; t0 < cnt; t0 += ep.tile_t) {
        let nt = min(cnt - t0, ep.tile_t);
        for (var t = 0u; t < 4u; t++) {
            blk_rows[t] = expert_token(first, t0 + min(t, nt - 1u));
        }
        wide_stage(lid, m, nt);
        if (ROW_SETS == 1u) {
            // One set: the plain order, with no array of partials for the compiler to keep.
            wide_rows(lid, m, gate_up_rows(lid, wg_base), 2u * ep.n, nt);
            gate_up_out(lid, wg_base, first + t0, nt);
        } else {
            var parts: array<RowPartials, 4>;
            for (var rs = 0u; rs < ROW_SETS; rs++) {
                parts[rs] = wide_partials(lid, m, gate_up_rows(lid, wg_base + rs * per), 2u * ep.n, nt);
            }
            for (var rs = 0u; rs < ROW_SETS; rs++) {
                let a = parts[rs];
                wide_reduce(lid, ep.lanes, a.r0, a.r1, a.r2, a.r3);
                gate_up_out(lid, wg_base + rs * per, first + t0, nt);
            }
        }
        workgroupBarrier();
    }
}

// A gate/up row group's rows for the 256 / L columns from col_base: gate c, c + 1, up c, c + 1
// (past the columns: 2 · n, which no store reads).
fn gate_up_rows(lid: u32, col_base: u32) -> vec4<u32> {
    let c0 = col_base + (lid / ep.lanes) * 2u;
    let cols = vec4<u32>(c0, c0 + 1u, c0, c0 + 1u);
    return select(vec4<u32>(2u * ep.n), cols + vec4<u32>(0u, 0u, ep.n, ep.n), cols < vec4<u32>(ep.n));
}

// Writes act(gate) · up of the reduced columns col_base .. col_base + 256 / L for output rows
// r0 .. r0 + nt (as down's codes under QCODES_OUT).
fn gate_up_out(lid: u32, col_base: u32, r0: u32, nt: u32) {
    let c = col_base + lid;
    // Row slot g · 4 + r: r 0 / 1 the gate of columns 2g, 2g + 1 of the workgroup, 2 / 3 their up.
    if (QCODES_OUT) {
        // A set wholly past the columns (the last workgroup's) has no codes to write.
        if (col_base < ep.n) {
            codes_out(lid, col_base, r0, nt);
        }
    } else if (lid < 256u / ep.lanes && c < ep.n) {
        let slot = (lid / 2u) * 4u + lid % 2u;
        let g = xs[768u + slot];
        let u = xs[768u + slot + 2u];
        for (var t = 0u; t < nt; t++) {
            out[(r0 + t) * ep.n + c] = gate_act(g[t]) * u[t];
        }
    }
}

// QCODES_OUT: this workgroup's columns col_base .. col_base + 256 / L of output rows r0 .. r0 + nt
// as down's codes (the staging layout, ep.n / 32 chunks a row). The activations gather in xs
// [0, 64) (past wide_rows' sums at 768: nt · 256 / L ≤ 256 values), then an invocation a
// (row, chunk) encodes one chunk. Columns past ep.n never occur: the host takes this path only
// where ep.n is a multiple of the workgroup's columns.
fn codes_out(lid: u32, col_base: u32, r0: u32, nt: u32) {
    let cols = 256u / ep.lanes;
    if (lid < cols) {
        let slot = (lid / 2u) * 4u + lid % 2u;
        let g = xs[768u + slot];
        let u = xs[768u + slot + 2u];
        for (var t = 0u; t < nt; t++) {
            let i = t * cols + lid;
            xs[i / 4u][i % 4u] = gate_act(g[t]) * u[t];
        }
    }
    workgroupBarrier();
    let per = cols / 32u;
    if (lid < nt * per) {
        let t = lid / per;
        let j = lid % per;
        let b = (t * cols + j * 32u) / 4u;
        var v: array<vec4<f32>, 8>;
        for (var k = 0u; k < 8u; k++) {
            v[k] = xs[b + k];
        }
        let q = q8_encode(v);
        let cpr = ep.n / 32u;
        let o = ((r0 + t) * 3u * cpr + col_base / 32u + j) * 4u;
        for (var k = 0u; k < 4u; k++) {
            out[o + k] = q.q0[k];
            out[o + 4u * cpr + k] = q.q1[k];
            out[o + 8u * cpr + k] = q.dm[k];
        }
    }
}

@compute @workgroup_size(128)
fn expert_down_wide(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let m = WideMat(ex_base / 4u, ex_scales, ep.k, ep.lanes);
    let per = 512u / ep.lanes;
    let wg_base = wid.y * per * ROW_SETS;
    for (var t0 = 0u; t0 < cnt; t0 += ep.tile_t) {
        let nt = min(cnt - t0, ep.tile_t);
        blk_rows = vec4<u32>(first + t0) + min(vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(nt - 1u));
        wide_stage(lid, m, nt);
        let group_rows = vec4<u32>((lid / ep.lanes) * 4u) + vec4<u32>(0u, 1u, 2u, 3u);
        if (ROW_SETS == 1u) {
            // One set: the plain order, with no array of partials for the compiler to keep.
            wide_rows(lid, m, vec4<u32>(wg_base) + group_rows, ep.n, nt);
            down_out(lid, wg_base, first + t0, nt);
        } else {
            var parts: array<RowPartials, 4>;
            for (var rs = 0u; rs < ROW_SETS; rs++) {
                let rows = vec4<u32>(wg_base + rs * per) + group_rows;
                parts[rs] = wide_partials(lid, m, rows, ep.n, nt);
            }
            for (var rs = 0u; rs < ROW_SETS; rs++) {
                let a = parts[rs];
                wide_reduce(lid, ep.lanes, a.r0, a.r1, a.r2, a.r3);
                down_out(lid, wg_base + rs * per, first + t0, nt);
            }
        }
        workgroupBarrier();
    }
}

// Writes the reduced rows base .. base + 512 / L of down for output rows r0 .. r0 + nt.
fn down_out(lid: u32, base: u32, r0: u32, nt: u32) {
    let n = base + lid;
    if (lid < 512u / ep.lanes && n < ep.n) {
        let s = xs[768u + lid];
        for (var t = 0u; t < nt; t++) {
            out[(r0 + t) * ep.n + n] = s[t];
        }
    }
}
