//! Block diffusion with its denoising steps chained on the device (decode/chain.rs) against the
//! host-decided loop, on the CPU and on every GPU configuration (lavapipe here; outputs poisoned
//! with NaN): for every commit policy the device runs, random synthetic models and the committed
//! default model, block sizes 16, 32 and 7, prompts ending inside a block, with and without the
//! EOS rule, both loops commit the same tokens in the same steps, report the same canvases in the
//! same order, stream the same ids, and finish for the same reason. The chained loop must really
//! chain: fewer pass turns than passes.
//!
//! AR with its passes chained on the device (decode/ar.rs) the same way against its host loop:
//! in-place and next-token models (random and the default model), EOS on and off, a stop, lengths
//! below, across and not a multiple of a submission's steps; through the engine with a stop string.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::gpu::testing::backends;
use edgediff::backend::Backend;
use edgediff::decode::{
    self, BlockOptions, Canvas, Cell, CommitPolicy, DecodeOutcome, DecodeParams, DecoderKind,
    DeviceSteps, FinishReason, Flow, Observer, Prediction, SpecialIds,
};
use edgediff::engine::{Engine, Event, Pacer, Prompt};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, Model};
use edgediff::synth::{self, SynthSpec};

/// Collects what a generation reports, and counts its pass turns; stops the generation once it
/// has seen `stop_at` (what a stop string does through the engine).
#[derive(Default)]
struct Recorder {
    ids: Vec<u32>,
    canvases: Vec<(usize, Vec<Cell>)>,
    turns: usize,
    stop_at: Option<u32>,
}

impl Observer for Recorder {
    fn committed(&mut self, ids: &[u32]) -> Flow {
        self.ids.extend_from_slice(ids);
        match self.stop_at {
            Some(id) if ids.contains(&id) => Flow::Stop,
            _ => Flow::Continue,
        }
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
    run_with(b, model, special, prompt, p, Recorder::default())
}

fn run_with<B: Backend>(
    b: &B,
    model: &Model<B>,
    special: SpecialIds,
    prompt: &[u32],
    p: &DecodeParams,
    mut rec: Recorder,
) -> (DecodeOutcome, Recorder) {
    let mut kv = model.new_kv(b, prompt.len() + p.max_new_tokens).unwrap();
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
/// rotating over 16 / 32 / 7 and prompt lengths over 5 / 21 / 40 (each ends inside a block),
/// `new_tokens` new tokens (45 on the CPU; 30 on the GPU still cross a block boundary in every
/// case); then the same request with an EOS id the host loop commits mid-generation, so the EOS
/// rule fills blocks and ends generation.
fn check_synth<B: Backend>(
    name: &str,
    b: &B,
    paths: &[(PathBuf, Prediction)],
    which: &[usize],
    new_tokens: usize,
) {
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
                max_new_tokens: new_tokens,
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
    // Masks predict in place, causal rows the next token: block diffusion reads the former.
    llada_and_qwen(dir, dtype, (11, 5), Prediction::Hybrid)
}

/// A random LLaDA2 model (in place) and a random Qwen3-MoE one read as `qwen`, of these seeds.
fn llada_and_qwen(
    dir: &Path,
    dtype: DType,
    (llada_seed, qwen_seed): (u64, u64),
    qwen: Prediction,
) -> Vec<(PathBuf, Prediction)> {
    let llada = SynthSpec {
        seed: llada_seed,
        ..SynthSpec::tiny(Architecture::Llada2Moe)
    };
    let qwen_spec = SynthSpec {
        seed: qwen_seed,
        ..SynthSpec::tiny(Architecture::Qwen3Moe)
    };
    vec![
        (write_synth(dir, &llada, dtype), Prediction::InPlace),
        (write_synth(dir, &qwen_spec, dtype), qwen),
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
        45,
    );
}

#[test]
fn chained_steps_commit_the_host_loops_tokens_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let models = synth_models(dir.path(), DType::Q8);
    // Every policy on the GPU, each of a pair's two values (a low and a high one of each policy
    // family) on another configuration when there are two, 30 new tokens (the CPU test runs 45):
    // CI's 2-core lavapipe time.
    let n = synth_policies().len();
    let configs = backends(None);
    let share = configs.len().max(1);
    for (k, (name, gpu)) in configs.into_iter().enumerate() {
        let which: Vec<usize> = (0..n).filter(|i| (i + k) % share == 0).collect();
        let submissions = gpu.submissions();
        check_synth(&name, &gpu, &models, &which, 30);
        assert!(gpu.submissions() > submissions);
    }
}

/// The committed default model (trained: peaked statistics, several tokens a step, a real EOS)
/// under the policies `which` picks of those the device runs, with its own prediction convention,
/// `new_tokens` new tokens after a 9-token prompt (12 end inside the second block of the GPU's
/// block sizes, 16 and 13; 24 on the CPU reach past 32).
fn check_default<B: Backend>(name: &str, b: &B, which: &[usize], new_tokens: usize) {
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
            max_new_tokens: new_tokens,
            prediction,
            ..DecodeParams::default()
        };
        let what = format!("{name} default model {policy:?} B={bs}");
        let (_, host, device) =
            same_either_way(&what, b, &model, special, &prompt(9, i as u32), &p);
        assert!(device < host, "{what}: the device loop must chain steps");
    }
}

/// Every policy on the CPU, 24 tokens; on the GPU one per configuration, 12 tokens (a 16-row pass
/// of the default model takes about 2 s on lavapipe here; the synthetic test above runs every
/// policy on the GPU, and the CPU here the longer requests).
#[test]
fn chained_steps_on_the_default_model_match_the_host_loop() {
    check_default("cpu", &CpuBackend, &[0, 1, 2, 3], 24);
    for (k, (name, gpu)) in backends(None).into_iter().enumerate() {
        check_default(&name, &gpu, &[(2 * k) % 4], 12);
    }
}

/// AR both ways on one request, stopping at `stop_at` if given: same tokens, finish and details,
/// and the device loop chains (at most one pass turn per 8 tokens, the first submission's steps,
/// where the host loop takes one per token). Returns the host loop's outcome.
fn ar_either_way<B: Backend>(
    what: &str,
    b: &B,
    model: &Model<B>,
    special: SpecialIds,
    prompt: &[u32],
    p: &DecodeParams,
    stop_at: Option<u32>,
) -> DecodeOutcome {
    let with = |device_steps| DecodeParams {
        device_steps,
        ..p.clone()
    };
    let rec = || Recorder {
        stop_at,
        ..Recorder::default()
    };
    let (h, hr) = run_with(b, model, special, prompt, &with(DeviceSteps::Host), rec());
    let (d, dr) = run_with(b, model, special, prompt, &with(DeviceSteps::Device), rec());
    assert_eq!(d.tokens, h.tokens, "{what}: tokens");
    assert_eq!(d.finish_reason, h.finish_reason, "{what}: finish");
    assert_eq!(d.details, h.details, "{what}");
    // Tokens the passes made: the EOS that ended it too.
    let made = h.tokens.len() + usize::from(h.finish_reason == FinishReason::Eos);
    // Each loop hands back one more turn at its end (decode's last `running()` check).
    assert_eq!(hr.turns, made + 1, "{what}: the host loop's turns");
    // A first submission of one step (the first token streams at once), then ≥ 8 a submission.
    assert!(
        dr.turns <= 1 + made.saturating_sub(1).div_ceil(8) + 1,
        "{what}: {} turns for {made} tokens",
        dr.turns
    );
    // Passes recorded past the end are wasted, never missing.
    assert!(d.forward_passes >= h.forward_passes, "{what}: passes");
    eprintln!(
        "{what}: {} tokens ({:?}), turns {} -> {}, passes {} -> {}",
        h.tokens.len(),
        h.finish_reason,
        hr.turns,
        dr.turns,
        h.forward_passes,
        d.forward_passes
    );
    h
}

fn ar(prediction: Prediction, max_new_tokens: usize, ignore_eos: bool) -> DecodeParams {
    DecodeParams {
        decoder: DecoderKind::Ar,
        max_new_tokens,
        ignore_eos,
        prediction,
        ..DecodeParams::default()
    }
}

/// The first id of `tokens` at or after index `from` that does not occur before it (an EOS or
/// stop id that ends a generation there, not earlier).
fn first_new_from(tokens: &[u32], from: usize) -> u32 {
    (from..tokens.len())
        .map(|i| tokens[i])
        .zip(from..)
        .find(|&(t, i)| !tokens[..i].contains(&t))
        .map_or(tokens[from], |(t, _)| t)
}

/// What [`check_ar`] asks of a model.
struct ArRequests {
    prediction: Prediction,
    /// Of the prompt.
    seed: u32,
    len: usize,
    all: bool,
}

/// AR's requests on one model: `len` tokens with EOS ignored (45 makes submissions of 1, 8, 16
/// and the 20 left: not a multiple of a submission's steps); when `len` allows, an EOS id the
/// host loop first commits after the first two submissions, with the EOS rule on. `all`: also a
/// stop at a later id, and 5 tokens (fewer than the second submission's steps).
fn check_ar<B: Backend>(name: &str, b: &B, model: &Model<B>, special: SpecialIds, r: ArRequests) {
    let ArRequests {
        prediction,
        seed,
        len,
        all,
    } = r;
    let what = format!("{name} AR {prediction:?}");
    let prompt = prompt(7 + seed as usize % 5, seed);
    let run = |tag: &str, special: SpecialIds, p: DecodeParams, stop_at: Option<u32>| {
        let what = format!("{what} {tag}");
        ar_either_way(&what, b, model, special, &prompt, &p, stop_at)
    };
    let long = run("long", special, ar(prediction, len, true), None);
    assert_eq!(long.tokens.len(), len, "{what}");
    // The host loop's tokens up to the first `id` (`and`: with it).
    let upto = |id: u32, and: usize| {
        let i = long.tokens.iter().position(|&t| t == id).unwrap();
        long.tokens[..i + and].to_vec()
    };
    if len > 12 {
        let eos = first_new_from(&long.tokens, 10);
        let special = SpecialIds {
            eos: Some(eos),
            ..special
        };
        let ended = run("eos", special, ar(prediction, len, false), None);
        assert_eq!(ended.finish_reason, FinishReason::Eos, "{what}");
        assert_eq!(ended.tokens, upto(eos, 0), "{what}: EOS ends it there");
    }
    if !all {
        return;
    }
    let stop_at = first_new_from(&long.tokens, 26);
    let stopped = run("stop", special, ar(prediction, len, true), Some(stop_at));
    assert_eq!(stopped.finish_reason, FinishReason::Stop, "{what}");
    assert_eq!(
        stopped.tokens,
        upto(stop_at, 1),
        "{what}: the stop ends it there"
    );
    let few = run("5", special, ar(prediction, 5, false), None);
    assert_eq!(few.tokens[..], long.tokens[..few.tokens.len()], "{what}");
}

/// A random in-place model (LLaDA2: the pass is `[last token, mask]`) and a random next-token one
/// (Qwen3-MoE: `[last token]`).
fn ar_synth_models(dir: &Path, dtype: DType) -> Vec<(PathBuf, Prediction)> {
    llada_and_qwen(dir, dtype, (3, 8), Prediction::NextToken)
}

/// The default model's own convention (hybrid: AR reads its causal rows, next-token) and in place
/// (its masks predict in place too: AR's pass is then `[last token, mask]`).
fn ar_default_conventions() -> [Prediction; 2] {
    [Prediction::Hybrid, Prediction::InPlace]
}

#[test]
fn chained_ar_commits_the_host_loops_tokens_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = CpuBackend;
    let models = ar_synth_models(dir.path(), DType::F32);
    for (i, (path, prediction)) in models.into_iter().enumerate() {
        let (model, special) = load(&cpu, &path);
        let r = ArRequests {
            prediction,
            seed: i as u32,
            len: 45,
            all: true,
        };
        check_ar("cpu synth", &cpu, &model, special, r);
    }
    let (model, special) = load(&cpu, &default_model());
    for (i, prediction) in ar_default_conventions().into_iter().enumerate() {
        let r = ArRequests {
            prediction,
            seed: 7 + i as u32,
            len: 45,
            all: true,
        };
        check_ar("cpu default", &cpu, &model, special, r);
    }
}

/// Fewer requests than on the CPU (lavapipe runs a pass of the default model in about a third of
/// a second; the host-side bookkeeping the rest check is the CPU test's): on the first
/// configuration both random models, 21 tokens (submissions of 1, 8 and 12) and an EOS; on the
/// next (a submission every pass) the next-token model.
#[test]
fn chained_ar_commits_the_host_loops_tokens_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let models = ar_synth_models(dir.path(), DType::Q8);
    for (k, (name, gpu)) in backends(None).into_iter().enumerate() {
        let submissions = gpu.submissions();
        for (i, (path, prediction)) in models.iter().enumerate() {
            if k > 0 && *prediction == Prediction::InPlace {
                continue;
            }
            let (model, special) = load(&gpu, path);
            let r = ArRequests {
                prediction: *prediction,
                seed: i as u32,
                len: 21,
                all: false,
            };
            check_ar(&name, &gpu, &model, special, r);
        }
        // The default model's AR runs on the CPU test above (≈ 0.3 s a pass on lavapipe here);
        // the synthetic LLaDA2 model covers the in-place pass on the GPU.
        assert!(gpu.submissions() > submissions);
    }
}

/// Counts a generation's pass turns.
#[derive(Default)]
struct Turns {
    held: bool,
    turns: usize,
}

impl Pacer for Turns {
    fn turn(&mut self) -> bool {
        self.turns += usize::from(!self.held);
        self.held = true;
        true
    }
    fn done(&mut self) {
        self.held = false;
    }
}

/// Through the engine, on the default model's text: a stop string ends the chained loop where it
/// ends the host loop, with the same text streamed, in fewer pass turns.
#[test]
fn chained_ar_stops_at_a_stop_string() {
    let file = Arc::new(EdmFile::open(default_model()).unwrap());
    let engine = Engine::new(CpuBackend, file).unwrap();
    let mut r = engine.request(Prompt::Text("fn main() {".into()));
    r.decoding.decoder = DecoderKind::Ar;
    r.decoding.max_new_tokens = 40;
    r.decoding.ignore_eos = true;
    r.decoding.device_steps = DeviceSteps::Host;
    let full = engine.generate(&r, &mut |_| {}).unwrap();
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    assert!(chars.len() > 20, "text too short: {:?}", full.text);
    let (a, z) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 2].0);
    r.stop = vec![full.text[a..z].to_string()];
    let mut outs = Vec::new();
    for device_steps in [DeviceSteps::Host, DeviceSteps::Device] {
        r.decoding.device_steps = device_steps;
        let mut streamed = String::new();
        let mut turns = Turns::default();
        let out = engine
            .generate_paced(&r, &mut turns, &mut |ev| {
                if let Event::Text(t) = ev {
                    streamed.push_str(&t)
                }
            })
            .unwrap();
        assert_eq!(out.finish_reason, FinishReason::Stop, "{device_steps:?}");
        assert_eq!(streamed, out.text, "{device_steps:?}");
        outs.push((out.text, out.tokens, turns.turns));
    }
    let (host, device) = (&outs[0], &outs[1]);
    assert_eq!(device.0, host.0, "the stop string: {:?}", r.stop);
    assert_eq!(device.1, host.1);
    assert!(host.0.len() < full.text.len());
    assert!(
        2 * device.2 < host.2,
        "turns: host {}, device {}",
        host.2,
        device.2
    );
}
