// The bindings of the tiled matmul kernels (matmul.wgsl, matmul_coop.wgsl): activations as scalar
// f32 (the tiles stage them through shared memory); gemv.wgsl binds them as vec4s instead.

#include "matmul_params"

@group(0) @binding(0) var<uniform> p: MatmulParams;
@group(0) @binding(1) var<storage, read> w_words: array<u32>;
@group(0) @binding(2) var<storage, read> x_act: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn w_word(i: u32) -> u32 {
    return w_words[i];
}
