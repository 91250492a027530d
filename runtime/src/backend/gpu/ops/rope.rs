//! q/k norm + clip + partial RoPE in place on the fused qkv rows (shaders/rope.wgsl): one workgroup
//! per (head, token), or per token for the whole-projection norm. The cos/sin
//! table is built on the host in f64 (as the CPU reference computes the angles) and grown on demand.

use bytemuck::{Pod, Zeroable};

use super::super::device::GpuError;
use super::super::kernels::{Entry, Slot::*};
use super::super::pool::GpuBuffer;
use super::super::recorder::{Ctx, Grid, RopeTable};
use super::super::{GpuAct, GpuBackend, GpuWeight};
use crate::arch::ModelConfig;
use crate::backend;
use crate::backend::shapes;

#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct RopeParams {
    pub t: u32,
    pub nq: u32,
    pub nkv: u32,
    pub hd: u32,
    pub rot_half: u32,
    pub norm: u32,
    pub start: u32,
    pub clip_on: u32,
    pub clip: f32,
    pub eps: f32,
    /// The cache's first row (a range of an arena's layer buffers).
    pub base: u32,
    pub _pad: u32,
}

pub static QK_NORM_ROPE: Entry = Entry {
    file: "rope.wgsl",
    name: "qk_norm_rope",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read), (3, Read), (4, Read)],
    params: "RopeParams",
};
pub static QK_NORM_ROPE_WHOLE: Entry = Entry {
    file: "rope.wgsl",
    name: "qk_norm_rope_whole",
    bindings: &[(0, Params), (1, ReadWrite), (2, Read), (3, Read), (4, Read)],
    params: "RopeParams",
};

pub static QK_NORM_ROPE_STORE: Entry = Entry {
    file: "rope.wgsl",
    name: "qk_norm_rope_store",
    bindings: &[
        (0, Params),
        (1, ReadWrite),
        (2, Read),
        (3, Read),
        (4, Read),
        (5, ReadWrite),
        (6, ReadWrite),
    ],
    params: "RopeParams",
};
pub static QK_NORM_ROPE_WHOLE_STORE: Entry = Entry {
    file: "rope.wgsl",
    name: "qk_norm_rope_whole_store",
    bindings: &[
        (0, Params),
        (1, ReadWrite),
        (2, Read),
        (3, Read),
        (4, Read),
        (5, ReadWrite),
        (6, ReadWrite),
    ],
    params: "RopeParams",
};

pub static QK_NORM_ROPE_STORE_SEQS: Entry = Entry {
    file: "rope.wgsl",
    name: "qk_norm_rope_store_seqs",
    bindings: &[
        (0, Params),
        (1, ReadWrite),
        (2, Read),
        (3, Read),
        (4, Read),
        (5, ReadWrite),
        (6, ReadWrite),
        (7, Input),
    ],
    params: "RopeParams",
};
pub static QK_NORM_ROPE_WHOLE_STORE_SEQS: Entry = Entry {
    file: "rope.wgsl",
    name: "qk_norm_rope_whole_store_seqs",
    bindings: &[
        (0, Params),
        (1, ReadWrite),
        (2, Read),
        (3, Read),
        (4, Read),
        (5, ReadWrite),
        (6, ReadWrite),
        (7, Input),
    ],
    params: "RopeParams",
};

/// The per-head kernel keeps a head in registers and shared memory of this many elements.
pub const MAX_HEAD_DIM: usize = 256;

/// The (cos, sin) table of `c` covering positions `0..end`.
pub fn table(
    ctx: &mut Ctx,
    c: &ModelConfig,
    end: usize,
) -> Result<std::sync::Arc<GpuBuffer>, GpuError> {
    table_for(ctx, c.rope_theta, c.rotary_dim, end)
}

/// The (cos, sin) table of θ `theta` over `rotary_dim` dims covering positions `0..end` (a
/// sliding-window layer may have its own θ).
pub fn table_for(
    ctx: &mut Ctx,
    theta: f64,
    rotary_dim: usize,
    end: usize,
) -> Result<std::sync::Arc<GpuBuffer>, GpuError> {
    let half = rotary_dim / 2;
    let key = (theta.to_bits(), rotary_dim);
    if let Some(t) = ctx.st.rope.get(&key) {
        if t.positions >= end {
            return Ok(t.buf.clone());
        }
    }
    let positions = end.next_power_of_two().max(256);
    let bytes = (positions * half * 8) as u64;
    if bytes > ctx.sh.dev.max_binding {
        return Err(GpuError::Limit {
            what: format!("the RoPE table of {positions} positions"),
            need: bytes,
            limit: ctx.sh.dev.max_binding,
        });
    }
    // inv_freq_i = θ^(−2i/rd), angles in f64 — exactly the CPU reference's values.
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64))
        .collect();
    let mut data = Vec::with_capacity(positions * half * 2);
    for pos in 0..positions {
        for f in &inv_freq {
            let (sin, cos) = (pos as f64 * f).sin_cos();
            data.push(cos as f32);
            data.push(sin as f32);
        }
    }
    let buf = GpuBuffer::new(
        &ctx.sh.dev.device,
        bytes,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        "rope",
    );
    ctx.sh
        .dev
        .queue
        .write_buffer(&buf.raw, 0, bytemuck::cast_slice(&data));
    ctx.st.rope.insert(
        key,
        RopeTable {
            positions,
            buf: buf.clone(),
        },
    );
    Ok(buf)
}

/// Norm code of the kernel: 0 none, 1 per head, 2 whole projection. With `cache` (the layer's K
/// and V caches and the cache's first row in them) the kernel also stores the block's finished k
/// and v rows at `start..` — what attention's kv_store would do, without its dispatch.
#[allow(clippy::too_many_arguments)]
pub fn record_qk_norm_rope(
    ctx: &mut Ctx,
    qkv: &GpuBuffer,
    rows: usize,
    q_norm: &GpuBuffer,
    k_norm: &GpuBuffer,
    norm: u32,
    c: &ModelConfig,
    start: usize,
    cache: Option<(&GpuBuffer, &GpuBuffer, usize)>,
) -> Result<(), GpuError> {
    let rope = table(ctx, c, start + rows)?;
    let mut p = params(c, rows, norm);
    p.start = start as u32;
    p.base = cache.map_or(0, |(_, _, base)| base as u32);
    if norm == 2 {
        let grid = Grid::Groups(rows as u32, 1, 1);
        return match cache {
            Some((k, v, _)) => ctx.dispatch(
                &QK_NORM_ROPE_WHOLE_STORE,
                0,
                &p,
                None,
                &[qkv, q_norm, k_norm, &rope, k, v],
                grid,
            ),
            None => ctx.dispatch(
                &QK_NORM_ROPE_WHOLE,
                0,
                &p,
                None,
                &[qkv, q_norm, k_norm, &rope],
                grid,
            ),
        };
    }
    check_head(c)?;
    // One workgroup per (head, token): q and k heads, and the v heads when they are clipped or
    // stored.
    if let Some((k, v, _)) = cache {
        let heads = c.num_heads + 2 * c.num_kv_heads;
        return ctx.dispatch(
            &QK_NORM_ROPE_STORE,
            0,
            &p,
            None,
            &[qkv, q_norm, k_norm, &rope, k, v],
            Grid::Groups(heads as u32, rows as u32, 1),
        );
    }
    let heads = c.num_heads + c.num_kv_heads * (1 + c.clip_qkv.is_some() as usize);
    ctx.dispatch(
        &QK_NORM_ROPE,
        0,
        &p,
        None,
        &[qkv, q_norm, k_norm, &rope],
        Grid::Groups(heads as u32, rows as u32, 1),
    )
}

/// The store kernels over the rows of several sequences of a batched pass whose caches share the
/// layer buffers `k` / `v`: `row_tab` is each row's (position, cache row), `end` one past the
/// largest position.
#[allow(clippy::too_many_arguments)]
pub fn record_qk_norm_rope_seqs(
    ctx: &mut Ctx,
    qkv: &GpuBuffer,
    q_norm: &GpuBuffer,
    k_norm: &GpuBuffer,
    norm: u32,
    c: &ModelConfig,
    row_tab: &[[u32; 2]],
    end: usize,
    (k, v): (&GpuBuffer, &GpuBuffer),
) -> Result<(), GpuError> {
    let rows = row_tab.len();
    let rope = table(ctx, c, end)?;
    let p = params(c, rows, norm);
    let input = bytemuck::cast_slice(row_tab);
    let bufs = [qkv, q_norm, k_norm, &rope, k, v];
    if norm == 2 {
        let grid = Grid::Groups(rows as u32, 1, 1);
        return ctx.dispatch(
            &QK_NORM_ROPE_WHOLE_STORE_SEQS,
            0,
            &p,
            Some(input),
            &bufs,
            grid,
        );
    }
    check_head(c)?;
    let heads = c.num_heads + 2 * c.num_kv_heads;
    let grid = Grid::Groups(heads as u32, rows as u32, 1);
    ctx.dispatch(&QK_NORM_ROPE_STORE_SEQS, 0, &p, Some(input), &bufs, grid)
}

fn check_head(c: &ModelConfig) -> Result<(), GpuError> {
    if c.head_dim > MAX_HEAD_DIM {
        return Err(GpuError::Unsupported(format!(
            "head_dim {} (the q/k norm + RoPE kernel holds at most {MAX_HEAD_DIM})",
            c.head_dim
        )));
    }
    Ok(())
}

/// The params of `rows` rows at position 0 of cache row 0.
fn params(c: &ModelConfig, rows: usize, norm: u32) -> RopeParams {
    RopeParams {
        t: rows as u32,
        nq: c.num_heads as u32,
        nkv: c.num_kv_heads as u32,
        hd: c.head_dim as u32,
        rot_half: (c.rotary_dim / 2) as u32,
        norm,
        start: 0,
        clip_on: c.clip_qkv.is_some() as u32,
        clip: c.clip_qkv.unwrap_or(0.0),
        eps: c.rms_norm_eps as f32,
        base: 0,
        _pad: 0,
    }
}

/// [`Backend::qk_norm_rope`] on the GPU.
pub(in crate::backend::gpu) fn qk_norm_rope(
    b: &GpuBackend,
    qkv: &mut GpuAct,
    q_norm: Option<&GpuWeight>,
    k_norm: Option<&GpuWeight>,
    c: &ModelConfig,
    start: usize,
) -> backend::Result<()> {
    shapes::qkv("qk_norm_rope", qkv.cols, c)?;
    let (norm, qn, kn) = b.qk_norms("qk_norm_rope", q_norm, k_norm, c)?;
    b.with(|ctx| {
        Ok(record_qk_norm_rope(
            ctx, &qkv.buf, qkv.rows, &qn, &kn, norm, c, start, None,
        )?)
    })
}
