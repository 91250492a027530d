//! What a model is, apart from any weights: the architecture description every family maps onto
//! ([`ModelConfig`] and its variant enums) and the canonical tensor names of the model file. The
//! bottom of the house: the file format, the backends and the model all read it, and it imports
//! none of them, so `format/` and `backend/` never need `model/`.

mod config;
pub mod names;

pub use config::{
    Architecture, AttentionKind, ConfigError, EmbeddingKind, Gating, ModelConfig, MoeConfig,
    Prediction, QkNorm, ResidualKind, RouterKind, SlidingAttention,
};
