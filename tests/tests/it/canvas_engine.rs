//! DiffusionGemma through the engine (issue 18 stage 1): a synthetic diffusion_gemma file loads
//! into the canvas model, decodes with the canvas decoder by default, streams committed text per
//! canvas, honours seeds, `max_new_tokens` and cancellation, and gives the tokens of the sampler
//! driven directly; decoder choices that cannot run are typed errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::decode::canvas::{self, SeededDraws};
use edgediff::decode::{
    BlockOptions, CancelToken, CanvasOptions, DecodeError, DecodeParams, DecoderDetails,
    DecoderKind, FinishReason, Rng,
};
use edgediff::engine::{Engine, EngineConfig, EngineError, Event, Prompt};
use edgediff::format::{DType, EdmFile};
use edgediff::model::canvas::CanvasModel;
use edgediff::model::Architecture;
use edgediff::synth;

/// A synthetic diffusion_gemma with an odd canvas of 5 (every other size as `tiny`'s).
fn model(dir: &Path) -> PathBuf {
    let spec = synth::SynthSpec {
        block_size: 5,
        seed: 11,
        ..synth::SynthSpec::tiny(Architecture::DiffusionGemma)
    };
    let path = dir.join("dg.edm");
    synth::write_edm(&synth::build(&spec).unwrap(), &path, DType::F32, &|_, _| {}).unwrap();
    path
}

fn open(path: &Path) -> Arc<EdmFile> {
    Arc::new(EdmFile::open(path).unwrap())
}

fn engine(path: &Path) -> Engine<CpuBackend> {
    Engine::new(CpuBackend, open(path)).unwrap()
}

/// The canvas decoder with fewer steps than transformers' 48 (the tiny random model is never
/// confident, so every canvas runs all of them), past EOS unless `eos`.
fn params(e: &Engine<CpuBackend>, max_new_tokens: usize, seed: u64) -> DecodeParams {
    let mut p = e.default_decoding();
    let DecoderKind::Canvas(o) = &mut p.decoder else {
        panic!("the default decoder of a canvas model is {:?}", p.decoder)
    };
    o.steps = 6;
    p.max_new_tokens = max_new_tokens;
    p.sampling.seed = seed;
    p.ignore_eos = true;
    p
}

const PROMPT: [u32; 4] = [2, 40, 77, 300];

#[test]
fn the_engine_decodes_a_canvas_model_with_the_canvas_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let path = model(tmp.path());
    let e = engine(&path);
    assert!(e.is_canvas_model());
    assert_eq!(
        e.default_decoding().decoder,
        DecoderKind::Canvas(CanvasOptions::default())
    );
    // transformers' defaults.
    let o = CanvasOptions::default();
    assert_eq!(
        (o.steps, o.entropy_bound, o.t_max, o.t_min, o.stability),
        (48, 0.1, 0.8, 0.4, 1)
    );

    let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
    request.decoding = params(&e, 13, 7);
    let mut events = Vec::new();
    let out = e.generate(&request, &mut |ev| events.push(ev)).unwrap();
    // 13 tokens from three canvases of 5, cut at max_new_tokens.
    assert_eq!(out.tokens.len(), 13);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(
        out.stats.decoder,
        DecoderDetails::Canvas {
            canvases: 3,
            steps: 18
        }
    );
    // Prompt encode, 6 steps per canvas, two encodes of committed canvases.
    assert_eq!(out.stats.forward_passes, 1 + 18 + 2);
    assert_eq!(out.stats.positions_processed, 4 + 18 * 5 + 2 * 5);
    assert!(out.stats.time_to_first_token.is_some());
    // Text streams as canvases commit: at most one piece per canvas, all of it the output.
    let texts: Vec<&String> = events
        .iter()
        .map(|ev| match ev {
            Event::Text(t) => t,
            Event::Canvas(_) => panic!("canvas events were not asked for"),
        })
        .collect();
    assert!(
        texts.len() >= 2 && texts.len() <= 3,
        "{} pieces",
        texts.len()
    );
    assert_eq!(
        texts.iter().map(|t| t.as_str()).collect::<String>(),
        out.text
    );
    assert_eq!(out.text, e.tokenizer().decode(&out.tokens, true).unwrap());

    // Seeded: the same seed repeats, another changes the tokens.
    let again = e.generate(&request, &mut |_| {}).unwrap();
    assert_eq!(again.tokens, out.tokens);
    request.decoding.sampling.seed = 8;
    let other = e.generate(&request, &mut |_| {}).unwrap();
    assert_ne!(other.tokens, out.tokens);
}

#[test]
fn the_engine_commits_the_tokens_of_the_sampler_driven_directly() {
    let tmp = tempfile::tempdir().unwrap();
    let path = model(tmp.path());
    let e = engine(&path);
    let b = CpuBackend;
    let m = CanvasModel::load(&b, open(&path)).unwrap();
    for (max_new, seed, steps) in [(10, 3, 6), (7, 99, 3), (1, 5, 48)] {
        let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
        request.decoding = params(&e, max_new, seed);
        let DecoderKind::Canvas(o) = &mut request.decoding.decoder else {
            unreachable!()
        };
        o.steps = steps;
        let o = *o;
        let out = e.generate(&request, &mut |_| {}).unwrap();

        let mut kv = m.new_kv(&b, 64).unwrap();
        let direct = canvas::generate(
            &b,
            &m,
            &mut kv,
            &PROMPT,
            &o.params(max_new, None, 0),
            &mut SeededDraws(Rng::new(seed)),
        )
        .unwrap();
        assert_eq!(
            out.tokens,
            direct.tokens[..max_new],
            "max_new {max_new} seed {seed}"
        );
        assert_eq!(out.stats.forward_passes, direct.forward_passes);
        let DecoderDetails::Canvas { steps: ran, .. } = out.stats.decoder else {
            panic!("{:?}", out.stats.decoder)
        };
        assert_eq!(ran, direct.steps.iter().sum::<usize>());
    }
}

#[test]
fn a_cancel_stops_the_canvas_decoder_within_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    let path = model(tmp.path());
    let e = engine(&path);
    for cancel_at in [1usize, 4] {
        let cancel = CancelToken::new();
        let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
        request.decoding = params(&e, 20, 1);
        request.decoding.cancel = Some(cancel.clone());
        request.decoding.canvas_events = true;
        let mut steps_seen = 0;
        let out = e
            .generate(&request, &mut |ev| {
                if let Event::Canvas(c) = ev {
                    assert_eq!((c.start, c.cells.len()), (4, 5));
                    steps_seen += 1;
                    if steps_seen == cancel_at {
                        cancel.cancel();
                    }
                }
            })
            .unwrap();
        assert_eq!(out.finish_reason, FinishReason::Cancelled);
        assert_eq!(steps_seen, cancel_at, "no step after the cancel");
        // The prompt's encode and the steps before the cancel; no canvas committed.
        assert_eq!(out.stats.forward_passes, 1 + cancel_at);
        assert!(out.tokens.is_empty());
    }
    // Cancelled before it starts: no pass at all.
    let cancel = CancelToken::new();
    cancel.cancel();
    let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
    request.decoding = params(&e, 20, 1);
    request.decoding.cancel = Some(cancel);
    let out = e.generate(&request, &mut |_| {}).unwrap();
    assert_eq!(
        (out.finish_reason, out.stats.forward_passes),
        (FinishReason::Cancelled, 0)
    );
}

#[test]
fn a_stop_string_ends_the_canvas_decoder_after_its_canvas() {
    let tmp = tempfile::tempdir().unwrap();
    let path = model(tmp.path());
    let e = engine(&path);
    let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
    request.decoding = params(&e, 20, 7);
    let full = e.generate(&request, &mut |_| {}).unwrap();
    // Stop at a piece of the second canvas's text: the output is the text before it, and no
    // canvas after the one that held it runs.
    let first_two = e.tokenizer().decode(&full.tokens[..10], true).unwrap();
    let first = e.tokenizer().decode(&full.tokens[..5], true).unwrap();
    let stop: String = first_two[first.len()..].chars().take(2).collect();
    assert!(
        !stop.is_empty() && !first.contains(&stop),
        "{first:?} {stop:?}"
    );
    request.stop = vec![stop.clone()];
    let out = e.generate(&request, &mut |_| {}).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(
        out.stats.decoder,
        DecoderDetails::Canvas {
            canvases: 2,
            steps: 12
        }
    );
}

#[test]
fn decoders_that_cannot_run_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = model(tmp.path());
    let e = engine(&path);
    let wrong = |r: Result<_, EngineError>, decoder: &str| match r {
        Err(EngineError::Decode(DecodeError::WrongDecoder { decoder: d, .. })) => {
            assert_eq!(d, decoder)
        }
        Err(other) => panic!("{decoder}: wrong error {other}"),
        Ok(_) => panic!("{decoder}: decoded"),
    };
    // Another decoder for the canvas model.
    let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
    request.decoding.decoder = DecoderKind::Block(BlockOptions {
        block_size: 4,
        reuse_last_kv: false,
    });
    wrong(e.generate(&request, &mut |_| {}), "block");
    request.decoding.decoder = DecoderKind::Ar;
    wrong(e.generate(&request, &mut |_| {}), "ar");

    // The canvas decoder for a masked-diffusion model.
    let llada = tmp.path().join("llada.edm");
    synth::write_edm(
        &synth::build(&synth::SynthSpec::tiny(Architecture::Llada2Moe)).unwrap(),
        &llada,
        DType::F32,
        &|_, _| {},
    )
    .unwrap();
    let masked = engine(&llada);
    assert!(!masked.is_canvas_model());
    let mut request = masked.request(Prompt::Tokens(PROMPT.to_vec()));
    request.decoding.decoder = DecoderKind::Canvas(CanvasOptions::default());
    request.decoding.max_new_tokens = 4;
    wrong(masked.generate(&request, &mut |_| {}), "canvas");

    // Bad sampler settings, a context the whole canvases do not fit, unwired load options.
    let mut request = e.request(Prompt::Tokens(PROMPT.to_vec()));
    let bad = |o: CanvasOptions| {
        let mut r = request.clone();
        r.decoding.decoder = DecoderKind::Canvas(o);
        match e.generate(&r, &mut |_| {}) {
            Err(EngineError::Decode(DecodeError::InvalidParameter { name, .. })) => name,
            other => panic!("{o:?}: {:?}", other.map(|o| o.tokens)),
        }
    };
    let d = CanvasOptions::default();
    assert_eq!(bad(CanvasOptions { steps: 0, ..d }), "steps");
    assert_eq!(
        bad(CanvasOptions {
            entropy_bound: -1.0,
            ..d
        }),
        "entropy_bound"
    );
    assert_eq!(bad(CanvasOptions { t_min: 0.0, ..d }), "t_min");
    assert_eq!(
        bad(CanvasOptions {
            t_max: f32::NAN,
            ..d
        }),
        "t_max"
    );
    // 4 + 508 = 512 fits the context as tokens, not as 102 canvases of 5 (514 positions).
    request.decoding.max_new_tokens = 508;
    assert!(matches!(
        e.generate(&request, &mut |_| {}),
        Err(EngineError::Decode(DecodeError::ContextTooLong { .. }))
    ));
    // Expert paging works (tests/canvas_paging.rs); block-level routing is approximate and not
    // wired to the canvas model.
    let blocks = Engine::open(
        CpuBackend,
        open(&path),
        &EngineConfig {
            block_experts: Some(2),
            ..Default::default()
        },
    );
    assert!(matches!(
        blocks,
        Err(EngineError::Decode(DecodeError::Unsupported(_)))
    ));
    // The LM-head NLL needs causal rows, which the canvas model has no pass for.
    assert!(matches!(
        e.continuation_nll(&PROMPT, &[5, 6]),
        Err(EngineError::Decode(DecodeError::Unsupported(_)))
    ));
}

/// The sampler settings a checkpoint's generation_config.json gives reach the model file and the
/// engine's defaults; null fields (as transformers saves them) keep transformers' defaults; a bad
/// value is a typed error naming the field.
#[test]
fn the_sampler_settings_come_from_generation_config() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/diffusion_gemma");
    let convert = |generation: Option<&str>| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        std::fs::create_dir(&dir).unwrap();
        for f in std::fs::read_dir(&fixture).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
        if let Some(g) = generation {
            std::fs::write(dir.join("generation_config.json"), g).unwrap();
        }
        let out = tmp.path().join("dg.edm");
        edgediff::import::convert(&dir, &out, DType::F32, &|_, _| {}).map(|_| (tmp, out))
    };
    // The fixture's own file: every field null.
    let (_t, path) = convert(None).unwrap();
    assert_eq!(
        engine(&path).default_decoding().decoder,
        DecoderKind::Canvas(CanvasOptions::default())
    );
    let (_t, path) = convert(Some(
        r#"{"max_denoising_steps": 12, "sampler_config": {"entropy_bound": 0.25,
            "_cls_name": "EntropyBoundSamplerConfig"}, "t_min": 0.3, "t_max": 0.9,
            "stability_threshold": 2, "confidence_threshold": 0.01}"#,
    ))
    .unwrap();
    let want = CanvasOptions {
        steps: 12,
        entropy_bound: 0.25,
        t_min: 0.3,
        t_max: 0.9,
        stability: 2,
        confidence: 0.01,
    };
    let e = engine(&path);
    assert_eq!(
        e.metadata().decoding.canvas.map(CanvasOptions::from),
        Some(want)
    );
    assert_eq!(e.default_decoding().decoder, DecoderKind::Canvas(want));
    for (g, field) in [
        (r#"{"t_min": -1.0}"#, "t_min"),
        (r#"{"max_denoising_steps": 0}"#, "max_denoising_steps"),
        (
            r#"{"sampler_config": {"entropy_bound": "x"}}"#,
            "entropy_bound",
        ),
    ] {
        match convert(Some(g)) {
            Err(edgediff::import::ImportError::Config(m)) => assert!(m.contains(field), "{m}"),
            Err(e) => panic!("{g}: wrong error {e}"),
            Ok(_) => panic!("{g}: converted"),
        }
    }
}
