//! Quality of a model on held-out text, measured the way it decodes.
//!
//! For each window of `window` tokens (non-overlapping, from position 0):
//! - **AR**: one causal pass; logits at position i score token i+1 (next-token NLL and accuracy).
//! - **Diffusion**: block by block (blocks of the model's size, aligned at position 0), a noisy copy
//!   of the block — each token replaced by the mask token with probability t, t ~ U(0, 1] per block —
//!   runs against the exact clean prefix in the KV cache with the block bidirectional
//!   (`BlockCausal`), and logits at a masked position score that same position's token (LLaDA/SDAR).
//!   Reported: masked-token accuracy and NLL, accuracy by mask ratio, and the masked-diffusion bound
//!   on the NLL per token, E_t[(1/t) Σ_masked −log p] / B (an upper bound on −log p(x) per token).
//!   The clean block is then run causally again at the same positions so the next block sees exact
//!   clean keys.
//!
//! Noise draws come from a seeded generator, so two models (e.g. pruned vs full) see the same masks.
//!
//! With block-level routing (`block_experts`, see [`BlockRouting`]) the diffusion passes — the
//! noisy block and its clean re-run — route each block within its N experts, as the block decoder
//! does; the AR pass stays exact, because in a causal pass a block's shared expert set would let
//! each position's routing see the tokens after it. Every report counts the distinct experts per
//! MoE layer of the noisy block passes (`experts_per_block`).

use serde::Serialize;

use crate::backend::{AttnMask, Backend, BlockRouting};
use crate::model::{ForwardRequest, Model, ModelError, Window};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Separates documents inside a corpus split (training/build_corpus.py): a line holding only the
/// ASCII record separator.
pub const DOCUMENT_SEPARATOR: &str = "\n\x1e\n";

/// Splits a corpus text at [`DOCUMENT_SEPARATOR`] lines and encodes each document as
/// `bos ids… eos` (either id when the model has it): the token stream the trainer saw
/// (training/tokenize_corpus.py). The separator itself never reaches the model, whose training text
/// never held it. A text without separators is one document.
pub fn encode_documents(
    tok: &Tokenizer,
    text: &str,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Vec<Vec<u32>>, TokenizerError> {
    let mut docs = Vec::new();
    for doc in text.split(DOCUMENT_SEPARATOR) {
        if doc.trim().is_empty() {
            continue;
        }
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tok.encode(doc, false)?);
        ids.extend(eos);
        docs.push(ids);
    }
    Ok(docs)
}

/// Mask-ratio buckets of the accuracy curve.
pub const RATIO_BINS: usize = 10;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RatioBin {
    /// Upper edge of the bucket: ratios in (t − 0.1, t].
    pub t: f64,
    pub masked: u64,
    pub correct: u64,
    pub accuracy: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EvalReport {
    pub tokens: u64,
    pub windows: u64,
    pub ar_nll: f64,
    pub ar_accuracy: f64,
    pub masked_tokens: u64,
    pub masked_accuracy: f64,
    pub masked_nll: f64,
    /// Masked-diffusion bound on the NLL per token, in nats.
    pub diffusion_nll_bound: f64,
    /// Distinct experts per MoE layer in one noisy block pass, averaged over blocks and layers.
    pub experts_per_block: f64,
    pub by_ratio: Vec<RatioBin>,
    #[serde(skip)]
    sums: Sums,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Sums {
    ar_nll: f64,
    ar_correct: u64,
    ar_n: u64,
    m_nll: f64,
    m_correct: u64,
    bound: f64,
    bound_tokens: u64,
    experts: u64,
    expert_layers: u64,
}

/// splitmix64 stream: small, seedable, identical on every platform.
struct Rng(u64);
impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn log_softmax_at(row: &[f32], target: u32) -> (f64, bool) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lp = (row[target as usize] - max) as f64 - z.ln();
    let argmax = row
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0;
    (lp, argmax as u32 == target)
}

impl Default for EvalReport {
    fn default() -> Self {
        EvalReport {
            tokens: 0,
            windows: 0,
            ar_nll: 0.0,
            ar_accuracy: 0.0,
            masked_tokens: 0,
            masked_accuracy: 0.0,
            masked_nll: 0.0,
            diffusion_nll_bound: 0.0,
            experts_per_block: 0.0,
            by_ratio: (0..RATIO_BINS)
                .map(|i| RatioBin {
                    t: (i + 1) as f64 / RATIO_BINS as f64,
                    ..Default::default()
                })
                .collect(),
            sums: Sums::default(),
        }
    }
}

impl EvalReport {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores one document.
    pub fn add_document<B: Backend>(
        &mut self,
        backend: &B,
        model: &Model<B>,
        tokens: &[u32],
        window: usize,
        mask_id: u32,
        seed: u64,
    ) -> Result<(), ModelError> {
        self.add_document_routed(backend, model, tokens, window, mask_id, seed, None)
    }

    /// [`EvalReport::add_document`] with the diffusion passes routed within `block_experts`
    /// experts per block and layer (`None`: exact).
    #[allow(clippy::too_many_arguments)]
    pub fn add_document_routed<B: Backend>(
        &mut self,
        backend: &B,
        model: &Model<B>,
        tokens: &[u32],
        window: usize,
        mask_id: u32,
        seed: u64,
        block_experts: Option<usize>,
    ) -> Result<(), ModelError> {
        let block = model.file.header.metadata.decoding.block_size.max(1);
        // Each diffusion pass is one aligned block.
        let blocks = block_experts.map(|n| BlockRouting::aligned(n, 0, block, 0));
        let window = (window / block).max(1) * block;
        let vocab = model.config.vocab_size;
        let mut kv = model.new_kv(backend, window)?;
        let logits = ForwardRequest {
            logits: true,
            ..Default::default()
        };
        for (w, x) in tokens.chunks(window).enumerate() {
            if x.len() < 2 {
                continue;
            }
            let mut rng = Rng(seed ^ (w as u64).wrapping_mul(0xD1B54A32D192ED03));
            let ar = model.forward(
                backend,
                &mut kv,
                x,
                Window::block(0, x.len(), AttnMask::Causal),
                &logits,
            )?;
            let ar = ar.logits.expect("requested");
            for i in 0..x.len() - 1 {
                let (lp, ok) = log_softmax_at(&ar[i * vocab..(i + 1) * vocab], x[i + 1]);
                self.sums.ar_nll -= lp;
                self.sums.ar_correct += ok as u64;
                self.sums.ar_n += 1;
            }
            for start in (0..x.len()).step_by(block) {
                let clean = &x[start..(start + block).min(x.len())];
                let t = 1.0 - rng.next_f64(); // (0, 1]
                let mut noisy: Vec<u32> = clean.to_vec();
                let mut masked: Vec<usize> =
                    (0..clean.len()).filter(|_| rng.next_f64() < t).collect();
                if masked.is_empty() {
                    masked.push((rng.next_f64() * clean.len() as f64) as usize % clean.len());
                }
                for &i in &masked {
                    noisy[i] = mask_id;
                }
                let win = Window::block(start, clean.len(), AttnMask::BlockCausal(block));
                let want = ForwardRequest {
                    logits: true,
                    routing: true,
                    blocks,
                    ..Default::default()
                };
                let out = model.forward(backend, &mut kv, &noisy, win, &want)?;
                for (_, ids, _) in &out.routing {
                    let mut ids: Vec<u32> = ids
                        .iter()
                        .copied()
                        .filter(|&e| (e as usize) < model.config.moe.num_experts)
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    self.sums.experts += ids.len() as u64;
                    self.sums.expert_layers += 1;
                }
                let out = out.logits.expect("requested");
                let bin = ((t * RATIO_BINS as f64).ceil() as usize).clamp(1, RATIO_BINS) - 1;
                let mut block_nll = 0.0;
                for &i in &masked {
                    let (lp, ok) = log_softmax_at(&out[i * vocab..(i + 1) * vocab], clean[i]);
                    block_nll -= lp;
                    self.sums.m_correct += ok as u64;
                    self.by_ratio[bin].masked += 1;
                    self.by_ratio[bin].correct += ok as u64;
                }
                self.sums.m_nll += block_nll;
                self.sums.bound += block_nll / t;
                self.sums.bound_tokens += clean.len() as u64;
                // Restore the exact clean keys of this block for the blocks after it.
                model.forward(
                    backend,
                    &mut kv,
                    clean,
                    Window::block(start, clean.len(), AttnMask::Causal),
                    &ForwardRequest {
                        rows: Some(0..1),
                        blocks,
                        ..Default::default()
                    },
                )?;
            }
            self.tokens += x.len() as u64;
            self.windows += 1;
        }
        self.finish();
        Ok(())
    }

    fn finish(&mut self) {
        let div = |a: f64, b: u64| if b == 0 { 0.0 } else { a / b as f64 };
        let masked: u64 = self.by_ratio.iter().map(|b| b.masked).sum();
        self.masked_tokens = masked;
        self.ar_nll = div(self.sums.ar_nll, self.sums.ar_n);
        self.ar_accuracy = div(self.sums.ar_correct as f64, self.sums.ar_n);
        self.masked_accuracy = div(self.sums.m_correct as f64, masked);
        self.masked_nll = div(self.sums.m_nll, masked);
        self.diffusion_nll_bound = div(self.sums.bound, self.sums.bound_tokens);
        self.experts_per_block = div(self.sums.experts as f64, self.sums.expert_layers);
        for b in &mut self.by_ratio {
            b.accuracy = div(b.correct as f64, b.masked);
        }
    }
}

/// Mean negative log-likelihood per token of `continuation` after `prompt` under the model's causal
/// next-token logits (one causal pass over both): the quality yardstick of `bench decode`, which
/// scores every decoder's output with the same AR model so a faster decoder's loss shows up as a
/// higher NLL. Needs a model whose causal rows predict the next token.
pub fn continuation_nll<B: Backend>(
    backend: &B,
    model: &Model<B>,
    prompt: &[u32],
    continuation: &[u32],
) -> Result<f64, ModelError> {
    if prompt.is_empty() || continuation.is_empty() {
        return Ok(0.0);
    }
    let seq: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
    let vocab = model.config.vocab_size;
    let mut kv = model.new_kv(backend, seq.len())?;
    let first = prompt.len() - 1;
    let out = model.forward(
        backend,
        &mut kv,
        &seq,
        Window::block(0, seq.len(), AttnMask::Causal),
        &ForwardRequest {
            logits: true,
            rows: Some(first..seq.len() - 1),
            ..Default::default()
        },
    )?;
    let logits = out.logits.expect("requested");
    let nll: f64 = continuation
        .iter()
        .enumerate()
        .map(|(i, &t)| -log_softmax_at(&logits[i * vocab..(i + 1) * vocab], t).0)
        .sum();
    Ok(nll / continuation.len() as f64)
}

/// Accuracy against mask ratio, one polyline per series, as a small standalone SVG.
pub fn ratio_curves_svg(title: &str, series: &[(String, &EvalReport)]) -> String {
    let (w, h, m) = (640.0, 400.0, 50.0);
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f",
    ];
    let x = |t: f64| m + t * (w - 2.0 * m);
    let y = |a: f64| h - m - a * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">mask ratio t</text>\n\
         <text x=\"15\" y=\"{}\" transform=\"rotate(-90 15 {})\" text-anchor=\"middle\">masked-token accuracy</text>\n",
        w / 2.0,
        xml_escape(title),
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=10 {
        let v = i as f64 / 10.0;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{v:.1}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            x(v),
            h - m + 16.0,
            m - 6.0,
            y(v) + 4.0
        );
    }
    for (k, (name, r)) in series.iter().enumerate() {
        let color = colors[k % colors.len()];
        let pts: Vec<String> = r
            .by_ratio
            .iter()
            .filter(|b| b.masked > 0)
            .map(|b| format!("{:.1},{:.1}", x(b.t - 0.05), y(b.accuracy)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{}</text>\n",
            w - m - 120.0,
            m + 16.0 * k as f64,
            xml_escape(name)
        );
    }
    s + "</svg>\n"
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::format::{DType, EdmFile};
    use crate::model::Architecture;
    use crate::synth::{self, SynthSpec};

    fn tiny() -> (tempfile::TempDir, Model<CpuBackend>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.edm");
        let m = synth::build(&SynthSpec::tiny(Architecture::Llada2Moe)).unwrap();
        synth::write_edm(&m, &path, DType::F32, &|_, _| {}).unwrap();
        let file = Arc::new(EdmFile::open(&path).unwrap());
        (dir, Model::load(&CpuBackend, file, &|_, _| true).unwrap())
    }

    #[test]
    fn corpus_documents_are_split_at_separator_lines_and_wrapped_in_bos_eos() {
        use crate::tokenizer::train::{train_bpe, SpecialTokens};
        let json = train_bpe(
            "fn main() {}\nThe quick brown fox.\n",
            300,
            &SpecialTokens::default(),
        )
        .unwrap();
        let tok = Tokenizer::from_json(json.as_bytes()).unwrap();
        let text = format!("fn main() {{}}{DOCUMENT_SEPARATOR}The fox.\n{DOCUMENT_SEPARATOR}");
        let docs = encode_documents(&tok, &text, Some(1), Some(2)).unwrap();
        assert_eq!(
            docs.len(),
            2,
            "the empty tail after the last separator is no document"
        );
        assert_eq!(docs[0][0], 1);
        assert_eq!(*docs[0].last().unwrap(), 2);
        assert_eq!(
            &docs[0][1..docs[0].len() - 1],
            tok.encode("fn main() {}", false).unwrap()
        );
        assert_eq!(
            &docs[1][1..docs[1].len() - 1],
            tok.encode("The fox.\n", false).unwrap()
        );
        let sep = tok.encode("\x1e", false).unwrap();
        assert!(docs.iter().all(|d| !d.windows(sep.len()).any(|w| w == sep)));
        // No separator, no special ids: the plain encoding.
        assert_eq!(
            encode_documents(&tok, "fn main() {}", None, None).unwrap(),
            vec![tok.encode("fn main() {}", false).unwrap()]
        );
    }

    const DOC: [u32; 21] = [
        5, 9, 40, 77, 300, 12, 90, 41, 7, 250, 33, 64, 128, 17, 18, 19, 200, 201, 202, 11, 8,
    ];

    #[test]
    fn ar_nll_is_the_mean_next_token_cross_entropy_of_one_causal_pass() {
        let (_d, m) = tiny();
        let mut r = EvalReport::new();
        r.add_document(&CpuBackend, &m, &DOC, 64, 3, 0).unwrap();
        let mut kv = m.new_kv(&CpuBackend, 64).unwrap();
        let want = ForwardRequest {
            logits: true,
            ..Default::default()
        };
        let out = m
            .forward(
                &CpuBackend,
                &mut kv,
                &DOC,
                Window::block(0, DOC.len(), AttnMask::Causal),
                &want,
            )
            .unwrap();
        let v = m.config.vocab_size;
        let logits = out.logits.unwrap();
        let nll: f64 = (0..DOC.len() - 1)
            .map(|i| -log_softmax_at(&logits[i * v..(i + 1) * v], DOC[i + 1]).0)
            .sum::<f64>()
            / (DOC.len() - 1) as f64;
        assert!((r.ar_nll - nll).abs() < 1e-9, "{} vs {nll}", r.ar_nll);
        assert!(
            r.masked_tokens > 0
                && r.diffusion_nll_bound >= r.masked_nll * r.masked_tokens as f64 / r.tokens as f64
        );
    }

    #[test]
    fn the_seed_fixes_the_noise() {
        let (_d, m) = tiny();
        let run = |seed| {
            let mut r = EvalReport::new();
            r.add_document(&CpuBackend, &m, &DOC, 16, 3, seed).unwrap();
            r
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7).by_ratio, run(8).by_ratio);
    }

    #[test]
    fn continuation_nll_scores_the_continuation_tokens_of_one_causal_pass() {
        let (_d, m) = tiny();
        let (prompt, cont) = DOC.split_at(7);
        let got = continuation_nll(&CpuBackend, &m, prompt, cont).unwrap();
        let mut r = EvalReport::new();
        r.add_document(&CpuBackend, &m, &DOC, 64, 3, 0).unwrap();
        // The document's AR NLL averages all 20 next-token predictions; the continuation's covers
        // the last 14 of them: recombine with the first 6 scored alone.
        let head = continuation_nll(&CpuBackend, &m, &DOC[..1], &DOC[1..7]).unwrap();
        let whole = (head * 6.0 + got * 14.0) / 20.0;
        assert!((whole - r.ar_nll).abs() < 1e-9, "{whole} vs {}", r.ar_nll);
        // A single token: the argmax scores lowest.
        let nll_of = |t: u32| continuation_nll(&CpuBackend, &m, prompt, &[t]).unwrap();
        let scores: Vec<f64> = (0..m.config.vocab_size as u32).map(nll_of).collect();
        let best = (0..scores.len())
            .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap() as u32;
        let mut kv = m.new_kv(&CpuBackend, 16).unwrap();
        let out = m
            .forward(
                &CpuBackend,
                &mut kv,
                prompt,
                Window::block(0, prompt.len(), AttnMask::Causal),
                &ForwardRequest::default(),
            )
            .unwrap();
        assert_eq!(best, out.stats.last().unwrap().argmax);
    }
}
