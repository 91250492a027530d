//! Where imported tensors come from: a Hugging Face safetensors checkpoint (one file or shards with
//! an index), or a synthetic generator that produces the same names on demand. The converter reads
//! both through [`TensorSource`], one tensor at a time.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::ImportError;
use crate::format::DType;

/// A tensor already in a model-file type's layout: its shape and bytes.
pub type Encoded = (Vec<usize>, Vec<u8>);

/// `Sync`: the converter encodes several tensors at once.
pub trait TensorSource: Sync {
    fn has(&self, name: &str) -> bool;
    /// Shape and f32 values of a tensor.
    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ImportError>;
    /// Every tensor name (for detecting unexpected tensors).
    fn names(&self) -> Vec<String>;
    /// The model-file type that holds this tensor without losing what the source stored (GGUF:
    /// from its quantization type); `None` when the source has no opinion.
    fn suggested_dtype(&self, _name: &str) -> Option<DType> {
        None
    }
    /// Shape and bytes of the tensor already in `dtype`'s layout, when the source can produce them
    /// exactly (the same values `get` + `encode` would approximate); `None` otherwise.
    fn encoded(&self, _name: &str, _dtype: DType) -> Result<Option<Encoded>, ImportError> {
        Ok(None)
    }
}

/// A safetensors checkpoint directory, memory-mapped.
pub struct SafetensorsDir {
    maps: Vec<(PathBuf, Mmap)>,
    /// name → where its bytes are.
    index: HashMap<String, Entry>,
}

struct Entry {
    map: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self, ImportError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = read_text(&index_path)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ImportError::Checkpoint {
                    path: index_path.clone(),
                    detail: format!("bad index JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ImportError::Checkpoint {
                    path: index_path.clone(),
                    detail: "no weight_map".into(),
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.contains("..") {
                    return Err(ImportError::Checkpoint {
                        path: index_path.clone(),
                        detail: format!("shard name '{f}' leaves the checkpoint directory"),
                    });
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ImportError::Checkpoint {
                path: dir.to_path_buf(),
                detail: "no model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| ImportError::Io {
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: read-only mapping of a checkpoint we never write; see format::reader for the
            // same reasoning about concurrent truncation.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ImportError::Io {
                path: path.clone(),
                source: e,
            })?;
            let st = SafeTensors::deserialize(&map).map_err(|e| ImportError::Checkpoint {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    map: maps.len(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    range: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            maps.push((path, map));
        }
        Ok(SafetensorsDir { maps, index })
    }
}

impl TensorSource for SafetensorsDir {
    fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ImportError> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| ImportError::MissingTensor(name.to_string()))?;
        let (path, map) = &self.maps[e.map];
        let bad = |detail: String| ImportError::Checkpoint {
            path: path.clone(),
            detail,
        };
        let data = &map[e.range.clone()];
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(bad(format!(
                    "tensor '{name}' has unsupported type {other:?}"
                )))
            }
        };
        if let Some(j) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "tensor '{name}' holds a non-finite value at {j}"
            )));
        }
        Ok((e.shape.clone(), values))
    }
}

pub fn read_text(path: &Path) -> Result<String, ImportError> {
    std::fs::read_to_string(path).map_err(|e| ImportError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}
