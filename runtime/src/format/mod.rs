//! The model container (`*.edm`): one file with a JSON header (metadata, tensor index, expert table)
//! and aligned tensor data, read through memmap2. docs/FORMAT.md specifies it.

pub mod dtype;
pub mod gguf;
pub mod header;
mod reader;
mod writer;

use std::path::PathBuf;

pub use dtype::DType;
pub use header::{
    BlobEntry, CanvasSampler, DecodingDefaults, ExpertTable, Header, Metadata, SpecialTokenIds,
    TensorEntry,
};
pub use reader::{EdmFile, TensorView};
pub use writer::{EdmWriter, LayoutBuilder};

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not an edgediff model file (bad magic)")]
    BadMagic,
    #[error("model file format version {found} is not supported (this build reads version {supported}); convert the model again or update edgediff")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("file is truncated: the {what} needs {need} bytes, the file has {have}")]
    Truncated { what: String, need: u64, have: u64 },
    #[error("header of {0} bytes exceeds the limit")]
    HeaderTooLarge(u64),
    #[error("header is not valid JSON for this format: {0}")]
    HeaderJson(serde_json::Error),
    #[error("'{name}' ends at byte {end} of the data section, past its end ({limit})")]
    OutOfBounds { name: String, end: u64, limit: u64 },
    #[error("'{a}' and '{b}' overlap")]
    Overlap { a: String, b: String },
    #[error("'{name}' at offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        name: String,
        offset: u64,
        align: u64,
    },
    #[error("'{name}': shape {shape:?} is not valid for {dtype}")]
    BadShape {
        name: String,
        dtype: DType,
        shape: Vec<usize>,
    },
    #[error("'{name}': index says {stated} bytes, its type and shape need {expected}")]
    LengthMismatch {
        name: String,
        expected: u64,
        stated: u64,
    },
    #[error("tensor '{0}' is not in the model file")]
    MissingTensor(String),
    #[error("tensor '{name}': {source}")]
    Decode {
        name: String,
        source: dtype::DecodeError,
    },
    #[error(transparent)]
    Config(#[from] crate::arch::ConfigError),
    #[error("'{0}' is listed twice")]
    DuplicateName(String),
    #[error("invalid model file: {0}")]
    Invalid(String),
}
