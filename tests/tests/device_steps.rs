//! Block diffusion with its denoising steps chained on the device (decode/chain.rs) against the
//! host-decided loop, on the CPU and on every GPU configuration (lavapipe here; outputs poisoned
//! with NaN): for every commit policy the device runs, random synthetic models and the committed
//! default model, block sizes 16, 32 and 7, prompts ending inside a block, with and without the
//! EOS rule, both loops commit the same tokens in the same steps, report the same canvases in the
//! same order, stream the same ids, and finish for the same reason. The chained loop must really
//! chain: fewer pass turns than passes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::gpu::testing::backends;
use edgediff::backend::Backend;
use edgediff::decode::{
    self, BlockOptions, Canvas, Cell, CommitPolicy, DecodeOutcome, DecodeParams, DecoderKind,
    DeviceSteps, Flow, Observer, Prediction, SpecialIds,
};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, Model};
use edgediff::synth::{self, SynthSpec};

/// Collects what a generation reports, and counts its pass turns.
#[derive(Default)]
struct Recorder {
    ids: Vec<u32>,
    canvases: Vec<(usize, Vec<Cell>)>,
    turns: usize,
}

impl Observer for Recorder {
    fn committed(&mut self, ids: &[u32]) -> Flow {
        self.ids.extend_from_slice(ids);
        Flow::Continue
    }
    fn canvas(&mut self, canvas: &Canvas) {
        // `forward_passes` differs by design (passes recorded past a block's end).
        self.canvases.push((canvas.start, canvas.cells.clone()));
    }
    fn pass_done(&mut self) {
        self.turns += 1;
    }
}

fn write_synth(dir: &Path, spec: &SynthSpec, dtype: DType) -> PathBuf {
    let m = synth::build(spec).unwrap();
    let path = dir.join(format!("{}-{}-{dtype}.edm", spec.arch, spec.seed));
    synth::write_edm(&m, &path, dtype, &|_, _| {}).unwrap();
    path
}

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/default.edm")
}

fn load<B: Backend>(b: &B, path: &Path) -> (Model<B>, SpecialIds) {
    let file = Arc::new(EdmFile::open(path).unwrap());
    let st = file.header.metadata.special_tokens;
    let model = Model::load(b, file, &|_, _| true).unwrap();
    let special = SpecialIds {
        mask: st.mask,
        eos: st.eos,
    };
    (model, special)
}

fn run<B: Backend>(
    b: &B,
    model: &Model<B>,
    special: SpecialIds,
    prompt: &[u32],
    p: &DecodeParams,
) -> (DecodeOutcome, Recorder) {
    let mut kv = model.new_kv(b, prompt.len() + p.max_new_tokens).unwrap();
    let mut rec = Recorder::default();
    let out = decode::decode(b, model, &mut kv, prompt, special, p, &mut rec).unwrap();
    assert_eq!(rec.ids, out.tokens, "the observer saw the output in order");
    (out, rec)
}

/// Both loops on one request: the host loop's tokens, and the pass turns each loop took (host,
/// device).
fn same_either_way<B: Backend>(
    what: &str,
    b: &B,
    model: &Model<B>,
    special: SpecialIds,
    prompt: &[u32],
    p: &DecodeParams,
) -> (Vec<u32>, usize, usize) {
    let host = DecodeParams {
        device_steps: DeviceSteps::Host,
        ..p.clone()
    };
    let device = DecodeParams {
        device_steps: DeviceSteps::Device,
        ..p.clone()
    };
    let (h, hr) = run(b, model, special, prompt, &host);
    let (d, dr) = run(b, model, special, prompt, &device);
    assert_eq!(d.tokens, h.tokens, "{what}: tokens");
    assert_eq!(d.finish_reason, h.finish_reason, "{what}: finish");
    assert_eq!(d.details, h.details, "{what}: blocks and steps");
    assert_eq!(dr.canvases, hr.canvases, "{what}: canvases");
    assert!(
        dr.turns <= hr.turns,
        "{what}: {} turns, host {}",
        dr.turns,
        hr.turns
    );
    eprintln!(
        "{what}: {:?}, turns {} -> {}",
        h.details, hr.turns, dr.turns
    );
    (h.tokens, hr.turns, dr.turns)
}

/// Policies at values where the tiny random models' statistics sit on both sides of them
/// (p_max ≈ 1/512 .. 1/100, entropy ≈ 6 nats), so each step's choice is a real one.
fn synth_policies() -> Vec<CommitPolicy> {
    vec![
        CommitPolicy::Threshold { threshold: 0.006 },
        CommitPolicy::Threshold { threshold: 0.9 },
        CommitPolicy::FixedSteps { steps: 3 },
        CommitPolicy::FixedSteps { steps: 20 },
        CommitPolicy::EntropyBound { gamma: 12.3 },
        CommitPolicy::EntropyBound { gamma: 0.0 },
        CommitPolicy::Margin { margin: 0.001 },
        CommitPolicy::Margin { margin: 0.5 },
    ]
}

fn block(block_size: usize) -> DecoderKind {
    DecoderKind::Block(BlockOptions {
        block_size,
        reuse_last_kv: false,
    })
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 7919 + seed * 104_729) % 500)
        .collect()
}

/// The policies of [`synth_policies`] (indices `which`) on two random models, block sizes
/// rotating over 16 / 32 / 7 and prompt lengths over 5 / 21 / 40 (each ends inside a block), 45
/// new tokens; then the same request with an EOS id the host loop commits mid-generation, so the
/// EOS rule fills blocks and ends generation.
fn check_synth<B: Backend>(name: &str, b: &B, paths: &[(PathBuf, Prediction)], which: &[usize]) {
    for (path, prediction) in paths {
        let (model, special) = load(b, path);
        let mut saved = 0;
        let policies = synth_policies();
        for &i in which {
            let policy = policies[i];
            let bs = [16, 32, 7][i % 3];
            let prompt = prompt([5, 21, 40][(i / 3) % 3], i as u32);
            let p = DecodeParams {
                decoder: block(bs),
                policy,
                max_new_tokens: 45,
                ignore_eos: true,
                prediction: *prediction,
                ..DecodeParams::default()
            };
            let what = format!("{name} {path:?} {policy:?} B={bs}");
            let (tokens, host, device) = same_either_way(&what, b, &model, special, &prompt, &p);
            saved += host - device;
            let eos = SpecialIds {
                eos: Some(tokens[tokens.len() / 2]),
                ..special
            };
            let p = DecodeParams {
                ignore_eos: false,
                ..p
            };
            let (ended, ..) = same_either_way(&format!("{what} eos"), b, &model, eos, &prompt, &p);
            assert!(ended.len() < tokens.len(), "{what}: the EOS id ends it");
        }
        // The device loop must really chain steps.
        assert!(saved > 10, "{name} {path:?}: {saved} turns saved");
    }
}

fn synth_models(dir: &Path, dtype: DType) -> Vec<(PathBuf, Prediction)> {
    let llada = SynthSpec {
        seed: 11,
        ..SynthSpec::tiny(Architecture::Llada2Moe)
    };
    let qwen = SynthSpec {
        seed: 5,
        ..SynthSpec::tiny(Architecture::Qwen3Moe)
    };
    vec![
        (write_synth(dir, &llada, dtype), Prediction::InPlace),
        // Masks predict in place, causal rows the next token: block diffusion reads the former.
        (write_synth(dir, &qwen, dtype), Prediction::Hybrid),
    ]
}

#[test]
fn chained_steps_commit_the_host_loops_tokens_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let every: Vec<usize> = (0..synth_policies().len()).collect();
    check_synth(
        "cpu",
        &CpuBackend,
        &synth_models(dir.path(), DType::F32),
        &every,
    );
}

#[test]
fn chained_steps_commit_the_host_loops_tokens_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let models = synth_models(dir.path(), DType::Q8);
    // Every policy on the GPU, each of a pair's two values (a low and a high one of each policy
    // family) on another configuration when there are two: CI's 2-core lavapipe time.
    let n = synth_policies().len();
    let configs = backends(None);
    let share = configs.len().max(1);
    for (k, (name, gpu)) in configs.into_iter().enumerate() {
        let which: Vec<usize> = (0..n).filter(|i| (i + k) % share == 0).collect();
        let submissions = gpu.submissions();
        check_synth(&name, &gpu, &models, &which);
        assert!(gpu.submissions() > submissions);
    }
}

/// The committed default model (trained: peaked statistics, several tokens a step, a real EOS)
/// under the policies `which` picks of those the device runs, with its own prediction convention.
fn check_default<B: Backend>(name: &str, b: &B, which: &[usize]) {
    let (model, special) = load(b, &default_model());
    let prediction = model
        .file
        .header
        .metadata
        .decoding
        .prediction
        .unwrap_or(Prediction::for_architecture(model.config.architecture));
    let policies = [
        CommitPolicy::Threshold { threshold: 0.9 },
        CommitPolicy::FixedSteps { steps: 4 },
        CommitPolicy::EntropyBound { gamma: 0.5 },
        CommitPolicy::Margin { margin: 0.6 },
    ];
    for &i in which {
        let (policy, bs) = (policies[i], [16, 32, 13, 16][i]);
        let p = DecodeParams {
            decoder: block(bs),
            policy,
            max_new_tokens: 24,
            prediction,
            ..DecodeParams::default()
        };
        let what = format!("{name} default model {policy:?} B={bs}");
        let (_, host, device) =
            same_either_way(&what, b, &model, special, &prompt(9, i as u32), &p);
        assert!(device < host, "{what}: the device loop must chain steps");
    }
}

/// Every policy on the CPU; on the GPU one per configuration (the default model's passes are slow
/// on a software adapter, and the synthetic test above runs every policy there).
#[test]
fn chained_steps_on_the_default_model_match_the_host_loop() {
    check_default("cpu", &CpuBackend, &[0, 1, 2, 3]);
    for (k, (name, gpu)) in backends(None).into_iter().enumerate() {
        check_default(&name, &gpu, &[(2 * k) % 4]);
    }
}
