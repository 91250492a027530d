//! Bad model files are a test subject: every way a `*.edm` can be malformed yields a typed error
//! from `EdmFile::open` (or from `Model::load` / decoding, where the problem only shows there),
//! never a panic or an out-of-bounds read.
//!
//! Each test starts from a valid tiny model written by `synth`, breaks one thing and names the
//! error it expects. Header edits go through [`Edm`], which re-places the data section after the
//! rewritten JSON, so an edit changes only what the test means to change.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use edgediff::backend::cpu::CpuBackend;
use edgediff::format::dtype::DecodeError;
use edgediff::format::header::{data_start, EXPERT_ALIGN, MAX_HEADER, PREAMBLE, TENSOR_ALIGN};
use edgediff::format::{DType, EdmFile, FormatError};
use edgediff::model::{Architecture, Model, ModelError};
use edgediff::synth::{self, SynthSpec};
use serde_json::{json, Value};
use tempfile::TempDir;

/// The bytes of a valid tiny Qwen3-MoE model (2 MoE layers of 8 experts, hidden 64), built once per
/// test binary and per weight type.
fn valid_model(dtype: DType) -> Vec<u8> {
    static F32: OnceLock<Vec<u8>> = OnceLock::new();
    static Q8: OnceLock<Vec<u8>> = OnceLock::new();
    static Q4: OnceLock<Vec<u8>> = OnceLock::new();
    let cell = match dtype {
        DType::Q8 => &Q8,
        DType::Q4 => &Q4,
        _ => &F32,
    };
    cell.get_or_init(|| {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("tiny.edm");
        let model = synth::build(&SynthSpec::tiny(Architecture::Qwen3Moe)).unwrap();
        synth::write_edm(&model, &path, dtype, &|_, _| {}).unwrap();
        std::fs::read(&path).unwrap()
    })
    .clone()
}

/// A model file taken apart: preamble fields, the header as JSON, and the data section.
struct Edm {
    version: u32,
    flags: u32,
    header: Value,
    data: Vec<u8>,
}

impl Edm {
    fn parse(bytes: &[u8]) -> Edm {
        let header_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let json = &bytes[PREAMBLE..PREAMBLE + header_len as usize];
        Edm {
            version: u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(bytes[12..16].try_into().unwrap()),
            header: serde_json::from_slice(json).unwrap(),
            data: bytes[data_start(header_len) as usize..].to_vec(),
        }
    }

    fn valid(dtype: DType) -> Edm {
        Edm::parse(&valid_model(dtype))
    }

    /// Writes the header as given (possibly not JSON at all) and the data section after it, at the
    /// data start the header's length implies.
    fn assemble(&self, json: &[u8]) -> Vec<u8> {
        let start = data_start(json.len() as u64) as usize;
        let mut out = Vec::with_capacity(start + self.data.len());
        out.extend_from_slice(b"EDGEDIFF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(json);
        out.resize(start, 0);
        out.extend_from_slice(&self.data);
        out
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.assemble(&serde_json::to_vec(&self.header).unwrap())
    }

    fn config(&mut self) -> &mut Value {
        &mut self.header["metadata"]["config"]
    }

    fn tensor(&mut self, name: &str) -> &mut Value {
        self.header["tensors"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("the fixture has no tensor {name}"))
    }

    /// The expert table of `layer`.
    fn experts(&mut self, layer: usize) -> &mut Value {
        self.header["experts"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|t| t["layer"] == layer)
            .unwrap()
    }

    /// Data-section byte range of a dense tensor.
    fn range(&mut self, name: &str) -> std::ops::Range<usize> {
        let t = self.tensor(name);
        let (off, len) = (t["offset"].as_u64().unwrap(), t["length"].as_u64().unwrap());
        off as usize..(off + len) as usize
    }
}

/// A model file on disk, alive as long as its directory.
struct OnDisk {
    _dir: TempDir,
    path: PathBuf,
}

fn write(bytes: &[u8]) -> OnDisk {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("model.edm");
    std::fs::write(&path, bytes).unwrap();
    OnDisk { _dir: dir, path }
}

fn open(bytes: &[u8]) -> Result<EdmFile, FormatError> {
    EdmFile::open(&write(bytes).path)
}

fn open_err(bytes: &[u8]) -> FormatError {
    match open(bytes) {
        Ok(_) => panic!("a broken model file opened"),
        Err(e) => e,
    }
}

/// Opens (which must succeed: the damage is only visible to the model) and loads on the CPU.
fn load_err(bytes: &[u8]) -> ModelError {
    let file = open(bytes).expect("the index is consistent, so the file opens");
    match Model::load(&CpuBackend, Arc::new(file), &|_, _| true) {
        Ok(_) => panic!("a broken model loaded"),
        Err(e) => e,
    }
}

fn config_err(edit: impl FnOnce(&mut Value)) -> String {
    let mut m = Edm::valid(DType::F32);
    edit(m.config());
    match open_err(&m.to_bytes()) {
        FormatError::Config(e) => e.to_string(),
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// An f16 quiet NaN, little-endian.
const F16_NAN: [u8; 2] = 0x7e00u16.to_le_bytes();

// --- the fixture itself -------------------------------------------------------------------------

#[test]
fn the_untouched_model_opens_and_loads_also_when_reassembled() {
    for dtype in [DType::F32, DType::Q8, DType::Q4] {
        let original = valid_model(dtype);
        let parsed = Edm::parse(&original);
        // The JSON keys may come back in another order; the content may not change.
        let again = Edm::parse(&parsed.to_bytes());
        assert!(again.header == parsed.header && again.data == parsed.data);
        for bytes in [original, parsed.to_bytes()] {
            let file = open(&bytes).unwrap();
            assert!(file.blob("tokenizer.json").is_ok());
            Model::load(&CpuBackend, Arc::new(file), &|_, _| true).unwrap();
        }
    }
}

// --- preamble -----------------------------------------------------------------------------------

#[test]
fn bad_magic_is_an_error() {
    let mut bytes = valid_model(DType::F32);
    bytes[..8].copy_from_slice(b"GGUF\0\0\0\0");
    assert!(matches!(open_err(&bytes), FormatError::BadMagic));
}

#[test]
fn version_from_the_future_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.version = 2;
    assert!(matches!(
        open_err(&m.to_bytes()),
        FormatError::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    ));
}

#[test]
fn empty_file_is_a_truncated_preamble() {
    for len in [0, 8, PREAMBLE - 1] {
        let bytes = valid_model(DType::F32);
        let err = open_err(&bytes[..len]);
        assert!(
            matches!(&err, FormatError::Truncated { what, need: 24, have } if what == "preamble" && *have == len as u64),
            "{len}: {err:?}"
        );
    }
}

#[test]
fn truncated_header_is_an_error() {
    let bytes = valid_model(DType::F32);
    let header_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let cut = PREAMBLE + header_len as usize / 2;
    let err = open_err(&bytes[..cut]);
    assert!(
        matches!(&err, FormatError::Truncated { what, need, have }
            if what == "header" && *need == PREAMBLE as u64 + header_len && *have == cut as u64),
        "{err:?}"
    );
}

#[test]
fn huge_header_length_is_refused_before_reading() {
    for header_len in [MAX_HEADER + 1, u64::MAX] {
        let mut bytes = valid_model(DType::F32);
        bytes[16..24].copy_from_slice(&header_len.to_le_bytes());
        assert!(
            matches!(open_err(&bytes), FormatError::HeaderTooLarge(n) if n == header_len),
            "{header_len}"
        );
    }
}

#[test]
fn header_length_past_the_end_of_the_file_is_a_truncated_header() {
    let mut bytes = valid_model(DType::F32);
    bytes[16..24].copy_from_slice(&MAX_HEADER.to_le_bytes());
    let err = open_err(&bytes);
    assert!(
        matches!(&err, FormatError::Truncated { what, .. } if what == "header"),
        "{err:?}"
    );
}

// --- data section -------------------------------------------------------------------------------

#[test]
fn file_cut_before_the_data_section_is_an_error() {
    let bytes = valid_model(DType::F32);
    let header_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let cut = PREAMBLE + header_len as usize + 10;
    let err = open_err(&bytes[..cut]);
    assert!(
        matches!(&err, FormatError::Truncated { what, .. } if what == "data section"),
        "{err:?}"
    );
}

#[test]
fn file_cut_in_the_middle_of_tensor_data_is_out_of_bounds() {
    let mut m = Edm::valid(DType::F32);
    let embed = m.range("embed");
    let bytes = m.to_bytes();
    let start = bytes.len() - m.data.len();
    let cut = start + (embed.start + embed.end) / 2;
    let err = open_err(&bytes[..cut]);
    assert!(
        matches!(&err, FormatError::OutOfBounds { name, end, limit }
            if name == "embed" && *end == embed.end as u64 && *limit == (cut - start) as u64),
        "{err:?}"
    );
}

#[test]
fn file_cut_in_the_middle_of_an_expert_is_out_of_bounds() {
    let mut m = Edm::valid(DType::F32);
    // Without the tokenizer blob, the last expert of the last layer is the end of the file.
    m.header["blobs"] = json!([]);
    let last = m.experts(1)["offsets"][7].as_u64().unwrap();
    let bytes = m.to_bytes();
    let start = bytes.len() - m.data.len();
    let err = open_err(&bytes[..start + last as usize + 100]);
    assert!(
        matches!(&err, FormatError::OutOfBounds { name, limit, .. }
            if name == "layer 1 expert 7" && *limit == last + 100),
        "{err:?}"
    );
}

// --- header JSON --------------------------------------------------------------------------------

#[test]
fn header_that_is_not_json_is_an_error() {
    let m = Edm::valid(DType::F32);
    for json in [
        &b"not json at all"[..],
        b"",
        b"[1, 2, 3]",
        b"{\"metadata\": ",
        b"\xff\xfe\x00{}",
    ] {
        let err = open_err(&m.assemble(json));
        assert!(
            matches!(err, FormatError::HeaderJson(_)),
            "{:?}: {err:?}",
            String::from_utf8_lossy(json)
        );
    }
}

#[test]
fn header_with_trailing_garbage_is_an_error() {
    let m = Edm::valid(DType::F32);
    let mut json = serde_json::to_vec(&m.header).unwrap();
    json.extend_from_slice(b"}garbage");
    assert!(matches!(
        open_err(&m.assemble(&json)),
        FormatError::HeaderJson(_)
    ));
}

#[test]
fn header_with_wrong_json_types_is_an_error() {
    type Edit = fn(&mut Edm);
    let cases: [(&str, Edit); 8] = [
        ("offset as a string", |m| {
            m.tensor("embed")["offset"] = json!("0")
        }),
        ("negative shape", |m| {
            m.tensor("embed")["shape"] = json!([-1, 64])
        }),
        ("fractional length", |m| {
            m.tensor("embed")["length"] = json!(1.5)
        }),
        ("unknown dtype", |m| {
            m.tensor("embed")["dtype"] = json!("q3")
        }),
        ("tensors not a list", |m| m.header["tensors"] = json!({})),
        ("num_heads a string", |m| {
            m.config()["num_heads"] = json!("4")
        }),
        ("unknown architecture", |m| {
            m.config()["architecture"] = json!("gpt_neox")
        }),
        ("unknown field in a tensor entry", |m| {
            m.tensor("embed")["stride"] = json!(1)
        }),
    ];
    for (what, edit) in cases {
        let mut m = Edm::valid(DType::F32);
        edit(&mut m);
        let err = open_err(&m.to_bytes());
        assert!(matches!(err, FormatError::HeaderJson(_)), "{what}: {err:?}");
    }
}

#[test]
fn header_missing_a_required_field_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.header["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("config");
    assert!(matches!(
        open_err(&m.to_bytes()),
        FormatError::HeaderJson(_)
    ));
}

// --- tensor index -------------------------------------------------------------------------------

#[test]
fn tensor_offset_past_the_end_is_out_of_bounds() {
    let mut m = Edm::valid(DType::F32);
    let past = (m.data.len() as u64).next_multiple_of(TENSOR_ALIGN);
    m.tensor("final_norm")["offset"] = json!(past);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::OutOfBounds { name, .. } if name == "final_norm"),
        "{err:?}"
    );
}

#[test]
fn offset_plus_length_overflowing_u64_is_out_of_bounds() {
    let mut m = Edm::valid(DType::F32);
    // Aligned, and 4096 bytes short of the end of the u64 range: the 128 KiB "embed" wraps.
    m.tensor("embed")["offset"] = json!(u64::MAX - (TENSOR_ALIGN - 1));
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::OutOfBounds { name, end: u64::MAX, .. } if name == "embed"),
        "{err:?}"
    );
}

#[test]
fn blob_past_the_end_or_overflowing_is_out_of_bounds() {
    for offset in [
        (valid_model(DType::F32).len() as u64).next_multiple_of(TENSOR_ALIGN),
        u64::MAX - (TENSOR_ALIGN - 1),
    ] {
        let mut m = Edm::valid(DType::F32);
        m.header["blobs"][0]["offset"] = json!(offset);
        let err = open_err(&m.to_bytes());
        assert!(
            matches!(&err, FormatError::OutOfBounds { name, .. } if name == "tokenizer.json"),
            "{offset}: {err:?}"
        );
    }
}

#[test]
fn overlapping_tensors_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    let embed = m.range("embed").start;
    m.tensor("final_norm")["offset"] = json!(embed);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Overlap { a, b }
            if [a.as_str(), b.as_str()].contains(&"embed") && [a.as_str(), b.as_str()].contains(&"final_norm")),
        "{err:?}"
    );
}

#[test]
fn misaligned_dense_tensor_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    let off = m.range("final_norm").start as u64;
    m.tensor("final_norm")["offset"] = json!(off + 4);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Misaligned { name, offset, align: TENSOR_ALIGN }
            if name == "final_norm" && *offset == off + 4),
        "{err:?}"
    );
}

#[test]
fn shape_whose_byte_size_overflows_is_an_error() {
    for shape in [
        json!([1u64 << 62, 8]),
        json!([1u64 << 31, 1u64 << 31]),
        json!([usize::MAX]),
    ] {
        let mut m = Edm::valid(DType::F32);
        m.tensor("embed")["shape"] = shape.clone();
        let err = open_err(&m.to_bytes());
        assert!(
            matches!(&err, FormatError::BadShape { name, dtype: DType::F32, .. } if name == "embed"),
            "{shape}: {err:?}"
        );
    }
}

#[test]
fn index_length_that_lies_about_dtype_and_shape_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    let real = m.range("final_norm").len() as u64;
    for stated in [real + 4, real - 4, 0] {
        m.tensor("final_norm")["length"] = json!(stated);
        let err = open_err(&m.to_bytes());
        assert!(
            matches!(&err, FormatError::LengthMismatch { name, expected, stated: s }
                if name == "final_norm" && *expected == real && *s == stated),
            "{stated}: {err:?}"
        );
    }
}

#[test]
fn quantized_tensor_with_input_dim_not_a_multiple_of_32_is_an_error() {
    let mut m = Edm::valid(DType::Q8);
    let t = m.tensor("layers.0.attn.o");
    assert_eq!(t["dtype"], "q8");
    // Same element count, but rows of 16 cannot be grouped by 32.
    t["shape"] = json!([256, 16]);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::BadShape { name, dtype: DType::Q8, shape } if name == "layers.0.attn.o" && shape == &[256, 16]),
        "{err:?}"
    );
}

#[test]
fn tensors_of_unsupported_rank_or_blob_type_are_an_error() {
    let cases: [(&str, &str, Value); 4] = [
        ("scalar", "shape", json!([])),
        ("rank 3", "shape", json!([8, 8, 64])),
        ("quantized vector", "shape", json!([4096])),
        ("blob type", "dtype", json!("u8")),
    ];
    for (what, field, value) in cases {
        let mut m = Edm::valid(DType::Q8);
        m.tensor("layers.0.attn.o")[field] = value;
        let err = open_err(&m.to_bytes());
        assert!(matches!(err, FormatError::Invalid(_)), "{what}: {err:?}");
    }
}

#[test]
fn duplicate_tensor_names_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    let copy = m.tensor("final_norm").clone();
    m.header["tensors"].as_array_mut().unwrap().push(copy);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::DuplicateName(n) if n == "final_norm"),
        "{err:?}"
    );
}

#[test]
fn duplicate_blob_names_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    // A second, non-overlapping zero-length "tokenizer.json": only the name is wrong.
    let end = m.data.len() as u64;
    let mut copy = m.header["blobs"][0].clone();
    copy["offset"] = json!(end.next_multiple_of(TENSOR_ALIGN) - TENSOR_ALIGN);
    copy["length"] = json!(0);
    m.header["blobs"].as_array_mut().unwrap().insert(0, copy);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::DuplicateName(n) if n == "blob tokenizer.json"),
        "{err:?}"
    );
}

#[test]
fn nan_scale_in_a_quantized_tensor_is_a_decode_error() {
    for dtype in [DType::Q8, DType::Q4] {
        let mut m = Edm::valid(dtype);
        let name = "layers.0.attn.o";
        let r = m.range(name);
        // [64, 64]: the codes, then one f16 scale per group of 32.
        let codes = if dtype == DType::Q8 {
            64 * 64
        } else {
            64 * 64 / 2
        };
        let scale = r.start + codes + 2 * 5;
        m.data[scale..scale + 2].copy_from_slice(&F16_NAN);
        let bytes = m.to_bytes();

        let file = open(&bytes).unwrap();
        let err = file.tensor(name).unwrap().to_f32().unwrap_err();
        assert!(
            matches!(&err, FormatError::Decode { name: n, source: DecodeError::BadScale { index: 5, .. } } if n == name),
            "{dtype}: {err:?}"
        );
        let err = load_err(&bytes);
        assert!(
            matches!(&err, ModelError::Backend(edgediff::backend::BackendError::Format(FormatError::Decode { name: n, .. })) if n == name),
            "{dtype}: {err:?}"
        );
    }
}

#[test]
fn nan_in_an_f32_tensor_is_a_decode_error() {
    let mut m = Edm::valid(DType::F32);
    let r = m.range("final_norm");
    m.data[r.start + 12..r.start + 16].copy_from_slice(&f32::NAN.to_le_bytes());
    let bytes = m.to_bytes();
    let file = open(&bytes).unwrap();
    let err = file.tensor("final_norm").unwrap().to_f32().unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::Decode {
                source: DecodeError::NotFinite { index: 3, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        load_err(&bytes),
        ModelError::Backend(edgediff::backend::BackendError::Format(
            FormatError::Decode { .. }
        ))
    ));
}

#[test]
fn infinite_expert_weight_is_a_decode_error_at_load() {
    let mut m = Edm::valid(DType::F32);
    let base = m.experts(1)["offsets"][3].as_u64().unwrap() as usize;
    m.data[base..base + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let err = load_err(&m.to_bytes());
    assert!(
        matches!(
            err,
            ModelError::Backend(edgediff::backend::BackendError::Format(
                FormatError::Decode { .. }
            ))
        ),
        "{err:?}"
    );
}

// --- the config ---------------------------------------------------------------------------------

#[test]
fn config_with_zero_heads_is_an_error() {
    assert!(config_err(|c| c["num_heads"] = json!(0)).contains("num_heads"));
}

#[test]
fn config_whose_kv_heads_do_not_divide_heads_is_an_error() {
    assert!(config_err(|c| c["num_kv_heads"] = json!(3)).contains("num_kv_heads"));
}

#[test]
fn config_with_top_k_above_the_expert_count_is_an_error() {
    assert!(config_err(|c| c["moe"]["top_k"] = json!(9)).contains("top_k"));
}

#[test]
fn config_with_odd_rotary_dim_is_an_error() {
    assert!(config_err(|c| c["rotary_dim"] = json!(15)).contains("rotary_dim"));
}

#[test]
fn config_with_a_dense_layer_past_the_last_layer_is_an_error() {
    assert!(config_err(|c| c["dense_layers"] = json!([2])).contains("dense layer 2"));
}

#[test]
fn config_with_absurd_sizes_is_an_error() {
    assert!(config_err(|c| c["vocab_size"] = json!(1u64 << 40)).contains("vocab_size"));
    assert!(config_err(|c| c["rms_norm_eps"] = json!(0.0)).contains("rms_norm_eps"));
}

#[test]
fn tensor_shape_that_contradicts_the_config_is_a_load_error_naming_it() {
    let mut m = Edm::valid(DType::F32);
    // Same bytes, consistent index, but not [vocab, hidden].
    m.tensor("embed")["shape"] = json!([1024, 32]);
    let err = load_err(&m.to_bytes());
    assert!(
        matches!(&err, ModelError::TensorShape { name, got, want } if name == "embed" && got == &[1024, 32] && want == &[512, 64]),
        "{err:?}"
    );
}

#[test]
fn expert_part_shape_that_contradicts_the_config_is_a_load_error_naming_it() {
    let mut m = Edm::valid(DType::F32);
    m.experts(1)["parts"][0]["shape"] = json!([128, 32]);
    let err = load_err(&m.to_bytes());
    assert!(
        matches!(&err, ModelError::TensorShape { name, .. } if name == "layers.1.experts.gate_up"),
        "{err:?}"
    );
}

#[test]
fn missing_tensor_is_a_load_error_naming_it() {
    let mut m = Edm::valid(DType::F32);
    m.header["tensors"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["name"] != "layers.1.ffn_norm");
    let err = load_err(&m.to_bytes());
    assert!(
        matches!(&err, ModelError::Format(FormatError::MissingTensor(n)) if n == "layers.1.ffn_norm"),
        "{err:?}"
    );
}

#[test]
fn missing_tokenizer_blob_is_an_error_when_asked_for() {
    let mut m = Edm::valid(DType::F32);
    m.header["blobs"] = json!([]);
    let file = open(&m.to_bytes()).unwrap();
    let err = file.blob("tokenizer.json").unwrap_err();
    assert!(
        matches!(&err, FormatError::MissingTensor(n) if n == "blob tokenizer.json"),
        "{err:?}"
    );
}

// --- expert tables ------------------------------------------------------------------------------

#[test]
fn overlapping_experts_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    let t = m.experts(0);
    t["offsets"][1] = t["offsets"][0].clone();
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Overlap { a, b } if a.starts_with("layer 0 expert") && b.starts_with("layer 0 expert")),
        "{err:?}"
    );
}

#[test]
fn expert_overlapping_a_dense_tensor_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.experts(1)["offsets"][0] = json!(0); // where "embed" lives
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Overlap { a, b }
            if [a.as_str(), b.as_str()].contains(&"embed") && [a.as_str(), b.as_str()].contains(&"layer 1 expert 0")),
        "{err:?}"
    );
}

#[test]
fn overlapping_parts_inside_an_expert_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.experts(0)["parts"][1]["offset"] = json!(0);
    let err = open_err(&m.to_bytes());
    assert!(matches!(err, FormatError::Overlap { .. }), "{err:?}");
}

#[test]
fn part_reaching_past_its_expert_is_out_of_bounds() {
    let mut m = Edm::valid(DType::F32);
    let t = m.experts(0);
    let len = t["length"].as_u64().unwrap();
    t["parts"][1]["offset"] = json!(len);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::OutOfBounds { name, limit, .. } if name == "down" && *limit == len),
        "{err:?}"
    );
}

#[test]
fn duplicate_part_names_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.experts(0)["parts"][1]["name"] = json!("gate_up");
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::DuplicateName(n) if n.contains("gate_up")),
        "{err:?}"
    );
}

#[test]
fn misaligned_expert_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    let off = m.experts(1)["offsets"][2].as_u64().unwrap();
    m.experts(1)["offsets"][2] = json!(off + TENSOR_ALIGN);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Misaligned { name, offset, align: EXPERT_ALIGN }
            if name == "layer 1 expert 2" && *offset == off + TENSOR_ALIGN),
        "{err:?}"
    );
}

#[test]
fn expert_past_the_end_or_overflowing_is_out_of_bounds() {
    for offset in [
        (valid_model(DType::F32).len() as u64).next_multiple_of(EXPERT_ALIGN),
        u64::MAX - (EXPERT_ALIGN - 1),
    ] {
        let mut m = Edm::valid(DType::F32);
        m.experts(1)["offsets"][7] = json!(offset);
        let err = open_err(&m.to_bytes());
        assert!(
            matches!(&err, FormatError::OutOfBounds { name, .. } if name == "layer 1 expert 7"),
            "{offset}: {err:?}"
        );
    }
}

#[test]
fn expert_table_for_a_layer_that_does_not_exist_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.experts(1)["layer"] = json!(7);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Invalid(msg) if msg.contains("layer 7")),
        "{err:?}"
    );
}

#[test]
fn expert_table_for_a_dense_layer_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.config()["dense_layers"] = json!([1]);
    m.config()["dense_ffn"] = json!(96);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Invalid(msg) if msg.contains("layer 1")),
        "{err:?}"
    );
}

#[test]
fn two_expert_tables_for_one_layer_are_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.experts(1)["layer"] = json!(0);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Invalid(msg) if msg.contains("layer 0")),
        "{err:?}"
    );
}

#[test]
fn moe_layer_without_an_expert_table_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.header["experts"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["layer"] != 1);
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Invalid(msg) if msg.contains("MoE layer 1")),
        "{err:?}"
    );
}

#[test]
fn expert_table_with_the_wrong_number_of_experts_is_an_error() {
    let mut m = Edm::valid(DType::F32);
    m.experts(0)["offsets"].as_array_mut().unwrap().pop();
    let err = open_err(&m.to_bytes());
    assert!(
        matches!(&err, FormatError::Invalid(msg) if msg.contains("7 offsets for 8 experts")),
        "{err:?}"
    );
}

#[test]
fn pruned_expert_is_not_an_error_but_asking_for_it_is() {
    let mut m = Edm::valid(DType::F32);
    m.experts(0)["offsets"][4] = Value::Null;
    let file = open(&m.to_bytes()).unwrap();
    assert!(matches!(
        file.expert_part(0, 4, "down"),
        Err(FormatError::MissingTensor(_))
    ));
    assert!(matches!(
        file.expert_part(0, 99, "down"),
        Err(FormatError::MissingTensor(_))
    ));
    assert!(matches!(
        file.expert_part(5, 0, "down"),
        Err(FormatError::MissingTensor(_))
    ));
    assert!(file.expert_part(0, 3, "down").is_ok());
}

// --- the file system ----------------------------------------------------------------------------

#[test]
fn missing_file_and_directory_are_io_errors() {
    let dir = TempDir::new().unwrap();
    for path in [dir.path().join("absent.edm"), dir.path().to_path_buf()] {
        let err = EdmFile::open(&path).unwrap_err();
        assert!(
            matches!(&err, FormatError::Io { path: p, .. } if p == &path),
            "{}: {err:?}",
            path.display()
        );
    }
}
