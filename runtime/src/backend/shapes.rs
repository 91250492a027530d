//! Shape checks every backend makes the same way, written once on plain dimensions: the CPU
//! reference and the GPU backend refuse the same bad input with the same typed error
//! ([`BackendError::Shape`], or [`BackendError::CacheFull`]) before any work is recorded.

use std::ops::Range;

use super::{AttnMask, BackendError, Result};
use crate::arch::{LayerAttention, ModelConfig};

/// `[rows, cols]` of an activation or a weight.
pub(crate) type Dims = (usize, usize);

pub(crate) fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// `rows` lies within an activation of `total` rows.
pub(crate) fn rows_within(op: &'static str, rows: &Range<usize>, total: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > total {
        return Err(shape_err(op, format!("rows {rows:?} of {total}")));
    }
    Ok(())
}

/// Cells `from..from + t` (at least one) of a canvas of `n` cells
/// ([`super::Backend::embed_canvas`]).
pub(crate) fn canvas_cells(from: usize, t: usize, n: usize) -> Result<()> {
    if t == 0 || from.checked_add(t).is_none_or(|end| end > n) {
        return Err(shape_err(
            "embed_canvas",
            format!("{t} cells from cell {from} of a canvas of {n}"),
        ));
    }
    Ok(())
}

/// The one width of parts stacked row after row (0 for none).
pub(crate) fn same_widths(
    op: &'static str,
    widths: impl IntoIterator<Item = usize>,
) -> Result<usize> {
    let mut widths = widths.into_iter();
    let first = widths.next().unwrap_or(0);
    match widths.find(|&w| w != first) {
        Some(w) => Err(shape_err(op, format!("widths {first} and {w}"))),
        None => Ok(first),
    }
}

/// `x + delta`, element by element.
pub(crate) fn same_shape(op: &'static str, x: Dims, delta: Dims) -> Result<()> {
    if x != delta {
        return Err(shape_err(
            op,
            format!("[{}, {}] + [{}, {}]", x.0, x.1, delta.0, delta.1),
        ));
    }
    Ok(())
}

/// A norm weight of `len` values over rows `width` wide.
pub(crate) fn norm(op: &'static str, len: usize, width: usize) -> Result<()> {
    if len != width {
        return Err(shape_err(op, format!("norm weight {len} vs width {width}")));
    }
    Ok(())
}

/// `x [t, k] · wᵀ` for a weight `[n, k]`.
pub(crate) fn matmul(op: &'static str, w: Dims, x: Dims) -> Result<()> {
    if w.1 != x.1 {
        return Err(shape_err(
            op,
            format!("weight [{}, {}] × x [{}, {}]", w.0, w.1, x.0, x.1),
        ));
    }
    Ok(())
}

/// An LM head `[vocab, k]` over rows `width` wide.
pub(crate) fn head(op: &'static str, head: Dims, width: usize) -> Result<()> {
    if head.1 != width {
        return Err(shape_err(
            op,
            format!("head [{}, {}] × x width {width}", head.0, head.1),
        ));
    }
    Ok(())
}

/// A router `[experts, k]` (and its bias of `experts` values) over rows `width` wide.
pub(crate) fn router(
    router: Dims,
    bias: Option<usize>,
    width: usize,
    c: &ModelConfig,
) -> Result<()> {
    let n = c.moe.num_experts;
    if router.0 != n || router.1 != width {
        return Err(shape_err(
            "route",
            format!("router has {} outputs for {n} experts", router.0),
        ));
    }
    if let Some(len) = bias.filter(|&len| len != n) {
        return Err(shape_err(
            "route",
            format!("router bias of {len} for {n} experts"),
        ));
    }
    Ok(())
}

/// Fused q/k/v rows `width` wide.
pub(crate) fn qkv(op: &'static str, width: usize, c: &ModelConfig) -> Result<()> {
    if width != c.qkv_dim() {
        return Err(shape_err(op, format!("width {width} vs {}", c.qkv_dim())));
    }
    Ok(())
}

/// Attention of a block of `qkv` rows at `start..start + rows` over the first `kv_len` cached
/// positions of layer `layer` (of `layers`) in a cache of `capacity` positions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    qkv: Dims,
    layer: usize,
    layers: usize,
    c: &ModelConfig,
    start: usize,
    kv_len: usize,
    capacity: usize,
    mask: AttnMask,
) -> Result<()> {
    let end = start + qkv.0;
    if end > capacity || kv_len > capacity {
        return Err(BackendError::CacheFull {
            pos: end.max(kv_len),
            capacity,
        });
    }
    if kv_len < end {
        return Err(shape_err(
            "attention",
            format!("kv_len {kv_len} < end of block {end}"),
        ));
    }
    if qkv.1 != c.qkv_dim() || layer >= layers {
        return Err(shape_err(
            "attention",
            format!("width {} vs {}, layer {layer}", qkv.1, c.qkv_dim()),
        ));
    }
    if matches!(mask, AttnMask::BlockCausal(0)) {
        return Err(shape_err("attention", "block size 0".into()));
    }
    Ok(())
}

/// The fused projection `[T, proj_cols]` of a layer with head geometry `g` ([`super::Backend::prepare_heads`]),
/// and its partial RoPE inside a head.
pub(crate) fn heads(proj_cols: usize, g: &LayerAttention) -> Result<()> {
    if proj_cols != g.proj_dim() {
        return Err(shape_err(
            "prepare_heads",
            format!("projection width {proj_cols} vs {}", g.proj_dim()),
        ));
    }
    let (r, hd) = (&g.rope, g.head_dim);
    if r.pairs > 0 && (r.pairs > r.offset || r.offset + r.pairs > hd) {
        return Err(shape_err(
            "prepare_heads",
            format!(
                "RoPE of {} pairs at offset {} in a head of {hd}",
                r.pairs, r.offset
            ),
        ));
    }
    Ok(())
}

/// [`super::Backend::canvas_head`]: one uniform per row of `x`, the tied head `[V, H]` over rows
/// `H` wide, a finite temperature and cap above 0.
pub(crate) fn canvas_head(
    x: Dims,
    table: Dims,
    uniforms: usize,
    p: &super::draw::CanvasHeadParams,
) -> Result<()> {
    const OP: &str = "canvas_head";
    head(OP, table, x.1)?;
    if uniforms != x.0 {
        return Err(shape_err(
            OP,
            format!("{uniforms} uniforms for {} canvas rows", x.0),
        ));
    }
    let positive = |v: f32| v.is_finite() && v > 0.0;
    if !positive(p.temperature) || !p.cap.is_none_or(positive) || !p.embed_scale.is_finite() {
        return Err(shape_err(
            OP,
            format!(
                "temperature {}, cap {:?}, embedding scale {}: want finite, temperature and cap > 0",
                p.temperature, p.cap, p.embed_scale
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_shape(r: Result<impl std::fmt::Debug>, op: &str, detail: &str) {
        match r {
            Err(BackendError::Shape { op: o, detail: d }) => {
                assert_eq!((o, d.as_str()), (op, detail))
            }
            other => panic!("expected a shape error, got {other:?}"),
        }
    }

    #[test]
    fn each_check_names_the_op_and_the_sizes() {
        assert!(rows_within("logits", &(2..5), 5).is_ok());
        is_shape(
            rows_within("logits", &(2..6), 5),
            "logits",
            "rows 2..6 of 5",
        );
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 3..2;
        is_shape(
            rows_within("rows_of", &backwards, 5),
            "rows_of",
            "rows 3..2 of 5",
        );
        assert_eq!(same_widths("stack_rows", [4, 4, 4]).unwrap(), 4);
        assert_eq!(same_widths("stack_rows", []).unwrap(), 0);
        is_shape(
            same_widths("stack_rows", [4, 4, 3]),
            "stack_rows",
            "widths 4 and 3",
        );
        assert!(same_shape("add", (2, 3), (2, 3)).is_ok());
        is_shape(same_shape("add", (2, 3), (3, 2)), "add", "[2, 3] + [3, 2]");
        is_shape(
            norm("rms_norm", 7, 8),
            "rms_norm",
            "norm weight 7 vs width 8",
        );
        assert!(matmul("matmul", (5, 8), (3, 8)).is_ok());
        is_shape(
            matmul("matmul", (5, 8), (3, 7)),
            "matmul",
            "weight [5, 8] × x [3, 7]",
        );
        is_shape(
            head("logits", (9, 8), 7),
            "logits",
            "head [9, 8] × x width 7",
        );
    }

    #[test]
    fn attention_refuses_a_full_cache_before_a_bad_shape() {
        let c = crate::synth::build(&crate::synth::SynthSpec::tiny(
            crate::arch::Architecture::Qwen3Moe,
        ))
        .unwrap()
        .meta
        .config;
        let w = c.qkv_dim();
        let ok = |start, kv_len| attention((4, w), 0, 2, &c, start, kv_len, 16, AttnMask::Causal);
        assert!(ok(0, 4).is_ok());
        assert!(matches!(
            ok(14, 18),
            Err(BackendError::CacheFull {
                pos: 18,
                capacity: 16
            })
        ));
        is_shape(ok(2, 5), "attention", "kv_len 5 < end of block 6");
        is_shape(
            attention((4, w), 2, 2, &c, 0, 4, 16, AttnMask::Causal),
            "attention",
            &format!("width {w} vs {w}, layer 2"),
        );
        is_shape(
            attention((4, w), 0, 2, &c, 0, 4, 16, AttnMask::BlockCausal(0)),
            "attention",
            "block size 0",
        );
    }
}
