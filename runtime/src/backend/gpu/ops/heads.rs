//! Attention of a layer with its own geometry (shaders/heads.wgsl): DiffusionGemma's per-head q/k
//! norms, weightless v norm, K = V, proportional RoPE and its two window rules, over caches whose
//! rows are the layer's own width (`GpuBackend::new_kv` sizes each layer by
//! `ModelConfig::kv_dim_of`). The CPU reference is backend/cpu/gemma.rs.

use bytemuck::{Pod, Zeroable};

use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::Grid;
use super::super::{not_a_vector, GpuAct, GpuBackend, GpuKv, GpuWeight};
use crate::backend::shapes::{self, shape_err};
use crate::backend::{AttnMask, BackendError, HeadsParams, Result};

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct HeadsGpuParams {
    pub t: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub has_v: u32,
    pub v_norm: u32,
    pub pairs: u32,
    pub offset: u32,
    pub eps: f32,
    pub scale: f32,
    pub start: u32,
    pub kv_len: u32,
    pub mask: u32,
    pub window: u32,
    pub window_at_start: u32,
    pub proj_dim: u32,
    pub splits: u32,
    pub chunk: u32,
    pub _pad: [u32; 2],
}

pub static PREPARE_HEADS: Entry = Entry {
    file: "heads.wgsl",
    name: "prepare_heads",
    bindings: &[
        (0, Params),
        (1, Read),
        (2, Read),
        (3, Read),
        (4, Read),
        (5, ReadWrite),
    ],
    params: "HeadsParams",
};
pub static HEADS_STORE: Entry = Entry {
    file: "heads.wgsl",
    name: "heads_store",
    bindings: &[(0, Params), (6, Read), (7, ReadWrite), (8, ReadWrite)],
    params: "HeadsParams",
};
pub static ATTEND_HEADS: Entry = Entry {
    file: "heads.wgsl",
    name: "attend_heads",
    bindings: &[
        (0, Params),
        (5, ReadWrite),
        (6, Read),
        (9, Read),
        (10, Read),
        (11, ReadWrite),
    ],
    params: "HeadsParams",
};
pub static ATTEND_HEADS_COMBINE: Entry = Entry {
    file: "heads.wgsl",
    name: "attend_heads_combine",
    bindings: &[(0, Params), (5, ReadWrite), (11, ReadWrite)],
    params: "HeadsParams",
};

/// The most head dimensions the attention kernel holds (8 per lane of 64).
pub const MAX_HEAD_DIM: usize = 512;

fn params(p: &HeadsParams, t: usize) -> Result<HeadsGpuParams> {
    let g = p.geom;
    let mask = match p.mask {
        AttnMask::Causal => 0,
        AttnMask::Bidirectional => 1,
        _ => {
            return Err(BackendError::Unsupported {
                op: "attention_heads with a block-causal or draft mask",
                backend: "gpu".into(),
            })
        }
    };
    if g.head_dim > MAX_HEAD_DIM || g.head_dim == 0 {
        return Err(shape_err(
            "attention_heads",
            format!(
                "head_dim {} (the GPU kernel holds 1..={MAX_HEAD_DIM})",
                g.head_dim
            ),
        ));
    }
    Ok(HeadsGpuParams {
        t: t as u32,
        heads: g.heads as u32,
        kv_heads: g.kv_heads as u32,
        head_dim: g.head_dim as u32,
        has_v: g.has_v as u32,
        v_norm: p.v_norm as u32,
        pairs: g.rope.pairs as u32,
        offset: g.rope.offset as u32,
        eps: p.eps,
        scale: p.scale,
        start: p.start as u32,
        kv_len: p.kv_len as u32,
        mask,
        window: g.window.unwrap_or(0) as u32,
        window_at_start: p.window_at_start as u32,
        proj_dim: g.proj_dim() as u32,
        splits: 1,
        chunk: p.kv_len.max(1) as u32,
        _pad: [0; 2],
    })
}

/// Workgroups attend_heads aims at: a few rows against a long cache split their keys until
/// (rows × heads × splits) reaches this.
const TARGET_GROUPS: usize = 512;
/// Keys per split at least (and their granularity).
const MIN_CHUNK: usize = 16;

/// (splits, keys per split) for `rows` × `heads` workgroups over `kv_len` keys, the partials
/// (`head_dim` + 2 floats each) within `binding` bytes.
pub fn key_splits(
    heads: usize,
    rows: usize,
    kv_len: usize,
    head_dim: usize,
    binding: u64,
) -> (usize, usize) {
    let kv_len = kv_len.max(1);
    let slots = (heads * rows).max(1);
    let fit = (binding / (slots * (head_dim + 2) * 4) as u64).max(1) as usize;
    match super::reduction_splits(kv_len, slots, TARGET_GROUPS, fit, MIN_CHUNK) {
        // One split walks every key.
        (_, 1) => (1, kv_len),
        (chunk, splits) => (splits, chunk),
    }
}

/// `[T, proj_dim]` → `[T, q | k | v]` (see [`crate::backend::Backend::prepare_heads`]).
pub fn prepare_heads(
    b: &GpuBackend,
    proj: &GpuAct,
    q_norm: &GpuWeight,
    k_norm: &GpuWeight,
    p: HeadsParams,
) -> Result<GpuAct> {
    let g = p.geom;
    let (hd, qd, kd) = (g.head_dim, g.q_dim(), g.kv_dim());
    shapes::heads(proj.cols, &g)?;
    let qn = q_norm
        .vector()
        .filter(|_| q_norm.cols * q_norm.rows == hd)
        .ok_or_else(|| not_a_vector("prepare_heads", q_norm))?;
    let kn = k_norm
        .vector()
        .filter(|_| k_norm.cols * k_norm.rows == hd)
        .ok_or_else(|| not_a_vector("prepare_heads", k_norm))?;
    let r = g.rope;
    let gp = params(&p, proj.rows)?;
    // cos/sin per (row, pair) as the CPU computes them: θ^(−2i/denom) in f32, the angle in f64.
    let mut table = Vec::with_capacity(proj.rows * r.pairs.max(1) * 2);
    for t in 0..proj.rows {
        for i in 0..r.pairs {
            let inv_freq = 1.0 / (r.theta as f32).powf((2 * i) as f32 / r.denom as f32);
            let (sin, cos) = ((p.start + t) as f64 * inv_freq as f64).sin_cos();
            table.extend([cos as f32, sin as f32]);
        }
    }
    if table.is_empty() {
        table.extend([0.0, 0.0]);
    }
    b.with(|ctx| {
        let cs = ctx.output((table.len() * 4) as u64)?;
        ctx.upload(bytemuck::cast_slice(&table), &cs)?;
        let out = GpuBackend::out_act(ctx, proj.rows, qd + 2 * kd)?;
        ctx.dispatch(
            &PREPARE_HEADS,
            0,
            &gp,
            None,
            &[&proj.buf, qn, kn, &cs, &out.buf],
            Grid::Groups(proj.rows as u32, (g.heads + 2 * g.kv_heads) as u32, 1),
        )?;
        Ok(out)
    })
}

/// Stores the pass's K/V in layer `p.layer`'s caches and attends (see
/// [`crate::backend::Backend::attention_heads`]).
pub fn attention_heads(
    b: &GpuBackend,
    qkv: &GpuAct,
    kv: &mut GpuKv,
    p: HeadsParams,
) -> Result<GpuAct> {
    let g = p.geom;
    let (qd, kd) = (g.q_dim(), g.kv_dim());
    let t_len = qkv.rows;
    if qkv.cols != qd + 2 * kd {
        return Err(shape_err(
            "attention_heads",
            format!("qkv width {} vs {}", qkv.cols, qd + 2 * kd),
        ));
    }
    // A layer of rows whose bytes are not whole 16-byte words (kd = 30, an odd capacity) is
    // padded at allocation.
    let want = GpuBuffer::padded(kv.capacity as u64 * kd as u64 * 4);
    let layer_ok = kv.k.get(p.layer).is_some_and(|k| k.size == want)
        && kv.v.get(p.layer).is_some_and(|v| v.size == want);
    if !layer_ok || g.kv_heads == 0 || !g.heads.is_multiple_of(g.kv_heads) {
        return Err(shape_err(
            "attention_heads",
            format!(
                "layer {} of {} cached layers does not hold rows of {kd} for {} heads over {}",
                p.layer,
                kv.k.len(),
                g.heads,
                g.kv_heads
            ),
        ));
    }
    let (start, kv_len) = (p.start, p.kv_len);
    if start + t_len > kv.capacity || kv_len > kv.capacity {
        return Err(BackendError::CacheFull {
            pos: (start + t_len).max(kv_len),
            capacity: kv.capacity,
        });
    }
    if kv_len < start + t_len {
        return Err(shape_err(
            "attention_heads",
            format!("kv_len {kv_len} < end of block {}", start + t_len),
        ));
    }
    let mut gp = params(&p, t_len)?;
    let (k, v) = (kv.k[p.layer].clone(), kv.v[p.layer].clone());
    b.with(|ctx| {
        let (splits, chunk) = key_splits(g.heads, t_len, kv_len, g.head_dim, ctx.sh.dev.split);
        gp.splits = splits as u32;
        gp.chunk = chunk as u32;
        ctx.dispatch(
            &HEADS_STORE,
            0,
            &gp,
            None,
            &[&qkv.buf, &k, &v],
            Grid::Linear(((t_len * kd) as u64).div_ceil(64)),
        )?;
        let out = GpuBackend::out_act(ctx, t_len, qd)?;
        // One split writes the output itself; the partials' buffer is then only bound (a word).
        let part_bytes = match splits {
            1 => 4,
            _ => t_len * g.heads * splits * (g.head_dim + 2) * 4,
        };
        let part = ctx.output(part_bytes as u64)?;
        let grid = Grid::Groups(t_len as u32, g.heads as u32, splits as u32);
        let bufs: [&GpuBuffer; 5] = [&out.buf, &qkv.buf, &k, &v, &part];
        ctx.dispatch(&ATTEND_HEADS, 0, &gp, None, &bufs, grid)?;
        if splits > 1 {
            let grid = Grid::Groups(t_len as u32, g.heads as u32, 1);
            ctx.dispatch(
                &ATTEND_HEADS_COMBINE,
                0,
                &gp,
                None,
                &[&out.buf, &part],
                grid,
            )?;
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::{key_splits, MIN_CHUNK, TARGET_GROUPS};

    #[test]
    fn key_splits_cover_the_keys_and_fill_the_gpu() {
        // (heads, rows, keys, head_dim, binding bytes)
        for (h, t, kv, hd, binding) in [
            (16, 1, 513, 512, 1u64 << 31),
            (16, 16, 768, 256, 1 << 31),
            (16, 256, 768, 256, 1 << 31),
            (4, 5, 40, 30, 1 << 20),
            (4, 5, 40, 30, 1 << 10),
            (2, 1, 1, 8, 1 << 20),
        ] {
            let (splits, chunk) = key_splits(h, t, kv, hd, binding);
            let what = format!("{h} heads x {t} rows over {kv}: {splits} splits of {chunk}");
            assert!(splits >= 1 && chunk >= 1, "{what}");
            // Every key in exactly one split, none empty.
            assert!(splits * chunk >= kv && (splits - 1) * chunk < kv, "{what}");
            if splits > 1 {
                assert!(chunk.is_multiple_of(MIN_CHUNK), "{what}");
                assert!((h * t * splits * (hd + 2) * 4) as u64 <= binding, "{what}");
            }
            assert!(h * t * splits <= TARGET_GROUPS.max(h * t) + h * t, "{what}");
        }
        // One row of DiffusionGemma-26B against 513 keys: 16 workgroups alone before the splits.
        assert_eq!(key_splits(16, 1, 513, 512, 1 << 31), (17, 32));
        assert_eq!(key_splits(16, 256, 768, 256, 1 << 31), (1, 768));
    }
}
