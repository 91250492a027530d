// The dense matmul family's uniform (matmul.wgsl, matmul_coop.wgsl, gemv.wgsl, gemv_wide.wgsl): weights W [n, k]
// as u32 words (lib/dequant.wgsl), activations x [t, k] f32 from row x_row0, output rows written at
// column out_col0 of rows out_stride wide. ops/matmul.rs MatmulParams on the host; tile_t, k_chunk
// and split_rows are the tensor-core kernel's (activation rows a tile, its split along K), splits
// split_sum's (gemv_wide reads tile_t as its token block); the others leave them unused.

struct MatmulParams {
    n: u32,
    k: u32,
    t: u32,
    scales: u32,
    x_row0: u32,
    out_stride: u32,
    out_col0: u32,
    tile_t: u32,
    // gemm_coop split along K: each workgroup z sums k_chunk values (0: all of K) and writes its
    // partial rows at z · split_rows; split_sum adds the `splits` partials.
    k_chunk: u32,
    split_rows: u32,
    splits: u32,
    // gemv_wide: invocations per weight row (16 or 64).
    lanes: u32,
    // The gemvs' fusions (gemv.wgsl, gemv_wide.wgsl; the tiles ignore them), bits of `mode`:
    // MODE_NORM the activation rows enter RMS-normed (x / sqrt(mean(x²) + norm_eps) · norm_w, the
    // norm computed from the row the gemv reads anyway), MODE_ACCUM the result adds to `out`
    // (a residual) instead of replacing it, MODE_HOUT (gemv_wide) the normed rows are written too,
    // MODE_CODES (gemv_wide, gemv_wide_swiglu with QACT) the activations are the 8-bit codes q8_codes
    // made (of the normed rows under MODE_NORM), loaded as they are instead of made again.
    norm_eps: f32,
    mode: u32,
    _pad0: u32,
    _pad1: u32,
}

const MODE_NORM: u32 = 1u;
const MODE_ACCUM: u32 = 2u;
const MODE_HOUT: u32 = 4u;
const MODE_CODES: u32 = 8u;
