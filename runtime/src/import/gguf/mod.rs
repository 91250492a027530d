//! GGUF → `*.edm`. The GGUF file is read through [`GgufSource`], a [`TensorSource`] that shows its
//! tensors under the family's Hugging Face names (see `names.rs`), so planning, fusing, checking
//! and writing are the same code as for a safetensors checkpoint. What differs is metadata
//! (`config.rs`), the tokenizer (`tokenizer.rs`) and the weight types: by default each matrix
//! keeps the edgediff type nearest to what the GGUF stored (docs/FORMAT.md, "GGUF import").

mod config;
mod names;
mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

use serde_json::json;

pub use config::{family, model_config, Family, SUPPORTED};

use super::source::Encoded;
use super::WeightPolicy;
use super::{
    write_model_with, ConvertSummary, ImportError, ImportMeta, MetaOverrides, Progress,
    TensorSource,
};
use crate::format::gguf::{quant, GgmlType, GgufError, GgufFile, TensorInfo};
use crate::format::{DType, DecodingDefaults, SpecialTokenIds};
use names::{Mapped, Read};

impl From<GgufError> for ImportError {
    fn from(e: GgufError) -> Self {
        ImportError::Gguf(e)
    }
}

/// The edgediff type that keeps a GGUF type's values best for its size: exact where the block
/// formats coincide (Q8_0 = q8, Q4_0 = q4: the same groups of 32 with an f16 scale), q8 for the
/// 4-6-bit types whose offsets or sub-block scales q4 cannot express (measured: docs/FORMAT.md).
pub fn suggested(ty: GgmlType) -> DType {
    match ty {
        GgmlType::F32 | GgmlType::F64 => DType::F32,
        GgmlType::F16 | GgmlType::Bf16 => DType::F16,
        GgmlType::Q4_0 => DType::Q4,
        _ => DType::Q8,
    }
}

/// One model-side tensor inside the file: info, bytes, model shape, how to read it.
type Raw<'a> = (&'a TensorInfo, &'a [u8], Vec<usize>, &'a Read);

/// A GGUF file's tensors under a family layout's names.
pub struct GgufSource {
    file: GgufFile,
    map: HashMap<String, Mapped>,
}

impl GgufSource {
    pub fn new(file: GgufFile, fam: Family, cfg: &crate::model::ModelConfig) -> Self {
        let lay = super::layout(fam.arch);
        let permute = fam.permuted_qk.then_some((cfg.num_heads, cfg.num_kv_heads));
        let mut map = HashMap::new();
        for t in &file.header.tensors {
            let experts = if t.dims.len() == 3 {
                t.dims[2] as usize
            } else {
                0
            };
            let mapped = names::map(lay, &t.name, experts, permute);
            if mapped.is_empty() {
                // Unknown to the layout: shown under its own name so the converter refuses it.
                map.insert(
                    t.name.clone(),
                    Mapped {
                        gguf: t.name.clone(),
                        read: Read::Whole,
                    },
                );
            }
            map.extend(mapped);
        }
        GgufSource { file, map }
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The tensor's info, its raw bytes (one expert's slice for a stacked tensor) and model shape.
    fn raw(&self, name: &str) -> Result<Raw<'_>, ImportError> {
        let m = self
            .map
            .get(name)
            .ok_or_else(|| ImportError::MissingTensor(name.to_string()))?;
        let (t, bytes) = self.file.tensor_bytes(&m.gguf)?;
        match m.read {
            Read::Expert { index, count } => {
                let per = bytes.len() / count;
                let shape = t.shape()[1..].to_vec();
                Ok((t, &bytes[index * per..(index + 1) * per], shape, &m.read))
            }
            _ => Ok((t, bytes, t.shape(), &m.read)),
        }
    }

    /// Rows of `bytes` (each `row_bytes` long) in rotate-half order when `read` asks for it.
    fn reorder<'b>(read: &Read, shape: &[usize], bytes: &'b [u8]) -> std::borrow::Cow<'b, [u8]> {
        let Read::Unpermute { heads } = *read else {
            return bytes.into();
        };
        let rows = shape[0];
        let row_bytes = bytes.len() / rows;
        let mut out = Vec::with_capacity(bytes.len());
        for r in 0..rows {
            let src = names::interleaved_row(r, rows, heads);
            out.extend(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
        out.into()
    }

    fn check_unpermute(&self, name: &str, read: &Read, shape: &[usize]) -> Result<(), ImportError> {
        if let Read::Unpermute { heads } = *read {
            if shape.len() != 2 || heads == 0 || !shape[0].is_multiple_of(2 * heads) {
                return Err(ImportError::Shape {
                    name: name.to_string(),
                    got: shape.to_vec(),
                    want: vec![heads * 2, 0],
                });
            }
        }
        Ok(())
    }
}

impl TensorSource for GgufSource {
    fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ImportError> {
        let (t, bytes, shape, read) = self.raw(name)?;
        self.check_unpermute(name, read, &shape)?;
        let bytes = Self::reorder(read, &shape, bytes);
        let n = shape.iter().product();
        let values =
            quant::dequantize(t.ty, &bytes, n).ok_or_else(|| GgufError::UnsupportedType {
                name: t.name.clone(),
                ty: t.ty,
            })?;
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(GgufError::NonFinite {
                name: t.name.clone(),
                index,
            }
            .into());
        }
        Ok((shape, values))
    }

    fn suggested_dtype(&self, name: &str) -> Option<DType> {
        let m = self.map.get(name)?;
        Some(suggested(self.file.tensor_info(&m.gguf)?.ty))
    }

    /// Q8_0 → q8 and Q4_0 → q4 move codes and scales without rounding anything.
    fn encoded(&self, name: &str, dtype: DType) -> Result<Option<Encoded>, ImportError> {
        let (t, bytes, shape, read) = self.raw(name)?;
        let (block, size) = t.ty.block();
        let code_bytes = match (t.ty, dtype) {
            (GgmlType::Q8_0, DType::Q8) => 32,
            (GgmlType::Q4_0, DType::Q4) => 16,
            _ => return Ok(None),
        };
        if shape.len() != 2 {
            return Ok(None);
        }
        self.check_unpermute(name, read, &shape)?;
        let bytes = Self::reorder(read, &shape, bytes);
        let blocks = bytes.len() / size;
        debug_assert_eq!(blocks * block, shape.iter().product::<usize>());
        let mut codes = Vec::with_capacity(blocks * code_bytes);
        let mut scales = Vec::with_capacity(blocks * 2);
        for (i, b) in bytes.chunks_exact(size).enumerate() {
            let d = half::f16::from_le_bytes([b[0], b[1]]);
            if !d.is_finite() {
                return Err(GgufError::NonFinite {
                    name: t.name.clone(),
                    index: i * block,
                }
                .into());
            }
            scales.extend_from_slice(&b[..2]);
            if t.ty == GgmlType::Q8_0 {
                codes.extend_from_slice(&b[2..34]);
            } else {
                // ggml: value j in the low nibble of byte j, value j + 16 in its high nibble;
                // edgediff: value 2k in the low nibble of byte k, 2k + 1 in the high one. Both
                // store the code as q with value (q − 8)·d.
                let qs = &b[2..18];
                let nib = |j: usize| {
                    if j < 16 {
                        qs[j] & 0xF
                    } else {
                        qs[j - 16] >> 4
                    }
                };
                codes.extend((0..16).map(|k| nib(2 * k) | (nib(2 * k + 1) << 4)));
            }
        }
        codes.extend(scales);
        Ok(Some((shape, codes)))
    }
}

/// Reads everything but the tensors: config, tokenizer, chat template, special ids, decoding.
pub fn read_meta(f: &GgufFile) -> Result<(Family, ImportMeta), ImportError> {
    let arch = f
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ImportError::Config("GGUF has no general.architecture".into()))?;
    let fam = family(arch)?;
    let config = model_config(f, fam)?;
    let tokenizer_json = tokenizer::tokenizer_json(f)?;
    let tok = crate::tokenizer::Tokenizer::from_json(&tokenizer_json)
        .map_err(|e| ImportError::Tokenizer(e.to_string()))?;
    let id = |key: &str| -> Result<Option<u32>, ImportError> {
        match f.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(id) if (id as usize) < config.vocab_size => Ok(Some(id as u32)),
                _ => Err(ImportError::Config(format!(
                    "GGUF metadata '{key}' = {v:?} is not a token id below the vocabulary of {}",
                    config.vocab_size
                ))),
            },
        }
    };
    let mask = ["<|mask|>", "<|mdm_mask|>", "<mask>"]
        .iter()
        .find_map(|t| tok.token_to_id(t));
    let special = SpecialTokenIds {
        mask: if fam.prediction == crate::model::Prediction::InPlace {
            mask
        } else {
            None
        },
        eos: id("tokenizer.ggml.eos_token_id")?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
    };
    // AR models decode one token per pass; the diffusion families in blocks of 32.
    let block_size = if fam.prediction == crate::model::Prediction::NextToken {
        1
    } else {
        32
    };
    let decoding = DecodingDefaults {
        block_size,
        threshold: 0.9,
        steps: block_size,
        prediction: Some(fam.prediction),
        canvas: None,
    };
    let name = f.get("general.name").and_then(|v| v.as_str());
    Ok((
        fam,
        ImportMeta {
            config,
            special,
            tokenizer_json,
            chat_template: f
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            decoding,
            source: json!({ "model_type": fam.gguf, "format": "gguf", "name": name }),
        },
    ))
}

/// `edgediff convert model.gguf`: `dtype` forces one weight type; `None` keeps each matrix in the
/// type [`suggested`] for its GGUF type.
pub fn convert(
    path: &Path,
    out: &Path,
    dtype: Option<DType>,
    progress: Progress,
) -> Result<ConvertSummary, ImportError> {
    convert_with(path, out, dtype, &MetaOverrides::default(), progress)
}

/// [`convert`] with the mask id and block size replaced.
pub fn convert_with(
    path: &Path,
    out: &Path,
    dtype: Option<DType>,
    overrides: &MetaOverrides,
    progress: Progress,
) -> Result<ConvertSummary, ImportError> {
    let file = GgufFile::open(path)?;
    let (fam, mut meta) = read_meta(&file)?;
    meta.apply(overrides)?;
    let src = GgufSource::new(file, fam, &meta.config);
    let policy = match dtype {
        Some(d) => WeightPolicy::Fixed(d),
        None => WeightPolicy::Source(DType::Q8),
    };
    write_model_with(&src, &meta, out, policy, progress)
}

/// Whether `path` starts with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == crate::format::gguf::MAGIC
}
