//! ZAYA1 on the CPU reference: the per-sequence state CCA keeps besides K/V (raw `[q; k]` rows for
//! the convolutions over time, the previous token's delayed v) follows the KV cache exactly —
//! through a split prefill, block diffusion's re-run blocks and speculative drafting's rejected
//! drafts — and broken `zaya` checkpoints are typed errors. Parity with transformers lives in
//! parity.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::AttnMask;
use edgediff::decode::{
    self, BlockOptions, CommitPolicy, DecodeParams, DecoderDetails, DecoderKind, Flow, Observer,
    Prediction, Sampling, SpecialIds, SpeculativeOptions,
};
use edgediff::format::{DType, EdmFile};
use edgediff::import::{self, ImportError};
use edgediff::model::{Architecture, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};
use serde_json::Value;

fn write_synth(dir: &Path, spec: &SynthSpec, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.edm"));
    synth::write_edm(&synth::build(spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
    path
}

fn load(path: &Path) -> (Model<CpuBackend>, SpecialIds) {
    let file = Arc::new(EdmFile::open(path).unwrap());
    let st = file.header.metadata.special_tokens;
    let model = Model::load(&CpuBackend, file, &|_, _| true).unwrap();
    let special = SpecialIds {
        mask: st.mask,
        eos: st.eos,
    };
    (model, special)
}

/// The tiny zaya, and the same with a sliding window that binds (2 positions) on layers 1.
fn models(dir: &Path) -> Vec<(&'static str, Model<CpuBackend>, SpecialIds)> {
    let tiny = SynthSpec::tiny(Architecture::Zaya);
    let narrow = SynthSpec {
        sliding_window: 2,
        seed: 3,
        ..tiny.clone()
    };
    [("tiny", tiny), ("window-2", narrow)]
        .into_iter()
        .map(|(name, spec)| {
            let (m, s) = load(&write_synth(dir, &spec, name));
            (name, m, s)
        })
        .collect()
}

const TOKENS: [u32; 12] = [1, 40, 77, 300, 12, 3, 3, 3, 90, 41, 7, 250];
const PROMPT: [u32; 11] = [1, 40, 77, 300, 12, 3, 90, 41, 7, 250, 33];

fn logits(
    m: &Model<CpuBackend>,
    kv: &mut <CpuBackend as edgediff::backend::Backend>::Kv,
    tokens: &[u32],
    window: Window,
) -> Vec<f32> {
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    m.forward(&CpuBackend, kv, tokens, window, &want)
        .unwrap()
        .logits
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn zaya_cached_prefix_gives_the_same_logits_as_one_full_pass() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m, _) in models(dir.path()) {
        let vocab = m.config.vocab_size;
        for (mask, split) in [
            (AttnMask::Causal, 1),
            (AttnMask::Causal, 5),
            (AttnMask::BlockCausal(4), 8),
        ] {
            let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
            let full = logits(&m, &mut kv, &TOKENS, Window::block(0, TOKENS.len(), mask));
            let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
            logits(&m, &mut kv, &TOKENS[..split], Window::block(0, split, mask));
            let rest = &TOKENS[split..];
            let tail = logits(&m, &mut kv, rest, Window::block(split, rest.len(), mask));
            let err = max_abs_diff(&tail, &full[split * vocab..]);
            assert!(err < 1e-4, "{name} {mask:?} split {split}: {err}");
        }
    }
}

#[test]
fn zaya_conv_state_is_rewritten_when_a_pass_resumes_at_an_earlier_position() {
    // Garbage written past position 6 (a rejected draft) must not leak into a pass resumed there:
    // the conv window of positions 6 and 7 reads positions 4 and 5, which the garbage never touched.
    let dir = tempfile::tempdir().unwrap();
    for (name, m, _) in models(dir.path()) {
        let vocab = m.config.vocab_size;
        let mut fresh = m.new_kv(&CpuBackend, 64).unwrap();
        let full = logits(
            &m,
            &mut fresh,
            &TOKENS,
            Window::block(0, 12, AttnMask::Causal),
        );
        let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
        logits(
            &m,
            &mut kv,
            &TOKENS[..9],
            Window::block(0, 9, AttnMask::Causal),
        );
        let garbage = [5, 6, 7, 8, 9, 10];
        logits(&m, &mut kv, &garbage, Window::block(6, 6, AttnMask::Causal));
        let tail = logits(
            &m,
            &mut kv,
            &TOKENS[6..],
            Window::block(6, 6, AttnMask::Causal),
        );
        let err = max_abs_diff(&tail, &full[6 * vocab..]);
        assert!(err < 1e-4, "{name}: resumed vs full {err}");
    }
}

#[test]
fn zaya_sliding_window_changes_the_logits_only_where_it_binds() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = SynthSpec::tiny(Architecture::Zaya);
    let wide = load(&write_synth(dir.path(), &tiny, "wide")).0;
    let narrow = SynthSpec {
        sliding_window: 2,
        ..tiny
    };
    let narrow = load(&write_synth(dir.path(), &narrow, "narrow")).0;
    let vocab = wide.config.vocab_size;
    let run = |m: &Model<CpuBackend>| {
        let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
        logits(m, &mut kv, &TOKENS, Window::block(0, 12, AttnMask::Causal))
    };
    let (a, b) = (run(&wide), run(&narrow));
    // Positions 0 and 1 see at most two keys: the window of 2 does not bind there.
    assert_eq!(a[..2 * vocab], b[..2 * vocab]);
    assert!(max_abs_diff(&a[2 * vocab..], &b[2 * vocab..]) > 1e-3);
}

#[derive(Default)]
struct Ids(Vec<u32>);

impl Observer for Ids {
    fn committed(&mut self, ids: &[u32]) -> Flow {
        self.0.extend_from_slice(ids);
        Flow::Continue
    }
}

fn params(decoder: DecoderKind, prediction: Prediction, max_new: usize) -> DecodeParams {
    DecodeParams {
        decoder,
        policy: CommitPolicy::Threshold { threshold: 0.5 },
        sampling: Sampling::greedy(),
        max_new_tokens: max_new,
        ignore_eos: true,
        prediction,
        cancel: None,
        canvas_events: false,
        block_experts: None,
        device_steps: Default::default(),
    }
}

fn run(
    m: &Model<CpuBackend>,
    special: SpecialIds,
    prompt: &[u32],
    p: &DecodeParams,
) -> (
    Vec<u32>,
    decode::DecodeOutcome,
    <CpuBackend as edgediff::backend::Backend>::Kv,
) {
    let mut kv = m
        .new_kv(&CpuBackend, prompt.len() + p.max_new_tokens)
        .unwrap();
    let mut ids = Ids::default();
    let out = decode::decode(&CpuBackend, m, &mut kv, prompt, special, p, &mut ids).unwrap();
    assert_eq!(ids.0, out.tokens);
    (out.tokens.clone(), out, kv)
}

/// After decoding, a pass over the last block against the decoder's cache equals recomputing
/// the whole sequence: the K/V and the CCA state the decoder left are those of the final text.
fn cache_error(
    m: &Model<CpuBackend>,
    special: SpecialIds,
    p: &DecodeParams,
    mask: AttnMask,
    b: usize,
) -> f32 {
    let (tokens, _, mut kv) = run(m, special, &PROMPT, p);
    let seq: Vec<u32> = PROMPT.iter().chain(&tokens).copied().collect();
    let start = (seq.len() - 1) / b * b;
    let cached = logits(
        m,
        &mut kv,
        &seq[start..],
        Window::block(start, seq.len() - start, mask),
    );
    let mut fresh = m.new_kv(&CpuBackend, seq.len()).unwrap();
    let full = logits(m, &mut fresh, &seq, Window::block(0, seq.len(), mask));
    max_abs_diff(&cached, &full[full.len() - cached.len()..])
}

#[test]
fn zaya_block_diffusion_with_the_kv_cache_equals_recomputing_without_it() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m, special) in models(dir.path()) {
        for b in [4, 5] {
            let block = DecoderKind::Block(BlockOptions {
                block_size: b,
                reuse_last_kv: false,
            });
            let p = params(block, Prediction::InPlace, 13);
            let err = cache_error(&m, special, &p, AttnMask::BlockCausal(b), b);
            assert!(err < 1e-4, "{name} block {b}: cached vs recomputed {err}");
        }
    }
}

#[test]
fn zaya_lossless_speculative_greedy_equals_ar_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    for (name, m, special) in models(dir.path()) {
        for prompt in [&PROMPT[..1], &PROMPT[..]] {
            let ar = run(
                &m,
                special,
                prompt,
                &params(DecoderKind::Ar, Prediction::NextToken, 24),
            )
            .0;
            for (draft_len, prediction) in [
                (1, Prediction::NextToken),
                (4, Prediction::NextToken),
                (16, Prediction::NextToken),
                (5, Prediction::Hybrid),
            ] {
                let spec = DecoderKind::Speculative(SpeculativeOptions {
                    draft_len,
                    beta: 1.0,
                });
                let (tokens, out, _) = run(&m, special, prompt, &params(spec, prediction, 24));
                assert_eq!(
                    tokens,
                    ar,
                    "{name} {prediction:?} k={draft_len} prompt {}",
                    prompt.len()
                );
                assert!(matches!(out.details, DecoderDetails::Speculative { .. }));
            }
        }
    }
}

#[test]
fn zaya_speculative_drafting_rolls_the_conv_state_back_with_rejected_drafts() {
    // Accepted and rejected drafts alike: the cache must end up exactly the final sequence's,
    // conv windows and delayed v included.
    let dir = tempfile::tempdir().unwrap();
    for (name, m, special) in models(dir.path()) {
        for beta in [1.0, 0.5, 0.0] {
            let spec = DecoderKind::Speculative(SpeculativeOptions { draft_len: 6, beta });
            let p = params(spec, Prediction::NextToken, 40);
            let (_, out, _) = run(&m, special, &PROMPT, &p);
            let DecoderDetails::Speculative {
                drafted, accepted, ..
            } = out.details
            else {
                panic!("speculative details expected")
            };
            // β = 0 trusts the drafter (drafts accepted, K/V and conv state kept from the verify
            // rows); β = 1 rejects most random drafts (state rewritten from the correction on).
            if beta == 0.0 {
                assert!(accepted > 0, "{name}: nothing accepted");
            }
            if beta == 1.0 {
                assert!(accepted < drafted, "{name}: nothing rejected");
            }
            let err = cache_error(&m, special, &p, AttnMask::Causal, 1);
            assert!(err < 1e-4, "{name} β {beta}: cached vs recomputed {err}");
        }
    }
}

// --- bad checkpoints ----------------------------------------------------------------------------

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/zaya")
}

/// A copy of the committed zaya fixture checkpoint, `edit`ed.
fn broken(edit_config: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit_config(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    dir
}

fn convert(dir: &Path) -> Result<import::ConvertSummary, ImportError> {
    let out = tempfile::tempdir().unwrap();
    import::convert(dir, &out.path().join("m.edm"), DType::F32, &|_, _| {})
}

/// Rewrites model.safetensors with `edit` applied to its (name, shape, f32 values) list.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, v.shape().to_vec(), vals)
        })
        .collect();
    edit(&mut tensors);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn the_untouched_zaya_fixture_converts() {
    convert(broken(|_| {}).path()).unwrap();
}

type ConfigEdit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;

#[test]
fn zaya_config_values_the_forward_pass_cannot_honour_are_refused() {
    let cases: Vec<(&str, ConfigEdit)> = vec![
        (
            "cca_time0 = 3",
            Box::new(|c| {
                c.insert("cca_time0".into(), 3.into());
            }),
        ),
        (
            "attention_bias",
            Box::new(|c| {
                c.insert("attention_bias".into(), true.into());
            }),
        ),
        (
            "lm_head_bias",
            Box::new(|c| {
                c.insert("lm_head_bias".into(), true.into());
            }),
        ),
        (
            "gelu experts",
            Box::new(|c| {
                c.insert("hidden_act".into(), "gelu".into());
            }),
        ),
        (
            "unknown layer type",
            Box::new(|c| {
                c.insert(
                    "layer_types".into(),
                    serde_json::json!(["hybrid", "mamba", "hybrid"]),
                );
            }),
        ),
        (
            "yarn RoPE",
            Box::new(|c| {
                c["rope_parameters"]["hybrid"]["rope_type"] = "yarn".into();
            }),
        ),
    ];
    for (what, edit) in cases {
        let err = convert(broken(edit).path()).unwrap_err();
        assert!(matches!(err, ImportError::Unsupported(_)), "{what}: {err}");
    }
    let invalid: Vec<(&str, ConfigEdit)> = vec![
        (
            "layer_types of the wrong length",
            Box::new(|c| {
                c.insert("layer_types".into(), serde_json::json!(["hybrid"]));
            }),
        ),
        (
            "sliding layers without a window",
            Box::new(|c| {
                c.remove("sliding_window");
            }),
        ),
        (
            "odd KV width",
            Box::new(|c| {
                c.insert("num_key_value_heads".into(), 1.into());
                c.insert("num_attention_heads".into(), 3.into());
                c.insert("head_dim".into(), 13.into());
            }),
        ),
        (
            "router hidden size 0",
            Box::new(|c| {
                c.insert("router_hidden_size".into(), 0.into());
            }),
        ),
        (
            "top_k beyond the experts",
            Box::new(|c| {
                c.insert("num_experts_per_tok".into(), 9.into());
            }),
        ),
    ];
    for (what, edit) in invalid {
        let err = convert(broken(edit).path()).unwrap_err();
        assert!(matches!(err, ImportError::Config(_)), "{what}: {err}");
    }
}

#[test]
fn zaya_missing_or_misshapen_tensors_are_typed_errors() {
    let dir = broken(|_| {});
    edit_tensors(dir.path(), |t| {
        t.retain(|x| x.0 != "model.layers.1.self_attn.qkv_proj.conv_qk_grouped.weight")
    });
    let err = convert(dir.path()).unwrap_err();
    assert!(
        matches!(err, ImportError::MissingTensor(ref n) if n.contains("conv_qk_grouped")),
        "{err}"
    );

    let dir = broken(|_| {});
    edit_tensors(dir.path(), |t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "model.layers.0.mlp.gate.balancing_biases")
            .unwrap();
        x.1 = vec![5];
        x.2.truncate(5);
    });
    let err = convert(dir.path()).unwrap_err();
    assert!(matches!(err, ImportError::Shape { .. }), "{err}");

    let dir = broken(|_| {});
    edit_tensors(dir.path(), |t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "model.layers.2.self_attn.qkv_proj.conv_qk_depthwise.weight")
            .unwrap();
        x.1 = vec![x.1[0], 2, 1];
    });
    let err = convert(dir.path()).unwrap_err();
    assert!(matches!(err, ImportError::Shape { .. }), "{err}");

    // A legacy alternating-layout name among merged ones is named as such, not reported as an
    // unknown tensor (the checkpoint is read as legacy, and neither its config nor the merged
    // names fit that layout).
    let dir = broken(|_| {});
    edit_tensors(dir.path(), |t| {
        t.push((
            "model.layers.1.zaya_block.router.down_proj.weight".into(),
            vec![2],
            vec![0.0; 2],
        ))
    });
    let err = convert(dir.path()).unwrap_err();
    assert!(
        matches!(err, ImportError::Unsupported(ref m) | ImportError::Config(ref m) if m.contains("legacy")),
        "{err}"
    );
}

// --- the legacy alternating layout ----------------------------------------------------------------

/// The fixture's merged tensor `name` under Zyphra's original alternating layout (`layers` decoder
/// layers → `2 * layers` attention/MoE layers): written from transformers'
/// convert_zaya_weights_to_hf.py read backwards, independently of the importer's mapping.
fn legacy_tensors(
    name: &str,
    shape: &[usize],
    vals: &[f32],
    layers: usize,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let one = |n: String| vec![(n, shape.to_vec(), vals.to_vec())];
    if let Some(part) = name.strip_prefix("model.input_") {
        return one(format!("model.layers.0.res_scale.{part}"));
    }
    let Some(tail) = name.strip_prefix("model.layers.") else {
        return one(name.to_string());
    };
    let (l, rest) = tail.split_once('.').unwrap();
    let l: usize = l.parse().unwrap();
    let (attn, moe) = (
        format!("model.layers.{}", 2 * l),
        format!("model.layers.{}", 2 * l + 1),
    );
    if let Some(proj) = rest.strip_prefix("mlp.experts.") {
        let fc = if proj == "gate_up_proj" { 1 } else { 2 };
        let per: usize = shape[1..].iter().product();
        return (0..shape[0])
            .map(|e| {
                (
                    format!("{moe}.zaya_block.experts.local_experts.{e}.linear_fc{fc}.weight"),
                    shape[1..].to_vec(),
                    vals[e * per..(e + 1) * per].to_vec(),
                )
            })
            .collect();
    }
    if let Some(part) = rest.strip_prefix("post_mlp_residual_scale.") {
        return one(if l + 1 == layers {
            format!("model.res_scale.{part}")
        } else {
            format!("model.layers.{}.res_scale.{part}", 2 * (l + 1))
        });
    }
    let table = [
        ("input_layernorm.", &attn, "input_norm."),
        ("post_attention_layernorm.", &moe, "input_norm."),
        ("post_attention_residual_scale.", &moe, "res_scale."),
        (
            "self_attn.qkv_proj.q_proj.",
            &attn,
            "self_attn.qkv.linear_q.",
        ),
        (
            "self_attn.qkv_proj.k_proj.",
            &attn,
            "self_attn.qkv.linear_k.",
        ),
        (
            "self_attn.qkv_proj.v_proj_current.",
            &attn,
            "self_attn.qkv.val_proj1.",
        ),
        (
            "self_attn.qkv_proj.v_proj_delayed.",
            &attn,
            "self_attn.qkv.val_proj2.",
        ),
        (
            "self_attn.qkv_proj.conv_qk_depthwise.",
            &attn,
            "self_attn.qkv.conv_qk.0.",
        ),
        (
            "self_attn.qkv_proj.conv_qk_grouped.",
            &attn,
            "self_attn.qkv.conv_qk.1.",
        ),
        ("self_attn.qk_norm.temp", &attn, "self_attn.qkv.temp"),
        ("self_attn.", &attn, "self_attn."),
        (
            "mlp.gate.router_mlp.norm.",
            &moe,
            "zaya_block.router.rmsnorm_eda.",
        ),
        (
            "mlp.gate.router_mlp.fc1.",
            &moe,
            "zaya_block.router.router_mlp.0.",
        ),
        (
            "mlp.gate.router_mlp.fc2.",
            &moe,
            "zaya_block.router.router_mlp.2.",
        ),
        (
            "mlp.gate.router_mlp.out_proj.",
            &moe,
            "zaya_block.router.router_mlp.4.",
        ),
        ("mlp.gate.", &moe, "zaya_block.router."),
    ];
    let (merged, layer, legacy) = table
        .iter()
        .find(|(m, _, _)| rest.starts_with(m))
        .unwrap_or_else(|| panic!("no legacy name for {name}"));
    one(format!("{layer}.{legacy}{}", &rest[merged.len()..]))
}

/// A copy of the fixture rewritten into the legacy alternating layout, config.json included.
fn legacy_fixture() -> tempfile::TempDir {
    let dir = broken(|c| {
        // The original config's spelling (convert_config in transformers' converter, backwards).
        let layers = c["num_hidden_layers"].as_u64().unwrap();
        let window = c.remove("sliding_window").unwrap().as_u64().unwrap();
        let swa: Vec<Value> = c["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| {
                let w = if t == "hybrid_sliding" { window - 1 } else { 0 };
                [Value::from(w), Value::from(w)]
            })
            .collect();
        c.remove("layer_types");
        c.insert("swa_layers".into(), Value::Array(swa));
        c.insert("num_hidden_layers".into(), (2 * layers).into());
        let ffn = c.remove("moe_intermediate_size").unwrap().as_u64().unwrap();
        c.insert("ffn_hidden_size".into(), (2 * ffn).into());
        for (new, old) in [
            ("num_experts_per_tok", "moe_router_topk"),
            ("rms_norm_eps", "norm_epsilon"),
            ("router_hidden_size", "zaya_mlp_expansion"),
        ] {
            let v = c.remove(new).unwrap();
            c.insert(old.into(), v);
        }
        let rope = c.remove("rope_parameters").unwrap();
        c.insert("rope_theta".into(), rope["hybrid"]["rope_theta"].clone());
        c.insert(
            "swa_rotary_base".into(),
            rope["hybrid_sliding"]["rope_theta"].clone(),
        );
    });
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    edit_tensors(dir.path(), |t| {
        *t = t
            .iter()
            .flat_map(|(n, s, v)| legacy_tensors(n, s, v, layers))
            .collect();
    });
    dir
}

fn tensor_names(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(str::to_string).collect()
}

#[test]
fn a_legacy_alternating_checkpoint_converts_to_the_same_file_as_its_merged_equivalent() {
    let legacy = legacy_fixture();
    let names = tensor_names(legacy.path());
    // It really is the other layout: alternating layers, per-expert tensors, no merged names.
    assert!(names
        .iter()
        .any(|n| n.starts_with("model.layers.5.zaya_block.experts.local_experts.4.")));
    assert!(names.iter().any(|n| n == "model.res_scale.residual_scale"));
    assert!(!names
        .iter()
        .any(|n| n.contains(".mlp.") || n.contains("qkv_proj")));

    let out = tempfile::tempdir().unwrap();
    let (a, b) = (out.path().join("merged.edm"), out.path().join("legacy.edm"));
    let none = &|_: u64, _: u64| {};
    import::convert(&fixture(), &a, DType::F32, none).unwrap();
    import::convert(legacy.path(), &b, DType::F32, none).unwrap();
    let (fa, fb) = (EdmFile::open(&a).unwrap(), EdmFile::open(&b).unwrap());
    assert_eq!(fa.header.metadata.config, fb.header.metadata.config);
    assert!(!fa.header.tensors.is_empty() && !fa.header.experts.is_empty());
    for t in &fa.header.tensors {
        let (x, y) = (fa.tensor(&t.name).unwrap(), fb.tensor(&t.name).unwrap());
        assert_eq!((x.dtype, x.shape), (y.dtype, y.shape), "{}", t.name);
        assert!(x.bytes == y.bytes, "{} differs", t.name);
    }
    // Everything else too: expert tables and their bytes, the tokenizer blob, the metadata.
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

#[test]
fn a_legacy_checkpoint_missing_a_tensor_is_a_typed_error_naming_it() {
    for gone in [
        "model.layers.3.zaya_block.experts.local_experts.2.linear_fc1.weight",
        "model.layers.3.zaya_block.router.down_proj.bias",
    ] {
        let dir = legacy_fixture();
        edit_tensors(dir.path(), |t| t.retain(|x| x.0 != gone));
        let err = convert(dir.path()).unwrap_err();
        // A per-expert tensor is named as the legacy checkpoint names it; any other by the merged
        // name the plan reads (layer 3 of the alternating layout is decoder layer 1's MoE half).
        let want = if gone.contains("local_experts") {
            gone.to_string()
        } else {
            "model.layers.1.mlp.gate.down_proj.bias".to_string()
        };
        assert!(
            matches!(err, ImportError::MissingTensor(ref n) if *n == want),
            "{gone}: {err}"
        );
    }
}

#[test]
fn zaya_synth_preset_has_zaya1_8b_shapes() {
    let c = synth::build(&SynthSpec::zaya1_8b()).unwrap().meta.config;
    assert_eq!(
        (c.num_layers, c.hidden_size, c.vocab_size),
        (40, 2048, 262_272)
    );
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim),
        (8, 2, 128, 64)
    );
    assert_eq!(
        (c.moe.num_experts, c.moe.top_k, c.moe.expert_ffn),
        (16, 1, 2048)
    );
    assert_eq!(c.router_classes(), 17);
}

// --- the Diffusion-Preview's decoding settings --------------------------------------------------

fn convert_with(dir: &Path, o: &import::MetaOverrides) -> Result<EdmFile, ImportError> {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("m.edm");
    import::convert_with(dir, &path, DType::F32, o, &|_, _| {})?;
    Ok(EdmFile::open(&path).unwrap())
}

#[test]
fn a_zaya_checkpoint_without_a_block_size_gets_the_diffusion_previews_16() {
    let dir = broken(|c| {
        c.remove("block_size");
    });
    let f = convert_with(dir.path(), &Default::default()).unwrap();
    let d = &f.header.metadata.decoding;
    assert_eq!((d.block_size, d.steps, d.draft_len()), (16, 16, 16));
    // The fixture's own config says 8.
    let f = convert_with(broken(|_| {}).path(), &Default::default()).unwrap();
    assert_eq!(f.header.metadata.decoding.block_size, 8);
}

#[test]
fn convert_flags_set_the_mask_id_and_block_size_a_checkpoint_does_not_publish() {
    // Without config.json's mask_token_id the tokenizer's `<|mask|>` (id 3) is the mask; the flag
    // replaces it.
    let dir = broken(|c| {
        c.remove("mask_token_id");
        c.remove("block_size");
    });
    let f = convert_with(dir.path(), &Default::default()).unwrap();
    assert_eq!(f.header.metadata.special_tokens.mask, Some(3));
    let o = import::MetaOverrides {
        mask_token_id: Some(511),
        block_size: Some(12),
    };
    let f = convert_with(dir.path(), &o).unwrap();
    let m = &f.header.metadata;
    assert_eq!(m.special_tokens.mask, Some(511));
    assert_eq!((m.decoding.block_size, m.decoding.steps), (12, 12));
    assert_eq!(m.decoding.draft_len(), 12);
    // Out of the vocabulary of 512, or a block of 0: typed errors naming the flag.
    for (o, flag) in [
        (
            import::MetaOverrides {
                mask_token_id: Some(512),
                block_size: None,
            },
            "--mask-token-id 512",
        ),
        (
            import::MetaOverrides {
                mask_token_id: None,
                block_size: Some(0),
            },
            "--block-size",
        ),
    ] {
        let err = convert_with(dir.path(), &o).unwrap_err();
        assert!(
            matches!(err, ImportError::Option(ref m) if m.contains(flag)),
            "{err}"
        );
    }
}

#[test]
fn synth_zaya_models_are_accepted_by_the_speculative_decoder_with_their_own_settings() {
    // The synthetic ZAYA1-8B shape carries the Diffusion-Preview's settings: a mask id inside the
    // vocabulary, blocks (drafts) of 16, next-token causal rows.
    let preset = synth::build(&SynthSpec::zaya1_8b()).unwrap().meta;
    let mask = preset.special.mask.expect("a mask id");
    assert!((mask as usize) < preset.config.vocab_size);
    assert_eq!(preset.decoding.block_size, 16);
    assert_eq!(preset.decoding.draft_len(), 16);
    // The tiny one, end to end: the speculative decoder with the file's mask id and draft length
    // (its block size, 8) decodes, drafts and equals AR.
    let dir = tempfile::tempdir().unwrap();
    let path = write_synth(dir.path(), &SynthSpec::tiny(Architecture::Zaya), "tiny");
    let (m, special) = load(&path);
    let file = EdmFile::open(&path).unwrap();
    let d = &file.header.metadata.decoding;
    let prediction = d
        .prediction
        .unwrap_or_else(|| Prediction::for_architecture(Architecture::Zaya));
    assert_eq!(prediction, Prediction::NextToken);
    assert_eq!(special.mask, file.header.metadata.special_tokens.mask);
    let spec = DecoderKind::Speculative(SpeculativeOptions {
        draft_len: d.draft_len(),
        beta: 1.0,
    });
    let (tokens, out, _) = run(&m, special, &PROMPT, &params(spec, prediction, 20));
    let DecoderDetails::Speculative { drafted, .. } = out.details else {
        panic!("speculative details expected")
    };
    assert!(drafted > 0, "nothing drafted");
    let ar = run(
        &m,
        special,
        &PROMPT,
        &params(DecoderKind::Ar, prediction, 20),
    )
    .0;
    assert_eq!(tokens, ar);
}
