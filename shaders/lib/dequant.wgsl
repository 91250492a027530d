// Weights in their file layout (format/dtype.rs), read as u32 words through `w_word(i)`, which the
// including kernel defines (usually word i of its weight binding `w_words`; moe_gemv.wgsl switches
// between the expert pool and the shared expert's own buffer). The weight type is the override
// constant WTYPE, so each pipeline carries the decode of one type only:
//   0 f32: one value per word;
//   1 f16: two values per word, low half first;
//   2 q8:  four int8 codes per word (code j in bits 8j..8j+8), then one f16 scale per 32 values;
//   3 q4:  eight 4-bit codes per word (code j in bits 4j..4j+4), value (code − 8)·scale, then scales.
// Quantized rows always hold whole groups (cols % 32 == 0); only f32/f16 rows can end mid-octet.

#include "half"
#include "probe"

const W_F32: u32 = 0u;
const W_F16: u32 = 1u;
const W_Q8: u32 = 2u;
const W_Q4: u32 = 3u;

override WTYPE: u32 = 0u;

// One matrix among the words: its elements from word `base`, its scales (quantized types) from
// word `scales`, rows of `cols` values.
struct WMat {
    base: u32,
    scales: u32,
    cols: u32,
}

// Eight consecutive weights.
struct Oct {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn group_scale(m: WMat, e: u32) -> f32 {
    let g = e / 32u;
    return unpack_half2(w_word(m.scales + g / 2u))[g & 1u];
}

// Codes become floats by the exponent trick: 2^23 + c as a bit pattern is exactly that float, so
// one OR and one subtraction give c (the q4 offset of 8 and the q8 sign folded into the
// subtraction), where an integer-to-float conversion runs at a quarter of the float rate on
// NVIDIA. The values are exactly those of the conversion.
const DQ_EXP: u32 = 0x4B000000u;

// The four signed bytes of `w`, as floats.
fn sext8x4(w: u32) -> vec4<f32> {
    let u = ((vec4<u32>(w) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(255u)) ^ vec4<u32>(128u);
    return bitcast<vec4<f32>>(u | vec4<u32>(DQ_EXP)) - vec4<f32>(8388736.0);
}

// q4 codes 0..4 (`shift` 0) or 4..8 (`shift` 16) of `w`, minus 8, as floats.
fn q4x4(w: u32, shift: u32) -> vec4<f32> {
    let c = (vec4<u32>(w) >> (vec4<u32>(0u, 4u, 8u, 12u) + vec4<u32>(shift))) & vec4<u32>(15u);
    return bitcast<vec4<f32>>(c | vec4<u32>(DQ_EXP)) - vec4<f32>(8388616.0);
}

// Element (row, k) of `m`; k < m.cols.
fn w_at(m: WMat, row: u32, k: u32) -> f32 {
    let e = row * m.cols + k;
    if (WTYPE == W_F32) {
        return bitcast<f32>(w_word(m.base + e));
    }
    if (WTYPE == W_F16) {
        return unpack_half2(w_word(m.base + e / 2u))[e & 1u];
    }
    if (WTYPE == W_Q8) {
        let w = w_word(m.base + e / 4u);
        let c = bitcast<i32>(w << (24u - 8u * (e & 3u))) >> 24u;
        return f32(c) * group_scale(m, e);
    }
    let w = w_word(m.base + e / 8u);
    let c = i32((w >> (4u * (e & 7u))) & 15u) - 8;
    return f32(c) * group_scale(m, e);
}

// Elements k..k+8 of `row` (k a multiple of 8); those at or past m.cols read as 0.
fn w_oct(m: WMat, row: u32, k: u32) -> Oct {
    let e = row * m.cols + k;
    if ((PROBE & 1u) != 0u && (WTYPE == W_Q4 || WTYPE == W_Q8)) {
        let f = probe_float(w_word(m.base + e / select(4u, 8u, WTYPE == W_Q4)));
        return Oct(vec4<f32>(f), vec4<f32>(f));
    }
    if (WTYPE == W_Q4) {
        let w = w_word(m.base + e / 8u);
        let s = group_scale(m, e);
        return Oct(q4x4(w, 0u) * s, q4x4(w, 16u) * s);
    }
    if (WTYPE == W_Q8) {
        let p = m.base + e / 4u;
        let s = group_scale(m, e);
        return Oct(sext8x4(w_word(p)) * s, sext8x4(w_word(p + 1u)) * s);
    }
    if (k + 8u <= m.cols) {
        if (WTYPE == W_F32) {
            let p = m.base + e;
            return Oct(
                bitcast<vec4<f32>>(vec4<u32>(w_word(p), w_word(p + 1u), w_word(p + 2u), w_word(p + 3u))),
                bitcast<vec4<f32>>(vec4<u32>(w_word(p + 4u), w_word(p + 5u), w_word(p + 6u), w_word(p + 7u))),
            );
        }
        if ((e & 1u) == 0u) {
            let p = m.base + e / 2u;
            return Oct(
                vec4<f32>(unpack_half2(w_word(p)), unpack_half2(w_word(p + 1u))),
                vec4<f32>(unpack_half2(w_word(p + 2u)), unpack_half2(w_word(p + 3u))),
            );
        }
    }
    var v = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for (var i = 0u; i < 8u; i++) {
        if (k + i < m.cols) {
            v[i] = w_at(m, row, k + i);
        }
    }
    return Oct(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}
