//! 8-bit activations for q4 matmuls: each run of 32 activations (one q4 weight group) becomes 32
//! signed codes and one power-of-two scale, and a group's product is an integer dot product of
//! the weight's nibbles against the codes (llama.cpp's q4 × q8 product). The GPU's wide kernels do
//! this with `QACT` (shaders/lib/wide_gemv.wgsl); this is the same arithmetic on the CPU, the
//! reference their tests hold them to.
//!
//! Why a power of two: x / scale is then exact in f32 and codes round ties to even on both sides,
//! so the CPU and the GPU make the same codes from the same activations (a scale of amax / 127
//! would need a division, which GPUs round their own way). The price is up to one bit: the
//! largest code of a group is 64 … 127 rather than always 127.

use crate::format::dtype::GROUP;

/// One group's codes and scale: value j ≈ `codes[j] · scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Group {
    pub codes: [i8; GROUP],
    pub scale: f32,
}

/// Quantises one group of 32 activations: scale 2^(e − 7) where amax < 2^e (e read from amax's
/// exponent field, kept within [−100, 120]: zero and subnormal groups get codes 0), codes
/// round(x / scale) ties to even, within ±127 (a value that rounds to 128 takes 127).
pub fn quantize_group(x: &[f32; GROUP]) -> Q8Group {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let e = (((amax.to_bits() >> 23) & 0xff) as i32 - 126).clamp(-100, 120);
    let inv = f32::from_bits(((134 - e) as u32) << 23);
    let scale = f32::from_bits(((120 + e) as u32) << 23);
    let codes = x.map(|v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8);
    Q8Group { codes, scale }
}

/// Σ over a group of (nibble − 8) · code, times the activation scale: exact in f32 (the integer
/// sum is below 2^24 and the scale a power of two). `nibbles[j]` is the weight's code of value j.
pub fn q4_group_dot(nibbles: &[u8; GROUP], q: &Q8Group) -> f32 {
    let i: i32 = nibbles
        .iter()
        .zip(&q.codes)
        .map(|(&n, &c)| (i32::from(n) - 8) * i32::from(c))
        .sum();
    i as f32 * q.scale
}

/// y = x · Wᵀ for a q4 weight `[rows, cols]` in the model file's layout (format/dtype.rs) against
/// `x` (`t` rows of `cols`) with 8-bit activations: each group's product is [`q4_group_dot`]
/// times the weight group's scale, rounded to f32 as the GPU does, and the groups of a row are
/// added in f64 (the GPU adds them in f32, in an order of its own). `None` where the shapes do not
/// fit the bytes.
pub fn matmul_q4(bytes: &[u8], rows: usize, cols: usize, x: &[f32]) -> Option<Vec<f32>> {
    if !cols.is_multiple_of(GROUP) || !x.len().is_multiple_of(cols.max(1)) {
        return None;
    }
    let groups = cols / GROUP;
    let code_bytes = rows * cols / 2;
    if bytes.len() != code_bytes + rows * groups * 2 {
        return None;
    }
    let nibbles = |r: usize, g: usize| -> [u8; GROUP] {
        let at = (r * cols + g * GROUP) / 2;
        std::array::from_fn(|j| (bytes[at + j / 2] >> (4 * (j % 2))) & 0xf)
    };
    let wscale = |r: usize, g: usize| {
        let at = code_bytes + (r * groups + g) * 2;
        half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
    };
    let t = x.len() / cols.max(1);
    let qx: Vec<Q8Group> = x
        .chunks_exact(GROUP)
        .map(|c| quantize_group(c.try_into().expect("a group")))
        .collect();
    let mut y = vec![0f32; t * rows];
    for (ti, yr) in y.chunks_exact_mut(rows).enumerate() {
        for (r, out) in yr.iter_mut().enumerate() {
            let sum: f64 = (0..groups)
                .map(|g| {
                    let v = q4_group_dot(&nibbles(r, g), &qx[ti * groups + g]) * wscale(r, g);
                    f64::from(v)
                })
                .sum();
            *out = sum as f32;
        }
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::dtype::{decode, encode, DType};

    #[test]
    fn codes_span_the_top_bit_and_round_ties_to_even() {
        let mut x = [0f32; GROUP];
        x[0] = 1.0; // amax 1 → 2^0 ≤ amax < 2^1: scale 2^-6, code 64
        x[1] = -0.5; // −32
        x[2] = 2.5 / 64.0; // exactly 2.5 codes: ties to even, 2
        x[3] = 3.5 / 64.0; // 4
        x[4] = 1e-30; // below half a code: 0
        let q = quantize_group(&x);
        assert_eq!(q.scale, 1.0 / 64.0);
        assert_eq!(&q.codes[..5], &[64, -32, 2, 4, 0]);
        // Just under the next power of two: codes near 128 take 127.
        x[0] = 1.999;
        let q = quantize_group(&x);
        assert_eq!((q.scale, q.codes[0]), (1.0 / 64.0, 127));
        assert_eq!(quantize_group(&[0.0; GROUP]).codes, [0; GROUP]);
    }

    #[test]
    fn codes_stay_within_a_step_of_the_values() {
        let mut seed = 7u32;
        for _ in 0..200 {
            let x: [f32; GROUP] = std::array::from_fn(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
            });
            let q = quantize_group(&x);
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(q.scale <= amax / 64.0 && amax / q.scale < 128.0);
            for (v, &c) in x.iter().zip(&q.codes) {
                assert!((v - f32::from(c) * q.scale).abs() <= q.scale, "{v} vs {c}");
            }
        }
    }

    #[test]
    fn matmul_is_the_dequantized_product_within_the_codes_error() {
        let (rows, cols, t) = (5, 96, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 30.0)
            .collect();
        let bytes = encode(DType::Q4, &w, cols);
        let wd = decode(DType::Q4, &[rows, cols], &bytes).unwrap();
        let y = matmul_q4(&bytes, rows, cols, &x).unwrap();
        for ti in 0..t {
            for r in 0..rows {
                let exact: f32 = (0..cols).map(|c| wd[r * cols + c] * x[ti * cols + c]).sum();
                // Each activation is off by at most half a code (amax / 128 of its group).
                let bound: f32 = (0..cols)
                    .map(|c| wd[r * cols + c].abs() * 1.6 / 128.0)
                    .sum::<f32>();
                let got = y[ti * rows + r];
                assert!(
                    (got - exact).abs() <= bound,
                    "{got} vs {exact} (bound {bound})"
                );
                assert_ne!(
                    got, exact,
                    "the codes changed nothing: not the 8-bit product"
                );
            }
        }
        assert_eq!(matmul_q4(&bytes[1..], rows, cols, &x), None);
        assert_eq!(matmul_q4(&bytes, rows, 95, &x), None);
    }
}
