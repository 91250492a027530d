//! The engine on the GPU backend against the same engine on the CPU: every decoder, greedy, commits
//! exactly the same tokens. The forward passes agree to relative L2 ≤ 1e-4 (gpu_forward.rs), and
//! greedy decisions (argmax, threshold on p_max, speculative acceptance) only differ on a near tie;
//! the prompts and models here have none, so the bound is equality, not a tolerance. Also: the
//! committed default model decodes on the GPU, and `--backend` resolves as documented. No adapter
//! fails these tests; only EDGEDIFF_SKIP_GPU_TESTS=1 skips them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::gpu::testing::{backends, skip_requested};
use edgediff::backend::gpu::{GpuBackend, GpuOptions};
use edgediff::backend::Backend;
use edgediff::decode::{
    BlockOptions, CommitPolicy, DecodeParams, DecoderKind, Prediction, Sampling, SpeculativeOptions,
};
use edgediff::engine::{
    BackendChoice, BackendPick, Engine, EngineConfig, EngineError, GenerationOutput, LoadedEngine,
    Prompt,
};
use edgediff::format::{DType, EdmFile};
use edgediff::model::Architecture;
use edgediff::synth::{self, SynthSpec};

const PROMPT: [u32; 11] = [1, 40, 77, 300, 12, 3, 90, 41, 7, 250, 33];

fn write_synth(dir: &Path, arch: Architecture, dtype: DType) -> PathBuf {
    let m = synth::build(&SynthSpec::tiny(arch)).unwrap();
    let path = dir.join(format!("{arch}-{dtype}.edm"));
    synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
    path
}

fn gpu() -> Option<GpuBackend> {
    backends(None).into_iter().next().map(|(_, b)| b)
}

fn params(decoder: DecoderKind, prediction: Prediction, max_new: usize) -> DecodeParams {
    DecodeParams {
        decoder,
        policy: CommitPolicy::Threshold { threshold: 0.9 },
        sampling: Sampling::greedy(),
        max_new_tokens: max_new,
        ignore_eos: true,
        prediction,
        ..DecodeParams::default()
    }
}

fn generate<B: Backend>(e: &Engine<B>, prompt: &Prompt, p: &DecodeParams) -> GenerationOutput {
    let mut r = e.request(prompt.clone());
    r.decoding = p.clone();
    e.generate(&r, &mut |_| {}).unwrap()
}

/// The decoders every model is checked under: AR, block diffusion, and lossless and β-mixed
/// speculative drafting where the causal rows predict the next token (the verifier needs AR
/// logits).
fn decoders(prediction: Prediction) -> Vec<(&'static str, DecodeParams)> {
    let block = |b| {
        DecoderKind::Block(BlockOptions {
            block_size: b,
            reuse_last_kv: false,
        })
    };
    let spec = |beta| DecoderKind::Speculative(SpeculativeOptions { draft_len: 4, beta });
    let mut all = vec![
        ("ar", params(DecoderKind::Ar, prediction, 12)),
        ("block 4", params(block(4), prediction, 13)),
    ];
    if prediction.causal() == Prediction::NextToken {
        all.push(("speculative β=1", params(spec(1.0), prediction, 12)));
        all.push(("speculative β=0.5", params(spec(0.5), prediction, 12)));
    }
    all
}

#[test]
fn every_decoder_commits_the_same_tokens_on_the_gpu_as_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, dtype, prediction) in [
        (Architecture::Llada2Moe, DType::F32, Prediction::InPlace),
        (Architecture::Qwen3Moe, DType::Q4, Prediction::NextToken),
        (Architecture::Olmoe, DType::Q8, Prediction::Hybrid),
        (Architecture::Zaya, DType::F32, Prediction::NextToken),
        (Architecture::Zaya, DType::Q8, Prediction::Hybrid),
    ] {
        let Some(g) = gpu() else { return };
        let path = write_synth(dir.path(), arch, dtype);
        let file = Arc::new(EdmFile::open(&path).unwrap());
        let cpu = Engine::new(CpuBackend, file.clone()).unwrap();
        let gpu = Engine::new(g, file).unwrap();
        let prompt = Prompt::Tokens(PROMPT.to_vec());
        for (name, p) in decoders(prediction) {
            let (c, g) = (generate(&cpu, &prompt, &p), generate(&gpu, &prompt, &p));
            let what = format!("{arch} {dtype} {prediction:?} {name}");
            assert!(!c.tokens.is_empty(), "{what}");
            assert_eq!(g.tokens, c.tokens, "{what}: tokens");
            assert_eq!(
                g.stats.forward_passes, c.stats.forward_passes,
                "{what}: forward passes"
            );
        }
    }
}

#[test]
fn zaya_with_a_binding_window_decodes_the_same_tokens_on_the_gpu() {
    // The sliding window of 2 binds from the third position on; speculative drafting rewrites the
    // conv state and delayed v behind rejected drafts on both backends.
    let dir = tempfile::tempdir().unwrap();
    let Some(g) = gpu() else { return };
    let spec = SynthSpec {
        sliding_window: 2,
        seed: 3,
        ..SynthSpec::tiny(Architecture::Zaya)
    };
    let path = dir.path().join("zaya-window-2.edm");
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
    let file = Arc::new(EdmFile::open(&path).unwrap());
    let cpu = Engine::new(CpuBackend, file.clone()).unwrap();
    let gpu = Engine::new(g, file).unwrap();
    let prompt = Prompt::Tokens(PROMPT.to_vec());
    for (name, p) in decoders(Prediction::NextToken) {
        let (c, g) = (generate(&cpu, &prompt, &p), generate(&gpu, &prompt, &p));
        assert!(!c.tokens.is_empty(), "{name}");
        assert_eq!(g.tokens, c.tokens, "zaya window 2 {name}: tokens");
        assert_eq!(
            g.stats.forward_passes, c.stats.forward_passes,
            "zaya window 2 {name}: forward passes"
        );
    }
}

#[test]
fn lossless_speculative_on_the_gpu_equals_ar_on_the_gpu() {
    // ZAYA1-8B-Diffusion-Preview's decoding on the GPU: drafts of 16 (its blocks) and of 5, β = 1,
    // commit AR's greedy tokens; rejected drafts roll the GPU's conv state and delayed v back.
    // And a q4 MoE wide enough that passes of 3 rows or more take 8-bit activation codes
    // (gpu_forward.rs): its verification rows are computed as AR's one-row passes.
    let dir = tempfile::tempdir().unwrap();
    let zaya = write_synth(dir.path(), Architecture::Zaya, DType::F32);
    let wide = edgediff_tests::write_wide_q4(dir.path(), Architecture::Qwen3Moe);
    for path in [zaya, wide] {
        let Some(g) = gpu() else { return };
        speculative_equals_ar(Engine::new(g, Arc::new(EdmFile::open(&path).unwrap())).unwrap());
    }
}

fn speculative_equals_ar(gpu: Engine<GpuBackend>) {
    for prompt in [&PROMPT[..1], &PROMPT[..]] {
        let prompt = Prompt::Tokens(prompt.to_vec());
        let ar = generate(
            &gpu,
            &prompt,
            &params(DecoderKind::Ar, Prediction::NextToken, 20),
        );
        assert_eq!(ar.tokens.len(), 20);
        for draft_len in [16, 5] {
            let spec = DecoderKind::Speculative(SpeculativeOptions {
                draft_len,
                beta: 1.0,
            });
            let s = generate(&gpu, &prompt, &params(spec, Prediction::NextToken, 20));
            assert_eq!(s.tokens, ar.tokens, "k={draft_len}");
            // Each pass commits at least one token: never more passes than AR.
            assert!(
                s.stats.forward_passes <= ar.stats.forward_passes,
                "k={draft_len}: {} passes vs AR {}",
                s.stats.forward_passes,
                ar.stats.forward_passes
            );
        }
    }
}

#[test]
fn the_default_model_decodes_on_the_gpu_as_on_the_cpu() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default.edm");
    if skip_requested() {
        return;
    }
    let gpu = LoadedEngine::load(
        &path,
        &EngineConfig {
            backend: BackendChoice::Gpu,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(gpu.on_gpu(), "{}", gpu.backend_name());
    let cpu = LoadedEngine::load(
        &path,
        &EngineConfig {
            backend: BackendChoice::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let prediction = cpu.default_decoding().prediction;
    assert_eq!(prediction, Prediction::Hybrid);
    let prompt = Prompt::Text("Once upon a time".into());
    let mut runs = vec![("default", cpu.default_decoding())];
    runs.extend(decoders(prediction).into_iter().map(|(n, mut p)| {
        p.ignore_eos = false;
        (n, p)
    }));
    // 12 tokens: past the first block of every block decoder here (the prompt is 5 tokens), at
    // about 2 s a 16-row pass of this model on lavapipe (CI's 2-core time); the synthetic models
    // above run every decoder at length.
    for (name, p) in runs {
        let mut r = cpu.request(prompt.clone());
        r.decoding = p;
        r.decoding.max_new_tokens = 12;
        let c = cpu.generate(&r, &mut |_| {}).unwrap();
        let g = gpu.generate(&r, &mut |_| {}).unwrap();
        assert!(!g.tokens.is_empty(), "{name}");
        assert_eq!(g.tokens, c.tokens, "{name}: {:?} vs {:?}", g.text, c.text);
        assert_eq!(g.text, c.text, "{name}");
    }
}

#[test]
fn backend_choice_resolves_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_synth(dir.path(), Architecture::Olmoe, DType::F32);
    let cpu = LoadedEngine::load(
        &path,
        &EngineConfig {
            backend: BackendChoice::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(cpu.backend_name(), CpuBackend.name());
    // Auto takes a hardware GPU, else the CPU with a notice; a software adapter alone (lavapipe in
    // CI) is passed over unless EDGEDIFF_ADAPTER names it.
    let pick = BackendPick::resolve(BackendChoice::Auto).unwrap();
    let auto = LoadedEngine::load(&path, &EngineConfig::default()).unwrap();
    match pick {
        BackendPick::Gpu(g) => {
            assert!(auto.on_gpu());
            assert_eq!(auto.backend_name(), g.name());
        }
        BackendPick::Cpu { notice } => {
            assert!(notice.is_some_and(|n| n.contains("CPU backend")));
            assert_eq!(auto.backend_name(), CpuBackend.name());
        }
    }
    if !skip_requested() {
        let gpu = LoadedEngine::load(
            &path,
            &EngineConfig {
                backend: BackendChoice::Gpu,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(gpu.on_gpu());
    }
    assert!(LoadedEngine::load(dir.path().join("missing.edm"), &EngineConfig::default()).is_err());
}

#[test]
fn a_forced_gpu_that_is_missing_is_a_typed_error_and_auto_falls_back() {
    let none = GpuOptions {
        adapter: Some("no-such-adapter".into()),
        ..GpuOptions::default()
    };
    match BackendPick::resolve_with(BackendChoice::Gpu, &none) {
        Err(EngineError::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "gpu");
            assert!(reason.contains("no-such-adapter"), "{reason}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a GPU that does not exist was opened"),
    }
    match BackendPick::resolve_with(BackendChoice::Auto, &none) {
        Ok(BackendPick::Cpu { notice: Some(n) }) => assert!(n.contains("CPU backend"), "{n}"),
        _ => panic!("auto without a GPU must fall back to the CPU with a notice"),
    }
}
