//! The one error type every exported call can throw: `EdgeDiffException.*` in Kotlin,
//! `EdgeDiffError.*` in Swift. Flat (each variant carries the runtime's message) so apps match on
//! the kind and show the text; the runtime's own error enums stay free to grow.

use edgediff::backend::BackendError;
use edgediff::decode::DecodeError;
use edgediff::engine::EngineError;
use edgediff::experts::ExpertsError;
use edgediff::format::FormatError;
use edgediff::model::{ConfigError, ModelError};
use edgediff::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum EdgeDiffError {
    /// The model file could not be opened or read (missing, unreadable).
    #[error("{0}")]
    Io(String),
    /// The file is not a valid model (bad magic, version, index, config, tensors).
    #[error("{0}")]
    InvalidModel(String),
    /// Tokenizing, detokenizing or rendering the chat template failed.
    #[error("{0}")]
    Tokenizer(String),
    /// A request or configuration value is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The compute backend failed (GPU device lost, out of memory, …).
    #[error("{0}")]
    Backend(String),
    /// The request needs something this build or device does not have (a GPU, a decoder the
    /// model cannot run, residency settings).
    #[error("{0}")]
    Unsupported(String),
    /// The run was cancelled before it had a result (a reasoning run: `TaskHandle.cancel()`).
    #[error("{0}")]
    Cancelled(String),
    /// A listener implemented by the app threw.
    #[error("listener failed: {0}")]
    Callback(String),
    /// A bug in edgediff (a caught panic); the engine stays usable.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<FormatError> for EdgeDiffError {
    fn from(e: FormatError) -> Self {
        match e {
            FormatError::Io { .. } => EdgeDiffError::Io(e.to_string()),
            e => EdgeDiffError::InvalidModel(e.to_string()),
        }
    }
}

impl From<ConfigError> for EdgeDiffError {
    fn from(e: ConfigError) -> Self {
        EdgeDiffError::InvalidModel(e.to_string())
    }
}

impl From<TokenizerError> for EdgeDiffError {
    fn from(e: TokenizerError) -> Self {
        EdgeDiffError::Tokenizer(e.to_string())
    }
}

impl From<BackendError> for EdgeDiffError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Format(e) => e.into(),
            BackendError::TokenOutOfRange { .. } => EdgeDiffError::InvalidArgument(e.to_string()),
            e => EdgeDiffError::Backend(e.to_string()),
        }
    }
}

impl From<ModelError> for EdgeDiffError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Format(e) => e.into(),
            ModelError::Backend(e) => e.into(),
            e @ ModelError::TensorShape { .. } => EdgeDiffError::InvalidModel(e.to_string()),
            e => EdgeDiffError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<EngineError> for EdgeDiffError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Format(e) => e.into(),
            EngineError::Model(e) => e.into(),
            EngineError::Tokenizer(e) => e.into(),
            EngineError::Decode(DecodeError::Model(e)) => e.into(),
            EngineError::Decode(e @ DecodeError::Unsupported(_)) => {
                EdgeDiffError::Unsupported(e.to_string())
            }
            EngineError::Decode(e) => EdgeDiffError::InvalidArgument(e.to_string()),
            e @ EngineError::BackendUnavailable { .. } => EdgeDiffError::Unsupported(e.to_string()),
            EngineError::Experts(ExpertsError::Model(e)) => e.into(),
            EngineError::Experts(ExpertsError::Format(e)) => e.into(),
            e @ EngineError::Experts(ExpertsError::Io { .. }) => EdgeDiffError::Io(e.to_string()),
            e @ EngineError::Experts(_) => EdgeDiffError::InvalidArgument(e.to_string()),
        }
    }
}

/// A foreign listener threw something its signature does not declare.
impl From<uniffi::UnexpectedUniFFICallbackError> for EdgeDiffError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        EdgeDiffError::Callback(e.reason)
    }
}

/// Runs `f`, turning a panic into [`EdgeDiffError::Internal`] so none unwinds into the app.
pub(crate) fn catch_panic<T>(
    f: impl FnOnce() -> Result<T, EdgeDiffError>,
) -> Result<T, EdgeDiffError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(EdgeDiffError::Internal(msg))
    })
}
