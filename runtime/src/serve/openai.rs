//! OpenAI's wire format: the request bodies of `/v1/chat/completions` and `/v1/completions`, the
//! responses, the streamed chunks and the error shape, and how a request becomes a
//! [`GenerationRequest`].
//!
//! Supported request fields: `model` (any value; the response names the served model), `messages`
//! (string content or text parts) / `prompt` (a string, a one-string array or token ids),
//! `max_tokens` (`max_completion_tokens` too; cut to the server's cap and the context),
//! `temperature`, `top_p`, `seed`, `stop` (a string or up to 4), `n` (1 only), `stream`,
//! `stream_options.include_usage`. Other OpenAI fields are accepted and ignored, except those that
//! would change the answer's shape (`tools`, `logprobs`, `n` > 1, `echo`, `best_of` > 1): 400.
//!
//! edgediff's own knobs go in one extension object, `"edgediff": {...}`, applied over the server's
//! defaults (unknown keys are a 400):
//! `decoder` (`block` | `bidirectional` | `speculative` | `ar`), `block_size` (the speculative
//! decoder's draft length), `policy` (`threshold` | `fixed` | `entropy` | `margin` | `credit`),
//! `threshold`, `steps`, `gamma`, `margin`, `beta` (speculative logit mixing; 1 is lossless),
//! `cache` (`none` | `prefix` | `dual`), `top_k`, `ignore_eos`, `block_experts` (block-level expert
//! routing within N experts per layer and block; at least the model's top-k), `reason` (Markovian
//! RSA on a chat's one user turn, see `serve::reason`).

use serde::{Deserialize, Serialize};

use crate::decode::{
    BidirectionalCache, BidirectionalOptions, BlockOptions, CommitPolicy, DecodeParams,
    DecoderKind, FinishReason, SpeculativeOptions,
};
use crate::engine::{EngineError, GenerationRequest, LoadedEngine, Prompt};
use crate::tokenizer::ChatMessage;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of a completion: text, one text in a list, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// A message's content: a string or text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub best_of: Option<u32>,
    #[serde(default)]
    pub edgediff: Option<Extension>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: CompletionPrompt,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DecoderName {
    Block,
    Bidirectional,
    Speculative,
    Ar,
    /// DiffusionGemma's canvas sampler (`steps`: its denoising steps per canvas, `gamma`: its
    /// entropy bound).
    Canvas,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolicyName {
    Threshold,
    Fixed,
    Entropy,
    Margin,
    Credit,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CacheName {
    None,
    Prefix,
    Dual,
}

/// edgediff's decoding knobs for one request (the `"edgediff"` object); absent fields keep the
/// server's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    pub decoder: Option<DecoderName>,
    pub block_size: Option<usize>,
    pub policy: Option<PolicyName>,
    pub threshold: Option<f32>,
    pub steps: Option<usize>,
    pub gamma: Option<f32>,
    pub margin: Option<f32>,
    pub beta: Option<f32>,
    pub cache: Option<CacheName>,
    pub top_k: Option<usize>,
    pub ignore_eos: Option<bool>,
    pub block_experts: Option<usize>,
    /// Markovian RSA on the chat's one user turn (`serve::reason`); chat completions only.
    pub reason: Option<super::reason::ReasonExtension>,
}

/// What the server lets a request have.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Most new tokens a request gets (`--max-tokens`).
    pub max_tokens: usize,
    /// The server's decoding defaults (the model's, then the command's flags).
    pub defaults: DecodeParams,
}

/// A request ready for the scheduler.
#[derive(Debug)]
pub struct Prepared {
    pub request: GenerationRequest,
    pub prompt_tokens: usize,
    /// Positions of its KV cache: prompt plus new tokens.
    pub capacity: usize,
    pub stream: bool,
    pub include_usage: bool,
}

impl Extension {
    /// These knobs over `p`; the block size and threshold default to the model file's.
    pub(crate) fn apply(
        &self,
        p: &mut DecodeParams,
        engine: &LoadedEngine,
    ) -> Result<(), ApiError> {
        let model = &engine.metadata().decoding;
        let current_block = match p.decoder {
            DecoderKind::Block(o) => Some(o.block_size),
            DecoderKind::Bidirectional(o) => Some(o.block_size),
            DecoderKind::Speculative(o) => Some(o.draft_len),
            DecoderKind::Ar | DecoderKind::Canvas(_) => None,
        };
        let decoder = self.decoder.unwrap_or(match p.decoder {
            DecoderKind::Block(_) => DecoderName::Block,
            DecoderKind::Bidirectional(_) => DecoderName::Bidirectional,
            DecoderKind::Speculative(_) => DecoderName::Speculative,
            DecoderKind::Ar => DecoderName::Ar,
            DecoderKind::Canvas(_) => DecoderName::Canvas,
        });
        let block = self.block_size.or(if self.decoder.is_none() {
            current_block
        } else {
            None
        });
        let beta = self.beta.unwrap_or(match p.decoder {
            DecoderKind::Speculative(o) => o.beta,
            _ => 1.0,
        });
        p.decoder = match decoder {
            DecoderName::Block => DecoderKind::Block(BlockOptions {
                block_size: block.unwrap_or(model.block_size.max(1)),
                reuse_last_kv: false,
            }),
            DecoderName::Bidirectional => DecoderKind::Bidirectional(BidirectionalOptions {
                block_size: block.unwrap_or(model.block_size.max(1)),
                cache: match self.cache.unwrap_or(CacheName::Prefix) {
                    CacheName::None => BidirectionalCache::None,
                    CacheName::Prefix => BidirectionalCache::Prefix,
                    CacheName::Dual => BidirectionalCache::Dual,
                },
            }),
            DecoderName::Speculative => DecoderKind::Speculative(SpeculativeOptions {
                draft_len: block.unwrap_or(model.draft_len()),
                beta,
            }),
            DecoderName::Ar => DecoderKind::Ar,
            DecoderName::Canvas => {
                let mut o = match p.decoder {
                    DecoderKind::Canvas(o) => o,
                    _ => crate::decode::CanvasOptions::default(),
                };
                o.steps = self.steps.unwrap_or(o.steps);
                o.entropy_bound = self.gamma.unwrap_or(o.entropy_bound);
                DecoderKind::Canvas(o)
            }
        };
        let threshold = self.threshold.unwrap_or(match p.policy {
            CommitPolicy::Threshold { threshold } | CommitPolicy::Credit { threshold } => threshold,
            _ => model.threshold,
        });
        let policy = self.policy.unwrap_or(match p.policy {
            CommitPolicy::Threshold { .. } => PolicyName::Threshold,
            CommitPolicy::FixedSteps { .. } => PolicyName::Fixed,
            CommitPolicy::EntropyBound { .. } => PolicyName::Entropy,
            CommitPolicy::Margin { .. } => PolicyName::Margin,
            CommitPolicy::Credit { .. } => PolicyName::Credit,
        });
        p.policy = match policy {
            PolicyName::Threshold => CommitPolicy::Threshold { threshold },
            PolicyName::Credit => CommitPolicy::Credit { threshold },
            PolicyName::Fixed => CommitPolicy::FixedSteps {
                steps: self.steps.unwrap_or(match p.policy {
                    CommitPolicy::FixedSteps { steps } => steps,
                    _ => model.steps.max(1),
                }),
            },
            PolicyName::Entropy => CommitPolicy::EntropyBound {
                gamma: self.gamma.unwrap_or(match p.policy {
                    CommitPolicy::EntropyBound { gamma } => gamma,
                    _ => 0.15,
                }),
            },
            PolicyName::Margin => CommitPolicy::Margin {
                margin: self.margin.unwrap_or(match p.policy {
                    CommitPolicy::Margin { margin } => margin,
                    _ => 0.5,
                }),
            },
        };
        if let Some(k) = self.top_k {
            p.sampling.top_k = k;
        }
        if let Some(i) = self.ignore_eos {
            p.ignore_eos = i;
        }
        if let Some(n) = self.block_experts {
            p.block_experts = Some(n);
        }
        Ok(())
    }
}

impl Common {
    /// Refuses what this server does not do, rather than silently answering something else.
    fn check_supported(&self) -> Result<(), ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad_request(
                format!("n = {n} is not supported: this server returns one choice (n = 1)"),
                Some("n"),
            ));
        }
        if let Some(b) = self.best_of.filter(|&b| b > 1) {
            return Err(ApiError::bad_request(
                format!("best_of = {b} is not supported (1 only)"),
                Some("best_of"),
            ));
        }
        let logprobs = match &self.logprobs {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if logprobs {
            return Err(ApiError::bad_request(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_request(
                "tools are not supported",
                Some("tools"),
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::bad_request("echo is not supported", Some("echo")));
        }
        Ok(())
    }

    /// This request, over the server's defaults, for the encoded `prompt`: its decoding
    /// parameters (max_tokens cut to the cap and to what the context leaves), stop strings and
    /// KV capacity.
    fn prepare(
        &self,
        engine: &LoadedEngine,
        limits: &RequestLimits,
        prompt: Vec<u32>,
    ) -> Result<Prepared, ApiError> {
        self.check_supported()?;
        let mut p = limits.defaults.clone();
        if let Some(t) = self.temperature {
            p.sampling.temperature = t;
        }
        if let Some(t) = self.top_p {
            p.sampling.top_p = t;
        }
        if let Some(s) = self.seed {
            p.sampling.seed = s;
        }
        if let Some(ext) = &self.edgediff {
            ext.apply(&mut p, engine)?;
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::bad_request(
                format!("stop has {} strings; at most 4", stop.len()),
                Some("stop"),
            ));
        }
        let context = engine.config().max_position;
        let prompt_tokens = prompt.len();
        if prompt_tokens == 0 {
            return Err(ApiError::bad_request("the prompt is empty", None));
        }
        if prompt_tokens >= context {
            return Err(ApiError::bad_request(
                format!(
                    "the prompt has {prompt_tokens} tokens; this model's context holds {context} \
                     positions, and at least one is needed for the answer"
                ),
                Some("messages"),
            )
            .with_code("context_length_exceeded"));
        }
        let asked = self.max_completion_tokens.or(self.max_tokens);
        if asked == Some(0) {
            return Err(ApiError::bad_request(
                "max_tokens = 0: at least 1",
                Some("max_tokens"),
            ));
        }
        let mut cap = limits.max_tokens.min(context - prompt_tokens);
        // A canvas model fills whole canvases: the answer gets the ones that fit.
        let canvas = engine
            .config()
            .block
            .canvas
            .as_ref()
            .map(|c| c.length.max(1));
        if let Some(len) = canvas {
            cap = cap.min((context - prompt_tokens) / len * len);
            if cap == 0 {
                return Err(ApiError::bad_request(
                    format!(
                        "the prompt has {prompt_tokens} tokens; this model's context of \
                         {context} positions leaves no room for a canvas of {len}"
                    ),
                    Some("messages"),
                )
                .with_code("context_length_exceeded"));
            }
        }
        p.max_new_tokens = asked.map_or(cap, |a| (a.min(cap as u64)) as usize);
        p.validate().map_err(|e| {
            ApiError::bad_request(format!("invalid decoding parameters: {e}"), None)
        })?;
        Ok(Prepared {
            capacity: match canvas {
                Some(len) => {
                    crate::decode::canvas::positions_needed(prompt_tokens, p.max_new_tokens, len)
                }
                None => prompt_tokens + p.max_new_tokens,
            },
            prompt_tokens,
            request: GenerationRequest {
                prompt: Prompt::Tokens(prompt),
                decoding: p,
                stop,
            },
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// A prompt that does not encode (bad ids, template errors) is the client's fault.
fn encode_error(e: EngineError) -> ApiError {
    ApiError::bad_request(format!("the prompt could not be encoded: {e}"), None)
}

impl ChatRequest {
    pub fn prepare(
        &self,
        engine: &LoadedEngine,
        limits: &RequestLimits,
    ) -> Result<Prepared, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("messages is empty", Some("messages")));
        }
        let mut turns = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::bad_request(
                                    format!(
                                        "content part of type '{kind}' is not supported (text only)"
                                    ),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            turns.push(ChatMessage::new(m.role.clone(), content));
        }
        let ids = engine
            .encode_prompt(&Prompt::Chat(turns))
            .map_err(encode_error)?;
        self.common.prepare(engine, limits, ids)
    }
}

impl CompletionRequest {
    pub fn prepare(
        &self,
        engine: &LoadedEngine,
        limits: &RequestLimits,
    ) -> Result<Prepared, ApiError> {
        let prompt = match &self.prompt {
            CompletionPrompt::Text(t) => Prompt::Text(t.clone()),
            CompletionPrompt::Texts(v) if v.len() == 1 => Prompt::Text(v[0].clone()),
            CompletionPrompt::Texts(v) => {
                return Err(ApiError::bad_request(
                    format!(
                        "prompt holds {} texts; this server completes one prompt per request",
                        v.len()
                    ),
                    Some("prompt"),
                ))
            }
            CompletionPrompt::Tokens(ids) => {
                let vocab = engine.config().vocab_size;
                if let Some(id) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ApiError::bad_request(
                        format!("token id {id} is outside the vocabulary of {vocab}"),
                        Some("prompt"),
                    ));
                }
                Prompt::Tokens(ids.clone())
            }
        };
        if matches!(&prompt, Prompt::Text(t) if t.is_empty()) {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        let ids = engine.encode_prompt(&prompt).map_err(encode_error)?;
        self.common.prepare(engine, limits, ids)
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        // EOS and a stop string are both "stop"; a cancelled generation has no listener.
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// What both endpoints answer with, and how they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completion => "completions",
        }
    }

    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        }
    }

    /// The whole answer of a non-streamed request.
    pub fn response(
        self,
        id: &str,
        created: u64,
        model: &str,
        text: &str,
        finish: &str,
        usage: &Usage,
    ) -> serde_json::Value {
        let choice = match self {
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => serde_json::json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        serde_json::json!({
            "id": id,
            "object": match self { Endpoint::Chat => "chat.completion", Endpoint::Completion => "text_completion" },
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// One streamed chunk: `text` (for chat, `role` on the first), or the end (`finish`), or
    /// only the usage (no choices) after the end.
    pub fn chunk(self, id: &str, created: u64, model: &str, piece: Piece<'_>) -> serde_json::Value {
        let (choices, usage) = match piece {
            Piece::Usage(u) => (serde_json::json!([]), Some(u)),
            Piece::Text { text, role, finish } => {
                let choice = match self {
                    Endpoint::Chat => {
                        let mut delta = serde_json::Map::new();
                        if role {
                            delta.insert("role".into(), "assistant".into());
                        }
                        if finish.is_none() {
                            delta.insert("content".into(), text.into());
                        }
                        serde_json::json!({
                            "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish,
                        })
                    }
                    Endpoint::Completion => serde_json::json!({
                        "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                    }),
                };
                (serde_json::json!([choice]), None)
            }
        };
        let mut chunk = serde_json::json!({
            "id": id,
            "object": match self { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completion => "text_completion" },
            "created": created,
            "model": model,
            "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = serde_json::to_value(u).unwrap_or_default();
        }
        chunk
    }
}

/// What one streamed chunk carries.
pub enum Piece<'a> {
    Text {
        text: &'a str,
        /// Chat: the first chunk names the assistant role.
        role: bool,
        /// The last chunk: why the generation ended (its text is empty).
        finish: Option<&'static str>,
    },
    Usage(&'a Usage),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_parse_string_and_part_content_and_stop_forms() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"model":"x","messages":[{"role":"system","content":"s"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "stop":"\n","max_tokens":5,"stream":true,"frequency_penalty":0.5,
                "edgediff":{"decoder":"ar","top_k":3}}"#,
        )
        .unwrap();
        assert_eq!(r.messages.len(), 2);
        assert!(matches!(r.common.stop, Some(OneOrMany::One(ref s)) if s == "\n"));
        assert_eq!(
            r.common.edgediff.as_ref().unwrap().decoder,
            Some(DecoderName::Ar)
        );
        let c: CompletionRequest =
            serde_json::from_str(r#"{"prompt":[1,2,3],"stop":["a","b"]}"#).unwrap();
        assert!(matches!(c.prompt, CompletionPrompt::Tokens(ref t) if t == &[1, 2, 3]));
    }

    #[test]
    fn unknown_extension_keys_are_refused() {
        let r =
            serde_json::from_str::<ChatRequest>(r#"{"messages":[],"edgediff":{"decoderr":"ar"}}"#);
        assert!(r.unwrap_err().to_string().contains("decoderr"));
    }

    #[test]
    fn unsupported_fields_are_refused_not_ignored() {
        let c = |json: &str| {
            serde_json::from_str::<Common>(json)
                .unwrap()
                .check_supported()
        };
        assert!(c(r#"{"n":1,"logprobs":false}"#).is_ok());
        assert_eq!(c(r#"{"n":2}"#).unwrap_err().param, Some("n"));
        assert_eq!(
            c(r#"{"logprobs":true}"#).unwrap_err().param,
            Some("logprobs")
        );
        assert_eq!(c(r#"{"logprobs":2}"#).unwrap_err().param, Some("logprobs"));
        assert_eq!(c(r#"{"tools":[{}]}"#).unwrap_err().param, Some("tools"));
    }

    #[test]
    fn chat_chunks_carry_role_content_and_finish_as_openai_does() {
        let e = Endpoint::Chat;
        let first = e.chunk(
            "i",
            1,
            "m",
            Piece::Text {
                text: "",
                role: true,
                finish: None,
            },
        );
        assert_eq!(
            first["choices"][0]["delta"],
            serde_json::json!({"role":"assistant","content":""})
        );
        let end = e.chunk(
            "i",
            1,
            "m",
            Piece::Text {
                text: "",
                role: false,
                finish: Some("stop"),
            },
        );
        assert_eq!(end["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(end["choices"][0]["finish_reason"], "stop");
        let u = Usage::new(3, 4);
        let usage = e.chunk("i", 1, "m", Piece::Usage(&u));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(usage["choices"], serde_json::json!([]));
    }
}
