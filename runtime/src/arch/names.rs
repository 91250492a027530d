//! Canonical tensor names inside a model file (docs/FORMAT.md), written by `import/` and read by
//! the model, the backends and the expert pager.

pub const EMBED: &str = "embed";
pub const FINAL_NORM: &str = "final_norm";
pub const LM_HEAD: &str = "lm_head";
pub fn layer(l: usize, what: &str) -> String {
    format!("layers.{l}.{what}")
}
pub const ATTN_NORM: &str = "attn_norm";
pub const QKV: &str = "attn.qkv";
pub const Q_NORM: &str = "attn.q_norm";
pub const K_NORM: &str = "attn.k_norm";
pub const O: &str = "attn.o";
pub const FFN_NORM: &str = "ffn_norm";
pub const MLP_GATE_UP: &str = "mlp.gate_up";
pub const MLP_DOWN: &str = "mlp.down";
pub const ROUTER: &str = "moe.router";
pub const ROUTER_BIAS: &str = "moe.router_bias";
pub const SHARED_GATE_UP: &str = "moe.shared.gate_up";
pub const SHARED_DOWN: &str = "moe.shared.down";
/// `[2, hidden]`: bias, then scale of the input embedding (`EmbeddingKind::Affine`).
pub const EMBED_AFFINE: &str = "embed_affine";
/// `[4, hidden]` each (`ResidualKind::Scaled`): block-output bias, block-output scale,
/// residual bias, residual scale.
pub const ATTN_RESIDUAL: &str = "attn_residual";
pub const FFN_RESIDUAL: &str = "ffn_residual";
/// CCA (`AttentionKind::Cca`): the convolutions over time and the key temperature.
pub const CONV_DW: &str = "attn.conv_dw";
pub const CONV_DW_BIAS: &str = "attn.conv_dw_bias";
pub const CONV_GROUPED: &str = "attn.conv_grouped";
pub const CONV_GROUPED_BIAS: &str = "attn.conv_grouped_bias";
pub const CCA_TEMP: &str = "attn.temp";
/// MLP router (`RouterKind::MlpEda`); `moe.router` is its output projection and
/// `moe.router_bias` its selection bias, both over `num_experts + 1` classes.
pub const ROUTER_DOWN: &str = "moe.router_down";
pub const ROUTER_DOWN_BIAS: &str = "moe.router_down_bias";
pub const ROUTER_EDA: &str = "moe.router_eda_scale";
pub const ROUTER_NORM: &str = "moe.router_norm";
pub const ROUTER_FC1: &str = "moe.router_fc1";
pub const ROUTER_FC1_BIAS: &str = "moe.router_fc1_bias";
pub const ROUTER_FC2: &str = "moe.router_fc2";
pub const ROUTER_FC2_BIAS: &str = "moe.router_fc2_bias";
/// Parts of one routed expert.
pub const EXPERT_GATE_UP: &str = "gate_up";
pub const EXPERT_DOWN: &str = "down";
/// Gemma's sandwich block (`NormLayout::Sandwich`, `FfnLayout::DenseAndMoe`): the norm after
/// attention, the dense MLP's and the experts' own post-norms, the experts' input norm, the norm
/// of their sum, and `[2]` layer scalars (canvas decoder, then encoder).
pub const ATTN_POST_NORM: &str = "attn_post_norm";
pub const MLP_POST_NORM: &str = "mlp_post_norm";
pub const MOE_NORM: &str = "moe_norm";
pub const MOE_POST_NORM: &str = "moe_post_norm";
pub const FFN_POST_NORM: &str = "ffn_post_norm";
pub const LAYER_SCALAR: &str = "layer_scalar";
/// The scaled-norm router (`RouterKind::ScaledNorm`): `[hidden]` input scale, `[experts]` output
/// scale; `moe.router` is its projection.
pub const ROUTER_SCALE: &str = "moe.router_scale";
pub const EXPERT_SCALE: &str = "moe.expert_scale";
/// The canvas decoder's self-conditioning block: pre-norm `[hidden]`, GeGLU gate/up and down.
pub const SELF_COND_NORM: &str = "self_cond.norm";
pub const SELF_COND_GATE_UP: &str = "self_cond.gate_up";
pub const SELF_COND_DOWN: &str = "self_cond.down";
