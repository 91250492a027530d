//! y = x · Wᵀ for weights in file layout: gemv (shaders/gemv.wgsl) for up to 4 activation rows,
//! and up to 16 (blocks of 4 along the grid's z) where the weight stays in L2 between blocks;
//! 16 × 64 tiles (shaders/matmul.wgsl) beyond; the grouped expert kernels of the same file are dispatched by moe.rs.
//! f16, q8 and q4 weights against `KernelChoice::coop_min_t` activation rows or more, past the gemv cases, run
//! on the tensor cores (shaders/matmul_coop.wgsl, 16, 32 or 64 × 128 tiles) where the device lends
//! cooperative matrices.

use bytemuck::{Pod, Zeroable};

use super::super::choice::KernelChoice;
use super::super::device::GpuError;
use super::super::kernels::{chunk_t, depth, q8_act, row_sets, Entry, Slot, Slot::*};
use super::super::pool::{GpuBuffer, Pooled};
use super::super::recorder::{Ctx, Grid};
use super::super::GpuWeight;
use super::super::{GpuAct, GpuBackend};
use crate::backend;
use crate::backend::shapes::{self, shape_err};
use crate::format::DType;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct MatmulParams {
    pub n: u32,
    pub k: u32,
    pub t: u32,
    pub scales: u32,
    pub x_row0: u32,
    pub out_stride: u32,
    pub out_col0: u32,
    /// [`GEMM_COOP`]'s activation rows a tile (16, 32 or 64); unused by the other entries.
    pub tile_t: u32,
    /// [`GEMM_COOP`] split along K: values per split (0: no split), its partial rows' stride.
    pub k_chunk: u32,
    pub split_rows: u32,
    /// [`SPLIT_SUM`]: partials to add.
    pub splits: u32,
    /// [`GEMV_WIDE`]: invocations per weight row (16 or 64; [`wide_gemv`]).
    pub lanes: u32,
    /// The gemvs' fusions ([`GemvFuse`]): the norm's epsilon, [`MODE_NORM`] | [`MODE_ACCUM`] |
    /// [`MODE_HOUT`].
    pub norm_eps: f32,
    pub mode: u32,
    pub _pad: [u32; 2],
}

/// [`MatmulParams::mode`]: the activation rows enter RMS-normed.
pub const MODE_NORM: u32 = 1;
/// [`MatmulParams::mode`]: the result adds to the output (a residual).
pub const MODE_ACCUM: u32 = 2;
/// [`MatmulParams::mode`] ([`GEMV_WIDE`]): the normed rows are written too.
pub const MODE_HOUT: u32 = 4;
/// [`MatmulParams::mode`] ([`GEMV_WIDE`], [`GEMV_WIDE_SWIGLU`] with 8-bit activations): the
/// activation buffer holds [`Q8_CODES`]' codes of the rows (made under the same norm).
pub const MODE_CODES: u32 = 8;

/// What a gemv folds in besides the product (shaders/lib/matmul_params.wgsl `mode`), so the
/// layer needs no norm or add dispatch of its own: the fused-norm forward
/// ([`crate::backend::Backend::fuses_norms`]).
#[derive(Clone, Copy, Default)]
pub struct GemvFuse<'a> {
    /// The activation rows enter as rms_norm(x) · weight (`k` values), with this epsilon.
    pub norm: Option<(&'a GpuBuffer, f32)>,
    /// The result adds to the output instead of replacing it.
    pub accum: bool,
    /// With `norm`: the normed rows (`[t, k]`) are written here too ([`GEMV_WIDE`] only).
    pub hout: Option<&'a GpuBuffer>,
}

impl GemvFuse<'_> {
    fn any(&self) -> bool {
        self.norm.is_some() || self.accum || self.hout.is_some()
    }

    fn mode(&self) -> u32 {
        (if self.norm.is_some() { MODE_NORM } else { 0 })
            | (if self.accum { MODE_ACCUM } else { 0 })
            | (if self.hout.is_some() { MODE_HOUT } else { 0 })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct ExpertParams {
    pub slot0: u32,
    pub num_experts: u32,
    pub pool: u32,
    pub top_k: u32,
    pub k: u32,
    pub n: u32,
    pub part: u32,
    pub scales: u32,
    pub assignments: u32,
    /// The GEMV kernels' shared expert (shaders/moe_gemv.wgsl): its grid column (`u32::MAX`:
    /// none), its scales' word in its own binding, the tokens it serves.
    pub shared_x: u32,
    pub shared_scales: u32,
    pub tokens: u32,
    /// The GEMV kernels' direct path (ops/moe.rs `moe`): grid column a is assignment a, and the
    /// `route_meta` binding holds the router's ids instead of the dispatch lists.
    pub direct: u32,
    /// The GEMV kernels' weight-row blocks per workgroup (≥ 1; the grid's y shrinks by it).
    pub row_blocks: u32,
    /// The wide GEMV expert kernels (shaders/moe_gemv_wide.wgsl): invocations per weight row,
    /// tokens a staged block ([`wide_gemv`]).
    pub lanes: u32,
    pub tile_t: u32,
}

/// The word-a-lane gemvs' bindings: params, weights, activations, output, the norm weight.
const GEMV_BINDINGS: &[(u32, Slot)] =
    &[(0, Params), (1, Read), (2, Read), (3, ReadWrite), (4, Read)];
/// The wide gemvs': those, the weights again as words (scales), the normed rows' output.
const WIDE_BINDINGS: &[(u32, Slot)] = &[
    (0, Params),
    (1, Read),
    (2, Read),
    (3, ReadWrite),
    (4, Read),
    (5, Read),
    (6, ReadWrite),
];

pub static GEMV: Entry = Entry {
    file: "gemv.wgsl",
    name: "gemv",
    bindings: GEMV_BINDINGS,
    params: "MatmulParams",
};
/// [`GEMV`] over a fused [gate; up] weight, writing silu(gate) · up.
pub static GEMV_SWIGLU: Entry = Entry {
    file: "gemv.wgsl",
    name: "gemv_swiglu",
    bindings: GEMV_BINDINGS,
    params: "MatmulParams",
};
pub static GEMM: Entry = Entry {
    file: "matmul.wgsl",
    name: "gemm",
    bindings: &[(0, Params), (1, Read), (2, Read), (3, ReadWrite)],
    params: "MatmulParams",
};
pub static GEMM_COOP: Entry = Entry {
    file: "matmul_coop.wgsl",
    name: "gemm_coop",
    bindings: &[(0, Params), (1, Read), (2, Read), (3, ReadWrite)],
    params: "MatmulParams",
};
/// The q4/q8 gemv with 16-byte chunk loads and staged activations (shaders/gemv_wide.wgsl).
pub static GEMV_WIDE: Entry = Entry {
    file: "gemv_wide.wgsl",
    name: "gemv_wide",
    bindings: WIDE_BINDINGS,
    params: "MatmulParams",
};
/// [`GEMV_WIDE`] over a fused [gate; up] weight, writing silu(gate) · up.
pub static GEMV_WIDE_SWIGLU: Entry = Entry {
    file: "gemv_wide.wgsl",
    name: "gemv_wide_swiglu",
    bindings: WIDE_BINDINGS,
    params: "MatmulParams",
};
/// The 8-bit activation codes of a wide q4 gemv's rows, made once for all its workgroups
/// (gemv_wide.wgsl `q8_codes`): params, activations, the norm weight, the codes.
pub static Q8_CODES: Entry = Entry {
    file: "gemv_wide.wgsl",
    name: "q8_codes",
    bindings: &[(0, Params), (2, Read), (5, Read), (6, ReadWrite)],
    params: "MatmulParams",
};

/// Adds the K-split partials of [`GEMM_COOP`] (matmul.wgsl).
pub static SPLIT_SUM: Entry = Entry {
    file: "matmul.wgsl",
    name: "split_sum",
    bindings: &[(0, Params), (2, Read), (3, ReadWrite)],
    params: "MatmulParams",
};
pub static EXPERT_GATE_UP: Entry = Entry {
    file: "matmul.wgsl",
    name: "expert_gate_up",
    bindings: &[
        (1, Read),
        (2, Read),
        (3, ReadWrite),
        (4, Read),
        (5, Read),
        (6, Params),
    ],
    params: "ExpertParams",
};
pub static EXPERT_DOWN: Entry = Entry {
    file: "matmul.wgsl",
    name: "expert_down",
    bindings: &[
        (1, Read),
        (2, Read),
        (3, ReadWrite),
        (4, Read),
        (5, Read),
        (6, Params),
    ],
    params: "ExpertParams",
};

/// Activation rows per gemv workgroup (its token block).
pub const GEMV_T: usize = 4;
/// Activation rows up to which the gemv entry runs in token blocks along z (H100: 16 tokens × 3072
/// × 2048 q4 194 → 69 µs against the tiles; at 64 tokens, or for the 161 MB LM head, the tiles win).
pub const GEMV_MAX_T: usize = 16;
/// Weight bytes up to which token blocks re-read the weight from L2 rather than memory (the
/// default of [`KernelChoice::gemv_blocked_max_bytes`]).
pub const GEMV_BLOCKED_MAX_BYTES: u64 = 16 << 20;

/// Activation values [`GEMV_WIDE`] stages in shared memory (its 16 KB): a token block of
/// `WIDE_STAGE / k` rows (at most [`GEMV_T`]), so rows of more than this many values take [`GEMV`]
/// — unless they stage as 8-bit codes ([`WIDE_Q8_STAGE`]).
pub const WIDE_STAGE: usize = 4096;

/// The longest q4 rows the dense wide gemv takes with 8-bit activations: a 32-value chunk stages
/// as 3 vec4s, so one token of up to 10,912 values fits the 1,024 vec4s (a dense MLP's down
/// projection of 5,120: two tokens a block, where the float staging takes none and the pass fell
/// back to the word-a-lane gemv: 134 µs for 32 rows on the H100; [`KernelChoice::wide_long`]).
/// Codes made once stay at [`WIDE_STAGE`] (`codes_once`); the expert kernels keep
/// [`wide_shape`]'s bound.
pub const WIDE_Q8_STAGE: usize = 10_912;

/// (Invocations per weight row, activation rows per workgroup) of [`GEMV_WIDE`] for a `dtype`
/// weight of `rows` × `k` in a pass whose sequences have `solo` rows each; `None` where the
/// word-a-lane [`GEMV`] serves: q4/q8 weights in passes of too few rows
/// ([`KernelChoice::gemv_wide_min_t`]; a one-row pass's LM head under
/// [`KernelChoice::wide_head1`] excepted), f32 ones with [`KernelChoice::gemv_wide_f32`] off, f16
/// weights, rows of fewer than 16 chunks of 16 bytes (too short to spread) or past
/// [`WIDE_STAGE`] (q4 rows staged as 8-bit codes: past [`WIDE_Q8_STAGE`], `dense_wide_shape`).
/// [`KernelChoice::wide_dense_lanes`] sets the lanes of q4/q8 matrices but the LM head.
pub fn wide_gemv(
    choice: &KernelChoice,
    dtype: DType,
    k: usize,
    solo: usize,
    rows: usize,
) -> Option<(u32, u32)> {
    let rows_ok = match dtype {
        DType::F32 => choice.gemv_wide_f32,
        _ => choice.gemv_wide_min_t.is_some_and(|m| solo >= m),
    };
    // One-row passes keep the word-a-lane gemv (faster for them), but for the matrices the wide
    // one reads once (the LM head) where KernelChoice::wide_head1 asks for it.
    let head1 = |&(lanes, _): &(u32, u32)| {
        solo == 1
            && choice.wide_head1
            && dtype != DType::F32
            && wide_reads_once(choice, rows, lanes)
    };
    let shape = dense_wide_shape(choice, dtype, k).filter(|s| rows_ok || head1(s));
    match shape {
        Some((_, tile)) if dtype == DType::F32 && solo == 1 => Some((choice.wide_f32_lanes1, tile)),
        // The matrices it reads once (the LM head) keep the experts' lanes: more would multiply
        // their workgroups and so the staging of every token block.
        Some((lanes, tile))
            if dtype != DType::F32
                && choice.wide_dense_lanes != 0
                && !wide_reads_once(choice, rows, lanes) =>
        {
            Some((choice.wide_dense_lanes, tile))
        }
        _ => shape,
    }
}

/// Row sets a gemv_wide workgroup works against each staged block ([`KernelChoice::wide_row_sets`])
/// for `rows` weight rows at `lanes` a row and `t` activation rows in blocks of `tile`: more than
/// one only for a matrix the grid reads once ([`wide_reads_once`]: the LM head) over more than one
/// block. Which workgroup sums a row changes no sum, so any choice keeps the bits.
pub fn wide_row_sets(choice: &KernelChoice, rows: usize, lanes: u32, t: usize, tile: u32) -> u32 {
    if choice.wide_row_sets > 1 && t > tile as usize && wide_reads_once(choice, rows, lanes) {
        choice.wide_row_sets.min(4)
    } else {
        1
    }
}

/// [`wide_gemv`]'s shape whatever the rows (the expert kernels choose by a knob of their own).
/// f32 weights (the routers: few rows, long) take 64 lanes a row, so their few rows still spread
/// over the GPU.
pub fn wide_shape(choice: &KernelChoice, dtype: DType, k: usize) -> Option<(u32, u32)> {
    let (vals, lanes) = match dtype {
        DType::Q4 => (32, row_lanes(choice, k / 32)),
        DType::Q8 => (16, row_lanes(choice, k / 16)),
        DType::F32 => (4, 64),
        _ => return None,
    };
    if !k.is_multiple_of(vals) || k > WIDE_STAGE || k / vals < 16 {
        return None;
    }
    Some((lanes, (WIDE_STAGE / k).min(GEMV_T) as u32))
}

/// [`wide_shape`], and q4 rows past [`WIDE_STAGE`] up to [`WIDE_Q8_STAGE`] where 8-bit activations
/// stage them ([`KernelChoice::wide_long`]; [`wide_q8`] then gives the block).
fn dense_wide_shape(choice: &KernelChoice, dtype: DType, k: usize) -> Option<(u32, u32)> {
    let long = choice.wide_long
        && k > WIDE_STAGE
        && k <= WIDE_Q8_STAGE
        && k.is_multiple_of(32)
        && wide_q8(choice, dtype, k).is_some();
    if long {
        return Some((row_lanes(choice, k / 32), wide_q8_tile(k)));
    }
    wide_shape(choice, dtype, k)
}

/// Lanes a weight row of `chunks` 16-byte chunks takes in the wide kernels: `wide_lanes`, halved
/// (down to 4) while a lane would get fewer than [`KernelChoice::wide_min_chunks`] chunks, so a
/// short row (the experts' down projection: 16 chunks) has lanes with more than one chunk each and
/// a workgroup more rows to share its staging.
pub fn row_lanes(choice: &KernelChoice, chunks: usize) -> u32 {
    let mut lanes = choice.wide_lanes;
    while lanes > 4 && (chunks as u32) < lanes * choice.wide_min_chunks {
        lanes /= 2;
    }
    lanes
}

/// The token block of a wide q4 kernel with 8-bit activations ([`KernelChoice::wide_q8_act`]):
/// a (token, 32-value chunk) stages as three vec4s (codes, codes, scale) where floats take eight,
/// so rows of 2048 stage four tokens at a time instead of two.
fn wide_q8_tile(k: usize) -> u32 {
    ((WIDE_STAGE / 4) / (3 * k / 32).max(1)).clamp(1, GEMV_T) as u32
}

/// Where a wide kernel over `dtype` rows of `k` values takes 8-bit activations
/// ([`KernelChoice::wide_q8_act`]: q4 weights), its token block and the bit of the weight-type
/// argument that selects the pipeline ([`q8_act`]); `None`: float activations.
pub fn wide_q8(choice: &KernelChoice, dtype: DType, k: usize) -> Option<(u32, u32)> {
    (choice.wide_q8_act && dtype == DType::Q4).then(|| (wide_q8_tile(k), q8_act()))
}

/// Whether a dense wide gemv over rows of `k` values takes its codes from [`q8_codes`]
/// ([`KernelChoice::wide_q8_once`]): that kernel gives a row's chunks an invocation each, so rows
/// past [`WIDE_STAGE`] (the long rows of [`WIDE_Q8_STAGE`]) make theirs in place.
fn codes_once(choice: &KernelChoice, k: usize) -> bool {
    choice.wide_q8_once && k <= WIDE_STAGE
}

/// The 8-bit codes of `t` activation rows of `x` from row `x_row0`, `k` values each (normed by
/// `norm` where given), as the wide kernels with token blocks of `tile` stage them, bit for bit
/// ([`Q8_CODES`]: a workgroup a row): rows of `3 · k / 32` vec4s from 0, which a wide q4 kernel
/// then copies (gemv_wide's [`MODE_CODES`], the expert kernels' `QCODES`) instead of every
/// workgroup making them again. `wtype`: the consuming kernel's (its weight type and
/// [`q8_act`] bit).
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::gpu) fn q8_codes(
    ctx: &mut Ctx,
    wtype: u32,
    k: usize,
    x: &GpuBuffer,
    x_row0: usize,
    t: usize,
    tile: u32,
    norm: Option<(&GpuBuffer, f32)>,
) -> Result<Pooled, GpuError> {
    let codes = ctx.output((t * 3 * (k / 32) * 16) as u64)?;
    let p = MatmulParams {
        k: k as u32,
        t: t as u32,
        x_row0: x_row0 as u32,
        tile_t: tile,
        norm_eps: norm.map_or(0.0, |(_, e)| e),
        mode: if norm.is_some() { MODE_NORM } else { 0 },
        ..Zeroable::zeroed()
    };
    let dummy = ctx.sh.dummies[0].clone();
    let norm_w = norm.map_or(&*dummy, |(b, _)| b);
    let grid = folded_grid(t as u64, 1);
    ctx.dispatch(&Q8_CODES, wtype, &p, None, &[x, norm_w, &codes], grid)?;
    Ok(codes)
}

/// Invocations per weight row of [`GEMV`] for a pass whose sequences have `solo` rows.
pub fn gemv_lanes(choice: &KernelChoice, solo: usize) -> u32 {
    if solo == 1 {
        choice.gemv1_lanes
    } else {
        16
    }
}

/// Workgroups a tensor-core matmul aims at before it splits along K (an H200 has 132 SMs; fewer
/// than this many tiles leave most of a large GPU idle through the whole K loop).
pub const COOP_TARGET_WORKGROUPS: usize = 128;
/// Each split keeps at least this many K values (8 steps of 32), so its partial's traffic stays
/// small against its weights.
pub const COOP_MIN_SPLIT_K: usize = 256;

/// (K values per split, splits) for a tensor-core matmul of `tiles` workgroups over `k`: one
/// split (k_chunk 0) when the tiles fill the GPU, K is short, or `choice` turns splitting off.
pub fn coop_split(choice: &KernelChoice, tiles: usize, k: usize) -> (u32, u32) {
    let want = COOP_TARGET_WORKGROUPS.div_ceil(tiles.max(1));
    let most = k / COOP_MIN_SPLIT_K;
    let splits = want.min(most);
    if splits < 2 || !choice.coop_split_k {
        return (0, 1);
    }
    let chunk = k.div_ceil(splits).div_ceil(32) * 32;
    (chunk as u32, k.div_ceil(chunk) as u32)
}

/// The tensor-core tile's activation rows for `t` activation rows: the smallest that holds them.
pub fn coop_tile_t(t: usize) -> u32 {
    if t <= 16 {
        16
    } else if t <= 32 {
        32
    } else {
        64
    }
}

/// Which kernel multiplies a weight chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// [`GEMV`], one block of up to 4 activation rows.
    Gemv,
    /// [`GEMV`] in blocks of 4 activation rows along the grid's z.
    GemvBlocked,
    /// [`GEMM`]: 16 × 64 tiles.
    Tiled,
    /// [`GEMM_COOP`]: [`coop_tile_t`] × 128 tiles on the tensor cores.
    Coop,
}

/// The kernel for `t` activation rows against a chunk of `rows` weight rows of `dtype` held in
/// `bytes`, on a device with (`coop`) or without cooperative matrices.
pub fn matmul_kernel(
    choice: &KernelChoice,
    coop: bool,
    dtype: DType,
    t: usize,
    rows: usize,
    bytes: u64,
) -> MatmulKernel {
    let groups = rows.div_ceil(4);
    let max_t = if dtype == DType::F32 {
        choice.gemv_f32_max_t.max(choice.gemv_max_t)
    } else {
        choice.gemv_max_t
    };
    if t <= GEMV_T {
        MatmulKernel::Gemv
    } else if t <= max_t && groups <= 65535 && bytes <= choice.gemv_blocked_max_bytes {
        MatmulKernel::GemvBlocked
    } else if coop && matches!(dtype, DType::F16 | DType::Q8 | DType::Q4) && t >= choice.coop_min_t
    {
        MatmulKernel::Coop
    } else {
        MatmulKernel::Tiled
    }
}

/// The rows one sequence's pass has in the pass being recorded, whose choices `t` rows of it
/// follow: a batched pass's largest sequence (`State::batch_rows`; its passes are of one class,
/// ops/batch_class.rs, so any of them chooses alike), else `t`.
pub fn solo_rows(ctx: &Ctx, t: usize) -> usize {
    ctx.st.batch_rows.unwrap_or(t)
}

/// The kernel for `t` activation rows of the pass being recorded: the one [`matmul_kernel`] gives
/// one sequence's pass alone ([`solo_rows`]), over all `t` rows. The gemv (one block, or blocks
/// along z), the tiles and the tensor-core tiles each sum a row the same way whatever rows share
/// the dispatch (ops/batch_class.rs), so each sequence's rows come out as alone.
pub fn pass_kernel(ctx: &Ctx, dtype: DType, t: usize, rows: usize, bytes: u64) -> MatmulKernel {
    let (choice, coop) = (&ctx.sh.dev.kernels, ctx.sh.dev.caps.coop);
    match matmul_kernel(choice, coop, dtype, solo_rows(ctx, t), rows, bytes) {
        MatmulKernel::Gemv | MatmulKernel::GemvBlocked if t <= GEMV_T => MatmulKernel::Gemv,
        MatmulKernel::Gemv | MatmulKernel::GemvBlocked => MatmulKernel::GemvBlocked,
        k => k,
    }
}

/// The gemv grids (gemv.wgsl, gemv_wide.wgsl) for `groups` blocks of weight rows: blocks folded
/// into x × y past 65535 (the kernels unfold them), `z` along z.
fn folded_grid(groups: u64, z: u64) -> Grid<'static> {
    Grid::Groups(
        groups.min(65535) as u32,
        groups.div_ceil(65535) as u32,
        z as u32,
    )
}

/// The word-a-lane gemv's grid: [`folded_grid`] with a token block of `tile` rows a z.
fn gemv_grid(groups: u64, t: usize, tile: u32) -> Grid<'static> {
    folded_grid(groups, t.div_ceil(tile as usize) as u64)
}

/// The wide gemv's grid for `groups` row groups and `t` activation rows in token blocks of
/// `tile`: z workgroups per row group, each looping over every z-th block (gemv_wide.wgsl). One
/// where the row groups alone reach [`KernelChoice::wide_target_groups`] (each workgroup's weights
/// then come from memory once, its later blocks from cache); else enough to reach it, at most one
/// per block. Which workgroup works a block changes no sum.
pub fn wide_grid(choice: &KernelChoice, groups: u64, t: usize, tile: u32) -> Grid<'static> {
    let blocks = t.div_ceil(tile as usize) as u64;
    let z = match choice.wide_target_groups as u64 {
        0 => blocks,
        target => target.div_ceil(groups.max(1)).clamp(1, blocks),
    };
    folded_grid(groups, z)
}

/// Whether the wide gemv (`lanes` a row) reads a matrix of `rows` rows once whatever the token
/// blocks ([`wide_grid`] gives it one z), so it serves the gemv's rows past
/// [`KernelChoice::gemv_blocked_max_bytes`], a bound set for weights re-read from L2.
pub fn wide_reads_once(choice: &KernelChoice, rows: usize, lanes: u32) -> bool {
    let groups = rows.div_ceil(512 / lanes as usize);
    choice.wide_target_groups > 0 && groups >= choice.wide_target_groups
}

/// [`GEMM_COOP`] split along K into a scratch of `splits` partial outputs, then [`SPLIT_SUM`] into
/// `out` as `p` describes it.
fn coop_split_k(
    ctx: &mut Ctx,
    wtype: u32,
    p: &mut MatmulParams,
    [w, x, out]: [&GpuBuffer; 3],
    (gx, gy): (u64, usize),
    (k_chunk, splits): (u32, u32),
) -> Result<(), GpuError> {
    let (t, n) = (p.t, p.n);
    let scratch = ctx.output(u64::from(splits) * u64::from(t) * u64::from(n) * 4)?;
    let scratch: &GpuBuffer = &scratch;
    let part = MatmulParams {
        k_chunk,
        split_rows: t,
        out_stride: n,
        out_col0: 0,
        ..*p
    };
    let grid = Grid::Groups(gx as u32, gy as u32, splits);
    ctx.dispatch(&GEMM_COOP, wtype, &part, None, &[w, x, scratch], grid)?;
    p.splits = splits;
    let sum = Grid::Linear(u64::from(t * n).div_ceil(64));
    ctx.dispatch(&SPLIT_SUM, 0, p, None, &[scratch, out], sum)
}

/// `h[r, c] = silu(gate[c]) · up[c]` of `x`'s `t` rows against the fused [gate; up] weight in one
/// dispatch ([`GEMV_SWIGLU`]) where the gemv serves it (one chunk, the gemv's token counts).
/// Returns false, having recorded nothing, otherwise: the caller multiplies, then activates
/// (always when [`KernelChoice::fuse_swiglu`] is off).
/// With `norm`, `x`'s rows enter RMS-normed by that weight (MODE_NORM; rows of whole octets for
/// the word-a-lane kernel, else false).
pub fn gate_up_swiglu_into(
    ctx: &mut Ctx,
    gate_up: &GpuWeight,
    x: &GpuBuffer,
    t: usize,
    h: &GpuBuffer,
    norm: Option<(&GpuBuffer, f32)>,
) -> Result<bool, GpuError> {
    let choice = &ctx.sh.dev.kernels;
    let [c] = gate_up.chunks.as_slice() else {
        return Ok(false);
    };
    if !choice.fuse_swiglu {
        return Ok(false);
    }
    let kernel = pass_kernel(ctx, gate_up.dtype, t, c.rows as usize, c.buf.size);
    if !matches!(kernel, MatmulKernel::Gemv | MatmulKernel::GemvBlocked) || c.rows % 2 != 0 {
        return Ok(false);
    }
    let inter = c.rows / 2;
    let wide = wide_gemv(
        choice,
        gate_up.dtype,
        gate_up.cols,
        solo_rows(ctx, t),
        c.rows as usize,
    );
    if norm.is_some() && wide.is_none() && !gate_up.cols.is_multiple_of(8) {
        return Ok(false);
    }
    let p = MatmulParams {
        tile_t: wide.map_or(0, |w| w.1),
        k_chunk: 0,
        split_rows: 0,
        splits: 0,
        lanes: wide.map_or(0, |w| w.0),
        n: c.rows,
        k: gate_up.cols as u32,
        t: t as u32,
        scales: c.scales,
        x_row0: 0,
        out_stride: inter,
        out_col0: 0,
        norm_eps: norm.map_or(0.0, |(_, e)| e),
        mode: if norm.is_some() { MODE_NORM } else { 0 },
        _pad: [0; 2],
    };
    let (dummy, dummy_rw) = (ctx.sh.dummies[0].clone(), ctx.sh.dummies[1].clone());
    let norm_w = norm.map_or(&*dummy, |(w, _)| w);
    if let Some((lanes, _)) = wide {
        // 8-bit activations (a folded norm's 1 / rms then comes before the codes are made).
        let q8 = wide_q8(choice, gate_up.dtype, gate_up.cols);
        let (tile, bit) = q8.unwrap_or((p.tile_t, 0));
        let wtype = gate_up.wtype() | bit;
        let mut p = MatmulParams { tile_t: tile, ..p };
        let groups = u64::from(inter).div_ceil(u64::from(256 / lanes));
        let grid = wide_grid(&ctx.sh.dev.kernels, groups, t, tile);
        // Codes made once where KernelChoice::wide_q8_once asks for them.
        let codes = match q8 {
            Some(_) if codes_once(choice, gate_up.cols) => {
                Some(q8_codes(ctx, wtype, gate_up.cols, x, 0, t, tile, norm)?)
            }
            _ => None,
        };
        if codes.is_some() {
            p.mode = MODE_CODES;
        }
        let xin = codes.as_deref().unwrap_or(x);
        let bufs: [&GpuBuffer; 6] = [&c.buf, xin, h, &c.buf, norm_w, &dummy_rw];
        ctx.dispatch(&GEMV_WIDE_SWIGLU, wtype, &p, None, &bufs, grid)?;
        return Ok(true);
    }
    let grid = gemv_grid(u64::from(inter.div_ceil(2)), t, GEMV_T as u32);
    ctx.dispatch(
        &GEMV_SWIGLU,
        gate_up.wtype(),
        &p,
        None,
        &[&c.buf, x, h, norm_w],
        grid,
    )?;
    Ok(true)
}

#[cfg(test)]
thread_local! {
    /// Tests: the tensor-core kernel for every f16/q8/q4 matmul this thread records, whatever `t`
    /// (so small test weights reach its 16- and 32-row tiles).
    pub static FORCE_COOP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// out[r, out_col0 + n] = Σ_k W[n, k] · x[x_row0 + r, k] for r < t, every chunk of `w`;
/// out rows are `out_stride` values.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into(
    ctx: &mut Ctx,
    w: &GpuWeight,
    x: &GpuBuffer,
    x_row0: usize,
    t: usize,
    out: &GpuBuffer,
    out_stride: usize,
) -> Result<(), GpuError> {
    let done = matmul_fused_into(ctx, w, x, x_row0, t, out, out_stride, GemvFuse::default())?;
    debug_assert!(done, "a plain matmul always records");
    Ok(())
}

/// The kernel a chunk of `w` runs in this pass, and the wide gemv's (lanes, token block) where it
/// serves.
fn chunk_kernel(
    ctx: &Ctx,
    w: &GpuWeight,
    rows: usize,
    bytes: u64,
    t: usize,
) -> (MatmulKernel, Option<(u32, u32)>) {
    #[cfg(test)]
    if ctx.sh.dev.caps.coop && w.dtype != DType::F32 && FORCE_COOP.with(|f| f.get()) {
        return (MatmulKernel::Coop, None);
    }
    let choice = &ctx.sh.dev.kernels;
    let kernel = pass_kernel(ctx, w.dtype, t, rows, bytes);
    let solo = solo_rows(ctx, t);
    let wide = wide_gemv(choice, w.dtype, w.cols, solo, rows);
    match (kernel, wide) {
        (MatmulKernel::Gemv | MatmulKernel::GemvBlocked, _) => (kernel, wide),
        // Past the byte bound only (the rows are the gemv's): the LM head of a block.
        (_, Some((lanes, _)))
            if solo <= choice.gemv_max_t && wide_reads_once(choice, rows, lanes) =>
        {
            (MatmulKernel::GemvBlocked, wide)
        }
        _ => (kernel, None),
    }
}

/// Whether every chunk of `w` runs a gemv that folds in `fuse`: the wide one any of it, the
/// word-a-lane one the norm (rows of whole octets) and the add but not the normed rows' copy.
pub fn gemv_fuses(ctx: &Ctx, w: &GpuWeight, t: usize, fuse: &GemvFuse<'_>) -> bool {
    w.chunks.iter().all(
        |c| match chunk_kernel(ctx, w, c.rows as usize, c.buf.size, t) {
            (_, Some(_)) => true,
            (MatmulKernel::Gemv | MatmulKernel::GemvBlocked, None) => {
                fuse.hout.is_none() && (fuse.norm.is_none() || w.cols.is_multiple_of(8))
            }
            _ => !fuse.any(),
        },
    )
}

/// [`matmul_into`] with `fuse` folded into its gemvs. Returns false, having recorded nothing,
/// where a chunk's kernel cannot fold it in ([`gemv_fuses`]): the caller runs the separate ops.
#[allow(clippy::too_many_arguments)]
pub fn matmul_fused_into(
    ctx: &mut Ctx,
    w: &GpuWeight,
    x: &GpuBuffer,
    x_row0: usize,
    t: usize,
    out: &GpuBuffer,
    out_stride: usize,
    fuse: GemvFuse<'_>,
) -> Result<bool, GpuError> {
    if fuse.any() && !gemv_fuses(ctx, w, t, &fuse) {
        return Ok(false);
    }
    // The tensor-core tile and K split of one sequence's pass alone (ops/batch_class.rs).
    let solo = solo_rows(ctx, t);
    let tile_t = coop_tile_t(solo);
    // Distinct dummies: one is bound read-only, the other read-write.
    let (dummy, dummy_rw) = (ctx.sh.dummies[0].clone(), ctx.sh.dummies[1].clone());
    let norm_w = fuse.norm.map_or(&*dummy, |(b, _)| b);
    // The 8-bit codes every wide chunk reads, made at the first (q8_codes).
    let mut codes = None;
    for (i, c) in w.chunks.iter().enumerate() {
        // The normed rows are the same for every chunk: the first writes them.
        let hout = fuse.hout.filter(|_| i == 0);
        let mut p = MatmulParams {
            k_chunk: 0,
            split_rows: 0,
            splits: 0,
            lanes: 0,
            tile_t,
            n: c.rows,
            k: w.cols as u32,
            t: t as u32,
            scales: c.scales,
            x_row0: x_row0 as u32,
            out_stride: out_stride as u32,
            out_col0: c.row0,
            norm_eps: fuse.norm.map_or(0.0, |(_, e)| e),
            mode: GemvFuse { hout, ..fuse }.mode(),
            _pad: [0; 2],
        };
        let n = c.rows as u64;
        let bufs: [&GpuBuffer; 3] = [&c.buf, x, out];
        let (kernel, wide) = chunk_kernel(ctx, w, c.rows as usize, c.buf.size, t);
        if let Some((lanes, tile)) = wide {
            p.lanes = lanes;
            // 8-bit activations (a folded norm's 1 / rms then comes before the codes are made).
            let q8 = wide_q8(&ctx.sh.dev.kernels, w.dtype, w.cols);
            let (tile, bit) = q8.unwrap_or((tile, 0));
            let sets = wide_row_sets(&ctx.sh.dev.kernels, c.rows as usize, lanes, t, tile);
            let groups = n.div_ceil(u64::from(512 / lanes * sets));
            let wtype = w.wtype() | bit | if sets > 1 { row_sets(sets) } else { 0 };
            p.tile_t = tile;
            // Codes made once where KernelChoice::wide_q8_once asks for them, unless the normed
            // float rows are wanted too (the f32 routers').
            let once = codes_once(&ctx.sh.dev.kernels, w.cols);
            if once && q8.is_some() && fuse.hout.is_none() && codes.is_none() {
                codes = Some(q8_codes(ctx, wtype, w.cols, x, x_row0, t, tile, fuse.norm)?);
            }
            let xin = match &codes {
                Some(b) => {
                    p.mode = (p.mode & !MODE_NORM) | MODE_CODES;
                    p.x_row0 = 0;
                    &**b
                }
                None => x,
            };
            let grid = wide_grid(&ctx.sh.dev.kernels, groups, t, tile);
            let bufs: [&GpuBuffer; 6] =
                [&c.buf, xin, out, &c.buf, norm_w, hout.unwrap_or(&dummy_rw)];
            ctx.dispatch(&GEMV_WIDE, wtype, &p, None, &bufs, grid)?;
            continue;
        }
        let (entry, grid) = match kernel {
            MatmulKernel::Gemv | MatmulKernel::GemvBlocked => {
                // 64 / lanes weight rows a workgroup.
                p.lanes = gemv_lanes(&ctx.sh.dev.kernels, solo);
                let groups = n.div_ceil(u64::from(64 / p.lanes));
                let cap = match ctx.sh.dev.kernels.gemv_max_groups as u64 {
                    0 => groups,
                    cap => groups.min(cap),
                };
                (&GEMV, gemv_grid(cap, t, GEMV_T as u32))
            }
            MatmulKernel::Tiled => (
                &GEMM,
                Grid::Groups(n.div_ceil(64) as u32, t.div_ceil(16) as u32, 1),
            ),
            MatmulKernel::Coop => {
                let tile = tile_t as usize;
                let (gx, gy) = (n.div_ceil(128), t.div_ceil(tile));
                let solo_tiles = gx as usize * solo.div_ceil(tile);
                let (k_chunk, splits) = coop_split(&ctx.sh.dev.kernels, solo_tiles, w.cols);
                if splits > 1 {
                    coop_split_k(
                        ctx,
                        w.wtype(),
                        &mut p,
                        [&c.buf, x, out],
                        (gx, gy),
                        (k_chunk, splits),
                    )?;
                    continue;
                }
                (&GEMM_COOP, Grid::Groups(gx as u32, gy as u32, 1))
            }
        };
        // A 1- or 2-row gemv compiles for that many rows (fewer registers, more workgroups an
        // SM; two rows also take the four-octet rounds).
        let gemv = std::ptr::eq(entry, &GEMV);
        let lean = gemv && t <= 2 && ctx.sh.dev.kernels.lean_one;
        let wtype = w.wtype()
            | if lean { chunk_t(t as u32) } else { 0 }
            | if gemv {
                depth(ctx.sh.dev.kernels.gemv_depth)
            } else {
                0
            };
        if gemv {
            let bufs: [&GpuBuffer; 4] = [&c.buf, x, out, norm_w];
            ctx.dispatch(entry, wtype, &p, None, &bufs, grid)?;
        } else {
            ctx.dispatch(entry, wtype, &p, None, &bufs, grid)?;
        }
    }
    Ok(true)
}

/// [`Backend::matmul`] on the GPU.
pub(in crate::backend::gpu) fn matmul(
    b: &GpuBackend,
    w: &GpuWeight,
    x: &GpuAct,
) -> backend::Result<GpuAct> {
    shapes::matmul("matmul", (w.rows, w.cols), (x.rows, x.cols))?;
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, x.rows, w.rows)?;
        matmul_into(ctx, w, &x.buf, 0, x.rows, &out.buf, w.rows)?;
        Ok(out)
    })
}

/// [`Backend::mlp`] on the GPU.
pub(in crate::backend::gpu) fn mlp(
    b: &GpuBackend,
    gate_up: &GpuWeight,
    down: &GpuWeight,
    x: &GpuAct,
) -> backend::Result<GpuAct> {
    let inter = gate_up.rows / 2;
    if gate_up.cols != x.cols || !gate_up.rows.is_multiple_of(2) || down.cols != inter {
        return Err(shape_err(
            "mlp",
            format!(
                "gate_up [{}, {}], down [{}, {}], x [{}, {}]",
                gate_up.rows, gate_up.cols, down.rows, down.cols, x.rows, x.cols
            ),
        ));
    }
    b.with(|ctx| {
        let h = ctx.output((x.rows * inter * 4) as u64)?;
        if !gate_up_swiglu_into(ctx, gate_up, &x.buf, x.rows, &h, None)? {
            let gu = ctx.output((x.rows * 2 * inter * 4) as u64)?;
            matmul_into(ctx, gate_up, &x.buf, 0, x.rows, &gu, 2 * inter)?;
            super::elementwise::swiglu(ctx, &h, &gu, x.rows, inter)?;
        }
        let out = GpuBackend::out_act(ctx, x.rows, down.rows)?;
        matmul_into(ctx, down, &h, 0, x.rows, &out.buf, down.rows)?;
        Ok(out)
    })
}
