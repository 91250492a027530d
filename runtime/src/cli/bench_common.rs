//! What the bench commands share: the model / block-size / repetition arguments, JSON output,
//! deterministic test values, and GPU time per entry point or dispatch shape. Its own module so
//! `bench` and the family-specific benches (`bench_canvas`) both import it instead of each other.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};

use crate::backend::gpu::{DispatchTag, GpuBackend};
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

// GPU timing of the bench commands: per entry point and per dispatch shape.

/// GPU µs per pass of each (entry point, grid), with its dispatches per pass.
pub(super) type ShapeTimes = Vec<(DispatchTag, usize, f64)>;

/// The JSON of `parts`: entry, grid (null: indirect), dispatches, GPU µs.
pub(super) fn shapes_json(parts: &ShapeTimes) -> Value {
    parts
        .iter()
        .map(|(tag, n, us)| {
            json!({
                "entry": tag.entry,
                "grid": tag.grid,
                "dispatches": n,
                "gpu_us": us,
            })
        })
        .collect()
}

/// (entry point, dispatches, GPU µs) per entry point.
pub(super) type EntryTimes = Vec<(&'static str, usize, f64)>;

/// GPU µs of each entry point in one call of `op` (after a warm-up call): (entry, dispatches, µs).
/// Up to 2048 dispatches are timed (a query set's most timestamps).
pub(super) fn breakdown(
    g: &GpuBackend,
    mut op: impl FnMut() -> anyhow::Result<()>,
    sync: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<EntryTimes> {
    op()?;
    sync()?;
    if !g.start_timing(2048) {
        return Ok(Vec::new());
    }
    op()?;
    sync()?;
    let mut out: EntryTimes = Vec::new();
    for (l, ns) in g.finish_timing()? {
        tally(&mut out, l, ns / 1e3);
    }
    Ok(out)
}

/// Counts one more dispatch of `key` taking `time` in `list` (key, dispatches, total time).
pub(super) fn tally<K: PartialEq>(list: &mut Vec<(K, usize, f64)>, key: K, time: f64) {
    match list.iter_mut().find(|e| e.0 == key) {
        Some(e) => {
            e.1 += 1;
            e.2 += time;
        }
        None => list.push((key, 1, time)),
    }
}

/// `entry [x×y×z] µs (dispatches), …`, the costliest first.
pub(super) fn shape_list(parts: &ShapeTimes) -> String {
    costliest_first(parts, |tag| {
        let grid = tag
            .grid
            .map_or("indirect".into(), |[x, y, z]| format!("{x}×{y}×{z}"));
        format!("{} [{grid}]", tag.entry)
    })
}

/// `entry µs (dispatches), …`, the costliest first.
pub(super) fn entry_list(parts: &EntryTimes) -> String {
    costliest_first(parts, |l| l.to_string())
}

/// `name µs (dispatches), …` of (key, dispatches, µs) rows, the costliest first.
fn costliest_first<K>(parts: &[(K, usize, f64)], name: impl Fn(&K) -> String) -> String {
    let mut order: Vec<&(K, usize, f64)> = parts.iter().collect();
    order.sort_by(|a, b| b.2.total_cmp(&a.2));
    let list: Vec<String> = order
        .iter()
        .map(|(k, n, us)| format!("{} {us:.1} ({n})", name(k)))
        .collect();
    list.join(", ")
}
