//! Admission of a run's rounds. Before a round decodes, [`RoundGate::admit`] is asked for room for
//! its traces (each trace's KV positions: prompt + β + marker + answer) and the lease it returns is
//! held until the round's caches are freed. A library run takes [`Ungated`]; the server's scheduler
//! admits rounds the way it admits requests (slots and the KV budget), so a run waits its turn
//! between rounds instead of going around the other requests.

use super::ReasonError;

/// Held while a round decodes; dropping it gives the room back.
pub type RoundLease = Box<dyn Send>;

/// Room for a round: `traces` traces of at most `positions` KV positions each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundShape {
    pub traces: usize,
    pub positions: usize,
}

/// What a run will ask of its gate, known before anything decodes
/// ([`crate::engine::Engine::reason_shape`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonShape {
    /// Round 0: N traces of the query, every one the same size.
    pub first: RoundShape,
    /// No round asks for more traces, nor a trace for more positions (aggregation prompts at
    /// their longest: K full tails).
    pub largest: RoundShape,
}

/// Decides when a round may decode.
pub trait RoundGate: Sync {
    /// Blocks until round `round`, whose traces need `positions` KV positions each, may decode.
    /// An error (the run was cancelled while it waited, the server is closing) ends the run.
    fn admit(&self, round: usize, positions: &[usize]) -> Result<RoundLease, ReasonError>;
}

/// Every round decodes at once.
pub struct Ungated;

impl RoundGate for Ungated {
    fn admit(&self, _round: usize, _positions: &[usize]) -> Result<RoundLease, ReasonError> {
        Ok(Box::new(()))
    }
}
