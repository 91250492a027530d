//! GGUF, the llama.cpp ecosystem's model file, as an *import* format: edgediff reads it (header,
//! metadata, tensor index, quantized blocks) and converts it into a `*.edm`; it never runs from one.
//!
//! Layout (versions 2 and 3, little-endian only): magic `GGUF`, `u32` version, `u64` tensor count,
//! `u64` metadata count, the metadata key/value pairs, the tensor infos (name, dims innermost
//! first, ggml type, offset), padding to `general.alignment` (default 32), then the data section
//! that every tensor offset is relative to. Version 1 (32-bit counts) is refused.
//!
//! Every count and length is checked against the bytes that remain before anything is allocated for
//! it, so a lying file costs at most its own size in memory and ends in a [`GgufError`].

mod parse;
pub mod quant;
#[cfg(test)]
mod tests;
mod value;
pub mod write;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use quant::GgmlType;
pub use value::{MetaArray, MetaValue};

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor dimensions.
pub const MAX_DIMS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file (bad magic)")]
    BadMagic,
    #[error("GGUF version {0} is not supported (edgediff reads versions 2 and 3, little-endian)")]
    UnsupportedVersion(u32),
    #[error("file is truncated: {what} needs {need} bytes at offset {at}, the file has {have}")]
    Truncated {
        what: String,
        at: u64,
        need: u64,
        have: u64,
    },
    #[error("{what}: count {count} cannot fit in the {remaining} bytes left in the file")]
    AbsurdCount {
        what: String,
        count: u64,
        remaining: u64,
    },
    #[error("{what}: unknown metadata value type {ty}")]
    UnknownValueType { what: String, ty: u32 },
    #[error("{0}: arrays nested too deeply")]
    NestedTooDeep(String),
    #[error("{what}: string is not valid UTF-8")]
    BadUtf8 { what: String },
    #[error("metadata key '{0}' appears twice")]
    DuplicateKey(String),
    #[error("tensor '{0}' appears twice")]
    DuplicateTensor(String),
    #[error("metadata '{key}': {detail}")]
    BadMetadata { key: String, detail: String },
    #[error("tensor '{name}': unknown ggml type {ty}")]
    UnknownTensorType { name: String, ty: u32 },
    #[error("tensor '{name}': {detail}")]
    BadTensor { name: String, detail: String },
    #[error("tensor '{name}' at data offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        name: String,
        offset: u64,
        align: u64,
    },
    #[error("tensor '{name}' spans data bytes {start}..{end}, past the end of the data section ({limit})")]
    OutOfBounds {
        name: String,
        start: u64,
        end: u64,
        limit: u64,
    },
    #[error("tensors '{a}' and '{b}' overlap")]
    Overlap { a: String, b: String },
    #[error("tensor '{0}' is not in the GGUF file")]
    MissingTensor(String),
    #[error("tensor '{name}': ggml type {ty} cannot be dequantized by edgediff")]
    UnsupportedType { name: String, ty: GgmlType },
    #[error("tensor '{name}' holds a non-finite value at element {index}")]
    NonFinite { name: String, index: usize },
}

/// One tensor of the index. `dims` are ggml's `ne`, innermost (contiguous) first; [`Self::shape`]
/// is the row-major shape edgediff uses (`[rows, cols]` for a matrix).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to the data section.
    pub offset: u64,
    pub byte_len: u64,
}

impl TensorInfo {
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// The parsed header of a GGUF file: everything but the tensor bytes.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// File offset of the data section.
    pub data_start: u64,
}

impl GgufHeader {
    /// Parses and checks a whole file's bytes (header and index; the tensor ranges against the
    /// data section that follows).
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        parse::parse(bytes)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// An open GGUF file: the checked header plus a read-only mapping of the whole file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub header: GgufHeader,
    by_name: HashMap<String, usize>,
    by_key: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: a read-only mapping of a file edgediff never writes. Another process truncating
        // it while mapped would fault, the same caveat as every mmap-based model reader.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = GgufHeader::parse(&map)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let by_key = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            map,
            header,
            by_name,
            by_key,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.by_key.get(key).map(|&i| &self.header.metadata[i].1)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The raw (still quantized) bytes of a tensor; the range was checked when the file was opened.
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let start = (self.header.data_start + t.offset) as usize;
        Ok((t, &self.map[start..start + t.byte_len as usize]))
    }

    /// A tensor dequantized to f32 (row-major, `shape()` order), non-finite values refused.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (t, bytes) = self.tensor_bytes(name)?;
        let values = quant::dequantize(t.ty, bytes, t.elements() as usize).ok_or_else(|| {
            GgufError::UnsupportedType {
                name: name.to_string(),
                ty: t.ty,
            }
        })?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(GgufError::NonFinite {
                name: name.to_string(),
                index,
            });
        }
        Ok(values)
    }
}
