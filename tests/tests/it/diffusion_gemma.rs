//! DiffusionGemma on the CPU reference against transformers (the committed fixture of
//! tests/reference/diffusion_gemma_reference.py: a random 3-layer checkpoint with both layer
//! types, a sliding window shorter than the prefix, K = V global layers of another head size, a
//! vision tower the converter leaves out). The encoder's causal logits, the canvas decoder's
//! logits over a cached prefix with and without self-conditioning, and a second canvas after a
//! commit re-encoded into the cache: relative L2 ≤ 1e-4 in f32; the canvas sampler
//! (`decode::canvas`) replaying transformers' `generate()` draws commits its tokens in its steps
//! (one run stopping on EOS, one stopping early on confidence). Then what the reference alone
//! cannot say (a chunked encode equals a whole one; the GPU refuses the family with a typed error)
//! and broken checkpoints as typed errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::BackendError;
use edgediff::decode::canvas::{self, CanvasDraws, CanvasParams};
use edgediff::format::{DType, EdmFile};
use edgediff::import::{self, ImportError};
use edgediff::model::canvas::CanvasModel;
use edgediff::model::{Architecture, ForwardRequest, ModelError};
use edgediff::synth;
use serde_json::Value;

const TOL: f64 = 1e-4;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/diffusion_gemma")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn convert(dir: &Path, out: &Path, dtype: DType) -> Result<(), ImportError> {
    import::convert(dir, out, dtype, &|_, _| {}).map(|_| ())
}

fn load(dtype: DType) -> (tempfile::TempDir, CanvasModel<CpuBackend>) {
    load_from(&fixture(), dtype)
}

fn load_from(checkpoint: &Path, dtype: DType) -> (tempfile::TempDir, CanvasModel<CpuBackend>) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dg.edm");
    convert(checkpoint, &out, dtype).unwrap();
    let file = Arc::new(EdmFile::open(&out).unwrap());
    let model = CanvasModel::load(&CpuBackend, file).unwrap();
    (tmp, model)
}

fn logits_of(out: edgediff::model::ForwardOutput) -> Vec<f32> {
    out.logits.unwrap()
}

fn want_logits() -> ForwardRequest {
    ForwardRequest {
        logits: true,
        ..Default::default()
    }
}

/// Every pass of the reference, in order, on one cache: encode the prefix, denoise a canvas
/// (first step, then with self-conditioning), encode a commit, denoise a second canvas.
fn run_reference(m: &CanvasModel<CpuBackend>, r: &Value) -> Vec<(&'static str, f64)> {
    run_reference_on(&CpuBackend, m, r)
}

fn run_reference_on<B: edgediff::backend::Backend>(
    b: &B,
    m: &CanvasModel<B>,
    r: &Value,
) -> Vec<(&'static str, f64)> {
    let (prefix, canvas) = (ids(&r["prefix"]), ids(&r["canvas"]));
    let (commit, canvas2) = (ids(&r["commit"]), ids(&r["canvas2"]));
    let p = prefix.len();
    let mut kv = m.new_kv(b, p + 2 * canvas.len()).unwrap();
    let want = want_logits();
    let enc = logits_of(m.encode(b, &mut kv, &prefix, 0, &want).unwrap());
    let dec = logits_of(m.denoise(b, &mut kv, &canvas, p, None, &want).unwrap());
    let sc = rows(&r["self_cond_logits"]);
    let dec_sc = logits_of(m.denoise(b, &mut kv, &canvas, p, Some(&sc), &want).unwrap());
    let com = logits_of(m.encode(b, &mut kv, &commit, p, &want).unwrap());
    let p2 = p + commit.len();
    let dec2 = logits_of(m.denoise(b, &mut kv, &canvas2, p2, None, &want).unwrap());
    // Named as reference.json names them: the encoder, the first canvas step, the step with
    // self-conditioning, the re-encoded commit, the next canvas.
    [
        ("encoder_logits", enc),
        ("decoder_logits", dec),
        ("decoder_sc_logits", dec_sc),
        ("commit_logits", com),
        ("decoder2_logits", dec2),
    ]
    .into_iter()
    .map(|(k, got)| (k, rel_l2(&got, &rows(&r[k]))))
    .collect()
}

#[test]
fn diffusion_gemma_f32_logits_match_transformers() {
    let (_tmp, m) = load(DType::F32);
    let r = reference();
    for (case, err) in run_reference(&m, &r) {
        eprintln!("{case}: rel L2 {err:.2e}");
        assert!(err <= TOL, "{case}: rel L2 {err:.3e} > {TOL}");
    }
}

/// The GPU machine's references (scripts/device-diffusion-gemma.sh: odd shapes, transformers on
/// cuda): every subdirectory of `$EDGEDIFF_DG_REFERENCES` holding a checkpoint and its
/// reference.json, held to the same bound.
#[test]
#[ignore = "needs EDGEDIFF_DG_REFERENCES=DIR (the GPU machine's references)"]
fn device_references_match_transformers() {
    let root = std::env::var("EDGEDIFF_DG_REFERENCES")
        .expect("EDGEDIFF_DG_REFERENCES names the directory of device references");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no reference.json under {root}");
    for dir in dirs {
        let (_tmp, m) = load_from(&dir, DType::F32);
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        for (case, err) in run_reference(&m, &r) {
            eprintln!(
                "{} ({}): {case}: rel L2 {err:.2e} (device vs its CPU {})",
                dir.display(),
                r["device"],
                r["cpu_rel_l2"][case]
            );
            assert!(
                err <= TOL,
                "{}: {case}: rel L2 {err:.3e} > {TOL}",
                dir.display()
            );
        }
        check_samplers(&m, &r);
        // The same passes on every GPU configuration here (lavapipe in CI).
        for (label, g) in edgediff::backend::gpu::testing::backends(None) {
            let file = Arc::new(EdmFile::open(m.file.path()).unwrap());
            let gm = CanvasModel::load(&g, file).unwrap();
            for (case, err) in run_reference_on(&g, &gm, &r) {
                eprintln!("{} on {label}: {case}: rel L2 {err:.2e}", dir.display());
                assert!(
                    err <= TOL,
                    "{} on {label}: {case}: {err:.3e}",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn the_fixture_exercises_every_piece() {
    // A window shorter than the prefix, both layer types, K = V globals of another head size:
    // otherwise the comparison above could not tell the sliding rule or the geometry apart.
    let (_tmp, m) = load(DType::F32);
    let c = &m.config;
    let r = reference();
    let window = c.sliding.as_ref().unwrap().window;
    assert!(window < ids(&r["prefix"]).len());
    let (local, global) = (c.attn_of(0), c.attn_of(c.num_layers - 1));
    assert!(local.window.is_some() && global.window.is_none());
    assert!(!global.has_v && global.head_dim != local.head_dim);
    assert!(global.rope.pairs > 0 && global.rope.pairs < global.head_dim / 2);
    // Self-conditioning changes the canvas logits (the block is not a no-op).
    let (a, b) = (rows(&r["decoder_logits"]), rows(&r["decoder_sc_logits"]));
    assert!(rel_l2(&a, &b) > 1e-2);
}

#[test]
fn encoding_in_chunks_equals_one_encode() {
    let (_tmp, m) = load(DType::F32);
    let b = CpuBackend;
    let r = reference();
    let (prefix, canvas) = (ids(&r["prefix"]), ids(&r["canvas"]));
    let p = prefix.len();
    let want = want_logits();
    let mut whole = m.new_kv(&b, 32).unwrap();
    let enc = logits_of(m.encode(&b, &mut whole, &prefix, 0, &want).unwrap());
    let dec = logits_of(m.denoise(&b, &mut whole, &canvas, p, None, &want).unwrap());
    for split in [1, 4, 7] {
        let mut kv = m.new_kv(&b, 32).unwrap();
        let mut got = logits_of(m.encode(&b, &mut kv, &prefix[..split], 0, &want).unwrap());
        got.extend(logits_of(
            m.encode(&b, &mut kv, &prefix[split..], split, &want)
                .unwrap(),
        ));
        assert!(rel_l2(&got, &enc) < 1e-6, "split {split}");
        let d = logits_of(m.denoise(&b, &mut kv, &canvas, p, None, &want).unwrap());
        assert!(rel_l2(&d, &dec) < 1e-6, "split {split}: canvas");
    }
}

#[test]
fn q8_stays_close_to_transformers() {
    let (_tmp, m) = load(DType::Q8);
    for (case, err) in run_reference(&m, &reference()) {
        assert!(err < 5e-2, "{case}: q8 rel L2 {err:.3e}");
    }
}

#[test]
fn the_generic_model_and_a_bad_self_conditioning_input_are_typed_errors() {
    let (tmp, m) = load(DType::F32);
    let file = Arc::new(EdmFile::open(tmp.path().join("dg.edm")).unwrap());
    match edgediff::model::Model::load(&CpuBackend, file, &|_, _| true) {
        Err(ModelError::Backend(BackendError::Unsupported { .. })) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("the generic model loaded a DiffusionGemma file"),
    }
    let b = CpuBackend;
    let mut kv = m.new_kv(&b, 32).unwrap();
    m.encode(&b, &mut kv, &[5, 6, 7], 0, &want_logits())
        .unwrap();
    let short = vec![0.0; 3];
    assert!(matches!(
        m.denoise(&b, &mut kv, &[5, 6], 3, Some(&short), &want_logits()),
        Err(ModelError::Backend(BackendError::Shape { .. }))
    ));
    assert!(matches!(
        m.denoise(&b, &mut kv, &[5; 40], 3, None, &want_logits()),
        Err(ModelError::Context { .. })
    ));
}

/// A checkpoint's tensors: name, shape, values.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;
/// An edit of config.json.
type ConfigEdit = Box<dyn Fn(&mut Value)>;

/// The fixture copied to a temp dir with `edit` applied to its tensors and config.
fn broken(
    edit_tensors: &dyn Fn(&mut Tensors),
    edit_config: &dyn Fn(&mut Value),
) -> Result<(), ImportError> {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture().join(f), tmp.path().join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap())
            .unwrap();
    edit_config(&mut config);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    edit_tensors(&mut tensors);
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    convert(tmp.path(), &tmp.path().join("out.edm"), DType::F32)
}

#[test]
fn the_unchanged_copy_converts() {
    broken(&|_| {}, &|_| {}).unwrap();
}

#[test]
fn a_missing_encoder_layer_scalar_is_named() {
    let err = broken(
        &|t| t.retain(|(n, _, _)| n != "model.encoder.language_model.layers.1.layer_scalar"),
        &|_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&err, ImportError::MissingTensor(n) if n.contains("language_model.layers.1.layer_scalar")),
        "{err}"
    );
}

#[test]
fn a_v_projection_on_a_k_eq_v_layer_is_refused_not_dropped() {
    let err = broken(
        &|t| {
            t.push((
                "model.decoder.layers.2.self_attn.v_proj.weight".into(),
                vec![12, 24],
                vec![0.5; 12 * 24],
            ))
        },
        &|_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, ImportError::UnexpectedTensor(ref n) if n.contains("v_proj")),
        "{err}"
    );
}

#[test]
fn a_misshapen_global_projection_is_a_shape_error() {
    // The config says global heads of 12; a k_proj of 8-dim heads does not fit.
    let err = broken(
        &|t| {
            for (n, s, v) in t.iter_mut() {
                if n == "model.decoder.layers.2.self_attn.k_proj.weight" {
                    *s = vec![8, 24];
                    v.truncate(8 * 24);
                }
            }
        },
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, ImportError::Shape { .. }), "{err}");
}

#[test]
fn bad_configs_are_typed_errors() {
    let cases: Vec<(&str, ConfigEdit)> = vec![
        (
            "no text_config",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("text_config");
            }),
        ),
        (
            "bidirectional encoder",
            Box::new(|c| c["text_config"]["use_bidirectional_attention"] = "all".into()),
        ),
        (
            "other activation",
            Box::new(|c| c["text_config"]["hidden_activation"] = "silu".into()),
        ),
        (
            "untied head",
            Box::new(|c| c["text_config"]["tie_word_embeddings"] = false.into()),
        ),
        (
            "yarn RoPE",
            Box::new(|c| {
                c["text_config"]["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into()
            }),
        ),
        (
            "heads not a multiple of global KV heads",
            Box::new(|c| {
                c["text_config"]["per_layer_config"]["2"]["num_key_value_heads"] = 3.into()
            }),
        ),
        (
            "layer types of another length",
            Box::new(|c| {
                c["text_config"]["layer_types"] = serde_json::json!(["full_attention"]);
            }),
        ),
        (
            "no experts field",
            Box::new(|c| {
                c["text_config"]
                    .as_object_mut()
                    .unwrap()
                    .remove("num_experts");
            }),
        ),
    ];
    for (what, edit) in cases {
        match broken(&|_| {}, &|c| edit(c)) {
            Err(ImportError::Config(_) | ImportError::Unsupported(_)) => {}
            Err(e) => panic!("{what}: unexpected error kind: {e}"),
            Ok(()) => panic!("{what}: converted"),
        }
    }
}

/// The fixture on the GPU (issue 18 stage 2): every pass of the reference within the f32 bound
/// of transformers' logits, as on the CPU.
#[test]
fn the_gpu_backend_matches_transformers_on_the_fixture() {
    let (tmp, _) = load(DType::F32);
    let r = reference();
    let gpus = edgediff::backend::gpu::testing::backends(None);
    assert!(!gpus.is_empty() || edgediff::backend::gpu::testing::skip_requested());
    for (label, g) in gpus {
        let file = Arc::new(EdmFile::open(tmp.path().join("dg.edm")).unwrap());
        let m = CanvasModel::load(&g, file).unwrap();
        for (what, err) in run_reference_on(&g, &m, &r) {
            assert!(err <= TOL, "{label}: {what} relative L2 {err:e} > {TOL:e}");
        }
    }
}

/// The synthetic family (`synth --arch diffusion_gemma`): its checkpoint converts and runs, and
/// its window (4) binds: a wider one changes what the encoder computes from position 4 on, and
/// every canvas row.
#[test]
fn synthetic_diffusion_gemma_runs_and_its_window_binds() {
    let tmp = tempfile::tempdir().unwrap();
    let b = CpuBackend;
    let run = |window: usize, name: &str| -> (Vec<f32>, Vec<f32>, usize) {
        let spec = synth::SynthSpec {
            sliding_window: window,
            ..synth::SynthSpec::tiny(Architecture::DiffusionGemma)
        };
        let path = tmp.path().join(format!("{name}.edm"));
        synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
        let m = CanvasModel::load(&b, Arc::new(EdmFile::open(&path).unwrap())).unwrap();
        assert_eq!(m.config.architecture, Architecture::DiffusionGemma);
        let mut kv = m.new_kv(&b, 32).unwrap();
        let prefix = [1, 40, 77, 300, 12, 3, 90, 41, 7];
        let enc = logits_of(m.encode(&b, &mut kv, &prefix, 0, &want_logits()).unwrap());
        let canvas = [5, 6, 7, 8, 9, 10, 11, 12];
        let dec = logits_of(
            m.denoise(&b, &mut kv, &canvas, prefix.len(), None, &want_logits())
                .unwrap(),
        );
        (enc, dec, m.config.vocab_size)
    };
    let (enc4, dec4, v) = run(4, "narrow");
    let (enc_wide, dec_wide, _) = run(64, "wide");
    assert_eq!(
        enc4[..4 * v],
        enc_wide[..4 * v],
        "the window cannot bind before position 4"
    );
    assert!(rel_l2(&enc4[4 * v..], &enc_wide[4 * v..]) > 1e-3);
    assert!(rel_l2(&dec4, &dec_wide) > 1e-3);
}

#[test]
fn the_26b_a4b_preset_has_gemma_4_26b_a4b_shapes() {
    let spec = synth::SynthSpec::diffusion_gemma_26b_a4b();
    let special = synth::Specials {
        pad: 0,
        bos: 2,
        eos: 1,
        mask: 3,
    };
    let c = import::parse_config(&spec.hf_config(&special)).unwrap();
    assert_eq!(
        (c.num_layers, c.hidden_size, c.vocab_size),
        (30, 2816, 262_144)
    );
    let (local, global) = (c.attn_of(0), c.attn_of(5));
    assert_eq!(
        (local.kv_heads, local.head_dim, local.window),
        (8, 256, Some(512))
    );
    assert_eq!(
        (global.kv_heads, global.head_dim, global.window),
        (2, 512, None)
    );
    assert_eq!((global.rope.pairs, global.has_v), (64, false));
    let globals: Vec<usize> = (0..30).filter(|&l| c.attn_of(l).window.is_none()).collect();
    assert_eq!(globals, [5, 11, 17, 23, 29]);
    assert_eq!(
        (
            c.moe.num_experts,
            c.moe.top_k,
            c.moe.expert_ffn,
            c.dense_ffn
        ),
        (128, 8, 704, 2112)
    );
    // ≈ 25.2 B parameters, ≈ 3.8 B active with the (tied) embedding: the model's name.
    let (total, active) = c.parameter_counts();
    let embed = (c.vocab_size * c.hidden_size) as u64;
    assert!((25_000_000_000..25_500_000_000).contains(&total), "{total}");
    assert!(
        (3_600_000_000..4_000_000_000).contains(&(active + embed)),
        "{active}"
    );
}

/// transformers' draws, replayed in the order they were made; asking for another kind of draw
/// than transformers made next is a failure (the samplers would have diverged).
struct Replay<'a> {
    draws: &'a [Value],
    at: usize,
}

impl Replay<'_> {
    fn next(&mut self, kind: &str, len: usize) -> &Value {
        let d = self.draws.get(self.at).unwrap_or_else(|| {
            panic!(
                "draw {} ({kind}) beyond transformers' {}",
                self.at,
                self.draws.len()
            )
        });
        self.at += 1;
        let v = d.get(kind).unwrap_or_else(|| {
            panic!(
                "draw {}: edgediff asks for {kind}, transformers drew {d}",
                self.at - 1
            )
        });
        assert_eq!(v.as_array().unwrap().len(), len, "draw {}", self.at - 1);
        v
    }
}

impl CanvasDraws for Replay<'_> {
    fn noise(&mut self, len: usize, _vocab: usize) -> Vec<u32> {
        ids(self.next("noise", len))
    }
    fn uniforms(&mut self, len: usize) -> Vec<f32> {
        self.next("u", len)
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }
}

#[test]
fn the_canvas_sampler_commits_transformers_tokens_given_the_same_draws() {
    let (_tmp, m) = load(DType::F32);
    check_samplers(&m, &reference());
}

/// Every sampler run of a reference, replayed: same draws asked in the same order, same steps
/// per canvas, same committed tokens.
fn check_samplers(m: &CanvasModel<CpuBackend>, r: &Value) {
    for (case, s) in r["samplers"].as_array().unwrap().iter().enumerate() {
        let q = &s["params"];
        let params = CanvasParams {
            max_new_tokens: q["max_new_tokens"].as_u64().unwrap() as usize,
            steps: q["max_denoising_steps"].as_u64().unwrap() as usize,
            entropy_bound: q["entropy_bound"].as_f64().unwrap() as f32,
            t_min: q["t_min"].as_f64().unwrap() as f32,
            t_max: q["t_max"].as_f64().unwrap() as f32,
            stability: q["stability_threshold"].as_u64().unwrap() as usize,
            confidence: q["confidence_threshold"].as_f64().unwrap() as f32,
            eos: q["eos_token_id"].as_u64().map(|e| e as u32),
            pad: q["pad_token_id"].as_u64().unwrap() as u32,
        };
        let draws = s["draws"].as_array().unwrap();
        let mut replay = Replay { draws, at: 0 };
        let prompt = ids(&s["prompt"]);
        let mut kv = m.new_kv(&CpuBackend, prompt.len() + 64).unwrap();
        let out = canvas::generate(&CpuBackend, m, &mut kv, &prompt, &params, &mut replay).unwrap();
        assert_eq!(out.tokens, ids(&s["tokens"]), "case {case}: tokens");
        let steps: Vec<usize> = ids(&s["steps"]).iter().map(|&n| n as usize).collect();
        assert_eq!(out.steps, steps, "case {case}: steps per canvas");
        assert_eq!(replay.at, draws.len(), "case {case}: draws used");
        assert_eq!(
            out.finished,
            params.eos.is_some_and(|e| out.tokens.contains(&e))
        );
    }
}
