//! RMSNorm, alone or fused with the residual add (shaders/norm.wgsl); one workgroup per row.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{not_a_vector, GpuAct, GpuBackend, GpuWeight};
use crate::backend;
use crate::backend::shapes;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct NormParams {
    pub cols: u32,
    pub eps: f32,
    pub _pad: [u32; 2],
}

pub static RMS_NORM: Entry = Entry {
    file: "norm.wgsl",
    name: "rms_norm",
    bindings: &[(0, Params), (1, Read), (2, Read), (3, ReadWrite)],
    params: "NormParams",
};
pub static ADD_RMS_NORM: Entry = Entry {
    file: "norm.wgsl",
    name: "add_rms_norm",
    bindings: &[
        (0, Params),
        (2, Read),
        (3, ReadWrite),
        (4, ReadWrite),
        (5, Read),
    ],
    params: "NormParams",
};

fn grid(rows: usize) -> Result<Grid<'static>, GpuError> {
    Ok(Grid::Groups(rows as u32, 1, 1))
}

/// out = rms_norm(x) · w.
pub fn record_rms_norm(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    w: &GpuBuffer,
    out: &GpuBuffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(), GpuError> {
    let p = NormParams {
        cols: cols as u32,
        eps,
        _pad: [0; 2],
    };
    ctx.dispatch(&RMS_NORM, 0, &p, None, &[x, w, out], grid(rows)?)
}

/// x += delta; out = rms_norm(x) · w.
#[allow(clippy::too_many_arguments)]
pub fn record_add_rms_norm(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    delta: &GpuBuffer,
    w: &GpuBuffer,
    out: &GpuBuffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<(), GpuError> {
    let p = NormParams {
        cols: cols as u32,
        eps,
        _pad: [0; 2],
    };
    ctx.dispatch(&ADD_RMS_NORM, 0, &p, None, &[w, out, x, delta], grid(rows)?)
}

/// [`Backend::rms_norm`] on the GPU.
pub(in crate::backend::gpu) fn rms_norm(
    b: &GpuBackend,
    x: &GpuAct,
    w: &GpuWeight,
    eps: f32,
) -> backend::Result<GpuAct> {
    shapes::norm("rms_norm", w.rows * w.cols, x.cols)?;
    let wv = w.vector().ok_or_else(|| not_a_vector("rms_norm", w))?;
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, x.rows, x.cols)?;
        record_rms_norm(ctx, &x.buf, wv, &out.buf, x.rows, x.cols, eps)?;
        Ok(out)
    })
}

/// [`Backend::add_rms_norm`] on the GPU.
pub(in crate::backend::gpu) fn add_rms_norm(
    b: &GpuBackend,
    x: &mut GpuAct,
    delta: &GpuAct,
    w: &GpuWeight,
    eps: f32,
) -> backend::Result<GpuAct> {
    shapes::norm("add_rms_norm", w.rows * w.cols, x.cols)?;
    let wv = w.vector().ok_or_else(|| not_a_vector("add_rms_norm", w))?;
    shapes::same_shape("add_rms_norm", (x.rows, x.cols), (delta.rows, delta.cols))?;
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, x.rows, x.cols)?;
        record_add_rms_norm(ctx, &x.buf, &delta.buf, wv, &out.buf, x.rows, x.cols, eps)?;
        Ok(out)
    })
}
