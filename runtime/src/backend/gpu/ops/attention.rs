//! KV-cache write and flash-style attention (shaders/attention.wgsl).

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use crate::backend::AttnMask;
use crate::model::ModelConfig;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct AttnParams {
    pub t: u32,
    pub nq: u32,
    pub nkv: u32,
    pub hd: u32,
    pub start: u32,
    pub kv_len: u32,
    pub mask: u32,
    pub mask_arg: u32,
    pub scale: f32,
    pub kv_dim: u32,
    pub splits: u32,
    pub chunk: u32,
}

pub static KV_STORE: Entry = Entry {
    file: "attention.wgsl",
    name: "kv_store",
    bindings: &[(0, Params), (1, Read), (2, ReadWrite), (3, ReadWrite)],
    params: "AttnParams",
};
pub static ATTEND: Entry = Entry {
    file: "attention.wgsl",
    name: "attend",
    bindings: &[
        (0, Params),
        (1, Read),
        (4, ReadWrite),
        (5, Read),
        (6, Read),
        (7, ReadWrite),
    ],
    params: "AttnParams",
};
pub static ATTEND_COMBINE: Entry = Entry {
    file: "attention.wgsl",
    name: "attend_combine",
    bindings: &[(0, Params), (4, ReadWrite), (7, ReadWrite)],
    params: "AttnParams",
};

/// Workgroups the attention grid aims at: a short query block against a long cache is split
/// along the keys until (heads × tokens × splits) reaches this (flash-decoding).
const TARGET_GROUPS: usize = 512;

/// (splits, keys per split): keys in 64-key chunks, spread over enough splits to fill the GPU.
pub fn splits(heads: usize, rows: usize, kv_len: usize) -> (usize, usize) {
    let chunks = kv_len.div_ceil(64).max(1);
    let want = TARGET_GROUPS.div_ceil(heads * rows).clamp(1, chunks);
    let per = chunks.div_ceil(want);
    (chunks.div_ceil(per), per * 64)
}

/// The largest head the kernel holds (4 dims per invocation of 64).
pub const MAX_HEAD_DIM: usize = 256;

/// Writes the block's K/V into the layer caches, then attends; `out` is [T, nq·hd].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    ctx: &mut Ctx,
    qkv: &GpuBuffer,
    rows: usize,
    k_cache: &GpuBuffer,
    v_cache: &GpuBuffer,
    out: &GpuBuffer,
    c: &ModelConfig,
    start: usize,
    kv_len: usize,
    mask: AttnMask,
) -> Result<(), GpuError> {
    if c.head_dim > MAX_HEAD_DIM {
        return Err(GpuError::Unsupported(format!(
            "head_dim {} (the attention kernel holds at most {MAX_HEAD_DIM})",
            c.head_dim
        )));
    }
    let (mask, mask_arg) = match mask {
        AttnMask::Causal => (0, 0),
        AttnMask::Bidirectional => (1, 0),
        AttnMask::BlockCausal(b) => (2, b.max(1) as u32),
        AttnMask::CausalThenBidirectional { draft_start } => (3, draft_start as u32),
    };
    let kv_dim = c.kv_dim();
    let (splits, chunk) = splits(c.num_heads, rows, kv_len);
    let p = AttnParams {
        t: rows as u32,
        nq: c.num_heads as u32,
        nkv: c.num_kv_heads as u32,
        hd: c.head_dim as u32,
        start: start as u32,
        kv_len: kv_len as u32,
        mask,
        mask_arg,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        kv_dim: kv_dim as u32,
        splits: splits as u32,
        chunk: chunk as u32,
    };
    ctx.dispatch(
        &KV_STORE,
        0,
        &p,
        None,
        &[qkv, k_cache, v_cache],
        Grid::Linear(((rows * kv_dim) as u64).div_ceil(64)),
    )?;
    let grid = (c.num_heads as u32, rows as u32);
    if splits == 1 {
        let dummy = ctx.sh.dummies[0].clone();
        return ctx.dispatch(
            &ATTEND,
            0,
            &p,
            None,
            &[qkv, out, k_cache, v_cache, &dummy],
            Grid::Groups(grid.0, grid.1, 1),
        );
    }
    let part = ctx.output((rows * c.num_heads * splits * (c.head_dim + 2) * 4) as u64)?;
    ctx.dispatch(
        &ATTEND,
        0,
        &p,
        None,
        &[qkv, out, k_cache, v_cache, &part],
        Grid::Groups(grid.0, grid.1, splits as u32),
    )?;
    ctx.dispatch(
        &ATTEND_COMBINE,
        0,
        &p,
        None,
        &[out, &part],
        Grid::Groups(grid.0, grid.1, 1),
    )
}
