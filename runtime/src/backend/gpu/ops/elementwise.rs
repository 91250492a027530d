//! Elementwise kernels (shaders/elementwise.wgsl): residual add, SwiGLU of a fused gate/up row,
//! the fill used to poison outputs in tests, and the row gather of a batched pass's LM head.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{GpuAct, GpuBackend};
use crate::backend;
use crate::backend::shapes;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct EwParams {
    pub n: u32,
    pub cols: u32,
    pub pattern: u32,
    pub _pad: u32,
}

pub static ADD: Entry = Entry {
    file: "elementwise.wgsl",
    name: "add",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read)],
    params: "EwParams",
};
pub static SWIGLU: Entry = Entry {
    file: "elementwise.wgsl",
    name: "swiglu",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read)],
    params: "EwParams",
};
pub static GATHER_ROWS: Entry = Entry {
    file: "elementwise.wgsl",
    name: "gather_rows",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read), (6, Input)],
    params: "EwParams",
};
pub static FILL: Entry = Entry {
    file: "elementwise.wgsl",
    name: "fill",
    bindings: &[(0, Params), (3, ReadWrite)],
    params: "EwParams",
};
/// One invocation following a chain of dependent loads (the memory-latency yardstick).
pub static CHASE: Entry = Entry {
    file: "elementwise.wgsl",
    name: "chase",
    bindings: &[(0, Params), (3, ReadWrite)],
    params: "EwParams",
};
pub static COPY16: Entry = Entry {
    file: "elementwise.wgsl",
    name: "copy16",
    bindings: &[(0, Params), (4, Read), (5, ReadWrite)],
    params: "EwParams",
};

/// a[0..n) += b[0..n).
pub fn record_add(ctx: &mut Ctx, a: &GpuBuffer, b: &GpuBuffer, n: usize) -> Result<(), GpuError> {
    let p = EwParams {
        n: n as u32,
        cols: 0,
        pattern: 0,
        _pad: 0,
    };
    ctx.dispatch(
        &ADD,
        0,
        &p,
        None,
        &[a, b],
        Grid::Linear((n as u64).div_ceil(64)),
    )
}

/// out[t, c] = silu(gu[t, c]) · gu[t, inter + c] for `rows` rows.
pub fn swiglu(
    ctx: &mut Ctx,
    out: &GpuBuffer,
    gu: &GpuBuffer,
    rows: usize,
    inter: usize,
) -> Result<(), GpuError> {
    let n = rows * inter;
    let p = EwParams {
        n: n as u32,
        cols: inter as u32,
        pattern: 0,
        _pad: 0,
    };
    ctx.dispatch(
        &SWIGLU,
        0,
        &p,
        None,
        &[out, gu],
        Grid::Linear((n as u64).div_ceil(64)),
    )
}

/// [`Backend::add`] on the GPU.
pub(in crate::backend::gpu) fn add(
    b: &GpuBackend,
    x: &mut GpuAct,
    delta: &GpuAct,
) -> backend::Result<()> {
    shapes::same_shape("add", (x.rows, x.cols), (delta.rows, delta.cols))?;
    b.with(|ctx| Ok(record_add(ctx, &x.buf, &delta.buf, x.rows * x.cols)?))
}

/// [`Backend::gather_rows`] on the GPU: one dispatch (buffer copies would end the compute pass),
/// or the copies where the row table exceeds one op's host data.
pub(in crate::backend::gpu) fn gather_rows(
    b: &GpuBackend,
    x: &GpuAct,
    ranges: &[std::ops::Range<usize>],
) -> backend::Result<GpuAct> {
    for r in ranges {
        shapes::rows_within("gather_rows", r, x.rows)?;
    }
    let src: Vec<u32> = ranges
        .iter()
        .flat_map(|r| r.clone())
        .map(|i| i as u32)
        .collect();
    let table = std::mem::size_of_val(src.as_slice()) as u64;
    if table > super::super::kernels::INPUT_MAX {
        return backend::gather_rows_by_copies(b, x, ranges);
    }
    let n = src.len() * x.cols;
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, src.len(), x.cols)?;
        if n > 0 {
            let p = EwParams {
                n: n as u32,
                cols: x.cols as u32,
                pattern: 0,
                _pad: 0,
            };
            ctx.dispatch(
                &GATHER_ROWS,
                0,
                &p,
                Some(bytemuck::cast_slice(&src)),
                &[&out.buf, &x.buf],
                Grid::Linear((n as u64).div_ceil(64)),
            )?;
        }
        Ok(out)
    })
}
