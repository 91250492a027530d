//! `edgediff reason`: Markovian RSA on one question (see `crate::reason`), with a live per-round
//! view on stderr (each trace's length, whether its thinking was cut, its answer; each round's
//! votes, tokens and peak KV) and the selected answer on stdout (or the whole run as JSON).

use std::io::{IsTerminal, Write};

use anyhow::Context;
use serde_json::json;

use super::generate::{DecoderName, ModelArgs};
use super::human_bytes;
use crate::decode::{
    BidirectionalCache, BidirectionalOptions, BlockOptions, DecoderKind, SpeculativeOptions,
};
use crate::engine::LoadedEngine;
use crate::reason::{Extractor, ReasonEvent, RsaConfig, RsaOutput, Selection, Vote};

#[derive(clap::Args)]
pub struct Args {
    /// The question (read from stdin when absent); one user turn through the chat template.
    pub query: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// N: traces per round.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// K: previous-round traces whose tails each aggregation prompt carries (at most N).
    #[arg(long, default_value_t = 4)]
    pub k: usize,
    /// T: aggregation rounds after round 0 (0: majority vote over N independent traces).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// τ: tokens of each candidate's end carried forward, cut back to a paragraph boundary.
    #[arg(long = "tail", default_value_t = 4096)]
    pub tail: usize,
    /// β: thinking tokens per trace before the end-of-thinking marker is forced.
    #[arg(long, default_value_t = 8192)]
    pub think_budget: usize,
    /// Answer tokens per trace after its thinking ends.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Text forced at the end of thinking (default: the model's </think>, or "\n\nFinal answer:"
    /// for models without one).
    #[arg(long)]
    pub think_marker: Option<String>,
    /// Extract answers with this regular expression (last match; its first group if it has one)
    /// instead of the last \boxed{…}.
    #[arg(long, value_name = "REGEX")]
    pub answer_regex: Option<String>,
    /// Select by one final aggregation trace over K of the last round instead of a majority vote.
    #[arg(long)]
    pub aggregate: bool,
    /// Sampling temperature of every trace (0 makes a round's N traces identical).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Nucleus sampling of every trace.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Seeds every draw: the same seed, question and flags give the same run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decoder of every trace (default: the model's).
    #[arg(long, value_enum)]
    pub decoder: Option<DecoderName>,
    /// Block size (speculative: draft length); default from the model file.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Print every trace's text as it finishes (stderr).
    #[arg(long)]
    pub show_traces: bool,
    /// Write the whole run (every trace, votes, totals) as JSON to stdout instead of the answer.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn config(&self, engine: &LoadedEngine) -> RsaConfig {
        let extractor = match &self.answer_regex {
            Some(r) => Extractor::Regex(r.clone()),
            None => Extractor::Boxed,
        };
        let mut decoding = engine.default_decoding();
        let defaults = &engine.metadata().decoding;
        let block_size = self.block_size.unwrap_or(defaults.block_size.max(1));
        if let Some(d) = self.decoder {
            decoding.decoder = match d {
                DecoderName::Ar => DecoderKind::Ar,
                DecoderName::Canvas => DecoderKind::Canvas(crate::decode::CanvasOptions::default()),
                DecoderName::Block => DecoderKind::Block(BlockOptions {
                    block_size,
                    reuse_last_kv: false,
                }),
                DecoderName::Bidirectional => DecoderKind::Bidirectional(BidirectionalOptions {
                    block_size,
                    cache: BidirectionalCache::Prefix,
                }),
                DecoderName::Speculative => DecoderKind::Speculative(SpeculativeOptions {
                    draft_len: self.block_size.unwrap_or(defaults.draft_len()),
                    beta: 1.0,
                }),
            };
        } else if let (Some(b), DecoderKind::Block(o)) = (self.block_size, &mut decoding.decoder) {
            o.block_size = b;
        }
        RsaConfig {
            n: self.n,
            k: self.k,
            rounds: self.rounds,
            tail_tokens: self.tail,
            think_budget: self.think_budget,
            max_tokens: self.max_tokens,
            selection: if self.aggregate {
                Selection::Aggregate(extractor)
            } else {
                Selection::Majority(extractor)
            },
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            think_marker: self.think_marker.clone(),
            decoding: Some(decoding),
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let query = match &a.query {
        Some(q) => q.clone(),
        None => std::io::read_to_string(std::io::stdin()).context("reading the question")?,
    };
    let engine = a.model.open()?;
    let config = a.config(&engine);
    let mut view = RoundView {
        config: &config,
        show_traces: a.show_traces,
        live: std::io::stderr().is_terminal(),
        texts: Vec::new(),
        done: 0,
    };
    let out = engine
        .reason(&query, &config, &mut |e| view.show(e))
        .context("reasoning")?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&output_json(&out))?);
    } else {
        let t = &out.totals;
        eprintln!(
            "{} traces, {} tokens generated ({} prompt tokens), {} forward passes, peak KV {} \
             (measured), {:.1} s",
            t.traces,
            t.generated_tokens,
            t.prompt_tokens,
            t.forward_passes,
            human_bytes(t.peak_kv_bytes),
            t.elapsed.as_secs_f64()
        );
        println!("{}", out.answer.as_deref().unwrap_or("(no answer)"));
    }
    Ok(())
}

fn votes_line(votes: &[Vote]) -> String {
    if votes.is_empty() {
        return "no answers".into();
    }
    votes
        .iter()
        .map(|v| format!("{} ×{}", v.answer, v.count))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The live per-round view on stderr.
struct RoundView<'a> {
    config: &'a RsaConfig,
    show_traces: bool,
    /// A terminal: the progress line is redrawn in place.
    live: bool,
    texts: Vec<String>,
    done: usize,
}

impl RoundView<'_> {
    fn show(&mut self, e: ReasonEvent) {
        let mut err = std::io::stderr().lock();
        match e {
            ReasonEvent::RoundStarted { round, traces } => {
                self.texts = vec![String::new(); traces];
                self.done = 0;
                let what = if round == 0 {
                    "independent traces".to_string()
                } else if round > self.config.rounds {
                    format!("final aggregation of {} traces", self.config.k)
                } else {
                    format!(
                        "aggregating {} of the previous {} each",
                        self.config.k, self.config.n
                    )
                };
                let _ = writeln!(err, "round {round}: {traces} {what}");
            }
            ReasonEvent::TraceStarted {
                trace,
                prompt_tokens,
                ..
            } => {
                if self.live {
                    let _ = write!(
                        err,
                        "\r\x1b[K  trace {trace}: prompt {prompt_tokens} tokens…"
                    );
                }
            }
            ReasonEvent::TraceText { trace, text, .. } => {
                if let Some(t) = self.texts.get_mut(trace) {
                    t.push_str(&text);
                }
            }
            ReasonEvent::TraceFinished {
                trace,
                tokens,
                forced_end_of_thinking,
                answer,
                ..
            } => {
                self.done += 1;
                let _ = writeln!(
                    err,
                    "{}  trace {trace}: {tokens} tokens{} → {}",
                    if self.live { "\r\x1b[K" } else { "" },
                    if forced_end_of_thinking {
                        ", thinking cut at the budget"
                    } else {
                        ""
                    },
                    answer.as_deref().unwrap_or("no answer")
                );
                if self.show_traces {
                    let text = self.texts.get(trace).map(String::as_str).unwrap_or("");
                    let _ = writeln!(err, "    {}", text.replace('\n', "\n    "));
                }
            }
            ReasonEvent::RoundDone {
                round,
                votes,
                tokens,
                peak_kv_bytes,
            } => {
                let _ = writeln!(
                    err,
                    "round {round} done: {} — {tokens} tokens, peak KV {}",
                    votes_line(&votes),
                    human_bytes(peak_kv_bytes)
                );
            }
        }
    }
}

fn output_json(out: &RsaOutput) -> serde_json::Value {
    let votes = |v: &[Vote]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|v| json!({"answer": v.answer, "count": v.count}))
            .collect()
    };
    json!({
        "answer": out.answer,
        "votes": votes(&out.votes),
        "rounds": out.rounds.iter().map(|r| json!({
            "votes": votes(&r.votes),
            "peak_kv_bytes": r.peak_kv_bytes,
            "traces": r.traces.iter().map(|t| json!({
                "parents": t.parents,
                "prompt_tokens": t.prompt.len(),
                "tokens": t.tokens.len(),
                "forced_at": t.forced_at,
                "finish_reason": format!("{:?}", t.finish_reason),
                "answer": t.answer,
                "text": t.text,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "totals": {
            "traces": out.totals.traces,
            "prompt_tokens": out.totals.prompt_tokens,
            "generated_tokens": out.totals.generated_tokens,
            "forward_passes": out.totals.forward_passes,
            "peak_kv_bytes": out.totals.peak_kv_bytes,
            "elapsed_s": out.totals.elapsed.as_secs_f64(),
        },
    })
}
