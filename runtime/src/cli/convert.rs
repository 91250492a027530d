//! `edgediff convert`

use std::path::PathBuf;

use anyhow::Context;

use crate::format::DType;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
    pub hf_dir: PathBuf,
    /// Output model file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weight type of the matrices (norms and router stay f32).
    #[arg(long, default_value = "f16", value_parser = ["f32", "f16", "q8", "q4"])]
    pub dtype: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dtype: DType = a.dtype.parse().map_err(anyhow::Error::msg)?;
    super::check_output_differs(&a.hf_dir, &a.output)?;
    let bar = super::progress_bar(0, "converting");
    let s = crate::import::convert(&a.hf_dir, &a.output, dtype, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("converting {}", a.hf_dir.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({}, {} dense tensors, {} experts, {})",
        s.path.display(),
        super::human_bytes(s.bytes),
        s.tensors,
        s.experts,
        dtype
    );
    Ok(())
}
