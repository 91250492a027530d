//! ZAYA1's ops on the CPU, plainly in f32: CCA attention inputs with their per-position state, the
//! MLP router with EDA and the skip expert, scaled residuals and the affine input embedding.
//! The math follows transformers' `models/zaya/modeling_zaya.py` (`ZayaCCAProjection`,
//! `ZayaQKNorm`, `ZayaRouter`, `ZayaResidualScaling`, `ZayaModel.forward`):
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/zaya/modeling_zaya.py>

use super::block_routing::mlp_block_masks;
use super::{dot, rms_norm_row, shape_err, CpuAct, CpuRouting, CpuWeight};
use crate::backend::{
    BackendError, CcaParams, CcaWeights, MlpRouterParams, MlpRouterWeights, Result,
};

/// What a CCA layer keeps per position besides K/V: the raw `[q; k]` projection row (the conv's
/// input) and the delayed-v projection. Indexed by absolute position like the K/V rows, so the
/// decoders' way of rolling back (the next pass rewrites positions from the last clean one on)
/// rolls this back too: a pass at `start` reads positions `start − 2` and `start − 1`, which only
/// ever hold rows written by passes over committed tokens.
pub struct CcaState {
    conv_dim: usize,
    vd_dim: usize,
    /// Per layer `[capacity, conv_dim]`.
    conv: Vec<Vec<f32>>,
    /// Per layer `[capacity, kv_dim / 2]`.
    v_delayed: Vec<Vec<f32>>,
}

impl CcaState {
    pub fn new(layers: usize, capacity: usize, conv_dim: usize, vd_dim: usize) -> Option<Self> {
        let conv = capacity.checked_mul(conv_dim)?;
        let vd = capacity.checked_mul(vd_dim)?;
        Some(CcaState {
            conv_dim,
            vd_dim,
            conv: vec![vec![0.0; conv]; layers],
            v_delayed: vec![vec![0.0; vd]; layers],
        })
    }

    pub fn layers(&self) -> usize {
        self.conv.len()
    }

    /// Bytes allocated for the state of every layer.
    pub fn bytes(&self) -> u64 {
        let f32s = |l: &[Vec<f32>]| l.iter().map(|r| r.capacity() as u64 * 4).sum::<u64>();
        f32s(&self.conv) + f32s(&self.v_delayed)
    }
}

/// See [`crate::backend::Backend::cca_qkv`].
pub fn cca_qkv(
    proj: &mut CpuAct,
    w: CcaWeights<'_, CpuWeight>,
    state: &mut CcaState,
    capacity: usize,
    p: CcaParams,
) -> Result<()> {
    let (hd, qd, kd) = (p.head_dim, p.q_dim(), p.kv_dim());
    let c = qd + kd;
    let (half, t_len) = (kd / 2, proj.rows);
    let shape = |what: &str, got: usize, want: usize| -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(shape_err(
                "cca_qkv",
                format!("{what}: {got} values, want {want}"),
            ))
        }
    };
    shape("projection width", proj.cols, c + kd)?;
    shape("conv_dw", w.conv_dw.data.len(), c * 2)?;
    shape("conv_dw_bias", w.conv_dw_bias.data.len(), c)?;
    shape("conv_grouped", w.conv_grouped.data.len(), c * hd * 2)?;
    shape("conv_grouped_bias", w.conv_grouped_bias.data.len(), c)?;
    shape("temp", w.temp.data.len(), p.kv_heads)?;
    shape("state width", state.conv_dim, c)?;
    shape("delayed-v width", state.vd_dim, half)?;
    if p.start + t_len > capacity {
        return Err(BackendError::CacheFull {
            pos: p.start + t_len,
            capacity,
        });
    }
    let group = p.heads / p.kv_heads;
    let (conv, v_delayed) = (&mut state.conv[p.layer], &mut state.v_delayed[p.layer]);
    // The block's own rows first: a position's conv reads the one or two before it, in this block
    // or cached.
    for t in 0..t_len {
        let at = p.start + t;
        let row = proj.row(t);
        conv[at * c..(at + 1) * c].copy_from_slice(&row[..c]);
        v_delayed[at * half..(at + 1) * half].copy_from_slice(&row[c + half..]);
    }
    let zeros = vec![0.0f32; c];
    // Raw [q; k] at position `n`; zero before the sequence (transformers pads with zeros).
    let raw = |n: isize| -> &[f32] {
        if n < 0 {
            &zeros
        } else {
            &conv[n as usize * c..(n as usize + 1) * c]
        }
    };
    // Depthwise conv output at position n: w0 · x[n−1] + w1 · x[n] + b (b alone before the start).
    let depthwise = |n: isize, out: &mut [f32]| {
        let (prev, cur) = (raw(n - 1), raw(n));
        for ch in 0..c {
            out[ch] = w.conv_dw.data[ch * 2] * prev[ch]
                + w.conv_dw.data[ch * 2 + 1] * cur[ch]
                + w.conv_dw_bias.data[ch];
        }
    };
    let inv_freq: Vec<f64> = (0..p.rotary_dim / 2)
        .map(|i| 1.0 / p.rope_theta.powf((2 * i) as f64 / p.rotary_dim as f64))
        .collect();
    let (mut y_prev, mut y_cur) = (vec![0.0f32; c], vec![0.0f32; c]);
    let mut z = vec![0.0f32; c];
    let mut q_res = vec![0.0f32; qd];
    let scale = (hd as f32).sqrt();
    for t in 0..t_len {
        let pos = p.start + t;
        let n = pos as isize;
        depthwise(n - 1, &mut y_prev);
        depthwise(n, &mut y_cur);
        for (ch, zc) in z.iter_mut().enumerate() {
            let g = ch / hd;
            let taps = &w.conv_grouped.data[ch * hd * 2..(ch + 1) * hd * 2];
            let (yp, yc) = (&y_prev[g * hd..(g + 1) * hd], &y_cur[g * hd..(g + 1) * hd]);
            let mut acc = w.conv_grouped_bias.data[ch];
            for j in 0..hd {
                acc += taps[j * 2] * yp[j] + taps[j * 2 + 1] * yc[j];
            }
            *zc = acc;
        }
        let x = raw(n);
        let (q_raw, k_raw) = x.split_at(qd);
        // q/k residuals: each q head averaged with its KV head's k; each k the mean of its group.
        for h in 0..p.heads {
            let kv = h / group;
            for j in 0..hd {
                q_res[h * hd + j] = (q_raw[h * hd + j] + k_raw[kv * hd + j]) * 0.5;
            }
        }
        let delayed_prev: Vec<f32> = if pos == 0 {
            vec![0.0; half]
        } else {
            v_delayed[(pos - 1) * half..pos * half].to_vec()
        };
        let row = proj.row_mut(t);
        for h in 0..p.heads {
            for j in 0..hd {
                row[h * hd + j] = z[h * hd + j] + q_res[h * hd + j];
            }
        }
        for kv in 0..p.kv_heads {
            for j in 0..hd {
                let mean = (0..group)
                    .map(|g| q_res[(kv * group + g) * hd + j])
                    .sum::<f32>()
                    / group as f32;
                row[qd + kv * hd + j] = z[qd + kv * hd + j] + mean;
            }
        }
        // v = [current | previous token's delayed]; the current half is already in place.
        row[c + half..c + kd].copy_from_slice(&delayed_prev);
        // L2 norm to √head_dim (floor at f32 epsilon as torch's clamp_min), keys times their
        // temperature, then partial rotate-half RoPE.
        for head in 0..p.heads + p.kv_heads {
            let v = &mut row[head * hd..(head + 1) * hd];
            let norm = v
                .iter()
                .map(|a| a * a)
                .sum::<f32>()
                .sqrt()
                .max(f32::EPSILON);
            let mut f = scale / norm;
            if head >= p.heads {
                f *= w.temp.data[head - p.heads];
            }
            v.iter_mut().for_each(|a| *a *= f);
            for (i, fr) in inv_freq.iter().enumerate() {
                let (sin, cos) = (pos as f64 * fr).sin_cos();
                let (sin, cos) = (sin as f32, cos as f32);
                let (a, b) = (v[i], v[i + p.rotary_dim / 2]);
                v[i] = a * cos - b * sin;
                v[i + p.rotary_dim / 2] = b * cos + a * sin;
            }
        }
    }
    Ok(())
}

/// `y = x · Wᵀ + b` row by row.
fn linear(x: &CpuAct, w: &CpuWeight, b: Option<&CpuWeight>) -> Result<CpuAct> {
    if w.cols != x.cols || b.is_some_and(|b| b.data.len() != w.rows) {
        return Err(shape_err(
            "route_mlp",
            format!(
                "weight [{}, {}] × x [{}, {}]",
                w.rows, w.cols, x.rows, x.cols
            ),
        ));
    }
    let mut out = Vec::with_capacity(x.rows * w.rows);
    for t in 0..x.rows {
        for o in 0..w.rows {
            out.push(
                dot(&w.data[o * w.cols..(o + 1) * w.cols], x.row(t)) + b.map_or(0.0, |b| b.data[o]),
            );
        }
    }
    Ok(CpuAct::new(x.rows, w.rows, out))
}

/// erf in f64 (Numerical Recipes' Chebyshev fit of erfc, fractional error < 1.2e-7): enough
/// for an f32 GELU, and no dependency.
fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.26551223
        + t * (1.00002368
            + t * (0.37409196
                + t * (0.09678418
                    + t * (-0.18628806
                        + t * (0.27886807
                            + t * (-1.13520398
                                + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

/// torch's default (exact) GELU: x · Φ(x).
fn gelu(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))) as f32
}

/// See [`crate::backend::Backend::route_mlp`].
pub fn route_mlp(
    x: &CpuAct,
    w: MlpRouterWeights<'_, CpuWeight>,
    eda: Option<&CpuAct>,
    p: MlpRouterParams,
) -> Result<(CpuRouting, CpuAct)> {
    let classes = p.experts + 1;
    let mut r = linear(x, w.down, Some(w.down_bias))?; // (T, R)
    if let (Some(prev), Some(scale)) = (eda, w.eda_scale) {
        if prev.rows != r.rows || prev.cols != r.cols || scale.data.len() != r.cols {
            return Err(shape_err(
                "route_mlp",
                format!(
                    "EDA state [{}, {}] vs router [{}, {}]",
                    prev.rows, prev.cols, r.rows, r.cols
                ),
            ));
        }
        for (t, row) in r.data.chunks_mut(prev.cols).enumerate() {
            for ((a, b), s) in row.iter_mut().zip(prev.row(t)).zip(&scale.data) {
                *a += b * s;
            }
        }
    }
    if w.norm.data.len() != r.cols || w.bias.data.len() != classes || w.out.rows != classes {
        return Err(shape_err(
            "route_mlp",
            format!(
                "router norm {} / bias {} / classes {} for width {} and {classes} classes",
                w.norm.data.len(),
                w.bias.data.len(),
                w.out.rows,
                r.cols
            ),
        ));
    }
    let mut a = CpuAct::new(r.rows, r.cols, vec![0.0; r.data.len()]);
    for t in 0..r.rows {
        rms_norm_row(r.row(t), &w.norm.data, p.eps, a.row_mut(t));
    }
    let mut a = linear(&a, w.fc1, Some(w.fc1_bias))?;
    a.data.iter_mut().for_each(|v| *v = gelu(*v));
    let mut a = linear(&a, w.fc2, Some(w.fc2_bias))?;
    a.data.iter_mut().for_each(|v| *v = gelu(*v));
    let logits = linear(&a, w.out, None)?;
    let k = p.top_k;
    let (mut ids, mut weights) = (
        Vec::with_capacity(x.rows * k),
        Vec::with_capacity(x.rows * k),
    );
    let mut all_probs = Vec::with_capacity(logits.data.len());
    for t in 0..x.rows {
        let l = logits.row(t);
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        all_probs.extend(exp.iter().map(|e| e / sum));
    }
    let masks = p
        .blocks
        .map(|bl| (mlp_block_masks(&all_probs, classes, &w.bias.data, &bl), bl));
    for t in 0..x.rows {
        let probs = &all_probs[t * classes..(t + 1) * classes];
        // A block row's selection bias is the router's plus its block's mask, added first (as
        // the GPU does).
        let mask = masks.as_ref().and_then(|(m, bl)| Some(&m[bl.block_of(t)?]));
        let choice: Vec<f32> = match mask {
            Some(m) => (0..classes)
                .map(|e| probs[e] + (w.bias.data[e] + m[e]))
                .collect(),
            None => probs.iter().zip(&w.bias.data).map(|(p, b)| p + b).collect(),
        };
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        for &e in &order[..k] {
            ids.push(e as u32);
            weights.push(if e == p.experts { 0.0 } else { probs[e] });
        }
    }
    Ok((CpuRouting { k, ids, weights }, r))
}

/// See [`crate::backend::Backend::scaled_residual_norm`] (the add; the norm is the caller's).
pub fn scaled_residual(x: &mut CpuAct, delta: &CpuAct, s: &CpuWeight) -> Result<()> {
    if x.rows != delta.rows || x.cols != delta.cols || s.rows != 4 || s.cols != x.cols {
        return Err(shape_err(
            "scaled_residual_norm",
            format!(
                "x [{}, {}], delta [{}, {}], scales [{}, {}]",
                x.rows, x.cols, delta.rows, delta.cols, s.rows, s.cols
            ),
        ));
    }
    let h = x.cols;
    let (db, ds, xb, xs) = (
        &s.data[..h],
        &s.data[h..2 * h],
        &s.data[2 * h..3 * h],
        &s.data[3 * h..],
    );
    for (row, drow) in x.data.chunks_mut(h).zip(delta.data.chunks(h)) {
        for i in 0..h {
            row[i] = (drow[i] + db[i]) * ds[i] + (row[i] + xb[i]) * xs[i];
        }
    }
    Ok(())
}

/// See [`crate::backend::Backend::embed_affine`].
pub fn embed_affine(x: &mut CpuAct, a: &CpuWeight) -> Result<()> {
    if a.rows != 2 || a.cols != x.cols {
        return Err(shape_err(
            "embed_affine",
            format!("affine [{}, {}] for width {}", a.rows, a.cols, x.cols),
        ));
    }
    let (bias, scale) = a.data.split_at(x.cols);
    for row in x.data.chunks_mut(x.cols) {
        for ((v, b), s) in row.iter_mut().zip(bias).zip(scale) {
            *v = (*v + b) * s;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.5204998778),
            (1.0, 0.8427007929),
            (-2.0, -0.9953222650),
        ] {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
    }
}
