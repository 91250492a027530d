//! Per-position statistics of logits (shaders/stats.wgsl): partials per 2048-logit chunk, then one
//! merge per row (a row of one chunk: the merge alone, on the logits); 20 words per position come
//! back to the host.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::{GpuBuffer, Pooled};
use super::super::recorder::{Ctx, Grid};
use super::super::{experts, GpuAct, GpuBackend, GpuWeight};
use crate::backend::shapes;
use crate::backend::{self, BackendError};
use crate::backend::{PositionStats, TOP_K};
use std::ops::Range;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct StatsParams {
    pub rows: u32,
    pub vocab: u32,
    pub chunks: u32,
    pub out_row0: u32,
}

pub static PARTIAL: Entry = Entry {
    file: "stats.wgsl",
    name: "stats_partial",
    bindings: &[(0, Params), (2, ReadWrite), (3, Read)],
    params: "StatsParams",
};
pub static MERGE: Entry = Entry {
    file: "stats.wgsl",
    name: "stats_merge",
    bindings: &[(0, Params), (3, Read), (4, ReadWrite)],
    params: "StatsParams",
};

/// Words per position (and per partial).
pub const WORDS: usize = 20;

/// Reduces `rows` rows of `logits` [rows, vocab] into `out` at rows `out_row0..`.
pub fn stats(
    ctx: &mut Ctx,
    logits: &GpuBuffer,
    rows: usize,
    vocab: usize,
    out: &GpuBuffer,
    out_row0: usize,
) -> Result<(), GpuError> {
    // Logits per stats_partial workgroup (KernelChoice::stats_chunk): a row splits into
    // `vocab.div_ceil(chunk)` equal parts.
    let chunks = vocab.div_ceil(ctx.sh.dev.kernels.stats_chunk);
    let p = StatsParams {
        rows: rows as u32,
        vocab: vocab as u32,
        chunks: chunks as u32,
        out_row0: out_row0 as u32,
    };
    if chunks == 1 {
        // One workgroup a row does it all: stats_merge reads the logits (chunks = 1) instead of a
        // partial pass's single partial.
        return ctx.dispatch(
            &MERGE,
            0,
            &p,
            None,
            &[logits, out],
            Grid::Groups(rows as u32, 1, 1),
        );
    }
    let partials = ctx.output((rows * chunks * WORDS * 4) as u64)?;
    ctx.dispatch(
        &PARTIAL,
        0,
        &p,
        None,
        &[&partials, logits],
        Grid::Groups(chunks as u32, rows as u32, 1),
    )?;
    ctx.dispatch(
        &MERGE,
        0,
        &p,
        None,
        &[&partials, out],
        Grid::Groups(rows as u32, 1, 1),
    )
}

/// Decodes one position's 20 words.
pub fn decode(words: &[u32]) -> PositionStats {
    let f = |i: usize| f32::from_bits(words[i]);
    let top: Vec<(u32, f32)> = (0..TOP_K)
        .filter(|&k| words[4 + k] != u32::MAX)
        .map(|k| (words[4 + k], f(12 + k)))
        .collect();
    PositionStats {
        argmax: words[0],
        p_max: f(1),
        entropy: f(2),
        margin: f(3),
        top,
    }
}

/// [`Backend::lm_head_stats`] on the GPU.
pub(in crate::backend::gpu) fn lm_head_stats(
    b: &GpuBackend,
    x: &GpuAct,
    head: &GpuWeight,
    rows: Range<usize>,
) -> backend::Result<Vec<PositionStats>> {
    lm_head_stats_capped(b, x, head, rows, None)
}

/// The statistics of `rows`' logits, capped as `cap · tanh(l / cap)` first when `cap` is given
/// (DiffusionGemma, ops/gemma.rs): the pass's end, where paged expert pools read its routing back.
pub(in crate::backend::gpu) fn lm_head_stats_capped(
    b: &GpuBackend,
    x: &GpuAct,
    head: &GpuWeight,
    rows: Range<usize>,
    cap: Option<f32>,
) -> backend::Result<Vec<PositionStats>> {
    shapes::rows_within("lm_head_stats", &rows, x.rows)?;
    shapes::head("lm_head_stats", (head.rows, head.cols), x.cols)?;
    let (n, vocab) = (rows.len(), head.rows);
    let per = b.head_rows(vocab);
    let back = read_at_pass_end(b, |ctx| {
        let out = ctx.output((n.max(1) * WORDS * 4) as u64)?;
        let logits = ctx.output((per.min(n).max(1) * vocab * 4) as u64)?;
        let mut r0 = 0;
        while r0 < n {
            let m = per.min(n - r0);
            super::matmul::matmul_into(ctx, head, &x.buf, rows.start + r0, m, &logits, vocab)?;
            if let Some(cap) = cap {
                super::gemma::record_softcap(ctx, &logits, m * vocab, cap)?;
            }
            stats(ctx, &logits, m, vocab, &out, r0)?;
            r0 += m;
        }
        Ok(vec![(out, (n * WORDS * 4) as u64)])
    })?;
    let words = bytemuck::pod_collect_to_vec::<u8, u32>(&back[0]);
    Ok(words.chunks(WORDS).map(decode).collect())
}

/// The end of a pass that reads results back: records `record`, which returns the buffers it
/// wants and how many bytes of each, and reads them in one go together with the device status
/// word and the routing of paged expert pools, which then settle (a pass that met a
/// non-resident expert: `BackendError::RerunPass`; an expert that cannot come in: its error).
pub(in crate::backend::gpu) fn read_at_pass_end(
    b: &GpuBackend,
    record: impl FnOnce(&mut Ctx) -> Result<Vec<(Pooled, u64)>, BackendError>,
) -> backend::Result<Vec<Vec<u8>>> {
    let status = b.sh.status.clone();
    let paged = b.paging.take();
    let (wanted, flag, routed) = b.with(|ctx| {
        let bufs = record(ctx)?;
        let mut srcs: Vec<(&GpuBuffer, u64, u64)> =
            bufs.iter().map(|(buf, n)| (&**buf, 0, *n)).collect();
        srcs.push((&*status, 0, 4));
        for (_, caps) in &paged {
            srcs.extend(caps.iter().map(|c| (&*c.ids, 0, c.bytes)));
        }
        let mut back = ctx.read(&srcs)?;
        let rest = back.split_off(bufs.len());
        let flag = u32::from_le_bytes([rest[0][0], rest[0][1], rest[0][2], rest[0][3]]);
        if flag != 0 {
            ctx.clear(&status);
        }
        let mut rest = rest[1..].iter();
        let routed: Vec<_> = paged
            .iter()
            .map(|(pool, caps)| {
                let layers = caps
                    .iter()
                    .zip(&mut rest)
                    .map(|(c, bytes)| experts::LayerExperts {
                        layer: c.layer,
                        experts: bytemuck::pod_collect_to_vec(bytes),
                    })
                    .collect();
                (pool.clone(), layers)
            })
            .collect();
        Ok((back, flag, routed))
    })?;
    experts::ActivePools::finish(&routed)?;
    if flag & 0x8000_0000 != 0 {
        return Err(BackendError::ExpertUnavailable {
            layer: ((flag >> 16) & 0x7fff) as usize,
            expert: (flag & 0xffff) as usize,
        });
    }
    Ok(wanted)
}

/// [`Backend::logits`] on the GPU.
pub(in crate::backend::gpu) fn logits(
    b: &GpuBackend,
    x: &GpuAct,
    head: &GpuWeight,
    rows: Range<usize>,
) -> backend::Result<Vec<f32>> {
    shapes::rows_within("logits", &rows, x.rows)?;
    shapes::head("logits", (head.rows, head.cols), x.cols)?;
    let (n, vocab) = (rows.len(), head.rows);
    let per = b.head_rows(vocab);
    let mut all = Vec::with_capacity(n * vocab);
    let mut r0 = 0;
    while r0 < n {
        let m = per.min(n - r0);
        let part = b.with(|ctx| {
            let logits = ctx.output((m * vocab * 4) as u64)?;
            super::matmul::matmul_into(ctx, head, &x.buf, rows.start + r0, m, &logits, vocab)?;
            let b = ctx.read(&[(&logits, 0, (m * vocab * 4) as u64)])?;
            Ok(bytemuck::pod_collect_to_vec::<u8, f32>(&b[0]))
        })?;
        all.extend(part);
        r0 += m;
    }
    Ok(all)
}
