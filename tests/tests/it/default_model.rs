//! The committed default model (models/default.edm, trained by training/train.py): what a fresh
//! clone's `edgediff generate` runs. Its decoders must agree with each other the way the
//! conventions it was trained with say they do.

use std::path::PathBuf;
use std::sync::Arc;

use edgediff::backend::cpu::CpuBackend;
use edgediff::decode::{DecoderDetails, DecoderKind, Prediction, SpeculativeOptions};
use edgediff::engine::{Engine, GenerationOutput, Prompt};
use edgediff::format::EdmFile;

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/default.edm")
}

fn engine() -> Engine<CpuBackend> {
    let file = EdmFile::open(default_model()).expect("models/default.edm opens");
    Engine::new(CpuBackend, Arc::new(file)).unwrap()
}

fn generate(
    e: &Engine<CpuBackend>,
    prompt: &str,
    decoder: Option<DecoderKind>,
) -> GenerationOutput {
    let mut req = e.request(Prompt::Text(prompt.into()));
    req.decoding.max_new_tokens = 40;
    req.decoding.ignore_eos = true;
    if let Some(d) = decoder {
        req.decoding.decoder = d;
    }
    e.generate(&req, &mut |_| {}).unwrap()
}

#[test]
fn the_default_model_fits_the_budget_and_names_its_conventions() {
    let len = std::fs::metadata(default_model()).unwrap().len();
    assert!(
        len <= 16 << 20,
        "models/default.edm is {len} bytes (budget 16 MiB)"
    );
    let e = engine();
    let d = &e.metadata().decoding;
    assert_eq!(d.prediction, Some(Prediction::Hybrid));
    assert_eq!(e.default_decoding().prediction, Prediction::Hybrid);
    assert!(d.block_size > 1, "a diffusion model decodes in blocks");
}

/// Lossless self-speculation must reproduce AR greedy decoding token for token, and a model whose
/// masks predict in place must have drafts accepted: reading the drafting rows one position off
/// (the next-token convention) accepts none on this model.
#[test]
fn lossless_speculation_on_the_trained_model_is_ar_with_accepted_drafts() {
    let e = engine();
    for prompt in ["fn main() {\n    let", "The configuration file"] {
        let ar = generate(&e, prompt, Some(DecoderKind::Ar));
        let spec = generate(
            &e,
            prompt,
            Some(DecoderKind::Speculative(SpeculativeOptions {
                draft_len: 16,
                beta: 1.0,
            })),
        );
        assert_eq!(spec.tokens, ar.tokens, "{prompt:?}");
        let DecoderDetails::Speculative { accepted, .. } = spec.stats.decoder else {
            panic!("speculative details expected");
        };
        assert!(accepted > 0, "{prompt:?}: no draft accepted");
        assert!(spec.stats.forward_passes < ar.stats.forward_passes);
    }
}

#[test]
fn block_diffusion_writes_text_from_the_default_decoding() {
    let e = engine();
    let out = generate(&e, "fn main() {\n", None);
    assert_eq!(out.tokens.len(), 40);
    assert!(
        out.text.chars().filter(|c| c.is_alphanumeric()).count() > 20,
        "{:?}",
        out.text
    );
}
