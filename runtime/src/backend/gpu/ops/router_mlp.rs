//! ZAYA1's MLP router (shaders/router_mlp.wgsl): down-projection (+ bias, + EDA share of the
//! previous MoE layer's router state), RMSNorm, two GELU layers and the class projection through
//! the matmul and norm kernels, then one selection dispatch (softmax, biased top-k, skip class).

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::GpuWeight;
use super::super::{f32_arg, GpuAct, GpuBackend, GpuRouting};
use super::router::{BlockMaskParams, BLOCK_MASK};
use crate::backend::shapes::shape_err;
use crate::backend::BlockRouting;
use crate::backend::{self, MlpRouterParams, MlpRouterWeights};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct MlpRouterGpuParams {
    pub t: u32,
    pub n: u32,
    pub mode: u32,
    pub classes: u32,
    pub experts: u32,
    pub top_k: u32,
    /// Rows per block of block-level routing; 0: off (as RouterParams).
    pub block_size: u32,
    pub block_phase: u32,
    pub block_first: u32,
    pub _pad: [u32; 3],
}

pub static MLP_BIAS_ACT: Entry = Entry {
    file: "router_mlp.wgsl",
    name: "mlp_bias_act",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read), (3, Read), (4, Read)],
    params: "MlpRouterParams",
};
pub static MLP_ROUTE_SELECT: Entry = Entry {
    file: "router_mlp.wgsl",
    name: "mlp_route_select",
    bindings: &[
        (0, Params),
        (2, Read),
        (5, Read),
        (6, ReadWrite),
        (7, ReadWrite),
        (8, Read),
    ],
    params: "MlpRouterParams",
};

/// Mode bits of `mlp_bias_act`.
const EDA: u32 = 1;
const GELU: u32 = 2;

/// The router's f32 vectors and its projections.
pub struct MlpRouterBuffers<'a> {
    pub down: &'a GpuWeight,
    pub down_bias: &'a GpuBuffer,
    /// (previous router state `[rows, n]`, per-channel scale `[n]`).
    pub eda: Option<(&'a GpuBuffer, &'a GpuBuffer)>,
    pub norm: &'a GpuBuffer,
    pub fc1: &'a GpuWeight,
    pub fc1_bias: &'a GpuBuffer,
    pub fc2: &'a GpuWeight,
    pub fc2_bias: &'a GpuBuffer,
    pub out: &'a GpuWeight,
    pub bias: &'a GpuBuffer,
}

fn bias_act(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    rows: usize,
    n: usize,
    bias: &GpuBuffer,
    eda: Option<(&GpuBuffer, &GpuBuffer)>,
    gelu: bool,
) -> Result<(), GpuError> {
    let dummy = ctx.sh.dummies[0].clone();
    let (prev, scale) = eda.unwrap_or((&dummy, &dummy));
    let p = MlpRouterGpuParams {
        t: rows as u32,
        n: n as u32,
        mode: if eda.is_some() { EDA } else { 0 } | if gelu { GELU } else { 0 },
        classes: 0,
        experts: 0,
        top_k: 0,
        block_size: 0,
        block_phase: 0,
        block_first: 0,
        _pad: [0; 3],
    };
    ctx.dispatch(
        &MLP_BIAS_ACT,
        0,
        &p,
        None,
        &[x, bias, prev, scale],
        Grid::Linear(((rows * n) as u64).div_ceil(64)),
    )
}

/// Routes `x` [rows, H]: writes `ids`/`weights` [rows, top_k] and the router state `state`
/// [rows, n] (after EDA, before the norm) that the next MoE layer's EDA reads. With `blocks`,
/// router_blocks.wgsl turns the class logits into each block's mask first.
#[allow(clippy::too_many_arguments)]
pub fn record_route_mlp(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    rows: usize,
    w: MlpRouterBuffers<'_>,
    experts: usize,
    top_k: usize,
    eps: f32,
    blocks: Option<&BlockRouting>,
    state: &GpuBuffer,
    ids: &GpuBuffer,
    weights: &GpuBuffer,
) -> Result<(), GpuError> {
    let n = w.down.rows;
    let classes = w.out.rows;
    super::matmul::matmul_into(ctx, w.down, x, 0, rows, state, n)?;
    bias_act(ctx, state, rows, n, w.down_bias, w.eda, false)?;
    let a = ctx.output((rows * n * 4) as u64)?;
    super::norm::record_rms_norm(ctx, state, w.norm, &a, rows, n, eps)?;
    let b = ctx.output((rows * n * 4) as u64)?;
    super::matmul::matmul_into(ctx, w.fc1, &a, 0, rows, &b, n)?;
    bias_act(ctx, &b, rows, n, w.fc1_bias, None, true)?;
    super::matmul::matmul_into(ctx, w.fc2, &b, 0, rows, &a, n)?;
    bias_act(ctx, &a, rows, n, w.fc2_bias, None, true)?;
    let logits = ctx.output((rows * classes * 4) as u64)?;
    super::matmul::matmul_into(ctx, w.out, &a, 0, rows, &logits, classes)?;
    let n_blocks = blocks.map_or(0, |b| b.blocks(rows));
    let mask = match blocks {
        Some(b) if n_blocks > 0 => {
            let mask = ctx.output((n_blocks * classes * 4) as u64)?;
            let mp = BlockMaskParams {
                t: rows as u32,
                ne: classes as u32,
                gating: 2,
                has_bias: 1,
                keep: b.experts.min(experts) as u32,
                first_row: b.first_row as u32,
                size: b.size as u32,
                phase: b.phase as u32,
            };
            ctx.dispatch(
                &BLOCK_MASK,
                0,
                &mp,
                None,
                &[&logits, &mask, w.bias],
                Grid::Groups(n_blocks as u32, 1, 1),
            )?;
            Some((mask, b))
        }
        _ => None,
    };
    let p = MlpRouterGpuParams {
        t: rows as u32,
        n: n as u32,
        mode: 0,
        classes: classes as u32,
        experts: experts as u32,
        top_k: top_k as u32,
        block_size: mask.as_ref().map_or(0, |(_, b)| b.size as u32),
        block_phase: mask.as_ref().map_or(0, |(_, b)| b.phase as u32),
        block_first: mask.as_ref().map_or(0, |(_, b)| b.first_row as u32),
        _pad: [0; 3],
    };
    let dummy = ctx.sh.dummies[0].clone();
    let mask_buf = mask.as_ref().map_or(&*dummy, |(m, _)| &**m);
    ctx.dispatch(
        &MLP_ROUTE_SELECT,
        0,
        &p,
        None,
        &[w.bias, &logits, ids, weights, mask_buf],
        Grid::Linear((rows as u64).div_ceil(64)),
    )
}

/// [`Backend::route_mlp`] on the GPU.
pub(in crate::backend::gpu) fn route_mlp(
    b: &GpuBackend,
    x: &GpuAct,
    w: MlpRouterWeights<'_, GpuWeight>,
    eda: Option<&GpuAct>,
    p: MlpRouterParams,
) -> backend::Result<(GpuRouting, GpuAct)> {
    let (n, classes, k) = (w.down.rows, p.experts + 1, p.top_k);
    let bad = |what: String| shape_err("route_mlp", what);
    let vec_of = |name, wt, len| f32_arg("route_mlp", name, wt, 1, len);
    if w.down.cols != x.cols
        || (w.fc1.rows, w.fc1.cols, w.fc2.rows, w.fc2.cols) != (n, n, n, n)
        || (w.out.rows, w.out.cols) != (classes, n)
        || k == 0
        || k > classes
    {
        return Err(bad(format!(
            "down [{}, {}] × x width {}, fc [{}, {}], out [{}, {}] for {classes} classes top-{k}",
            w.down.rows, w.down.cols, x.cols, w.fc1.rows, w.fc1.cols, w.out.rows, w.out.cols
        )));
    }
    let eda_bufs = match (eda, w.eda_scale) {
        (Some(prev), Some(scale)) => {
            if (prev.rows, prev.cols) != (x.rows, n) {
                return Err(bad(format!(
                    "EDA state [{}, {}] vs router [{}, {n}]",
                    prev.rows, prev.cols, x.rows
                )));
            }
            Some((&*prev.buf, vec_of("eda_scale", scale, n)?))
        }
        _ => None,
    };
    let bufs = MlpRouterBuffers {
        down: w.down,
        down_bias: vec_of("down_bias", w.down_bias, n)?,
        eda: eda_bufs,
        norm: vec_of("norm", w.norm, n)?,
        fc1: w.fc1,
        fc1_bias: vec_of("fc1_bias", w.fc1_bias, n)?,
        fc2: w.fc2,
        fc2_bias: vec_of("fc2_bias", w.fc2_bias, n)?,
        out: w.out,
        bias: vec_of("bias", w.bias, classes)?,
    };
    b.with(|ctx| {
        let state = GpuBackend::out_act(ctx, x.rows, n)?;
        let ids = ctx.output((x.rows * k * 4) as u64)?;
        let weights = ctx.output((x.rows * k * 4) as u64)?;
        record_route_mlp(
            ctx,
            &x.buf,
            x.rows,
            bufs,
            p.experts,
            k,
            p.eps,
            p.blocks.as_ref(),
            &state.buf,
            &ids,
            &weights,
        )?;
        Ok((
            GpuRouting {
                rows: x.rows,
                k,
                ids,
                weights,
            },
            state,
        ))
    })
}
