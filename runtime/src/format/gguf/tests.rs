//! The GGUF reader on files the writer makes: every value type round-trips, and every lie a file
//! can tell (truncation, counts, lengths, offsets, types) is a typed error.

use super::write::{to_bytes, RawTensor};
use super::*;

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

fn f32_tensor(name: &str, dims: &[u64]) -> RawTensor {
    let n: u64 = dims.iter().product();
    RawTensor {
        name: name.into(),
        dims: dims.to_vec(),
        ty: GgmlType::F32,
        bytes: (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect(),
    }
}

fn sample() -> Vec<u8> {
    to_bytes(
        &[
            kv("general.architecture", MetaValue::String("llama".into())),
            kv("a.u8", MetaValue::U8(7)),
            kv("a.i8", MetaValue::I8(-7)),
            kv("a.u16", MetaValue::U16(700)),
            kv("a.i16", MetaValue::I16(-700)),
            kv("a.u32", MetaValue::U32(70000)),
            kv("a.i32", MetaValue::I32(-70000)),
            kv("a.u64", MetaValue::U64(1 << 40)),
            kv("a.i64", MetaValue::I64(-(1 << 40))),
            kv("a.f32", MetaValue::F32(0.5)),
            kv("a.f64", MetaValue::F64(0.25)),
            kv("a.bool", MetaValue::Bool(true)),
            kv(
                "a.strings",
                MetaValue::Array(MetaArray::String(vec!["x".into(), "ÿ€".into()])),
            ),
            kv("a.ints", MetaValue::Array(MetaArray::Int(vec![1, -2, 3]))),
            kv(
                "a.nested",
                MetaValue::Array(MetaArray::Array(vec![MetaArray::Float(vec![1.5])])),
            ),
        ],
        &[f32_tensor("w", &[4, 3]), f32_tensor("v", &[5])],
    )
}

#[test]
fn every_value_type_round_trips() {
    let h = GgufHeader::parse(&sample()).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.get("a.i8"), Some(&MetaValue::I8(-7)));
    assert_eq!(h.get("a.i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(h.get("a.u64").and_then(MetaValue::as_u64), Some(1 << 40));
    assert_eq!(h.get("a.f64"), Some(&MetaValue::F64(0.25)));
    assert_eq!(h.get("a.bool").and_then(MetaValue::as_bool), Some(true));
    assert_eq!(
        h.get("a.strings").and_then(MetaValue::as_strings).unwrap()[1],
        "ÿ€"
    );
    assert_eq!(
        h.get("a.ints").and_then(MetaValue::as_ints),
        Some(&[1, -2, 3][..])
    );
    assert_eq!(
        h.get("a.nested"),
        Some(&MetaValue::Array(MetaArray::Array(vec![MetaArray::Float(
            vec![1.5]
        )])))
    );
    assert_eq!(h.tensors[0].shape(), vec![3, 4]);
    assert_eq!(
        h.tensors[1].offset, 64,
        "second tensor after 48 bytes, 32-aligned"
    );
    assert_eq!(h.data_start % 32, 0);
}

#[test]
fn tensor_data_reads_back_through_the_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    std::fs::write(&path, sample()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.dequantize("w").unwrap()[11], 11.0);
    assert_eq!(f.dequantize("v").unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    assert!(matches!(
        f.dequantize("nope"),
        Err(GgufError::MissingTensor(_))
    ));
}

#[test]
fn alignment_from_metadata_moves_the_data() {
    let bytes = to_bytes(
        &[kv("general.alignment", MetaValue::U32(256))],
        &[f32_tensor("a", &[3]), f32_tensor("b", &[3])],
    );
    let h = GgufHeader::parse(&bytes).unwrap();
    assert_eq!(
        (h.alignment, h.data_start % 256, h.tensors[1].offset),
        (256, 0, 256)
    );
    let bad = to_bytes(&[kv("general.alignment", MetaValue::U32(48))], &[]);
    assert!(matches!(
        GgufHeader::parse(&bad),
        Err(GgufError::BadMetadata { .. })
    ));
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    for cut in 0..bytes.len() {
        // Cuts inside the trailing padding of the last tensor keep it whole; all others must fail.
        if let Ok(h) = GgufHeader::parse(&bytes[..cut]) {
            let t = h
                .tensors
                .iter()
                .map(|t| t.offset + t.byte_len)
                .max()
                .unwrap();
            assert!(h.data_start + t <= cut as u64, "cut {cut} accepted");
        }
    }
}

#[test]
fn bad_magic_and_versions_are_refused() {
    let mut b = sample();
    b[0] = b'X';
    assert!(matches!(GgufHeader::parse(&b), Err(GgufError::BadMagic)));
    for v in [1u32, 4, 0x0300_0000] {
        let mut b = sample();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(matches!(
            GgufHeader::parse(&b),
            Err(GgufError::UnsupportedVersion(x)) if x == v
        ));
    }
}

/// Byte offset of the first metadata value's type field ("general.architecture").
const FIRST_KV_TYPE: usize = 24 + 8 + "general.architecture".len();

#[test]
fn absurd_counts_fail_before_allocating() {
    for at in [8, 16] {
        let mut b = sample();
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            GgufHeader::parse(&b),
            Err(GgufError::AbsurdCount { .. })
        ));
    }
    // A string array claiming 2^40 entries.
    let b = to_bytes(
        &[kv(
            "t",
            MetaValue::Array(MetaArray::String(vec!["a".into()])),
        )],
        &[],
    );
    let count_at = 24 + 8 + 1 + 4 + 4;
    let mut b2 = b.clone();
    b2[count_at..count_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b2),
        Err(GgufError::AbsurdCount { .. })
    ));
}

#[test]
fn huge_string_length_is_truncation_not_allocation() {
    let mut b = sample();
    // The key length of the first pair.
    b[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::Truncated { .. })
    ));
    let mut b = sample();
    let len_at = FIRST_KV_TYPE + 4;
    b[len_at..len_at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn unknown_value_and_tensor_types_are_named() {
    let mut b = sample();
    b[FIRST_KV_TYPE..FIRST_KV_TYPE + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::UnknownValueType { ty: 13, .. })
    ));
    let mut t = f32_tensor("w", &[4]);
    t.ty = GgmlType::F32;
    let b = to_bytes(&[], &[t]);
    // name (8 + 1), n_dims (4), dims (8): the type follows.
    let ty_at = 24 + 9 + 4 + 8;
    let mut b2 = b.clone();
    b2[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b2),
        Err(GgufError::UnknownTensorType { ty: 99, .. })
    ));
}

#[test]
fn deep_nesting_is_refused() {
    let mut a = MetaArray::Int(vec![1]);
    for _ in 0..8 {
        a = MetaArray::Array(vec![a]);
    }
    let b = to_bytes(&[kv("deep", MetaValue::Array(a))], &[]);
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::NestedTooDeep(_))
    ));
}

#[test]
fn lying_tensor_infos_are_errors() {
    let one = |dims: &[u64], offset: u64, ty: GgmlType| {
        let t = RawTensor {
            name: "w".into(),
            dims: dims.to_vec(),
            ty,
            bytes: vec![0; 64],
        };
        let mut b = to_bytes(&[], &[t]);
        let off_at = 24 + 9 + 4 + 8 * dims.len() + 4;
        b[off_at..off_at + 8].copy_from_slice(&offset.to_le_bytes());
        GgufHeader::parse(&b)
    };
    assert!(one(&[16], 0, GgmlType::F32).is_ok());
    assert!(matches!(
        one(&[16], 32, GgmlType::F32),
        Err(GgufError::OutOfBounds { .. })
    ));
    assert!(matches!(
        one(&[16], u64::MAX - 31, GgmlType::F32),
        Err(GgufError::OutOfBounds { .. })
    ));
    assert!(matches!(
        one(&[16], 4, GgmlType::F32),
        Err(GgufError::Misaligned { .. })
    ));
    assert!(matches!(
        one(&[17], 0, GgmlType::F32),
        Err(GgufError::OutOfBounds { .. })
    ));
    assert!(matches!(
        one(&[16], 0, GgmlType::Q8_0),
        Err(GgufError::BadTensor { .. })
    ));
    assert!(matches!(
        one(&[1 << 32, 1 << 32], 0, GgmlType::F32),
        Err(GgufError::BadTensor { .. })
    ));
    assert!(matches!(
        one(&[16, 0], 0, GgmlType::F32),
        Err(GgufError::BadTensor { .. })
    ));
    assert!(matches!(
        one(&[1, 1, 1, 1, 1], 0, GgmlType::F32),
        Err(GgufError::BadTensor { .. })
    ));
}

#[test]
fn duplicates_and_overlaps_are_errors() {
    let b = to_bytes(&[], &[f32_tensor("w", &[4]), f32_tensor("w", &[4])]);
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::DuplicateTensor(_))
    ));
    let b = to_bytes(&[kv("k", MetaValue::U8(1)), kv("k", MetaValue::U8(2))], &[]);
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::DuplicateKey(_))
    ));
    // Second tensor pointed at the first one's bytes.
    let mut b = to_bytes(&[], &[f32_tensor("a", &[16]), f32_tensor("b", &[16])]);
    let second_off = 24 + (9 + 4 + 8 + 4 + 8) + (9 + 4 + 8 + 4);
    b[second_off..second_off + 8].copy_from_slice(&32u64.to_le_bytes());
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::Overlap { .. })
    ));
}

#[test]
fn bad_bool_and_utf8_are_errors() {
    let mut b = to_bytes(&[kv("b", MetaValue::Bool(true))], &[]);
    let at = 24 + 9 + 4;
    b[at] = 2;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::BadMetadata { .. })
    ));
    let mut b = to_bytes(&[kv("s", MetaValue::String("ab".into()))], &[]);
    let at = 24 + 9 + 4 + 8;
    b[at] = 0xFF;
    assert!(matches!(
        GgufHeader::parse(&b),
        Err(GgufError::BadUtf8 { .. })
    ));
}

/// tests/fixtures/gguf/quants.gguf (tests/reference/gguf_quant_fixture.py): random blocks of every
/// dequantized type, written by the `gguf` Python package with its own dequantized values.
#[test]
fn dequantization_is_bit_exact_to_the_gguf_package() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/gguf/quants.gguf"
    );
    let f = GgufFile::open(path).unwrap();
    let mut checked = Vec::new();
    for t in f
        .header
        .tensors
        .iter()
        .filter(|t| !t.name.ends_with(".expected"))
    {
        let got = f.dequantize(&t.name).unwrap();
        let want = f.dequantize(&format!("{}.expected", t.name)).unwrap();
        assert_eq!(got.len(), want.len(), "{}", t.name);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} element {i}: {g} vs {w}",
                t.name
            );
        }
        checked.push(t.ty);
    }
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        assert!(checked.contains(&ty), "{ty} not in the fixture");
    }
}
