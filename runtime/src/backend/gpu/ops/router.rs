//! The MoE router (shaders/router.wgsl): logits through the matmul family (the whole GPU reads the
//! router weight), then one selection dispatch: gating, group-limited top-k, weights. With
//! block-level routing one dispatch before it (shaders/router_blocks.wgsl, a workgroup per block)
//! turns the logits into each block's mask of kept experts, which the selection adds to its bias.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::GpuWeight;
use super::matmul::GemvFuse;
use crate::arch::{Gating, ModelConfig};
use crate::backend::BlockRouting;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct RouterParams {
    pub t: u32,
    pub ne: u32,
    pub top_k: u32,
    pub gating: u32,
    pub renorm: u32,
    pub has_bias: u32,
    pub groups: u32,
    pub top_groups: u32,
    pub scale: f32,
    /// Rows per block of block-level routing; 0: off.
    pub block_size: u32,
    pub block_phase: u32,
    pub block_first: u32,
    /// Groups a block's row keeps (all of them when its experts restrict, see BlockRouting).
    pub block_top_groups: u32,
    pub _pad: [u32; 3],
}

pub static ROUTE: Entry = Entry {
    file: "router.wgsl",
    name: "route",
    bindings: &[
        (0, Params),
        (1, Read),
        (2, Read),
        (3, Read),
        (4, ReadWrite),
        (5, ReadWrite),
    ],
    params: "RouterParams",
};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BlockMaskParams {
    pub t: u32,
    pub ne: u32,
    pub gating: u32,
    pub has_bias: u32,
    pub keep: u32,
    pub first_row: u32,
    pub size: u32,
    pub phase: u32,
}

pub static BLOCK_MASK: Entry = Entry {
    file: "router_blocks.wgsl",
    name: "block_mask",
    bindings: &[(0, Params), (1, Read), (2, ReadWrite), (3, Read)],
    params: "BlockMaskParams",
};

pub const MAX_EXPERTS: usize = 1024;
pub const MAX_TOP_K: usize = 64;
/// Expert groups of grouped gating the kernel ranks (each group takes 64 / groups invocations).
pub const MAX_GROUPS: usize = 64;

/// Top-k routing of `rows` tokens; with `blocks`, each block's tokens choose within its experts.
/// `fuse` folds a norm of `x` (and its copy) into the logits' gemv; false, having recorded
/// nothing, where that gemv cannot (ops/matmul.rs `gemv_fuses`).
#[allow(clippy::too_many_arguments)]
pub fn route(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    rows: usize,
    router: &GpuWeight,
    bias: Option<&GpuBuffer>,
    c: &ModelConfig,
    blocks: Option<&BlockRouting>,
    (ids, weights): (&GpuBuffer, &GpuBuffer),
    fuse: GemvFuse<'_>,
) -> Result<bool, GpuError> {
    let (ne, k) = (c.moe.num_experts, c.moe.top_k);
    if ne > MAX_EXPERTS || k > MAX_TOP_K {
        return Err(GpuError::Unsupported(format!(
            "routing {ne} experts top-{k} (the router kernel holds {MAX_EXPERTS} experts, top-{MAX_TOP_K})"
        )));
    }
    if let Gating::SigmoidGrouped { groups, .. } = c.moe.gating {
        if groups == 0 || groups > MAX_GROUPS {
            return Err(GpuError::Unsupported(format!(
                "{groups} expert groups (the router kernel ranks 1 to {MAX_GROUPS})"
            )));
        }
    }
    // A restricting block drops the group limit (see BlockRouting): all groups count.
    let block_top_groups = match blocks.map(|b| b.gating(c.moe.gating, ne)) {
        Some(Gating::SigmoidGrouped { top_groups, .. }) => top_groups,
        _ => 1,
    };
    let (gating, renorm, groups, top_groups, scale) = match c.moe.gating {
        Gating::Softmax { renormalize } => (0, renormalize, 1, 1, 1.0),
        Gating::SigmoidGrouped {
            groups,
            top_groups,
            scale,
            renormalize,
        } => (1, renormalize, groups, top_groups, scale),
    };
    let logits = ctx.output((rows * ne * 4) as u64)?;
    if !super::matmul::matmul_fused_into(ctx, router, x, 0, rows, &logits, ne, fuse)? {
        return Ok(false);
    }
    let dummy = ctx.sh.dummies[0].clone();
    let n_blocks = blocks.map_or(0, |b| b.blocks(rows));
    let mask = match blocks {
        Some(b) if n_blocks > 0 => {
            let mask = ctx.output((n_blocks * ne * 4) as u64)?;
            let mp = BlockMaskParams {
                t: rows as u32,
                ne: ne as u32,
                gating,
                has_bias: bias.is_some() as u32,
                keep: b.experts.min(ne) as u32,
                first_row: b.first_row as u32,
                size: b.size as u32,
                phase: b.phase as u32,
            };
            ctx.dispatch(
                &BLOCK_MASK,
                0,
                &mp,
                None,
                &[&logits, &mask, bias.unwrap_or(&dummy)],
                Grid::Groups(n_blocks as u32, 1, 1),
            )?;
            Some((mask, b))
        }
        _ => None,
    };
    let p = RouterParams {
        t: rows as u32,
        ne: ne as u32,
        top_k: k as u32,
        gating,
        renorm: renorm as u32,
        has_bias: bias.is_some() as u32,
        groups: groups as u32,
        top_groups: top_groups as u32,
        scale,
        block_size: mask.as_ref().map_or(0, |(_, b)| b.size as u32),
        block_phase: mask.as_ref().map_or(0, |(_, b)| b.phase as u32),
        block_first: mask.as_ref().map_or(0, |(_, b)| b.first_row as u32),
        block_top_groups: block_top_groups as u32,
        _pad: [0; 3],
    };
    let mask_buf: &GpuBuffer = mask.as_ref().map_or(&dummy, |(m, _)| m);
    ctx.dispatch(
        &ROUTE,
        0,
        &p,
        None,
        &[&logits, mask_buf, bias.unwrap_or(&dummy), ids, weights],
        Grid::Groups(rows as u32, 1, 1),
    )?;
    Ok(true)
}
