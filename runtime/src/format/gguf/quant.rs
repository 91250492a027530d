//! ggml tensor types: block geometry of every type the reader accepts, and dequantisation of the
//! ones the importer converts (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K).
//!
//! Each quantized type packs `block` consecutive values of a row into `bytes` bytes. The layouts
//! and the order of the float operations follow ggml's reference (scalar) dequantisers, so the
//! values here are bit-identical to ggml's and to the `gguf` Python package's (tested against the
//! latter on committed fixtures).

use half::{bf16, f16};

/// The ggml type of a tensor (`ggml_type` ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    Iq4Nl,
    Iq4Xs,
    I8,
    I16,
    I32,
    I64,
    F64,
    Bf16,
}

/// Values per super-block of the k-quants.
pub const QK_K: usize = 256;

impl GgmlType {
    /// The type with ggml id `id`, for the ids whose block geometry edgediff knows.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            20 => Iq4Nl,
            23 => Iq4Xs,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => Bf16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            Iq4Nl => 20,
            Iq4Xs => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            Bf16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            Iq4Nl => "IQ4_NL",
            Iq4Xs => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            Bf16 => "BF16",
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | Bf16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 | Iq4Nl => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (QK_K, 84),
            Q3K => (QK_K, 110),
            Q4K => (QK_K, 144),
            Q5K => (QK_K, 176),
            Q6K => (QK_K, 210),
            Q8K => (QK_K, 292),
            Iq4Xs => (QK_K, 136),
        }
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | Bf16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K
        )
    }

    /// Bytes of a tensor of `elements` values whose rows are `row` values long, or `None` when
    /// the row is not whole blocks or the size overflows.
    pub fn byte_len(self, row: u64, elements: u64) -> Option<u64> {
        let (block, bytes) = self.block();
        if !row.is_multiple_of(block as u64) {
            return None;
        }
        (elements / block as u64).checked_mul(bytes as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` values of type `ty` from `bytes` (exactly the tensor's bytes). `None` for a type
/// edgediff does not dequantize or bytes that do not hold `n` values.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    let (block, size) = ty.block();
    if !ty.can_dequantize() || !n.is_multiple_of(block) || bytes.len() != n / block * size {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let blocks = bytes.chunks_exact(size);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend((0..n).map(|i| f16_at(bytes, 2 * i))),
        GgmlType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q4_0 => blocks.for_each(|b| q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_1(b, &mut out)),
        GgmlType::Q5_0 => blocks.for_each(|b| q5(b, false, &mut out)),
        GgmlType::Q5_1 => blocks.for_each(|b| q5(b, true, &mut out)),
        GgmlType::Q8_0 => blocks.for_each(|b| {
            let d = f16_at(b, 0);
            out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
        }),
        GgmlType::Q4K => blocks.for_each(|b| q4_k(b, &mut out)),
        GgmlType::Q5K => blocks.for_each(|b| q5_k(b, &mut out)),
        GgmlType::Q6K => blocks.for_each(|b| q6_k(b, &mut out)),
        _ => return None,
    }
    Some(out)
}

/// Q4_0: f16 scale `d`, 16 bytes of nibbles; value j (< 16) in the low nibble of byte j, value
/// j + 16 in its high nibble; `(q − 8)·d`.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0xF) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// Q4_1: f16 scale `d` and minimum `m`, nibbles as Q4_0; `q·d + m`.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| (q & 0xF) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// Q5_0 / Q5_1: as Q4_0 / Q4_1 with a fifth bit per value from a 32-bit word (bit j for value j);
/// Q5_0 centres the code at 16.
fn q5(b: &[u8], with_min: bool, out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let (m, at) = if with_min {
        (f16_at(b, 2), 4)
    } else {
        (0.0, 2)
    };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    let value = |code: u32| {
        if with_min {
            code as f32 * d + m
        } else {
            (code as i32 - 16) as f32 * d
        }
    };
    for (j, &q) in qs.iter().enumerate() {
        out.push(value((q & 0xF) as u32 | (((qh >> j) & 1) << 4)));
    }
    for (j, &q) in qs.iter().enumerate() {
        out.push(value((q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)));
    }
}

/// The 6-bit (scale, min) pair of sub-block `j` (of 8) packed into the 12 scale bytes of Q4_K / Q5_K:
/// sub-blocks 0–3 in the low six bits of bytes j and j + 4, sub-blocks 4–7 split between the low /
/// high nibbles of bytes j + 4 and the top two bits of bytes j − 4 and j.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// Q4_K: super-block of 256 = 8 sub-blocks of 32; f16 `d`, `dmin`, 12 scale bytes, 128 bytes of
/// nibbles. Each 32 bytes of nibbles hold two sub-blocks (low nibbles, then high);
/// value = `d·sc · q − dmin·m`.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    for (pair, qs) in b[16..144].chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * pair, scales);
        let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        out.extend(qs.iter().map(|&q| d1 * (q & 0xF) as f32 - m1));
        out.extend(qs.iter().map(|&q| d2 * (q >> 4) as f32 - m2));
    }
}

/// Q5_K: Q4_K plus 32 bytes of fifth bits; sub-blocks 2p and 2p + 1 take bits 2p and 2p + 1 of
/// `qh[l]` for their value l.
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    for (pair, ql) in b[48..176].chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * pair, scales);
        let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        out.extend(ql.iter().zip(qh).map(|(&q, &h)| {
            let hi = if h & u1 != 0 { 16 } else { 0 };
            d1 * ((q & 0xF) + hi) as f32 - m1
        }));
        out.extend(ql.iter().zip(qh).map(|(&q, &h)| {
            let hi = if h & u2 != 0 { 16 } else { 0 };
            d2 * ((q >> 4) + hi) as f32 - m2
        }));
    }
}

/// Q6_K: super-block of 256 = 16 sub-blocks of 16 with int8 scales; 128 bytes of low nibbles, 64
/// of high 2-bit pairs, 16 scales, f16 `d`. Each half (128 values) draws on 64 low bytes and 32
/// high bytes: value l of its four quarters = low nibble of ql[l] / ql[l+32], high nibble of
/// ql[l] / ql[l+32], with bits 0-1 / 2-3 / 4-5 / 6-7 of qh[l] on top, minus 32; times `d·scale`.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_is_codes_times_scale() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let v = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(&v[..3], &[2.0, -3.0, 0.0]);
    }

    #[test]
    fn q4_0_low_nibbles_come_first() {
        let mut b = vec![0x88u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0; // value 0: code 0 → -16; value 16: code 15 → 14
        let v = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!((v[0], v[16], v[1]), (-16.0, 14.0, 0.0));
    }

    #[test]
    fn wrong_length_or_type_is_refused() {
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_none());
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).is_none());
        assert!(dequantize(GgmlType::Q2K, &[0; 84], 256).is_none());
    }

    #[test]
    fn every_known_id_round_trips() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
    }
}
