//! What a model is, apart from any weights: the architecture description every family maps onto
//! ([`ModelConfig`] and its variant enums) and the canonical tensor names of the model file. The
//! bottom of the house: the file format, the backends and the model all read it, and it imports
//! none of them, so `format/` and `backend/` never need `model/`.

mod config;
pub mod names;

pub use config::{
    Activation, Architecture, AttentionKind, BlockPieces, CanvasConfig, ConfigError, EmbeddingKind,
    FfnLayout, Gating, GlobalAttention, LayerAttention, ModelConfig, MoeConfig, NormLayout,
    Prediction, QkNorm, ResidualKind, Rope, RouterKind, SlidingAttention,
};
