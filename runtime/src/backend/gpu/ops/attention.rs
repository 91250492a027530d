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
    pub _pad: [u32; 2],
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
    bindings: &[(0, Params), (1, Read), (4, ReadWrite), (5, Read), (6, Read)],
    params: "AttnParams",
};

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
        _pad: [0; 2],
    };
    ctx.dispatch(
        &KV_STORE,
        0,
        &p,
        None,
        &[qkv, k_cache, v_cache],
        Grid::Linear(((rows * kv_dim) as u64).div_ceil(64)),
    )?;
    ctx.dispatch(
        &ATTEND,
        0,
        &p,
        None,
        &[qkv, out, k_cache, v_cache],
        Grid::Groups(c.num_heads as u32, rows as u32, 1),
    )
}
