//! Per-position statistics of logits (shaders/stats.wgsl): partials per 2048-logit chunk, then one
//! merge per row; 20 words per position come back to the host.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use crate::backend::{PositionStats, TOP_K};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct StatsParams {
    pub rows: u32,
    pub vocab: u32,
    pub chunks: u32,
    pub out_row0: u32,
}

pub static PARTIAL: Entry = Entry {
    file: "stats.wgsl",
    name: "stats_partial",
    bindings: &[(0, Params), (1, Read), (2, ReadWrite)],
    params: "StatsParams",
};
pub static MERGE: Entry = Entry {
    file: "stats.wgsl",
    name: "stats_merge",
    bindings: &[(0, Params), (3, Read), (4, ReadWrite)],
    params: "StatsParams",
};

/// Words per position (and per partial).
pub const WORDS: usize = 20;

/// Reduces `rows` rows of `logits` [rows, vocab] into `out` at rows `out_row0..`.
pub fn stats(
    ctx: &mut Ctx,
    logits: &GpuBuffer,
    rows: usize,
    vocab: usize,
    out: &GpuBuffer,
    out_row0: usize,
) -> Result<(), GpuError> {
    // Logits per stats_partial workgroup (KernelChoice::stats_chunk): a row splits into
    // `vocab.div_ceil(chunk)` equal parts.
    let chunks = vocab.div_ceil(ctx.sh.dev.kernels.stats_chunk);
    let partials = ctx.output((rows * chunks * WORDS * 4) as u64)?;
    let p = StatsParams {
        rows: rows as u32,
        vocab: vocab as u32,
        chunks: chunks as u32,
        out_row0: out_row0 as u32,
    };
    ctx.dispatch(
        &PARTIAL,
        0,
        &p,
        None,
        &[logits, &partials],
        Grid::Groups(chunks as u32, rows as u32, 1),
    )?;
    ctx.dispatch(
        &MERGE,
        0,
        &p,
        None,
        &[&partials, out],
        Grid::Groups(rows as u32, 1, 1),
    )
}

/// Decodes one position's 20 words.
pub fn decode(words: &[u32]) -> PositionStats {
    let f = |i: usize| f32::from_bits(words[i]);
    let top: Vec<(u32, f32)> = (0..TOP_K)
        .filter(|&k| words[4 + k] != u32::MAX)
        .map(|k| (words[4 + k], f(12 + k)))
        .collect();
    PositionStats {
        argmax: words[0],
        p_max: f(1),
        entropy: f(2),
        margin: f(3),
        top,
    }
}
