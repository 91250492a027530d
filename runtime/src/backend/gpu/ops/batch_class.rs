//! Which passes share a batched pass on the GPU ([`crate::backend::Backend::batch_class`]).
//!
//! A batched pass runs several sequences' rows through each kernel at once, and each sequence's
//! rows must come out as its pass alone computes them. Per kernel, what depends on the row count:
//! - norms, RoPE, statistics, the MoE dispatch and combine: one workgroup (or invocation) per row,
//!   nothing shared between rows;
//! - the dense gemv (ops/matmul.rs `Gemv` / `GemvBlocked`, word-a-lane or wide), the GEMV and the
//!   tiled expert kernels, the 16 × 64 tiles (`Tiled`): each output element is one thread's sum
//!   over K in a fixed order (or its lanes' partials added in a fixed order), whichever rows share
//!   its workgroup, so a row's result does not depend on the pass's row count or on the other rows;
//! - which of those kernels runs, though, is chosen by the row count (gemv up to 4 or 16 rows —
//!   the wide one from `gemv_wide_min_t` rows, one-row passes with lanes of their own —, the
//!   tiles beyond, the expert kernels by tokens per expert, the shared expert fused at ≤ 16 rows
//!   or `shared_max_t`),
//!   and so is the tensor-core matmul's tile (16, 32 or 64 rows) and its split along K (by its
//!   tile count). Those choices are made as for one sequence's rows (`State::batch_rows`, set by
//!   `begin_forward` / `begin_head`; ops/matmul.rs `pass_kernel`, ops/moe.rs), and K splits as that
//!   sequence's tiles alone would: each split then sums the same K range of every row, and the
//!   partials are added in split order.
//!
//! So passes may share a pass when every one of those choices comes out the same for their row
//! counts: the class is the vector of the choices' thresholds at the pass's rows, and at the rows it
//! wants from the LM head (whose matmul runs over those). A pass whose LM head would run in
//! several chunks (more rows than a logits scratch holds) runs alone.
//!
//! The tensor-core matmul (matmul_coop.wgsl) computes a row's 16 × 16 fragment the same way
//! wherever the row sits in its tile, so a batched sequence whose rows start mid-tile gets its
//! pass alone's sums; cooperative matrices promise no order within a fragment's dot products, and
//! that is taken to be fixed per element by the hardware. The lavapipe tests cannot check it
//! (lavapipe lends no cooperative matrices); `EDGEDIFF_BATCH_BLOCKS=0` keeps such passes apart.

use super::super::choice::KernelChoice;
use super::super::GpuBackend;
use super::matmul::{coop_tile_t, GEMV_T};
use super::moe::{expert_kernel, ExpertKernel};
use crate::arch::ModelConfig;

/// Bit 0 of a row signature: more rows than the plain gemv's (up to [`GEMV_T`] rows every matmul
/// is a gemv — the word-a-lane one, with its one-row lanes, or the wide one from
/// [`KernelChoice::gemv_wide_min_t`] rows: bits 24 and 25 — and the experts GEMV ones with the
/// shared expert fused).
const PAST_GEMV: u32 = 1;

/// The row-count choices of a pass of `t` rows, as bits (equal bits: equal choices for every
/// weight of the model). `coop`: the device runs the tensor-core matmul.
pub fn row_signature(k: &KernelChoice, coop: bool, t: usize, top_k: usize, experts: usize) -> u32 {
    // Within the gemv's rows too: the wide gemv from its rows on, and one-row passes' lanes.
    // And past the fused-norm forward's rows (its norms summed in the gemvs' order, not the norm
    // kernel's; set past them, so the gemv's rows keep class 0 by default).
    let gemv = u32::from(k.gemv_wide_min_t.is_some_and(|m| t >= m)) << 24
        | u32::from(t == 1 && k.gemv1_lanes != 16) << 25
        | u32::from(t > k.fuse_norms_max_t) << 26
        // Past the shared expert's rows inside the expert kernels (ops/moe.rs fuses_shared).
        | u32::from(t > k.shared_max_t) << 27
        | u32::from(t == 1 && k.wide_f32_lanes1 != 64) << 28
        | u32::from(t == 1 && k.moe_gemv1_lanes != 16) << 29;
    if t <= GEMV_T {
        return gemv;
    }
    let mut s = PAST_GEMV | gemv;
    let mut bit = |i: u32, on: bool| s |= u32::from(on) << i;
    bit(1, t <= k.gemv_max_t);
    bit(2, t <= k.gemv_f32_max_t.max(k.gemv_max_t));
    bit(
        3,
        expert_kernel(k.moe, t, top_k, experts) == ExpertKernel::Gemv,
    );
    if coop {
        bit(4, t >= k.coop_min_t);
        let tile = coop_tile_t(t) as usize;
        // The tile (16, 32, 64: 2 bits) and the tile rows of the grid (K splits go by them).
        s |= (tile.trailing_zeros() - 4) << 5;
        s |= (t.div_ceil(tile).min(0xffff) as u32) << 8;
    }
    s
}

/// [`crate::backend::Backend::batch_class`] on the GPU.
pub(in crate::backend::gpu) fn batch_class(
    b: &GpuBackend,
    c: &ModelConfig,
    rows: usize,
    head_rows: usize,
) -> Option<u64> {
    let (k, coop) = (&b.sh.dev.kernels, b.sh.dev.caps.coop);
    if head_rows > b.head_rows(c.vocab_size) {
        return None;
    }
    let sig = |t| row_signature(k, coop, t, c.moe.top_k, c.moe.num_experts);
    // A pass that wants no logits runs no LM head, so any head choice suits it: it takes one
    // row's, and batches with passes that want one (one-row passes' choices of their own, bits
    // 25 and 28, would otherwise set them apart from it).
    let (body, head) = (sig(rows), sig(head_rows.max(1)));
    if !k.batch_blocks && (body | head) & PAST_GEMV != 0 {
        return None;
    }
    Some(u64::from(body) | u64::from(head) << 32)
}
