//! The MoE router (shaders/router.wgsl): logits through the matmul family (the whole GPU reads the
//! router weight), then one selection dispatch: gating, group-limited top-k, weights.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::GpuWeight;
use crate::arch::{Gating, ModelConfig};

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
    pub _pad: [u32; 3],
}

pub static ROUTE: Entry = Entry {
    file: "router.wgsl",
    name: "route",
    bindings: &[
        (0, Params),
        (1, Read),
        (3, Read),
        (4, ReadWrite),
        (5, ReadWrite),
    ],
    params: "RouterParams",
};

pub const MAX_EXPERTS: usize = 1024;
pub const MAX_TOP_K: usize = 64;

#[allow(clippy::too_many_arguments)]
pub fn route(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    rows: usize,
    router: &GpuWeight,
    bias: Option<&GpuBuffer>,
    c: &ModelConfig,
    ids: &GpuBuffer,
    weights: &GpuBuffer,
) -> Result<(), GpuError> {
    let (ne, k) = (c.moe.num_experts, c.moe.top_k);
    if ne > MAX_EXPERTS || k > MAX_TOP_K {
        return Err(GpuError::Unsupported(format!(
            "routing {ne} experts top-{k} (the router kernel holds {MAX_EXPERTS} experts, top-{MAX_TOP_K})"
        )));
    }
    let (gating, renorm, groups, top_groups, scale) = match c.moe.gating {
        Gating::Softmax { renormalize } => (0, renormalize, 1, 1, 1.0),
        Gating::SigmoidGrouped {
            groups,
            top_groups,
            scale,
            renormalize,
        } => (1, renormalize, groups, top_groups, scale),
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
        _pad: [0; 3],
    };
    let logits = ctx.output((rows * ne * 4) as u64)?;
    super::matmul::matmul_into(ctx, router, x, 0, rows, &logits, ne)?;
    let dummy = ctx.sh.dummies[0].clone();
    ctx.dispatch(
        &ROUTE,
        0,
        &p,
        None,
        &[&logits, bias.unwrap_or(&dummy), ids, weights],
        Grid::Groups(rows as u32, 1, 1),
    )
}
