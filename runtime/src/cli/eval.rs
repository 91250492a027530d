//! `edgediff eval`: masked-token accuracy and likelihood bounds per domain (JSON), and the accuracy
//! by mask ratio as an SVG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::backend::Backend;
use crate::eval::{encode_documents, ratio_curves_svg, EvalReport};
use crate::format::EdmFile;
use crate::model::Model;

#[derive(clap::Args)]
pub struct Args {
    /// Model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Test sets: text files; a file's domain is its parent directory's name when the file is called
    /// test.txt / valid.txt (training/data/<domain>/test.txt), else the file's stem. Documents inside
    /// a file are separated by a line holding only U+001E (the corpus splits' format); each is scored
    /// as `bos … eos`, like the training streams.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Tokens per window (rounded down to whole blocks).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// At most this many tokens per domain.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Seed of the noise draws (the same seed gives two models the same masks).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the JSON report here instead of stdout.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Draw accuracy against mask ratio per domain into this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Backend: auto (a hardware GPU when available, else CPU), cpu or gpu.
    #[arg(long, default_value = "auto")]
    pub backend: crate::engine::BackendChoice,
    /// Block-level expert routing in the diffusion passes: each block's tokens route within the N
    /// experts per MoE layer with the largest router mass over the block (the AR pass stays exact).
    #[arg(long, value_name = "N")]
    pub block_experts: Option<usize>,
}

fn domain_of(p: &Path) -> String {
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
    match (
        stem,
        p.parent()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str()),
    ) {
        ("test" | "valid" | "train", Some(dir)) => dir.to_string(),
        _ => stem.to_string(),
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let file = Arc::new(
        EdmFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?,
    );
    let mask_id = file
        .header
        .metadata
        .special_tokens
        .mask
        .context("the model has no mask token: diffusion metrics need one")?;
    let reports = super::on_backend!(a.backend, b => score(&b, &a, &file, mask_id))?;
    write_reports(&a, &reports)
}

/// Every test set scored on `backend`, by domain.
fn score<B: Backend>(
    backend: &B,
    a: &Args,
    file: &Arc<EdmFile>,
    mask_id: u32,
) -> anyhow::Result<BTreeMap<String, EvalReport>> {
    let tok = crate::tokenizer::Tokenizer::from_json(file.blob("tokenizer.json")?)?;
    let model = Model::load(backend, file.clone(), &|_, _| true).context("loading the model")?;
    if let Some(n) = a.block_experts {
        crate::model::check_block_experts(&model.config, n)?;
    }
    let mut reports: BTreeMap<String, EvalReport> = BTreeMap::new();
    let bar = super::progress_bar(a.data.len() as u64, "evaluating");
    for path in &a.data {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let specials = &file.header.metadata.special_tokens;
        // Documents as the trainer saw them (bos … eos, separators dropped), then the cap.
        let mut ids: Vec<u32> = encode_documents(&tok, &text, specials.bos, specials.eos)?.concat();
        ids.truncate(a.max_tokens);
        let report = reports.entry(domain_of(path)).or_default();
        report
            .add_document_routed(
                backend,
                &model,
                &ids,
                a.window,
                mask_id,
                a.seed,
                a.block_experts,
            )
            .with_context(|| format!("evaluating {}", path.display()))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(reports)
}

fn write_reports(a: &Args, reports: &BTreeMap<String, EvalReport>) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "model": a.model.display().to_string(),
        "window": a.window,
        "seed": a.seed,
        "block_experts": a.block_experts,
        "domains": reports,
    });
    let text = serde_json::to_string_pretty(&json)?;
    match &a.output {
        Some(p) => std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{text}"),
    }
    if let Some(svg) = &a.svg {
        let series: Vec<(String, &EvalReport)> =
            reports.iter().map(|(k, v)| (k.clone(), v)).collect();
        let title = format!("{}: accuracy by mask ratio", a.model.display());
        std::fs::write(svg, ratio_curves_svg(&title, &series))
            .with_context(|| format!("writing {}", svg.display()))?;
    }
    for (d, r) in reports {
        eprintln!(
            "{d:<8} tokens {:>6}  AR nll {:.3} acc {:.3}  masked acc {:.3} nll {:.3}  diffusion bound {:.3} nats/token  experts/layer/block {:.1}",
            r.tokens, r.ar_nll, r.ar_accuracy, r.masked_accuracy, r.masked_nll, r.diffusion_nll_bound, r.experts_per_block
        );
    }
    Ok(())
}
