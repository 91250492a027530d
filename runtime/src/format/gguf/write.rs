//! A minimal GGUF writer (version 3): what tests, fuzz seeds and synthetic models need to make small
//! files. It writes whatever it is given, so tests can also make files that lie.

use super::value::{ty, MetaArray, MetaValue};
use super::GgmlType;

/// One tensor to write: its ggml dims (innermost first), type and already-encoded bytes.
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_of(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => ty::U8,
        MetaValue::I8(_) => ty::I8,
        MetaValue::U16(_) => ty::U16,
        MetaValue::I16(_) => ty::I16,
        MetaValue::U32(_) => ty::U32,
        MetaValue::I32(_) => ty::I32,
        MetaValue::U64(_) => ty::U64,
        MetaValue::I64(_) => ty::I64,
        MetaValue::F32(_) => ty::F32,
        MetaValue::F64(_) => ty::F64,
        MetaValue::Bool(_) => ty::BOOL,
        MetaValue::String(_) => ty::STRING,
        MetaValue::Array(_) => ty::ARRAY,
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    // Integers are written as i32 (u64 arrays as u64), floats as f32: the types real files use.
    match a {
        MetaArray::Int(v) => {
            out.extend(ty::I32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|&x| out.extend((x as i32).to_le_bytes()));
        }
        MetaArray::U64(v) => {
            out.extend(ty::U64.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|&x| out.extend(x.to_le_bytes()));
        }
        MetaArray::Float(v) => {
            out.extend(ty::F32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|&x| out.extend((x as f32).to_le_bytes()));
        }
        MetaArray::Bool(v) => {
            out.extend(ty::BOOL.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|&x| out.push(x as u8));
        }
        MetaArray::String(v) => {
            out.extend(ty::STRING.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|s| put_str(out, s));
        }
        MetaArray::Array(v) => {
            out.extend(ty::ARRAY.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| put_array(out, x));
        }
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    out.extend(type_of(v).to_le_bytes());
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
    }
}

/// The bytes of a GGUF v3 file with `metadata` and `tensors`, aligned to `general.alignment` when
/// the metadata sets it (else 32).
pub fn to_bytes(metadata: &[(String, MetaValue)], tensors: &[RawTensor]) -> Vec<u8> {
    let align = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .filter(|a| a.is_power_of_two())
        .unwrap_or(super::DEFAULT_ALIGNMENT) as usize;
    let mut out = Vec::new();
    out.extend(super::MAGIC);
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ty.id().to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + t.bytes.len()).next_multiple_of(align);
    }
    out.resize(out.len().next_multiple_of(align), 0);
    for t in tensors {
        out.extend(&t.bytes);
        out.resize(out.len().next_multiple_of(align), 0);
    }
    out
}
