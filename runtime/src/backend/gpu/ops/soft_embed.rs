//! DiffusionGemma's soft embeddings for self-conditioning (shaders/soft_embed.wgsl): the host's
//! logits go up in row chunks that fit one binding (or, in the canvas step, ops/canvas_draw.rs,
//! they are already there), each chunk is softmaxed in place and multiplied into the embedding
//! table chunk by chunk.

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
    pub _pad: [u32; 3],
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
    bindings: &[(0, Params), (2, Read), (3, Read), (4, ReadWrite)],
    params: "SoftEmbedParams",
};

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
        _pad: [0; 3],
    };
    ctx.dispatch(
        &SOFT_MAX,
        0,
        &p,
        None,
        &[logits],
        Grid::Groups(m as u32, 1, 1),
    )?;
    for (i, c) in table.chunks.iter().enumerate() {
        p.v0 = c.row0;
        p.vrows = c.rows;
        p.scales = c.scales;
        p.accumulate = (i > 0) as u32;
        ctx.dispatch(
            &SOFT_EMBED,
            table.wtype(),
            &p,
            None,
            &[&c.buf, logits, out],
            Grid::Groups(h.div_ceil(64) as u32, m.div_ceil(16) as u32, 1),
        )?;
    }
    Ok(())
}
