//! KV-cache write and flash-style attention (shaders/attention.wgsl).

use bytemuck::{Pod, Zeroable};

use super::super::choice::AttnKernel;
use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid};
use super::super::{GpuAct, GpuBackend, GpuKv, GpuWeight};
use crate::arch::ModelConfig;
use crate::backend;
use crate::backend::shapes;
use crate::backend::AttnMask;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct AttnParams {
    pub t: u32,
    pub nq: u32,
    pub nkv: u32,
    pub hd: u32,
    pub start: u32,
    pub kv_len: u32,
    pub mask: u32,
    pub mask_arg: u32,
    pub scale: f32,
    pub kv_dim: u32,
    pub splits: u32,
    pub chunk: u32,
    /// Sliding window: a query sees keys at most `window − 1` before it (0: no window).
    pub window: u32,
    /// The cache's first row (a range of an arena's layer buffers).
    pub base: u32,
    /// The `_seqs` kernels: entries of the sequence table (their `t` is the batch's rows and their
    /// `splits` the grid's workgroups).
    pub seqs: u32,
    pub _pad: u32,
}

/// One sequence's share of a batched attention dispatch (shaders/attention.wgsl `SeqAttn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SeqAttn {
    pub row0: u32,
    pub t: u32,
    pub start: u32,
    pub kv_len: u32,
    pub mask: u32,
    pub mask_arg: u32,
    pub base: u32,
    pub splits: u32,
    pub chunk: u32,
    pub wg0: u32,
    pub item0: u32,
    /// Its first workgroup of attend_merge_seqs' grid.
    pub mwg0: u32,
}

pub static KV_STORE: Entry = Entry {
    file: "attention.wgsl",
    name: "kv_store",
    bindings: &[(0, Params), (1, Read), (2, ReadWrite), (3, ReadWrite)],
    params: "AttnParams",
};
pub static ATTEND: Entry = Entry {
    file: "attention.wgsl",
    name: "attend",
    bindings: &[
        (0, Params),
        (1, Read),
        (4, ReadWrite),
        (5, Read),
        (6, Read),
        (7, ReadWrite),
    ],
    params: "AttnParams",
};
pub static ATTEND_GQA: Entry = Entry {
    file: "attention.wgsl",
    name: "attend_gqa",
    bindings: &[
        (0, Params),
        (1, Read),
        (8, Read),
        (9, Read),
        (10, ReadWrite),
        (11, ReadWrite),
        (12, ReadWrite),
    ],
    params: "AttnParams",
};
pub static ATTEND_GQA_SEQS: Entry = Entry {
    file: "attention.wgsl",
    name: "attend_gqa_seqs",
    bindings: &[
        (0, Params),
        (1, Read),
        (8, Read),
        (9, Read),
        (10, ReadWrite),
        (11, ReadWrite),
        (12, ReadWrite),
        (13, Input),
    ],
    params: "AttnParams",
};
pub static ATTEND_MERGE_SEQS: Entry = Entry {
    file: "attention.wgsl",
    name: "attend_merge_seqs",
    bindings: &[
        (0, Params),
        (10, ReadWrite),
        (11, ReadWrite),
        (12, ReadWrite),
        (13, Input),
    ],
    params: "AttnParams",
};
pub static ATTEND_MERGE: Entry = Entry {
    file: "attention.wgsl",
    name: "attend_merge",
    bindings: &[
        (0, Params),
        (10, ReadWrite),
        (11, ReadWrite),
        (12, ReadWrite),
    ],
    params: "AttnParams",
};
pub static ATTEND_COMBINE: Entry = Entry {
    file: "attention.wgsl",
    name: "attend_combine",
    bindings: &[(0, Params), (4, ReadWrite), (7, ReadWrite)],
    params: "AttnParams",
};

/// Workgroups the attention grid aims at: a short query block against a long cache is split
/// along the keys until (heads × tokens × splits) reaches this (flash-decoding).
const TARGET_GROUPS: usize = 512;

/// (splits, keys per split): keys in 64-key chunks, spread over enough splits to fill the GPU.
pub fn splits(heads: usize, rows: usize, kv_len: usize) -> (usize, usize) {
    let chunks = kv_len.div_ceil(64).max(1);
    let want = TARGET_GROUPS.div_ceil(heads * rows).clamp(1, chunks);
    let per = chunks.div_ceil(want);
    (chunks.div_ceil(per), per * 64)
}

/// Splits one lane of attend_merge folds in one batch of loads (attention.wgsl MERGE_BATCH).
const MERGE_BATCH: usize = 8;

/// Lanes attend_merge gives one output column of a (row, head) of `splits` splits: enough for a
/// batch each, a power of two ≤ 64 (attention.wgsl merge_lanes).
pub fn merge_lanes(splits: usize) -> usize {
    splits.div_ceil(MERGE_BATCH).next_power_of_two().min(64)
}

/// attend_merge's workgroups for `cols` output columns (vec4s) of `splits` splits each.
pub fn merge_groups(cols: usize, splits: usize) -> usize {
    (cols * merge_lanes(splits)).div_ceil(64)
}

/// The fewest keys one GQA split walks (below this the merge costs more than the split saves).
const GQA_MIN_CHUNK: usize = 16;

/// The largest head the GQA kernel holds (4 vec4 columns per invocation of an octet of 8).
pub const GQA_MAX_HEAD_DIM: usize = 128;

/// (splits, keys per split) of the GQA kernel: `slots` query rows (tokens × q heads) per split,
/// keys in multiples of 4, spread until the grid reaches `target` workgroups
/// (KernelChoice::attn_groups).
pub fn gqa_splits(target: usize, slots: usize, kv_len: usize) -> (usize, usize) {
    let target = target.max(1);
    let kv_len = kv_len.max(1);
    let want = (target * 8)
        .div_ceil(slots.max(1))
        .clamp(1, kv_len.div_ceil(GQA_MIN_CHUNK));
    let chunk = kv_len.div_ceil(want).next_multiple_of(4);
    (kv_len.div_ceil(chunk), chunk)
}

/// Which attention kernels run: the GQA octet kernel where the head fits it (and subgroups, if
/// used, are at least 8 wide), else the per-head kernel. KernelChoice::attention forces one where
/// both apply (benchmarks).
fn use_gqa(dev: &super::super::GpuDevice, c: &ModelConfig) -> bool {
    let forced = dev.kernels.attention.map(|k| k == AttnKernel::Gqa);
    let fits = c.head_dim.is_multiple_of(4)
        && c.head_dim <= GQA_MAX_HEAD_DIM
        && c.num_kv_heads > 0
        && c.num_heads.is_multiple_of(c.num_kv_heads)
        && (!dev.caps.subgroups || dev.info.subgroup_min_size >= 8);
    fits && forced.unwrap_or(true)
}

/// The kernel's code and argument of a mask.
fn mask_code(mask: AttnMask) -> (u32, u32) {
    match mask {
        AttnMask::Causal => (0, 0),
        AttnMask::Bidirectional => (1, 0),
        AttnMask::BlockCausal(b) => (2, b.max(1) as u32),
        AttnMask::CausalThenBidirectional { draft_start } => (3, draft_start as u32),
    }
}

/// The largest head the kernel holds (4 dims per invocation of 64).
pub const MAX_HEAD_DIM: usize = 256;

/// Writes the block's K/V into the layer caches (unless `stored`: the RoPE kernel already did),
/// then attends; `out` is [T, nq·hd].
#[allow(clippy::too_many_arguments)]
pub fn record_attention(
    ctx: &mut Ctx,
    qkv: &GpuBuffer,
    rows: usize,
    k_cache: &GpuBuffer,
    v_cache: &GpuBuffer,
    out: &GpuBuffer,
    c: &ModelConfig,
    start: usize,
    kv_len: usize,
    mask: AttnMask,
    window: Option<usize>,
    stored: bool,
    base: usize,
) -> Result<(), GpuError> {
    if c.head_dim > MAX_HEAD_DIM {
        return Err(GpuError::Unsupported(format!(
            "head_dim {} (the attention kernel holds at most {MAX_HEAD_DIM})",
            c.head_dim
        )));
    }
    let (mask, mask_arg) = mask_code(mask);
    let kv_dim = c.kv_dim();
    let gqa = use_gqa(&ctx.sh.dev, c);
    let (splits, chunk) = if gqa {
        gqa_splits(ctx.sh.dev.kernels.attn_groups, c.num_heads * rows, kv_len)
    } else {
        splits(c.num_heads, rows, kv_len)
    };
    let p = AttnParams {
        t: rows as u32,
        nq: c.num_heads as u32,
        nkv: c.num_kv_heads as u32,
        hd: c.head_dim as u32,
        start: start as u32,
        kv_len: kv_len as u32,
        mask,
        mask_arg,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        kv_dim: kv_dim as u32,
        splits: splits as u32,
        chunk: chunk as u32,
        window: window.unwrap_or(0) as u32,
        base: base as u32,
        seqs: 0,
        _pad: 0,
    };
    if !stored {
        ctx.dispatch(
            &KV_STORE,
            0,
            &p,
            None,
            &[qkv, k_cache, v_cache],
            Grid::Linear(((rows * kv_dim) as u64).div_ceil(64)),
        )?;
    }
    if gqa {
        let slots = (rows * c.num_heads * splits) as u64;
        let groups = Grid::Linear(slots.div_ceil(8));
        if splits == 1 {
            let (d0, d1) = (ctx.sh.dummies[0].clone(), ctx.sh.dummies[1].clone());
            return ctx.dispatch(
                &ATTEND_GQA,
                0,
                &p,
                None,
                &[qkv, k_cache, v_cache, &d0, &d1, out],
                groups,
            );
        }
        let acc = ctx.output(slots * c.head_dim as u64 * 4)?;
        let ml = ctx.output(slots * 2 * 4)?;
        ctx.dispatch(
            &ATTEND_GQA,
            0,
            &p,
            None,
            &[qkv, k_cache, v_cache, &acc, &ml, out],
            groups,
        )?;
        let cols = rows * c.num_heads * c.head_dim / 4;
        return ctx.dispatch(
            &ATTEND_MERGE,
            0,
            &p,
            None,
            &[&acc, &ml, out],
            Grid::Linear(merge_groups(cols, splits) as u64),
        );
    }
    let grid = (c.num_heads as u32, rows as u32);
    if splits == 1 {
        let dummy = ctx.sh.dummies[0].clone();
        return ctx.dispatch(
            &ATTEND,
            0,
            &p,
            None,
            &[qkv, out, k_cache, v_cache, &dummy],
            Grid::Groups(grid.0, grid.1, 1),
        );
    }
    let part = ctx.output((rows * c.num_heads * splits * (c.head_dim + 2) * 4) as u64)?;
    ctx.dispatch(
        &ATTEND,
        0,
        &p,
        None,
        &[qkv, out, k_cache, v_cache, &part],
        Grid::Groups(grid.0, grid.1, splits as u32),
    )?;
    ctx.dispatch(
        &ATTEND_COMBINE,
        0,
        &p,
        None,
        &[out, &part],
        Grid::Groups(grid.0, grid.1, 1),
    )
}

/// [`Backend::attention`] on the GPU.
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::gpu) fn attention(
    b: &GpuBackend,
    qkv: &GpuAct,
    kv: &mut GpuKv,
    layer: usize,
    c: &ModelConfig,
    start: usize,
    kv_len: usize,
    mask: AttnMask,
) -> backend::Result<GpuAct> {
    let t = qkv.rows;
    shapes::attention(
        (qkv.rows, qkv.cols),
        layer,
        kv.k.len(),
        c,
        start,
        kv_len,
        kv.capacity,
        mask,
    )?;
    b.with(|ctx| {
        let out = GpuBackend::out_act(ctx, t, c.q_dim())?;
        record_attention(
            ctx,
            &qkv.buf,
            t,
            &kv.k[layer],
            &kv.v[layer],
            &out.buf,
            c,
            start,
            kv_len,
            mask,
            c.window_of(layer),
            false,
            kv.base,
        )?;
        Ok(out)
    })
}

/// [`Backend::rope_attention`] on the GPU.
#[allow(clippy::too_many_arguments)]
pub(in crate::backend::gpu) fn rope_attention(
    b: &GpuBackend,
    qkv: &mut GpuAct,
    q_norm: Option<&GpuWeight>,
    k_norm: Option<&GpuWeight>,
    kv: &mut GpuKv,
    layer: usize,
    c: &ModelConfig,
    start: usize,
    kv_len: usize,
    mask: AttnMask,
) -> backend::Result<GpuAct> {
    shapes::qkv("rope_attention", qkv.cols, c)?;
    let (norm, qn, kn) = b.qk_norms("rope_attention", q_norm, k_norm, c)?;
    shapes::attention(
        (qkv.rows, qkv.cols),
        layer,
        kv.k.len(),
        c,
        start,
        kv_len,
        kv.capacity,
        mask,
    )?;
    let (t, k, v) = (qkv.rows, &kv.k[layer], &kv.v[layer]);
    b.with(|ctx| {
        let cache = Some((&**k, &**v, kv.base));
        super::rope::record_qk_norm_rope(ctx, &qkv.buf, t, &qn, &kn, norm, c, start, cache)?;
        let out = GpuBackend::out_act(ctx, t, c.q_dim())?;
        record_attention(
            ctx,
            &qkv.buf,
            t,
            k,
            v,
            &out.buf,
            c,
            start,
            kv_len,
            mask,
            c.window_of(layer),
            true,
            kv.base,
        )?;
        Ok(out)
    })
}

/// Most sequences one batched attention dispatch serves (its workgroups scan their table); a
/// larger batch takes one dispatch (and merge) per this many.
pub const MAX_SEQS: usize = 64;

/// [`Backend::rope_attention_seqs`] on the GPU: one RoPE/K/V-store dispatch, one attention
/// dispatch and (where a sequence splits its keys) one merge for every [`MAX_SEQS`] sequences of
/// the batch, when their caches are ranges of one arena and the GQA kernel applies; otherwise one
/// sequence at a time ([`backend::rope_attention_each`]).
pub(in crate::backend::gpu) fn rope_attention_seqs(
    b: &GpuBackend,
    qkv: &mut GpuAct,
    q_norm: Option<&GpuWeight>,
    k_norm: Option<&GpuWeight>,
    seqs: &mut [backend::SeqAttention<'_, GpuKv>],
    layer: usize,
    c: &ModelConfig,
) -> backend::Result<GpuAct> {
    let arena = seqs.first().and_then(|s| s.kv.arena());
    let shared = arena.is_some_and(|a| {
        seqs.iter()
            .all(|s| s.kv.arena().is_some_and(|x| std::sync::Arc::ptr_eq(a, x)))
    });
    let mut next_row = 0;
    let in_order = seqs.iter().all(|s| {
        let next = s.rows.start == next_row && s.rows.end > s.rows.start;
        next_row = s.rows.end;
        next
    }) && next_row == qkv.rows;
    // The RoPE kernel's row table is host data of one op.
    let table_fits = (qkv.rows * 8) as u64 <= super::super::kernels::INPUT_MAX;
    if !(shared && in_order && table_fits && use_gqa(&b.sh.dev, c)) {
        return backend::rope_attention_each(b, qkv, q_norm, k_norm, seqs, layer, c);
    }
    shapes::qkv("rope_attention", qkv.cols, c)?;
    let (norm, qn, kn) = b.qk_norms("rope_attention", q_norm, k_norm, c)?;
    for s in seqs.iter() {
        shapes::attention(
            (s.rows.len(), qkv.cols),
            layer,
            s.kv.k.len(),
            c,
            s.start,
            s.kv_len,
            s.kv.capacity,
            s.mask,
        )?;
    }
    let (k, v) = (&seqs[0].kv.k[layer], &seqs[0].kv.v[layer]);
    let mut row_tab = Vec::with_capacity(qkv.rows);
    for s in seqs.iter() {
        for t in 0..s.rows.len() {
            let pos = s.start + t;
            row_tab.push([pos as u32, (s.kv.base + pos) as u32]);
        }
    }
    let end = seqs
        .iter()
        .map(|s| s.start + s.rows.len())
        .max()
        .unwrap_or(0);
    let seqs = &*seqs;
    let t = qkv.rows;
    b.with(|ctx| {
        super::rope::record_qk_norm_rope_seqs(
            ctx,
            &qkv.buf,
            &qn,
            &kn,
            norm,
            c,
            &row_tab,
            end,
            (k, v),
        )?;
        let out = GpuBackend::out_act(ctx, t, c.q_dim())?;
        for chunk in seqs.chunks(MAX_SEQS) {
            let window = c.window_of(layer);
            record_attention_seqs(ctx, &qkv.buf, t, (k, v), &out.buf, c, chunk, window)?;
        }
        Ok(out)
    })
}

/// attend_gqa_seqs (+ attend_merge_seqs) over `seqs` (rows in order, caches in `k_cache` /
/// `v_cache`), each with the splits its pass alone would take.
#[allow(clippy::too_many_arguments)]
fn record_attention_seqs(
    ctx: &mut Ctx,
    qkv: &GpuBuffer,
    rows: usize,
    (k_cache, v_cache): (&GpuBuffer, &GpuBuffer),
    out: &GpuBuffer,
    c: &ModelConfig,
    seqs: &[backend::SeqAttention<'_, GpuKv>],
    window: Option<usize>,
) -> Result<(), GpuError> {
    let mut table = Vec::with_capacity(seqs.len());
    let (mut wg, mut items, mut mwg) = (0usize, 0usize, 0usize);
    for s in seqs {
        let t = s.rows.len();
        let (splits, chunk) = gqa_splits(ctx.sh.dev.kernels.attn_groups, c.num_heads * t, s.kv_len);
        let (mask, mask_arg) = mask_code(s.mask);
        table.push(SeqAttn {
            row0: s.rows.start as u32,
            t: t as u32,
            start: s.start as u32,
            kv_len: s.kv_len as u32,
            mask,
            mask_arg,
            base: s.kv.base as u32,
            splits: splits as u32,
            chunk: chunk as u32,
            wg0: wg as u32,
            item0: items as u32,
            mwg0: mwg as u32,
        });
        let slots = t * c.num_heads * splits;
        wg += slots.div_ceil(8);
        // Items and merge groups of split sequences only: one split writes its output directly.
        if splits > 1 {
            items += slots;
            mwg += merge_groups(t * c.num_heads * c.head_dim / 4, splits);
        }
    }
    let p = AttnParams {
        t: rows as u32,
        nq: c.num_heads as u32,
        nkv: c.num_kv_heads as u32,
        hd: c.head_dim as u32,
        start: 0,
        kv_len: 0,
        mask: 0,
        mask_arg: 0,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        kv_dim: c.kv_dim() as u32,
        splits: wg as u32,
        chunk: 0,
        window: window.unwrap_or(0) as u32,
        base: 0,
        seqs: table.len() as u32,
        _pad: 0,
    };
    let input: &[u8] = bytemuck::cast_slice(&table);
    let split = if items > 0 {
        Some((
            ctx.output(items as u64 * c.head_dim as u64 * 4)?,
            ctx.output(items as u64 * 2 * 4)?,
        ))
    } else {
        None
    };
    let (d0, d1) = (ctx.sh.dummies[0].clone(), ctx.sh.dummies[1].clone());
    let (acc, ml): (&GpuBuffer, &GpuBuffer) = match &split {
        Some((a, m)) => (a, m),
        None => (&d0, &d1),
    };
    ctx.dispatch(
        &ATTEND_GQA_SEQS,
        0,
        &p,
        Some(input),
        &[qkv, k_cache, v_cache, acc, ml, out],
        Grid::Linear(wg as u64),
    )?;
    if items == 0 {
        return Ok(());
    }
    // The merge's `splits` is its workgroups (the grid may round up past them).
    let pm = AttnParams {
        splits: mwg as u32,
        ..p
    };
    ctx.dispatch(
        &ATTEND_MERGE_SEQS,
        0,
        &pm,
        Some(input),
        &[acc, ml, out],
        Grid::Linear(mwg as u64),
    )
}
