//! The tokenizer of a GGUF file, rebuilt as a Hugging Face `tokenizer.json` so it runs through the
//! same `tokenizers` path as every other model: `tokenizer.ggml.model = gpt2` is byte-level BPE
//! over `tokenizer.ggml.tokens` (ids = positions) and `tokenizer.ggml.merges` ("a b", by rank);
//! control and user-defined tokens (`token_type` 3 and 4) become added tokens matched whole in the
//! text. `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer, reproduced here as split regexes.
//! SentencePiece vocabularies (`llama`) are refused: their llama.cpp tokenizer merges by score,
//! which no `tokenizers` model reproduces exactly.

use serde_json::{json, Value};

use crate::format::gguf::GgufFile;
use crate::import::ImportError;

/// Qwen2's (and DeepSeek-R1-Qwen's): case-insensitive contractions, a letter run with one optional
/// non-letter before it, single digits, newlines kept with the symbols before them.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (`llama-bpe`): as Qwen2's with numbers in runs of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

fn split(pattern: &str) -> Value {
    json!({ "type": "Split", "pattern": { "Regex": pattern }, "behavior": "Isolated", "invert": false })
}

/// Bytes to GPT-2's printable characters; with `use_regex`, first GPT-2's own split (contractions,
/// letter runs, digit runs, symbol runs, each with one optional leading space; a whitespace run
/// leaves its last space to the next word), which is llama.cpp's `gpt2` pre-tokenizer.
fn byte_level(use_regex: bool) -> Value {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

/// llama.cpp's pre-tokenizer `pre` as a `tokenizers` pre-tokenizer.
fn pre_tokenizer(pre: &str) -> Result<Value, ImportError> {
    let seq = |v: Vec<Value>| json!({ "type": "Sequence", "pretokenizers": v });
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "olmo" => byte_level(true),
        // Every digit on its own first (llama.cpp applies `\p{N}` before the GPT-2 split, so the
        // latter's ` ?\p{N}+` never regroups digits).
        "smollm" | "starcoder" | "refact" => {
            seq(vec![split(r"\p{N}"), byte_level(true)])
        }
        "qwen2" | "deepseek-r1-qwen" => seq(vec![split(QWEN2_SPLIT), byte_level(false)]),
        "llama-bpe" | "llama3" => seq(vec![split(LLAMA3_SPLIT), byte_level(false)]),
        other => {
            return Err(ImportError::Tokenizer(format!(
                "GGUF pre-tokenizer '{other}' is not supported (supported: default/gpt2, olmo, smollm, starcoder, refact, qwen2, llama-bpe)"
            )))
        }
    })
}

/// `tokenizer.json` bytes for the file's vocabulary.
pub fn tokenizer_json(f: &GgufFile) -> Result<Vec<u8>, ImportError> {
    let text = |k: &str| f.get(k).and_then(|v| v.as_str());
    let bad = |m: String| ImportError::Tokenizer(m);
    let model =
        text("tokenizer.ggml.model").ok_or_else(|| bad("no tokenizer.ggml.model".into()))?;
    if model != "gpt2" {
        return Err(bad(format!(
            "GGUF tokenizer model '{model}' is not supported (only gpt2-style byte-level BPE)"
        )));
    }
    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_strings())
        .ok_or_else(|| bad("no tokenizer.ggml.tokens string array".into()))?;
    let merges = f
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.as_strings())
        .ok_or_else(|| bad("no tokenizer.ggml.merges string array".into()))?;
    let types = f.get("tokenizer.ggml.token_type").and_then(|v| v.as_ints());
    if types.is_some_and(|t| t.len() != tokens.len()) {
        return Err(bad("token_type and tokens differ in length".into()));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if vocab.insert(t.clone(), Value::from(id)).is_some() {
            return Err(bad(format!("token {t:?} appears twice in the vocabulary")));
        }
    }
    let added: Vec<Value> = types
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(id, &t)| {
            json!({
                "id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == TOKEN_CONTROL,
            })
        })
        .collect();
    let pre_name = text("tokenizer.ggml.pre").unwrap_or("default");
    let pre = pre_tokenizer(pre_name)?;
    // llama.cpp takes a whole pre-token that is in the vocabulary as one token for Llama 3.
    let ignore_merges = matches!(pre_name, "llama-bpe" | "llama3");
    let add_bos = f
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let bos = f
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.as_u64())
        .and_then(|id| tokens.get(id as usize));
    let post = match (add_bos, bos) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{ "SpecialToken": { "id": b, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }],
            "pair": [{ "SpecialToken": { "id": b, "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } },
                     { "Sequence": { "id": "B", "type_id": 1 } }],
            "special_tokens": { b.as_str(): { "id": b, "ids": [vocab[b.as_str()]], "tokens": [b] } },
        }),
        _ => Value::Null,
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges,
        },
    });
    let bytes = serde_json::to_vec(&doc).map_err(|e| bad(e.to_string()))?;
    // Parse it once here so a bad vocabulary fails the conversion, not the first load.
    crate::tokenizer::Tokenizer::from_json(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok(bytes)
}
