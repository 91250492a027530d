//! The GGUF header parser: a bounds-checked cursor over the file's bytes. Each count is compared
//! with the smallest number of bytes its items could occupy before a vector is sized from it, each
//! string length with the bytes left, and array nesting is limited, so no input can make the
//! parser allocate more than a small multiple of the file or recurse without bound.

use std::collections::HashSet;

use super::value::{ty, MetaArray, MetaValue};
use super::{GgmlType, GgufError, GgufHeader, TensorInfo, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};

/// Arrays of arrays deeper than this are refused (no real file nests at all).
const MAX_NESTING: usize = 4;
/// A data section alignment beyond this is a lie, not a layout.
const MAX_ALIGNMENT: u64 = 1 << 24;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                at: self.pos as u64,
                need: n,
                have: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        Ok(self.take(N as u64, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item` bytes long, refused when they could not fit.
    fn count(&mut self, min_item: u64, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        let count = self.u64(what)?;
        let remaining = self.remaining();
        if count
            .checked_mul(min_item)
            .is_none_or(|need| need > remaining)
        {
            return Err(GgufError::AbsurdCount {
                what: what(),
                count,
                remaining,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what() })
    }
}

/// Smallest encoding of one value of type `t` (an array: its type and count).
fn min_size(t: u32) -> Option<u64> {
    Some(match t {
        ty::U8 | ty::I8 | ty::BOOL => 1,
        ty::U16 | ty::I16 => 2,
        ty::U32 | ty::I32 | ty::F32 => 4,
        ty::U64 | ty::I64 | ty::F64 | ty::STRING => 8,
        ty::ARRAY => 12,
        _ => return None,
    })
}

fn scalar(c: &mut Cursor, t: u32, what: &dyn Fn() -> String) -> Result<MetaValue, GgufError> {
    Ok(match t {
        ty::U8 => MetaValue::U8(c.array::<1>(what)?[0]),
        ty::I8 => MetaValue::I8(c.array::<1>(what)?[0] as i8),
        ty::U16 => MetaValue::U16(u16::from_le_bytes(c.array(what)?)),
        ty::I16 => MetaValue::I16(i16::from_le_bytes(c.array(what)?)),
        ty::U32 => MetaValue::U32(c.u32(what)?),
        ty::I32 => MetaValue::I32(i32::from_le_bytes(c.array(what)?)),
        ty::U64 => MetaValue::U64(c.u64(what)?),
        ty::I64 => MetaValue::I64(i64::from_le_bytes(c.array(what)?)),
        ty::F32 => MetaValue::F32(f32::from_le_bytes(c.array(what)?)),
        ty::F64 => MetaValue::F64(f64::from_le_bytes(c.array(what)?)),
        ty::BOOL => match c.array::<1>(what)?[0] {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => {
                return Err(GgufError::BadMetadata {
                    key: what(),
                    detail: format!("boolean byte {b} is neither 0 nor 1"),
                })
            }
        },
        ty::STRING => MetaValue::String(c.string(what)?),
        _ => {
            return Err(GgufError::UnknownValueType {
                what: what(),
                ty: t,
            });
        }
    })
}

fn array(c: &mut Cursor, depth: usize, what: &dyn Fn() -> String) -> Result<MetaArray, GgufError> {
    if depth > MAX_NESTING {
        return Err(GgufError::NestedTooDeep(what()));
    }
    let elem = c.u32(what)?;
    let min = min_size(elem).ok_or_else(|| GgufError::UnknownValueType {
        what: what(),
        ty: elem,
    })?;
    let n = c.count(min, what)? as usize;
    // Each branch sizes its vector from `n`, which `count` bounded by the bytes left.
    Ok(match elem {
        ty::ARRAY => MetaArray::Array(
            (0..n)
                .map(|_| array(c, depth + 1, what))
                .collect::<Result<_, _>>()?,
        ),
        ty::STRING => MetaArray::String((0..n).map(|_| c.string(what)).collect::<Result<_, _>>()?),
        ty::BOOL => MetaArray::Bool(
            (0..n)
                .map(|_| scalar(c, elem, what).map(|v| v.as_bool().unwrap_or(false)))
                .collect::<Result<_, _>>()?,
        ),
        ty::F32 | ty::F64 => MetaArray::Float(
            (0..n)
                .map(|_| scalar(c, elem, what).map(|v| v.as_f64().unwrap_or(0.0)))
                .collect::<Result<_, _>>()?,
        ),
        ty::U64 => {
            let v: Vec<u64> = (0..n).map(|_| c.u64(what)).collect::<Result<_, _>>()?;
            match v.iter().map(|&x| i64::try_from(x)).collect() {
                Ok(ints) => MetaArray::Int(ints),
                Err(_) => MetaArray::U64(v),
            }
        }
        _ => MetaArray::Int(
            (0..n)
                .map(|_| {
                    scalar(c, elem, what).map(|v| match v {
                        MetaValue::U8(x) => x.into(),
                        MetaValue::I8(x) => x.into(),
                        MetaValue::U16(x) => x.into(),
                        MetaValue::I16(x) => x.into(),
                        MetaValue::U32(x) => x.into(),
                        MetaValue::I32(x) => x.into(),
                        MetaValue::I64(x) => x,
                        _ => unreachable!("integer element types only"),
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn value(c: &mut Cursor, t: u32, what: &dyn Fn() -> String) -> Result<MetaValue, GgufError> {
    match t {
        ty::ARRAY => Ok(MetaValue::Array(array(c, 0, what)?)),
        _ => scalar(c, t, what),
    }
}

pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, &|| "magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic);
    }
    let version = c.u32(&|| "version".into())?;
    if !matches!(version, 2 | 3) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    // A tensor info is at least name length + dims count + type + offset; a metadata pair at least
    // key length + type + one byte of value.
    let n_tensors = c.count(8 + 4 + 4 + 8, &|| "tensor count".into())?;
    let n_kv = c.count(8 + 4 + 1, &|| "metadata count".into())?;
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("metadata key {i}"))?;
        let what = || format!("metadata '{key}'");
        let t = c.u32(&what)?;
        let v = value(&mut c, t, &what)?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((key, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(GgufError::BadMetadata {
                    key: key.clone(),
                    detail: format!("{v:?} is not a power of two up to {MAX_ALIGNMENT}"),
                })
            }
        },
    };
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("tensor {i} name"))?;
        let what = || format!("tensor '{name}'");
        let bad = |detail: String| GgufError::BadTensor {
            name: name.clone(),
            detail,
        };
        let n_dims = c.u32(&what)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(bad(format!("{n_dims} dimensions (1..={MAX_DIMS} allowed)")));
        }
        let dims: Vec<u64> = (0..n_dims)
            .map(|_| c.u64(&what))
            .collect::<Result<_, _>>()?;
        let id = c.u32(&what)?;
        let offset = c.u64(&what)?;
        let ty = GgmlType::from_id(id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            ty: id,
        })?;
        // ggml stores dims as int64: anything at or above 2^63, or a product overflowing it, is a lie.
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n < i64::MAX as u64)
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        if dims.contains(&0) {
            return Err(bad(format!("dimensions {dims:?} contain a zero")));
        }
        let byte_len = ty.byte_len(dims[0], elements).ok_or_else(|| {
            bad(format!(
                "a row of {} values is not whole {ty} blocks of {}",
                dims[0],
                ty.block().0
            ))
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::Misaligned {
                name,
                offset,
                align: alignment,
            });
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            byte_len,
        });
    }
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    let limit = file_len.saturating_sub(data_start);
    for t in &tensors {
        let end = t.offset.checked_add(t.byte_len);
        if data_start > file_len || end.is_none_or(|e| e > limit) {
            return Err(GgufError::OutOfBounds {
                name: t.name.clone(),
                start: t.offset,
                end: end.unwrap_or(u64::MAX),
                limit,
            });
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for w in order.windows(2) {
        if w[0].offset + w[0].byte_len > w[1].offset {
            return Err(GgufError::Overlap {
                a: w[0].name.clone(),
                b: w[1].name.clone(),
            });
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
