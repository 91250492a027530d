//! Embedding gather (shaders/embed.wgsl), one dispatch per row chunk of the table.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::GpuWeight;
use super::super::{kernels, GpuAct, GpuBackend};
use crate::backend::{self, BackendError};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct EmbedParams {
    pub t: u32,
    pub cols: u32,
    pub row0: u32,
    pub rows: u32,
    pub scales: u32,
    /// Where the pass's ids start in the ids binding.
    pub ids_at: u32,
    pub _pad: [u32; 2],
}

pub static EMBED: Entry = Entry {
    file: "embed.wgsl",
    name: "embed",
    bindings: &[(0, Params), (1, Read), (2, Input), (3, ReadWrite)],
    params: "EmbedParams",
};
/// The same gather of ids already on the device (a denoising canvas's input ids).
pub static EMBED_DEVICE_IDS: Entry = Entry {
    file: "embed.wgsl",
    name: "embed_device_ids",
    bindings: &[(0, Params), (1, Read), (2, Read), (3, ReadWrite)],
    params: "EmbedParams",
};

/// out [T, cols] = rows `tokens` of `table` (ids already checked against the vocabulary).
pub fn record_embed(
    ctx: &mut Ctx,
    table: &GpuWeight,
    tokens: &[u32],
    out: &GpuBuffer,
) -> Result<(), GpuError> {
    let n = (tokens.len() * table.cols) as u64;
    for c in &table.chunks {
        let p = EmbedParams {
            t: tokens.len() as u32,
            cols: table.cols as u32,
            row0: c.row0,
            rows: c.rows,
            scales: c.scales,
            ids_at: 0,
            _pad: [0; 2],
        };
        ctx.dispatch(
            &EMBED,
            table.wtype(),
            &p,
            Some(bytemuck::cast_slice(tokens)),
            &[&c.buf, out],
            Grid::Linear(n.div_ceil(64)),
        )?;
    }
    Ok(())
}

/// [`Backend::embed`] on the GPU.
pub(in crate::backend::gpu) fn embed(
    b: &GpuBackend,
    table: &GpuWeight,
    tokens: &[u32],
) -> backend::Result<GpuAct> {
    if let Some(&id) = tokens.iter().find(|&&t| t as usize >= table.rows) {
        return Err(BackendError::TokenOutOfRange {
            id,
            vocab: table.rows,
        });
    }
    if tokens.len() * 4 > kernels::INPUT_BINDING as usize {
        return Err(GpuError::Limit {
            what: "token ids of one pass".into(),
            need: tokens.len() as u64 * 4,
            limit: kernels::INPUT_BINDING,
        }
        .into());
    }
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, tokens.len(), table.cols)?;
        record_embed(ctx, table, tokens, &out.buf)?;
        Ok(out)
    })
}
