//! ZAYA1's input embedding bias and scale (shaders/scaled.wgsl, the scaled residual's kernel
//! family): one invocation per value.

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{GpuAct, GpuBackend, GpuWeight};
use super::scaled::ScaledParams;
use crate::backend;
use crate::backend::shapes::shape_err;

pub static EMBED_AFFINE: Entry = Entry {
    file: "scaled.wgsl",
    name: "embed_affine",
    bindings: &[(0, Params), (1, ReadWrite), (3, Read)],
    params: "ScaledParams",
};

/// `x = (x + a[0]) ⊙ a[1]`; `a` is [2, cols] f32.
pub fn record_embed_affine(
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

/// [`Backend::embed_affine`] on the GPU.
pub(in crate::backend::gpu) fn embed_affine(
    b: &GpuBackend,
    x: &mut GpuAct,
    affine: &GpuWeight,
) -> backend::Result<()> {
    let a = match affine.f32_table(2, x.cols) {
        Some(a) if affine.rows == 2 => a,
        _ => {
            return Err(shape_err(
                "embed_affine",
                format!(
                    "affine [{}, {}] for width {}",
                    affine.rows, affine.cols, x.cols
                ),
            ))
        }
    };
    b.with(|ctx| Ok(record_embed_affine(ctx, &x.buf, a, x.rows, x.cols)?))
}
