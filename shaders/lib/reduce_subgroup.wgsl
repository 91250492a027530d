// Workgroup-wide sum, max and argmax for 64-invocation workgroups, through subgroup operations: one
// subgroup reduction, then the (at most 16) subgroup partials through shared memory. Every
// invocation must call them (uniform control flow) and every invocation gets the result.

struct Lane {
    @builtin(local_invocation_index) id: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
}

var<workgroup> red_part: array<f32, 64>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn wg_sum(v: f32, lane: Lane) -> f32 {
    let s = subgroupAdd(v);
    if (lane.sg_lane == 0u) {
        red_part[lane.sg] = s;
    }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < min(lane.sg_count, 64u); i++) {
        t += red_part[i];
    }
    workgroupBarrier();
    return t;
}

var<workgroup> red_part4: array<vec4<f32>, 64>;

// wg_sum of four values at once (one pass of barriers for the four).
fn wg_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    let s = subgroupAdd(v);
    if (lane.sg_lane == 0u) {
        red_part4[lane.sg] = s;
    }
    workgroupBarrier();
    var t = vec4<f32>(0.0);
    for (var i = 0u; i < min(lane.sg_count, 64u); i++) {
        t += red_part4[i];
    }
    workgroupBarrier();
    return t;
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    let s = subgroupMax(v);
    if (lane.sg_lane == 0u) {
        red_part[lane.sg] = s;
    }
    workgroupBarrier();
    var t = neg_inf();
    for (var i = 0u; i < min(lane.sg_count, 64u); i++) {
        t = max(t, red_part[i]);
    }
    workgroupBarrier();
    return t;
}

// Sum over each aligned group of 8 invocations (an octet) through subgroup shuffles: needs
// subgroups of at least 8 consecutive invocations (the host checks the adapter's minimum size).
// Every invocation of the octet gets the result.
fn octet_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    var s = v + subgroupShuffleXor(v, 1u);
    s += subgroupShuffleXor(s, 2u);
    s += subgroupShuffleXor(s, 4u);
    return s;
}

var<workgroup> red_arg_v: array<f32, 64>;
var<workgroup> red_arg_i: array<u32, 64>;

// Workgroup-wide argmax of (v, i) pairs: the largest v, ties to the lower i; i = 0xffffffff is no
// candidate (it wins only if nobody has one). Uniform control flow; every invocation gets the i.
fn wg_argmax(v: f32, i: u32, lane: Lane) -> u32 {
    let none = 0xffffffffu;
    let vv = select(neg_inf(), v, i != none);
    let m = subgroupMax(vv);
    let bi = subgroupMin(select(none, i, vv == m));
    if (lane.sg_lane == 0u) {
        red_arg_v[lane.sg] = m;
        red_arg_i[lane.sg] = bi;
    }
    workgroupBarrier();
    var bv = red_arg_v[0];
    var b = red_arg_i[0];
    for (var k = 1u; k < min(lane.sg_count, 64u); k++) {
        let cv = red_arg_v[k];
        let ci = red_arg_i[k];
        if (ci != none && (b == none || cv > bv || (cv == bv && ci < b))) {
            bv = cv;
            b = ci;
        }
    }
    workgroupBarrier();
    return b;
}

// Selection parts (the router's top-k): a part is a subgroup, whose invocations pick among
// themselves without barriers. sel_argmax_key gives the i of the part's largest key (ties: the
// lowest i); i = 0xffffffff is no candidate (the result is that when the part has none).
fn sel_part(lane: Lane) -> u32 {
    return lane.sg;
}

fn sel_parts(lane: Lane) -> u32 {
    return min(lane.sg_count, 64u);
}

fn sel_lead(lane: Lane) -> bool {
    return lane.sg_lane == 0u;
}

fn sel_argmax_key(key: u32, i: u32, lane: Lane) -> u32 {
    let none = 0xffffffffu;
    let k = select(0u, key, i != none);
    let m = subgroupMax(k);
    return subgroupMin(select(none, i, k == m && i != none));
}

// The selection parts' reductions for 256-invocation workgroups (stats.wgsl): a part is a subgroup
// whatever the workgroup's size, so these are the subgroup operations (at most 64 parts: subgroups
// of at least 4). Uniform control flow; every invocation of the part gets the result.
fn sel256_argmax_key(key: u32, i: u32, lane: Lane) -> u32 {
    return sel_argmax_key(key, i, lane);
}

fn sel256_max(v: f32, lane: Lane) -> f32 {
    return subgroupMax(v);
}

fn sel256_sum2(v: vec2<f32>, lane: Lane) -> vec2<f32> {
    return subgroupAdd(v);
}
