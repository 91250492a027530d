//! Malformed Hugging Face checkpoints are a test subject: each yields a typed `ImportError` from
//! `import::convert`, never a panic and never a model file that silently computes something else.
//!
//! Each test writes a valid tiny checkpoint with `synth::write_hf`, breaks one thing and names the
//! error it expects.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use edgediff::format::DType;
use edgediff::import::{self, ConvertSummary, ImportError};
use edgediff::model::Architecture;
use edgediff::synth::{self, SynthModel, SynthSpec};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use tempfile::TempDir;

fn synth_model(arch: Architecture) -> &'static SynthModel {
    static MODELS: OnceLock<Vec<SynthModel>> = OnceLock::new();
    let models = MODELS.get_or_init(|| {
        Architecture::ALL
            .iter()
            .map(|&a| synth::build(&SynthSpec::tiny(a)).unwrap())
            .collect()
    });
    models.iter().find(|m| m.spec.arch == arch).unwrap()
}

/// A valid tiny checkpoint of `arch` in a fresh directory.
fn checkpoint(arch: Architecture) -> TempDir {
    let dir = TempDir::new().unwrap();
    synth::write_hf(synth_model(arch), dir.path()).unwrap();
    dir
}

fn qwen3() -> TempDir {
    checkpoint(Architecture::Qwen3Moe)
}

fn convert(dir: &Path) -> Result<ConvertSummary, ImportError> {
    let out = TempDir::new().unwrap();
    import::convert(dir, &out.path().join("out.edm"), DType::F32, &|_, _| {})
}

fn convert_err(dir: &Path) -> ImportError {
    match convert(dir) {
        Ok(_) => panic!("a broken checkpoint converted"),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// One safetensors tensor held in memory: name, type, shape, bytes.
type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn read_tensors(path: &Path) -> Vec<Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_tensors(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            let view = safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Rewrites model.safetensors after `edit` changed its tensor list.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors);
}

fn f32_tensor(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let bytes = (0..n)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect();
    (name.to_string(), Dtype::F32, shape.to_vec(), bytes)
}

fn replace(tensors: &mut [Tensor], with: Tensor) {
    let t = tensors.iter_mut().find(|t| t.0 == with.0).unwrap();
    *t = with;
}

// --- the fixture itself -------------------------------------------------------------------------

#[test]
fn the_untouched_checkpoints_convert() {
    for arch in Architecture::ALL {
        let dir = checkpoint(arch);
        convert(dir.path()).unwrap_or_else(|e| panic!("{arch}: {e}"));
    }
}

#[test]
fn rewriting_the_tensors_unchanged_still_converts() {
    let dir = qwen3();
    edit_tensors(dir.path(), |_| {});
    convert(dir.path()).unwrap();
}

// --- config.json --------------------------------------------------------------------------------

#[test]
fn missing_config_json_is_an_io_error_naming_it() {
    let dir = qwen3();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Io { path, .. } if path.ends_with("config.json")),
        "{err:?}"
    );
}

#[test]
fn config_that_is_not_json_is_a_config_error() {
    for text in [
        "",
        "{\"model_type\": \"qwen3_moe\",",
        "model_type = qwen3_moe",
        "[]",
    ] {
        let dir = qwen3();
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        let err = convert_err(dir.path());
        assert!(matches!(err, ImportError::Config(_)), "{text:?}: {err:?}");
    }
}

#[test]
fn config_that_is_not_utf8_is_an_io_error() {
    let dir = qwen3();
    std::fs::write(dir.path().join("config.json"), b"{\"a\": \"\xff\"}").unwrap();
    assert!(matches!(convert_err(dir.path()), ImportError::Io { .. }));
}

#[test]
fn unknown_model_type_is_an_unsupported_architecture() {
    let dir = qwen3();
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), json!("gpt_neox"));
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::UnsupportedArchitecture(t) if t == "gpt_neox"),
        "{err:?}"
    );
}

#[test]
fn config_without_model_type_is_a_config_error() {
    for value in [None, Some(json!(7)), Some(Value::Null)] {
        let dir = qwen3();
        edit_config(dir.path(), |c| {
            c.remove("model_type");
            if let Some(v) = value.clone() {
                c.insert("model_type".into(), v);
            }
        });
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Config(m) if m.contains("model_type")),
            "{value:?}: {err:?}"
        );
    }
}

/// A field whose value changes the math edgediff implements is refused, not ignored.
fn assert_refused(arch: Architecture, field: &str, value: Value) {
    let dir = checkpoint(arch);
    edit_config(dir.path(), |c| {
        c.insert(field.into(), value.clone());
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Unsupported(_)),
        "{arch} {field} = {value}: {err:?}"
    );
}

#[test]
fn qwen3_attention_bias_is_refused() {
    assert_refused(Architecture::Qwen3Moe, "attention_bias", json!(true));
}

#[test]
fn qwen3_sliding_window_is_refused() {
    assert_refused(Architecture::Qwen3Moe, "use_sliding_window", json!(true));
}

#[test]
fn rope_scaling_other_than_default_is_refused() {
    for arch in Architecture::ALL {
        assert_refused(
            arch,
            "rope_scaling",
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
        );
        assert_refused(
            arch,
            "rope_parameters",
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        );
    }
}

#[test]
fn llada2_softmax_router_is_refused() {
    assert_refused(Architecture::Llada2Moe, "score_function", json!("softmax"));
}

#[test]
fn llada2_biases_and_missing_qk_norm_are_refused() {
    assert_refused(Architecture::Llada2Moe, "use_qkv_bias", json!(true));
    assert_refused(Architecture::Llada2Moe, "use_bias", json!(true));
}

/// `use_qk_norm: false` (an upcycled Llama base, training/smollm2) converts without q/k norm
/// tensors; q/k norms present anyway would be dropped silently, so they are refused by name.
#[test]
fn llada2_without_qk_norm_converts_and_leftover_norms_are_refused() {
    let dir = checkpoint(Architecture::Llada2Moe);
    edit_config(dir.path(), |c| {
        c.insert("use_qk_norm".into(), json!(false));
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::UnexpectedTensor(n) if n.contains("layernorm")),
        "{err:?}"
    );
    edit_tensors(dir.path(), |t| {
        t.retain(|t| !t.0.contains("query_layernorm") && !t.0.contains("key_layernorm"))
    });
    convert(dir.path()).unwrap();
    let dir = checkpoint(Architecture::Llada2Moe);
    edit_tensors(dir.path(), |t| {
        t.retain(|t| !t.0.contains("query_layernorm"))
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::MissingTensor(n) if n.contains("query_layernorm")),
        "{err:?}"
    );
}

/// `moe_shared_expert_intermediate_size` sets the shared expert's width (here not a multiple of
/// the routed experts' width); tensors of another width are a shape error naming the tensor.
#[test]
fn llada2_shared_expert_width_of_its_own() {
    let dir = checkpoint(Architecture::Llada2Moe);
    let routed = synth_model(Architecture::Llada2Moe).spec.expert_ffn;
    let width = routed + 8;
    edit_config(dir.path(), |c| {
        c.insert("moe_shared_expert_intermediate_size".into(), json!(width));
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Shape { name, .. } if name.contains("shared_experts")),
        "{err:?}"
    );
    edit_tensors(dir.path(), |ts| {
        for t in ts.iter_mut().filter(|t| t.0.contains("shared_experts")) {
            let (h, down) = (
                t.2[if t.0.contains("down_proj") { 0 } else { 1 }],
                t.0.contains("down_proj"),
            );
            let shape = if down { [h, width] } else { [width, h] };
            *t = f32_tensor(&t.0, &shape);
        }
    });
    convert(dir.path()).unwrap();
}

#[test]
fn missing_required_field_is_a_config_error_naming_it() {
    for field in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "num_experts_per_tok",
        "moe_intermediate_size",
    ] {
        let dir = qwen3();
        edit_config(dir.path(), |c| {
            c.remove(field);
        });
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Config(m) if m.contains(field)),
            "{field}: {err:?}"
        );
    }
}

#[test]
fn field_of_the_wrong_type_is_a_config_error_naming_it() {
    let cases = [
        ("num_attention_heads", json!("4")),
        ("hidden_size", json!(-64)),
        ("hidden_size", json!(64.5)),
        ("rms_norm_eps", json!("tiny")),
        ("norm_topk_prob", json!(1)),
        ("mlp_only_layers", json!([0, "1"])),
        ("mlp_only_layers", json!(3)),
    ];
    for (field, value) in cases {
        let dir = qwen3();
        edit_config(dir.path(), |c| {
            c.insert(field.into(), value.clone());
        });
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Config(m) if m.contains(field)),
            "{field} = {value}: {err:?}"
        );
    }
}

#[test]
fn config_that_cannot_describe_a_runnable_model_is_a_config_error() {
    let cases = [
        ("num_experts_per_tok", json!(9)),
        ("num_key_value_heads", json!(3)),
        ("num_attention_heads", json!(0)),
        ("vocab_size", json!(1u64 << 40)),
        ("rope_theta", json!(0.5)),
        ("rms_norm_eps", json!(0.0)),
        ("head_dim", json!(15)),
    ];
    for (field, value) in cases {
        let dir = qwen3();
        edit_config(dir.path(), |c| {
            c.insert(field.into(), value.clone());
        });
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Config(_)),
            "{field} = {value}: {err:?}"
        );
    }
}

#[test]
fn llada2_partial_rotary_factor_out_of_range_is_a_config_error() {
    for factor in [json!(0.0), json!(-1.0), json!(1e300)] {
        let dir = checkpoint(Architecture::Llada2Moe);
        edit_config(dir.path(), |c| {
            c.insert("partial_rotary_factor".into(), factor.clone());
        });
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Config(m) if m.contains("rotary_dim")),
            "{factor}: {err:?}"
        );
    }
}

#[test]
fn special_token_id_outside_the_vocabulary_is_a_config_error() {
    // 512 is the vocabulary size; 2^32 + 3 would alias id 3 if it were truncated to u32.
    for (field, id) in [
        ("mask_token_id", 512u64),
        ("eos_token_id", 100_000),
        ("bos_token_id", (1 << 32) + 3),
    ] {
        let dir = qwen3();
        edit_config(dir.path(), |c| {
            c.insert(field.into(), json!(id));
        });
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Config(m) if m.contains("outside the vocabulary")),
            "{field} = {id}: {err:?}"
        );
    }
}

// --- tokenizer ----------------------------------------------------------------------------------

#[test]
fn missing_tokenizer_json_is_an_io_error_naming_it() {
    let dir = qwen3();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Io { path, .. } if path.ends_with("tokenizer.json")),
        "{err:?}"
    );
}

#[test]
fn corrupt_tokenizer_files_are_tokenizer_errors() {
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let dir = qwen3();
        std::fs::write(dir.path().join(file), "{\"model\": ").unwrap();
        let err = convert_err(dir.path());
        assert!(matches!(err, ImportError::Tokenizer(_)), "{file}: {err:?}");
    }
}

// --- tensors ------------------------------------------------------------------------------------

#[test]
fn missing_tensor_is_an_error_naming_it() {
    for name in [
        "model.layers.1.post_attention_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.0.mlp.experts.5.gate_proj.weight",
        "lm_head.weight",
    ] {
        let dir = qwen3();
        edit_tensors(dir.path(), |t| t.retain(|t| t.0 != name));
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::MissingTensor(n) if n == name),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn misshapen_tensor_is_an_error_naming_it() {
    for (name, shape) in [
        ("model.norm.weight", vec![32]),
        ("model.embed_tokens.weight", vec![512, 32]),
        ("model.layers.0.self_attn.q_proj.weight", vec![64, 32]),
        ("model.layers.1.mlp.experts.2.up_proj.weight", vec![32, 32]),
        ("model.layers.0.mlp.gate.weight", vec![8, 64, 1]),
    ] {
        let dir = qwen3();
        edit_tensors(dir.path(), |t| replace(t, f32_tensor(name, &shape)));
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Shape { name: n, got, .. } if n == name && got == &shape),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn stacked_projections_with_the_wrong_row_count_are_a_shape_error() {
    let dir = qwen3();
    // k_proj with 16 rows instead of 32: every part has the right width, the stack does not add up.
    let name = "model.layers.0.self_attn.k_proj.weight";
    edit_tensors(dir.path(), |t| replace(t, f32_tensor(name, &[16, 64])));
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Shape { name: n, .. } if n.contains(name)),
        "{err:?}"
    );
}

#[test]
fn unexpected_extra_tensor_is_refused() {
    for (name, shape) in [
        ("model.layers.0.self_attn.q_proj.bias", vec![64]),
        (
            "model.layers.1.mlp.experts.8.gate_proj.weight",
            vec![32, 64],
        ),
        ("model.layers.0.mlp.experts.0.gate_proj.bias", vec![32]),
        ("model.layers.2.input_layernorm.weight", vec![64]),
        ("model.mtp.weight", vec![4]),
    ] {
        let dir = qwen3();
        edit_tensors(dir.path(), |t| t.push(f32_tensor(name, &shape)));
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::UnexpectedTensor(n) if n == name),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn non_finite_weight_is_a_checkpoint_error() {
    let dir = qwen3();
    let name = "model.layers.0.self_attn.o_proj.weight";
    edit_tensors(dir.path(), |t| {
        let bytes = &mut t.iter_mut().find(|t| t.0 == name).unwrap().3;
        bytes[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Checkpoint { detail, .. } if detail.contains(name) && detail.contains("non-finite")),
        "{err:?}"
    );
}

#[test]
fn tensor_of_an_unsupported_type_is_a_checkpoint_error() {
    let dir = qwen3();
    let name = "model.norm.weight";
    edit_tensors(dir.path(), |t| {
        replace(t, (name.into(), Dtype::I32, vec![64], vec![0; 256]));
    });
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Checkpoint { detail, .. } if detail.contains(name)),
        "{err:?}"
    );
}

// --- safetensors files --------------------------------------------------------------------------

fn assert_corrupt_weights(dir: &Path, what: &str) {
    let err = convert_err(dir);
    assert!(
        matches!(&err, ImportError::Checkpoint { path, .. } if path.ends_with("model.safetensors")),
        "{what}: {err:?}"
    );
}

#[test]
fn truncated_safetensors_is_a_checkpoint_error() {
    let dir = qwen3();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 8, 3, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert_corrupt_weights(dir.path(), &format!("cut at {cut}"));
    }
}

#[test]
fn safetensors_with_a_bad_header_is_a_checkpoint_error() {
    let dir = qwen3();
    let path = dir.path().join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("huge header length", huge));
    let mut garbage = good.clone();
    garbage[8..8 + 16].copy_from_slice(b"this is not json");
    cases.push(("header not JSON", garbage));
    // A tensor whose offsets reach past the data: same header length, one digit changed.
    let text = String::from_utf8(good[8..8 + header_len].to_vec()).unwrap();
    let key = "\"data_offsets\":[0,";
    let at = text.find(key).expect("a tensor at offset 0") + key.len();
    let mut lying = good.clone();
    lying[8 + at] = b'9';
    cases.push(("offsets past the data", lying));
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        assert_corrupt_weights(dir.path(), what);
    }
}

#[test]
fn checkpoint_without_weights_is_a_checkpoint_error() {
    let dir = qwen3();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Checkpoint { path, detail } if path == dir.path() && detail.contains("model.safetensors")),
        "{err:?}"
    );
}

/// Replaces model.safetensors by an index naming `shard` for every tensor.
fn shard_index(dir: &Path, index: Value) -> PathBuf {
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    path
}

#[test]
fn shard_index_pointing_outside_the_directory_is_refused() {
    let outside = qwen3();
    let elsewhere = outside.path().join("model.safetensors");
    for shard in [
        "../model.safetensors".to_string(),
        elsewhere.display().to_string(),
        "sub/model.safetensors".to_string(),
        "..\\model.safetensors".to_string(),
    ] {
        let dir = qwen3();
        let index = shard_index(
            dir.path(),
            json!({"weight_map": {"model.norm.weight": shard}}),
        );
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Checkpoint { path, detail } if path == &index && detail.contains("leaves")),
            "{shard}: {err:?}"
        );
    }
}

#[test]
fn malformed_shard_index_is_a_checkpoint_error() {
    for index in [
        json!("not an object"),
        json!({"metadata": {}}),
        json!({"weight_map": ["model-00001.safetensors"]}),
    ] {
        let dir = qwen3();
        let path = shard_index(dir.path(), index.clone());
        let err = convert_err(dir.path());
        assert!(
            matches!(&err, ImportError::Checkpoint { path: p, .. } if p == &path),
            "{index}: {err:?}"
        );
    }
    let dir = qwen3();
    let path = shard_index(dir.path(), Value::Null);
    std::fs::write(&path, "{\"weight_map\": ").unwrap();
    assert!(matches!(
        convert_err(dir.path()),
        ImportError::Checkpoint { .. }
    ));
}

#[test]
fn shard_index_naming_a_missing_shard_is_an_io_error_naming_it() {
    let dir = qwen3();
    shard_index(
        dir.path(),
        json!({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}),
    );
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::Io { path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
        "{err:?}"
    );
}

#[test]
fn sharded_checkpoint_missing_a_tensor_is_a_missing_tensor_error() {
    // A valid two-shard checkpoint whose index forgets nothing, but whose shards lack one tensor.
    let dir = qwen3();
    let all = read_tensors(&dir.path().join("model.safetensors"));
    let (a, b) = all.split_at(all.len() / 2);
    let b: Vec<Tensor> = b
        .iter()
        .filter(|t| t.0 != "model.norm.weight")
        .cloned()
        .collect();
    write_tensors(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_tensors(&dir.path().join("model-00002-of-00002.safetensors"), &b);
    let map: serde_json::Map<String, Value> = a
        .iter()
        .map(|t| (t.0.clone(), json!("model-00001-of-00002.safetensors")))
        .chain(
            b.iter()
                .map(|t| (t.0.clone(), json!("model-00002-of-00002.safetensors"))),
        )
        .collect();
    shard_index(dir.path(), json!({ "weight_map": map }));
    let err = convert_err(dir.path());
    assert!(
        matches!(&err, ImportError::MissingTensor(n) if n == "model.norm.weight"),
        "{err:?}"
    );
}

// --- the command line ---------------------------------------------------------------------------

// The test crate has no `edgediff` binary, so the CLI's guard is called directly.
#[test]
fn cli_refuses_an_output_that_is_its_input() {
    let dir = qwen3();
    let same = dir.path().join(".");
    assert!(edgediff::cli::check_output_differs(dir.path(), dir.path()).is_err());
    assert!(edgediff::cli::check_output_differs(dir.path(), &same).is_err());
    let fresh = dir.path().join("model.edm");
    assert!(edgediff::cli::check_output_differs(dir.path(), &fresh).is_ok());
}
