//! DiffusionGemma's soft embeddings for self-conditioning (shaders/soft_embed.wgsl): the host's
//! logits go up in row chunks that fit one binding (or, in the canvas step, ops/canvas_draw.rs,
//! they are already there), each chunk is softmaxed in place and multiplied into the embedding
//! table chunk by chunk, each table chunk's vocabulary split over workgroups (partials, then a
//! sum in split order).

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{GpuAct, GpuBackend, GpuWeight};
use crate::backend::shapes::shape_err;
use crate::backend::Result;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct SoftEmbedParams {
    pub rows: u32,
    pub cols: u32,
    pub vocab: u32,
    pub v0: u32,
    pub vrows: u32,
    pub scales: u32,
    pub accumulate: u32,
    pub out_row0: u32,
    pub s: f32,
    pub vsplit: u32,
    pub parts: u32,
    pub _pad: u32,
}

pub static SOFT_MAX: Entry = Entry {
    file: "soft_embed.wgsl",
    name: "soft_max",
    bindings: &[(0, Params), (1, ReadWrite)],
    params: "SoftEmbedParams",
};
pub static SOFT_EMBED: Entry = Entry {
    file: "soft_embed.wgsl",
    name: "soft_embed",
    bindings: &[(0, Params), (2, Read), (3, Read), (5, ReadWrite)],
    params: "SoftEmbedParams",
};
pub static SOFT_EMBED_SUM: Entry = Entry {
    file: "soft_embed.wgsl",
    name: "soft_embed_sum",
    bindings: &[(0, Params), (4, ReadWrite), (5, ReadWrite)],
    params: "SoftEmbedParams",
};

/// Workgroups soft_embed aims at: a table chunk's vocabulary is split until column tiles × row
/// tiles × splits reach this (an H100 has 132 SMs; a few rows alone are only ⌈H/64⌉ tiles).
const TARGET_GROUPS: usize = 1024;
/// Vocabulary rows per split at least: one step of the kernel's tile.
const MIN_SPLIT: usize = 64;

/// (vocabulary rows per split, splits) for `m` rows of a table chunk of `vrows` rows and `h`
/// columns, with the partials ([splits, m, h] f32) within `binding` bytes.
pub fn vocab_splits(m: usize, h: usize, vrows: usize, binding: u64) -> (usize, usize) {
    let tiles = h.div_ceil(64) * m.div_ceil(16);
    let fit = (binding / (m * h * 4).max(1) as u64).max(1) as usize;
    super::reduction_splits(vrows, tiles, TARGET_GROUPS, fit, MIN_SPLIT)
}

/// `softmax(logits) · table · s` for host `logits` `[rows, vocab]` and `table` `[vocab, H]`.
pub fn soft_embed(b: &GpuBackend, logits: &[f32], table: &GpuWeight, s: f32) -> Result<GpuAct> {
    let (v, h) = (table.rows, table.cols);
    if v == 0 || logits.is_empty() || !logits.len().is_multiple_of(v) {
        return Err(shape_err(
            "soft_embed",
            format!("{} logits for a vocabulary of {v}", logits.len()),
        ));
    }
    let rows = logits.len() / v;
    let per = b.head_rows(v);
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, rows, h)?;
        let probs = ctx.output((per.min(rows) * v * 4) as u64)?;
        let mut r0 = 0;
        while r0 < rows {
            let m = per.min(rows - r0);
            ctx.upload(bytemuck::cast_slice(&logits[r0 * v..(r0 + m) * v]), &probs)?;
            record_soft_embed(ctx, &probs, m, r0, table, &out.buf, s)?;
            r0 += m;
        }
        Ok(out)
    })
}

/// Records `out[r0 + r] = s · softmax(logits[r]) · table` for the `m` rows of `logits` `[m, V]`
/// (softmaxed in place).
pub(super) fn record_soft_embed(
    ctx: &mut Ctx,
    logits: &GpuBuffer,
    m: usize,
    r0: usize,
    table: &GpuWeight,
    out: &GpuBuffer,
    s: f32,
) -> std::result::Result<(), GpuError> {
    let (v, h) = (table.rows, table.cols);
    let mut p = SoftEmbedParams {
        rows: m as u32,
        cols: h as u32,
        vocab: v as u32,
        v0: 0,
        vrows: 0,
        scales: 0,
        accumulate: 0,
        out_row0: r0 as u32,
        s,
        vsplit: 0,
        parts: 0,
        _pad: 0,
    };
    ctx.dispatch(
        &SOFT_MAX,
        0,
        &p,
        None,
        &[logits],
        Grid::Groups(m as u32, 1, 1),
    )?;
    let most = table
        .chunks
        .iter()
        .map(|c| c.rows as usize)
        .max()
        .unwrap_or(0);
    let (_, most_parts) = vocab_splits(m, h, most, ctx.sh.dev.split);
    let part = ctx.output((most_parts * m * h * 4) as u64)?;
    for (i, c) in table.chunks.iter().enumerate() {
        let (vsplit, parts) = vocab_splits(m, h, c.rows as usize, ctx.sh.dev.split);
        p.v0 = c.row0;
        p.vrows = c.rows;
        p.scales = c.scales;
        p.accumulate = (i > 0) as u32;
        p.vsplit = vsplit as u32;
        p.parts = parts as u32;
        let grid = Grid::Groups(h.div_ceil(64) as u32, m.div_ceil(16) as u32, parts as u32);
        ctx.dispatch(
            &SOFT_EMBED,
            table.wtype(),
            &p,
            None,
            &[&c.buf, logits, &part],
            grid,
        )?;
        let sum = Grid::Linear((m * h).div_ceil(64) as u64);
        ctx.dispatch(&SOFT_EMBED_SUM, 0, &p, None, &[out, &part], sum)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{vocab_splits, MIN_SPLIT, TARGET_GROUPS};

    #[test]
    fn vocab_splits_cover_the_chunk_and_fill_the_gpu() {
        // (rows, columns, vocabulary rows, binding bytes)
        for (m, h, v, binding) in [
            (1, 2816, 262_144, 1u64 << 31),
            (256, 2816, 262_144, 1 << 31),
            (5, 64, 300, 1 << 31),
            (21, 96, 300, 16 << 10),
            (3, 40, 37, 1 << 20),
            (1, 64, 1, 1 << 20),
        ] {
            let (vsplit, parts) = vocab_splits(m, h, v, binding);
            let what = format!("{m} x {h}, vocab {v}: {parts} splits of {vsplit}");
            assert!(
                vsplit >= MIN_SPLIT && vsplit.is_multiple_of(MIN_SPLIT),
                "{what}"
            );
            // Every vocabulary row in exactly one split, none empty.
            assert!(parts * vsplit >= v && (parts - 1) * vsplit < v, "{what}");
            assert!(
                (parts * m * h * 4) as u64 <= binding.max((m * h * 4) as u64),
                "{what}"
            );
            let groups = h.div_ceil(64) * m.div_ceil(16) * parts;
            assert!(
                groups >= TARGET_GROUPS.min(h.div_ceil(64) * m.div_ceil(16) * v.div_ceil(64))
                    || (parts + 1) * m * h * 4 > binding as usize,
                "{what}: {groups} workgroups"
            );
        }
        // One canvas row of DiffusionGemma-26B: 44 column tiles alone before the splits.
        assert_eq!(vocab_splits(1, 2816, 262_144, 1 << 31), (10_944, 24));
    }
}
