//! Routed experts of one layer, all on the GPU: dispatch (per-expert token lists), the grouped
//! SwiGLU expert kernels of matmul.wgsl through the slot table (one pair of dispatches per pool
//! buffer holding this layer's experts, indirect grids), then the weighted combine.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::matmul::{ExpertParams, EXPERT_DOWN, EXPERT_GATE_UP};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct MoeParams {
    pub assignments: u32,
    pub num_experts: u32,
    pub slot0: u32,
    pub layer: u32,
    pub top_k: u32,
    pub inter: u32,
    pub hidden: u32,
    pub t: u32,
}

pub static DISPATCH: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_dispatch",
    bindings: &[
        (0, Params),
        (1, Read),
        (2, ReadWrite),
        (3, Read),
        (4, ReadWrite),
    ],
    params: "MoeParams",
};
pub static COMBINE: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_combine",
    bindings: &[(0, Params), (5, Read), (6, Read), (7, Read), (8, ReadWrite)],
    params: "MoeParams",
};

/// Words of the dispatch metadata (layout in shaders/lib/moe_meta.wgsl).
pub fn meta_words(experts: usize, assignments: usize) -> usize {
    8 + 4 * experts + 2 * assignments
}

/// Where one layer's experts are and how they are shaped.
pub struct ExpertLayout<'a> {
    pub layer: usize,
    pub num_experts: usize,
    pub slot0: usize,
    pub slots: &'a GpuBuffer,
    /// (global pool index, buffer) of every pool buffer holding an expert of this layer.
    pub pools: &'a [(u32, std::sync::Arc<GpuBuffer>)],
    pub wtype_gate_up: u32,
    pub wtype_down: u32,
    /// Word offsets inside an expert: (gate_up, its scales rel.), (down, its scales rel.).
    pub gate_up: (u32, u32),
    pub down: (u32, u32),
    pub hidden: usize,
    pub inter: usize,
}

/// Scratch of one layer's MoE between its three stages.
pub struct MoeScratch {
    meta: super::super::pool::Pooled,
    h: super::super::pool::Pooled,
    y: super::super::pool::Pooled,
    params: MoeParams,
}

/// All three stages with every pool buffer of `e` (the experts are resident, or a missing one is
/// flagged in `status` and skipped).
#[allow(clippy::too_many_arguments)]
pub fn moe(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    rows: usize,
    ids: &GpuBuffer,
    weights: &GpuBuffer,
    top_k: usize,
    e: &ExpertLayout,
    out: &GpuBuffer,
) -> Result<(), GpuError> {
    let s = dispatch(ctx, rows, ids, top_k, e)?;
    experts(ctx, x, &s, e)?;
    combine(ctx, &s, weights, out)
}

/// Stage 1: per-expert token lists and indirect grids from the routing.
pub fn dispatch(
    ctx: &mut Ctx,
    rows: usize,
    ids: &GpuBuffer,
    top_k: usize,
    e: &ExpertLayout,
) -> Result<MoeScratch, GpuError> {
    let a = rows * top_k;
    let meta = ctx.output((meta_words(e.num_experts, a) * 4) as u64)?;
    let h = ctx.output((a * e.inter * 4) as u64)?;
    let y = ctx.output((a * e.hidden * 4) as u64)?;
    let mp = MoeParams {
        assignments: a as u32,
        num_experts: e.num_experts as u32,
        slot0: e.slot0 as u32,
        layer: e.layer as u32,
        top_k: top_k as u32,
        inter: e.inter as u32,
        hidden: e.hidden as u32,
        t: rows as u32,
    };
    let status = ctx.sh.status.clone();
    ctx.dispatch(
        &DISPATCH,
        0,
        &mp,
        None,
        &[ids, &meta, e.slots, &status],
        Grid::Groups(1, 1, 1),
    )?;
    Ok(MoeScratch {
        meta,
        h,
        y,
        params: mp,
    })
}

/// Stage 2: the SwiGLU of every routed expert resident in one of `e.pools`, into the scratch's
/// per-assignment rows. Experts without a slot are skipped, so paging can run this once per group
/// of experts it brings in, all into the same rows.
pub fn experts(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    s: &MoeScratch,
    e: &ExpertLayout,
) -> Result<(), GpuError> {
    let (top_k, a) = (s.params.top_k, s.params.assignments);
    let (meta, h, y) = (&*s.meta, &*s.h, &*s.y);
    for (pool, buf) in e.pools {
        let p = ExpertParams {
            slot0: e.slot0 as u32,
            num_experts: e.num_experts as u32,
            pool: *pool,
            top_k,
            k: e.hidden as u32,
            n: e.inter as u32,
            part: e.gate_up.0,
            scales: e.gate_up.1,
            assignments: a,
            _pad: [0; 3],
        };
        ctx.dispatch(
            &EXPERT_GATE_UP,
            e.wtype_gate_up,
            &p,
            None,
            &[buf, x, h, e.slots, meta],
            Grid::Indirect(meta, 0),
        )?;
    }
    for (pool, buf) in e.pools {
        let p = ExpertParams {
            slot0: e.slot0 as u32,
            num_experts: e.num_experts as u32,
            pool: *pool,
            top_k,
            k: e.inter as u32,
            n: e.hidden as u32,
            part: e.down.0,
            scales: e.down.1,
            assignments: a,
            _pad: [0; 3],
        };
        ctx.dispatch(
            &EXPERT_DOWN,
            e.wtype_down,
            &p,
            None,
            &[buf, h, y, e.slots, meta],
            Grid::Indirect(meta, 12),
        )?;
    }
    Ok(())
}

/// Stage 3: the weighted sum of each token's expert rows, in routing order.
pub fn combine(
    ctx: &mut Ctx,
    s: &MoeScratch,
    weights: &GpuBuffer,
    out: &GpuBuffer,
) -> Result<(), GpuError> {
    let mp = s.params;
    ctx.dispatch(
        &COMBINE,
        0,
        &mp,
        None,
        &[&s.meta, weights, &s.y, out],
        Grid::Linear(((mp.t * mp.hidden) as u64).div_ceil(64)),
    )
}
