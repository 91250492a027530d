//! What the bench commands share: the model / block-size / repetition arguments, JSON output, and
//! deterministic test values. Its own module so `bench` and the family-specific benches
//! (`bench_canvas`) both import it instead of each other.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

use crate::format::DType;

#[derive(clap::Args, Clone)]
pub struct Common {
    /// Model file (default: a synthetic model with LLaDA2.0-mini's shapes, written once to the temp
    /// directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Layers of the synthetic model (the first is dense, as in LLaDA2.0-mini; at least 2).
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Weight type of the synthetic model.
    #[arg(long, default_value = "q4")]
    pub dtype: DType,
    /// Block sizes (tokens per forward pass).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16, 32, 64])]
    pub tokens: Vec<usize>,
    /// Cached positions before the block.
    #[arg(long, default_value_t = 1024)]
    pub context: usize,
    /// Timed repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// MiB per copy in the copy-bandwidth measurement (0 skips it).
    #[arg(long, default_value_t = 1024)]
    pub copy_mib: u64,
    /// Print JSON instead of Markdown tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON to this file (the tables still go to stdout), so one run gives both.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Prints `out` (with `--json`) or writes it to `--json-out`; true when the tables are left out.
pub(super) fn emit_json(c: &Common, out: &Value) -> anyhow::Result<bool> {
    let text = serde_json::to_string_pretty(out)?;
    if let Some(p) = &c.json_out {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    if c.json {
        println!("{text}");
    }
    Ok(c.json)
}

/// Deterministic pseudo-random values in [-1, 1).
pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}
