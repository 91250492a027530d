//! Routed experts of one layer, all on the GPU: dispatch (per-expert token lists), the grouped
//! SwiGLU expert kernels through the slot table (one pair of dispatches per pool buffer holding this
//! layer's experts), then the weighted combine. While each routed expert serves a few tokens (the
//! 1-token forward and blocks up to a few hundred tokens) the experts run as GEMV
//! (shaders/moe_gemv.wgsl, direct grids over the active-expert list, bandwidth-bound); beyond, the
//! 16 × 64 tiles of matmul.wgsl (indirect grids from the dispatch). One token over resident experts
//! needs no lists: the GEMV kernels and the combine read the router's ids directly ([`moe`]).

use bytemuck::{Pod, Zeroable};

use super::super::choice::{KernelChoice, MoeWide};
use super::super::device::GpuError;
use super::super::kernels::{
    chunk_t, depth, lanes32, q8_codes_in, q8_codes_out, row_sets, Entry, Slot::*,
};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{GpuAct, GpuBackend, GpuExperts, GpuRouting, GpuWeight};
use super::matmul::{ExpertParams, EXPERT_DOWN, EXPERT_GATE_UP};
use crate::backend::{self, shapes, Backend};
use crate::format::DType;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct MoeParams {
    pub assignments: u32,
    pub num_experts: u32,
    pub slot0: u32,
    pub layer: u32,
    pub top_k: u32,
    pub inter: u32,
    pub hidden: u32,
    pub t: u32,
    /// moe_combine_add: row of `plus` holding token 0's term (the shared expert's rows follow the
    /// assignments' when the expert kernels computed it).
    pub plus_row0: u32,
    /// moe_combine_norm: the residual norm's epsilon, and whether a `plus` row is added.
    pub eps: f32,
    pub has_plus: u32,
    /// 1: no dispatch lists (see [`moe`]'s direct path): assignment `a` is its own scratch row,
    /// and `route_meta` is the router's ids.
    pub direct: u32,
}

pub static DISPATCH: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_dispatch",
    bindings: &[
        (0, Params),
        (1, Read),
        (2, ReadWrite),
        (3, Read),
        (4, ReadWrite),
    ],
    params: "MoeParams",
};
pub static GATE_UP_GEMV: Entry = Entry {
    file: "moe_gemv.wgsl",
    name: "expert_gate_up_gemv",
    bindings: EXPERT_GEMV_BINDINGS.split_at(7).0,
    params: "ExpertParams",
};
pub static DOWN_GEMV: Entry = Entry {
    file: "moe_gemv.wgsl",
    name: "expert_down_gemv",
    bindings: EXPERT_GEMV_BINDINGS.split_at(7).0,
    params: "ExpertParams",
};
/// [`GATE_UP_GEMV`] with 16-byte weight chunks and staged tokens (shaders/moe_gemv_wide.wgsl).
pub static GATE_UP_WIDE: Entry = Entry {
    file: "moe_gemv_wide.wgsl",
    name: "expert_gate_up_wide",
    bindings: EXPERT_GEMV_BINDINGS,
    params: "ExpertParams",
};
/// [`DOWN_GEMV`] with 16-byte weight chunks and staged tokens (shaders/moe_gemv_wide.wgsl).
pub static DOWN_WIDE: Entry = Entry {
    file: "moe_gemv_wide.wgsl",
    name: "expert_down_wide",
    bindings: EXPERT_GEMV_BINDINGS,
    params: "ExpertParams",
};
/// The wide GEMV expert kernels' bindings; the word-a-lane ones bind the first seven (the wide
/// ones add the pool and the shared expert's weights again, as vec4s).
const EXPERT_GEMV_BINDINGS: &[(u32, super::super::kernels::Slot)] = &[
    (1, Read),
    (2, Read),
    (3, ReadWrite),
    (4, Read),
    (5, Read),
    (6, Params),
    (7, Read),
    (8, Read),
    (9, Read),
];
pub static COMBINE: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_combine",
    bindings: &[(0, Params), (5, Read), (6, Read), (7, Read), (8, ReadWrite)],
    params: "MoeParams",
};
pub static COMBINE_ADD: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_combine_add",
    bindings: &[
        (0, Params),
        (5, Read),
        (6, Read),
        (7, Read),
        (8, ReadWrite),
        (9, Read),
    ],
    params: "MoeParams",
};

pub static COMBINE_RESIDUAL: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_combine_residual",
    bindings: &[
        (0, Params),
        (5, Read),
        (6, Read),
        (7, Read),
        (9, Read),
        (10, ReadWrite),
    ],
    params: "MoeParams",
};

pub static COMBINE_NORM: Entry = Entry {
    file: "moe.wgsl",
    name: "moe_combine_norm",
    bindings: &[
        (0, Params),
        (5, Read),
        (6, Read),
        (7, Read),
        (8, ReadWrite),
        (9, Read),
        (10, ReadWrite),
        (11, Read),
    ],
    params: "MoeParams",
};

/// The step after a layer's MoE folded into its combine: the residual `x` (`[T, H]`) gets the
/// sum, and with a norm weight `w` the combine's output is `rms_norm(x) · w` (add_rms_norm's
/// result); without, the combine writes no output ([`COMBINE_RESIDUAL`]).
#[derive(Clone, Copy)]
pub struct ResidualNorm<'a> {
    pub x: &'a GpuBuffer,
    pub w: Option<&'a GpuBuffer>,
    pub eps: f32,
}

/// Mean tokens per routed expert (assignments / experts) up to which the experts run as GEMV: each
/// expert's weights are then read once per 4 of its tokens, from cache after the first 4, where
/// the tiles would leave most of their 16 token rows empty.
pub const GEMV_MAX_MEAN_TOKENS: usize = 8;

pub use super::super::choice::ExpertKernel;

/// The expert kernels for `rows` tokens routed to `top_k` of `experts` experts each: GEMV
/// ([`GATE_UP_GEMV`] / [`DOWN_GEMV`]) for few tokens per expert, else tiled ([`EXPERT_GATE_UP`] /
/// [`EXPERT_DOWN`]); `forced` (KernelChoice::moe) overrides it.
pub fn expert_kernel(
    forced: Option<ExpertKernel>,
    rows: usize,
    top_k: usize,
    experts: usize,
) -> ExpertKernel {
    forced.unwrap_or(if rows * top_k <= GEMV_MAX_MEAN_TOKENS * experts.max(1) {
        ExpertKernel::Gemv
    } else {
        ExpertKernel::Tiled
    })
}

/// Words of the dispatch metadata (layout in shaders/lib/moe_meta.wgsl).
pub fn meta_words(experts: usize, assignments: usize) -> usize {
    8 + 4 * experts + 2 * assignments
}

/// Where one layer's experts are and how they are shaped.
pub struct ExpertLayout<'a> {
    pub layer: usize,
    pub num_experts: usize,
    pub slot0: usize,
    pub slots: &'a GpuBuffer,
    /// (global pool index, buffer) of every pool buffer holding an expert of this layer.
    pub pools: &'a [crate::backend::gpu::experts::PoolBuffer],
    pub wtype_gate_up: u32,
    pub wtype_down: u32,
    /// Word offsets inside an expert: (gate_up, its scales rel.), (down, its scales rel.).
    pub gate_up: (u32, u32),
    pub down: (u32, u32),
    pub hidden: usize,
    pub inter: usize,
    /// The gate activation of the gate/up kernels (`kernels::gate_act`: 0 SiLU).
    pub act: u32,
    /// Every expert of the layer has a slot (loaded, none pruned or paged): a routed expert cannot
    /// be missing, so the direct path needs no residency check.
    pub all_resident: bool,
}

/// Scratch of one layer's MoE between its three stages.
pub struct MoeScratch {
    /// The dispatch lists (`None` on the direct path, which reads the router's ids instead).
    meta: Option<super::super::pool::Pooled>,
    h: super::super::pool::Pooled,
    y: super::super::pool::Pooled,
    params: MoeParams,
}

/// What a layer adds to its routed sum: nothing, the shared experts' output computed before, or
/// the shared expert's SwiGLU computed by the GEMV expert kernels alongside the routed experts
/// (see [`fuses_shared`]).
#[derive(Clone, Copy)]
pub enum Shared<'a> {
    None,
    Output(&'a GpuBuffer),
    Mlp(SharedMlp<'a>),
}

/// A shared expert's weights, each a single chunk from word 0 of its buffer, in the routed
/// experts' weight types; `inter` is the routed experts'.
#[derive(Clone, Copy)]
pub struct SharedMlp<'a> {
    /// [2I, H] (gate rows first) and the word of its scales.
    pub gate_up: (&'a GpuBuffer, u32),
    /// [H, I] and the word of its scales.
    pub down: (&'a GpuBuffer, u32),
}

/// Whether the expert kernels for `rows` tokens compute a shared expert alongside the routed ones:
/// the GEMV kernels only, with a pool buffer to run in, and for as many tokens as the dense gemv
/// serves (`gemv_max_t`: its column walks the tokens 4 at a time; past them the dense matmuls run
/// on the tiles, which a block of tokens through one expert column would not beat) and up to
/// `shared_max_t`. By the knobs, not constants: the batch classes separate passes at them
/// (ops/batch_class.rs bits 1 and 27), and a batched pass must fuse as each of its sequences
/// would alone.
pub fn fuses_shared(choice: &KernelChoice, rows: usize, top_k: usize, e: &ExpertLayout) -> bool {
    !e.pools.is_empty()
        && rows <= choice.gemv_max_t.min(choice.shared_max_t)
        && expert_kernel(choice.moe, rows, top_k, e.num_experts) == ExpertKernel::Gemv
}

/// All three stages with every pool buffer of `e` (the experts are resident, or a missing one is
/// flagged in `status` and skipped); `shared` is added to the sum, and with `norm` the sum goes
/// into the residual and `out` is its norm.
#[allow(clippy::too_many_arguments)]
pub fn moe(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    rows: usize,
    ids: &GpuBuffer,
    weights: &GpuBuffer,
    top_k: usize,
    e: &ExpertLayout,
    shared: Shared<'_>,
    out: &GpuBuffer,
    norm: Option<ResidualNorm<'_>>,
) -> Result<(), GpuError> {
    let mlp = match shared {
        Shared::Mlp(m) => Some(m),
        _ => None,
    };
    // Few tokens over resident experts in the GEMV kernels (the 1-token pass, an in-place AR
    // pass's two rows): their top_k experts are (nearly) distinct, so the per-expert lists would
    // only restate the router's ids; the expert kernels read the ids directly (grid column a =
    // assignment a, an expert shared by two tokens read twice, from cache the second time) and
    // the dispatch kernel goes. Each assignment's sums are the list path's, bit for bit.
    let direct = rows <= ctx.sh.dev.kernels.moe_direct_max_t
        && e.all_resident
        && expert_kernel(
            ctx.sh.dev.kernels.moe,
            super::matmul::solo_rows(ctx, rows),
            top_k,
            e.num_experts,
        ) == ExpertKernel::Gemv;
    let s = if direct {
        scratch(ctx, rows, top_k, e, mlp.is_some(), None)?
    } else {
        dispatch(ctx, rows, ids, top_k, e, mlp.is_some())?
    };
    let route_meta = s.meta.as_deref().unwrap_or(ids);
    experts_with(ctx, x, &s, route_meta, e, mlp.as_ref())?;
    let plus = match shared {
        Shared::None => None,
        Shared::Output(p) => Some((p, 0)),
        Shared::Mlp(_) => Some((&*s.y, s.params.assignments)),
    };
    combine_with(ctx, &s, route_meta, weights, plus, out, norm)
}

/// Stage 1: per-expert token lists and indirect grids from the routing. With `shared`, the scratch
/// holds `rows` more rows for the shared expert after the assignments'.
pub fn dispatch(
    ctx: &mut Ctx,
    rows: usize,
    ids: &GpuBuffer,
    top_k: usize,
    e: &ExpertLayout,
    shared: bool,
) -> Result<MoeScratch, GpuError> {
    let meta = ctx.output((meta_words(e.num_experts, rows * top_k) * 4) as u64)?;
    let s = scratch(ctx, rows, top_k, e, shared, Some(meta))?;
    let status = ctx.sh.status.clone();
    let meta = s.meta.as_deref().expect("given above");
    ctx.dispatch(
        &DISPATCH,
        0,
        &s.params,
        None,
        &[ids, meta, e.slots, &status],
        Grid::Groups(1, 1, 1),
    )?;
    Ok(s)
}

/// The scratch rows of a layer's MoE (`meta`: the dispatch lists, `None` on the direct path).
fn scratch(
    ctx: &mut Ctx,
    rows: usize,
    top_k: usize,
    e: &ExpertLayout,
    shared: bool,
    meta: Option<super::super::pool::Pooled>,
) -> Result<MoeScratch, GpuError> {
    let a = rows * top_k;
    let scratch_rows = a + if shared { rows } else { 0 };
    let h = ctx.output((scratch_rows * e.inter * 4) as u64)?;
    let y = ctx.output((scratch_rows * e.hidden * 4) as u64)?;
    let params = MoeParams {
        assignments: a as u32,
        num_experts: e.num_experts as u32,
        slot0: e.slot0 as u32,
        layer: e.layer as u32,
        top_k: top_k as u32,
        inter: e.inter as u32,
        hidden: e.hidden as u32,
        t: rows as u32,
        plus_row0: 0,
        eps: 0.0,
        has_plus: 0,
        direct: meta.is_none() as u32,
    };
    Ok(MoeScratch { meta, h, y, params })
}

/// Stage 2: the SwiGLU of every routed expert resident in one of `e.pools`, into the scratch's
/// per-assignment rows. Experts without a slot are skipped, so paging can run this once per group
/// of experts it brings in, all into the same rows.
pub fn experts(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    s: &MoeScratch,
    e: &ExpertLayout,
    shared: Option<&SharedMlp>,
) -> Result<(), GpuError> {
    let meta = s.meta.as_deref().ok_or_else(no_lists)?;
    experts_with(ctx, x, s, meta, e, shared)
}

/// A direct-path scratch given where lists are needed (a bug, never input).
fn no_lists() -> GpuError {
    GpuError::Unsupported("MoE stages without dispatch lists outside the direct path".into())
}

/// [`experts`] reading `meta`: the dispatch lists, or on the direct path the router's ids.
fn experts_with(
    ctx: &mut Ctx,
    x: &GpuBuffer,
    s: &MoeScratch,
    meta: &GpuBuffer,
    e: &ExpertLayout,
    shared: Option<&SharedMlp>,
) -> Result<(), GpuError> {
    let (top_k, a) = (s.params.top_k, s.params.assignments);
    let direct = s.params.direct;
    let (h, y) = (&*s.h, &*s.y);
    // A batched pass chooses as one sequence's pass alone (see matmul::pass_kernel): the GEMV
    // and the tiled kernels each sum a token the same way however many tokens an expert serves.
    let solo = super::matmul::solo_rows(ctx, s.params.t as usize);
    let kernel = expert_kernel(ctx.sh.dev.kernels.moe, solo, top_k as usize, e.num_experts);
    // GEMV grids: (active-expert list entries, weight-row blocks); the list has at most
    // min(assignments, experts) entries; the direct path has a column per assignment.
    let listed = if direct != 0 {
        a
    } else {
        a.min(e.num_experts as u32)
    };
    if direct != 0 && kernel != ExpertKernel::Gemv {
        return Err(no_lists());
    }
    if shared.is_some() && (kernel != ExpertKernel::Gemv || e.pools.is_empty()) {
        return Err(GpuError::Unsupported(
            "a shared expert outside the GEMV expert kernels".into(),
        ));
    }
    let row_blocks = ctx.sh.dev.kernels.moe_gemv_blocks.max(1) as u32;
    // The wide expert kernels (down, or both stages: MoeWide) from the rows where the dense gemvs
    // go wide: below them (one- and two-row passes, AR) the word-a-lane kernel is faster (H100, 2026-12-06: 3.03 → 2.95 ms a
    // 1-token pass, 3.98 → 3.83 at 2 rows), and one threshold keeps the batch classes as they are
    // (ops/batch_class.rs bit 24).
    let wide_rows = ctx
        .sh
        .dev
        .kernels
        .gemv_wide_min_t
        .is_some_and(|m| solo >= m);
    // The wide kernels (16-byte chunks) where the weight type and row length suit them and the
    // part starts on a 16-byte boundary of its slot (the shared expert's buffers start at 0).
    let wide = |wtype: u32, k: usize, part: u32, down: bool| {
        let dtype = match wtype & 0xff {
            2 => DType::Q8,
            3 => DType::Q4,
            _ => return None,
        };
        let on = match ctx.sh.dev.kernels.moe_wide {
            MoeWide::Off => false,
            MoeWide::Down => down && wide_rows,
            MoeWide::Blocks => wide_rows,
            MoeWide::All => true,
        };
        let ok = kernel == ExpertKernel::Gemv && on && part.is_multiple_of(4);
        // q4 experts with 8-bit activations: their own token block and pipeline bit.
        let choice = &ctx.sh.dev.kernels;
        super::matmul::wide_shape(choice, dtype, k)
            .filter(|_| ok)
            .map(|(lanes, tile)| {
                let (tile, bit) = super::matmul::wide_q8(choice, dtype, k).unwrap_or((tile, 0));
                (lanes, tile, bit)
            })
    };
    let stages = [
        (
            &EXPERT_GATE_UP,
            &GATE_UP_GEMV,
            &GATE_UP_WIDE,
            // The gate activation rides in the weight-type argument (kernels::gate_act).
            e.wtype_gate_up | e.act,
            (e.hidden, e.inter),
            e.gate_up,
            (x, h),
            0,
            ((e.inter as u32).div_ceil(2), e.inter as u32, 256),
            shared.map(|m| m.gate_up),
        ),
        (
            &EXPERT_DOWN,
            &DOWN_GEMV,
            &DOWN_WIDE,
            e.wtype_down,
            (e.inter, e.hidden),
            e.down,
            (h, y),
            12,
            ((e.hidden as u32).div_ceil(4), e.hidden as u32, 512),
            shared.map(|m| m.down),
        ),
    ];
    // (lanes, tile, 8-bit bit) of each stage's wide kernel.
    let wides = stages.map(|st| wide(st.3, st.4 .0, st.5 .0, std::ptr::eq(st.2, &DOWN_WIDE)));
    // With codes made once, gate/up writes down's codes itself (moe_gemv_wide.wgsl QCODES_OUT)
    // where a workgroup's 256 / L columns are whole 32-value chunks and tile the rows: one
    // q8_codes dispatch fewer.
    let codes_out = ctx.sh.dev.kernels.moe_q8_once
        && match wides {
            [Some((lanes, _, q0)), Some((_, _, q1))] => {
                let cols = 256 / lanes as usize;
                q0 != 0 && q1 != 0 && cols.is_multiple_of(32) && e.inter.is_multiple_of(cols)
            }
            _ => false,
        };
    for (
        stage,
        (tiled, gemv, gemv_wide, wtype, (k, n), (part, scales), (src, dst), args, blocks, sw),
    ) in stages.into_iter().enumerate()
    {
        // (lanes, tile) of the wide kernel (stage 1: down); its grid's y: `units` columns or rows,
        // `per_lanes` / L a workgroup.
        let wide = wides[stage];
        // The stage's rows as 8-bit codes made once (the tokens' for gate/up, the assignments'
        // and the shared expert's for down), which every workgroup then copies instead of
        // quantizing its tokens' floats again: the same bits.
        let codes = match wide {
            Some(_) if stage == 1 && codes_out => None,
            Some((_, tile, q8)) if q8 != 0 && ctx.sh.dev.kernels.moe_q8_once => {
                let t = s.params.t as usize;
                let rows = if stage == 0 {
                    t
                } else {
                    a as usize + if shared.is_some() { t } else { 0 }
                };
                let code_type = (wtype & 0xff) | q8;
                let c = super::matmul::q8_codes(ctx, code_type, k, src, 0, rows, tile, None)?;
                Some(c)
            }
            _ => None,
        };
        let src = codes.as_deref().unwrap_or(src);
        // The pipeline bits: codes in (made above, or down reading those gate/up wrote into h),
        // and gate/up writing down's.
        let code_bits = if codes.is_some() || (stage == 1 && codes_out) {
            q8_codes_in()
        } else {
            0
        } | if stage == 0 && codes_out {
            q8_codes_out()
        } else {
            0
        };
        let (blocks, units, per_lanes) = blocks;
        for (i, crate::backend::gpu::experts::PoolBuffer { index: pool, buf }) in
            e.pools.iter().enumerate()
        {
            // The shared expert runs once, as the extra grid column of the first pool's dispatch.
            let sw = sw.filter(|_| i == 0);
            let p = ExpertParams {
                slot0: e.slot0 as u32,
                num_experts: e.num_experts as u32,
                pool: *pool,
                top_k,
                k: k as u32,
                n: n as u32,
                part,
                scales,
                assignments: a,
                shared_x: sw.map_or(u32::MAX, |_| listed),
                shared_scales: sw.map_or(0, |(_, sc)| sc),
                tokens: s.params.t,
                direct,
                row_blocks,
                lanes: wide.map_or(0, |w| w.0),
                tile_t: wide.map_or(0, |w| w.1),
            };
            match (kernel, wide) {
                (ExpertKernel::Gemv, Some((lanes, _, q8))) => {
                    let shared_buf = sw.map_or(&**buf, |(b, _)| b);
                    let bufs = [&**buf, src, dst, e.slots, meta, shared_buf, buf, shared_buf];
                    let columns = listed + u32::from(sw.is_some());
                    // Row sets a workgroup (KernelChoice::moe_row_sets): the same sums.
                    let sets = ctx.sh.dev.kernels.moe_row_sets.clamp(1, 4);
                    let grid = Grid::Groups(columns, units.div_ceil(per_lanes / lanes * sets), 1);
                    let sets_bit = if sets > 1 { row_sets(sets) } else { 0 };
                    let wtype = wtype | q8 | code_bits | sets_bit;
                    ctx.dispatch(gemv_wide, wtype, &p, None, &bufs, grid)?
                }
                (ExpertKernel::Gemv, None) => {
                    let shared_buf = sw.map_or(&**buf, |(b, _)| b);
                    let bufs = [&**buf, src, dst, e.slots, meta, shared_buf];
                    let columns = listed + u32::from(sw.is_some());
                    // The direct path's columns serve one token each (the shared expert's loops
                    // over the pass's few).
                    let choice = &ctx.sh.dev.kernels;
                    let chunk = if direct != 0 && choice.lean_one {
                        1
                    } else {
                        choice.moe_chunk
                    };
                    // One-row passes may take 32 lanes a row (KernelChoice::moe_gemv1_lanes).
                    let lanes = if solo == 1 && choice.moe_gemv1_lanes == 32 {
                        lanes32()
                    } else {
                        0
                    };
                    ctx.dispatch(
                        gemv,
                        wtype | chunk_t(chunk) | depth(choice.gemv_depth) | lanes,
                        &p,
                        None,
                        &bufs,
                        Grid::Groups(columns, blocks.div_ceil(row_blocks), 1),
                    )?
                }
                (ExpertKernel::Tiled, _) => {
                    let bufs = [&**buf, src, dst, e.slots, meta];
                    ctx.dispatch(tiled, wtype, &p, None, &bufs, Grid::Indirect(meta, args))?
                }
            }
        }
    }
    Ok(())
}

/// Stage 3: the weighted sum of each token's expert rows, in routing order, plus `plus` when given
/// (the same sum, then one add: what a separate add kernel would compute): `(buffer, row of token
/// 0)`; with `norm`, added to its residual and normed (one workgroup per token).
pub fn combine(
    ctx: &mut Ctx,
    s: &MoeScratch,
    weights: &GpuBuffer,
    plus: Option<(&GpuBuffer, u32)>,
    out: &GpuBuffer,
    norm: Option<ResidualNorm<'_>>,
) -> Result<(), GpuError> {
    let meta = s.meta.as_deref().ok_or_else(no_lists)?;
    combine_with(ctx, s, meta, weights, plus, out, norm)
}

/// [`combine`] reading `meta`: the dispatch lists, or on the direct path the router's ids.
fn combine_with(
    ctx: &mut Ctx,
    s: &MoeScratch,
    meta: &GpuBuffer,
    weights: &GpuBuffer,
    plus: Option<(&GpuBuffer, u32)>,
    out: &GpuBuffer,
    norm: Option<ResidualNorm<'_>>,
) -> Result<(), GpuError> {
    let mut mp = s.params;
    mp.plus_row0 = plus.map_or(0, |(_, r)| r);
    if let Some(ResidualNorm { x, w: None, .. }) = norm {
        mp.has_plus = plus.is_some() as u32;
        let dummy = ctx.sh.dummies[0].clone();
        let p = plus.map_or(&*dummy, |(p, _)| p);
        let grid = Grid::Linear(((mp.t * mp.hidden) as u64).div_ceil(64));
        let bufs = [meta, weights, &s.y, p, x];
        return ctx.dispatch(&COMBINE_RESIDUAL, 0, &mp, None, &bufs, grid);
    }
    if let Some(ResidualNorm { x, w: Some(w), eps }) = norm {
        mp.eps = eps;
        mp.has_plus = plus.is_some() as u32;
        let dummy = ctx.sh.dummies[0].clone();
        let p = plus.map_or(&*dummy, |(p, _)| p);
        return ctx.dispatch(
            &COMBINE_NORM,
            0,
            &mp,
            None,
            &[meta, weights, &s.y, out, p, x, w],
            Grid::Groups(mp.t, 1, 1),
        );
    }
    let plus = plus.map(|(p, _)| p);
    let grid = Grid::Linear(((mp.t * mp.hidden) as u64).div_ceil(64));
    match plus {
        None => ctx.dispatch(&COMBINE, 0, &mp, None, &[meta, weights, &s.y, out], grid),
        Some(p) => ctx.dispatch(
            &COMBINE_ADD,
            0,
            &mp,
            None,
            &[meta, weights, &s.y, out, p],
            grid,
        ),
    }
}

/// Whether a layer's MoE can fold its residual step into the combine ([`moe_residual`]): the
/// experts resident (a paged layer's combine runs after the pager's groups) and the shapes agreeing
/// (the separate ops name the others in their errors).
pub(in crate::backend::gpu) fn folds_residual(
    h: &GpuAct,
    routing: &GpuRouting,
    experts: &GpuExperts,
    x: &GpuAct,
) -> bool {
    experts.paged.is_none()
        && (x.rows, x.cols) == (h.rows, h.cols)
        && h.cols == experts.hidden
        && routing.rows == h.rows
}

/// The layer's MoE (its shared experts included) with the residual step in its combine
/// ([`ResidualNorm`]): `x +=` the experts' sum, and with `norm` = (weight, eps, out) also
/// `out = rms_norm(x) · weight`. Where [`folds_residual`] holds.
pub(in crate::backend::gpu) fn moe_residual(
    b: &GpuBackend,
    (h, routing, experts): (&GpuAct, &GpuRouting, &GpuExperts),
    shared: Option<(&GpuWeight, &GpuWeight)>,
    x: &GpuBuffer,
    norm: Option<(&GpuBuffer, f32, &GpuBuffer)>,
) -> backend::Result<()> {
    let layout = experts.layout(&experts.store.slots, &experts.pools);
    let ys;
    let kind = match shared {
        None => Shared::None,
        Some((gate_up, down)) => {
            let rows = b.lock().batch_rows.map_or(h.rows, |r| r.min(h.rows));
            match GpuBackend::fused_shared(&b.sh, rows, h, routing, experts, &layout, gate_up, down)
            {
                Some(m) => Shared::Mlp(m),
                None => {
                    ys = b.mlp(gate_up, down, h)?;
                    Shared::Output(&ys.buf)
                }
            }
        }
    };
    b.with(|ctx| {
        // Without a norm the combine writes no output of its own.
        let unused = ctx.sh.dummies[2].clone();
        let then = ResidualNorm {
            x,
            w: norm.map(|(w, _, _)| w),
            eps: norm.map_or(0.0, |(_, e, _)| e),
        };
        moe(
            ctx,
            &h.buf,
            h.rows,
            &routing.ids,
            &routing.weights,
            routing.k,
            &layout,
            kind,
            norm.map_or(&*unused, |(_, _, out)| out),
            Some(then),
        )?;
        Ok(())
    })
}

/// [`Backend::moe_shared_mlp`] on the GPU.
pub(in crate::backend::gpu) fn moe_shared_mlp(
    b: &GpuBackend,
    x: &GpuAct,
    routing: &GpuRouting,
    experts: &GpuExperts,
    gate_up: &GpuWeight,
    down: &GpuWeight,
) -> backend::Result<GpuAct> {
    let layout = experts.layout(&experts.store.slots, &experts.pools);
    let rows = b.lock().batch_rows.map_or(x.rows, |b| b.min(x.rows));
    match GpuBackend::fused_shared(&b.sh, rows, x, routing, experts, &layout, gate_up, down) {
        Some(m) => b.with(|ctx| GpuBackend::moe_act(ctx, x, routing, &layout, Shared::Mlp(m))),
        None => {
            let ys = b.mlp(gate_up, down, x)?;
            b.moe_plus_shared(x, routing, experts, &ys)
        }
    }
}

/// [`Backend::moe_plus_shared`] on the GPU.
pub(in crate::backend::gpu) fn moe_plus_shared(
    b: &GpuBackend,
    x: &GpuAct,
    routing: &GpuRouting,
    experts: &GpuExperts,
    shared: &GpuAct,
) -> backend::Result<GpuAct> {
    shapes::same_shape(
        "moe_plus_shared",
        (x.rows, x.cols),
        (shared.rows, shared.cols),
    )?;
    b.moe_with(x, routing, experts, Some(&*shared.buf))
}
