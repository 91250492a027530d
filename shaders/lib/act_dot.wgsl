// Dot products of a dequantised weight octet (lib/dequant.wgsl's Oct) with activations from the
// binding `x_act` ([rows, cols] f32, row-major, bound as vec4s), which the including kernel
// declares. Shared by the dense gemv (gemv.wgsl) and the routed-expert gemv (moe_gemv.wgsl), so both
// sum in one order.
//
// Why vec4s: a weight octet costs one 32-bit load (q4), and its eight activations eight scalar
// loads per token — at 16 lanes a row, each a separate L1 wavefront. Rows of a multiple of 4 values
// (every quantized matrix: rows hold whole groups of 32) take two 16-byte loads instead; other rows
// (f32/f16 weights of odd widths) read the same vec4 array element by element.

#include "dequant"

// Σ q · x_act[r, k..k+8], in two vec4 dots; values at or past `cols` count as zero.
fn act_oct_dot(r: u32, k: u32, cols: u32, q: Oct) -> f32 {
    if ((PROBE & 2u) != 0u && (WTYPE == W_Q4 || WTYPE == W_Q8)) {
        return dot(q.lo + q.hi, vec4<f32>(1e-3));
    }
    let b = r * cols + k;
    // Quantized rows hold whole groups of 32, so for them this holds by construction: the test
    // folds away at compile time (WTYPE is an override) and the loads sit in no branch, which
    // NVIDIA's compiler would otherwise serialize.
    if (WTYPE == W_Q4 || WTYPE == W_Q8 || ((cols & 3u) == 0u && k + 8u <= cols)) {
        return dot(q.lo, x_act[b >> 2u]) + dot(q.hi, x_act[(b >> 2u) + 1u]);
    }
    if (k + 8u <= cols) {
        let lo = vec4<f32>(act_at(b), act_at(b + 1u), act_at(b + 2u), act_at(b + 3u));
        let hi = vec4<f32>(act_at(b + 4u), act_at(b + 5u), act_at(b + 6u), act_at(b + 7u));
        return dot(q.lo, lo) + dot(q.hi, hi);
    }
    var s = 0.0;
    for (var i = 0u; i < 4u; i++) {
        if (k + i < cols) {
            s += q.lo[i] * act_at(b + i);
        }
        if (k + 4u + i < cols) {
            s += q.hi[i] * act_at(b + 4u + i);
        }
    }
    return s;
}

// Activation element i of the flat [rows, cols] array.
fn act_at(i: u32) -> f32 {
    return x_act[i >> 2u][i & 3u];
}
