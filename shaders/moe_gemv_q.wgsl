// The routed experts of one MoE layer for few tokens per expert, q4/q8 weights: moe_gemv.wgsl's
// grid and outputs (x = entry of the active-expert list, y = a block of weight rows; experts read
// through the slot table) on the quant-group core of lib/gemv_q.wgsl, which keeps more bytes in
// flight than the octet core. An expert's tokens are taken 4 at a time.
// - expert_gate_up_gemv_q: 2 columns c of [gate; up] (2I rows) a workgroup, writes
//   h[slot, c] = silu(gate) · up for each of the expert's assignments (x rows: their tokens).
// - expert_down_gemv_q: 4 rows of down [H, I] a workgroup, writes y[slot, n] (x rows: h's slots).
// Needs the expert part (slots[…] + ep.part) on a 16-byte boundary (ops/moe.rs checks).

#include "gemv_q"
#include "moe_meta"

@group(0) @binding(4) var<storage, read> slots: array<u32>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<uniform> ep: ExpertParams;

// Expert of this workgroup: ok, weight base word, token count, first list entry.
var<workgroup> ex_ok: u32;
var<workgroup> ex_base: u32;
var<workgroup> ex_cnt: u32;
var<workgroup> ex_first: u32;

// Reads which expert this workgroup serves; false (uniformly) when there is none or it lives in
// another pool buffer than the one bound.
fn expert_begin(lid: u32, wid: vec3<u32>) -> bool {
    if (lid == 0u) {
        let ne = ep.num_experts;
        var ok = 0u;
        if (wid.x < route_meta[6]) {
            let e = route_meta[meta_active(ne) + wid.x];
            let s = 2u * (ep.slot0 + e);
            if (slots[s] == ep.pool) {
                ok = 1u;
                ex_base = slots[s + 1u] + ep.part;
                ex_cnt = route_meta[meta_counts(ne) + e];
                ex_first = route_meta[meta_offsets(ne) + e];
            }
        }
        ex_ok = ok;
    }
    return workgroupUniformLoad(&ex_ok) != 0u;
}

@compute @workgroup_size(64)
fn expert_gate_up_gemv_q(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let m = QMat(ex_base, ex_base + ep.scales, ep.k, 2u * ep.n);
    let c0 = wid.y * 2u;
    let row = swiglu_row(c0, 2u * ep.n, lid);
    let list = meta_list(ep.num_experts) + first;
    for (var t0 = 0u; t0 < cnt; t0 += 4u) {
        var xr = vec4<u32>(NO_ROW);
        for (var i = 0u; i < 4u; i++) {
            if (t0 + i < cnt) {
                xr[i] = route_meta[list + t0 + i] / ep.top_k;
            }
        }
        row_partial(m, row, xr, lid);
        workgroupBarrier();
        let j = lid / 4u;
        let i = lid % 4u;
        if (lid < 8u && c0 + j < ep.n && t0 + i < cnt) {
            out[(first + t0 + i) * ep.n + c0 + j] = swiglu_out(j, i);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn expert_down_gemv_q(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (!expert_begin(lid, wid)) {
        return;
    }
    let cnt = workgroupUniformLoad(&ex_cnt);
    let first = ex_first;
    let m = QMat(ex_base, ex_base + ep.scales, ep.k, ep.n);
    let row0 = wid.y * 4u;
    let row = row0 + lid / LANES;
    for (var t0 = 0u; t0 < cnt; t0 += 4u) {
        let r = vec4<u32>(t0) + vec4<u32>(0u, 1u, 2u, 3u);
        let xr = select(vec4<u32>(NO_ROW), r + vec4<u32>(first), r < vec4<u32>(cnt));
        row_partial(m, row, xr, lid);
        workgroupBarrier();
        let j = lid / 4u;
        let i = lid % 4u;
        if (lid < 16u && row0 + j < ep.n && t0 + i < cnt) {
            out[(first + t0 + i) * ep.n + row0 + j] = row_sum(j)[i];
        }
        workgroupBarrier();
    }
}
