//! ZAYA1's scaled residual join fused with the next RMSNorm (shaders/scaled.wgsl): one workgroup
//! per row.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{GpuAct, GpuBackend, GpuWeight};
use crate::backend;
use crate::backend::shapes::shape_err;

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
/// `x = (delta + s[0]) ⊙ s[1] + (x + s[2]) ⊙ s[3]`; `out = rms_norm(x) · w`. `s` is [4, cols] f32.
#[allow(clippy::too_many_arguments)]
pub fn record_scaled_residual_norm(
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

/// [`Backend::scaled_residual_norm`] on the GPU.
pub(in crate::backend::gpu) fn scaled_residual_norm(
    b: &GpuBackend,
    x: &mut GpuAct,
    delta: &GpuAct,
    scales: &GpuWeight,
    norm: &GpuWeight,
    eps: f32,
) -> backend::Result<GpuAct> {
    let h = x.cols;
    let (s, wv) = match (scales.f32_table(4, h), norm.vector()) {
        (Some(s), Some(wv)) if norm.cols == h && scales.rows == 4 => (s, wv),
        _ => {
            return Err(shape_err(
                "scaled_residual_norm",
                format!(
                    "scales [{}, {}], norm [{}, {}] for width {h}",
                    scales.rows, scales.cols, norm.rows, norm.cols
                ),
            ))
        }
    };
    if (x.rows, x.cols) != (delta.rows, delta.cols) {
        return Err(shape_err(
            "scaled_residual_norm",
            format!("[{}, {}] + [{}, {}]", x.rows, h, delta.rows, delta.cols),
        ));
    }
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, x.rows, h)?;
        record_scaled_residual_norm(ctx, &x.buf, &delta.buf, s, wv, &out.buf, x.rows, h, eps)?;
        Ok(out)
    })
}
