//! The fused-norm forward on the GPU ([`Backend::fuses_norms`]): the residual stream's RMS norms
//! ride in the gemvs that read the stream (the qkv projection; the router's, which also writes the
//! normed rows for the experts) and its adds in the ops that produce them (the o projection's
//! gemv, the MoE combine), so a MoE layer runs without its two add_rms_norm dispatches. A dispatch
//! costs ~7–9 µs on an H100 whatever it does (docs/PERF.md), and these two carried one row's worth
//! of work each. Where a gemv cannot fold the norm or add in (ops/matmul.rs `gemv_fuses`), or the
//! experts are paged, each op runs the separate kernels instead: the same values. The MoE combine
//! can also carry the next norm (`moe_add_rms_norm`, off by default).

use super::super::{not_a_vector, GpuAct, GpuBackend, GpuExperts, GpuRouting, GpuWeight};
use super::matmul::{matmul_fused_into, GemvFuse};
use super::moe::{folds_residual, moe_residual};
use crate::arch::ModelConfig;
use crate::backend::{self, shapes, Backend};

/// [`Backend::fuses_norms`] on the GPU: set per pass by `begin_forward`.
pub(in crate::backend::gpu) fn fuses_norms(b: &GpuBackend) -> bool {
    b.lock().fused_norms
}

/// [`Backend::matmul_normed`] on the GPU: the gemv norms each row as it reads it.
pub(in crate::backend::gpu) fn matmul_normed(
    b: &GpuBackend,
    w: &GpuWeight,
    x: &GpuAct,
    norm: &GpuWeight,
    eps: f32,
) -> backend::Result<GpuAct> {
    shapes::norm("matmul_normed", norm.rows * norm.cols, x.cols)?;
    shapes::matmul("matmul_normed", (w.rows, w.cols), (x.rows, x.cols))?;
    let nv = norm
        .vector()
        .ok_or_else(|| not_a_vector("matmul_normed", norm))?;
    let fused = b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, x.rows, w.rows)?;
        let fuse = GemvFuse {
            norm: Some((nv, eps)),
            ..GemvFuse::default()
        };
        let done = matmul_fused_into(ctx, w, &x.buf, 0, x.rows, &out.buf, w.rows, fuse)?;
        Ok(done.then_some(out))
    })?;
    match fused {
        Some(out) => Ok(out),
        None => {
            let h = b.rms_norm(x, norm, eps)?;
            b.matmul(w, &h)
        }
    }
}

/// [`Backend::matmul_add`] on the GPU: the gemv adds its result to `x`.
pub(in crate::backend::gpu) fn matmul_add(
    b: &GpuBackend,
    w: &GpuWeight,
    a: &GpuAct,
    x: &mut GpuAct,
) -> backend::Result<()> {
    shapes::matmul("matmul_add", (w.rows, w.cols), (a.rows, a.cols))?;
    shapes::same_shape("matmul_add", (x.rows, x.cols), (a.rows, w.rows))?;
    let fuse = GemvFuse {
        accum: true,
        ..GemvFuse::default()
    };
    let done = b.with(|ctx| {
        Ok(matmul_fused_into(
            ctx, w, &a.buf, 0, a.rows, &x.buf, w.rows, fuse,
        )?)
    })?;
    if !done {
        let y = b.matmul(w, a)?;
        b.add(x, &y)?;
    }
    Ok(())
}

/// [`Backend::route_normed`] on the GPU: the router's gemv norms the rows and writes them out.
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::gpu) fn route_normed(
    b: &GpuBackend,
    x: &GpuAct,
    norm: &GpuWeight,
    eps: f32,
    router: &GpuWeight,
    bias: Option<&GpuWeight>,
    c: &ModelConfig,
    blocks: Option<&backend::BlockRouting>,
) -> backend::Result<(GpuAct, GpuRouting)> {
    shapes::norm("route_normed", norm.rows * norm.cols, x.cols)?;
    shapes::router(
        (router.rows, router.cols),
        bias.map(|b| b.rows * b.cols),
        x.cols,
        c,
    )?;
    let nv = norm
        .vector()
        .ok_or_else(|| not_a_vector("route_normed", norm))?;
    let bias_buf = match bias {
        None => None,
        Some(w) => Some(w.vector().ok_or_else(|| not_a_vector("route", w))?),
    };
    let k = c.moe.top_k;
    let fused = b.with(|ctx| {
        let h = GpuBackend::out_act(ctx, x.rows, x.cols)?;
        let ids = ctx.output((x.rows * k * 4) as u64)?;
        let weights = ctx.output((x.rows * k * 4) as u64)?;
        let fuse = GemvFuse {
            norm: Some((nv, eps)),
            hout: Some(&h.buf),
            ..GemvFuse::default()
        };
        let done = super::router::route(
            ctx,
            &x.buf,
            x.rows,
            router,
            bias_buf,
            c,
            blocks,
            (&ids, &weights),
            fuse,
        )?;
        Ok(done.then(|| {
            let routing = GpuRouting {
                rows: x.rows,
                k,
                ids,
                weights,
            };
            (h, routing)
        }))
    })?;
    match fused {
        Some(r) => Ok(r),
        None => {
            let h = b.rms_norm(x, norm, eps)?;
            let routing = b.route_rows(&h, router, bias, c, blocks)?;
            Ok((h, routing))
        }
    }
}

/// [`Backend::mlp_add`] on the GPU: the gate/up gemv norms its input and applies SwiGLU, the
/// down gemv adds into `x` (two dispatches for the sublayer's norm, MLP and add).
pub(in crate::backend::gpu) fn mlp_add(
    b: &GpuBackend,
    gate_up: &GpuWeight,
    down: &GpuWeight,
    x: &mut GpuAct,
    norm: &GpuWeight,
    eps: f32,
) -> backend::Result<()> {
    shapes::norm("mlp_add", norm.rows * norm.cols, x.cols)?;
    let inter = gate_up.rows / 2;
    let shapes_ok = gate_up.cols == x.cols
        && gate_up.rows.is_multiple_of(2)
        && down.cols == inter
        && down.rows == x.cols;
    let nv = norm.vector().ok_or_else(|| not_a_vector("mlp_add", norm))?;
    let accum = GemvFuse {
        accum: true,
        ..GemvFuse::default()
    };
    let done = shapes_ok
        && b.with(|ctx| {
            // Both halves fold in, or neither runs: the down gemv's check comes first.
            if !super::matmul::gemv_fuses(ctx, down, x.rows, &accum) {
                return Ok(false);
            }
            let h = ctx.output((x.rows * inter * 4) as u64)?;
            let normed = Some((nv, eps));
            if !super::matmul::gate_up_swiglu_into(ctx, gate_up, &x.buf, x.rows, &h, normed)? {
                return Ok(false);
            }
            let added = matmul_fused_into(ctx, down, &h, 0, x.rows, &x.buf, down.rows, accum)?;
            debug_assert!(added, "checked above");
            Ok(added)
        })?;
    if !done {
        // Shapes the separate ops name in their errors, or kernels that cannot fold these in.
        let h = b.rms_norm(x, norm, eps)?;
        let y = b.mlp(gate_up, down, &h)?;
        b.add(x, &y)?;
    }
    Ok(())
}

/// [`Backend::moe_add`] on the GPU: the combine adds the experts' sum to `x`.
pub(in crate::backend::gpu) fn moe_add(
    b: &GpuBackend,
    h: &GpuAct,
    routing: &GpuRouting,
    experts: &GpuExperts,
    shared: Option<(&GpuWeight, &GpuWeight)>,
    x: &mut GpuAct,
) -> backend::Result<()> {
    if !folds_residual(h, routing, experts, x) {
        let y = b.moe_ffn(h, routing, experts, shared)?;
        return b.add(x, &y);
    }
    moe_residual(b, (h, routing, experts), shared, &x.buf, None)
}

/// [`Backend::moe_add_rms_norm`] on the GPU.
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::gpu) fn moe_add_rms_norm(
    b: &GpuBackend,
    h: &GpuAct,
    routing: &GpuRouting,
    experts: &GpuExperts,
    shared: Option<(&GpuWeight, &GpuWeight)>,
    x: &mut GpuAct,
    norm: &GpuWeight,
    eps: f32,
) -> backend::Result<GpuAct> {
    let wv = norm.vector().filter(|_| norm.cols == x.cols);
    let fused = b.sh.dev.kernels.fuse_combine_norm;
    let Some(wv) = wv.filter(|_| fused && folds_residual(h, routing, experts, x)) else {
        // Paged experts, shapes the separate ops name in their errors, or the fusion off (the
        // default; EDGEDIFF_FUSE_COMBINE_NORM=1 turns it on).
        let y = b.moe_ffn(h, routing, experts, shared)?;
        return b.add_rms_norm(x, &y, norm, eps);
    };
    let out = b.with(|ctx| GpuBackend::out_act(ctx, h.rows, h.cols))?;
    let norm = Some((wv, eps, &*out.buf));
    moe_residual(b, (h, routing, experts), shared, &x.buf, norm)?;
    Ok(out)
}
