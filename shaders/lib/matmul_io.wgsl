// The dense matmul kernels' uniform and bindings (matmul.wgsl, matmul_coop.wgsl): weights W [n, k]
// as u32 words (lib/dequant.wgsl), activations x [t, k] f32 from row x_row0, output rows written at
// column out_col0 of rows out_stride wide. ops/matmul.rs MatmulParams on the host; tile_t is the
// tensor-core kernel's activation rows a tile and unused by the others.

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
@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
