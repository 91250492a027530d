//! `edgediff convert`

use std::path::PathBuf;

use anyhow::Context;

use crate::format::DType;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    pub hf_dir: PathBuf,
    /// Output model file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weight type of the matrices (norms and router stay f32). Default: f16 for a Hugging Face
    /// checkpoint; for GGUF `auto`, each matrix in the type nearest its GGUF type (Q8_0 → q8 and
    /// Q4_0 → q4 exactly, F16/BF16 → f16, other quantized types → q8; docs/FORMAT.md).
    #[arg(long, value_parser = ["f32", "f16", "q8", "q4", "auto"])]
    pub dtype: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dtype: Option<DType> = match a.dtype.as_deref() {
        None | Some("auto") => None,
        Some(d) => Some(d.parse().map_err(anyhow::Error::msg)?),
    };
    super::check_output_differs(&a.hf_dir, &a.output)?;
    let bar = super::progress_bar(0, "converting");
    let progress = |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let gguf = crate::import::gguf::is_gguf(&a.hf_dir);
    let s = if gguf {
        crate::import::gguf::convert(&a.hf_dir, &a.output, dtype, &progress)
    } else {
        if a.dtype.as_deref() == Some("auto") {
            anyhow::bail!(
                "--dtype auto is for GGUF files; a Hugging Face checkpoint takes f32, f16, q8 or q4"
            );
        }
        crate::import::convert(&a.hf_dir, &a.output, dtype.unwrap_or(DType::F16), &progress)
    }
    .with_context(|| format!("converting {}", a.hf_dir.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({}, {} dense tensors, {} experts, {})",
        s.path.display(),
        super::human_bytes(s.bytes),
        s.tensors,
        s.experts,
        a.dtype
            .as_deref()
            .unwrap_or(if gguf { "auto" } else { "f16" })
    );
    Ok(())
}
