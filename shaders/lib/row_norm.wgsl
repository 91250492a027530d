// RMSNorm of one row per workgroup of NORM_WG = 256 invocations, shared by norm.wgsl and moe.wgsl's
// moe_combine_norm so the fused combine and the pair it replaces agree bit for bit.
//
// Why this shape: at one token a norm is a single workgroup, so its time is its chain of dependent
// memory round trips, not its bytes (64 invocations walking a 2048-wide row took ≈ 10 µs: sixteen
// rounds of loads). Here invocation i holds columns i + 256·j, j < 16 (four quads, `quad_cols`), in
// registers: the row, the delta and the norm weight are one round of loads, the squares are summed
// in registers, and the output is written from registers. Rows wider than NORM_REG columns take
// the rest in a loop (re-read after the sum).
//
// Sum order, fixed: each invocation adds its squares in ascending column order (quads, then the
// loop), then `norm_total` adds 16 runs of 16 invocations, then the 16 run sums, in order.

const NORM_WG: u32 = 256u;
const NORM_REG: u32 = 4096u;

var<workgroup> norm_part: array<f32, 256>;
var<workgroup> norm_runs: array<f32, 16>;

// The columns of quad q (0..4) of invocation `lid`.
fn quad_cols(lid: u32, q: u32) -> vec4<u32> {
    let c = lid + 1024u * q;
    return vec4<u32>(c, c + 256u, c + 512u, c + 768u);
}

// Quad columns c clamped into a row of `cols`, so a quad's four loads need no branches: a column
// past the row reads the row's last value, which quad_mask then drops.
fn quad_in(c: vec4<u32>, cols: u32) -> vec4<u32> {
    return min(c, vec4<u32>(cols - 1u));
}

// v where its column c lies in the row, 0 past it.
fn quad_mask(v: vec4<f32>, c: vec4<u32>, cols: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), v, c < vec4<u32>(cols));
}

// ss plus the squares of v's components, in component order.
fn add_squares(ss: f32, v: vec4<f32>) -> f32 {
    var s = ss;
    s += v.x * v.x;
    s += v.y * v.y;
    s += v.z * v.z;
    s += v.w * v.w;
    return s;
}

// The workgroup's Σ of every invocation's `ss` (all call it once, in uniform control flow; all get
// the same value).
fn norm_total(ss: f32, lid: u32) -> f32 {
    norm_part[lid] = ss;
    workgroupBarrier();
    if (lid < 16u) {
        var s = 0.0;
        for (var i = 0u; i < 16u; i++) {
            s += norm_part[lid * 16u + i];
        }
        norm_runs[lid] = s;
    }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < 16u; i++) {
        t += norm_runs[i];
    }
    return t;
}
