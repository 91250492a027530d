//! DiffusionGemma's ops on the GPU (issue 18; the CPU reference is backend/cpu/gemma.rs): the
//! scale, the GeGLU dense MLP, the scaled-norm router, the capped logits and their statistics.
//! Small kernels in shaders/gemma.wgsl; the rest is the matmul family, the norm and the router
//! selection of the other families, dispatched with this family's parameters.
//!
//! The GeGLU MLP runs as gate/up matmul → `geglu` → down matmul (the path the SwiGLU MLP takes
//! where its fused GEMV does not apply); the experts run the MoE kernels of every family with
//! their gate activation set to GELU(tanh) (an override constant, lib/gate_act.wgsl).

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{not_a_vector, GpuAct, GpuBackend, GpuExperts, GpuRouting, GpuWeight};
use crate::arch::Activation;
use crate::backend::shapes::{self, shape_err};
use crate::backend::{Backend, PositionStats, Result, ScaledRouterParams};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct GemmaParams {
    pub n: u32,
    pub cols: u32,
    pub s: f32,
    pub _pad: u32,
}

pub static SCALE: Entry = Entry {
    file: "gemma.wgsl",
    name: "scale",
    bindings: &[(0, Params), (1, ReadWrite)],
    params: "GemmaParams",
};
pub static GEGLU: Entry = Entry {
    file: "gemma.wgsl",
    name: "geglu",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read)],
    params: "GemmaParams",
};
pub static SOFTCAP: Entry = Entry {
    file: "gemma.wgsl",
    name: "softcap",
    bindings: &[(0, Params), (1, ReadWrite)],
    params: "GemmaParams",
};
pub static EXPERT_SCALE: Entry = Entry {
    file: "gemma.wgsl",
    name: "expert_scale",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read), (3, Read)],
    params: "GemmaParams",
};

/// One invocation per value of `n`, with `cols` and `s` for the kernel.
fn dispatch(
    ctx: &mut Ctx,
    entry: &'static Entry,
    n: usize,
    cols: usize,
    s: f32,
    bufs: &[&GpuBuffer],
) -> std::result::Result<(), GpuError> {
    let p = GemmaParams {
        n: n as u32,
        cols: cols as u32,
        s,
        _pad: 0,
    };
    ctx.dispatch(
        entry,
        0,
        &p,
        None,
        bufs,
        Grid::Linear((n as u64).div_ceil(64)),
    )
}

/// `x ·= s`.
pub fn scale(b: &GpuBackend, x: &mut GpuAct, s: f32) -> Result<()> {
    b.with(|ctx| Ok(dispatch(ctx, &SCALE, x.rows * x.cols, 0, s, &[&x.buf])?))
}

/// A gated MLP with activation `act`: SiLU is the backend's `mlp`; GELU(tanh) runs gate/up,
/// `geglu`, down.
pub fn gated_mlp(
    b: &GpuBackend,
    gate_up: &GpuWeight,
    down: &GpuWeight,
    x: &GpuAct,
    act: Activation,
) -> Result<GpuAct> {
    if act == Activation::Silu {
        return b.mlp(gate_up, down, x);
    }
    let inter = gate_up.rows / 2;
    if gate_up.cols != x.cols || !gate_up.rows.is_multiple_of(2) || down.cols != inter {
        return Err(shape_err(
            "gated_mlp",
            format!(
                "gate_up [{}, {}], down [{}, {}], x [{}, {}]",
                gate_up.rows, gate_up.cols, down.rows, down.cols, x.rows, x.cols
            ),
        ));
    }
    b.with(|ctx| {
        let gu = ctx.output((x.rows * 2 * inter * 4) as u64)?;
        super::matmul::matmul_into(ctx, gate_up, &x.buf, 0, x.rows, &gu, 2 * inter)?;
        let h = ctx.output((x.rows * inter * 4) as u64)?;
        dispatch(ctx, &GEGLU, x.rows * inter, inter, 0.0, &[&h, &gu])?;
        let out = GpuBackend::out_act(ctx, x.rows, down.rows)?;
        super::matmul::matmul_into(ctx, down, &h, 0, x.rows, &out.buf, down.rows)?;
        Ok(out)
    })
}

/// The routed experts with gate activation `act` (SiLU is the backend's `moe`).
pub fn moe_act(
    b: &GpuBackend,
    x: &GpuAct,
    routing: &GpuRouting,
    experts: &GpuExperts,
    act: Activation,
) -> Result<GpuAct> {
    if act == Activation::Silu {
        return b.moe(x, routing, experts);
    }
    if x.cols != experts.hidden || routing.rows != x.rows {
        return Err(shape_err(
            "moe_act",
            format!(
                "x [{}, {}] with experts of width {} and routing of {} rows",
                x.rows, x.cols, experts.hidden, routing.rows
            ),
        ));
    }
    let act = super::super::kernels::gate_act(act);
    if let Some(pool) = &experts.paged {
        return pool.moe(b, x, routing, experts, None, act);
    }
    let mut layout = experts.layout(&experts.store.slots, &experts.pools);
    layout.act = act;
    b.with(|ctx| GpuBackend::moe_act(ctx, x, routing, &layout, super::moe::Shared::None))
}

/// The scaled-norm router: `z = rms_norm(x) ⊙ scale · H^-½` (the norm op with `scale` as its
/// weight, then the scale kernel), logits through the matmul family, the router's softmax
/// selection (top-k renormalised), × `expert_scale[e]`.
pub fn route_scaled(
    b: &GpuBackend,
    x: &GpuAct,
    proj: &GpuWeight,
    scale: &GpuWeight,
    expert_scale: &GpuWeight,
    p: ScaledRouterParams,
) -> Result<GpuRouting> {
    let (h, n, k) = (x.cols, p.experts, p.top_k);
    if proj.rows != n
        || proj.cols != h
        || scale.rows * scale.cols != h
        || expert_scale.rows * expert_scale.cols != n
    {
        return Err(shape_err(
            "route_scaled",
            format!(
                "router [{}, {}], scale {}, expert scale {} for width {h} and {n} experts",
                proj.rows,
                proj.cols,
                scale.rows * scale.cols,
                expert_scale.rows * expert_scale.cols
            ),
        ));
    }
    if k == 0 || k > n {
        return Err(shape_err("route_scaled", format!("top_k {k} of {n}")));
    }
    let (max_e, max_k) = (super::router::MAX_EXPERTS, super::router::MAX_TOP_K);
    if n > max_e || k > max_k {
        return Err(GpuError::Unsupported(format!(
            "routing {n} experts top-{k} (the router kernel holds {max_e} experts, top-{max_k})"
        ))
        .into());
    }
    let sv = scale
        .vector()
        .ok_or_else(|| not_a_vector("route_scaled", scale))?;
    let ev = expert_scale
        .vector()
        .ok_or_else(|| not_a_vector("route_scaled", expert_scale))?;
    let root = (h as f64).powf(-0.5) as f32;
    b.with(|ctx| {
        let z = ctx.output((x.rows * h * 4) as u64)?;
        super::norm::record_rms_norm(ctx, &x.buf, sv, &z, x.rows, h, p.eps)?;
        dispatch(ctx, &SCALE, x.rows * h, 0, root, &[&z])?;
        let logits = ctx.output((x.rows * n * 4) as u64)?;
        super::matmul::matmul_into(ctx, proj, &z, 0, x.rows, &logits, n)?;
        let ids = ctx.output((x.rows * k * 4) as u64)?;
        let weights = ctx.output((x.rows * k * 4) as u64)?;
        let rp = super::router::RouterParams {
            t: x.rows as u32,
            ne: n as u32,
            top_k: k as u32,
            gating: 0,
            renorm: 1,
            has_bias: 0,
            groups: 1,
            top_groups: 1,
            scale: 1.0,
            block_size: 0,
            block_phase: 0,
            block_first: 0,
            block_top_groups: 1,
            _pad: [0; 3],
        };
        let dummy = ctx.sh.dummies[0].clone();
        ctx.dispatch(
            &super::router::ROUTE,
            0,
            &rp,
            None,
            &[&logits, &dummy, &dummy, &ids, &weights],
            Grid::Groups(x.rows as u32, 1, 1),
        )?;
        dispatch(
            ctx,
            &EXPERT_SCALE,
            x.rows * k,
            0,
            0.0,
            &[&weights, ev, &ids],
        )?;
        Ok(GpuRouting {
            rows: x.rows,
            k,
            ids,
            weights,
        })
    })
}

/// Logits of `rows` capped as `cap · tanh(logits / cap)`.
pub fn logits_softcap(
    b: &GpuBackend,
    x: &GpuAct,
    head: &GpuWeight,
    rows: std::ops::Range<usize>,
    cap: f32,
) -> Result<Vec<f32>> {
    check_head("logits_softcap", x, head, &rows, cap)?;
    let (n, vocab) = (rows.len(), head.rows);
    let per = b.head_rows(vocab);
    let mut all = Vec::with_capacity(n * vocab);
    let mut r0 = 0;
    while r0 < n {
        let m = per.min(n - r0);
        let part = b.with(|ctx| {
            let logits = ctx.output((m * vocab * 4) as u64)?;
            super::matmul::matmul_into(ctx, head, &x.buf, rows.start + r0, m, &logits, vocab)?;
            record_softcap(ctx, &logits, m * vocab, cap)?;
            let bytes = ctx.read(&[(&logits, 0, (m * vocab * 4) as u64)])?;
            Ok(bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[0]))
        })?;
        all.extend(part);
        r0 += m;
    }
    Ok(all)
}

/// The statistics of the capped logits of `rows` (the logits never leave the device; the pass's
/// end for paged experts, as `lm_head_stats`).
pub fn lm_head_stats_softcap(
    b: &GpuBackend,
    x: &GpuAct,
    head: &GpuWeight,
    rows: std::ops::Range<usize>,
    cap: f32,
) -> Result<Vec<PositionStats>> {
    check_head("lm_head_stats_softcap", x, head, &rows, cap)?;
    super::stats::lm_head_stats_capped(b, x, head, rows, Some(cap))
}

/// Records `logits[..n] = cap · tanh(logits / cap)`.
pub(super) fn record_softcap(
    ctx: &mut Ctx,
    logits: &GpuBuffer,
    n: usize,
    cap: f32,
) -> std::result::Result<(), GpuError> {
    dispatch(ctx, &SOFTCAP, n, 0, cap, &[logits])
}

fn check_head(
    op: &'static str,
    x: &GpuAct,
    head: &GpuWeight,
    rows: &std::ops::Range<usize>,
    cap: f32,
) -> Result<()> {
    shapes::rows_within(op, rows, x.rows)?;
    shapes::head(op, (head.rows, head.cols), x.cols)?;
    if !(cap.is_finite() && cap > 0.0) {
        return Err(shape_err(
            op,
            format!("softcap {cap} is not a finite cap > 0"),
        ));
    }
    Ok(())
}
