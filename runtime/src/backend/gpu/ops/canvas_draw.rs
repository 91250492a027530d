//! The canvas sampler's step at the end of a decoder pass (DiffusionGemma, `Backend::canvas_head`;
//! shaders/canvas_draw.wgsl): per chunk of canvas rows that fits one binding, the tied head's
//! logits, the softcap, `canvas_draw` (tempered in place; entropy, argmax and the inverse-CDF
//! token per row) and the soft embeddings of the tempered logits for the next step's
//! self-conditioning (ops/soft_embed.rs). Only the draws come back, 12 bytes a row, read at the
//! pass's end with the paged pools' routing (ops/stats.rs); the logits never leave the device.

use bytemuck::{Pod, Zeroable};

use super::super::kernels::{Entry, Slot::*};
use super::super::recorder::Grid;
use super::super::{GpuAct, GpuBackend, GpuWeight};
use crate::backend::draw::{CanvasHeadParams, RowDraw};
use crate::backend::{shapes, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct DrawParams {
    pub rows: u32,
    pub vocab: u32,
    pub row0: u32,
    pub t: f32,
}

pub static CANVAS_DRAW: Entry = Entry {
    file: "canvas_draw.wgsl",
    name: "canvas_draw",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read), (3, ReadWrite)],
    params: "DrawParams",
};

/// [`crate::backend::Backend::canvas_head`] on the GPU.
pub fn canvas_head(
    b: &GpuBackend,
    x: &GpuAct,
    table: &GpuWeight,
    p: CanvasHeadParams,
    uniforms: &[f32],
) -> Result<(Vec<RowDraw>, Option<GpuAct>)> {
    shapes::canvas_head(
        (x.rows, x.cols),
        (table.rows, table.cols),
        uniforms.len(),
        &p,
    )?;
    let (n, vocab, h) = (x.rows, table.rows, table.cols);
    let per = b.head_rows(vocab);
    let mut soft = None;
    let back = super::stats::read_at_pass_end(b, |ctx| {
        let out = match p.next_input {
            true => Some(GpuBackend::out_act(ctx, n, h)?),
            false => None,
        };
        let u = ctx.output((n.max(1) * 4) as u64)?;
        ctx.upload(bytemuck::cast_slice(uniforms), &u)?;
        let draws = ctx.output((n.max(1) * 12) as u64)?;
        let logits = ctx.output((per.min(n).max(1) * vocab * 4) as u64)?;
        let mut r0 = 0;
        while r0 < n {
            let m = per.min(n - r0);
            super::matmul::matmul_into(ctx, table, &x.buf, r0, m, &logits, vocab)?;
            if let Some(cap) = p.cap {
                super::gemma::record_softcap(ctx, &logits, m * vocab, cap)?;
            }
            let dp = DrawParams {
                rows: m as u32,
                vocab: vocab as u32,
                row0: r0 as u32,
                t: p.temperature,
            };
            ctx.dispatch(
                &CANVAS_DRAW,
                0,
                &dp,
                None,
                &[&logits, &u, &draws],
                Grid::Groups(m as u32, 1, 1),
            )?;
            if let Some(out) = &out {
                super::soft_embed::record_soft_embed(
                    ctx,
                    &logits,
                    m,
                    r0,
                    table,
                    &out.buf,
                    p.embed_scale,
                )?;
            }
            r0 += m;
        }
        soft = out;
        Ok(vec![(draws, (n * 12) as u64)])
    })?;
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(&back[0]);
    let draws = words
        .chunks(3)
        .map(|w| RowDraw {
            entropy: f32::from_bits(w[0]),
            argmax: w[1],
            sampled: w[2],
        })
        .collect();
    Ok((draws, soft))
}
