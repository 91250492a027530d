//! What every fuzz target does with a model file once it is on disk: open it, then read, decode,
//! load and run whatever opened, so each layer gets inputs that passed the layers before it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::AttnMask;
use edgediff::format::header::{data_start, MAGIC, PREAMBLE, VERSION};
use edgediff::format::EdmFile;
use edgediff::model::{ForwardRequest, Model, Window};

/// One file per fuzzing process, rewritten for every input: `EdmFile::open` takes a path, and
/// creating a fresh temporary file per input would dominate the run time.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::TempDir::new().expect("temporary directory");
        let path = dir.path().join("input.edm");
        (dir, path)
    });
    path
}

/// A scratch file of its own name, for targets that need another extension.
pub fn scratch_named(name: &str) -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::TempDir::new().expect("temporary directory");
        let path = dir.path().join(name);
        (dir, path)
    });
    path
}

/// Opens `path` as GGUF; on success dequantizes every tensor, builds the config, tokenizer and
/// special ids, and reads every tensor through the importer's name mapping (as `convert` would,
/// without writing a model file).
pub fn exercise_gguf(path: &Path) {
    use edgediff::format::gguf::GgufFile;
    use edgediff::import::gguf::{read_meta, GgufSource};
    use edgediff::import::TensorSource;
    let Ok(file) = GgufFile::open(path) else {
        return;
    };
    for t in &file.header.tensors {
        let _ = file.dequantize(&t.name);
    }
    let Ok((family, meta)) = read_meta(&file) else {
        return;
    };
    let src = GgufSource::new(file, family, &meta.config);
    for name in src.names() {
        let _ = src.get(&name);
        for dtype in [edgediff::format::DType::Q8, edgediff::format::DType::Q4] {
            let _ = src.encoded(&name, dtype);
        }
    }
}

/// Opens `path`; on success reads every tensor, expert part and blob the header names (and one
/// expert past each table), decodes them, loads the model on the CPU backend and runs a two-token
/// forward pass. Every step may fail; none may panic.
pub fn exercise(path: &Path) {
    let Ok(file) = EdmFile::open(path) else {
        return;
    };
    let header = file.header.clone();
    for t in &header.tensors {
        if let Ok(view) = file.tensor(&t.name) {
            let _ = view.to_f32();
        }
    }
    for table in &header.experts {
        for e in 0..table.offsets.len() + 1 {
            for p in &table.parts {
                if let Ok(view) = file.expert_part(table.layer, e, &p.name) {
                    let _ = view.to_f32();
                }
            }
            let _ = file.expert_range(table.layer, e);
        }
    }
    for b in &header.blobs {
        let _ = file.blob(&b.name);
    }
    let _ = file.blob("tokenizer.json");
    let Ok(model) = Model::load(&CpuBackend, Arc::new(file), &|_, _| true) else {
        return;
    };
    let Ok(mut kv) = model.new_kv(&CpuBackend, 4) else {
        return;
    };
    let _ = model.forward(
        &CpuBackend,
        &mut kv,
        &[0, 1],
        Window::block(0, 2, AttnMask::Bidirectional),
        &ForwardRequest::default(),
    );
}

/// Builds a model file from `json NUL data`: a valid preamble whose header length matches the
/// JSON, then the data section at its aligned start. Lets mutations grow and shrink the header
/// without also having to fix its length and the data alignment by chance.
pub fn assemble_parts(input: &[u8]) -> Vec<u8> {
    let (json, data) = match input.iter().position(|&b| b == 0) {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (input, &[][..]),
    };
    let start = data_start(json.len() as u64) as usize;
    let mut out = Vec::with_capacity(start + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json);
    debug_assert_eq!(out.len(), PREAMBLE + json.len());
    out.resize(start, 0);
    out.extend_from_slice(data);
    out
}
