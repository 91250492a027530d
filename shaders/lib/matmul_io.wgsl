// The dense matmul kernels' bindings (matmul.wgsl, matmul_coop.wgsl): weights W [n, k] as u32
// words (lib/dequant.wgsl), activations x [t, k] f32, output f32; the uniform in matmul_params.

#include "matmul_params"

@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
