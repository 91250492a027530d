//! Weight types of the model file and their byte layouts.
//!
//! Matrices are stored row-major as `[out, in]` (PyTorch `Linear` layout). Quantized types group the
//! input dimension in runs of 32 values with one f16 scale per group, symmetric (no zero point):
//! - `q8`: `rows*cols` signed bytes (four per little-endian u32 word), then `rows*cols/32` f16 scales;
//! - `q4`: `rows*cols/2` bytes, eight 4-bit codes per u32 word, code `j` of a word in bits `4j..4j+4`,
//!   value = (code − 8) · scale; then `rows*cols/32` f16 scales.
//!
//! Codes first and scales after keeps both arrays u32-aligned, so a shader reads whole words.

use half::f16;
use serde::{Deserialize, Serialize};

/// Values per quantization group along the input dimension.
pub const GROUP: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Q8,
    Q4,
    /// Raw bytes (embedded blobs such as tokenizer.json).
    U8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q8 => "q8",
            DType::Q4 => "q4",
            DType::U8 => "u8",
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8 | DType::Q4)
    }

    /// Byte size of a tensor of this type and shape, or `None` when the shape is not representable
    /// (overflow, or a quantized tensor whose last dimension is not a multiple of [`GROUP`]).
    pub fn byte_len(self, shape: &[usize]) -> Option<usize> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        match self {
            DType::F32 => n.checked_mul(4),
            DType::F16 => n.checked_mul(2),
            DType::U8 => Some(n),
            DType::Q8 | DType::Q4 => {
                let cols = *shape.last()?;
                if shape.len() != 2 || !cols.is_multiple_of(GROUP) {
                    return None;
                }
                let codes = if self == DType::Q8 { n } else { n / 2 };
                codes.checked_add((n / GROUP).checked_mul(2)?)
            }
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "q8" => Ok(DType::Q8),
            "q4" => Ok(DType::Q4),
            _ => Err(format!(
                "unknown weight type '{s}' (expected f32, f16, q8 or q4)"
            )),
        }
    }
}

/// Encodes f32 values of a `[rows, cols]` matrix into `dtype`'s byte layout.
/// Quantized types need `cols.is_multiple_of(GROUP)` (checked by the caller through [`DType::byte_len`]).
pub fn encode(dtype: DType, values: &[f32], cols: usize) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::U8 => values.iter().map(|&v| v as u8).collect(),
        DType::Q8 | DType::Q4 => quantize(dtype, values, cols),
    }
}

/// Stacks the rows of several encoded `[rows_i, cols]` matrices into one `[Σ rows_i, cols]` matrix
/// of the same type. Plain types concatenate; quantized types keep the codes-then-scales layout, so
/// all parts' codes come first, then all parts' scales.
pub fn stack_rows(dtype: DType, parts: &[(usize, Vec<u8>)], cols: usize) -> Vec<u8> {
    if !dtype.is_quantized() {
        return parts.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    }
    let code_len = |rows: usize| {
        if dtype == DType::Q8 {
            rows * cols
        } else {
            rows * cols / 2
        }
    };
    let mut out = Vec::with_capacity(parts.iter().map(|(_, b)| b.len()).sum());
    for (rows, b) in parts {
        out.extend(&b[..code_len(*rows)]);
    }
    for (rows, b) in parts {
        out.extend(&b[code_len(*rows)..]);
    }
    out
}

fn quantize(dtype: DType, values: &[f32], cols: usize) -> Vec<u8> {
    debug_assert!(cols.is_multiple_of(GROUP) && values.len().is_multiple_of(cols));
    let qmax = if dtype == DType::Q8 { 127.0 } else { 7.0 };
    let groups = values.len() / GROUP;
    let mut codes = Vec::with_capacity(if dtype == DType::Q8 {
        values.len()
    } else {
        values.len() / 2
    });
    let mut scales = Vec::with_capacity(groups * 2);
    for group in values.chunks_exact(GROUP) {
        let amax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Quantize against the scale as stored (f16), so decode(encode(x)) is the nearest grid point.
        let scale = f16::from_f32(amax / qmax);
        let s = scale.to_f32();
        let q = |v: f32| -> i32 {
            if s == 0.0 || !s.is_finite() {
                0
            } else {
                (v / s).round().clamp(-qmax - 1.0, qmax) as i32
            }
        };
        if dtype == DType::Q8 {
            codes.extend(group.iter().map(|&v| q(v) as i8 as u8));
        } else {
            for pair in group.chunks_exact(2) {
                let lo = (q(pair[0]) + 8) as u8;
                let hi = (q(pair[1]) + 8) as u8;
                codes.push(lo | (hi << 4));
            }
        }
        scales.extend(scale.to_le_bytes());
    }
    codes.extend(scales);
    codes
}

/// Error from decoding a tensor's bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {expected} bytes for {dtype} {shape:?}, got {got}")]
    Length {
        dtype: DType,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    #[error("scale {index} of a {dtype} tensor is not finite ({value})")]
    BadScale {
        dtype: DType,
        index: usize,
        value: f32,
    },
    #[error("value {index} of an {dtype} tensor is not finite")]
    NotFinite { dtype: DType, index: usize },
}

/// Decodes a whole tensor to f32, checking that every value (or scale) is finite:
/// a NaN in a weight file is corruption, not a number to compute with.
pub fn decode(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Vec<f32>, DecodeError> {
    let expected = dtype.byte_len(shape).unwrap_or(usize::MAX);
    if expected != bytes.len() {
        return Err(DecodeError::Length {
            dtype,
            shape: shape.to_vec(),
            expected,
            got: bytes.len(),
        });
    }
    let n: usize = shape.iter().product();
    let out: Vec<f32> = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::U8 => bytes.iter().map(|&b| b as f32).collect(),
        DType::Q8 | DType::Q4 => {
            let code_bytes = if dtype == DType::Q8 { n } else { n / 2 };
            let (codes, scales) = bytes.split_at(code_bytes);
            let mut out = Vec::with_capacity(n);
            for (g, s) in scales.chunks_exact(2).enumerate() {
                let s = f16::from_le_bytes([s[0], s[1]]).to_f32();
                if !s.is_finite() {
                    return Err(DecodeError::BadScale {
                        dtype,
                        index: g,
                        value: s,
                    });
                }
                if dtype == DType::Q8 {
                    let c = &codes[g * GROUP..(g + 1) * GROUP];
                    out.extend(c.iter().map(|&b| b as i8 as f32 * s));
                } else {
                    let c = &codes[g * GROUP / 2..(g + 1) * GROUP / 2];
                    for &b in c {
                        out.push(((b & 15) as f32 - 8.0) * s);
                        out.push(((b >> 4) as f32 - 8.0) * s);
                    }
                }
            }
            out
        }
    };
    if matches!(dtype, DType::F32 | DType::F16) {
        if let Some(index) = out.iter().position(|v| !v.is_finite()) {
            return Err(DecodeError::NotFinite { dtype, index });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn byte_lengths_follow_the_layout() {
        assert_eq!(DType::F32.byte_len(&[3, 5]), Some(60));
        assert_eq!(DType::F16.byte_len(&[3, 5]), Some(30));
        assert_eq!(DType::Q8.byte_len(&[2, 64]), Some(128 + 8));
        assert_eq!(DType::Q4.byte_len(&[2, 64]), Some(64 + 8));
        assert_eq!(DType::Q4.byte_len(&[2, 33]), None);
        assert_eq!(DType::F32.byte_len(&[usize::MAX, 2]), None);
    }

    #[test]
    fn round_trips_stay_within_half_a_step() {
        let v = ramp(4 * 64);
        for (dtype, steps) in [
            (DType::F32, 0.0),
            (DType::F16, 0.0),
            (DType::Q8, 127.0),
            (DType::Q4, 7.0),
        ] {
            let bytes = encode(dtype, &v, 64);
            let back = decode(dtype, &[4, 64], &bytes).unwrap();
            for (g, (a, b)) in v.chunks(GROUP).zip(back.chunks(GROUP)).enumerate() {
                let amax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                let tol = if steps == 0.0 {
                    2e-3 * amax
                } else {
                    0.51 * amax / steps + 1e-3 * amax
                };
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= tol, "{dtype} group {g}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn nan_scale_is_an_error() {
        let mut bytes = encode(DType::Q8, &ramp(32), 32);
        let n = bytes.len();
        bytes[n - 2..].copy_from_slice(&f16::NAN.to_le_bytes());
        assert!(matches!(
            decode(DType::Q8, &[1, 32], &bytes),
            Err(DecodeError::BadScale { .. })
        ));
    }

    #[test]
    fn wrong_length_is_an_error() {
        assert!(matches!(
            decode(DType::F32, &[2, 2], &[0; 15]),
            Err(DecodeError::Length { .. })
        ));
    }
}
