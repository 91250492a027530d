//! CPU reference of the ops DiffusionGemma adds (transformers' `modeling_diffusion_gemma.py`, 5.17):
//! attention layers of their own geometry (per-head q/k RMSNorm with weights, weightless v norm,
//! K = V global layers, RoPE that rotates a subset of pairs across the whole head, score scale 1,
//! the canvas decoder's sliding rule), the scaled-norm router, GELU(tanh), the self-conditioning
//! soft embeddings and the final logit softcap. Plain f32 loops, as the rest of the CPU backend.

use super::{dot, rms_norm_row, shape_err, CpuAct, CpuBackend, CpuKv, CpuRouting, CpuWeight};
use crate::arch::Rope;
use crate::backend::shapes;
use crate::backend::{Backend, BackendError, HeadsParams, Result, ScaledRouterParams};

/// GELU with the tanh approximation (PyTorch's `gelu(approximate="tanh")`,
/// transformers' `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `cap · tanh(v / cap)` in place.
pub fn softcap(values: &mut [f32], cap: f32) {
    values.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
}

/// Rotates the pairs `(i, i + offset)`, `i < pairs`, of one head by `pos · θ^(−2i/denom)`.
fn rope_head(head: &mut [f32], rope: &Rope, pos: usize) {
    for i in 0..rope.pairs {
        // θ^(−2i/denom) in f32, as transformers builds inv_freq; the angle in f64.
        let inv_freq = 1.0 / (rope.theta as f32).powf((2 * i) as f32 / rope.denom as f32);
        let (sin, cos) = (pos as f64 * inv_freq as f64).sin_cos();
        let (sin, cos) = (sin as f32, cos as f32);
        let (a, b) = (head[i], head[i + rope.offset]);
        head[i] = a * cos - b * sin;
        head[i + rope.offset] = b * cos + a * sin;
    }
}

pub fn prepare_heads(
    proj: &CpuAct,
    q_norm: &CpuWeight,
    k_norm: &CpuWeight,
    p: HeadsParams,
) -> Result<CpuAct> {
    let g = p.geom;
    let (hd, qd, kd) = (g.head_dim, g.q_dim(), g.kv_dim());
    shapes::heads(proj.cols, &g)?;
    if q_norm.data.len() != hd || k_norm.data.len() != hd {
        return Err(shape_err(
            "prepare_heads",
            format!(
                "q/k norm weights of {} and {} for heads of {hd}",
                q_norm.data.len(),
                k_norm.data.len()
            ),
        ));
    }
    let ones = vec![1.0; hd];
    let width = qd + 2 * kd;
    let mut out = CpuAct::new(proj.rows, width, vec![0.0; proj.rows * width]);
    for t in 0..proj.rows {
        let src = proj.row(t);
        let pos = p.start + t;
        let dst = out.row_mut(t);
        let (q, rest) = dst.split_at_mut(qd);
        let (k, v) = rest.split_at_mut(kd);
        // v is taken before k's norm and RoPE: for K = V layers it is k's raw projection.
        let v_src = if g.has_v {
            &src[qd + kd..qd + 2 * kd]
        } else {
            &src[qd..qd + kd]
        };
        for (dst, src, w) in [
            (&mut *q, &src[..qd], &q_norm.data),
            (&mut *k, &src[qd..qd + kd], &k_norm.data),
        ] {
            for (head, src) in dst.chunks_mut(hd).zip(src.chunks(hd)) {
                rms_norm_row(src, w, p.eps, head);
                rope_head(head, &g.rope, pos);
            }
        }
        for (head, src) in v.chunks_mut(hd).zip(v_src.chunks(hd)) {
            if p.v_norm {
                rms_norm_row(src, &ones, p.eps, head);
            } else {
                head.copy_from_slice(src);
            }
        }
    }
    Ok(out)
}

pub fn attention_heads(qkv: &CpuAct, kv: &mut CpuKv, p: HeadsParams) -> Result<CpuAct> {
    let g = p.geom;
    let (hd, qd, kd) = (g.head_dim, g.q_dim(), g.kv_dim());
    let t_len = qkv.rows;
    let (start, kv_len) = (p.start, p.kv_len);
    if qkv.cols != qd + 2 * kd {
        return Err(shape_err(
            "attention_heads",
            format!("qkv width {} vs {}", qkv.cols, qd + 2 * kd),
        ));
    }
    if kv.dims.get(p.layer) != Some(&kd) || g.kv_heads == 0 || !g.heads.is_multiple_of(g.kv_heads) {
        return Err(shape_err(
            "attention_heads",
            format!(
                "layer {} caches rows of {:?}, the pass has {kd}",
                p.layer,
                kv.dims.get(p.layer)
            ),
        ));
    }
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
    for t in 0..t_len {
        let row = qkv.row(t);
        let at = (start + t) * kd;
        kv.k[p.layer][at..at + kd].copy_from_slice(&row[qd..qd + kd]);
        kv.v[p.layer][at..at + kd].copy_from_slice(&row[qd + kd..qd + 2 * kd]);
    }
    let visible = |pos: usize, j: usize| -> bool {
        if !p.mask.visible(pos, j) {
            return false;
        }
        match g.window {
            None => true,
            Some(w) if p.window_at_start => j >= start || start - j < w,
            Some(w) => j > pos || pos - j < w,
        }
    };
    let group = g.heads / g.kv_heads;
    let (keys, values) = (&kv.k[p.layer], &kv.v[p.layer]);
    let mut out = vec![0.0; t_len * qd];
    let mut scores = vec![0.0f32; kv_len];
    for t in 0..t_len {
        let pos = start + t;
        for h in 0..g.heads {
            let q = &qkv.row(t)[h * hd..(h + 1) * hd];
            let kvh = h / group;
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                *s = if visible(pos, j) {
                    dot(q, &keys[j * kd + kvh * hd..j * kd + (kvh + 1) * hd]) * p.scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(*s);
            }
            if max == f32::NEG_INFINITY {
                continue;
            }
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[t * qd + h * hd..t * qd + (h + 1) * hd];
            for (j, &e) in scores.iter().enumerate() {
                if e == 0.0 {
                    continue;
                }
                let v = &values[j * kd + kvh * hd..j * kd + (kvh + 1) * hd];
                let w = e / sum;
                for (oi, vi) in o.iter_mut().zip(v) {
                    *oi += w * vi;
                }
            }
        }
    }
    Ok(CpuAct::new(t_len, qd, out))
}

pub fn route_scaled(
    b: &CpuBackend,
    x: &CpuAct,
    proj: &CpuWeight,
    scale: &CpuWeight,
    expert_scale: &CpuWeight,
    p: ScaledRouterParams,
) -> Result<CpuRouting> {
    let (h, n, k) = (x.cols, p.experts, p.top_k);
    if proj.rows != n || proj.cols != h || scale.data.len() != h || expert_scale.data.len() != n {
        return Err(shape_err(
            "route_scaled",
            format!(
                "router [{}, {}], scale {}, expert scale {} for width {h} and {n} experts",
                proj.rows,
                proj.cols,
                scale.data.len(),
                expert_scale.data.len()
            ),
        ));
    }
    if k == 0 || k > n {
        return Err(shape_err("route_scaled", format!("top_k {k} of {n}")));
    }
    let root = (h as f64).powf(-0.5) as f32;
    let ones = vec![1.0; h];
    let mut normed = CpuAct::new(x.rows, h, vec![0.0; x.data.len()]);
    for t in 0..x.rows {
        let row = normed.row_mut(t);
        rms_norm_row(x.row(t), &ones, p.eps, row);
        for (v, s) in row.iter_mut().zip(&scale.data) {
            *v = *v * s * root;
        }
    }
    let logits = b.matmul(proj, &normed)?;
    let mut ids = Vec::with_capacity(x.rows * k);
    let mut weights = Vec::with_capacity(x.rows * k);
    for t in 0..x.rows {
        let (i, w) = super::route_row(
            logits.row(t),
            None,
            k,
            crate::arch::Gating::Softmax { renormalize: true },
        );
        weights.extend(
            i.iter()
                .zip(&w)
                .map(|(&e, w)| w * expert_scale.data[e as usize]),
        );
        ids.extend(i);
    }
    Ok(CpuRouting { k, ids, weights })
}

pub fn soft_embed(logits: &[f32], table: &CpuWeight, s: f32) -> Result<CpuAct> {
    let (v, h) = (table.rows, table.cols);
    if v == 0 || !logits.len().is_multiple_of(v) {
        return Err(shape_err(
            "soft_embed",
            format!("{} logits for a vocabulary of {v}", logits.len()),
        ));
    }
    let rows = logits.len() / v;
    let mut out = vec![0.0f32; rows * h];
    let mut probs = vec![0.0f32; v];
    for (r, row) in logits.chunks(v).enumerate() {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for (p, &l) in probs.iter_mut().zip(row) {
            *p = (l - max).exp();
            sum += *p;
        }
        let o = &mut out[r * h..(r + 1) * h];
        for (tok, &p) in probs.iter().enumerate() {
            let w = p / sum;
            for (oi, e) in o.iter_mut().zip(table.row(tok)) {
                *oi += w * e;
            }
        }
        o.iter_mut().for_each(|x| *x *= s);
    }
    Ok(CpuAct::new(rows, h, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::LayerAttention;
    use crate::backend::AttnMask;

    fn weight(data: Vec<f32>) -> CpuWeight {
        CpuWeight {
            rows: 1,
            cols: data.len(),
            data,
        }
    }

    fn geom(has_v: bool, window: Option<usize>, rope: Rope) -> LayerAttention {
        LayerAttention {
            heads: 2,
            kv_heads: 1,
            head_dim: 6,
            has_v,
            rope,
            window,
        }
    }

    fn params(g: LayerAttention, start: usize, kv_len: usize, at_start: bool) -> HeadsParams {
        HeadsParams {
            layer: 0,
            geom: g,
            eps: 1e-6,
            v_norm: true,
            scale: 1.0,
            start,
            kv_len,
            mask: AttnMask::Bidirectional,
            window_at_start: at_start,
        }
    }

    const NO_ROPE: Rope = Rope {
        theta: 10_000.0,
        pairs: 0,
        offset: 3,
        denom: 6,
    };

    #[test]
    fn gelu_tanh_matches_known_values() {
        // torch.nn.functional.gelu(x, approximate="tanh") at -2, 0, 1, 3.
        for (x, want) in [
            (-2.0, -0.045_402_3),
            (0.0, 0.0),
            (1.0, 0.841_192),
            (3.0, 2.996_363_7),
        ] {
            assert!((gelu_tanh(x) - want).abs() < 1e-5, "gelu({x})");
        }
    }

    #[test]
    fn softcap_bounds_and_keeps_small_values() {
        let mut v = vec![1e4, -1e4, 0.3];
        softcap(&mut v, 30.0);
        assert!((v[0] - 30.0).abs() < 1e-4 && (v[1] + 30.0).abs() < 1e-4);
        assert!((v[2] - 0.3).abs() < 1e-4);
    }

    #[test]
    fn proportional_rope_leaves_unrotated_pairs_and_pairs_across_the_head() {
        // One rotated pair (0, 3) of a 6-dim head: dims 1, 2, 4, 5 pass unchanged.
        let rope = Rope {
            theta: 100.0,
            pairs: 1,
            offset: 3,
            denom: 6,
        };
        let mut h = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        rope_head(&mut h, &rope, 2);
        let (s, c) = 2f32.sin_cos();
        assert!((h[0] - (c - 4.0 * s)).abs() < 1e-6 && (h[3] - (4.0 * c + s)).abs() < 1e-6);
        assert_eq!([h[1], h[2], h[4], h[5]], [2.0, 3.0, 5.0, 6.0]);
    }

    #[test]
    fn k_eq_v_takes_v_from_the_raw_k_projection() {
        // [q (2 heads × 6) | k (6)], no v rows.
        let g = geom(false, None, NO_ROPE);
        let proj: Vec<f32> = (0..18).map(|i| i as f32 * 0.25 - 1.0).collect();
        let out = prepare_heads(
            &CpuAct::new(1, 18, proj.clone()),
            &weight(vec![1.0; 6]),
            &weight(vec![2.0; 6]),
            params(g, 0, 1, false),
        )
        .unwrap();
        assert_eq!(out.cols, 24);
        let k_raw = &proj[12..18];
        let ms = k_raw.iter().map(|v| v * v).sum::<f32>() / 6.0;
        let inv = 1.0 / (ms + 1e-6).sqrt();
        for (i, k) in k_raw.iter().enumerate() {
            assert!((out.data[12 + i] - 2.0 * k * inv).abs() < 1e-5, "k");
            assert!((out.data[18 + i] - k * inv).abs() < 1e-5, "v");
        }
    }

    /// The canvas rule: every canvas row sees the `w − 1` cached positions before the pass and
    /// the whole canvas; the encoder's rule slides with the query.
    #[test]
    fn window_at_start_sees_the_last_w_minus_1_prefix_keys_from_every_canvas_row() {
        let g = geom(true, Some(3), NO_ROPE);
        let (start, canvas, width) = (5, 4, 24);
        // q = k = 0, so weights are uniform over the visible keys; v's first dim is 2^position,
        // so the output's first dim is the mean of 2^j over the visible j.
        let mut v = vec![0.0; 16 * 6];
        for j in 0..start {
            v[j * 6] = (1u32 << j) as f32;
        }
        let mut rows = vec![0.0; canvas * width];
        for t in 0..canvas {
            rows[t * width + 18] = (1u32 << (start + t)) as f32;
        }
        let qkv = CpuAct::new(canvas, width, rows);
        let mut config = crate::synth::build(&crate::synth::SynthSpec::tiny(
            crate::arch::Architecture::Qwen3Moe,
        ))
        .unwrap()
        .meta
        .config;
        (config.num_heads, config.num_kv_heads, config.head_dim) = (2, 1, 6);
        let run = |at_start: bool| -> Vec<f32> {
            let mut kv = CpuBackend.new_kv(&config, 16).unwrap();
            kv.v[0] = v.clone();
            let mut p = params(g, start, start + canvas, at_start);
            p.v_norm = false;
            let out = attention_heads(&qkv, &mut kv, p).unwrap();
            (0..canvas).map(|t| out.row(t)[0]).collect()
        };
        let mean =
            |js: &[usize]| js.iter().map(|&j| (1u32 << j) as f32).sum::<f32>() / js.len() as f32;
        // Canvas rule: prefix 3, 4 (w − 1 = 2 positions) and canvas 5..9, for every row.
        for o in run(true) {
            assert!((o - mean(&[3, 4, 5, 6, 7, 8])).abs() < 1e-4, "{o}");
        }
        // Query rule: row at 5 + t sees 3 + t and after (later canvas keys: bidirectional).
        let q = run(false);
        assert!((q[0] - mean(&[3, 4, 5, 6, 7, 8])).abs() < 1e-4);
        assert!((q[3] - mean(&[6, 7, 8])).abs() < 1e-4);
    }

    #[test]
    fn scaled_router_renormalises_then_applies_the_expert_scale() {
        let x = CpuAct::new(1, 4, vec![0.5, -1.0, 2.0, 0.1]);
        let proj = CpuWeight {
            rows: 3,
            cols: 4,
            data: vec![
                1.0, 0.0, 0.0, 0.0, //
                0.0, 0.0, 1.0, 0.0, //
                0.0, -1.0, 0.0, 0.0,
            ],
        };
        let r = route_scaled(
            &CpuBackend,
            &x,
            &proj,
            &weight(vec![1.0; 4]),
            &weight(vec![1.0, 3.0, 0.5]),
            ScaledRouterParams {
                experts: 3,
                top_k: 2,
                eps: 1e-6,
            },
        )
        .unwrap();
        // Scores ∝ normed x (0.5, 2.0, 1.0)/rms·½: experts 1 then 2.
        assert_eq!(r.ids, vec![1, 2]);
        let (a, b) = (r.weights[0] / 3.0, r.weights[1] / 0.5);
        assert!((a + b - 1.0).abs() < 1e-6 && a > b);
    }

    #[test]
    fn soft_embed_of_a_sharp_distribution_is_the_scaled_row() {
        let table = CpuWeight {
            rows: 3,
            cols: 2,
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let e = soft_embed(&[0.0, 100.0, 0.0, -50.0, -50.0, 50.0], &table, 2.0).unwrap();
        assert!((e.data[0] - 6.0).abs() < 1e-4 && (e.data[1] - 8.0).abs() < 1e-4);
        assert!((e.data[2] - 10.0).abs() < 1e-4 && (e.data[3] - 12.0).abs() < 1e-4);
        assert!(soft_embed(&[0.0; 4], &table, 1.0).is_err());
    }
}
