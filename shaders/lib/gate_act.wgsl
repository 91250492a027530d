// The gate activation of the gated-MLP kernels (expert gate/up), a pipeline override so each
// pipeline carries one (the host sets it from the weight-type argument's second byte, see
// backend/gpu/kernels.rs): 0 SiLU (every family's SwiGLU), 1 GELU with the tanh approximation
// (DiffusionGemma's GeGLU, PyTorch's gelu(approximate="tanh"); the argument is clamped because
// some drivers build tanh from exp and overflow past |x| ≈ 44, where tanh is ±1 in f32 anyway).

override ACT: u32 = 0u;

fn gate_act(g: f32) -> f32 {
    if (ACT == 1u) {
        let c = clamp(0.7978845608028654 * (g + 0.044715 * g * g * g), -10.0, 10.0);
        return 0.5 * g * (1.0 + tanh(c));
    }
    return g / (1.0 + exp(-g));
}
