//! Markovian RSA (`Engine::reason`) on a tiny synthetic model, CPU backend: the round structure and
//! the carried tails token for token, the seeded choice of K parents, the KV cache measured from the
//! backend's allocations and bounded whatever the number of rounds, each round admitted by the
//! run's gate for exactly its traces' positions, and bad configurations as typed errors before
//! anything is decoded.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use edgediff::backend::cpu::CpuBackend;
use edgediff::backend::kv_meter::KvMeter;
use edgediff::backend::Backend;
use edgediff::decode::{CancelToken, FinishReason};
use edgediff::engine::{Engine, Prompt};
use edgediff::format::{DType, EdmFile};
use edgediff::model::Architecture;
use edgediff::reason::{
    paragraph_tail, tally, Extractor, ReasonError, ReasonEvent, RoundGate, RoundLease, RsaConfig,
    RsaOutput, Selection, TraceRecord, Vote, FALLBACK_END_OF_THINKING,
};
use edgediff::synth::{self, SynthSpec};
use edgediff::tokenizer::ChatMessage;

const QUERY: &str = "What is 12 + 30?";
/// A marker with a blank line in it, so every forced trace has a paragraph boundary to cut at.
const MARKER: &str = "\n\nAnswer:";

fn engine(dir: &Path) -> Engine<CpuBackend> {
    let m = synth::build(&SynthSpec::tiny(Architecture::Llada2Moe)).unwrap();
    let path = dir.join("llada2.edm");
    synth::write_edm(&m, &path, DType::F32, &|_, _| {}).unwrap();
    Engine::new(CpuBackend, Arc::new(EdmFile::open(&path).unwrap())).unwrap()
}

fn config(rounds: usize) -> RsaConfig {
    RsaConfig {
        n: 4,
        k: 2,
        rounds,
        tail_tokens: 14,
        think_budget: 10,
        max_tokens: 6,
        selection: Selection::Majority(Extractor::Regex(r"(\S+)\s*$".into())),
        temperature: 1.0,
        top_p: 1.0,
        seed: 5,
        think_marker: Some(MARKER.into()),
        decoding: None,
    }
}

fn run(e: &Engine<CpuBackend>, c: &RsaConfig) -> (RsaOutput, Vec<ReasonEvent>) {
    let mut events = Vec::new();
    let out = e.reason(QUERY, c, &mut |ev| events.push(ev)).unwrap();
    (out, events)
}

/// Bytes of KV cache one position costs on this model, measured from an allocation.
fn kv_bytes_per_position(e: &Engine<CpuBackend>) -> u64 {
    let meter = KvMeter::new();
    KvMeter::measure(&meter, || {
        drop(CpuBackend.new_kv(e.config(), 1000).unwrap());
    });
    assert_eq!(meter.live(), 0);
    assert!(
        meter.peak() > 0 && meter.peak().is_multiple_of(1000),
        "{}",
        meter.peak()
    );
    meter.peak() / 1000
}

/// `needle` occurs in `hay` at or after `from`: where.
fn find(hay: &[u32], needle: &[u32], from: usize) -> Option<usize> {
    (from..=hay.len().saturating_sub(needle.len())).find(|&i| hay[i..].starts_with(needle))
}

#[test]
fn rounds_carry_k_parents_tails_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let c = config(2);
    let (out, events) = run(&e, &c);
    let tok = e.tokenizer();
    let marker = tok.encode(MARKER, false).unwrap();
    assert_eq!(out.marker, marker);
    let query = e
        .encode_prompt(&Prompt::Chat(vec![ChatMessage::user(QUERY)]))
        .unwrap();
    assert_eq!(out.rounds.len(), c.rounds + 1);
    let mut fixed_parts: Option<Vec<u32>> = None;
    let mut forced = 0;
    let mut cut_at_blank_line = 0;
    for (r, round) in out.rounds.iter().enumerate() {
        assert_eq!(round.traces.len(), c.n);
        for t in &round.traces {
            let limit = c.think_budget + marker.len() + c.max_tokens;
            assert!(t.tokens.len() <= limit, "{} > {limit}", t.tokens.len());
            if let Some(at) = t.forced_at {
                // Forced exactly at the budget, the marker's ids where it was forced.
                forced += 1;
                assert_eq!(at, c.think_budget);
                assert_eq!(&t.tokens[at..at + marker.len()], &marker[..]);
            }
            if t.finish_reason == FinishReason::Length {
                assert_eq!(
                    t.tokens.len(),
                    limit,
                    "a trace cut by length used its budget"
                );
            }
            if r == 0 {
                assert!(t.parents.is_empty());
                assert_eq!(t.prompt, query);
                continue;
            }
            // K distinct parents from the previous round only.
            assert_eq!(t.parents.len(), c.k);
            let mut p = t.parents.clone();
            p.sort();
            p.dedup();
            assert_eq!(p.len(), c.k);
            assert!(p.iter().all(|&i| i < c.n));
            // The prompt holds each parent's tail, in order, token for token; what is left
            // around the tails is the same fixed text in every aggregation prompt.
            let mut rest = Vec::new();
            let mut at = 0;
            for &parent in &t.parents {
                let ptoks = &out.rounds[r - 1].traces[parent].tokens;
                let tail = paragraph_tail(tok, ptoks, c.tail_tokens).unwrap();
                assert!(ptoks.ends_with(tail) && !tail.is_empty());
                assert!(tail.len() <= c.tail_tokens);
                if ptoks.len() > c.tail_tokens && tail.len() < c.tail_tokens {
                    // Cut back: what precedes the tail ends a paragraph.
                    let before = tok
                        .decode(&ptoks[..ptoks.len() - tail.len()], false)
                        .unwrap();
                    assert!(before.ends_with("\n\n"), "{before:?}");
                    cut_at_blank_line += 1;
                }
                let i = find(&t.prompt, tail, at).expect("the tail is in the prompt");
                rest.extend_from_slice(&t.prompt[at..i]);
                at = i + tail.len();
            }
            rest.extend_from_slice(&t.prompt[at..]);
            match &fixed_parts {
                None => fixed_parts = Some(rest),
                Some(f) => assert_eq!(f, &rest),
            }
        }
    }
    assert!(forced > 0, "no trace reached its thinking budget");
    assert!(cut_at_blank_line > 0, "no tail was cut back to a paragraph");
    let fixed = tok.decode(fixed_parts.as_ref().unwrap(), false).unwrap();
    assert!(
        fixed.contains(QUERY) && fixed.contains("Candidate solution 2"),
        "{fixed}"
    );

    // Events: per round, RoundStarted, then each trace's start, text and finish, then RoundDone
    // with the round's votes; the streamed text is the trace's text.
    let mut r = 0;
    let mut texts = vec![String::new(); c.n];
    for ev in &events {
        match ev {
            ReasonEvent::RoundStarted { round, traces } => {
                assert_eq!((*round, *traces), (r, c.n));
                texts = vec![String::new(); c.n];
            }
            ReasonEvent::TraceStarted {
                round,
                trace,
                parents,
                prompt_tokens,
            } => {
                let rec = &out.rounds[*round].traces[*trace];
                assert_eq!((parents, *prompt_tokens), (&rec.parents, rec.prompt.len()));
            }
            ReasonEvent::TraceText { trace, text, .. } => texts[*trace].push_str(text),
            ReasonEvent::TraceFinished {
                round,
                trace,
                tokens,
                forced_end_of_thinking,
                answer,
            } => {
                let rec = &out.rounds[*round].traces[*trace];
                assert_eq!(*tokens, rec.tokens.len());
                assert_eq!(*forced_end_of_thinking, rec.forced_at.is_some());
                assert_eq!(answer, &rec.answer);
            }
            ReasonEvent::RoundDone { round, votes, .. } => {
                assert_eq!(*round, r);
                let rec = &out.rounds[r];
                assert_eq!(votes, &rec.votes);
                assert_eq!(
                    votes,
                    &tally(rec.traces.iter().map(|t| t.answer.as_deref()))
                );
                for (t, text) in rec.traces.iter().zip(&texts) {
                    assert_eq!(&t.text, text);
                }
                r += 1;
            }
        }
    }
    assert_eq!(r, c.rounds + 1);
    assert_eq!(out.votes, out.rounds[c.rounds].votes);
    assert_eq!(out.answer, out.votes.first().map(|v| v.answer.clone()));
    let gen: usize = out
        .rounds
        .iter()
        .flat_map(|r| &r.traces)
        .map(|t| t.tokens.len())
        .sum();
    assert_eq!(out.totals.generated_tokens, gen);
    assert_eq!(out.totals.traces, c.n * (c.rounds + 1));
}

/// What a run decoded, round by round: its traces, votes and the KV left after the round. A
/// round's peak KV is left out: it measures how the traces' caches overlapped in time (a round's
/// traces decode on threads), so two identical runs may differ there; it is bounded in
/// peak_kv_is_measured_and_bounded_whatever_the_rounds instead.
fn decoded(o: &RsaOutput) -> Vec<(Vec<TraceRecord>, Vec<Vote>, u64)> {
    o.rounds
        .iter()
        .map(|r| (r.traces.clone(), r.votes.clone(), r.kv_bytes_after))
        .collect()
}

#[test]
fn a_seed_reproduces_the_run_and_another_seed_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let mut c = config(2);
    let (a, _) = run(&e, &c);
    let (b, _) = run(&e, &c);
    assert_eq!(decoded(&a), decoded(&b));
    assert_eq!(a.answer, b.answer);
    c.seed = 6;
    let (d, _) = run(&e, &c);
    let parents = |o: &RsaOutput| -> Vec<Vec<usize>> {
        o.rounds
            .iter()
            .flat_map(|r| &r.traces)
            .map(|t| t.parents.clone())
            .collect()
    };
    assert_ne!(parents(&a), parents(&d));
    assert_ne!(a.rounds[0].traces, d.rounds[0].traces);
}

#[test]
fn peak_kv_is_measured_and_bounded_whatever_the_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let per_position = kv_bytes_per_position(&e);
    let marker = e.tokenizer().encode(MARKER, false).unwrap().len();
    let mut peaks = Vec::new();
    for rounds in [1, 4] {
        let c = config(rounds);
        let (out, _) = run(&e, &c);
        assert_eq!(out.rounds.len(), rounds + 1);
        // The stated bound: a prompt of at most (fixed text + K·τ) + β + marker + answer tokens
        // per trace; a round's N traces decode together, so a round holds at most N such caches.
        let fixed = out.rounds[1].traces[0].prompt.len()
            - out.rounds[1].traces[0]
                .parents
                .iter()
                .map(|&p| {
                    paragraph_tail(
                        e.tokenizer(),
                        &out.rounds[0].traces[p].tokens,
                        c.tail_tokens,
                    )
                    .unwrap()
                    .len()
                })
                .sum::<usize>();
        let prompt_bound = fixed + c.k * c.tail_tokens;
        let bound = per_position * (prompt_bound + c.think_budget + marker + c.max_tokens) as u64;
        for (r, round) in out.rounds.iter().enumerate() {
            assert_eq!(round.kv_bytes_after, 0, "round {r} left KV allocated");
            let n = round.traces.len() as u64;
            assert!(
                round.peak_kv_bytes <= n * bound,
                "round {r}: {} > {n} x {bound}",
                round.peak_kv_bytes
            );
            // Measured, not assumed: at least the cache of the longest first phase.
            let longest = round.traces.iter().map(|t| t.prompt.len()).max().unwrap();
            assert!(round.peak_kv_bytes >= per_position * (longest + c.think_budget) as u64);
        }
        assert_eq!(
            out.totals.peak_kv_bytes,
            out.rounds.iter().map(|r| r.peak_kv_bytes).max().unwrap()
        );
        peaks.push((out.totals.peak_kv_bytes, c.n as u64 * bound));
    }
    // Four rounds need no more than the bound one round states.
    assert!(peaks[1].0 <= peaks[0].1, "{peaks:?}");
}

/// Records what each round asks for and how many leases are held.
#[derive(Default)]
struct RecordingGate {
    asked: Mutex<Vec<(usize, Vec<usize>)>>,
    held: Arc<AtomicUsize>,
    refuse_round: Option<usize>,
}

struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RoundGate for RecordingGate {
    fn admit(&self, round: usize, positions: &[usize]) -> Result<RoundLease, ReasonError> {
        self.asked.lock().unwrap().push((round, positions.to_vec()));
        if self.refuse_round == Some(round) {
            return Err(ReasonError::Cancelled);
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Held(self.held.clone())))
    }
}

#[test]
fn each_round_is_admitted_for_its_traces_positions_within_the_stated_shape() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let c = config(2);
    let marker = e.tokenizer().encode(MARKER, false).unwrap().len();
    let shape = e.reason_shape(QUERY, &c).unwrap();
    let gate = RecordingGate::default();
    let mut events = Vec::new();
    let out = e
        .reason_gated(QUERY, &c, &gate, &mut |ev| {
            // A round decodes holding its lease, and has given it back when it is done.
            let held = gate.held.load(Ordering::SeqCst);
            match &ev {
                ReasonEvent::RoundStarted { .. } | ReasonEvent::TraceStarted { .. } => {
                    assert_eq!(held, 1, "{ev:?}")
                }
                ReasonEvent::RoundDone { .. } => assert_eq!(held, 0, "{ev:?}"),
                _ => {}
            }
            events.push(ev);
        })
        .unwrap();
    let asked = gate.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), out.rounds.len());
    for (r, (round, positions)) in asked.iter().enumerate() {
        assert_eq!(*round, r);
        let want: Vec<usize> = out.rounds[r]
            .traces
            .iter()
            .map(|t| t.prompt.len() + c.think_budget + marker + c.max_tokens)
            .collect();
        assert_eq!(positions, &want, "round {r}");
        // Every trace really fits what was reserved for it.
        for (t, &p) in out.rounds[r].traces.iter().zip(positions) {
            assert!(t.prompt.len() + t.tokens.len() <= p);
        }
        assert!(positions.len() <= shape.largest.traces);
        assert!(positions.iter().all(|&p| p <= shape.largest.positions));
    }
    assert_eq!(asked[0].1, vec![shape.first.positions; shape.first.traces]);
    // The same run ungated: the gate changes when rounds decode, not what they decode.
    // (Traces' events interleave as their threads run; the rounds' own events do not.)
    let (plain, plain_events) = run(&e, &c);
    assert_eq!(decoded(&plain), decoded(&out));
    let rounds_only = |v: &[ReasonEvent]| -> Vec<ReasonEvent> {
        v.iter()
            .filter(|e| {
                matches!(
                    e,
                    ReasonEvent::RoundStarted { .. } | ReasonEvent::RoundDone { .. }
                )
            })
            .cloned()
            .map(|e| match e {
                // The measured peak, as in `decoded`.
                ReasonEvent::RoundDone {
                    round,
                    votes,
                    tokens,
                    ..
                } => ReasonEvent::RoundDone {
                    round,
                    votes,
                    tokens,
                    peak_kv_bytes: 0,
                },
                e => e,
            })
            .collect()
    };
    assert_eq!(rounds_only(&plain_events), rounds_only(&events));

    // A round the gate does not admit ends the run before it decodes anything more.
    let gate = RecordingGate {
        refuse_round: Some(1),
        ..RecordingGate::default()
    };
    let mut rounds_started = 0;
    let r = e.reason_gated(QUERY, &c, &gate, &mut |ev| {
        rounds_started += usize::from(matches!(ev, ReasonEvent::RoundStarted { .. }))
    });
    assert!(matches!(r, Err(ReasonError::Cancelled)), "{r:?}");
    assert_eq!(rounds_started, 1);
    assert_eq!(gate.held.load(Ordering::SeqCst), 0);
}

#[test]
fn a_final_aggregation_answers_from_one_more_trace() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let mut c = config(1);
    c.selection = Selection::Aggregate(Extractor::Regex(r"(\S+)\s*$".into()));
    let (out, _) = run(&e, &c);
    assert_eq!(out.rounds.len(), 3);
    let last = &out.rounds[2];
    assert_eq!(last.traces.len(), 1);
    assert_eq!(last.traces[0].parents.len(), c.k);
    assert_eq!(out.answer, last.traces[0].answer);
    assert_eq!(out.votes, out.rounds[1].votes);
}

#[test]
fn without_an_end_of_thinking_token_the_fallback_text_is_forced() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let mut c = config(0);
    c.think_marker = None;
    let fallback = e
        .tokenizer()
        .encode(FALLBACK_END_OF_THINKING, false)
        .unwrap();
    assert_eq!(e.end_of_thinking(&c).unwrap(), fallback);
    let (out, _) = run(&e, &c);
    assert_eq!(out.marker, fallback);
    assert_eq!(out.rounds.len(), 1, "T = 0 is majority-of-N");
}

/// Whether an error is the one a bad configuration should give.
type IsExpected = fn(&ReasonError) -> bool;

#[test]
fn bad_configurations_are_typed_errors_before_any_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let context = e.config().max_position;
    let cases: Vec<(&str, RsaConfig, IsExpected)> = vec![
        ("k > n", RsaConfig { k: 5, ..config(1) }, |e| {
            matches!(e, ReasonError::KExceedsN { k: 5, n: 4 })
        }),
        (
            "n = 0",
            RsaConfig {
                n: 0,
                k: 0,
                ..config(1)
            },
            |e| matches!(e, ReasonError::InvalidParameter { name: "n", .. }),
        ),
        ("k = 0", RsaConfig { k: 0, ..config(1) }, |e| {
            matches!(e, ReasonError::InvalidParameter { name: "k", .. })
        }),
        (
            "tau = 0",
            RsaConfig {
                tail_tokens: 0,
                ..config(1)
            },
            |e| {
                matches!(
                    e,
                    ReasonError::InvalidParameter {
                        name: "tail_tokens",
                        ..
                    }
                )
            },
        ),
        (
            "beta = 0",
            RsaConfig {
                think_budget: 0,
                ..config(1)
            },
            |e| {
                matches!(
                    e,
                    ReasonError::InvalidParameter {
                        name: "think_budget",
                        ..
                    }
                )
            },
        ),
        (
            "answer = 0",
            RsaConfig {
                max_tokens: 0,
                ..config(1)
            },
            |e| {
                matches!(
                    e,
                    ReasonError::InvalidParameter {
                        name: "max_tokens",
                        ..
                    }
                )
            },
        ),
        (
            "temperature",
            RsaConfig {
                temperature: f32::NAN,
                ..config(1)
            },
            |e| {
                matches!(
                    e,
                    ReasonError::InvalidParameter {
                        name: "temperature",
                        ..
                    }
                )
            },
        ),
        (
            "top_p",
            RsaConfig {
                top_p: 0.0,
                ..config(1)
            },
            |e| matches!(e, ReasonError::InvalidParameter { name: "top_p", .. }),
        ),
        (
            "pattern",
            RsaConfig {
                selection: Selection::Majority(Extractor::Regex("(unclosed".into())),
                ..config(1)
            },
            |e| matches!(e, ReasonError::BadPattern { .. }),
        ),
        (
            "marker",
            RsaConfig {
                think_marker: Some(String::new()),
                ..config(1)
            },
            |e| matches!(e, ReasonError::EmptyMarker(_)),
        ),
        (
            "beta beyond the context",
            RsaConfig {
                think_budget: context,
                ..config(0)
            },
            |e| {
                matches!(
                    e,
                    ReasonError::BeyondContext {
                        what: "round 0",
                        ..
                    }
                )
            },
        ),
        (
            "K tails beyond the context",
            RsaConfig {
                tail_tokens: context / 2,
                ..config(1)
            },
            |e| {
                matches!(
                    e,
                    ReasonError::BeyondContext {
                        what: "an aggregation prompt",
                        ..
                    }
                )
            },
        ),
    ];
    for (what, c, expected) in cases {
        let mut events = 0;
        let err = e.reason(QUERY, &c, &mut |_| events += 1).unwrap_err();
        assert!(expected(&err), "{what}: {err:?}");
        assert_eq!(events, 0, "{what}: decoded before failing");
        assert!(!err.to_string().is_empty());
    }
    // T = 0 never builds an aggregation prompt, so a long τ is fine there.
    let c = RsaConfig {
        tail_tokens: context,
        ..config(0)
    };
    e.reason(QUERY, &c, &mut |_| {}).unwrap();
}

#[test]
fn a_cancelled_run_ends_with_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    let cancel = CancelToken::new();
    let mut decoding = e.default_decoding();
    decoding.cancel = Some(cancel.clone());
    let c = RsaConfig {
        decoding: Some(decoding),
        ..config(1)
    };
    let (mut started, mut rounds_done) = (0, 0);
    let err = e
        .reason(QUERY, &c, &mut |ev| match ev {
            ReasonEvent::TraceStarted { .. } => {
                started += 1;
                cancel.cancel();
            }
            ReasonEvent::RoundDone { .. } => rounds_done += 1,
            _ => {}
        })
        .unwrap_err();
    assert!(matches!(err, ReasonError::Cancelled), "{err:?}");
    assert!(started >= 1);
    assert_eq!(rounds_done, 0);
}
