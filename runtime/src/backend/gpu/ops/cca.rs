//! CCA attention inputs (shaders/cca.wgsl): the fused projection convolved over time with the
//! per-position state of the KV cache, q/k residuals, L2 norm with key temperature and partial
//! RoPE, in place — three dispatches (store the block's raw rows, conv, finish).

use bytemuck::{Pod, Zeroable};

use std::sync::Arc;

use super::super::device::{GpuDevice, GpuError};
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{f32_arg, GpuAct, GpuBackend, GpuKv, GpuWeight};
use crate::arch::ModelConfig;
use crate::backend::shapes::shape_err;
use crate::backend::CcaParams;
use crate::backend::{self, BackendError, CcaWeights};

/// What a CCA layer keeps per position besides K/V, in the KV cache: the raw `[q; k]` rows (the
/// conv's input) and the delayed-v rows. Indexed by absolute position like the K/V rows (as the
/// CPU's `CcaState`), so the decoders' rollback — the next pass rewrites positions from the last
/// clean one on — rolls this back too.
pub struct CcaState {
    /// Per layer `[capacity, q_dim + kv_dim]`.
    pub conv: Vec<Arc<GpuBuffer>>,
    /// Per layer `[capacity, kv_dim / 2]`.
    pub vd: Vec<Arc<GpuBuffer>>,
}

impl CcaState {
    pub fn new(
        dev: &GpuDevice,
        c: &ModelConfig,
        capacity: usize,
        usage: wgpu::BufferUsages,
    ) -> Result<CcaState, GpuError> {
        let layers = |width: usize, what: &str| -> Result<Vec<Arc<GpuBuffer>>, GpuError> {
            let need = (capacity as u64).saturating_mul(width as u64 * 4);
            if need > dev.max_binding {
                return Err(GpuError::Limit {
                    what: format!("{what} of {capacity} positions"),
                    need,
                    limit: dev.max_binding,
                });
            }
            Ok((0..c.num_layers)
                .map(|_| GpuBuffer::new(&dev.device, need, usage, "cca state"))
                .collect())
        };
        Ok(CcaState {
            conv: layers(c.cca_conv_dim(), "a CCA conv state layer")?,
            vd: layers(c.kv_dim() / 2, "a CCA delayed-v layer")?,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct CcaGpuParams {
    pub t: u32,
    pub nq: u32,
    pub nkv: u32,
    pub hd: u32,
    pub rot_half: u32,
    pub start: u32,
    pub c: u32,
    pub w: u32,
    pub half: u32,
    pub scale: f32,
    pub _pad: [u32; 2],
}

pub static CCA_STORE: Entry = Entry {
    file: "cca.wgsl",
    name: "cca_store",
    bindings: &[(0, Params), (1, ReadWrite), (2, ReadWrite), (3, ReadWrite)],
    params: "CcaParams",
};
pub static CCA_CONV: Entry = Entry {
    file: "cca.wgsl",
    name: "cca_conv",
    bindings: &[
        (0, Params),
        (4, Read),
        (6, Read),
        (7, Read),
        (8, Read),
        (9, Read),
        (10, ReadWrite),
    ],
    params: "CcaParams",
};
pub static CCA_FINISH: Entry = Entry {
    file: "cca.wgsl",
    name: "cca_finish",
    bindings: &[
        (0, Params),
        (1, ReadWrite),
        (4, Read),
        (5, Read),
        (11, Read),
        (12, Read),
        (13, Read),
    ],
    params: "CcaParams",
};

/// The finish kernel keeps a head in registers and shared memory of this many elements.
pub const MAX_HEAD_DIM: usize = 256;

/// The layer's CCA weights as f32 buffers (conv taps, biases, key temperature).
pub struct CcaBuffers<'a> {
    pub conv_dw: &'a GpuBuffer,
    pub conv_dw_bias: &'a GpuBuffer,
    pub conv_grouped: &'a GpuBuffer,
    pub conv_grouped_bias: &'a GpuBuffer,
    pub temp: &'a GpuBuffer,
}

/// `proj` [rows, q_dim + 2 kv_dim] in place; `conv` [capacity, q_dim + kv_dim] and `vd`
/// [capacity, kv_dim / 2] are the layer's state (shapes checked by the caller).
pub fn record_cca_qkv(
    ctx: &mut Ctx,
    proj: &GpuBuffer,
    rows: usize,
    w: CcaBuffers<'_>,
    conv: &GpuBuffer,
    vd: &GpuBuffer,
    p: CcaParams,
) -> Result<(), GpuError> {
    if p.head_dim > MAX_HEAD_DIM {
        return Err(GpuError::Unsupported(format!(
            "head_dim {} (the CCA kernel holds at most {MAX_HEAD_DIM})",
            p.head_dim
        )));
    }
    let (c, kd) = (p.q_dim() + p.kv_dim(), p.kv_dim());
    let rope = super::rope::table_for(ctx, p.rope_theta, p.rotary_dim, p.start + rows)?;
    let gp = CcaGpuParams {
        t: rows as u32,
        nq: p.heads as u32,
        nkv: p.kv_heads as u32,
        hd: p.head_dim as u32,
        rot_half: (p.rotary_dim / 2) as u32,
        start: p.start as u32,
        c: c as u32,
        w: (c + kd) as u32,
        half: (kd / 2) as u32,
        scale: (p.head_dim as f32).sqrt(),
        _pad: [0; 2],
    };
    ctx.dispatch(
        &CCA_STORE,
        0,
        &gp,
        None,
        &[proj, conv, vd],
        Grid::Linear(((rows * (c + kd / 2)) as u64).div_ceil(64)),
    )?;
    let z = ctx.output((rows * c * 4).max(4) as u64)?;
    ctx.dispatch(
        &CCA_CONV,
        0,
        &gp,
        None,
        &[
            conv,
            w.conv_dw,
            w.conv_dw_bias,
            w.conv_grouped,
            w.conv_grouped_bias,
            &z,
        ],
        Grid::Linear(((rows * c) as u64).div_ceil(64)),
    )?;
    ctx.dispatch(
        &CCA_FINISH,
        0,
        &gp,
        None,
        &[proj, conv, vd, &z, w.temp, &rope],
        Grid::Groups((p.heads + p.kv_heads) as u32, rows as u32, 1),
    )
}

/// [`Backend::cca_qkv`] on the GPU.
pub(in crate::backend::gpu) fn cca_qkv(
    b: &GpuBackend,
    proj: &mut GpuAct,
    w: CcaWeights<'_, GpuWeight>,
    kv: &mut GpuKv,
    p: CcaParams,
) -> backend::Result<()> {
    let (qd, kd) = (p.q_dim(), p.kv_dim());
    let c = qd + kd;
    let Some(state) = &kv.cca else {
        return Err(shape_err(
            "cca_qkv",
            "the cache was made for standard attention".into(),
        ));
    };
    if p.layer >= state.conv.len()
        || proj.cols != c + kd
        || p.kv_heads == 0
        || !p.heads.is_multiple_of(p.kv_heads)
    {
        return Err(shape_err(
            "cca_qkv",
            format!(
                "layer {}, projection width {} for {}",
                p.layer,
                proj.cols,
                c + kd
            ),
        ));
    }
    if p.start + proj.rows > kv.capacity {
        return Err(BackendError::CacheFull {
            pos: p.start + proj.rows,
            capacity: kv.capacity,
        });
    }
    let table = |name, wt, rows, cols| f32_arg("cca_qkv", name, wt, rows, cols);
    let hd = p.head_dim;
    let bufs = CcaBuffers {
        conv_dw: table("conv_dw", w.conv_dw, c, 2)?,
        conv_dw_bias: table("conv_dw_bias", w.conv_dw_bias, 1, c)?,
        conv_grouped: table("conv_grouped", w.conv_grouped, c, 2 * hd)?,
        conv_grouped_bias: table("conv_grouped_bias", w.conv_grouped_bias, 1, c)?,
        temp: table("temp", w.temp, 1, p.kv_heads)?,
    };
    let (conv, vd) = (&state.conv[p.layer], &state.vd[p.layer]);
    b.with(|ctx| {
        Ok(record_cca_qkv(
            ctx, &proj.buf, proj.rows, bufs, conv, vd, p,
        )?)
    })
}
