// The dense matmul kernels' uniform (matmul.wgsl, matmul_coop.wgsl, gemv.wgsl): weights W [n, k],
// activations x [t, k] from row x_row0, output rows written at column out_col0 of rows out_stride
// wide. ops/matmul.rs MatmulParams on the host; tile_t is the tensor-core kernel's activation rows
// a tile and unused by the others.

struct MatmulParams {
    n: u32,
    k: u32,
    t: u32,
    scales: u32,
    x_row0: u32,
    out_stride: u32,
    out_col0: u32,
    tile_t: u32,
}

@group(0) @binding(0) var<uniform> p: MatmulParams;
