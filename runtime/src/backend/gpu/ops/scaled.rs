//! ZAYA1's scaled residual join fused with the next RMSNorm (shaders/scaled.wgsl): one workgroup
//! per row.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct ScaledParams {
    pub rows: u32,
    pub cols: u32,
    pub eps: f32,
    pub _pad: u32,
}

pub static SCALED_RESIDUAL_NORM: Entry = Entry {
    file: "scaled.wgsl",
    name: "scaled_residual_norm",
    bindings: &[
        (0, Params),
        (1, ReadWrite),
        (2, Read),
        (3, Read),
        (4, Read),
        (5, ReadWrite),
    ],
    params: "ScaledParams",
};
/// x = (delta + s[0]) ⊙ s[1] + (x + s[2]) ⊙ s[3]; out = rms_norm(x) · w. `s` is [4, cols] f32.
#[allow(clippy::too_many_arguments)]
pub fn scaled_residual_norm(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    delta: &GpuBuffer,
    s: &GpuBuffer,
    w: &GpuBuffer,
    out: &GpuBuffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(), GpuError> {
    let p = ScaledParams {
        rows: rows as u32,
        cols: cols as u32,
        eps,
        _pad: 0,
    };
    ctx.dispatch(
        &SCALED_RESIDUAL_NORM,
        0,
        &p,
        None,
        &[x, delta, s, w, out],
        Grid::Groups(rows as u32, 1, 1),
    )
}
