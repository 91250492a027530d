//! The JSON header of a model file: metadata, tensor index, expert table and blobs.
//! docs/FORMAT.md is the normative description; these structs are its serde mirror.

use serde::{Deserialize, Serialize};

use super::DType;
use crate::arch::{ModelConfig, Prediction};

/// Bytes before the JSON header: magic (8), version (u32), flags (u32), header length (u64).
pub const PREAMBLE: usize = 24;
pub const MAGIC: &[u8; 8] = b"EDGEDIFF";
pub const VERSION: u32 = 1;
/// Alignment of the data section: 64 KiB, the coarsest mapping granularity of the targets
/// (Windows' allocation granularity), so a view can start at the data section on every platform.
pub const DATA_ALIGN: u64 = 64 * 1024;
/// Alignment of every expert's byte range: 16 KiB, the largest page size of the targets (Apple
/// arm64, Android 15+ with 16 KiB pages). The file is mapped whole, so an expert's alignment only
/// decides that faulting it in, advising it or dropping its pages touches no neighbour's page;
/// 64 KiB cost small-expert models up to half their expert bytes in padding (SmolLM2-MoE: 30 KiB
/// experts, 15.7 MiB of a 92.8 MiB file).
pub const EXPERT_ALIGN: u64 = 16 * 1024;
/// Alignment of dense tensors and blobs.
pub const TENSOR_ALIGN: u64 = 4096;
/// Largest header accepted: an index for thousands of experts is well under this.
pub const MAX_HEADER: u64 = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub metadata: Metadata,
    /// Dense tensors (everything but routed experts).
    pub tensors: Vec<TensorEntry>,
    /// One entry per MoE layer.
    #[serde(default)]
    pub experts: Vec<ExpertTable>,
    /// Opaque byte ranges (the tokenizer.json).
    #[serde(default)]
    pub blobs: Vec<BlobEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub config: ModelConfig,
    pub special_tokens: SpecialTokenIds,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub decoding: DecodingDefaults,
    /// Free-form provenance: converter version, source checkpoint, weight type.
    #[serde(default)]
    pub source: serde_json::Value,
    /// Present in a pruned model: experts kept per layer (see the residency docs).
    #[serde(default)]
    pub resident: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub mask: Option<u32>,
    pub eos: Option<u32>,
    pub bos: Option<u32>,
    pub pad: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DecodingDefaults {
    /// Tokens denoised together; 1 for a plain AR model.
    pub block_size: usize,
    /// Confidence threshold of the default commit policy.
    pub threshold: f32,
    /// Denoising steps per block for the fixed-steps policy.
    pub steps: usize,
    /// Which position a row of logits predicts; absent: the family's convention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
    /// The canvas sampler's settings of a canvas model (DiffusionGemma); absent: transformers'
    /// defaults ([`CanvasSampler::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canvas: Option<CanvasSampler>,
}

/// DiffusionGemma's sampler settings as its checkpoint's generation_config.json gives them
/// (`max_denoising_steps`, `sampler_config.entropy_bound`, `t_min`, `t_max`,
/// `stability_threshold`, `confidence_threshold`); [`Default`] is transformers'
/// (`_get_default_generation_params`, 5.17).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct CanvasSampler {
    /// Denoising steps per canvas at most.
    pub steps: usize,
    pub entropy_bound: f32,
    pub t_min: f32,
    pub t_max: f32,
    /// Steps the argmax canvas must repeat before a confident canvas stops.
    pub stability: usize,
    /// Mean entropy (nats) below which a stable canvas stops.
    pub confidence: f32,
}

impl Default for CanvasSampler {
    fn default() -> Self {
        CanvasSampler {
            steps: 48,
            entropy_bound: 0.1,
            t_min: 0.4,
            t_max: 0.8,
            stability: 1,
            confidence: 0.005,
        }
    }
}

impl DecodingDefaults {
    /// Draft length of the speculative decoder when a request names none: the model's block size
    /// (ZAYA1-8B-Diffusion-Preview drafts its 16-token blocks), or 16 for an AR model's blocks of 1.
    pub fn draft_len(&self) -> usize {
        if self.block_size > 1 {
            self.block_size
        } else {
            16
        }
    }
}

impl Default for DecodingDefaults {
    fn default() -> Self {
        DecodingDefaults {
            block_size: 32,
            threshold: 0.9,
            steps: 32,
            prediction: None,
            canvas: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    pub length: u64,
}

/// The routed experts of one layer. Every expert is one contiguous range of `length` bytes,
/// holding `parts` at their relative offsets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExpertTable {
    pub layer: usize,
    pub length: u64,
    pub parts: Vec<TensorEntry>,
    /// Data-section offset of expert `e`, or `null` for an expert pruned out of this file.
    pub offsets: Vec<Option<u64>>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlobEntry {
    pub name: String,
    pub offset: u64,
    pub length: u64,
}

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Where the data section starts for a header of `header_len` bytes.
pub fn data_start(header_len: u64) -> u64 {
    align_up(PREAMBLE as u64 + header_len, DATA_ALIGN)
}
