// Which expert a GEMV expert workgroup serves (moe_gemv.wgsl, moe_gemv_wide.wgsl): grid column
// wid.x is an entry of the layer's active-expert list (lib/moe_meta.wgsl), the direct path's
// assignment (ep.direct: one token, the router's ids in route_meta), or ep.shared_x, the shared
// expert's column (every token; its weights in the kernel's own shared binding). The including
// kernel declares ep (ExpertParams), slots and route_meta, and NONE.

#include "probe"

// Expert of this workgroup: ok, weight base word, token count, first list entry.
var<workgroup> ex_ok: u32;
var<workgroup> ex_base: u32;
var<workgroup> ex_cnt: u32;
var<workgroup> ex_first: u32;
var<workgroup> ex_scales: u32;
var<workgroup> ex_shared: u32;

// Whether this workgroup computes the shared expert (uniform: set once from ex_shared).
var<private> is_shared: bool;

// Reads which expert this workgroup serves; false (uniformly) when there is none or it lives in
// another pool buffer than the one bound. The shared expert's column serves every token, rows
// assignments + t of the scratch.
fn expert_begin(lid: u32, wid: vec3<u32>) -> bool {
    if (lid == 0u) {
        let ne = ep.num_experts;
        let last = max(ne, 1u) - 1u;
        let direct = ep.direct != 0u;
        let col = wid.x;
        // Every load of the lookup is issued without a branch around it (indices clamped into
        // their arrays; what does not apply is dropped by the selects): two round trips — the
        // expert's id, then its slot, count and first entry — where nested tests made up to four,
        // and NVIDIA's compiler serializes loads under a per-lane test. On the direct path
        // route_meta holds only the router's ids, so the list words read its word 0 instead.
        let e_raw = route_meta[select(meta_active(ne) + min(col, last), min(col, max(ep.assignments, 1u) - 1u), direct)];
        let n_active = route_meta[select(6u, 0u, direct)];
        let e = min(e_raw, last);
        let s = 2u * (ep.slot0 + e);
        let pool = slots[s];
        let base = slots[s + 1u] + ep.part;
        let cnt = route_meta[select(meta_counts(ne) + e, 0u, direct)];
        let first = route_meta[select(meta_offsets(ne) + e, 0u, direct)];
        let is_sh = col == ep.shared_x;
        let listed = select(col < n_active, col < ep.assignments && e_raw < ne, direct);
        let ok = select(0u, 1u, is_sh || (listed && pool == ep.pool));
        let sh = select(0u, 1u, is_sh);
        ex_base = select(base, 0u, is_sh);
        ex_scales = select(base + ep.scales, ep.shared_scales, is_sh);
        ex_cnt = select(select(cnt, 1u, direct), ep.tokens, is_sh);
        ex_first = select(select(first, col, direct), ep.assignments, is_sh);
        ex_ok = ok;
        ex_shared = sh;
    }
    let ok = workgroupUniformLoad(&ex_ok) != 0u;
    is_shared = workgroupUniformLoad(&ex_shared) != 0u;
    return ok && (PROBE & 4u) == 0u;
}

// The activation row (token) of the j-th assignment of this workgroup's expert, whose first list
// entry is `first` (gate/up's input rows; down reads h's rows first + j).
fn expert_token(first: u32, j: u32) -> u32 {
    if (is_shared) {
        return j;
    }
    if (ep.direct != 0u) {
        return (first + j) / ep.top_k;
    }
    return route_meta[meta_list(ep.num_experts) + first + j] / ep.top_k;
}
