//! The [`Engine`] object: a loaded model, generating on background threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use edgediff::decode::CancelToken;
use edgediff::engine::{self, EngineError, Event, GenerationOutput, LoadedEngine, Prompt};
use edgediff::tokenizer::ChatMessage;
use futures_channel::oneshot;

use crate::error::{catch_panic, EdgeDiffError};
use crate::records::{
    EngineConfig, EngineStats, GenerationConfig, GenerationResult, GenerationStats, ModelInfo,
};
use crate::task::{TaskHandle, TokenListener};

/// A model opened on a backend. Thread-safe: several generations may run at once.
#[derive(uniffi::Object)]
pub struct Engine {
    inner: LoadedEngine,
    stats: Mutex<EngineStats>,
}

#[uniffi::export]
impl Engine {
    /// Opens a `*.edm` model file. Reads the header, tokenizer and weights; blocking, so call it
    /// off the main thread.
    #[uniffi::constructor]
    pub fn load(path: String, config: EngineConfig) -> Result<Arc<Self>, EdgeDiffError> {
        catch_panic(|| {
            let inner = LoadedEngine::load(&path, &runtime_config(&config)?)?;
            let stats = EngineStats {
                backend: inner.backend_name(),
                generations: 0,
                tokens_generated: 0,
                last: None,
            };
            Ok(Arc::new(Engine {
                inner,
                stats: Mutex::new(stats),
            }))
        })
    }

    pub fn model_info(&self) -> ModelInfo {
        ModelInfo::new(
            self.inner.config(),
            &self.inner.metadata().decoding,
            self.inner.backend_name(),
        )
    }

    /// What this engine has generated so far.
    pub fn stats(&self) -> EngineStats {
        lock(&self.stats).clone()
    }

    /// Text → ids, with the tokenizer's special tokens (e.g. BOS) when `add_special`.
    pub fn tokenize(&self, text: String, add_special: bool) -> Result<Vec<u32>, EdgeDiffError> {
        catch_panic(|| Ok(self.inner.tokenizer().encode(&text, add_special)?))
    }

    /// Ids → text, special tokens left out.
    pub fn detokenize(&self, tokens: Vec<u32>) -> Result<String, EdgeDiffError> {
        catch_panic(|| Ok(self.inner.tokenizer().decode(&tokens, true)?))
    }

    /// Starts generating on a background thread and returns at once. Text streams to
    /// `listener.on_text`; the generation ends with `on_finished` or `on_error`. Invalid
    /// requests fail here, before anything runs.
    pub fn generate(
        self: Arc<Self>,
        prompt: String,
        config: GenerationConfig,
        listener: Arc<dyn TokenListener>,
    ) -> Result<Arc<TaskHandle>, EdgeDiffError> {
        let cancel = CancelToken::new();
        let request = catch_panic(|| self.request(prompt, &config, &cancel))?;
        let finished = Arc::new(AtomicBool::new(false));
        let handle = Arc::new(TaskHandle::new(cancel.clone(), finished.clone()));
        std::thread::Builder::new()
            .name("edgediff-generate".into())
            .spawn(move || {
                // The first listener error cancels the generation and is what gets reported.
                let mut listener_error = None;
                let result = catch_panic(|| {
                    let output = self.inner.generate(&request, &mut |event| {
                        if let Event::Text(text) = event {
                            if listener_error.is_none() {
                                if let Err(e) = listener.on_text(text) {
                                    listener_error = Some(e);
                                    cancel.cancel();
                                }
                            }
                        }
                    })?;
                    Ok(output)
                });
                let end = match (listener_error, result) {
                    (Some(e), _) | (None, Err(e)) => Err(e),
                    (None, Ok(output)) => Ok(self.record(&output)),
                };
                // Marked before the last call so that the listener already sees it finished.
                finished.store(true, Ordering::Release);
                // The listener's own failure here has no one left to report to.
                let _ = match end {
                    Ok(stats) => listener.on_finished(stats),
                    Err(e) => listener.on_error(e),
                };
            })
            .map_err(|e| EdgeDiffError::Internal(format!("cannot start a thread: {e}")))?;
        Ok(handle)
    }

    /// Generates the whole text. Runs on its own thread, not the caller's executor; cancelling
    /// the calling coroutine / task stops the generation within one step.
    pub async fn generate_async(
        self: Arc<Self>,
        prompt: String,
        config: GenerationConfig,
    ) -> Result<GenerationResult, EdgeDiffError> {
        let cancel = CancelToken::new();
        let request = catch_panic(|| self.request(prompt, &config, &cancel))?;
        let (send, receive) = oneshot::channel();
        let engine = self.clone();
        std::thread::Builder::new()
            .name("edgediff-generate".into())
            .spawn(move || {
                let result = catch_panic(|| Ok(engine.inner.generate(&request, &mut |_| {})?)).map(
                    |output| {
                        engine.record(&output);
                        GenerationResult::from(output)
                    },
                );
                // The receiver is gone when the caller was cancelled.
                let _ = send.send(result);
            })
            .map_err(|e| EdgeDiffError::Internal(format!("cannot start a thread: {e}")))?;
        CancelOnDrop { receive, cancel }.await
    }
}

impl Engine {
    /// The runtime's engine (for the calls other modules export, e.g. `reason`).
    pub(crate) fn runtime(&self) -> &LoadedEngine {
        &self.inner
    }

    /// The runtime request: the model's defaults, with what `config` sets.
    fn request(
        &self,
        prompt: String,
        config: &GenerationConfig,
        cancel: &CancelToken,
    ) -> Result<engine::GenerationRequest, EdgeDiffError> {
        let prompt = if config.chat {
            Prompt::Chat(vec![ChatMessage::user(prompt)])
        } else {
            Prompt::Text(prompt)
        };
        let mut request = self.inner.request(prompt);
        let d = &mut request.decoding;
        if let Some(n) = config.max_new_tokens {
            d.max_new_tokens = n as usize;
        }
        d.ignore_eos = config.ignore_eos;
        if let Some(decoder) = config.decoder {
            d.decoder = decoder.kind(&d.decoder);
        }
        if let Some(rule) = config.commit {
            d.policy = rule.into();
        }
        let s = &mut d.sampling;
        s.temperature = config.temperature.unwrap_or(s.temperature);
        s.top_k = config.top_k.map_or(s.top_k, |k| k as usize);
        s.top_p = config.top_p.unwrap_or(s.top_p);
        s.seed = config.seed.unwrap_or(s.seed);
        d.cancel = Some(cancel.clone());
        d.validate().map_err(EngineError::from)?;
        request.stop = config.stop.clone();
        Ok(request)
    }

    fn record(&self, output: &GenerationOutput) -> GenerationStats {
        let stats = GenerationStats::new(&output.stats, output.finish_reason);
        let mut total = lock(&self.stats);
        total.generations += 1;
        total.tokens_generated += output.tokens.len() as u64;
        total.last = Some(stats.clone());
        stats
    }
}

fn runtime_config(config: &EngineConfig) -> Result<engine::EngineConfig, EdgeDiffError> {
    let resident = match &config.resident_profile_path {
        Some(path) => {
            let keep = config.resident_keep.as_deref().unwrap_or("25%");
            Some(engine::ResidentProfile {
                profile: path.into(),
                keep: keep.parse().map_err(|e: edgediff::experts::ExpertsError| {
                    EdgeDiffError::InvalidArgument(e.to_string())
                })?,
            })
        }
        None => None,
    };
    if let Some(dir) = &config.pipeline_cache_dir {
        edgediff::backend::gpu::set_default_pipeline_cache(Some(dir.into()));
    }
    Ok(engine::EngineConfig {
        backend: config.adapter.unwrap_or_default().into(),
        expert_memory: config
            .expert_memory_budget
            .map(edgediff::experts::ExpertMemory::Bytes),
        resident,
        block_experts: config.block_experts.map(|n| n as usize),
    })
}

/// A poisoned lock only means a panic elsewhere was caught; the counters stay valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The result of a generation on another thread; dropping it (the foreign caller cancelled)
/// cancels the generation.
struct CancelOnDrop {
    receive: oneshot::Receiver<Result<GenerationResult, EdgeDiffError>>,
    cancel: CancelToken,
}

impl Future for CancelOnDrop {
    type Output = Result<GenerationResult, EdgeDiffError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receive).poll(cx).map(|r| {
            r.unwrap_or_else(|_| Err(EdgeDiffError::Internal("generation thread vanished".into())))
        })
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
