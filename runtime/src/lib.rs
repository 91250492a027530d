//! edgediff: an on-device runtime for Mixture-of-Experts diffusion language models.
//!
//! Layers, top to bottom: `decode` (block schedule, commit policies) → `model` (config + the forward
//! pass written once) → `backend` (CPU reference, GPU through wgpu) → `format` (the `*.edm` model
//! file, read through memmap2). `reason` runs Markovian RSA (parallel traces, recursive
//! aggregation, bounded KV) over the engine. `import` converts Hugging Face checkpoints; `synth` makes random
//! models for tests and benchmarks; `serve` (feature `serve`, on with the CLI) is the
//! OpenAI-compatible HTTP server.

pub mod arch;
pub mod backend;
pub mod batch;
#[cfg(feature = "cli")]
pub mod cli;
pub mod decode;
pub mod engine;
pub mod eval;
pub mod experts;
pub mod format;
pub mod import;
pub mod model;
pub mod reason;
#[cfg(feature = "serve")]
pub mod serve;
pub mod synth;
pub mod tokenizer;
