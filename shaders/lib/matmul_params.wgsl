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
}
