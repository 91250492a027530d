//! Markovian recursive self-aggregation: parallel reasoning traces, recursive aggregation, bounded
//! context (RSA, arXiv 2509.26626, with Delethink's bounded chunks, arXiv 2510.06557; ZAYA1-8B's
//! report, arXiv 2605.05365, reaches its best reasoning scores with the two combined).
//!
//! - Round 0: N traces of the query, each with a thinking budget β: after β tokens the
//!   end-of-thinking marker is forced and the trace writes its answer (at most `max_tokens`).
//! - Rounds 1…T: N new traces; each prompt is the query plus the last τ tokens (cut back to a
//!   paragraph boundary, `tail`) of K traces drawn without replacement from the previous round
//!   only, and an aggregation instruction ([`prompt::AGGREGATION_INSTRUCTION`]).
//! - Selection: a majority vote over the last round's extracted answers, or one final aggregation
//!   trace ([`Selection`]).
//! - Memory: a trace's KV cache lives only while it decodes; nothing carries from round to round
//!   but token ids, so the KV a trace needs is bounded by prompt + K·τ + β + answer whatever T is,
//!   and a round's (its N traces decode together on the batched engine) by N times that. The
//!   bytes reported are the backends' own allocations ([`crate::backend::kv_meter`]).
//! - Admission: before a round decodes, a [`RoundGate`] is asked for room for its traces (the
//!   server's scheduler: slots and the KV budget; [`Ungated`] for a library run), and the room goes
//!   back when the round's caches are freed.
//!
//! End of thinking: the model's `</think>` when its vocabulary has that token or its chat template
//! writes it; models without one (the default model, SmolLM2) get [`FALLBACK_END_OF_THINKING`]
//! forced instead — plain text that turns the rest of the trace into its answer.
//!
//! Every draw is seeded from [`RsaConfig::seed`] and the (round, trace) it belongs to, so a run is
//! reproducible and does not depend on the order traces are decoded in.

mod answer;
mod config;
mod gate;
mod prompt;
mod tail;
mod traces;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use answer::{normalise, tally, Extractor, Vote};
pub use config::{ReasonError, RsaConfig, Selection};
pub use gate::{ReasonShape, RoundGate, RoundLease, RoundShape, Ungated};
pub use prompt::AGGREGATION_INSTRUCTION;
pub use tail::{paragraph_tail, tail_start};

use crate::backend::kv_meter::KvMeter;
use crate::backend::Backend;
use crate::decode::sampling::Rng;
use crate::decode::FinishReason;
use crate::engine::{Engine, LoadedEngine};
use prompt::AggregationPrompt;
use traces::{decode_traces, Trace, TracePlan, TracePrompt, TraceUpdate};

/// Forced after β tokens when the model has no end-of-thinking token.
pub const FALLBACK_END_OF_THINKING: &str = "\n\nFinal answer:";

/// The end-of-thinking token text looked for in the model's vocabulary and chat template.
pub const END_OF_THINKING: &str = "</think>";

/// Streamed while a run goes. Rounds count from 0; a final aggregation
/// ([`Selection::Aggregate`]) is round `rounds + 1` with one trace.
#[derive(Clone, Debug, PartialEq)]
pub enum ReasonEvent {
    RoundStarted {
        round: usize,
        traces: usize,
    },
    TraceStarted {
        round: usize,
        trace: usize,
        /// The previous round's traces whose tails this prompt carries (empty in round 0).
        parents: Vec<usize>,
        prompt_tokens: usize,
    },
    /// Text of a trace as it becomes final (a forced marker's text included).
    TraceText {
        round: usize,
        trace: usize,
        text: String,
    },
    TraceFinished {
        round: usize,
        trace: usize,
        tokens: usize,
        forced_end_of_thinking: bool,
        answer: Option<String>,
    },
    RoundDone {
        round: usize,
        votes: Vec<Vote>,
        tokens: usize,
        /// The most KV-cache bytes allocated at once during the round (measured).
        peak_kv_bytes: u64,
    },
}

/// One trace of a finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceRecord {
    pub parents: Vec<usize>,
    pub prompt: Vec<u32>,
    /// Generated ids: thinking, the marker (forced or written), the answer; EOS left out.
    pub tokens: Vec<u32>,
    pub text: String,
    /// Where a forced marker starts in `tokens`.
    pub forced_at: Option<usize>,
    pub answer: Option<String>,
    pub finish_reason: FinishReason,
    pub forward_passes: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RoundRecord {
    pub traces: Vec<TraceRecord>,
    pub votes: Vec<Vote>,
    /// The most KV-cache bytes allocated at once during the round (measured).
    pub peak_kv_bytes: u64,
    /// KV-cache bytes still allocated when the round ended (measured; 0: all freed).
    pub kv_bytes_after: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RsaTotals {
    pub traces: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub forward_passes: usize,
    /// The most KV-cache bytes allocated at once in the whole run (measured).
    pub peak_kv_bytes: u64,
    pub elapsed: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RsaOutput {
    /// The selected answer (`None`: no trace gave one).
    pub answer: Option<String>,
    /// The last round's votes.
    pub votes: Vec<Vote>,
    /// Round 0 … T, then the final aggregation when [`Selection::Aggregate`].
    pub rounds: Vec<RoundRecord>,
    /// The end-of-thinking ids used.
    pub marker: Vec<u32>,
    pub totals: RsaTotals,
}

/// A seed for (round, trace, purpose) from the run's seed: SplitMix64 over the mixed words, so
/// neighbouring traces get unrelated streams.
fn derive_seed(seed: u64, round: usize, trace: usize, purpose: u64) -> u64 {
    let mut r = Rng::new(
        seed ^ (round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (trace as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ purpose.wrapping_mul(0x1656_67B1_9E37_79F9),
    );
    r.next_u64()
}

/// K distinct indices of `0..n`, drawn with the (round, trace)'s seed (partial Fisher–Yates), in
/// the order drawn.
pub fn sample_parents(seed: u64, round: usize, trace: usize, n: usize, k: usize) -> Vec<usize> {
    let mut rng = Rng::new(derive_seed(seed, round, trace, 1));
    let mut pool: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k.min(n));
    pool
}

impl<B: Backend> Engine<B> {
    /// The end-of-thinking ids: `config.think_marker`, else the model's `</think>`, else
    /// [`FALLBACK_END_OF_THINKING`].
    pub fn end_of_thinking(&self, config: &RsaConfig) -> Result<Vec<u32>, ReasonError> {
        let tok = self.tokenizer();
        let text = match &config.think_marker {
            Some(m) => m.as_str(),
            None if tok.token_to_id(END_OF_THINKING).is_some()
                || self.chat_template().source().contains(END_OF_THINKING) =>
            {
                END_OF_THINKING
            }
            None => FALLBACK_END_OF_THINKING,
        };
        let ids = tok.encode(text, false)?;
        if ids.is_empty() {
            return Err(ReasonError::EmptyMarker(text.to_string()));
        }
        Ok(ids)
    }

    /// What a run of `config` on `query` will ask of its [`RoundGate`]: round 0's traces and the
    /// largest round's, checked against the context (bad configurations are the same typed errors
    /// [`Engine::reason`] gives, before anything is decoded).
    pub fn reason_shape(
        &self,
        query: &str,
        config: &RsaConfig,
    ) -> Result<ReasonShape, ReasonError> {
        let run = self.plan_run(query, config)?;
        let per_trace = config.think_budget + run.marker.len() + config.max_tokens;
        let first = RoundShape {
            traces: config.n,
            positions: run.query_ids.len() + per_trace,
        };
        let longest_aggregation = run.aggregation.as_ref().map_or(0, |a| {
            a.fixed_len() + config.k * config.tail_tokens + per_trace
        });
        Ok(ReasonShape {
            first,
            largest: RoundShape {
                traces: config.n,
                positions: first.positions.max(longest_aggregation),
            },
        })
    }

    /// Checks `config` and builds what every round needs: the marker, round 0's prompt, the
    /// aggregation prompt's fixed parts.
    fn plan_run(&self, query: &str, config: &RsaConfig) -> Result<RunPlan, ReasonError> {
        config.validate()?;
        let marker = self.end_of_thinking(config)?;
        let context = self.config().max_position;
        let query_ids = prompt::query_prompt(self, query)?;
        config.check_context("round 0", query_ids.len(), marker.len(), context)?;
        let aggregation =
            if config.rounds > 0 || matches!(config.selection, Selection::Aggregate(_)) {
                let p = AggregationPrompt::new(self, query, config.k)?;
                let longest = p.fixed_len() + config.k * config.tail_tokens;
                config.check_context("an aggregation prompt", longest, marker.len(), context)?;
                Some(p)
            } else {
                None
            };
        Ok(RunPlan {
            marker,
            query_ids,
            aggregation,
        })
    }

    /// Runs Markovian RSA on `query` (one user turn through the chat template), streaming
    /// [`ReasonEvent`]s. A round's traces decode together, their passes batched. Bad
    /// configurations are typed errors before anything is decoded; `config.decoding`'s cancel
    /// token ends the run with [`ReasonError::Cancelled`].
    pub fn reason(
        &self,
        query: &str,
        config: &RsaConfig,
        on_event: &mut dyn FnMut(ReasonEvent),
    ) -> Result<RsaOutput, ReasonError>
    where
        Self: Sync,
    {
        self.reason_gated(query, config, &Ungated, on_event)
    }

    /// [`Engine::reason`] with each round admitted by `gate` before it decodes (the server's
    /// scheduler: slots and the KV budget); the round's lease is given back once its caches are
    /// freed.
    pub fn reason_gated(
        &self,
        query: &str,
        config: &RsaConfig,
        gate: &dyn RoundGate,
        on_event: &mut dyn FnMut(ReasonEvent),
    ) -> Result<RsaOutput, ReasonError>
    where
        Self: Sync,
    {
        let started = Instant::now();
        let RunPlan {
            marker,
            query_ids,
            aggregation,
        } = self.plan_run(query, config)?;
        let base = config
            .decoding
            .clone()
            .unwrap_or_else(|| self.default_decoding());
        let plan = TracePlan {
            base: &base,
            temperature: config.temperature,
            top_p: config.top_p,
            think_budget: config.think_budget,
            max_tokens: config.max_tokens,
            marker: &marker,
        };
        let extractor = config.selection.extractor();
        let final_aggregation = matches!(config.selection, Selection::Aggregate(_));
        let mut rounds: Vec<RoundRecord> = Vec::new();
        let last = config.rounds + usize::from(final_aggregation);
        for round in 0..=last {
            let width = if round > config.rounds { 1 } else { config.n };
            let mut parents = Vec::with_capacity(width);
            let mut prompts = Vec::with_capacity(width);
            for trace in 0..width {
                let seed = derive_seed(config.seed, round, trace, 0);
                match (round, &aggregation, rounds.last()) {
                    (0, _, _) => {
                        parents.push(Vec::new());
                        prompts.push(TracePrompt {
                            ids: query_ids.clone(),
                            seed,
                        });
                    }
                    (_, Some(agg), Some(prev)) => {
                        let from =
                            sample_parents(config.seed, round, trace, prev.traces.len(), config.k);
                        let tails = from
                            .iter()
                            .map(|&p| {
                                paragraph_tail(
                                    self.tokenizer(),
                                    &prev.traces[p].tokens,
                                    config.tail_tokens,
                                )
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        prompts.push(TracePrompt {
                            ids: agg.assemble(&tails),
                            seed,
                        });
                        parents.push(from);
                    }
                    _ => unreachable!("aggregation rounds follow round 0 with their prompt built"),
                }
            }
            let per_trace = config.think_budget + marker.len() + config.max_tokens;
            let positions: Vec<usize> = prompts.iter().map(|p| p.ids.len() + per_trace).collect();
            let lease = gate.admit(round, &positions)?;
            on_event(ReasonEvent::RoundStarted {
                round,
                traces: width,
            });
            let meter = KvMeter::new();
            let mut failure = None;
            let decoded = KvMeter::measure(&meter, || {
                decode_traces(self, &prompts, &plan, &mut |u| match u {
                    TraceUpdate::Started(i) => on_event(ReasonEvent::TraceStarted {
                        round,
                        trace: i,
                        parents: parents[i].clone(),
                        prompt_tokens: prompts[i].ids.len(),
                    }),
                    TraceUpdate::Text(i, t) => on_event(ReasonEvent::TraceText {
                        round,
                        trace: i,
                        text: t.to_string(),
                    }),
                    TraceUpdate::Finished(i, t) => {
                        let answer = self
                            .tokenizer()
                            .decode(&t.tokens, true)
                            .map_err(ReasonError::from)
                            .and_then(|text| extractor.extract(&text));
                        match answer {
                            Ok(answer) => on_event(ReasonEvent::TraceFinished {
                                round,
                                trace: i,
                                tokens: t.tokens.len(),
                                forced_end_of_thinking: t.forced_at.is_some(),
                                answer,
                            }),
                            Err(e) => failure = failure.take().or(Some(e)),
                        }
                    }
                })
            });
            // Every trace's cache is freed when its decoding thread ends: the room goes back.
            drop(lease);
            let decoded = decoded?;
            if let Some(e) = failure {
                return Err(e);
            }
            let record = self.record_round(decoded, prompts, parents, extractor, &meter)?;
            on_event(ReasonEvent::RoundDone {
                round,
                votes: record.votes.clone(),
                tokens: record.traces.iter().map(|t| t.tokens.len()).sum(),
                peak_kv_bytes: record.peak_kv_bytes,
            });
            rounds.push(record);
        }
        let decisive = if final_aggregation {
            &rounds[rounds.len() - 2]
        } else {
            &rounds[rounds.len() - 1]
        };
        let votes = decisive.votes.clone();
        let answer = if final_aggregation {
            rounds[rounds.len() - 1].traces[0].answer.clone()
        } else {
            votes.first().map(|v| v.answer.clone())
        };
        let all = || rounds.iter().flat_map(|r| &r.traces);
        let totals = RsaTotals {
            traces: all().count(),
            prompt_tokens: all().map(|t| t.prompt.len()).sum(),
            generated_tokens: all().map(|t| t.tokens.len()).sum(),
            forward_passes: all().map(|t| t.forward_passes).sum(),
            peak_kv_bytes: rounds.iter().map(|r| r.peak_kv_bytes).max().unwrap_or(0),
            elapsed: started.elapsed(),
        };
        Ok(RsaOutput {
            answer,
            votes,
            rounds,
            marker,
            totals,
        })
    }

    fn record_round(
        &self,
        traces: Vec<Trace>,
        prompts: Vec<TracePrompt>,
        parents: Vec<Vec<usize>>,
        extractor: &Extractor,
        meter: &Arc<KvMeter>,
    ) -> Result<RoundRecord, ReasonError> {
        let mut records = Vec::with_capacity(traces.len());
        for ((t, p), parents) in traces.into_iter().zip(prompts).zip(parents) {
            let text = self.tokenizer().decode(&t.tokens, true)?;
            records.push(TraceRecord {
                answer: extractor.extract(&text)?,
                parents,
                prompt: p.ids,
                text,
                tokens: t.tokens,
                forced_at: t.forced_at,
                finish_reason: t.finish_reason,
                forward_passes: t.forward_passes,
            });
        }
        Ok(RoundRecord {
            votes: tally(records.iter().map(|r| r.answer.as_deref())),
            traces: records,
            peak_kv_bytes: meter.peak(),
            kv_bytes_after: meter.live(),
        })
    }
}

/// What [`Engine::plan_run`] checked and built.
struct RunPlan {
    marker: Vec<u32>,
    query_ids: Vec<u32>,
    aggregation: Option<AggregationPrompt>,
}

impl LoadedEngine {
    /// [`Engine::reason_gated`] on whichever backend was loaded.
    pub fn reason_gated(
        &self,
        query: &str,
        config: &RsaConfig,
        gate: &dyn RoundGate,
        on_event: &mut dyn FnMut(ReasonEvent),
    ) -> Result<RsaOutput, ReasonError> {
        match self {
            LoadedEngine::Cpu(e) => e.reason_gated(query, config, gate, on_event),
            LoadedEngine::Gpu(e) => e.reason_gated(query, config, gate, on_event),
        }
    }

    /// [`Engine::reason_shape`] on whichever backend was loaded.
    pub fn reason_shape(
        &self,
        query: &str,
        config: &RsaConfig,
    ) -> Result<ReasonShape, ReasonError> {
        match self {
            LoadedEngine::Cpu(e) => e.reason_shape(query, config),
            LoadedEngine::Gpu(e) => e.reason_shape(query, config),
        }
    }

    /// [`Engine::reason`] on whichever backend was loaded.
    pub fn reason(
        &self,
        query: &str,
        config: &RsaConfig,
        on_event: &mut dyn FnMut(ReasonEvent),
    ) -> Result<RsaOutput, ReasonError> {
        match self {
            LoadedEngine::Cpu(e) => e.reason(query, config, on_event),
            LoadedEngine::Gpu(e) => e.reason(query, config, on_event),
        }
    }

    /// [`Engine::end_of_thinking`] on whichever backend was loaded.
    pub fn end_of_thinking(&self, config: &RsaConfig) -> Result<Vec<u32>, ReasonError> {
        match self {
            LoadedEngine::Cpu(e) => e.end_of_thinking(config),
            LoadedEngine::Gpu(e) => e.end_of_thinking(config),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_k_distinct_seeded_and_reproducible() {
        for (n, k) in [(1, 1), (5, 3), (8, 8), (64, 4)] {
            let a = sample_parents(7, 1, 3, n, k);
            assert_eq!(a, sample_parents(7, 1, 3, n, k));
            assert_eq!(a.len(), k);
            let mut d = a.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), k, "{a:?}");
            assert!(a.iter().all(|&i| i < n));
        }
        // Different traces, rounds and seeds draw differently (over many draws, not all equal).
        let draws: Vec<Vec<usize>> = (0..16).map(|t| sample_parents(7, 1, t, 16, 4)).collect();
        assert!(draws.iter().any(|d| d != &draws[0]));
        assert_ne!(
            sample_parents(7, 1, 0, 64, 4),
            sample_parents(8, 1, 0, 64, 4)
        );
        assert_ne!(
            sample_parents(7, 1, 0, 64, 4),
            sample_parents(7, 2, 0, 64, 4)
        );
    }

    #[test]
    fn every_index_is_drawn_about_equally_often() {
        let mut counts = [0usize; 6];
        for t in 0..3000 {
            for i in sample_parents(11, 1, t, 6, 2) {
                counts[i] += 1;
            }
        }
        // 1000 expected each; a biased draw (e.g. never the last index) is far outside ±15 %.
        assert!(
            counts.iter().all(|&c| (850..=1150).contains(&c)),
            "{counts:?}"
        );
    }
}
