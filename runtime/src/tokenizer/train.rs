//! Deterministic byte-level BPE training for tiny synthetic tokenizers.
//!
//! Tests, benchmarks and demo models need a real `tokenizer.json` without
//! downloading one. [`train_bpe`] builds a GPT-2-style byte-level BPE
//! tokenizer from a text corpus, and [`SYNTH_CORPUS`] is a small corpus of
//! original prose and code that ships with the repository for that purpose
//! (see `runtime/assets/corpus/README.md`).
//!
//! Layout of the produced tokenizer: the special tokens take ids `0..n` in the
//! order of [`SpecialTokens::all`], then the 256 byte symbols, then merges.
//! Encoding with `add_special = true` prepends the BOS token.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, TokenizerImpl};

use super::TokenizerError;

/// The bundled synthetic corpus as `(file name, text)` pairs.
pub const SYNTH_CORPUS: &[(&str, &str)] = &[
    ("prose.txt", include_str!("../../assets/corpus/prose.txt")),
    ("rust.txt", include_str!("../../assets/corpus/rust.txt")),
    ("python.txt", include_str!("../../assets/corpus/python.txt")),
];

/// Strings of the special tokens a synthetic tokenizer reserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub pad: String,
    pub bos: String,
    pub eos: String,
    /// The diffusion mask token.
    pub mask: String,
    pub user: String,
    pub assistant: String,
    pub system: String,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            pad: "<|pad|>".into(),
            bos: "<|bos|>".into(),
            eos: "<|eos|>".into(),
            mask: "<|mask|>".into(),
            user: "<|user|>".into(),
            assistant: "<|assistant|>".into(),
            system: "<|system|>".into(),
        }
    }
}

impl SpecialTokens {
    /// All special tokens in id order (pad = 0, bos = 1, ..., system = 6).
    pub fn all(&self) -> [&str; 7] {
        [
            &self.pad,
            &self.bos,
            &self.eos,
            &self.mask,
            &self.user,
            &self.assistant,
            &self.system,
        ]
    }
}

/// Number of byte symbols every byte-level vocabulary contains.
const BYTE_ALPHABET: usize = 256;

/// Trains a byte-level BPE tokenizer on `corpus` and returns its
/// `tokenizer.json` (pretty-printed).
///
/// `vocab_size` counts special tokens, the 256 byte symbols and merges; it
/// must be at least `specials + 256`. The vocabulary may come out smaller
/// when the corpus runs out of pairs to merge. The same inputs always give
/// byte-identical output.
pub fn train_bpe(
    corpus: &str,
    vocab_size: usize,
    specials: &SpecialTokens,
) -> Result<String, TokenizerError> {
    let names = specials.all();
    for (i, a) in names.iter().enumerate() {
        if a.is_empty() {
            return Err(TokenizerError::InvalidConfig(
                "special token strings must not be empty".into(),
            ));
        }
        if names[..i].contains(a) {
            return Err(TokenizerError::InvalidConfig(format!(
                "special token {a:?} given twice"
            )));
        }
    }
    let min = names.len() + BYTE_ALPHABET;
    if vocab_size < min {
        return Err(TokenizerError::InvalidConfig(format!(
            "vocab_size {vocab_size} is below the minimum {min} (special tokens + 256 bytes)"
        )));
    }
    if vocab_size > u32::MAX as usize {
        return Err(TokenizerError::InvalidConfig(format!(
            "vocab_size {vocab_size} does not fit in u32 ids"
        )));
    }

    let special_tokens: Vec<AddedToken> = names
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .special_tokens(special_tokens)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();

    let bos_id = 1u32; // position of `bos` in `SpecialTokens::all`
    let post = TemplateProcessing::builder()
        .try_single(vec![specials.bos.clone(), "$A".to_string()])
        .and_then(|b| b.try_pair(vec![specials.bos.clone(), "$A".into(), "$B:1".into()]))
        .map_err(|e| TokenizerError::InvalidConfig(e.to_string()))?
        .special_tokens(vec![(specials.bos.clone(), bos_id)])
        .build()
        .map_err(|e| TokenizerError::InvalidConfig(e.to_string()))?;

    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        TemplateProcessing,
        ByteLevelDecoder,
    > = TokenizerImpl::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevelDecoder::default()))
        .with_post_processor(Some(post));

    // One sequence: the pre-tokenizer sees newline + indentation runs as in
    // real text, and counting is sequential, so results cannot depend on
    // thread scheduling (the BPE trainer itself breaks ties by pair ids).
    tok.train(&mut trainer, std::iter::once(corpus))
        .map_err(|e| TokenizerError::Train(e.to_string()))?;

    // Make sure the trainer kept the documented id layout.
    for (i, name) in names.iter().enumerate() {
        if tok.token_to_id(name) != Some(i as u32) {
            return Err(TokenizerError::Train(format!(
                "special token {name:?} did not get id {i}"
            )));
        }
    }

    tok.to_string(true)
        .map_err(|e| TokenizerError::Train(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::Tokenizer;
    use super::*;

    fn corpus() -> String {
        SYNTH_CORPUS.iter().map(|(_, t)| *t).collect()
    }

    #[test]
    fn corpus_size_is_reasonable() {
        let total: usize = SYNTH_CORPUS.iter().map(|(_, t)| t.len()).sum();
        assert!(
            (60_000..=130_000).contains(&total),
            "corpus is {total} bytes"
        );
        for (name, text) in SYNTH_CORPUS {
            assert!(text.len() > 10_000, "{name} is too small");
        }
    }

    #[test]
    fn training_is_deterministic_and_fast() {
        let c = corpus();
        let t0 = std::time::Instant::now();
        let a = train_bpe(&c, 2048, &SpecialTokens::default()).unwrap();
        let elapsed = t0.elapsed();
        let b = train_bpe(&c, 2048, &SpecialTokens::default()).unwrap();
        assert!(a == b, "two trainings on the same corpus differ");
        // Generous bound: the target is well under 2 s even in debug builds
        // (dependencies are built with opt-level 2).
        assert!(elapsed.as_secs_f64() < 10.0, "training took {elapsed:?}");
        let tok = Tokenizer::from_json(a.as_bytes()).unwrap();
        assert_eq!(tok.vocab_size(), 2048);
    }

    #[test]
    fn special_ids_are_in_order() {
        let sp = SpecialTokens::default();
        let json = train_bpe("hello world\nhello there\n", 300, &sp).unwrap();
        let tok = Tokenizer::from_json(json.as_bytes()).unwrap();
        let want = [
            "<|pad|>",
            "<|bos|>",
            "<|eos|>",
            "<|mask|>",
            "<|user|>",
            "<|assistant|>",
            "<|system|>",
        ];
        assert_eq!(sp.all(), want);
        for (i, s) in want.iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some(i as u32));
        }
        // Tiny corpus: the vocabulary stops growing when no pairs remain.
        assert!(tok.vocab_size() <= 300);
        // Every byte is still encodable.
        let s = "zq\u{1F642}\u{0}";
        let ids = tok.encode(s, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }

    #[test]
    fn custom_specials_and_bad_config() {
        let sp = SpecialTokens {
            mask: "[MASK]".into(),
            ..SpecialTokens::default()
        };
        let json = train_bpe("a b c\n", 270, &sp).unwrap();
        let tok = Tokenizer::from_json(json.as_bytes()).unwrap();
        assert_eq!(tok.token_to_id("[MASK]"), Some(3));

        assert!(matches!(
            train_bpe("abc", 100, &SpecialTokens::default()),
            Err(TokenizerError::InvalidConfig(_))
        ));
        let dup = SpecialTokens {
            eos: "<|bos|>".into(),
            ..SpecialTokens::default()
        };
        assert!(matches!(
            train_bpe("abc", 1000, &dup),
            Err(TokenizerError::InvalidConfig(_))
        ));
    }
}
