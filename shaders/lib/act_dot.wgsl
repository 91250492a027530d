// Dot products of a dequantised weight octet (lib/dequant.wgsl's Oct) with activations from the
// binding `x_act` ([rows, cols] f32, row-major), which the including kernel declares. Shared by the
// dense gemv (matmul.wgsl) and the routed-expert gemv (moe_gemv.wgsl), so both sum in one order.

#include "dequant"

// Σ q · x_act[r, k..k+8], in two vec4 dots; values at or past `cols` count as zero.
fn act_oct_dot(r: u32, k: u32, cols: u32, q: Oct) -> f32 {
    let b = r * cols + k;
    if (k + 8u <= cols) {
        let lo = vec4<f32>(x_act[b], x_act[b + 1u], x_act[b + 2u], x_act[b + 3u]);
        let hi = vec4<f32>(x_act[b + 4u], x_act[b + 5u], x_act[b + 6u], x_act[b + 7u]);
        return dot(q.lo, lo) + dot(q.hi, hi);
    }
    var s = 0.0;
    for (var i = 0u; i < 4u; i++) {
        if (k + i < cols) {
            s += q.lo[i] * x_act[b + i];
        }
        if (k + 4u + i < cols) {
            s += q.hi[i] * x_act[b + 4u + i];
        }
    }
    return s;
}
