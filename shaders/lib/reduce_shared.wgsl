// Workgroup-wide sum, max and argmax for 64-invocation workgroups, through shared memory (no subgroups).
// Every invocation must call them (uniform control flow) and every invocation gets the result.

struct Lane {
    @builtin(local_invocation_index) id: u32,
}

var<workgroup> red_tree: array<f32, 64>;

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn wg_sum(v: f32, lane: Lane) -> f32 {
    red_tree[lane.id] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane.id < s) {
            red_tree[lane.id] += red_tree[lane.id + s];
        }
        workgroupBarrier();
    }
    let r = red_tree[0];
    workgroupBarrier();
    return r;
}

var<workgroup> red_tree4: array<vec4<f32>, 64>;

// wg_sum of four values at once (one pass of barriers for the four).
fn wg_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    red_tree4[lane.id] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane.id < s) {
            red_tree4[lane.id] += red_tree4[lane.id + s];
        }
        workgroupBarrier();
    }
    let r = red_tree4[0];
    workgroupBarrier();
    return r;
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    red_tree[lane.id] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane.id < s) {
            red_tree[lane.id] = max(red_tree[lane.id], red_tree[lane.id + s]);
        }
        workgroupBarrier();
    }
    let r = red_tree[0];
    workgroupBarrier();
    return r;
}

var<workgroup> red_octet: array<vec4<f32>, 64>;

// Sum over each aligned group of 8 invocations (an octet) through shared memory; uniform control
// flow like the others. Every invocation of the octet gets the result.
fn octet_sum4(v: vec4<f32>, lane: Lane) -> vec4<f32> {
    red_octet[lane.id] = v;
    workgroupBarrier();
    let b = lane.id & ~7u;
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < 8u; i++) {
        s += red_octet[b + i];
    }
    workgroupBarrier();
    return s;
}

var<workgroup> red_arg_v: array<f32, 64>;
var<workgroup> red_arg_i: array<u32, 64>;

// Workgroup-wide argmax of (v, i) pairs: the largest v, ties to the lower i; i = 0xffffffff is no
// candidate (it wins only if nobody has one). Uniform control flow; every invocation gets the i.
fn wg_argmax(v: f32, i: u32, lane: Lane) -> u32 {
    let none = 0xffffffffu;
    red_arg_v[lane.id] = v;
    red_arg_i[lane.id] = i;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane.id < s) {
            let cv = red_arg_v[lane.id + s];
            let ci = red_arg_i[lane.id + s];
            let bv = red_arg_v[lane.id];
            let b = red_arg_i[lane.id];
            if (ci != none && (b == none || cv > bv || (cv == bv && ci < b))) {
                red_arg_v[lane.id] = cv;
                red_arg_i[lane.id] = ci;
            }
        }
        workgroupBarrier();
    }
    let r = red_arg_i[0];
    workgroupBarrier();
    return r;
}

// Selection parts (the router's top-k): without subgroups the part is the whole workgroup.
// sel_argmax_key gives the i of the largest key (ties: the lowest i); i = 0xffffffff is no
// candidate. Uniform control flow; every invocation gets the i.
fn sel_part(lane: Lane) -> u32 {
    return 0u;
}

fn sel_parts(lane: Lane) -> u32 {
    return 1u;
}

fn sel_lead(lane: Lane) -> bool {
    return lane.id == 0u;
}

var<workgroup> red_key: array<u32, 64>;

fn sel_argmax_key(key: u32, i: u32, lane: Lane) -> u32 {
    let none = 0xffffffffu;
    red_key[lane.id] = key;
    red_arg_i[lane.id] = i;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lane.id < s) {
            let ck = red_key[lane.id + s];
            let ci = red_arg_i[lane.id + s];
            let bk = red_key[lane.id];
            let b = red_arg_i[lane.id];
            if (ci != none && (b == none || ck > bk || (ck == bk && ci < b))) {
                red_key[lane.id] = ck;
                red_arg_i[lane.id] = ci;
            }
        }
        workgroupBarrier();
    }
    let r = red_arg_i[0];
    workgroupBarrier();
    return r;
}

// The selection part's reductions for 256-invocation workgroups (stats.wgsl): the part is the
// workgroup. Two levels (16 runs of 16, then the 16 run results, in order): two barriers a call,
// and the next call's writes cannot overtake this call's reads (each level's slots are written
// only after a barrier every reader of the previous call's slots has passed). Uniform control flow;
// every invocation gets the result.
var<workgroup> red256_k: array<u32, 256>;
var<workgroup> red256_i: array<u32, 256>;
var<workgroup> red256_f: array<vec2<f32>, 256>;
var<workgroup> red16_k: array<u32, 16>;
var<workgroup> red16_i: array<u32, 16>;
var<workgroup> red16_f: array<vec2<f32>, 16>;

// (key, i) better than (bk, bi): larger key, ties to the lower i; i = 0xffffffff is no candidate.
fn sel256_better(k: u32, i: u32, bk: u32, bi: u32) -> bool {
    let none = 0xffffffffu;
    return i != none && (bi == none || k > bk || (k == bk && i < bi));
}

fn sel256_argmax_key(key: u32, i: u32, lane: Lane) -> u32 {
    red256_k[lane.id] = key;
    red256_i[lane.id] = i;
    workgroupBarrier();
    if (lane.id < 16u) {
        var bk = 0u;
        var bi = 0xffffffffu;
        for (var j = lane.id * 16u; j < lane.id * 16u + 16u; j++) {
            if (sel256_better(red256_k[j], red256_i[j], bk, bi)) {
                bk = red256_k[j];
                bi = red256_i[j];
            }
        }
        red16_k[lane.id] = bk;
        red16_i[lane.id] = bi;
    }
    workgroupBarrier();
    var bk = 0u;
    var bi = 0xffffffffu;
    for (var j = 0u; j < 16u; j++) {
        if (sel256_better(red16_k[j], red16_i[j], bk, bi)) {
            bk = red16_k[j];
            bi = red16_i[j];
        }
    }
    return bi;
}

fn sel256_max(v: f32, lane: Lane) -> f32 {
    red256_f[lane.id] = vec2<f32>(v, 0.0);
    workgroupBarrier();
    if (lane.id < 16u) {
        var m = neg_inf();
        for (var j = lane.id * 16u; j < lane.id * 16u + 16u; j++) {
            m = max(m, red256_f[j].x);
        }
        red16_f[lane.id] = vec2<f32>(m, 0.0);
    }
    workgroupBarrier();
    var m = neg_inf();
    for (var j = 0u; j < 16u; j++) {
        m = max(m, red16_f[j].x);
    }
    return m;
}

fn sel256_sum2(v: vec2<f32>, lane: Lane) -> vec2<f32> {
    red256_f[lane.id] = v;
    workgroupBarrier();
    if (lane.id < 16u) {
        var s = vec2<f32>(0.0);
        for (var j = lane.id * 16u; j < lane.id * 16u + 16u; j++) {
            s += red256_f[j];
        }
        red16_f[lane.id] = s;
    }
    workgroupBarrier();
    var s = vec2<f32>(0.0);
    for (var j = 0u; j < 16u; j++) {
        s += red16_f[j];
    }
    return s;
}
