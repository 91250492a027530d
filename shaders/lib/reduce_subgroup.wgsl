// Workgroup-wide sum and max for 64-invocation workgroups, through subgroup operations: one
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
