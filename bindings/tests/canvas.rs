//! The canvas decoder through the FFI (issue 18): an app picks DiffusionGemma's canvas sampler
//! (`Decoder::Canvas`, the default of such a model), its text streams canvas by canvas, a seeded
//! run repeats, the settings it sets take effect, cancellation ends it, experts can be paged, and
//! a decoder the model cannot run is a typed error.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgediff::format::DType;
use edgediff::model::Architecture;
use edgediff::synth::{self, SynthSpec};
use edgediff_ffi::{
    AdapterPreference, Decoder, EdgeDiffError, Engine, EngineConfig, FinishReasonKind,
    GenerationConfig, GenerationStats, TokenListener,
};

/// A tiny DiffusionGemma with a canvas of 5.
fn canvas_model(dir: &Path) -> PathBuf {
    let spec = SynthSpec {
        block_size: 5,
        seed: 3,
        ..SynthSpec::tiny(Architecture::DiffusionGemma)
    };
    let path = dir.join("dg.edm");
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
    path
}

fn load(path: &Path, expert_memory_budget: Option<u64>) -> Arc<Engine> {
    let config = EngineConfig {
        adapter: Some(AdapterPreference::Cpu),
        expert_memory_budget,
        ..EngineConfig::default()
    };
    Engine::load(path.to_string_lossy().into_owned(), config).unwrap()
}

#[derive(Debug)]
enum Call {
    Text(String),
    Finished(GenerationStats),
    Error(EdgeDiffError),
}

struct ChannelListener(Mutex<Sender<Call>>);

impl ChannelListener {
    fn new() -> (Arc<Self>, Receiver<Call>) {
        let (send, receive) = channel();
        (Arc::new(ChannelListener(Mutex::new(send))), receive)
    }
    fn send(&self, call: Call) -> Result<(), EdgeDiffError> {
        let _ = self.0.lock().unwrap().send(call);
        Ok(())
    }
}

impl TokenListener for ChannelListener {
    fn on_text(&self, text: String) -> Result<(), EdgeDiffError> {
        self.send(Call::Text(text))
    }
    fn on_finished(&self, stats: GenerationStats) -> Result<(), EdgeDiffError> {
        self.send(Call::Finished(stats))
    }
    fn on_error(&self, error: EdgeDiffError) -> Result<(), EdgeDiffError> {
        self.send(Call::Error(error))
    }
}

/// The streamed pieces and the last call.
fn drain(calls: &Receiver<Call>) -> (Vec<String>, Call) {
    let mut pieces = Vec::new();
    loop {
        match calls.recv_timeout(Duration::from_secs(120)).unwrap() {
            Call::Text(t) => pieces.push(t),
            last => return (pieces, last),
        }
    }
}

fn canvas(steps: u32) -> Decoder {
    Decoder::Canvas {
        steps: Some(steps),
        entropy_bound: None,
        t_max: None,
        t_min: None,
    }
}

fn config(max_new_tokens: u32, decoder: Option<Decoder>) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        decoder,
        seed: Some(7),
        ..GenerationConfig::default()
    }
}

fn finished(last: Call) -> GenerationStats {
    match last {
        Call::Finished(s) => s,
        other => panic!("expected on_finished, got {other:?}"),
    }
}

#[test]
fn an_app_generates_with_the_canvas_decoder_streamed_per_canvas() {
    let dir = tempfile::tempdir().unwrap();
    let path = canvas_model(dir.path());
    let engine = load(&path, None);
    assert_eq!(engine.model_info().architecture, "diffusion_gemma");

    // 12 tokens: three canvases of 5, 3 steps each (a random model is never confident).
    let (listener, calls) = ChannelListener::new();
    let _task = engine
        .clone()
        .generate("Once".into(), config(12, Some(canvas(3))), listener)
        .unwrap();
    let (pieces, last) = drain(&calls);
    let stats = finished(last);
    assert_eq!(stats.finish_reason, FinishReasonKind::Length);
    assert_eq!(stats.new_tokens, 12);
    assert_eq!(stats.decoder, "canvas: 3 canvases, 9 steps");
    assert!(
        (2..=3).contains(&pieces.len()),
        "text streams per committed canvas: {pieces:?}"
    );
    let text: String = pieces.concat();

    // The same seed through the one-shot call gives the streamed text.
    let whole = pollster::block_on(
        engine
            .clone()
            .generate_async("Once".into(), config(12, Some(canvas(3)))),
    )
    .unwrap();
    assert_eq!(whole.text, text);
    assert_eq!(whole.tokens.len(), 12);

    // Without a decoder the model's own runs: the canvas sampler with the file's 48 steps.
    let default = pollster::block_on(
        engine
            .clone()
            .generate_async("Once".into(), config(5, None)),
    )
    .unwrap();
    assert_eq!(default.stats.decoder, "canvas: 1 canvases, 48 steps");
    // A setting changes what is decoded; one left out keeps the model's.
    let hot = Decoder::Canvas {
        steps: Some(3),
        entropy_bound: None,
        t_max: Some(3.0),
        t_min: None,
    };
    let other = pollster::block_on(
        engine
            .clone()
            .generate_async("Once".into(), config(12, Some(hot))),
    )
    .unwrap();
    assert_eq!(other.stats.decoder, "canvas: 3 canvases, 9 steps");
    assert_ne!(other.tokens, whole.tokens);

    // Experts paged through a pool of 2 (CPU slots hold f32 experts: 3 x 20 x 40 x 4 bytes):
    // exact, the same text.
    let paged = load(&path, Some(2 * 3 * 20 * 40 * 4));
    let same = pollster::block_on(paged.generate_async("Once".into(), config(12, Some(canvas(3)))))
        .unwrap();
    assert_eq!(same.tokens, whole.tokens);
}

#[test]
fn cancelling_a_canvas_generation_ends_it_with_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&canvas_model(dir.path()), None);
    let (listener, calls) = ChannelListener::new();
    let task = engine
        .generate("Once".into(), config(300, Some(canvas(4))), listener)
        .unwrap();
    let Call::Text(_) = calls.recv_timeout(Duration::from_secs(120)).unwrap() else {
        panic!("expected the first canvas's text first")
    };
    task.cancel();
    let (_, last) = drain(&calls);
    let stats = finished(last);
    assert_eq!(stats.finish_reason, FinishReasonKind::Cancelled);
    assert!(stats.new_tokens < 300, "{stats:?}");
}

/// A decoder the model cannot run is an InvalidArgument, before or while generating.
fn refused(engine: &Arc<Engine>, decoder: Decoder) -> String {
    let (listener, calls) = ChannelListener::new();
    match engine
        .clone()
        .generate("x".into(), config(5, Some(decoder)), listener)
    {
        Err(EdgeDiffError::InvalidArgument(m)) => m,
        Err(e) => panic!("{decoder:?}: {e:?}"),
        Ok(_) => match drain(&calls).1 {
            Call::Error(EdgeDiffError::InvalidArgument(m)) => m,
            other => panic!("{decoder:?}: {other:?}"),
        },
    }
}

#[test]
fn a_decoder_the_model_cannot_run_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let dg = load(&canvas_model(dir.path()), None);
    let m = refused(&dg, Decoder::Block { block_size: 4 });
    assert!(m.contains("canvas"), "{m}");
    let m = refused(&dg, Decoder::Autoregressive);
    assert!(m.contains("canvas"), "{m}");
    let m = refused(
        &dg,
        Decoder::Canvas {
            steps: Some(0),
            entropy_bound: None,
            t_max: None,
            t_min: None,
        },
    );
    assert!(m.contains("steps"), "{m}");

    let llada = dir.path().join("llada.edm");
    let spec = SynthSpec::tiny(Architecture::Llada2Moe);
    synth::write_edm(
        &synth::build(&spec).unwrap(),
        &llada,
        DType::F32,
        &|_, _| {},
    )
    .unwrap();
    let masked = load(&llada, None);
    let m = refused(&masked, canvas(3));
    assert!(m.contains("canvas"), "{m}");
}
