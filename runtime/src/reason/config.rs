//! What an RSA run is asked to do ([`RsaConfig`]), checked into typed errors before any token is
//! decoded.

use crate::decode::DecodeParams;
use crate::engine::EngineError;

use super::answer::Extractor;

/// Markovian RSA's knobs (see the module header for the algorithm).
#[derive(Clone, Debug)]
pub struct RsaConfig {
    /// N: traces per round.
    pub n: usize,
    /// K: candidates (traces of the previous round, sampled without replacement) per aggregation
    /// prompt; at most N.
    pub k: usize,
    /// T: aggregation rounds after round 0 (0 = plain majority-of-N).
    pub rounds: usize,
    /// τ: tokens of each candidate's end carried into an aggregation prompt (cut back to the
    /// first paragraph boundary inside them).
    pub tail_tokens: usize,
    /// β: thinking tokens per trace before the end-of-thinking marker is forced.
    pub think_budget: usize,
    /// Tokens per trace after its thinking ends (the answer).
    pub max_tokens: usize,
    pub selection: Selection,
    pub temperature: f32,
    pub top_p: f32,
    /// Seeds every draw: each trace's sampling and each aggregation prompt's K candidates.
    pub seed: u64,
    /// The end-of-thinking text forced after β tokens; `None`: the model's `</think>` when its
    /// vocabulary or chat template has one, else [`super::FALLBACK_END_OF_THINKING`].
    pub think_marker: Option<String>,
    /// Decoder, commit policy and the rest of each trace's decoding (`None`: the model file's
    /// defaults). Its sampling, budget and EOS settings are replaced by this config's.
    pub decoding: Option<DecodeParams>,
}

impl Default for RsaConfig {
    fn default() -> Self {
        RsaConfig {
            n: 8,
            k: 4,
            rounds: 2,
            tail_tokens: 4096,
            think_budget: 8192,
            max_tokens: 512,
            selection: Selection::Majority(Extractor::Boxed),
            temperature: 0.8,
            top_p: 0.95,
            seed: 0,
            think_marker: None,
            decoding: None,
        }
    }
}

/// How the final answer is chosen from the last round.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// The answer most of the last round's traces give (ties: the one reached first).
    Majority(Extractor),
    /// One more aggregation trace over K of the last round's traces; its answer.
    Aggregate(Extractor),
}

impl Selection {
    pub fn extractor(&self) -> &Extractor {
        match self {
            Selection::Majority(e) | Selection::Aggregate(e) => e,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReasonError {
    #[error("k = {k} candidates per aggregation prompt exceeds n = {n} traces per round")]
    KExceedsN { k: usize, n: usize },
    #[error("{name} = {value} is invalid: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the answer pattern {pattern:?} does not compile: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error(
        "{what}: a prompt of up to {prompt} tokens + {think} thinking + {marker} marker + \
         {answer} answer tokens exceeds the context of {context} positions"
    )]
    BeyondContext {
        what: &'static str,
        prompt: usize,
        think: usize,
        marker: usize,
        answer: usize,
        context: usize,
    },
    #[error("the chat template does not carry the aggregation prompt's text through verbatim")]
    Template,
    #[error("the end-of-thinking marker {0:?} encodes to no tokens")]
    EmptyMarker(String),
    #[error("cancelled")]
    Cancelled,
    /// A round was not given room to decode (the server's scheduler refused it).
    #[error("a round was not admitted: {0}")]
    Refused(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<crate::tokenizer::TokenizerError> for ReasonError {
    fn from(e: crate::tokenizer::TokenizerError) -> Self {
        ReasonError::Engine(e.into())
    }
}

impl From<crate::decode::DecodeError> for ReasonError {
    fn from(e: crate::decode::DecodeError) -> Self {
        ReasonError::Engine(e.into())
    }
}

fn invalid(name: &'static str, value: impl ToString, expected: &'static str) -> ReasonError {
    ReasonError::InvalidParameter {
        name,
        value: value.to_string(),
        expected,
    }
}

impl RsaConfig {
    /// The checks that need no model: counts, budgets, sampling, the answer pattern. The context
    /// check needs the prompts and is [`RsaConfig::check_context`].
    pub fn validate(&self) -> Result<(), ReasonError> {
        if self.n == 0 {
            return Err(invalid("n", 0, "at least 1 trace per round"));
        }
        if self.k == 0 {
            return Err(invalid("k", 0, "at least 1 candidate per aggregation"));
        }
        if self.k > self.n {
            return Err(ReasonError::KExceedsN {
                k: self.k,
                n: self.n,
            });
        }
        if self.tail_tokens == 0 {
            return Err(invalid("tail_tokens", 0, "at least 1 token"));
        }
        if self.think_budget == 0 {
            return Err(invalid("think_budget", 0, "at least 1 token"));
        }
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", 0, "at least 1 token"));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(invalid(
                "temperature",
                self.temperature,
                "a finite value >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", self.top_p, "within (0, 1]"));
        }
        if matches!(&self.think_marker, Some(m) if m.is_empty()) {
            return Err(ReasonError::EmptyMarker(String::new()));
        }
        self.selection.extractor().check()?;
        if let Some(d) = &self.decoding {
            d.validate()?;
        }
        Ok(())
    }

    /// A trace of a `prompt`-token prompt fits the context: prompt + β + marker + answer.
    pub fn check_context(
        &self,
        what: &'static str,
        prompt: usize,
        marker: usize,
        context: usize,
    ) -> Result<(), ReasonError> {
        let need = prompt
            .saturating_add(self.think_budget)
            .saturating_add(marker)
            .saturating_add(self.max_tokens);
        if need > context {
            return Err(ReasonError::BeyondContext {
                what,
                prompt,
                think: self.think_budget,
                marker,
                answer: self.max_tokens,
                context,
            });
        }
        Ok(())
    }
}
