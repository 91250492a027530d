//! The FFI surface from Rust, against a tiny synthetic model: what the Kotlin and Swift SDKs see,
//! minus the generated glue (the JVM test, `bindings/scripts/jvm-test.sh`, covers that).

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

fn synth_model(dir: &Path) -> PathBuf {
    let m = synth::build(&SynthSpec::tiny(Architecture::Llada2Moe)).unwrap();
    let path = dir.join("tiny.edm");
    synth::write_edm(&m, &path, DType::F32, &|_, _| {}).unwrap();
    path
}

fn load(path: &Path) -> Arc<Engine> {
    let config = EngineConfig {
        adapter: Some(AdapterPreference::Cpu),
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

/// Forwards every listener call to a channel; the `fail_on_text`-th text throws.
struct ChannelListener {
    calls: Mutex<Sender<Call>>,
    fail_on_text: Option<usize>,
    texts: Mutex<usize>,
}

impl ChannelListener {
    fn new(fail_on_text: Option<usize>) -> (Arc<Self>, Receiver<Call>) {
        let (send, receive) = channel();
        let listener = ChannelListener {
            calls: Mutex::new(send),
            fail_on_text,
            texts: Mutex::new(0),
        };
        (Arc::new(listener), receive)
    }
    fn send(&self, call: Call) {
        let _ = self.calls.lock().unwrap().send(call);
    }
}

impl TokenListener for ChannelListener {
    fn on_text(&self, text: String) -> Result<(), EdgeDiffError> {
        let mut n = self.texts.lock().unwrap();
        *n += 1;
        if Some(*n) == self.fail_on_text {
            return Err(EdgeDiffError::Callback("app gave up".into()));
        }
        self.send(Call::Text(text));
        Ok(())
    }
    fn on_finished(&self, stats: GenerationStats) -> Result<(), EdgeDiffError> {
        self.send(Call::Finished(stats));
        Ok(())
    }
    fn on_error(&self, error: EdgeDiffError) -> Result<(), EdgeDiffError> {
        self.send(Call::Error(error));
        Ok(())
    }
}

/// Every call until the last one (finished or error).
fn drain(calls: &Receiver<Call>) -> (String, Call) {
    let mut text = String::new();
    loop {
        match calls.recv_timeout(Duration::from_secs(120)).unwrap() {
            Call::Text(t) => text.push_str(&t),
            last => return (text, last),
        }
    }
}

fn long(max_new_tokens: u32) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: Some(max_new_tokens),
        ignore_eos: true,
        ..GenerationConfig::default()
    }
}

#[test]
fn model_info_mirrors_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let info = engine.model_info();
    assert_eq!(info.architecture, "llada2_moe");
    assert_eq!((info.vocab_size, info.context_length), (512, 512));
    assert_eq!((info.num_experts, info.experts_per_token), (8, 2));
    assert_eq!(info.block_size, 8);
    assert!(info.params_active < info.params_total);
    assert_eq!(info.backend, engine.stats().backend);
}

#[test]
fn tokenize_then_detokenize_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let text = "fn main() { println!(\"hi\"); }";
    let ids = engine.tokenize(text.into(), false).unwrap();
    assert!(!ids.is_empty());
    assert_eq!(engine.detokenize(ids).unwrap(), text);
}

#[test]
fn streamed_text_is_the_whole_text_and_stats_count_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let (listener, calls) = ChannelListener::new(None);
    let handle = engine
        .clone()
        .generate("The quick brown fox".into(), long(24), listener)
        .unwrap();
    let (text, last) = drain(&calls);
    let Call::Finished(stats) = last else {
        panic!("expected on_finished, got {last:?}")
    };
    assert!(handle.is_finished());
    assert_eq!(stats.finish_reason, FinishReasonKind::Length);
    assert_eq!(stats.new_tokens, 24);
    assert!(stats.tokens_per_forward > 0.0);
    assert_eq!(engine.stats().last, Some(stats));

    let whole = pollster::block_on(
        engine
            .clone()
            .generate_async("The quick brown fox".into(), long(24)),
    )
    .unwrap();
    assert_eq!(
        whole.text, text,
        "streamed pieces concatenate to the whole text"
    );
    assert_eq!(whole.tokens.len(), 24);
    assert_eq!(engine.stats().generations, 2);
}

#[test]
fn cancel_ends_the_generation_early_with_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let config = GenerationConfig {
        decoder: Some(Decoder::Autoregressive),
        ..long(400)
    };
    let (listener, calls) = ChannelListener::new(None);
    let handle = engine.generate("Once".into(), config, listener).unwrap();
    // Wait for the first text, then cancel.
    let Call::Text(_) = calls.recv_timeout(Duration::from_secs(120)).unwrap() else {
        panic!("expected text first")
    };
    handle.cancel();
    let (_, last) = drain(&calls);
    let Call::Finished(stats) = last else {
        panic!("expected on_finished, got {last:?}")
    };
    assert_eq!(stats.finish_reason, FinishReasonKind::Cancelled);
    assert!(stats.new_tokens < 400);
}

#[test]
fn dropping_the_handle_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let config = GenerationConfig {
        decoder: Some(Decoder::Autoregressive),
        ..long(400)
    };
    let (listener, calls) = ChannelListener::new(None);
    drop(engine.generate("Once".into(), config, listener).unwrap());
    let (_, last) = drain(&calls);
    let Call::Finished(stats) = last else {
        panic!("expected on_finished, got {last:?}")
    };
    assert_eq!(stats.finish_reason, FinishReasonKind::Cancelled);
}

#[test]
fn a_throwing_listener_stops_the_generation_and_gets_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let (listener, calls) = ChannelListener::new(Some(2));
    let _handle = engine.generate("Once".into(), long(200), listener).unwrap();
    let (_, last) = drain(&calls);
    assert!(
        matches!(last, Call::Error(EdgeDiffError::Callback(_))),
        "{last:?}"
    );
}

#[test]
fn missing_file_is_an_io_error() {
    let err = Engine::load("/nonexistent/model.edm".into(), EngineConfig::default())
        .err()
        .unwrap();
    assert!(matches!(err, EdgeDiffError::Io(_)), "{err:?}");
}

#[test]
fn not_a_model_is_invalid_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.edm");
    std::fs::write(
        &path,
        b"definitely not a model file, but long enough to read a header",
    )
    .unwrap();
    let err = Engine::load(path.to_string_lossy().into_owned(), EngineConfig::default())
        .err()
        .unwrap();
    assert!(matches!(err, EdgeDiffError::InvalidModel(_)), "{err:?}");
}

#[test]
fn invalid_requests_fail_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let (listener, _calls) = ChannelListener::new(None);
    let zero = GenerationConfig {
        max_new_tokens: Some(0),
        ..GenerationConfig::default()
    };
    assert!(matches!(
        engine.clone().generate("x".into(), zero, listener),
        Err(EdgeDiffError::InvalidArgument(_))
    ));
    let path = synth_model(dir.path()).to_string_lossy().into_owned();
    // A budget that cannot hold one layer's top-k experts says so, with the numbers.
    let budget = EngineConfig {
        expert_memory_budget: Some(1),
        ..EngineConfig::default()
    };
    assert!(matches!(
        Engine::load(path.clone(), budget),
        Err(EdgeDiffError::InvalidArgument(m)) if m.contains("give it at least")
    ));
    // A resident profile that is not there is an I/O error; a keep spec that does not parse says so.
    let profile = EngineConfig {
        resident_profile_path: Some(
            dir.path()
                .join("missing.profile.json")
                .display()
                .to_string(),
        ),
        ..EngineConfig::default()
    };
    assert!(matches!(
        Engine::load(path.clone(), profile),
        Err(EdgeDiffError::Io(m)) if m.contains("missing.profile.json")
    ));
    let keep = EngineConfig {
        resident_profile_path: Some("code.profile.json".into()),
        resident_keep: Some("lots".into()),
        ..EngineConfig::default()
    };
    assert!(matches!(
        Engine::load(path, keep),
        Err(EdgeDiffError::InvalidArgument(m)) if m.contains("lots")
    ));
}

/// Forwards a reasoning run's calls to a channel; cancels its handle at the first trace when told.
struct ReasonChannel {
    calls: Mutex<Sender<ReasonCall>>,
}

#[derive(Debug)]
enum ReasonCall {
    Event(edgediff_ffi::ReasonEvent),
    Finished(edgediff_ffi::ReasonResult),
    Error(EdgeDiffError),
}

impl edgediff_ffi::ReasonListener for ReasonChannel {
    fn on_event(&self, event: edgediff_ffi::ReasonEvent) -> Result<(), EdgeDiffError> {
        let _ = self.calls.lock().unwrap().send(ReasonCall::Event(event));
        Ok(())
    }
    fn on_finished(&self, result: edgediff_ffi::ReasonResult) -> Result<(), EdgeDiffError> {
        let _ = self
            .calls
            .lock()
            .unwrap()
            .send(ReasonCall::Finished(result));
        Ok(())
    }
    fn on_error(&self, error: EdgeDiffError) -> Result<(), EdgeDiffError> {
        let _ = self.calls.lock().unwrap().send(ReasonCall::Error(error));
        Ok(())
    }
}

fn reason_config() -> edgediff_ffi::ReasonConfig {
    edgediff_ffi::ReasonConfig {
        n: 3,
        k: 2,
        rounds: 1,
        tail_tokens: 8,
        think_budget: 6,
        max_tokens: 4,
        answer_regex: Some(r"(\S+)\s*$".into()),
        seed: 3,
        ..edgediff_ffi::ReasonConfig::default()
    }
}

#[test]
fn reason_streams_events_then_one_result() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let (send, receive) = channel();
    let listener = Arc::new(ReasonChannel {
        calls: Mutex::new(send),
    });
    let _task = engine
        .clone()
        .reason("What is 2 + 3?".into(), reason_config(), listener)
        .unwrap();
    let mut rounds = Vec::new();
    let mut finished_traces = 0;
    let result = loop {
        match receive.recv_timeout(Duration::from_secs(300)).unwrap() {
            ReasonCall::Event(edgediff_ffi::ReasonEvent::RoundDone { round, votes, .. }) => {
                rounds.push((round, votes))
            }
            ReasonCall::Event(edgediff_ffi::ReasonEvent::TraceFinished { .. }) => {
                finished_traces += 1
            }
            ReasonCall::Event(_) => {}
            ReasonCall::Finished(r) => break r,
            ReasonCall::Error(e) => panic!("{e}"),
        }
    };
    assert_eq!(rounds.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(finished_traces, 6);
    assert_eq!(result.traces, 6);
    assert!(result.peak_kv_bytes > 0);
    assert_eq!(result.votes, rounds[1].1);
    assert!(
        receive.recv_timeout(Duration::from_millis(200)).is_err(),
        "nothing after the end"
    );
}

#[test]
fn a_bad_reason_config_fails_before_running_and_cancel_ends_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let engine = load(&synth_model(dir.path()));
    let (send, receive) = channel();
    let listener = Arc::new(ReasonChannel {
        calls: Mutex::new(send),
    });
    let bad = edgediff_ffi::ReasonConfig {
        k: 4,
        ..reason_config()
    };
    let e = engine
        .clone()
        .reason("x".into(), bad, listener.clone())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, EdgeDiffError::InvalidArgument(_)), "{e:?}");
    let task = engine
        .clone()
        .reason("x".into(), reason_config(), listener)
        .unwrap();
    task.cancel();
    let end = loop {
        match receive.recv_timeout(Duration::from_secs(300)).unwrap() {
            ReasonCall::Event(_) => {}
            other => break other,
        }
    };
    assert!(
        matches!(end, ReasonCall::Error(EdgeDiffError::Cancelled(_))),
        "{end:?}"
    );
}
