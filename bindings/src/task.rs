//! Streaming: the app's [`TokenListener`] and the [`TaskHandle`] of a running generation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use edgediff::decode::CancelToken;

use crate::error::EdgeDiffError;
use crate::records::GenerationStats;

/// Implemented by the app (Kotlin `TokenListener`, Swift `TokenListener`). Called on the
/// generation's own thread, in order: any number of `on_text`, then exactly one of `on_finished`
/// or `on_error`.
#[uniffi::export(foreign)]
pub trait TokenListener: Send + Sync {
    /// Text that became final. Throwing cancels the generation and reports the exception through
    /// `on_error` as `EdgeDiffError::Callback`.
    fn on_text(&self, text: String) -> Result<(), EdgeDiffError>;
    /// The generation ended: EOS, length, a stop string, or cancellation (`finish_reason`).
    fn on_finished(&self, stats: GenerationStats) -> Result<(), EdgeDiffError>;
    /// The generation failed.
    fn on_error(&self, error: EdgeDiffError) -> Result<(), EdgeDiffError>;
}

/// A running generation. Cancels it when told to or when released (Kotlin `close()` or garbage
/// collection, Swift deinit): keep it while the generation should run.
#[derive(uniffi::Object)]
pub struct TaskHandle {
    cancel: CancelToken,
    finished: Arc<AtomicBool>,
}

impl TaskHandle {
    pub(crate) fn new(cancel: CancelToken, finished: Arc<AtomicBool>) -> Self {
        TaskHandle { cancel, finished }
    }
}

#[uniffi::export]
impl TaskHandle {
    /// Asks the generation to stop; it ends within one denoising step with `on_finished`
    /// (`finish_reason` = Cancelled). Idempotent; a no-op once finished.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Whether the listener has had its last call.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
