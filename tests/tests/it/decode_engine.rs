//! The decoding engine on the CPU backend, against tiny synthetic models: every decoder is checked
//! against the model's own forward pass, and requests behave as specified (EOS, stop strings,
//! cancellation, seeds, bad input).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::AttnMask;
use edgediff::decode::{
    self, BidirectionalCache, BidirectionalOptions, BlockOptions, CancelToken, Canvas, Cell,
    CommitPolicy, DecodeError, DecodeParams, DecoderDetails, DecoderKind, FinishReason, Flow,
    Observer, Prediction, Sampling, SpecialIds, SpeculativeOptions,
};
use edgediff::engine::{Engine, EngineError, Event, GenerationRequest, Prompt};
use edgediff::format::{DType, EdmFile};
use edgediff::model::{Architecture, ForwardRequest, Model, Window};
use edgediff::synth::{self, SynthSpec};
use edgediff::tokenizer::ChatMessage;

fn write_synth(dir: &Path, arch: Architecture) -> PathBuf {
    let m = synth::build(&SynthSpec::tiny(arch)).unwrap();
    let path = dir.join(format!("{arch}.edm"));
    synth::write_edm(&m, &path, DType::F32, &|_, _| {}).unwrap();
    path
}

fn engine(path: &Path) -> Engine<CpuBackend> {
    Engine::new(CpuBackend, Arc::new(EdmFile::open(path).unwrap())).unwrap()
}

const PROMPT: [u32; 11] = [1, 40, 77, 300, 12, 3, 90, 41, 7, 250, 33];

/// Collects committed ids and canvases; optionally stops or cancels.
#[derive(Default)]
struct Recorder {
    ids: Vec<u32>,
    canvases: Vec<Canvas>,
}

impl Observer for Recorder {
    fn committed(&mut self, ids: &[u32]) -> Flow {
        self.ids.extend_from_slice(ids);
        Flow::Continue
    }
    fn canvas(&mut self, canvas: &Canvas) {
        self.canvases.push(canvas.clone());
    }
}

fn params(decoder: DecoderKind, prediction: Prediction, max_new: usize) -> DecodeParams {
    DecodeParams {
        decoder,
        policy: CommitPolicy::Threshold { threshold: 0.9 },
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

fn block(block_size: usize) -> DecoderKind {
    DecoderKind::Block(BlockOptions {
        block_size,
        reuse_last_kv: false,
    })
}

/// Decodes ids with a fresh cache, returning the generated ids and the outcome's counters.
fn run(
    model: &Model<CpuBackend>,
    special: SpecialIds,
    prompt: &[u32],
    p: &DecodeParams,
) -> (Vec<u32>, decode::DecodeOutcome) {
    let mut kv = model
        .new_kv(&CpuBackend, prompt.len() + p.max_new_tokens)
        .unwrap();
    let mut rec = Recorder::default();
    let out = decode::decode(&CpuBackend, model, &mut kv, prompt, special, p, &mut rec).unwrap();
    assert_eq!(rec.ids, out.tokens, "observer saw the output in order");
    (out.tokens.clone(), out)
}

fn model_and_special(path: &Path) -> (Model<CpuBackend>, SpecialIds) {
    let file = Arc::new(EdmFile::open(path).unwrap());
    let st = file.header.metadata.special_tokens;
    let model = Model::load(&CpuBackend, file, &|_, _| true).unwrap();
    (
        model,
        SpecialIds {
            mask: st.mask,
            eos: st.eos,
        },
    )
}

/// Greedy AR by recomputing the whole sequence from scratch every token.
fn greedy_chain(
    model: &Model<CpuBackend>,
    prompt: &[u32],
    n: usize,
    prediction: Prediction,
    mask: u32,
) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let mut tokens = seq.clone();
        if prediction == Prediction::InPlace {
            tokens.push(mask);
        }
        let mut kv = model.new_kv(&CpuBackend, tokens.len()).unwrap();
        let out = model
            .forward(
                &CpuBackend,
                &mut kv,
                &tokens,
                Window::block(0, tokens.len(), AttnMask::Causal),
                &ForwardRequest::default(),
            )
            .unwrap();
        seq.push(out.stats.last().unwrap().argmax);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn ar_equals_the_greedy_argmax_chain_of_full_forward_passes() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let (model, special) = model_and_special(&write_synth(dir.path(), arch));
        for prediction in [Prediction::NextToken, Prediction::InPlace] {
            let p = params(DecoderKind::Ar, prediction, 12);
            let (tokens, out) = run(&model, special, &PROMPT, &p);
            let want = greedy_chain(&model, &PROMPT, 12, prediction, special.mask.unwrap());
            assert_eq!(tokens, want, "{arch} {prediction:?}");
            assert_eq!(out.forward_passes, 12, "AR is one forward per token");
            assert_eq!(out.finish_reason, FinishReason::Length);
        }
    }
}

#[test]
fn block_diffusion_with_block_one_equals_ar() {
    let dir = tempfile::tempdir().unwrap();
    for arch in Architecture::ALL {
        let (model, special) = model_and_special(&write_synth(dir.path(), arch));
        for prediction in [Prediction::NextToken, Prediction::InPlace] {
            let ar = run(
                &model,
                special,
                &PROMPT,
                &params(DecoderKind::Ar, prediction, 10),
            );
            let b1 = run(&model, special, &PROMPT, &params(block(1), prediction, 10));
            assert_eq!(b1.0, ar.0, "{arch} {prediction:?}");
            assert_eq!(b1.1.forward_passes, ar.1.forward_passes);
        }
    }
}

#[test]
fn lossless_speculative_greedy_equals_ar_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Qwen3Moe, Architecture::Olmoe] {
        let (model, special) = model_and_special(&write_synth(dir.path(), arch));
        let ar = run(
            &model,
            special,
            &PROMPT,
            &params(DecoderKind::Ar, Prediction::NextToken, 24),
        );
        // Hybrid: the same causal rows verify, only the drafting masks are read in place.
        for (draft_len, prediction) in [
            (1, Prediction::NextToken),
            (3, Prediction::NextToken),
            (16, Prediction::NextToken),
            (1, Prediction::Hybrid),
            (5, Prediction::Hybrid),
        ] {
            for prompt in [&PROMPT[..1], &PROMPT[..]] {
                let spec = DecoderKind::Speculative(SpeculativeOptions {
                    draft_len,
                    beta: 1.0,
                });
                let (tokens, out) = run(&model, special, prompt, &params(spec, prediction, 24));
                let want = if prompt.len() == PROMPT.len() {
                    ar.0.clone()
                } else {
                    run(
                        &model,
                        special,
                        prompt,
                        &params(DecoderKind::Ar, Prediction::NextToken, 24),
                    )
                    .0
                };
                assert_eq!(
                    tokens,
                    want,
                    "{arch} {prediction:?} k={draft_len} prompt {}",
                    prompt.len()
                );
                let DecoderDetails::Speculative {
                    passes,
                    drafted,
                    accepted,
                } = out.details
                else {
                    panic!("speculative details expected");
                };
                assert!(accepted <= drafted);
                assert_eq!(passes, out.forward_passes);
                // Every pass commits its accepted drafts plus one token.
                assert!(
                    passes + accepted >= 24,
                    "{passes} passes, {accepted} accepted"
                );
            }
        }
    }
}

#[test]
fn speculative_decoding_of_an_in_place_model_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let (model, special) = model_and_special(&write_synth(dir.path(), Architecture::Llada2Moe));
    let spec = DecoderKind::Speculative(SpeculativeOptions {
        draft_len: 4,
        beta: 1.0,
    });
    let mut kv = model.new_kv(&CpuBackend, 64).unwrap();
    let err = decode::decode(
        &CpuBackend,
        &model,
        &mut kv,
        &PROMPT,
        special,
        &params(spec, Prediction::InPlace, 8),
        &mut Recorder::default(),
    )
    .unwrap_err();
    assert!(matches!(err, DecodeError::Unsupported(_)), "{err}");
}

/// Decodes, then compares a final pass over the last block on the decoder's own cache with a
/// from-scratch pass over the whole sequence: the largest logit difference.
fn cache_error(
    model: &Model<CpuBackend>,
    special: SpecialIds,
    p: &DecodeParams,
    mask: AttnMask,
    tail_block: usize,
) -> f32 {
    let mut kv = model
        .new_kv(&CpuBackend, PROMPT.len() + p.max_new_tokens)
        .unwrap();
    let out = decode::decode(
        &CpuBackend,
        model,
        &mut kv,
        &PROMPT,
        special,
        p,
        &mut Recorder::default(),
    )
    .unwrap();
    let seq: Vec<u32> = PROMPT.iter().chain(&out.tokens).copied().collect();
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    let start = (seq.len() - 1) / tail_block * tail_block;
    let cached = model
        .forward(
            &CpuBackend,
            &mut kv,
            &seq[start..],
            Window::block(start, seq.len() - start, mask),
            &want,
        )
        .unwrap()
        .logits
        .unwrap();
    let mut fresh_kv = model.new_kv(&CpuBackend, seq.len()).unwrap();
    let full = model
        .forward(
            &CpuBackend,
            &mut fresh_kv,
            &seq,
            Window::block(0, seq.len(), mask),
            &want,
        )
        .unwrap()
        .logits
        .unwrap();
    cached
        .iter()
        .zip(&full[full.len() - cached.len()..])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn block_causal_decoding_with_the_kv_cache_equals_recomputing_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, special) = model_and_special(&write_synth(dir.path(), Architecture::Llada2Moe));
    let b = 4;
    for policy in [
        CommitPolicy::Threshold { threshold: 0.5 },
        CommitPolicy::FixedSteps { steps: 2 },
        CommitPolicy::EntropyBound { gamma: 0.5 },
    ] {
        let mut p = params(block(b), Prediction::InPlace, 13);
        p.policy = policy;
        let err = cache_error(&model, special, &p, AttnMask::BlockCausal(b), b);
        assert!(err < 1e-4, "{policy:?}: cached vs recomputed {err}");
    }
    // The check is sensitive: reusing the last step's K/V (written next to masks) is not exact.
    let reuse = DecoderKind::Block(BlockOptions {
        block_size: b,
        reuse_last_kv: true,
    });
    let p = params(reuse, Prediction::InPlace, 13);
    let err = cache_error(&model, special, &p, AttnMask::BlockCausal(b), b);
    assert!(err > 1e-3, "reuse_last_kv error {err}");
}

#[test]
fn speculative_decoding_keeps_an_exact_causal_cache_through_accepted_drafts() {
    let dir = tempfile::tempdir().unwrap();
    let (model, special) = model_and_special(&write_synth(dir.path(), Architecture::Qwen3Moe));
    for beta in [1.0, 0.5, 0.0] {
        let spec = DecoderKind::Speculative(SpeculativeOptions { draft_len: 6, beta });
        let p = params(spec, Prediction::NextToken, 40);
        // β = 0 trusts the drafter: most drafts are accepted.
        let (_, out) = run(&model, special, &PROMPT, &p);
        let DecoderDetails::Speculative { accepted, .. } = out.details else {
            panic!()
        };
        if beta == 0.0 {
            assert!(accepted > 20, "{accepted} accepted");
        }
        let err = cache_error(&model, special, &p, AttnMask::Causal, 1);
        assert!(err < 1e-4, "β {beta}: cached vs recomputed {err}");
    }
}

#[test]
fn block_decoding_fills_the_prompts_partial_block_and_streams_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (model, special) = model_and_special(&write_synth(dir.path(), Architecture::Llada2Moe));
    let mut p = params(block(8), Prediction::InPlace, 21);
    p.canvas_events = true;
    p.policy = CommitPolicy::FixedSteps { steps: 4 };
    let mut kv = model.new_kv(&CpuBackend, 32).unwrap();
    let mut rec = Recorder::default();
    let out = decode::decode(&CpuBackend, &model, &mut kv, &PROMPT, special, &p, &mut rec).unwrap();
    assert_eq!(out.tokens.len(), 21);
    // 11 prompt tokens: the first block is 8..16 with three prompt tokens, then 16..24, 24..32.
    let first = &rec.canvases[0];
    assert_eq!(first.start, 8);
    assert_eq!(first.cells.len(), 8);
    let prompt_tail: Vec<Cell> = PROMPT[8..].iter().map(|&t| Cell::Known(t)).collect();
    assert_eq!(first.cells[..3], prompt_tail);
    assert!(first.cells[3..].contains(&Cell::Masked));
    let starts: Vec<usize> = rec.canvases.iter().map(|c| c.start).collect();
    assert_eq!(
        starts.iter().filter(|&&s| s == 8).count(),
        4,
        "5 masks over 4 steps"
    );
    assert!(starts.contains(&16) && starts.contains(&24));
    assert_eq!(
        out.details,
        DecoderDetails::Block {
            blocks: 3,
            steps: 12
        }
    );
    // Fixed steps: 12 steps, the prefill and every clean pass fused into them.
    assert_eq!(out.forward_passes, 12);
}

#[test]
fn reusing_the_last_step_kv_skips_no_work_but_changes_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (model, special) = model_and_special(&write_synth(dir.path(), Architecture::Llada2Moe));
    let exact = run(
        &model,
        special,
        &PROMPT,
        &params(block(4), Prediction::InPlace, 16),
    );
    let reuse = DecoderKind::Block(BlockOptions {
        block_size: 4,
        reuse_last_kv: true,
    });
    let approx = run(
        &model,
        special,
        &PROMPT,
        &params(reuse, Prediction::InPlace, 16),
    );
    assert_eq!(approx.0.len(), 16);
    // Without the fused clean prefix each step runs the block alone.
    assert!(approx.1.positions_processed < exact.1.positions_processed);
}

#[test]
fn bidirectional_decoding_with_each_cache_fills_the_canvas() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Olmoe, Architecture::Llada2Moe] {
        let (model, special) = model_and_special(&write_synth(dir.path(), arch));
        let prediction = Prediction::for_architecture(arch);
        let mut results = Vec::new();
        for cache in [
            BidirectionalCache::None,
            BidirectionalCache::Prefix,
            BidirectionalCache::Dual,
        ] {
            let d = DecoderKind::Bidirectional(BidirectionalOptions {
                block_size: 4,
                cache,
            });
            let mut p = params(d, prediction, 12);
            p.policy = CommitPolicy::FixedSteps { steps: 2 };
            let (tokens, out) = run(&model, special, &PROMPT, &p);
            assert_eq!(tokens.len(), 12);
            let DecoderDetails::Bidirectional {
                blocks,
                steps,
                full_passes,
            } = out.details
            else {
                panic!()
            };
            assert_eq!((blocks, steps), (3, 6), "{cache:?}");
            let want_full = if cache == BidirectionalCache::None {
                6
            } else {
                3
            };
            assert_eq!(full_passes, want_full, "{cache:?}");
            results.push((tokens, out.positions_processed));
        }
        // The first step of each block is the same full pass in every mode, so the first block's
        // first commits agree; the work shrinks with each cache.
        assert!(results[1].1 < results[0].1 && results[2].1 < results[1].1);
    }
}

#[test]
fn the_same_seed_gives_the_same_text_and_another_seed_another() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&write_synth(dir.path(), Architecture::Llada2Moe));
    let gen = |seed: u64, decoder: DecoderKind| {
        let mut r = e.request(Prompt::Text("The cat sat on".into()));
        r.decoding.decoder = decoder;
        r.decoding.sampling = Sampling {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            seed,
        };
        r.decoding.max_new_tokens = 24;
        r.decoding.ignore_eos = true;
        e.generate(&r, &mut |_| {}).unwrap().tokens
    };
    for d in [block(4), DecoderKind::Ar] {
        assert_eq!(gen(7, d), gen(7, d));
        assert_ne!(gen(7, d), gen(8, d));
    }
}

#[test]
fn sampled_speculative_decoding_is_deterministic_under_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (model, special) = model_and_special(&write_synth(dir.path(), Architecture::Qwen3Moe));
    for beta in [1.0, 0.5] {
        let spec = DecoderKind::Speculative(SpeculativeOptions { draft_len: 4, beta });
        let mut p = params(spec, Prediction::NextToken, 20);
        p.sampling = Sampling {
            temperature: 1.0,
            top_k: 4,
            top_p: 0.95,
            seed: 3,
        };
        let a = run(&model, special, &PROMPT, &p).0;
        assert_eq!(a.len(), 20);
        assert_eq!(a, run(&model, special, &PROMPT, &p).0);
    }
}

#[test]
fn cancelling_from_the_event_callback_stops_within_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&write_synth(dir.path(), Architecture::Llada2Moe));
    let cancel = CancelToken::new();
    let mut r = e.request(Prompt::Text("Once upon a time".into()));
    r.decoding.decoder = block(8);
    r.decoding.policy = CommitPolicy::FixedSteps { steps: 8 };
    r.decoding.max_new_tokens = 64;
    r.decoding.canvas_events = true;
    r.decoding.cancel = Some(cancel.clone());
    let mut canvases = 0;
    let out = e
        .generate(&r, &mut |ev| {
            if let Event::Canvas(c) = ev {
                canvases += 1;
                assert_eq!(c.forward_passes, 1, "no step after the cancel");
                cancel.cancel();
            }
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.stats.forward_passes, 1);
    assert_eq!(canvases, 1);
}

#[test]
fn cancelling_from_another_thread_stops_within_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&write_synth(dir.path(), Architecture::Qwen3Moe));
    let cancel = CancelToken::new();
    let (to_canceller, requests) = std::sync::mpsc::channel::<()>();
    let (to_decoder, done) = std::sync::mpsc::channel::<()>();
    let canceller = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            requests.recv().unwrap();
            cancel.cancel();
            to_decoder.send(()).unwrap();
        })
    };
    let mut r = e.request(Prompt::Text("Once upon a time".into()));
    r.decoding.decoder = DecoderKind::Ar;
    r.decoding.max_new_tokens = 64;
    r.decoding.ignore_eos = true;
    r.decoding.cancel = Some(cancel);
    let (mut texts, mut texts_after_cancel) = (0, 0);
    let mut on_event = |ev: Event| {
        if let Event::Text(_) = ev {
            texts += 1;
            if texts > 3 {
                texts_after_cancel += 1;
            }
            if texts == 3 {
                // Hand the cancel to the other thread and wait until it has happened.
                to_canceller.send(()).unwrap();
                done.recv().unwrap();
            }
        }
    };
    let out = e.generate(&r, &mut on_event).unwrap();
    canceller.join().unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    // No pass ran after the cancel: at most the detokenizer's held-back tail is flushed.
    assert!(
        texts_after_cancel <= 1,
        "{texts_after_cancel} texts after the cancel"
    );
    assert_eq!(out.stats.forward_passes, out.stats.new_tokens);
    assert!(out.stats.new_tokens < 64);
}

#[test]
fn eos_ends_generation_and_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    for arch in [Architecture::Qwen3Moe, Architecture::Llada2Moe] {
        let (model, special) = model_and_special(&write_synth(dir.path(), arch));
        let prediction = Prediction::for_architecture(arch);
        let free = run(
            &model,
            special,
            &PROMPT,
            &params(DecoderKind::Ar, prediction, 16),
        )
        .0;
        // Declare the fourth generated token the EOS.
        let eos = free[3];
        let special = SpecialIds {
            eos: Some(eos),
            ..special
        };
        let first = free.iter().position(|&t| t == eos).unwrap();
        let mut p = params(DecoderKind::Ar, prediction, 16);
        p.ignore_eos = false;
        let (tokens, out) = run(&model, special, &PROMPT, &p);
        assert_eq!(tokens, free[..first], "{arch}");
        assert_eq!(out.finish_reason, FinishReason::Eos);
        // Block diffusion: once the block holds EOS, the rest of it is EOS and decoding stops.
        let mut p = params(block(4), prediction, 16);
        p.ignore_eos = false;
        p.policy = CommitPolicy::FixedSteps { steps: 4 };
        let (tokens, out) = run(&model, special, &PROMPT, &p);
        if out.finish_reason == FinishReason::Eos {
            assert!(!tokens.contains(&eos) && tokens.len() < 16);
        } else {
            assert!(!tokens.contains(&eos) && tokens.len() == 16);
        }
    }
}

#[test]
fn a_stop_string_ends_the_text_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&write_synth(dir.path(), Architecture::Llada2Moe));
    let mut r = e.request(Prompt::Text("fn main() {".into()));
    r.decoding.decoder = block(4);
    r.decoding.max_new_tokens = 40;
    r.decoding.ignore_eos = true;
    let full = e.generate(&r, &mut |_| {}).unwrap();
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    assert!(chars.len() > 12, "text too short: {:?}", full.text);
    let (a, b) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = full.text[a..b].to_string();
    let want = &full.text[..full.text.find(&stop).unwrap()];
    r.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let out = e
        .generate(&r, &mut |ev| {
            if let Event::Text(t) = ev {
                streamed.push_str(&t)
            }
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, want, "stop {stop:?}");
    assert_eq!(streamed, want);
}

#[test]
fn streamed_text_is_the_returned_text() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&write_synth(dir.path(), Architecture::Llada2Moe));
    for decoder in [block(4), DecoderKind::Ar] {
        let mut r = e.request(Prompt::Chat(vec![ChatMessage::user("hello there")]));
        r.decoding.decoder = decoder;
        r.decoding.max_new_tokens = 30;
        let mut streamed = String::new();
        let out = e
            .generate(&r, &mut |ev| {
                if let Event::Text(t) = ev {
                    streamed.push_str(&t)
                }
            })
            .unwrap();
        assert_eq!(streamed, out.text);
        assert_eq!(
            out.text,
            e.tokenizer().decode(&out.tokens, true).unwrap(),
            "{decoder:?}"
        );
        assert!(out.stats.new_tokens > 0);
        assert!(out.stats.time_to_first_token.is_some());
    }
}

#[test]
fn bad_requests_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&write_synth(dir.path(), Architecture::Llada2Moe));
    let gen = |f: &dyn Fn(&mut GenerationRequest)| {
        let mut r = e.request(Prompt::Text("hello".into()));
        f(&mut r);
        e.generate(&r, &mut |_| {}).unwrap_err()
    };
    let err = gen(&|r| r.prompt = Prompt::Text(String::new()));
    assert!(
        matches!(err, EngineError::Decode(DecodeError::EmptyPrompt)),
        "{err}"
    );
    let err = gen(&|r| r.prompt = Prompt::Tokens(vec![]));
    assert!(
        matches!(err, EngineError::Decode(DecodeError::EmptyPrompt)),
        "{err}"
    );
    let err = gen(&|r| r.prompt = Prompt::Chat(vec![]));
    assert!(
        matches!(err, EngineError::Decode(DecodeError::EmptyPrompt)),
        "{err}"
    );
    let err = gen(&|r| r.decoding.decoder = block(0));
    assert!(
        matches!(
            err,
            EngineError::Decode(DecodeError::InvalidParameter {
                name: "block_size",
                ..
            })
        ),
        "{err}"
    );
    let err = gen(&|r| r.prompt = Prompt::Tokens(vec![5; 600]));
    assert!(
        matches!(
            err,
            EngineError::Decode(DecodeError::ContextTooLong { prompt: 600, .. })
        ),
        "{err}"
    );
    let err = gen(&|r| r.decoding.max_new_tokens = 10_000);
    assert!(
        matches!(err, EngineError::Decode(DecodeError::ContextTooLong { .. })),
        "{err}"
    );
    let err = gen(&|r| r.decoding.max_new_tokens = 0);
    assert!(matches!(
        err,
        EngineError::Decode(DecodeError::InvalidParameter { .. })
    ));
    let err = gen(&|r| r.prompt = Prompt::Tokens(vec![1, 99_999]));
    assert!(
        matches!(
            err,
            EngineError::Decode(DecodeError::TokenOutOfRange { id: 99_999, .. })
        ),
        "{err}"
    );
    let err = gen(&|r| r.decoding.sampling.temperature = f32::NAN);
    assert!(matches!(
        err,
        EngineError::Decode(DecodeError::InvalidParameter { .. })
    ));
    let err = gen(&|r| r.decoding.policy = CommitPolicy::Threshold { threshold: 2.0 });
    assert!(matches!(
        err,
        EngineError::Decode(DecodeError::InvalidParameter { .. })
    ));
    let err = gen(&|r| {
        r.decoding.decoder = DecoderKind::Speculative(SpeculativeOptions {
            draft_len: 4,
            beta: 1.5,
        })
    });
    assert!(matches!(
        err,
        EngineError::Decode(DecodeError::InvalidParameter { .. })
    ));
}

/// A synthetic model steered towards one token: every embedding shares a common direction and
/// that token's head row points along it, so AR and the drafter often agree on it.
struct Steered {
    inner: synth::SynthSource,
    token: usize,
    common: f32,
    boost: f32,
}

impl edgediff::import::TensorSource for Steered {
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), edgediff::import::ImportError> {
        let (shape, mut v) = self.inner.get(name)?;
        let h = shape[shape.len() - 1];
        let u = |i: usize| if i.is_multiple_of(2) { 1.0 } else { -1.0 };
        if name == "model.embed_tokens.weight" {
            for (i, x) in v.iter_mut().enumerate() {
                *x += self.common * u(i % h);
            }
        } else if name == "lm_head.weight" {
            for i in 0..h {
                v[self.token * h + i] += self.boost * u(i);
            }
        }
        Ok((shape, v))
    }
}

#[test]
fn lossless_speculative_equals_ar_when_drafts_are_accepted_too() {
    // Random weights make the drafter disagree with AR almost always; steering the model makes
    // it agree sometimes (partial acceptance) or always (every draft accepted).
    let dir = tempfile::tempdir().unwrap();
    let m = synth::build(&SynthSpec::tiny(Architecture::Qwen3Moe)).unwrap();
    for (common, boost, all_accepted) in [(1.0, 0.05, false), (0.5, 0.1, false), (0.5, 0.15, true)]
    {
        let path = dir.path().join(format!("steered-{common}-{boost}.edm"));
        let src = Steered {
            inner: synth::SynthSource::new(&m.meta.config, 0),
            token: 100,
            common,
            boost,
        };
        edgediff::import::write_model(&src, &m.meta, &path, DType::F32, &|_, _| {}).unwrap();
        let (model, special) = model_and_special(&path);
        let ar = run(
            &model,
            special,
            &PROMPT,
            &params(DecoderKind::Ar, Prediction::NextToken, 40),
        );
        let spec = DecoderKind::Speculative(SpeculativeOptions {
            draft_len: 4,
            beta: 1.0,
        });
        let (tokens, out) = run(
            &model,
            special,
            &PROMPT,
            &params(spec, Prediction::NextToken, 40),
        );
        assert_eq!(tokens, ar.0, "steering {common}/{boost}");
        let DecoderDetails::Speculative {
            drafted, accepted, ..
        } = out.details
        else {
            panic!()
        };
        assert!(accepted > 0, "steering {common}/{boost}: nothing accepted");
        assert_eq!(accepted == drafted, all_accepted, "{accepted}/{drafted}");
        assert!(out.forward_passes < 40);
    }
}
