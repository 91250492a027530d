//! Text <-> token-id conversion for edgediff.
//!
//! This module holds everything the runtime needs to talk to a model in text:
//!
//! * [`Tokenizer`]: a thin wrapper around the Hugging Face `tokenizers` crate
//!   that loads a `tokenizer.json`, encodes and decodes, and reports every
//!   failure as a typed [`TokenizerError`] instead of a boxed error or a panic.
//! * [`StreamDecoder`]: an incremental detokenizer. A diffusion LM commits
//!   tokens in blocks, and a block boundary may fall inside a multi-byte UTF-8
//!   character (byte-level BPE pieces are single bytes). The stream decoder
//!   re-decodes the committed ids and only hands out text that can no longer
//!   change, holding back a trailing incomplete character (U+FFFD).
//! * [`ChatTemplate`]: renders a Hugging Face chat template (the Jinja string
//!   found under `chat_template` in `tokenizer_config.json`) with minijinja,
//!   configured like `transformers` does it (trim/lstrip blocks,
//!   `raise_exception`, Python string methods, a Python-style `tojson`), plus
//!   a built-in fallback template for models that ship none.
//! * [`train`]: a deterministic byte-level BPE trainer and a small bundled
//!   corpus, used to build tiny synthetic tokenizers for tests and demos.
//!
//! Keeping the tokenizer behind this wrapper means the rest of the runtime
//! never depends on `tokenizers` or `minijinja` types directly.

pub mod train;

use std::fmt::Write as _;
use std::path::Path;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Errors produced by the tokenizer module.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer description (`tokenizer.json`) could not be parsed.
    #[error("invalid tokenizer definition: {0}")]
    Load(String),
    /// Reading a tokenizer file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Encoding text into ids failed.
    #[error("encode failed: {0}")]
    Encode(String),
    /// Decoding ids into text failed (for example an id outside the vocabulary).
    #[error("decode failed: {0}")]
    Decode(String),
    /// Training a tokenizer failed.
    #[error("tokenizer training failed: {0}")]
    Train(String),
    /// A parameter was out of range (for example a vocabulary too small).
    #[error("invalid tokenizer configuration: {0}")]
    InvalidConfig(String),
    /// `tokenizer_config.json` could not be parsed.
    #[error("invalid tokenizer_config.json: {0}")]
    Config(String),
    /// The chat template failed to compile or to render.
    #[error("chat template error: {0}")]
    Template(String),
    /// The chat template called `raise_exception(message)`.
    #[error("chat template raised an exception: {0}")]
    TemplateRaised(String),
}

/// A loaded tokenizer (any model type supported by `tokenizers`: BPE,
/// Unigram, WordPiece, ...).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Parses a `tokenizer.json` document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        Ok(Self { inner })
    }

    /// Reads and parses a `tokenizer.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&bytes)
    }

    /// Serializes the tokenizer back to `tokenizer.json` form.
    pub fn to_json(&self, pretty: bool) -> Result<String, TokenizerError> {
        self.inner
            .to_string(pretty)
            .map_err(|e| TokenizerError::Load(e.to_string()))
    }

    /// Encodes `text`. With `add_special`, the tokenizer's post-processor
    /// inserts its special tokens (e.g. a leading BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes `ids`; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of distinct ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string (model vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id (in the model's own alphabet, e.g. `Ġ` for a
    /// byte-level space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Starts an incremental decoder over this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special)
    }

    /// The wrapped `tokenizers` object, for what this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Incremental detokenizer for streaming output.
///
/// Feed it the ids committed since the last call, in sequence order; it
/// returns the text that became final. Internally the whole committed id list
/// is decoded again and only the suffix past what was already emitted is
/// returned, so decoders whose output depends on context (byte-level BPE,
/// SentencePiece's leading-space rule) stay correct. A trailing U+FFFD, which
/// is what an incomplete UTF-8 sequence decodes to, is held back until the
/// next ids complete it, or until [`StreamDecoder::finish`].
///
/// Each call costs one decode of the whole sequence; that is small next to a
/// model step for the sequence lengths an on-device runtime produces.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    /// Creates an empty stream decoder.
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Appends newly committed ids and returns the text that is now stable
    /// (possibly empty).
    pub fn push(&mut self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.ids.extend_from_slice(ids);
        let full = self.tokenizer.decode(&self.ids, self.skip_special)?;
        let mut stable = full.as_str();
        while let Some(rest) = stable.strip_suffix('\u{FFFD}') {
            stable = rest;
        }
        Ok(self.take_from(&full, stable.len()))
    }

    /// Returns everything not handed out yet, including held-back trailing
    /// replacement characters (the stream has ended, nothing can complete
    /// them any more).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let full = self.tokenizer.decode(&self.ids, self.skip_special)?;
        Ok(self.take_from(&full, full.len()))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Forgets all ids, for reuse on a new sequence.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.emitted = 0;
    }

    fn take_from(&mut self, full: &str, end: usize) -> String {
        // The already emitted prefix cannot change for the decoders we use;
        // should a decoder rewrite it anyway, continue from the next char
        // boundary rather than panic on a split character.
        let mut start = self.emitted.min(full.len());
        while !full.is_char_boundary(start) {
            start += 1;
        }
        if end <= start {
            return String::new();
        }
        self.emitted = end;
        full[start..end].to_string()
    }
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Template used when a model ships no chat template. Every turn is
/// `<|role|>\n{content}{eos}\n`; the generation prompt is `<|assistant|>\n`.
/// The role markers match [`train::SpecialTokens::default`].
pub const FALLBACK_CHAT_TEMPLATE: &str = "{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] not in ['system', 'user', 'assistant'] -%}
{{- raise_exception('unsupported chat role: ' ~ message['role']) -}}
{%- endif -%}
{{- '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token ~ '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>\\n' -}}
{%- endif -%}";

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl ChatTemplate {
    /// Compiles a Hugging Face chat template (Jinja source).
    pub fn new(source: impl Into<String>) -> Result<Self, TokenizerError> {
        let source = source.into();
        let mut env = Environment::new();
        // Same lexer settings as transformers' `_compile_jinja_template`.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| TokenizerError::Template(format!("{e:#}")))?;
        Ok(Self { env, source })
    }

    /// The built-in fallback template ([`FALLBACK_CHAT_TEMPLATE`]).
    pub fn fallback() -> Self {
        Self::new(FALLBACK_CHAT_TEMPLATE).expect("built-in fallback chat template compiles")
    }

    /// The template named `default` (or the only/first one) from a
    /// `tokenizer_config.json`, or `None` if it has no chat template.
    pub fn from_tokenizer_config(json: &[u8]) -> Result<Option<Self>, TokenizerError> {
        TokenizerConfig::from_json(json)?
            .chat_template
            .map(Self::new)
            .transpose()
    }

    /// Jinja source of this template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation into the prompt string.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, TokenizerError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::Template(format!("{e:#}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        };
        tmpl.render(ctx).map_err(template_error)
    }
}

/// The parts of a Hugging Face `tokenizer_config.json` the runtime uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub mask_token: Option<String>,
}

impl TokenizerConfig {
    /// Parses `tokenizer_config.json`. Special tokens may be plain strings or
    /// `{"content": ...}` objects; `chat_template` may be a string or a list
    /// of `{"name", "template"}` entries (the `default` one is taken).
    pub fn from_json(json: &[u8]) -> Result<Self, TokenizerError> {
        let v: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| TokenizerError::Config(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| TokenizerError::Config("top level is not an object".into()))?;
        let token = |key: &str| -> Option<String> {
            match obj.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let chat_template = match obj.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |e: &serde_json::Value| {
                    Some((
                        e.get("name")?.as_str()?.to_owned(),
                        e.get("template")?.as_str()?.to_owned(),
                    ))
                };
                let entries: Vec<(String, String)> = list.iter().filter_map(named).collect();
                entries
                    .iter()
                    .find(|(name, _)| name == "default")
                    .or(entries.first())
                    .map(|(_, t)| t.clone())
            }
            Some(_) => {
                return Err(TokenizerError::Config(
                    "chat_template is neither a string nor a list".into(),
                ))
            }
        };
        Ok(Self {
            chat_template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            mask_token: token("mask_token"),
        })
    }
}

/// Marker attached to errors produced by the template's `raise_exception`.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(RaisedException(message)),
    )
}

fn template_error(err: minijinja::Error) -> TokenizerError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return TokenizerError::TemplateRaised(raised.0.clone());
        }
        source = e.source();
    }
    TokenizerError::Template(format!("{err:#}"))
}

/// `strftime_now(format)`: current UTC time, used by some templates (Llama 3)
/// to print today's date. Supports `%Y %y %m %d %e %H %M %S %j %b %B %a %A %%`.
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime_utc(&format, secs)))
}

fn strftime_utc(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let tod = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('H') => write!(out, "{:02}", tod / 3600),
            Some('M') => write!(out, "{:02}", tod / 60 % 60),
            Some('S') => write!(out, "{:02}", tod % 60),
            Some('j') => write!(out, "{yday:03}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Python-`json.dumps`-compatible `tojson` filter, as transformers defines it
/// for chat templates: `ensure_ascii=False`, `", "`/`": "` separators without
/// indent, optional `indent`, `sort_keys`, `ensure_ascii`, `separators`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    out: &mut String,
    value: &Value,
    opts: &JsonOpts,
    level: usize,
) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &opts.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let s = value.to_string();
            match s.as_str() {
                "inf" => out.push_str("Infinity"),
                "-inf" => out.push_str("-Infinity"),
                "NaN" | "nan" => out.push_str("NaN"),
                _ => out.push_str(&s),
            }
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or(""), opts.ensure_ascii),
        ValueKind::Bytes => write_json_str(
            out,
            &String::from_utf8_lossy(value.as_bytes().unwrap_or(&[])),
            opts.ensure_ascii,
        ),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, level + 1);
                match key.as_str() {
                    Some(k) => write_json_str(out, k, opts.ensure_ascii),
                    None => write_json_str(out, &key.to_string(), opts.ensure_ascii),
                }
                out.push_str(&opts.key_sep);
                write_json(out, &value.get_item(key)?, opts, level + 1)?;
            }
            newline(out, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, level + 1);
                write_json(out, item, opts, level + 1)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Plain | ValueKind::Invalid => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize {} value", value.kind()),
            ))
        }
        // ValueKind is non-exhaustive.
        #[allow(unreachable_patterns)]
        _ => write_json_str(out, &value.to_string(), opts.ensure_ascii),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::train::{train_bpe, SpecialTokens, SYNTH_CORPUS};
    use super::*;
    use std::sync::OnceLock;

    /// One small trained tokenizer shared by the tests (training is the slow part).
    fn tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let corpus: String = SYNTH_CORPUS.iter().map(|(_, t)| *t).collect();
            let json = train_bpe(&corpus, 1024, &SpecialTokens::default()).unwrap();
            Tokenizer::from_json(json.as_bytes()).unwrap()
        })
    }

    const SAMPLES: &[&str] = &[
        "The quick brown fox jumps over the lazy dog.",
        "héllo 世界 🙂 — naïve café, Ærøskøbing, Привет, مرحبا, こんにちは",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    println!(\"{v:?}\");\n}\n",
        "def f(xs):\n\treturn [x ** 2 for x in xs if x % 2 == 0]  # squares\n",
        "  leading and trailing spaces  \n\n",
        "",
    ];

    #[test]
    fn roundtrip_ascii_unicode_code() {
        let t = tok();
        for s in SAMPLES {
            let ids = t.encode(s, false).unwrap();
            assert_eq!(t.decode(&ids, false).unwrap(), *s, "ids {ids:?}");
            // With add_special, the trained post-processor prepends <|bos|>,
            // which skip_special removes again.
            let ids = t.encode(s, true).unwrap();
            assert_eq!(ids[0], t.token_to_id("<|bos|>").unwrap());
            assert_eq!(t.decode(&ids, true).unwrap(), *s);
        }
    }

    #[test]
    fn special_tokens_first_and_atomic() {
        let t = tok();
        let sp = SpecialTokens::default();
        for (i, s) in sp.all().iter().enumerate() {
            assert_eq!(t.token_to_id(s), Some(i as u32), "{s}");
            assert_eq!(t.id_to_token(i as u32).as_deref(), Some(*s));
        }
        let ids = t.encode("<|user|>\nhi<|eos|>", false).unwrap();
        assert_eq!(ids[0], t.token_to_id("<|user|>").unwrap());
        assert_eq!(*ids.last().unwrap(), t.token_to_id("<|eos|>").unwrap());
        assert_eq!(t.decode(&ids, true).unwrap(), "\nhi");
        assert_eq!(t.vocab_size(), 1024);
        assert_eq!(t.id_to_token(5000), None);
    }

    #[test]
    fn decode_out_of_vocab_is_lenient_or_error_not_panic() {
        // tokenizers skips unknown ids; the point is that it does not panic.
        let _ = tok().decode(&[u32::MAX, 3, 9999], false);
    }

    #[test]
    fn stream_decoder_emits_full_text_id_by_id() {
        let t = tok();
        for s in SAMPLES
            .iter()
            .chain(["héllo 世界 🙂", "🙂🙂 👩‍👩‍👧 ∑x²"].iter())
        {
            let ids = t.encode(s, false).unwrap();
            let mut dec = t.stream_decoder(false);
            let mut out = String::new();
            for id in &ids {
                let piece = dec.push(&[*id]).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "partial char leaked: {piece:?}"
                );
                out.push_str(&piece);
            }
            out.push_str(&dec.finish().unwrap());
            assert_eq!(out, *s);
            assert_eq!(dec.ids(), &ids[..]);
        }
    }

    #[test]
    fn stream_decoder_holds_back_split_character() {
        let t = tok();
        // Encode a character the small vocabulary cannot hold in one token,
        // so its bytes are spread over several ids.
        let ids = t.encode("🙂", false).unwrap();
        assert!(ids.len() > 1, "{ids:?}");
        let mut dec = t.stream_decoder(true);
        for id in &ids[..ids.len() - 1] {
            assert_eq!(dec.push(&[*id]).unwrap(), "");
        }
        assert_eq!(dec.push(&ids[ids.len() - 1..]).unwrap(), "🙂");
        assert_eq!(dec.finish().unwrap(), "");
        // Chunked pushes and a stream cut inside a character.
        dec.reset();
        let mut ids2 = t.encode("ab 世界", false).unwrap();
        ids2.extend_from_slice(&ids[..1]);
        let mut out = dec.push(&ids2[..2]).unwrap();
        out += &dec.push(&ids2[2..]).unwrap();
        assert_eq!(out, "ab 世界");
        assert_eq!(dec.finish().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn bad_json_is_an_error() {
        for bad in [
            &b"not json"[..],
            b"{}",
            b"{\"model\": 3}",
            b"",
            &[0xff, 0xfe],
        ] {
            match Tokenizer::from_json(bad) {
                Err(TokenizerError::Load(_)) => {}
                other => panic!("expected Load error, got {other:?}"),
            }
        }
        assert!(matches!(
            Tokenizer::from_file("/nonexistent/tokenizer.json"),
            Err(TokenizerError::Io { .. })
        ));
    }

    const QWEN_LIKE: &str = "{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

    #[test]
    fn chat_template_qwen_like() {
        let tmpl = ChatTemplate::new(QWEN_LIKE).unwrap();
        let msgs = [
            ChatMessage::user("What is 2+2?  "),
            ChatMessage::assistant("4"),
        ];
        let out = tmpl.render(&msgs, true, "", "<|im_end|>").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let out = tmpl
            .render(
                &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
                false,
                "",
                "",
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chat_template_from_config_and_trim_blocks() {
        // Block tags on their own lines must not leave newlines behind
        // (trim_blocks / lstrip_blocks like transformers).
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "unused"},
                {"name": "default", "template": "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n[INST] {{ m.content }} [/INST]\n  {% else %}\n{{ m.content }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n{{ {'k': [1, 'a'], 'b': none} | tojson }}"}
            ]
        });
        let bytes = serde_json::to_vec(&cfg).unwrap();
        let parsed = TokenizerConfig::from_json(&bytes).unwrap();
        assert_eq!(parsed.bos_token.as_deref(), Some("<s>"));
        assert_eq!(parsed.eos_token.as_deref(), Some("</s>"));
        let tmpl = ChatTemplate::from_tokenizer_config(&bytes)
            .unwrap()
            .unwrap();
        let out = tmpl
            .render(
                &[ChatMessage::user("a"), ChatMessage::assistant("b")],
                false,
                "<s>",
                "</s>",
            )
            .unwrap();
        assert_eq!(
            out,
            "<s>\n[INST] a [/INST]\nb</s>\n{\"b\": null, \"k\": [1, \"a\"]}"
        );
        assert!(ChatTemplate::from_tokenizer_config(b"{}")
            .unwrap()
            .is_none());
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(b"[1]"),
            Err(TokenizerError::Config(_))
        ));
    }

    #[test]
    fn chat_template_raise_exception_is_typed_error() {
        let tmpl = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'tool' %}\
             {{ raise_exception('Tool role is not supported') }}{% endif %}{% endfor %}",
        )
        .unwrap();
        match tmpl.render(&[ChatMessage::new("tool", "x")], false, "", "") {
            Err(TokenizerError::TemplateRaised(msg)) => {
                assert_eq!(msg, "Tool role is not supported")
            }
            other => panic!("expected TemplateRaised, got {other:?}"),
        }
        // Other failures are a plain template error.
        assert!(matches!(
            ChatTemplate::new("{% for %}"),
            Err(TokenizerError::Template(_))
        ));
        let t = ChatTemplate::new("{{ messages[0].content.no_such_method() }}").unwrap();
        assert!(matches!(
            t.render(&[ChatMessage::user("x")], false, "", ""),
            Err(TokenizerError::Template(_))
        ));
    }

    #[test]
    fn fallback_template() {
        let tmpl = ChatTemplate::fallback();
        let out = tmpl
            .render(
                &[ChatMessage::system("S"), ChatMessage::user("Hi there")],
                true,
                "<|bos|>",
                "<|eos|>",
            )
            .unwrap();
        assert_eq!(
            out,
            "<|bos|><|system|>\nS<|eos|>\n<|user|>\nHi there<|eos|>\n<|assistant|>\n"
        );
        // The rendered prompt tokenizes with the role markers as single ids.
        let ids = tok().encode(&out, false).unwrap();
        assert_eq!(&ids[..2], &[1, 6]);
        assert!(matches!(
            tmpl.render(&[ChatMessage::new("tool", "x")], false, "", ""),
            Err(TokenizerError::TemplateRaised(_))
        ));
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %b %j", 0),
            "1970-01-01 00:00:00 Thu Jan 001"
        );
        // 2024-02-29 12:34:56 UTC (leap day), a Thursday.
        assert_eq!(
            strftime_utc("%d %B %Y %A %j %y%%", 1_709_210_096),
            "29 February 2024 Thursday 060 24%"
        );
    }

    #[test]
    fn tojson_python_style() {
        let tmpl = ChatTemplate::new(
            "{{ {'a': 'é\"', 'n': 1.5} | tojson }}|{{ [1, 2] | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=true) }}",
        )
        .unwrap();
        let out = tmpl.render(&[], false, "", "").unwrap();
        assert_eq!(
            out,
            "{\"a\": \"é\\\"\", \"n\": 1.5}|[\n  1,\n  2\n]|\"\\u00e9\""
        );
    }
}
