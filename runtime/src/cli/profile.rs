//! `edgediff profile`: routing statistics of a model over a calibration corpus.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::backend::Backend;
use crate::eval::encode_documents;
use crate::experts::Profile;
use crate::format::EdmFile;
use crate::model::Model;

#[derive(clap::Args)]
pub struct Args {
    /// Model file.
    #[arg(long)]
    pub model: PathBuf,
    /// Corpus: text files, or directories searched recursively for *.txt, *.md, *.rs, *.py, *.c, *.h.
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Output profile (JSON).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tokens per forward window; longer documents are cut into windows.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// At most this many tokens per document (a few documents suffice). Documents are files, or the
    /// records of a file whose documents are separated by a line holding only U+001E.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Backend: auto (a hardware GPU when available, else CPU), cpu or gpu.
    #[arg(long, default_value = "auto")]
    pub backend: crate::engine::BackendChoice,
}

/// Reads the corpus as documents — one per file, or per record-separator line inside a file (the
/// corpus splits' format) — each `bos … eos` as in training, tokenized and truncated.
pub fn read_corpus(
    file: &EdmFile,
    paths: &[PathBuf],
    max_tokens: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let tok = crate::tokenizer::Tokenizer::from_json(file.blob("tokenizer.json")?)?;
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files).with_context(|| format!("reading {}", p.display()))?;
    }
    files.sort();
    let specials = &file.header.metadata.special_tokens;
    let mut docs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for mut ids in encode_documents(&tok, &text, specials.bos, specials.eos)? {
            ids.truncate(max_tokens);
            docs.push(ids);
        }
    }
    if docs.is_empty() {
        anyhow::bail!("the corpus holds no text");
    }
    Ok(docs)
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if p.is_dir() {
        for entry in std::fs::read_dir(p)? {
            let path = entry?.path();
            let text_like = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "txt" | "md" | "rs" | "py" | "c" | "h"));
            if path.is_dir() || text_like {
                collect(&path, out)?;
            }
        }
    } else {
        std::fs::metadata(p)?;
        out.push(p.to_path_buf());
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let file = Arc::new(
        EdmFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?,
    );
    let docs = read_corpus(&file, &a.corpus, a.max_tokens)?;
    let profile = super::on_backend!(a.backend, b => collect_routing(&b, &file, &docs, a.window))?;
    profile.save(&a.output)?;
    println!(
        "wrote {} ({} documents, {} tokens, {} MoE layers)",
        a.output.display(),
        profile.documents,
        profile.tokens,
        profile.layers.len()
    );
    Ok(())
}

/// Routing statistics of `docs` run through the model on `backend`.
fn collect_routing<B: Backend>(
    backend: &B,
    file: &Arc<EdmFile>,
    docs: &[Vec<u32>],
    window: usize,
) -> anyhow::Result<Profile> {
    let model = Model::load(backend, file.clone(), &|_, _| true).context("loading the model")?;
    let mut profile = Profile::empty(file)?;
    let bar = super::progress_bar(docs.len() as u64, "profiling");
    for d in docs {
        profile.add_document(backend, &model, d, window)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(profile)
}
