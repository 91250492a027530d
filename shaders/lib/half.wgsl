// The two f16 halves of a u32 word (low half first) as f32. unpack2x16float is exact and needs no
// SHADER_F16; naga 30 has no u32 → vec2<f16> bitcast, so the f16 type would not read words faster.
fn unpack_half2(w: u32) -> vec2<f32> {
    return unpack2x16float(w);
}
