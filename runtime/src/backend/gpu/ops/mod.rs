//! One op = one file: its `#[repr(C)]` params struct (mirroring the WGSL struct field for field;
//! sizes checked against naga's layout in tests), its entry points with their bindings, shape
//! checks and grid sizes. The kernels live in `shaders/<op>.wgsl`.

pub mod attention;
pub mod batch_class;
pub mod canvas_draw;
pub mod cca;
pub mod denoise;
pub mod elementwise;
pub mod embed;
pub mod embed_affine;
pub mod gemma;
pub mod heads;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod residual;
pub mod rope;
pub mod router;
pub mod router_mlp;
pub mod scaled;
pub mod soft_embed;
pub mod stats;

use super::kernels::Entry;

/// A reduction of `len` items split over workgroups (flash-decoding's keys, soft_embed's
/// vocabulary): `groups` workgroups before splitting, splits added until `target` workgroups, at
/// most `fit` splits (their partials' buffer), each at least `min` items and a multiple of it.
/// (items per split, splits).
pub fn reduction_splits(
    len: usize,
    groups: usize,
    target: usize,
    fit: usize,
    min: usize,
) -> (usize, usize) {
    let len = len.max(1);
    let want = target
        .div_ceil(groups.max(1))
        .min(fit)
        .clamp(1, len.div_ceil(min));
    let per = len.div_ceil(want).next_multiple_of(min);
    (per, len.div_ceil(per))
}

/// Every entry point with the size of the host params struct it is dispatched with.
pub fn all_entries() -> Vec<(&'static Entry, usize)> {
    use std::mem::size_of;
    vec![
        (&attention::KV_STORE, size_of::<attention::AttnParams>()),
        (&attention::ATTEND, size_of::<attention::AttnParams>()),
        (&attention::ATTEND_GQA, size_of::<attention::AttnParams>()),
        (&attention::ATTEND_MERGE, size_of::<attention::AttnParams>()),
        (
            &attention::ATTEND_GQA_SEQS,
            size_of::<attention::AttnParams>(),
        ),
        (
            &attention::ATTEND_MERGE_SEQS,
            size_of::<attention::AttnParams>(),
        ),
        (
            &attention::ATTEND_COMBINE,
            size_of::<attention::AttnParams>(),
        ),
        (&elementwise::ADD, size_of::<elementwise::EwParams>()),
        (&elementwise::SWIGLU, size_of::<elementwise::EwParams>()),
        (&elementwise::FILL, size_of::<elementwise::EwParams>()),
        (&elementwise::COPY16, size_of::<elementwise::EwParams>()),
        (
            &elementwise::GATHER_ROWS,
            size_of::<elementwise::EwParams>(),
        ),
        (&embed::EMBED, size_of::<embed::EmbedParams>()),
        (&matmul::GEMV, size_of::<matmul::MatmulParams>()),
        (&matmul::GEMV_SWIGLU, size_of::<matmul::MatmulParams>()),
        (&matmul::GEMV_WIDE, size_of::<matmul::MatmulParams>()),
        (&matmul::GEMV_WIDE_SWIGLU, size_of::<matmul::MatmulParams>()),
        (&matmul::GEMM, size_of::<matmul::MatmulParams>()),
        (&matmul::GEMM_COOP, size_of::<matmul::MatmulParams>()),
        (&matmul::SPLIT_SUM, size_of::<matmul::MatmulParams>()),
        (&matmul::EXPERT_GATE_UP, size_of::<matmul::ExpertParams>()),
        (&matmul::EXPERT_DOWN, size_of::<matmul::ExpertParams>()),
        (&moe::DISPATCH, size_of::<moe::MoeParams>()),
        (&moe::COMBINE, size_of::<moe::MoeParams>()),
        (&moe::COMBINE_ADD, size_of::<moe::MoeParams>()),
        (&moe::COMBINE_NORM, size_of::<moe::MoeParams>()),
        (&moe::COMBINE_RESIDUAL, size_of::<moe::MoeParams>()),
        (&moe::GATE_UP_GEMV, size_of::<matmul::ExpertParams>()),
        (&moe::DOWN_GEMV, size_of::<matmul::ExpertParams>()),
        (&moe::GATE_UP_WIDE, size_of::<matmul::ExpertParams>()),
        (&moe::DOWN_WIDE, size_of::<matmul::ExpertParams>()),
        (&norm::RMS_NORM, size_of::<norm::NormParams>()),
        (&norm::ADD_RMS_NORM, size_of::<norm::NormParams>()),
        (&rope::QK_NORM_ROPE, size_of::<rope::RopeParams>()),
        (&rope::QK_NORM_ROPE_WHOLE, size_of::<rope::RopeParams>()),
        (&rope::QK_NORM_ROPE_STORE, size_of::<rope::RopeParams>()),
        (
            &rope::QK_NORM_ROPE_WHOLE_STORE,
            size_of::<rope::RopeParams>(),
        ),
        (
            &rope::QK_NORM_ROPE_STORE_SEQS,
            size_of::<rope::RopeParams>(),
        ),
        (
            &rope::QK_NORM_ROPE_WHOLE_STORE_SEQS,
            size_of::<rope::RopeParams>(),
        ),
        (&router::ROUTE, size_of::<router::RouterParams>()),
        (&router::BLOCK_MASK, size_of::<router::BlockMaskParams>()),
        (&cca::CCA_STORE, size_of::<cca::CcaGpuParams>()),
        (&cca::CCA_CONV, size_of::<cca::CcaGpuParams>()),
        (&cca::CCA_FINISH, size_of::<cca::CcaGpuParams>()),
        (
            &router_mlp::MLP_BIAS_ACT,
            size_of::<router_mlp::MlpRouterGpuParams>(),
        ),
        (
            &router_mlp::MLP_ROUTE_SELECT,
            size_of::<router_mlp::MlpRouterGpuParams>(),
        ),
        (
            &scaled::SCALED_RESIDUAL_NORM,
            size_of::<scaled::ScaledParams>(),
        ),
        (
            &embed_affine::EMBED_AFFINE,
            size_of::<scaled::ScaledParams>(),
        ),
        (&gemma::SCALE, size_of::<gemma::GemmaParams>()),
        (&gemma::GEGLU, size_of::<gemma::GemmaParams>()),
        (&gemma::SOFTCAP, size_of::<gemma::GemmaParams>()),
        (&gemma::EXPERT_SCALE, size_of::<gemma::GemmaParams>()),
        (
            &soft_embed::SOFT_MAX,
            size_of::<soft_embed::SoftEmbedParams>(),
        ),
        (
            &soft_embed::SOFT_EMBED,
            size_of::<soft_embed::SoftEmbedParams>(),
        ),
        (
            &soft_embed::SOFT_EMBED_SUM,
            size_of::<soft_embed::SoftEmbedParams>(),
        ),
        (
            &canvas_draw::CANVAS_DRAW,
            size_of::<canvas_draw::DrawParams>(),
        ),
        (&heads::PREPARE_HEADS, size_of::<heads::HeadsGpuParams>()),
        (&heads::HEADS_STORE, size_of::<heads::HeadsGpuParams>()),
        (&heads::ATTEND_HEADS, size_of::<heads::HeadsGpuParams>()),
        (
            &heads::ATTEND_HEADS_COMBINE,
            size_of::<heads::HeadsGpuParams>(),
        ),
        (&stats::PARTIAL, size_of::<stats::StatsParams>()),
        (&stats::MERGE, size_of::<stats::StatsParams>()),
        (&denoise::COMMIT, size_of::<denoise::CommitGpuParams>()),
        (&embed::EMBED_DEVICE_IDS, size_of::<embed::EmbedParams>()),
    ]
}
