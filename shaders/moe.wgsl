// MoE dispatch and combine around the grouped expert kernels of matmul.wgsl, all on the GPU (no
// host round trip between router and experts).
//
// moe_dispatch (one workgroup of 256): from the router's ids [T, top_k] builds per-expert token
//   lists — count (atomics), exclusive scan (a chunk of experts per invocation, then a parallel
//   scan of the 256 chunk sums), scatter — plus the list of active experts and the indirect grids of expert_gate_up
//   (active experts × I/32 × ⌈max tokens/16⌉) and expert_down (… × H/64 × …); layout in
//   lib/moe_meta.wgsl. A routed expert with no slot (not resident) is flagged in `status`:
//   bit 31 | layer << 16 | expert, read back with the statistics. Id num_experts is the skip
//   expert (ZAYA1's MLP router): it contributes 0 and is never an error.
// moe_combine: out[t] = Σ_j weight[t, j] · y[slot_of(t, j)], j in order (the CPU's sum order).
// moe_combine_add: the same sum plus plus[plus_row0 + t] (the shared experts' output: its own
//   buffer, or the rows after the assignments' in y when moe_gemv.wgsl computed it), as the add
//   kernel would add it afterwards: one dispatch fewer per MoE layer with shared experts.
// moe_combine_residual: the same sum (plus `plus` when has_plus) added to the residual x_rw in
//   place — moe_combine(_add) then the add kernel, bit for bit, in one dispatch (the fused-norm
//   forward, whose next gemv norms the residual as it reads it).
// moe_combine_norm (one workgroup of 256 per token): the same sum (plus `plus` when has_plus),
//   added to the residual x_rw[t] in place, then out[t] = rms_norm(x_rw[t]) · norm_w — what
//   moe_combine(_add) and norm.wgsl's add_rms_norm compute, bit for bit (the same column layout
//   and sum order, lib/row_norm.wgsl), in one dispatch. The token's slots and weights go to shared
//   memory in the same round of loads as its residual row and the norm weight.

#include "grid"
#include "moe_meta"
#include "row_norm"

struct MoeParams {
    assignments: u32,
    num_experts: u32,
    slot0: u32,
    layer: u32,
    top_k: u32,
    inter: u32,
    hidden: u32,
    t: u32,
    plus_row0: u32,
    eps: f32,
    has_plus: u32,
    direct: u32,
}

const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> mp: MoeParams;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> meta_rw: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read_write> status: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read> route_meta: array<u32>;
@group(0) @binding(6) var<storage, read> weights: array<f32>;
@group(0) @binding(7) var<storage, read> y: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<f32>;
@group(0) @binding(9) var<storage, read> plus: array<f32>;
@group(0) @binding(10) var<storage, read_write> x_rw: array<f32>;
@group(0) @binding(11) var<storage, read> norm_w: array<f32>;

var<workgroup> part_count: array<u32, 256>;
var<workgroup> part_active: array<u32, 256>;
var<workgroup> part_max: array<u32, 256>;

@compute @workgroup_size(256)
fn moe_dispatch(@builtin(local_invocation_index) lid: u32) {
    let ne = mp.num_experts;
    let na = mp.assignments;
    for (var e = lid; e < ne; e += 256u) {
        atomicStore(&meta_rw[meta_counts(ne) + e], 0u);
        atomicStore(&meta_rw[meta_cursor(ne) + e], 0u);
    }
    storageBarrier();
    workgroupBarrier();
    for (var a = lid; a < na; a += 256u) {
        let e = ids[a];
        if (e < ne) {
            atomicAdd(&meta_rw[meta_counts(ne) + e], 1u);
            if (slots[2u * (mp.slot0 + e)] == NONE) {
                atomicMax(&status[0], 0x80000000u | (mp.layer << 16u) | e);
            }
        } else if (e > ne) {
            atomicMax(&status[0], 0x80000000u | (mp.layer << 16u) | 0xffffu);
        }
    }
    storageBarrier();
    workgroupBarrier();
    let per = (ne + 255u) / 256u;
    let lo = min(lid * per, ne);
    let hi = min(lo + per, ne);
    var c = 0u;
    var act = 0u;
    var mx = 0u;
    for (var e = lo; e < hi; e++) {
        let n = atomicLoad(&meta_rw[meta_counts(ne) + e]);
        c += n;
        act += select(0u, 1u, n > 0u);
        mx = max(mx, n);
    }
    part_count[lid] = c;
    part_active[lid] = act;
    part_max[lid] = mx;
    workgroupBarrier();
    // Inclusive scans (sum, sum, max) over the 256 chunks, Hillis–Steele: 8 steps.
    for (var s = 1u; s < 256u; s <<= 1u) {
        var pc = 0u;
        var pa = 0u;
        var pm = 0u;
        if (lid >= s) {
            pc = part_count[lid - s];
            pa = part_active[lid - s];
            pm = part_max[lid - s];
        }
        workgroupBarrier();
        part_count[lid] += pc;
        part_active[lid] += pa;
        part_max[lid] = max(part_max[lid], pm);
        workgroupBarrier();
    }
    if (lid == 0u) {
        let sa = part_active[255];
        let z = (part_max[255] + 15u) / 16u;
        atomicStore(&meta_rw[0], sa);
        atomicStore(&meta_rw[1], (mp.inter + 31u) / 32u);
        atomicStore(&meta_rw[2], z);
        atomicStore(&meta_rw[3], sa);
        atomicStore(&meta_rw[4], (mp.hidden + 63u) / 64u);
        atomicStore(&meta_rw[5], z);
        atomicStore(&meta_rw[6], sa);
    }
    var off = part_count[lid] - c;
    var ai = part_active[lid] - act;
    for (var e = lo; e < hi; e++) {
        let n = atomicLoad(&meta_rw[meta_counts(ne) + e]);
        atomicStore(&meta_rw[meta_offsets(ne) + e], off);
        off += n;
        if (n > 0u) {
            atomicStore(&meta_rw[meta_active(ne) + ai], e);
            ai += 1u;
        }
    }
    storageBarrier();
    workgroupBarrier();
    for (var a = lid; a < na; a += 256u) {
        let e = ids[a];
        if (e < ne) {
            let pos = atomicLoad(&meta_rw[meta_offsets(ne) + e]) + atomicAdd(&meta_rw[meta_cursor(ne) + e], 1u);
            atomicStore(&meta_rw[meta_list(ne) + pos], a);
            atomicStore(&meta_rw[meta_slot_of(ne, na) + a], pos);
        } else {
            // The skip expert (id = num_experts, an MLP router's last class): no list entry, and
            // the combine leaves it out.
            atomicStore(&meta_rw[meta_slot_of(ne, na) + a], NONE);
        }
    }
}

// The scratch row of assignment a (NONE: none, the skip expert). On the direct path route_meta
// holds the router's ids and assignment a is row a.
fn slot_of(a: u32) -> u32 {
    if (mp.direct != 0u) {
        return select(NONE, a, route_meta[a] < mp.num_experts);
    }
    return route_meta[meta_slot_of(mp.num_experts, mp.assignments) + a];
}

// Σ_j weight[t, j] · y[slot_of(t, j)] of output element i = t · hidden + c, in j order.
// The terms go 8 at a time with every load of a batch issued before the sums, and no branch
// around a load (a missing term — past top_k, or the skip expert — reads a valid row and is left
// out of the sum): one at a time, each term was two dependent round trips (its slot, then its
// row), and NVIDIA's compiler serializes loads under a per-lane test.
fn combined(i: u32) -> f32 {
    let t = i / mp.hidden;
    let c = i % mp.hidden;
    let last = max(mp.assignments, 1u) - 1u;
    var s = 0.0;
    for (var j0 = 0u; j0 < mp.top_k; j0 += 8u) {
        let a0 = t * mp.top_k + j0;
        let na = vec4<u32>(mp.top_k - j0);
        let ja = min(vec4<u32>(0u, 1u, 2u, 3u), na - 1u);
        let jb = min(vec4<u32>(4u, 5u, 6u, 7u), na - 1u);
        let pa = vec4<u32>(slot_of(a0 + ja.x), slot_of(a0 + ja.y), slot_of(a0 + ja.z), slot_of(a0 + ja.w));
        let pb = vec4<u32>(slot_of(a0 + jb.x), slot_of(a0 + jb.y), slot_of(a0 + jb.z), slot_of(a0 + jb.w));
        let wa = vec4<f32>(weights[a0 + ja.x], weights[a0 + ja.y], weights[a0 + ja.z], weights[a0 + ja.w]);
        let wb = vec4<f32>(weights[a0 + jb.x], weights[a0 + jb.y], weights[a0 + jb.z], weights[a0 + jb.w]);
        let ra = min(pa, vec4<u32>(last)) * mp.hidden + c;
        let rb = min(pb, vec4<u32>(last)) * mp.hidden + c;
        let ya = vec4<f32>(y[ra.x], y[ra.y], y[ra.z], y[ra.w]);
        let yb = vec4<f32>(y[rb.x], y[rb.y], y[rb.z], y[rb.w]);
        let oka = vec4<u32>(0u, 1u, 2u, 3u) < na & pa < vec4<u32>(mp.assignments);
        let okb = vec4<u32>(4u, 5u, 6u, 7u) < na & pb < vec4<u32>(mp.assignments);
        for (var q = 0u; q < 4u; q++) {
            if (oka[q]) {
                s += wa[q] * ya[q];
            }
        }
        for (var q = 0u; q < 4u; q++) {
            if (okb[q]) {
                s += wb[q] * yb[q];
            }
        }
    }
    return s;
}

@compute @workgroup_size(64)
fn moe_combine(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= mp.t * mp.hidden) {
        return;
    }
    out[i] = combined(i);
}

@compute @workgroup_size(64)
fn moe_combine_add(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= mp.t * mp.hidden) {
        return;
    }
    let s = combined(i);
    out[i] = s + plus[mp.plus_row0 * mp.hidden + i];
}

@compute @workgroup_size(64)
fn moe_combine_residual(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = flat_index(lid, wid, nwg);
    if (i >= mp.t * mp.hidden) {
        return;
    }
    var s = combined(i);
    if (mp.has_plus != 0u) {
        s = s + plus[mp.plus_row0 * mp.hidden + i];
    }
    x_rw[i] = x_rw[i] + s;
}

var<workgroup> tok_pos: array<u32, 64>;
var<workgroup> tok_w: array<f32, 64>;

// moe_combine_norm's quads of y, plus, x_rw and norm_w at row base b (columns past the row read as
// 0: quad_in, quad_mask).
fn y_quad(b: u32, c: vec4<u32>) -> vec4<f32> {
    let k = b + quad_in(c, mp.hidden);
    return quad_mask(vec4<f32>(y[k.x], y[k.y], y[k.z], y[k.w]), c, mp.hidden);
}

fn plus_quad(b: u32, c: vec4<u32>) -> vec4<f32> {
    let k = b + quad_in(c, mp.hidden);
    return quad_mask(vec4<f32>(plus[k.x], plus[k.y], plus[k.z], plus[k.w]), c, mp.hidden);
}

fn xrw_quad(b: u32, c: vec4<u32>) -> vec4<f32> {
    let k = b + quad_in(c, mp.hidden);
    return quad_mask(vec4<f32>(x_rw[k.x], x_rw[k.y], x_rw[k.z], x_rw[k.w]), c, mp.hidden);
}

fn normw_quad(c: vec4<u32>) -> vec4<f32> {
    let k = quad_in(c, mp.hidden);
    return quad_mask(vec4<f32>(norm_w[k.x], norm_w[k.y], norm_w[k.z], norm_w[k.w]), c, mp.hidden);
}

fn store_xrw(b: u32, c: vec4<u32>, v: vec4<f32>) {
    if (c.x < mp.hidden) { x_rw[b + c.x] = v.x; }
    if (c.y < mp.hidden) { x_rw[b + c.y] = v.y; }
    if (c.z < mp.hidden) { x_rw[b + c.z] = v.z; }
    if (c.w < mp.hidden) { x_rw[b + c.w] = v.w; }
}

fn store_out(b: u32, c: vec4<u32>, v: vec4<f32>) {
    if (c.x < mp.hidden) { out[b + c.x] = v.x; }
    if (c.y < mp.hidden) { out[b + c.y] = v.y; }
    if (c.z < mp.hidden) { out[b + c.z] = v.z; }
    if (c.w < mp.hidden) { out[b + c.w] = v.w; }
}

// The token's combined rows at the four quads of one invocation.
struct Quads {
    q0: vec4<f32>,
    q1: vec4<f32>,
    q2: vec4<f32>,
    q3: vec4<f32>,
}

// Adds assignment j's weight · y at the four quads `c` to `s` where j is one of the token's and has
// a row (`combined`'s terms, in its order). The loads do not wait on the test: a missing term reads
// row 0 and is dropped by a select, so the eight unrolled calls of moe_combine_norm issue their
// loads together (one round, not one a term).
fn add_assignment(s: ptr<function, Quads>, j: u32, c: array<vec4<u32>, 4>) {
    let pos = select(0u, tok_pos[min(j, 63u)], j < mp.top_k);
    let ok = j < mp.top_k && pos < mp.assignments;
    let r = select(0u, pos, ok) * mp.hidden;
    let w = tok_w[min(j, 63u)];
    let y0 = y_quad(r, c[0]);
    let y1 = y_quad(r, c[1]);
    let y2 = y_quad(r, c[2]);
    let y3 = y_quad(r, c[3]);
    (*s).q0 = select((*s).q0, (*s).q0 + w * y0, ok);
    (*s).q1 = select((*s).q1, (*s).q1 + w * y1, ok);
    (*s).q2 = select((*s).q2, (*s).q2 + w * y2, ok);
    (*s).q3 = select((*s).q3, (*s).q3 + w * y3, ok);
}

// Σ_j weight · y of the token's assignments at the quads `c` (`combined`'s order), plus its `plus`
// row when has_plus — the delta add_rms_norm adds.
fn combined_quads(c: array<vec4<u32>, 4>, prow: u32) -> Quads {
    var s = Quads(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    add_assignment(&s, 0u, c);
    add_assignment(&s, 1u, c);
    add_assignment(&s, 2u, c);
    add_assignment(&s, 3u, c);
    add_assignment(&s, 4u, c);
    add_assignment(&s, 5u, c);
    add_assignment(&s, 6u, c);
    add_assignment(&s, 7u, c);
    for (var j = 8u; j < mp.top_k; j++) {
        add_assignment(&s, j, c);
    }
    if (mp.has_plus != 0u) {
        s.q0 = s.q0 + plus_quad(prow, c[0]);
        s.q1 = s.q1 + plus_quad(prow, c[1]);
        s.q2 = s.q2 + plus_quad(prow, c[2]);
        s.q3 = s.q3 + plus_quad(prow, c[3]);
    }
    return s;
}

@compute @workgroup_size(256)
fn moe_combine_norm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let hd = mp.hidden;
    let b = t * hd;
    let prow = (mp.plus_row0 + t) * hd;
    // The token's slots and weights, and (independent of them, so in the same round of loads) its
    // residual row and the norm weight: add_rms_norm's layout of lib/row_norm.wgsl.
    if (lid < mp.top_k) {
        let a = t * mp.top_k + lid;
        tok_pos[lid] = slot_of(a);
        tok_w[lid] = weights[a];
    }
    let c0 = quad_cols(lid, 0u);
    let c1 = quad_cols(lid, 1u);
    let c2 = quad_cols(lid, 2u);
    let c3 = quad_cols(lid, 3u);
    let x0 = xrw_quad(b, c0);
    let x1 = xrw_quad(b, c1);
    let x2 = xrw_quad(b, c2);
    let x3 = xrw_quad(b, c3);
    let w0 = normw_quad(c0);
    let w1 = normw_quad(c1);
    let w2 = normw_quad(c2);
    let w3 = normw_quad(c3);
    workgroupBarrier();
    let d = combined_quads(array<vec4<u32>, 4>(c0, c1, c2, c3), prow);
    let v0 = x0 + d.q0;
    let v1 = x1 + d.q1;
    let v2 = x2 + d.q2;
    let v3 = x3 + d.q3;
    store_xrw(b, c0, v0);
    store_xrw(b, c1, v1);
    store_xrw(b, c2, v2);
    store_xrw(b, c3, v3);
    var ss = add_squares(add_squares(add_squares(add_squares(0.0, v0), v1), v2), v3);
    for (var c = NORM_REG + lid; c < hd; c += NORM_WG) {
        var s = 0.0;
        for (var j = 0u; j < mp.top_k; j++) {
            let pos = tok_pos[j];
            if (pos < mp.assignments) {
                s += tok_w[j] * y[pos * hd + c];
            }
        }
        if (mp.has_plus != 0u) {
            s = s + plus[prow + c];
        }
        let v = x_rw[b + c] + s;
        x_rw[b + c] = v;
        ss += v * v;
    }
    let inv = 1.0 / sqrt(norm_total(ss, lid) / f32(hd) + mp.eps);
    store_out(b, c0, v0 * inv * w0);
    store_out(b, c1, v1 * inv * w1);
    store_out(b, c2, v2 * inv * w2);
    store_out(b, c3, v3 * inv * w3);
    for (var c = NORM_REG + lid; c < hd; c += NORM_WG) {
        out[b + c] = x_rw[b + c] * inv * norm_w[c];
    }
}
