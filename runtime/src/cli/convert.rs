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
    /// Mask token id written into the file, replacing the checkpoint's (config.json
    /// `mask_token_id`, tokenizer_config.json `mask_token`, or a token named `<|mask|>`,
    /// `<|mdm_mask|>` or `<mask>`); the diffusion and speculative decoders need one.
    #[arg(long)]
    pub mask_token_id: Option<u32>,
    /// Default block size (speculative draft length) written into the file, replacing
    /// config.json's `block_size` (absent: 16 for zaya, 32 for the other families, 1 for an AR GGUF).
    #[arg(long)]
    pub block_size: Option<usize>,
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
    let overrides = crate::import::MetaOverrides {
        mask_token_id: a.mask_token_id,
        block_size: a.block_size,
    };
    let gguf = crate::import::gguf::is_gguf(&a.hf_dir);
    let s = if gguf {
        crate::import::gguf::convert_with(&a.hf_dir, &a.output, dtype, &overrides, &progress)
    } else {
        if a.dtype.as_deref() == Some("auto") {
            anyhow::bail!(
                "--dtype auto is for GGUF files; a Hugging Face checkpoint takes f32, f16, q8 or q4"
            );
        }
        crate::import::convert_with(
            &a.hf_dir,
            &a.output,
            dtype.unwrap_or(DType::F16),
            &overrides,
            &progress,
        )
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
