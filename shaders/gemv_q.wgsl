// y = x · Wᵀ for q4/q8 weights (rows of whole 32-value groups, lib/dequant.wgsl's layout: codes of
// the whole matrix, then one f16 scale per group) and 1–16 activation rows; x [t, k], y f32. The
// quantized counterpart of gemv.wgsl's gemv, bandwidth-bound.
//
// Why not gemv.wgsl's octets: there every invocation owns one weight row, so each activation value
// it loads (8 bytes of f32 per byte of q4 codes) serves one row, and the L1 traffic of the
// activations, not the weights' DRAM traffic, bounds the kernel. Here an invocation owns ROWS = 4
// rows and one quant group at a time: one 16-byte load per row (q4; two for q8) and the group's 32
// activations (eight 16-byte loads) per token, shared by the four rows.
//
// Tiling: a workgroup of 64 = 2 row sets × 32 lanes; row set s holds rows row0 + 4s .. + 4, lane l
// walks groups l, l + 32, … of those rows (a row of 2048 values is 64 groups: two steps, their
// loads issued together), and the workgroup's z is a block of up to 4 activation rows. The 32
// lanes' partial sums of each (row, token) meet in shared memory, summed in lane order.

#include "matmul_params"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_act: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const W_Q8: u32 = 2u;
override WTYPE: u32 = 3u;

const LANES: u32 = 32u;
const ROWS: u32 = 4u;
const SETS: u32 = 2u;
const TB: u32 = 4u;

var<workgroup> part: array<f32, 1024>;

fn word(i: u32) -> u32 {
    return w4[i >> 2u][i & 3u];
}

fn unpack_f16(w: u32, hi: bool) -> f32 {
    return unpack2x16float(w)[select(0u, 1u, hi)];
}

// Scale of group g of `row` (groups per row `gpr`).
fn group_scale(row: u32, gpr: u32, g: u32) -> f32 {
    let i = row * gpr + g;
    return unpack_f16(word(p.scales + i / 2u), (i & 1u) == 1u);
}

fn q4_lo(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>((vec4<u32>(w) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u)) - vec4<i32>(8));
}

fn q4_hi(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<i32>((vec4<u32>(w) >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u)) - vec4<i32>(8));
}

fn q8_codes(w: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(w << 24u, w << 16u, w << 8u, w));
    return vec4<f32>(v >> vec4<u32>(24u));
}

// The 32 activations of a group, as eight vec4s.
struct Act32 {
    a: array<vec4<f32>, 8>,
}

// Σ codes · activations of one group whose codes are `lo` (q4: all 32; q8: the first 16) and
// `hi` (q8: the last 16), unscaled.
fn group_dot(lo: vec4<u32>, hi: vec4<u32>, x: Act32) -> f32 {
    if (WTYPE == W_Q8) {
        let s0 = dot(q8_codes(lo.x), x.a[0]) + dot(q8_codes(lo.y), x.a[1]);
        let s1 = dot(q8_codes(lo.z), x.a[2]) + dot(q8_codes(lo.w), x.a[3]);
        let s2 = dot(q8_codes(hi.x), x.a[4]) + dot(q8_codes(hi.y), x.a[5]);
        let s3 = dot(q8_codes(hi.z), x.a[6]) + dot(q8_codes(hi.w), x.a[7]);
        return (s0 + s1) + (s2 + s3);
    }
    let s0 = dot(q4_lo(lo.x), x.a[0]) + dot(q4_hi(lo.x), x.a[1]);
    let s1 = dot(q4_lo(lo.y), x.a[2]) + dot(q4_hi(lo.y), x.a[3]);
    let s2 = dot(q4_lo(lo.z), x.a[4]) + dot(q4_hi(lo.z), x.a[5]);
    let s3 = dot(q4_lo(lo.w), x.a[6]) + dot(q4_hi(lo.w), x.a[7]);
    return (s0 + s1) + (s2 + s3);
}

fn load_act(r: u32, g: u32) -> Act32 {
    let b = (r * p.k + g * 32u) / 4u;
    var x: Act32;
    for (var i = 0u; i < 8u; i++) {
        x.a[i] = x_act[b + i];
    }
    return x;
}

@compute @workgroup_size(64)
fn gemv_q(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let rs = lid / LANES;
    let lane = lid % LANES;
    let wg_row0 = (wid.x + wid.y * nwg.x) * (SETS * ROWS);
    let row0 = wg_row0 + rs * ROWS;
    let t0 = wid.z * TB;
    let nt = min(p.t - t0, TB);
    let gpr = p.k / 32u;
    // Vec4s of codes per row: q4 packs a group in one, q8 in two.
    let per_group = select(1u, 2u, WTYPE == W_Q8);
    var acc: array<vec4<f32>, 4>;
    for (var g = lane; g < gpr; g += LANES) {
        var lo: array<vec4<u32>, 4>;
        var hi: array<vec4<u32>, 4>;
        var sc = vec4<f32>(0.0);
        for (var r = 0u; r < ROWS; r++) {
            let row = row0 + r;
            if (row < p.n) {
                let v = (row * gpr + g) * per_group;
                lo[r] = w4[v];
                if (WTYPE == W_Q8) {
                    hi[r] = w4[v + 1u];
                }
                sc[r] = group_scale(row, gpr, g);
            }
        }
        for (var t = 0u; t < TB; t++) {
            if (t < nt) {
                let x = load_act(p.x_row0 + t0 + t, g);
                for (var r = 0u; r < ROWS; r++) {
                    acc[r][t] += sc[r] * group_dot(lo[r], hi[r], x);
                }
            }
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        for (var t = 0u; t < TB; t++) {
            part[(lid * ROWS + r) * TB + t] = acc[r][t];
        }
    }
    workgroupBarrier();
    if (lid < SETS * ROWS * TB) {
        let s = lid / (ROWS * TB);
        let r = (lid / TB) % ROWS;
        let t = lid % TB;
        var sum = 0.0;
        for (var l = 0u; l < LANES; l++) {
            sum += part[((s * LANES + l) * ROWS + r) * TB + t];
        }
        let row = wg_row0 + s * ROWS + r;
        if (row < p.n && t < nt) {
            out[(t0 + t) * p.out_stride + p.out_col0 + row] = sum;
        }
    }
}
