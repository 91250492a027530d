//! Decoding one round's traces under a thinking budget. Every trace of every round goes through
//! [`decode_traces`], and every request it makes through [`generate_all`], which decodes them
//! together on the batched engine: a round's traces share one forward pass per step.

use crate::backend::kv_meter::KvMeter;
use crate::backend::Backend;
use crate::decode::{DecodeParams, FinishReason, Sampling};
use crate::engine::{Engine, Event, GenerationOutput, GenerationRequest, Prompt};

use super::ReasonError;

/// One trace to decode: its prompt ids and its sampling seed.
#[derive(Clone, Debug)]
pub(crate) struct TracePrompt {
    pub ids: Vec<u32>,
    pub seed: u64,
}

/// How every trace of a run decodes.
pub(crate) struct TracePlan<'a> {
    /// Decoder and policy; sampling, budget and EOS handling are set per phase here.
    pub base: &'a DecodeParams,
    pub temperature: f32,
    pub top_p: f32,
    pub think_budget: usize,
    pub max_tokens: usize,
    /// End-of-thinking ids, forced after `think_budget` tokens.
    pub marker: &'a [u32],
}

/// A decoded trace.
#[derive(Clone, Debug)]
pub(crate) struct Trace {
    /// Generated ids (a forced marker included, EOS left out).
    pub tokens: Vec<u32>,
    /// Where the forced marker starts in `tokens` (`None`: not forced).
    pub forced_at: Option<usize>,
    pub finish_reason: FinishReason,
    pub forward_passes: usize,
}

/// Progress of [`decode_traces`], by the index of the trace in its `prompts`.
pub(crate) enum TraceUpdate<'a> {
    Started(usize),
    Text(usize, &'a str),
    Finished(usize, &'a Trace),
}

/// Decodes every prompt as a trace with a thinking budget: up to β tokens; a trace that neither
/// ended (EOS) nor wrote the marker itself by then gets the marker appended, and every unfinished
/// trace continues for its answer, up to β + marker + max_tokens tokens in all. The continuation
/// is a second request whose prompt is the trace so far (one prefill pass more; its cache is the
/// first's size plus the answer, the first is freed before it). Both phases decode every trace
/// that needs them together ([`generate_all`]).
pub(crate) fn decode_traces<B: Backend>(
    engine: &Engine<B>,
    prompts: &[TracePrompt],
    plan: &TracePlan<'_>,
    on_update: &mut dyn FnMut(TraceUpdate<'_>),
) -> Result<Vec<Trace>, ReasonError>
where
    Engine<B>: Sync,
{
    let request = |ids: Vec<u32>, seed: u64, max_new: usize| {
        let mut decoding = plan.base.clone();
        decoding.sampling = Sampling {
            temperature: plan.temperature,
            top_p: plan.top_p,
            seed,
            ..plan.base.sampling
        };
        decoding.max_new_tokens = max_new;
        decoding.ignore_eos = false;
        decoding.canvas_events = false;
        GenerationRequest {
            prompt: Prompt::Tokens(ids),
            decoding,
            stop: Vec::new(),
        }
    };
    let first: Vec<GenerationRequest> = prompts
        .iter()
        .map(|p| request(p.ids.clone(), p.seed, plan.think_budget))
        .collect();
    let mut traces: Vec<Option<Trace>> = vec![None; prompts.len()];
    let mut second = Vec::new();
    let mut second_of = Vec::new();
    let outputs = generate_all(engine, &first, &mut |i, u| match u {
        Progress::Started => on_update(TraceUpdate::Started(i)),
        Progress::Text(t) => on_update(TraceUpdate::Text(i, t)),
    })?;
    for (i, out) in outputs.into_iter().enumerate() {
        let mut trace = Trace {
            tokens: out.tokens,
            forced_at: None,
            finish_reason: out.finish_reason,
            forward_passes: out.stats.forward_passes,
        };
        if out.finish_reason != FinishReason::Length {
            on_update(TraceUpdate::Finished(i, &trace));
            traces[i] = Some(trace);
            continue;
        }
        if !contains(&trace.tokens, plan.marker) {
            trace.forced_at = Some(trace.tokens.len());
            trace.tokens.extend_from_slice(plan.marker);
            let text = engine.tokenizer().decode(plan.marker, false)?;
            on_update(TraceUpdate::Text(i, &text));
        }
        let budget = plan.think_budget + plan.marker.len() + plan.max_tokens;
        let max_new = budget - trace.tokens.len();
        let mut ids = prompts[i].ids.clone();
        ids.extend_from_slice(&trace.tokens);
        // A different seed from the first phase's, so the continuation does not replay its draws.
        second.push(request(
            ids,
            prompts[i].seed ^ 0x5EC0_D0FA_5E00_0001,
            max_new,
        ));
        second_of.push(i);
        traces[i] = Some(trace);
    }
    let outputs = generate_all(engine, &second, &mut |j, u| {
        if let Progress::Text(t) = u {
            on_update(TraceUpdate::Text(second_of[j], t))
        }
    })?;
    for (j, out) in outputs.into_iter().enumerate() {
        let i = second_of[j];
        let trace = traces[i]
            .as_mut()
            .expect("every first-phase trace is recorded");
        trace.tokens.extend_from_slice(&out.tokens);
        trace.finish_reason = out.finish_reason;
        trace.forward_passes += out.stats.forward_passes;
        on_update(TraceUpdate::Finished(i, trace));
    }
    Ok(traces.into_iter().flatten().collect())
}

fn contains(haystack: &[u32], needle: &[u32]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Progress of one request of [`generate_all`].
pub(crate) enum Progress<'a> {
    Started,
    Text(&'a str),
}

/// What a decoding thread tells the caller's thread.
enum Message {
    Started(usize),
    Text(usize, String),
}

/// Generates every request together: one thread each through [`Engine::generate_batched`], so
/// their forward passes run as shared batched passes (the weights read once per step for all of
/// them), each with its own KV cache; the caller's KV meter counts every thread's caches. Progress
/// reaches `on_progress` on the caller's thread. A cancelled request ends the run with
/// [`ReasonError::Cancelled`]; otherwise the first failure is the run's.
pub(crate) fn generate_all<B: Backend>(
    engine: &Engine<B>,
    requests: &[GenerationRequest],
    on_progress: &mut dyn FnMut(usize, Progress<'_>),
) -> Result<Vec<GenerationOutput>, ReasonError>
where
    Engine<B>: Sync,
{
    if requests
        .iter()
        .any(|r| r.decoding.cancel.as_ref().is_some_and(|c| c.is_cancelled()))
    {
        return Err(ReasonError::Cancelled);
    }
    let meter = KvMeter::current();
    let (send, receive) = std::sync::mpsc::channel();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, request)| {
                let send = send.clone();
                let meter = meter.clone();
                scope.spawn(move || {
                    let run = || {
                        let _ = send.send(Message::Started(i));
                        engine.generate_batched(request, &mut |e| {
                            if let Event::Text(t) = e {
                                let _ = send.send(Message::Text(i, t));
                            }
                        })
                    };
                    match &meter {
                        Some(m) => KvMeter::measure(m, run),
                        None => run(),
                    }
                })
            })
            .collect();
        drop(send);
        // Ends when every thread has dropped its sender, i.e. finished.
        for m in receive {
            match m {
                Message::Started(i) => on_progress(i, Progress::Started),
                Message::Text(i, t) => on_progress(i, Progress::Text(&t)),
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Vec<_>>()
    });
    let mut outputs = Vec::with_capacity(results.len());
    for r in results {
        let out = r?;
        if out.finish_reason == FinishReason::Cancelled {
            return Err(ReasonError::Cancelled);
        }
        outputs.push(out);
    }
    Ok(outputs)
}
