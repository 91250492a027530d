//! ZAYA1's input embedding bias and scale (shaders/scaled.wgsl, the scaled residual's kernel
//! family): one invocation per value.

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::scaled::ScaledParams;

pub static EMBED_AFFINE: Entry = Entry {
    file: "scaled.wgsl",
    name: "embed_affine",
    bindings: &[(0, Params), (1, ReadWrite), (3, Read)],
    params: "ScaledParams",
};

/// x = (x + a[0]) ⊙ a[1]; `a` is [2, cols] f32.
pub fn embed_affine(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    a: &GpuBuffer,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    let p = ScaledParams {
        rows: rows as u32,
        cols: cols as u32,
        eps: 0.0,
        _pad: 0,
    };
    ctx.dispatch(
        &EMBED_AFFINE,
        0,
        &p,
        None,
        &[x, a],
        Grid::Linear(((rows * cols) as u64).div_ceil(64)),
    )
}
