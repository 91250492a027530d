//! Hugging Face checkpoint → `*.edm`. Each family is one [`Family`] in its own file (a name
//! layout and a config function; `zaya.rs` also lists its own dense tensors, whose pieces the
//! shared layout cannot name), registered in [`FAMILIES`]; this module plans the file, then
//! streams tensors one at a time: q/k/v fused into one projection, gate/up fused per MLP, each
//! expert's matrices packed into one aligned range, weights encoded to the requested type (norms
//! and router stay f32).

mod family;
pub mod gguf;
mod hf;
pub mod source;

// The families: one module each, one line each in FAMILIES below.
mod dense;
mod diffusion_gemma;
mod llada2;
mod olmoe;
mod qwen3_moe;
mod zaya;
mod zaya_legacy;

/// Every Hugging Face family the converter reads. Adding a family:
/// 1. its architecture name in [`Architecture`] (arch/config.rs: the name files and `--arch` use,
///    [`Architecture::hf_name`], and its decoding convention in `Prediction::for_architecture`);
///    new math is new pieces of [`ModelConfig`] (an op with its CPU reference, WGSL kernel and
///    test), never a forked forward pass;
/// 2. `import/<family>.rs` exporting `pub const FAMILY: Family` — `model_type`s, the checkpoint
///    [`HfLayout`], the config.json → [`ModelConfig`] function, and only the hooks it needs
///    (own tensor plan, legacy-layout messages, default block size);
/// 3. `mod <family>;` above and one line here;
/// 4. for tests and fixtures, its config.json in `synth::SynthSpec::hf_config` and its name in
///    `synth --arch`; for GGUF files, a line in `gguf/config.rs`.
///
/// `tests/tests/it/parity.rs`, `bad_checkpoints.rs` and the suites over `Architecture::ALL` then
/// cover it; a committed fixture with transformers' logits comes from `tests/reference/`.
pub const FAMILIES: &[&Family] = &[
    &qwen3_moe::FAMILY,
    &olmoe::FAMILY,
    &llada2::FAMILY,
    &zaya::FAMILY,
    &diffusion_gemma::FAMILY,
    &dense::FAMILY,
];

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use family::{CheckpointTensor, Family, Role};
pub use hf::{HfConfig, HfLayout, QkvNames};
pub use source::{SafetensorsDir, TensorSource};

use crate::format::{
    dtype, DType, DecodingDefaults, EdmWriter, FormatError, LayoutBuilder, Metadata,
    SpecialTokenIds,
};
use crate::model::{names, Architecture, ModelConfig, Prediction, QkNorm};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "unsupported architecture '{0}' (supported: {supported})",
        supported = supported_model_types()
    )]
    UnsupportedArchitecture(String),
    #[error("unsupported checkpoint feature: {0}")]
    Unsupported(String),
    #[error("config.json: {0}")]
    Config(String),
    #[error("checkpoint {path}: {detail}")]
    Checkpoint { path: PathBuf, detail: String },
    #[error("tensor '{0}' is missing from the checkpoint")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("the checkpoint has tensors this converter does not know, e.g. '{0}' (refusing to drop weights silently)")]
    UnexpectedTensor(String),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("GGUF: {0}")]
    Gguf(crate::format::gguf::GgufError),
    #[error("convert option: {0}")]
    Option(String),
}

/// The family and architecture of a config.json `model_type` (None: no family reads it).
pub fn family_of_model_type(model_type: &str) -> Option<(&'static Family, Architecture)> {
    FAMILIES.iter().find_map(|f| {
        f.model_types
            .iter()
            .find(|(t, _)| *t == model_type)
            .map(|&(_, a)| (*f, a))
    })
}

/// The architecture a config.json `model_type` (or an `--arch` name) imports as.
pub fn architecture(model_type: &str) -> Option<Architecture> {
    family_of_model_type(model_type).map(|(_, a)| a)
}

/// The family that imports `arch`.
pub fn family(arch: Architecture) -> &'static Family {
    FAMILIES
        .iter()
        .find(|f| f.architectures().any(|a| a == arch))
        // Every architecture has a family: the registry test checks each one.
        .expect("every architecture is registered in import::FAMILIES")
}

/// Every `model_type` the converter reads, for error messages.
fn supported_model_types() -> String {
    let names: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().map(|(t, _)| *t))
        .collect();
    names.join(", ")
}

pub fn layout(arch: Architecture) -> &'static HfLayout {
    family(arch).layout
}

/// Parses a Hugging Face config.json into our config.
pub fn parse_config(json: &Value) -> Result<ModelConfig, ImportError> {
    let model_type = json
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| ImportError::Config("no model_type".into()))?;
    let (fam, arch) = family_of_model_type(model_type)
        .ok_or_else(|| ImportError::UnsupportedArchitecture(model_type.to_string()))?;
    let c = HfConfig {
        json,
        family: arch.hf_name(),
    };
    let config = (fam.config)(&c, arch)?;
    config
        .validate()
        .map_err(|e| ImportError::Config(e.to_string()))?;
    Ok(config)
}

/// Everything besides tensors that goes into the file.
pub struct ImportMeta {
    pub config: ModelConfig,
    pub special: SpecialTokenIds,
    pub tokenizer_json: Vec<u8>,
    pub chat_template: Option<String>,
    pub decoding: DecodingDefaults,
    pub source: Value,
}

/// Decoding facts a checkpoint may not carry, given to `convert` (`--mask-token-id`,
/// `--block-size`): ZAYA1-8B-Diffusion-Preview's mask id and block size are not published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaOverrides {
    pub mask_token_id: Option<u32>,
    pub block_size: Option<usize>,
}

impl ImportMeta {
    /// Replaces the mask id and block size read from the checkpoint; a mask id outside the
    /// vocabulary or a block of 0 is refused.
    pub fn apply(&mut self, o: &MetaOverrides) -> Result<(), ImportError> {
        if let Some(id) = o.mask_token_id {
            if id as usize >= self.config.vocab_size {
                return Err(ImportError::Option(format!(
                    "--mask-token-id {id} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            self.special.mask = Some(id);
        }
        if let Some(b) = o.block_size {
            if b == 0 {
                return Err(ImportError::Option(
                    "--block-size must be at least 1".into(),
                ));
            }
            // Steps per block follow the block unless the checkpoint set fewer.
            let d = &mut self.decoding;
            d.steps = if d.steps == d.block_size {
                b
            } else {
                d.steps.min(b)
            };
            d.block_size = b;
        }
        Ok(())
    }
}

/// Reads config.json, tokenizer.json and tokenizer_config.json of a checkpoint directory.
pub fn read_meta(dir: &Path) -> Result<ImportMeta, ImportError> {
    let cfg_path = dir.join("config.json");
    let json: Value = serde_json::from_str(&source::read_text(&cfg_path)?)
        .map_err(|e| ImportError::Config(format!("not valid JSON: {e}")))?;
    // Zyphra's original alternating layout: config.json is rewritten as transformers' converter
    // does; the tensors are renamed by `open_source`.
    let json = match legacy_zaya_layers(dir, &json) {
        Some(_) => zaya_legacy::merged_config(&json)?,
        None => json,
    };
    let config = parse_config(&json)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json = std::fs::read(&tok_path).map_err(|e| ImportError::Io {
        path: tok_path.clone(),
        source: e,
    })?;
    let tokenizer = crate::tokenizer::Tokenizer::from_json(&tokenizer_json)
        .map_err(|e| ImportError::Tokenizer(e.to_string()))?;
    let tok_cfg: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(t) => serde_json::from_str(&t)
            .map_err(|e| ImportError::Tokenizer(format!("tokenizer_config.json: {e}")))?,
        Err(_) => Value::Null,
    };
    let id_of = |field: &str, token_field: &str, candidates: &[&str]| -> Option<u32> {
        if let Some(id) = json.get(field).and_then(Value::as_u64) {
            // Saturate rather than truncate: 2^32 + 3 must fail the vocabulary check, not become 3.
            return Some(u32::try_from(id).unwrap_or(u32::MAX));
        }
        let named = tok_cfg.get(token_field).and_then(|v| {
            v.as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))
                .map(str::to_string)
        });
        named
            .iter()
            .map(String::as_str)
            .chain(candidates.iter().copied())
            .find_map(|t| tokenizer.token_to_id(t))
    };
    let special = SpecialTokenIds {
        mask: id_of(
            "mask_token_id",
            "mask_token",
            &["<|mask|>", "<|mdm_mask|>", "<mask>"],
        ),
        eos: id_of(
            "eos_token_id",
            "eos_token",
            &["<|eos|>", "<|endoftext|>", "</s>"],
        ),
        bos: id_of("bos_token_id", "bos_token", &["<|bos|>", "<s>"]),
        pad: id_of("pad_token_id", "pad_token", &["<|pad|>"]),
    };
    for (what, id) in [
        ("mask", special.mask),
        ("eos", special.eos),
        ("bos", special.bos),
        ("pad", special.pad),
    ] {
        if let Some(id) = id {
            if id as usize >= config.vocab_size {
                return Err(ImportError::Config(format!(
                    "{what} token id {id} is outside the vocabulary of {}",
                    config.vocab_size
                )));
            }
        }
    }
    // Without a block_size in config.json: the family's (ZAYA1's Diffusion-Preview decodes blocks
    // of 16), else the format's default.
    let mut decoding = DecodingDefaults::default();
    if let Some(b) = family(config.architecture).block_size {
        decoding.block_size = b;
    }
    if let Some(b) = json.get("block_size").and_then(Value::as_u64) {
        decoding.block_size = b.max(1) as usize;
    }
    if let Some(t) = json.get("threshold").and_then(Value::as_f64) {
        decoding.threshold = t as f32;
    }
    if let Some(p) = json.get("prediction") {
        let name = p.as_str().unwrap_or_default();
        decoding.prediction = Some(Prediction::from_name(name).ok_or_else(|| {
            ImportError::Config(format!(
                "config field `prediction` is {p}; expected \"in_place\", \"next_token\" or \"hybrid\""
            ))
        })?);
    }
    decoding.steps = json
        .get("denoising_steps")
        .and_then(Value::as_u64)
        .map_or(decoding.block_size, |s| s.max(1) as usize);
    if config.block.canvas.is_some() {
        decoding.canvas = Some(diffusion_gemma::sampler(dir)?);
    }
    Ok(ImportMeta {
        config,
        special,
        tokenizer_json,
        chat_template: tok_cfg
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        decoding,
        source: serde_json::json!({ "model_type": json.get("model_type") }),
    })
}

/// Progress callback: (done, total) in tensors.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// What the converter wrote.
#[derive(Debug)]
pub struct ConvertSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    pub experts: usize,
}

/// The weight type a matrix is stored in: the requested one, or f16 when a quantized type's group
/// of 32 does not divide the input dimension.
fn matrix_dtype(requested: DType, cols: usize) -> DType {
    if requested.is_quantized() && !cols.is_multiple_of(dtype::GROUP) {
        DType::F16
    } else {
        requested
    }
}

/// A dense tensor of the output as a family plans it: a matrix (stored in the weight type) or an
/// f32 tensor, built from one checkpoint tensor (reshaped if its element count matches) or from
/// several stacked as rows.
pub struct PlannedTensor {
    name: String,
    matrix: bool,
    shape: Vec<usize>,
    sources: Vec<String>,
    /// The exact checkpoint shape of a single source stored under another shape (same values in
    /// the same order, e.g. a conv kernel `[C, 1, 2]` as `[C, 2]`).
    from: Option<Vec<usize>>,
}

impl PlannedTensor {
    pub fn matrix<const N: usize>(
        name: impl Into<String>,
        shape: [usize; N],
        sources: &[&str],
    ) -> Self {
        Self::new(name, true, &shape, sources)
    }
    pub fn f32<const N: usize>(
        name: impl Into<String>,
        shape: [usize; N],
        sources: &[&str],
    ) -> Self {
        Self::new(name, false, &shape, sources)
    }
    fn new(name: impl Into<String>, matrix: bool, shape: &[usize], sources: &[&str]) -> Self {
        PlannedTensor {
            name: name.into(),
            matrix,
            shape: shape.to_vec(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            from: None,
        }
    }
    /// An f32 tensor whose one source has the checkpoint shape `from`.
    pub fn f32_reshaped<const N: usize>(
        name: impl Into<String>,
        shape: [usize; N],
        source: &str,
        from: &[usize],
    ) -> Self {
        PlannedTensor {
            from: Some(from.to_vec()),
            ..Self::new(name, false, &shape, &[source])
        }
    }
}

/// One tensor of the output and how to build it from the source.
enum Item {
    Dense {
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        build: Build,
    },
    Expert {
        layer: usize,
        expert: usize,
    },
}

enum Build {
    Copy(String),
    /// One source of exactly this shape, stored under the item's shape.
    Reshape(String, Vec<usize>),
    /// Rows of several source matrices stacked (q/k/v, gate/up).
    Stack(Vec<String>),
}

fn get_checked(
    src: &dyn TensorSource,
    name: &str,
    want: &[usize],
) -> Result<Vec<f32>, ImportError> {
    let (shape, values) = src.get(name)?;
    if shape != want {
        return Err(ImportError::Shape {
            name: name.to_string(),
            got: shape,
            want: want.to_vec(),
        });
    }
    Ok(values)
}

/// The bytes of a `[rows, cols]` matrix of type `dtype` stacked from the rows of `parts`: the
/// source's own encoding where it has one that is exact (GGUF Q8_0 → q8, Q4_0 → q4), else its f32
/// values encoded.
fn build_bytes(
    src: &dyn TensorSource,
    parts: &[String],
    dtype: DType,
    shape: &[usize],
) -> Result<Vec<u8>, ImportError> {
    if shape.len() != 2 {
        // Vectors (norms, biases): always converted from f32, never stacked.
        let values = get_checked(src, &parts[0], shape)?;
        return Ok(dtype::encode(dtype, &values, *shape.last().unwrap_or(&1)));
    }
    let cols = shape[1];
    let mut encoded = Vec::with_capacity(parts.len());
    for p in parts {
        match src.encoded(p, dtype)? {
            Some(e) => encoded.push(e),
            None => break,
        }
    }
    // A vector stacks as one row (ZAYA1's residual scales).
    let rows_of = |s: &[usize], p: &str| -> Result<usize, ImportError> {
        match s {
            [c] if *c == cols => Ok(1),
            [r, c] if *c == cols => Ok(*r),
            _ => Err(ImportError::Shape {
                name: p.to_string(),
                got: s.to_vec(),
                want: vec![0, cols],
            }),
        }
    };
    let mut total_rows = 0;
    if encoded.len() == parts.len() {
        let mut pieces = Vec::with_capacity(parts.len());
        for (p, (s, bytes)) in parts.iter().zip(encoded) {
            let rows = rows_of(&s, p)?;
            total_rows += rows;
            pieces.push((rows, bytes));
        }
        if total_rows == shape[0] {
            return Ok(dtype::stack_rows(dtype, &pieces, cols));
        }
    } else {
        let mut all = Vec::with_capacity(shape.iter().product());
        for p in parts {
            let (s, vals) = src.get(p)?;
            total_rows += rows_of(&s, p)?;
            all.extend(vals);
        }
        if total_rows == shape[0] {
            return Ok(dtype::encode(dtype, &all, cols));
        }
    }
    Err(ImportError::Shape {
        name: parts.join(" + "),
        got: vec![total_rows, cols],
        want: shape.to_vec(),
    })
}

/// A layer's fused expert tensors, read once for all its experts: `(layer, gate_up, down)`.
type FusedExperts = Option<(usize, Vec<f32>, Vec<f32>)>;

/// Builds one expert's (gate_up, down) from either per-expert or fused transformers-5 tensors.
fn expert_weights(
    src: &dyn TensorSource,
    lay: &HfLayout,
    c: &ModelConfig,
    (l, e): (usize, usize),
    fused: &FusedExperts,
) -> Result<(Vec<f32>, Vec<f32>), ImportError> {
    let (h, i) = (c.hidden_size, c.moe.expert_ffn);
    let per = |p: &str| lay.layer(l, &format!("{}.{e}.{p}.weight", lay.experts));
    if src.has(&per("gate_proj")) {
        let mut gu = get_checked(src, &per("gate_proj"), &[i, h])?;
        gu.extend(get_checked(src, &per("up_proj"), &[i, h])?);
        let down = get_checked(src, &per("down_proj"), &[h, i])?;
        return Ok((gu, down));
    }
    let Some((_, gu, down)) = fused.as_ref().filter(|f| f.0 == l) else {
        return Err(ImportError::MissingTensor(per("gate_proj")));
    };
    Ok((
        gu[e * 2 * i * h..(e + 1) * 2 * i * h].to_vec(),
        down[e * h * i..(e + 1) * h * i].to_vec(),
    ))
}

/// Loads layer `l`'s fused transformers-5 expert tensors into `fused` when the source stores its
/// experts that way (and they are not loaded yet): once per layer, before its experts are encoded.
fn load_fused_experts(
    src: &dyn TensorSource,
    lay: &HfLayout,
    c: &ModelConfig,
    l: usize,
    fused: &mut FusedExperts,
) -> Result<(), ImportError> {
    let (h, i, n) = (c.hidden_size, c.moe.expert_ffn, c.moe.num_experts);
    if src.has(&lay.layer(l, &format!("{}.0.gate_proj.weight", lay.experts)))
        || fused.as_ref().is_some_and(|f| f.0 == l)
    {
        return Ok(());
    }
    // transformers 5 keeps experts fused: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    let gu_name = lay.layer(l, &format!("{}.gate_up_proj", lay.experts));
    let down_name = lay.layer(l, &format!("{}.down_proj", lay.experts));
    if !src.has(&gu_name) {
        return Ok(()); // expert_weights names the missing per-expert tensor
    }
    *fused = None; // one layer's worth at a time
    let gu = get_checked(src, &gu_name, &[n, 2 * i, h])?;
    let down = get_checked(src, &down_name, &[n, h, i])?;
    *fused = Some((l, gu, down));
    Ok(())
}

/// Whether `rest` (a name after `…mlp.experts.`) is one of the expert tensors the converter reads.
fn is_expert_name(rest: &str, num_experts: usize) -> bool {
    if rest == "gate_up_proj" || rest == "down_proj" {
        return true;
    }
    let Some((e, proj)) = rest.split_once('.') else {
        return false;
    };
    e.parse::<usize>().is_ok_and(|e| e < num_experts)
        && matches!(
            proj,
            "gate_proj.weight" | "up_proj.weight" | "down_proj.weight"
        )
}

/// How the converter chooses each matrix's weight type (norms and routers are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightPolicy {
    /// Every matrix in this type (f16 where a quantized type's group does not divide the row).
    Fixed(DType),
    /// Each matrix in the type its source suggests ([`TensorSource::suggested_dtype`]; a stacked
    /// matrix takes the most precise of its parts'), else this fallback.
    Source(DType),
}

impl WeightPolicy {
    fn pick(self, src: &dyn TensorSource, build: &Build, cols: usize) -> DType {
        let wanted = match self {
            WeightPolicy::Fixed(d) => d,
            WeightPolicy::Source(fallback) => {
                let names: &[String] = match build {
                    Build::Copy(s) | Build::Reshape(s, _) => std::slice::from_ref(s),
                    Build::Stack(v) => v,
                };
                names
                    .iter()
                    .map(|n| src.suggested_dtype(n).unwrap_or(fallback))
                    .max_by_key(|d| precision_rank(*d))
                    .unwrap_or(fallback)
            }
        };
        matrix_dtype(wanted, cols)
    }

    /// The name written into the file's provenance.
    fn label(self) -> String {
        match self {
            WeightPolicy::Fixed(d) => d.name().into(),
            WeightPolicy::Source(_) => "from source".into(),
        }
    }
}

fn precision_rank(d: DType) -> u8 {
    match d {
        DType::Q4 => 0,
        DType::Q8 => 1,
        DType::F16 => 2,
        DType::F32 | DType::U8 => 3,
    }
}

/// Converts the tensors of `src` (named as `meta.config`'s family names them) into a model file.
pub fn write_model(
    src: &dyn TensorSource,
    meta: &ImportMeta,
    out: &Path,
    wtype: DType,
    progress: Progress,
) -> Result<ConvertSummary, ImportError> {
    write_model_with(src, meta, out, WeightPolicy::Fixed(wtype), progress)
}

/// [`write_model`] with a per-matrix weight type choice.
pub fn write_model_with(
    src: &dyn TensorSource,
    meta: &ImportMeta,
    out: &Path,
    policy: WeightPolicy,
    progress: Progress,
) -> Result<ConvertSummary, ImportError> {
    let c = &meta.config;
    let fam = family(c.architecture);
    let lay = fam.layout;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut items: Vec<Item> = Vec::new();
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut dense = |name: String, dtype: DType, shape: Vec<usize>, build: Build| {
        match &build {
            Build::Copy(s) | Build::Reshape(s, _) => {
                used.insert(s.clone());
            }
            Build::Stack(v) => used.extend(v.iter().cloned()),
        }
        items.push(Item::Dense {
            name,
            dtype,
            shape,
            build,
        });
    };
    let mat =
        |rows: usize, cols: usize, build: &Build| (policy.pick(src, build, cols), vec![rows, cols]);
    let mut experts_of = Vec::new();
    if let Some(plan) = fam.plan {
        for t in plan(c) {
            let build = match (t.sources.len(), t.from) {
                (1, Some(from)) => Build::Reshape(t.sources[0].clone(), from),
                (1, None) => Build::Copy(t.sources[0].clone()),
                _ => Build::Stack(t.sources),
            };
            let dt = if t.matrix {
                policy.pick(src, &build, *t.shape.last().unwrap_or(&1))
            } else {
                DType::F32
            };
            dense(t.name, dt, t.shape, build);
        }
        experts_of.extend((0..c.num_layers).filter(|&l| c.is_moe_layer(l)));
    } else {
        let embed = Build::Copy(lay.embed.into());
        let (dt, sh) = mat(v, h, &embed);
        dense(names::EMBED.into(), dt, sh, embed);
        for l in 0..c.num_layers {
            let n = |s: &str| names::layer(l, s);
            let hf = |s: &str| lay.layer(l, s);
            dense(
                n(names::ATTN_NORM),
                DType::F32,
                vec![h],
                Build::Copy(hf(lay.attn_norm)),
            );
            let qkv = match lay.qkv {
                QkvNames::Separate { q, k, v } => Build::Stack(vec![hf(q), hf(k), hf(v)]),
                QkvNames::Fused(f) => Build::Copy(hf(f)),
            };
            let (dt, sh) = mat(c.qkv_dim(), h, &qkv);
            dense(n(names::QKV), dt, sh, qkv);
            let norm_len = match c.qk_norm {
                QkNorm::None => None,
                QkNorm::PerHead => Some((c.head_dim, c.head_dim)),
                QkNorm::Whole => Some((c.q_dim(), c.kv_dim())),
            };
            if let Some((qn, kn)) = norm_len {
                dense(
                    n(names::Q_NORM),
                    DType::F32,
                    vec![qn],
                    Build::Copy(hf(lay.q_norm)),
                );
                dense(
                    n(names::K_NORM),
                    DType::F32,
                    vec![kn],
                    Build::Copy(hf(lay.k_norm)),
                );
            }
            let o = Build::Copy(hf(lay.o));
            let (dt, sh) = mat(h, c.q_dim(), &o);
            dense(n(names::O), dt, sh, o);
            dense(
                n(names::FFN_NORM),
                DType::F32,
                vec![h],
                Build::Copy(hf(lay.ffn_norm)),
            );
            let mut mlp = |gu: &str, down: &str, prefix: &str, inter: usize| {
                let p = |s: &str| hf(&format!("{prefix}.{s}.weight"));
                let gate_up = Build::Stack(vec![p("gate_proj"), p("up_proj")]);
                let (dt, sh) = mat(2 * inter, h, &gate_up);
                dense(n(gu), dt, sh, gate_up);
                let down_build = Build::Copy(p("down_proj"));
                let (dt, sh) = mat(h, inter, &down_build);
                dense(n(down), dt, sh, down_build);
            };
            if c.is_moe_layer(l) {
                if let Some(shared) = lay.shared.filter(|_| c.moe.shared_ffn > 0) {
                    mlp(
                        names::SHARED_GATE_UP,
                        names::SHARED_DOWN,
                        shared,
                        c.moe.shared_ffn,
                    );
                }
                let e_count = c.moe.num_experts;
                dense(
                    n(names::ROUTER),
                    DType::F32,
                    vec![e_count, h],
                    Build::Copy(hf(lay.router)),
                );
                if let (true, Some(b)) = (c.moe.router_bias, lay.router_bias) {
                    dense(
                        n(names::ROUTER_BIAS),
                        DType::F32,
                        vec![e_count],
                        Build::Copy(hf(b)),
                    );
                }
                experts_of.push(l);
            } else {
                mlp(
                    names::MLP_GATE_UP,
                    names::MLP_DOWN,
                    lay.dense_mlp,
                    c.dense_ffn,
                );
            }
        }
        dense(
            names::FINAL_NORM.into(),
            DType::F32,
            vec![h],
            Build::Copy(lay.final_norm.into()),
        );
        if !c.tie_embeddings {
            let head = Build::Copy(lay.lm_head.into());
            let (dt, sh) = mat(v, h, &head);
            dense(names::LM_HEAD.into(), dt, sh, head);
        }
    }
    // Refuse checkpoints carrying weights we would silently drop.
    let expert_prefixes: Vec<String> = experts_of
        .iter()
        .map(|&l| lay.layer(l, &format!("{}.", lay.experts)))
        .collect();
    let mut unknown: Vec<String> = src
        .names()
        .into_iter()
        .filter(|n| !used.contains(n))
        .filter(|n| {
            !expert_prefixes.iter().any(|p| {
                n.strip_prefix(p.as_str())
                    .is_some_and(|rest| is_expert_name(rest, c.moe.num_experts))
            })
        })
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !fam.ignored.is_some_and(|ignored| ignored(n)))
        .filter(|n| !(c.tie_embeddings && n == lay.lm_head))
        .collect();
    unknown.sort();
    if let Some(first) = unknown.first() {
        if let Some(why) = fam.explain_unexpected.and_then(|explain| explain(first)) {
            return Err(ImportError::Unsupported(why));
        }
        return Err(ImportError::UnexpectedTensor(first.clone()));
    }

    let mut meta_out = Metadata {
        config: c.clone(),
        special_tokens: meta.special,
        chat_template: meta.chat_template.clone(),
        decoding: meta.decoding.clone(),
        source: meta.source.clone(),
        resident: None,
    };
    if let Value::Object(m) = &mut meta_out.source {
        m.insert("weight_type".into(), Value::from(policy.label()));
        m.insert(
            "converter".into(),
            Value::from(concat!("edgediff ", env!("CARGO_PKG_VERSION"))),
        );
    }
    let mut plan = LayoutBuilder::new(meta_out);
    for it in &items {
        if let Item::Dense {
            name, dtype, shape, ..
        } = it
        {
            plan.tensor(name, *dtype, shape)?;
        }
    }
    let (i, e_count) = (c.moe.expert_ffn, c.moe.num_experts);
    // Every expert of a layer shares one part layout; its types follow expert 0's sources.
    let expert_dtypes = |l: usize| {
        let per = |p: &str| lay.layer(l, &format!("{}.0.{p}.weight", lay.experts));
        (
            policy.pick(
                src,
                &Build::Stack(vec![per("gate_proj"), per("up_proj")]),
                h,
            ),
            policy.pick(src, &Build::Copy(per("down_proj")), i),
        )
    };
    for &l in &experts_of {
        let (gu_dt, down_dt) = expert_dtypes(l);
        plan.experts(
            l,
            e_count,
            &[
                (names::EXPERT_GATE_UP, gu_dt, vec![2 * i, h]),
                (names::EXPERT_DOWN, down_dt, vec![h, i]),
            ],
        )?;
        for e in 0..e_count {
            items.push(Item::Expert {
                layer: l,
                expert: e,
            });
        }
    }
    plan.blob("tokenizer.json", meta.tokenizer_json.len() as u64);
    let mut w = EdmWriter::create(out, plan.finish())?;
    let total = items.len() as u64;
    let mut expert_count = 0;
    let mut fused: FusedExperts = None;
    let encode = |it: &Item, fused: &FusedExperts| -> Result<Vec<Vec<u8>>, ImportError> {
        Ok(match it {
            Item::Dense {
                dtype,
                shape,
                build,
                ..
            } => vec![match build {
                Build::Copy(s) => build_bytes(src, std::slice::from_ref(s), *dtype, shape)?,
                Build::Stack(parts) => build_bytes(src, parts, *dtype, shape)?,
                Build::Reshape(s, from) => {
                    let values = get_checked(src, s, from)?;
                    dtype::encode(*dtype, &values, *shape.last().unwrap_or(&1))
                }
            }],
            Item::Expert { layer, expert } => {
                let (l, e) = (*layer, *expert);
                let (gu_dt, down_dt) = expert_dtypes(l);
                let per = |p: &str| lay.layer(l, &format!("{}.{e}.{p}.weight", lay.experts));
                if src.has(&per("gate_proj")) {
                    vec![
                        build_bytes(src, &[per("gate_proj"), per("up_proj")], gu_dt, &[2 * i, h])?,
                        build_bytes(src, &[per("down_proj")], down_dt, &[h, i])?,
                    ]
                } else {
                    let (gu, down) = expert_weights(src, lay, c, (l, e), fused)?;
                    vec![
                        dtype::encode(gu_dt, &gu, h),
                        dtype::encode(down_dt, &down, i),
                    ]
                }
            }
        })
    };
    // Reading, dequantizing and encoding dominate (a 16 B-parameter synth took minutes on one
    // core), so a window of items is encoded on several threads and written in order. The window
    // holds one layer's experts at most, so a fused layer is loaded once and shared read-only.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let mut start = 0;
    while start < items.len() {
        let layer_of = |it: &Item| match it {
            Item::Expert { layer, .. } => Some(*layer),
            Item::Dense { .. } => None,
        };
        let mut window_layer = layer_of(&items[start]);
        let mut end = start + 1;
        while end < items.len() && end - start < 2 * workers {
            match (layer_of(&items[end]), window_layer) {
                (Some(l), Some(f)) if l != f => break,
                (Some(l), None) => window_layer = Some(l),
                _ => {}
            }
            end += 1;
        }
        let window = &items[start..end];
        if let Some(l) = window_layer {
            load_fused_experts(src, lay, c, l, &mut fused)?;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut encoded: Vec<Option<Result<Vec<Vec<u8>>, ImportError>>> =
            (0..window.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers.min(window.len()))
                .map(|_| {
                    let (next, fused, encode) = (&next, &fused, &encode);
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(it) = window.get(k) else { break };
                            out.push((k, encode(it, fused)));
                        }
                        out
                    })
                })
                .collect();
            for hnd in handles {
                // A worker only panics on a bug; carry it to this thread unchanged.
                for (k, r) in hnd.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                    encoded[k] = Some(r);
                }
            }
        });
        for (k, (it, bytes)) in window.iter().zip(encoded).enumerate() {
            let bytes = bytes.expect("every window item is encoded by a worker")?;
            match it {
                Item::Dense { name, .. } => w.write_tensor(name, &bytes[0])?,
                Item::Expert { layer, expert } => {
                    w.write_expert_part(*layer, *expert, names::EXPERT_GATE_UP, &bytes[0])?;
                    w.write_expert_part(*layer, *expert, names::EXPERT_DOWN, &bytes[1])?;
                    expert_count += 1;
                }
            }
            progress((start + k) as u64 + 1, total);
        }
        start = end;
    }
    w.write_blob("tokenizer.json", &meta.tokenizer_json)?;
    let tensors = w.header().tensors.len();
    let path = w.finish()?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok(ConvertSummary {
        path,
        bytes,
        tensors,
        experts: expert_count,
    })
}

/// `edgediff convert`: a Hugging Face checkpoint directory to a model file.
pub fn convert(
    dir: &Path,
    out: &Path,
    wtype: DType,
    progress: Progress,
) -> Result<ConvertSummary, ImportError> {
    convert_with(dir, out, wtype, &MetaOverrides::default(), progress)
}

/// [`convert`] with the mask id and block size replaced.
pub fn convert_with(
    dir: &Path,
    out: &Path,
    wtype: DType,
    overrides: &MetaOverrides,
    progress: Progress,
) -> Result<ConvertSummary, ImportError> {
    let mut meta = read_meta(dir)?;
    meta.apply(overrides)?;
    let src = open_source(dir)?;
    write_model(src.as_ref(), &meta, out, wtype, progress)
}

/// The alternating layer count of a `zaya` checkpoint in the legacy layout (`None`: not one).
fn legacy_zaya_layers(dir: &Path, config: &Value) -> Option<usize> {
    if config.get("model_type").and_then(Value::as_str) != Some("zaya") {
        return None;
    }
    // An unreadable checkpoint is reported by the reader that needs it, not here.
    let src = SafetensorsDir::open(dir).ok()?;
    let names = src.names();
    zaya_legacy::is_legacy(names.iter().map(String::as_str))
        .then(|| config.get("num_hidden_layers")?.as_u64())
        .flatten()
        .map(|n| n as usize)
}

/// A checkpoint directory's tensors under the names its family plans (a legacy ZAYA1 checkpoint
/// seen through the merged layout's names).
fn open_source(dir: &Path) -> Result<Box<dyn TensorSource>, ImportError> {
    let src = SafetensorsDir::open(dir)?;
    let cfg_path = dir.join("config.json");
    let json: Value = serde_json::from_str(&source::read_text(&cfg_path)?)
        .map_err(|e| ImportError::Config(format!("not valid JSON: {e}")))?;
    Ok(match legacy_zaya_layers(dir, &json) {
        Some(old_layers) => Box::new(zaya_legacy::LegacySource::new(src, old_layers)?),
        None => Box::new(src),
    })
}
