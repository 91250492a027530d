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
        var ok = 0u;
        var sh = 0u;
        if (wid.x == ep.shared_x) {
            ok = 1u;
            sh = 1u;
            ex_base = 0u;
            ex_scales = ep.shared_scales;
            ex_cnt = ep.tokens;
            ex_first = ep.assignments;
        } else if (ep.direct != 0u) {
            // Direct path: column a serves assignment a alone (its row of h and y is a).
            if (wid.x < ep.assignments) {
                let e = route_meta[wid.x];
                if (e < ne) {
                    let s = 2u * (ep.slot0 + e);
                    if (slots[s] == ep.pool) {
                        ok = 1u;
                        ex_base = slots[s + 1u] + ep.part;
                        ex_scales = ex_base + ep.scales;
                        ex_cnt = 1u;
                        ex_first = wid.x;
                    }
                }
            }
        } else if (wid.x < route_meta[6]) {
            let e = route_meta[meta_active(ne) + wid.x];
            let s = 2u * (ep.slot0 + e);
            if (slots[s] == ep.pool) {
                ok = 1u;
                ex_base = slots[s + 1u] + ep.part;
                ex_scales = ex_base + ep.scales;
                ex_cnt = route_meta[meta_counts(ne) + e];
                ex_first = route_meta[meta_offsets(ne) + e];
            }
        }
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
