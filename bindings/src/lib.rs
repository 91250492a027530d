//! UniFFI bindings of the edgediff runtime: the Kotlin (Android, JVM) and Swift (iOS, macOS) SDKs
//! are generated from this crate in library mode (`bindings/scripts/generate.sh`).
//!
//! A thin layer over the runtime's public API and nothing more: an [`Engine`] object, records that
//! mirror the runtime's types (converted with `From`), one error enum, a foreign [`TokenListener`]
//! for streamed text and a [`TaskHandle`] that cancels a generation when told or when dropped;
//! `Engine.reason` runs Markovian RSA with a foreign [`ReasonListener`] for its events.
//! No panic crosses the boundary: every fallible call and every generation thread runs under
//! `catch_unwind` and reports a panic as `EdgeDiffError::Internal`; the infallible getters
//! (`model_info`, `stats`) only read values checked at load, and UniFFI's scaffolding catches a
//! panic on any exported call anyway.

mod engine;
mod error;
mod reason;
mod records;
mod task;

pub use engine::Engine;
pub use error::EdgeDiffError;
pub use reason::{ReasonConfig, ReasonEvent, ReasonListener, ReasonResult, ReasonVote};
pub use records::*;
pub use task::{TaskHandle, TokenListener};

uniffi::setup_scaffolding!();
