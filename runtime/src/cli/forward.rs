//! `edgediff forward`: one forward pass, logits printed for debugging and external checks
//! (tests/reference/compare_logits.py holds them against transformers' on the CPU and the GPU).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::backend::{stats_from_logits, AttnMask, Backend};
use crate::format::EdmFile;
use crate::model::{ForwardRequest, Model, Window};

#[derive(clap::Args)]
pub struct Args {
    /// Model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required_unless_present = "text")]
    pub tokens: Vec<u32>,
    /// Text to tokenize instead of --tokens.
    #[arg(long, conflicts_with = "tokens")]
    pub text: Option<String>,
    /// Attention mask: causal, bidirectional or block:N.
    #[arg(long, default_value = "causal")]
    pub mask: String,
    /// Candidates printed per position.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Print all logits as JSON: {"tokens": [...], "logits": [[...], ...]}.
    #[arg(long)]
    pub json: bool,
    /// Backend: cpu (the f32 reference), gpu (any adapter, a software one included) or auto.
    #[arg(long, default_value = "cpu")]
    pub backend: crate::engine::BackendChoice,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mask: AttnMask = a.mask.parse().map_err(anyhow::Error::msg)?;
    let file = Arc::new(
        EdmFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?,
    );
    let tokens = match &a.text {
        Some(text) => {
            let tok = crate::tokenizer::Tokenizer::from_json(file.blob("tokenizer.json")?)?;
            tok.encode(text, false)?
        }
        None => a.tokens.clone(),
    };
    if tokens.is_empty() {
        anyhow::bail!("no tokens to run");
    }
    let logits = super::on_backend!(a.backend, b => logits(&b, file, &tokens, mask))?;
    print(&a, &tokens, &logits)
}

/// The logits of one pass over `tokens` from position 0, `[tokens, vocab]`.
fn logits<B: Backend>(
    backend: &B,
    file: Arc<EdmFile>,
    tokens: &[u32],
    mask: AttnMask,
) -> anyhow::Result<Vec<f32>> {
    let model = Model::load(backend, file, &|_, _| true).context("loading the model")?;
    let mut kv = model.new_kv(backend, tokens.len())?;
    let want = ForwardRequest {
        logits: true,
        ..Default::default()
    };
    let out = model
        .forward(
            backend,
            &mut kv,
            tokens,
            Window::block(0, tokens.len(), mask),
            &want,
        )
        .context("forward pass")?;
    Ok(out.logits.expect("requested"))
}

fn print(a: &Args, tokens: &[u32], logits: &[f32]) -> anyhow::Result<()> {
    let vocab = logits.len() / tokens.len();
    if a.json {
        let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
        println!(
            "{}",
            serde_json::json!({ "tokens": tokens, "mask": a.mask, "logits": rows })
        );
        return Ok(());
    }
    for (i, row) in logits.chunks(vocab).enumerate() {
        let s = stats_from_logits(row);
        let top: Vec<String> = s
            .top
            .iter()
            .take(a.top)
            .map(|(id, p)| format!("{id}:{:.3} ({:.4})", row[*id as usize], p))
            .collect();
        println!(
            "pos {i:>3} token {:>6}  H {:.3}  top {}",
            tokens[i],
            s.entropy,
            top.join("  ")
        );
    }
    Ok(())
}
