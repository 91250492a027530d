//! The reference backend: every op in plain f32 loops, written for clarity over speed. Weights are
//! dequantized to f32 when loaded, so the CPU computes exactly what the file holds. It is the oracle
//! the GPU kernels are tested against, and the fallback where no GPU adapter exists.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod block_routing;
mod cca;
mod denoise;
mod gemm;
mod gemma;

pub use block_routing::block_masks;
pub use denoise::CpuCanvas;

use super::{
    stats_from_logits, AttnMask, Backend, BackendError, BlockRouting, CcaParams, CcaWeights,
    HeadsParams, MlpRouterParams, MlpRouterWeights, PositionStats, Result, ScaledRouterParams,
};
use crate::arch::{Activation, AttentionKind, Gating, ModelConfig, QkNorm};
use crate::experts::pager::{Lookup, Pager};
use crate::experts::trace::RoutingTrace;
use crate::format::{EdmFile, TensorView};

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// A dequantized weight: `[rows, cols]` (vectors have `rows == 1`).
#[derive(Clone, Debug)]
pub struct CpuWeight {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuWeight {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// `[rows, cols]` activations.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuAct {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(rows * cols, data.len());
        CpuAct { rows, cols, data }
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

pub struct CpuExpert {
    pub gate_up: CpuWeight,
    pub down: CpuWeight,
}

/// Experts of one layer: loaded once (`None` for experts not resident), or paged through a pool
/// shared by all layers.
pub struct CpuExperts {
    pub layer: usize,
    source: ExpertSource,
}

enum ExpertSource {
    Resident(Vec<Option<CpuExpert>>),
    Paged {
        file: Arc<EdmFile>,
        pool: Arc<Mutex<CpuExpertPool>>,
    },
}

impl CpuExperts {
    /// Experts of `layer` read on demand into `pool` (exact lazy paging).
    pub fn paged(file: Arc<EdmFile>, layer: usize, pool: Arc<Mutex<CpuExpertPool>>) -> Self {
        CpuExperts {
            layer,
            source: ExpertSource::Paged { file, pool },
        }
    }
}

/// A bounded pool of dequantized experts shared by every layer, managed by a [`Pager`].
pub struct CpuExpertPool {
    pub pager: Pager,
    slots: Vec<Option<CpuExpert>>,
    /// When set, every layer's routed experts are appended (for `bench experts`).
    pub trace: Option<RoutingTrace>,
}

impl CpuExpertPool {
    pub fn new(pager: Pager) -> Self {
        let slots = (0..pager.capacity()).map(|_| None).collect();
        CpuExpertPool {
            pager,
            slots,
            trace: None,
        }
    }

    fn fill(
        &mut self,
        file: &EdmFile,
        slot: usize,
        layer: usize,
        expert: usize,
        on_demand: bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        let e = CpuExpert {
            gate_up: CpuBackend::expert_weight(file, layer, expert, "gate_up")?,
            down: CpuBackend::expert_weight(file, layer, expert, "down")?,
        };
        let bytes = file.expert_range(layer, expert).map_or(0, |r| r.1);
        let stall = if on_demand {
            t0.elapsed()
        } else {
            Duration::ZERO
        };
        self.pager.record_read(bytes, stall);
        self.slots[slot] = Some(e);
        Ok(())
    }

    /// Loads the experts `predicted` (per layer: the previous step's routing) before the next pass.
    /// At most one pool's worth, in execution order (more would evict the experts needed first).
    pub fn prefetch(&mut self, file: &EdmFile, predicted: &[(usize, Vec<u32>)]) -> Result<()> {
        let capacity = self.pager.capacity();
        let mut seen = std::collections::HashSet::new();
        let wanted: Vec<(usize, usize)> = predicted
            .iter()
            .flat_map(|(l, ids)| ids.iter().map(move |&e| (*l, e as usize)))
            .filter(|k| seen.insert(*k))
            .take(capacity)
            .collect();
        // The flash reads of those not in the pool start before the first fill waits for one (as
        // a layer's on-demand misses do; a hint only, the pager decides below as before).
        for &(layer, e) in &wanted {
            if self.pager.slot_of(layer, e).is_none() {
                file.will_need_expert(layer, e);
            }
        }
        for (layer, e) in wanted {
            if let Some(Lookup::Miss { slot, .. }) = self.pager.prefetch(layer, e) {
                self.fill(file, slot, layer, e, false)?;
            }
        }
        Ok(())
    }
}

pub struct CpuKv {
    capacity: usize,
    kv_dim: usize,
    /// Per layer: the width of a cached row (`kv_dim` but for DiffusionGemma's global layers).
    dims: Vec<usize>,
    /// Per layer: keys and values `[capacity, dims[layer]]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// CCA layers' per-position state beyond K/V (`None` for standard attention).
    cca: Option<cca::CcaState>,
    /// The bytes above, counted in the allocating thread's KV meter until the cache drops.
    _bytes: crate::backend::kv_meter::KvAllocation,
}

impl CpuKv {
    /// Writes `k` and `v` (whole rows from row 0) into `layer`'s cache: a test fills a long cache
    /// without the quadratic attention pass that would write it.
    #[cfg(test)]
    pub(crate) fn write_rows(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.k[layer][..k.len()].copy_from_slice(k);
        self.v[layer][..v.len()].copy_from_slice(v);
    }
}

/// Top-k expert ids and weights per token, `[T, k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuRouting {
    pub k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

use super::draw::{row_draw, CanvasHeadParams, RowDraw};
use super::shapes::{self, shape_err};

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl CpuBackend {
    fn expert_weight(file: &EdmFile, layer: usize, e: usize, part: &str) -> Result<CpuWeight> {
        let view = file.expert_part(layer, e, part)?;
        CpuBackend.load_weight(view)
    }

    fn check_norm(op: &'static str, x: &CpuAct, w: &CpuWeight) -> Result<()> {
        shapes::norm(op, w.data.len(), x.cols)
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Act = CpuAct;
    type Experts = CpuExperts;
    type Kv = CpuKv;
    type Routing = CpuRouting;
    type Canvas = CpuCanvas;
    type Stats = Vec<PositionStats>;

    fn name(&self) -> String {
        "cpu (f32 reference)".into()
    }

    fn load_weight(&self, view: TensorView<'_>) -> Result<CpuWeight> {
        let data = view.to_f32()?;
        let (rows, cols) = match view.shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => {
                return Err(shape_err(
                    "load_weight",
                    format!("{}: shape {s:?}", view.name),
                ))
            }
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn load_experts(
        &self,
        file: &Arc<EdmFile>,
        layer: usize,
        resident: &dyn Fn(usize) -> bool,
    ) -> Result<CpuExperts> {
        let n = file.header.metadata.config.moe.num_experts;
        // The layer's resident experts are read below, in order: their flash reads start now.
        for e in (0..n).filter(|&e| resident(e)) {
            file.will_need_expert(layer, e);
        }
        let mut experts = Vec::with_capacity(n);
        for e in 0..n {
            if !resident(e) || file.expert_range(layer, e).is_none() {
                experts.push(None);
                continue;
            }
            experts.push(Some(CpuExpert {
                gate_up: Self::expert_weight(file, layer, e, "gate_up")?,
                down: Self::expert_weight(file, layer, e, "down")?,
            }));
        }
        Ok(CpuExperts {
            layer,
            source: ExpertSource::Resident(experts),
        })
    }

    fn new_kv(&self, config: &ModelConfig, capacity: usize) -> Result<CpuKv> {
        let kv_dim = config.kv_dim();
        let size = capacity
            .checked_mul(kv_dim)
            .ok_or(BackendError::CacheFull {
                pos: capacity,
                capacity: 0,
            })?;
        let cca = match config.attention {
            AttentionKind::Standard => None,
            AttentionKind::Cca => Some(
                cca::CcaState::new(
                    config.num_layers,
                    capacity,
                    config.cca_conv_dim(),
                    kv_dim / 2,
                )
                .ok_or(BackendError::CacheFull {
                    pos: capacity,
                    capacity: 0,
                })?,
            ),
        };
        // Rows of each layer's own width (DiffusionGemma's global layers are wider).
        let dims: Vec<usize> = (0..config.num_layers)
            .map(|l| config.kv_dim_of(l))
            .collect();
        let sizes = dims
            .iter()
            .map(|d| capacity.checked_mul(*d))
            .collect::<Option<Vec<usize>>>()
            .ok_or(BackendError::CacheFull {
                pos: capacity,
                capacity: 0,
            })?;
        let _ = size;
        let k: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
        let v: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
        let f32s =
            |layers: &[Vec<f32>]| layers.iter().map(|l| l.capacity() as u64 * 4).sum::<u64>();
        let bytes = f32s(&k) + f32s(&v) + cca.as_ref().map_or(0, cca::CcaState::bytes);
        Ok(CpuKv {
            capacity,
            kv_dim,
            dims,
            k,
            v,
            cca,
            _bytes: crate::backend::kv_meter::KvAllocation::new(bytes),
        })
    }

    fn kv_capacity(&self, kv: &CpuKv) -> usize {
        kv.capacity
    }

    fn rows_of(&self, x: &CpuAct, rows: Range<usize>) -> Result<CpuAct> {
        shapes::rows_within("rows_of", &rows, x.rows)?;
        let data = x.data[rows.start * x.cols..rows.end * x.cols].to_vec();
        Ok(CpuAct::new(rows.len(), x.cols, data))
    }

    fn stack_rows(&self, parts: &[&CpuAct]) -> Result<CpuAct> {
        let cols = shapes::same_widths("stack_rows", parts.iter().map(|p| p.cols))?;
        let data: Vec<f32> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Ok(CpuAct::new(data.len() / cols.max(1), cols, data))
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32]) -> Result<CpuAct> {
        let mut data = Vec::with_capacity(tokens.len() * table.cols);
        for &t in tokens {
            if t as usize >= table.rows {
                return Err(BackendError::TokenOutOfRange {
                    id: t,
                    vocab: table.rows,
                });
            }
            data.extend_from_slice(table.row(t as usize));
        }
        Ok(CpuAct::new(tokens.len(), table.cols, data))
    }

    fn rms_norm(&self, x: &CpuAct, w: &CpuWeight, eps: f32) -> Result<CpuAct> {
        Self::check_norm("rms_norm", x, w)?;
        let mut out = CpuAct::new(x.rows, x.cols, vec![0.0; x.data.len()]);
        for r in 0..x.rows {
            rms_norm_row(x.row(r), &w.data, eps, out.row_mut(r));
        }
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CpuAct,
        delta: &CpuAct,
        w: &CpuWeight,
        eps: f32,
    ) -> Result<CpuAct> {
        self.add(x, delta)?;
        self.rms_norm(x, w, eps)
    }

    fn add(&self, x: &mut CpuAct, delta: &CpuAct) -> Result<()> {
        shapes::same_shape("add", (x.rows, x.cols), (delta.rows, delta.cols))?;
        for (a, b) in x.data.iter_mut().zip(&delta.data) {
            *a += b;
        }
        Ok(())
    }

    fn matmul(&self, w: &CpuWeight, x: &CpuAct) -> Result<CpuAct> {
        shapes::matmul("matmul", (w.rows, w.cols), (x.rows, x.cols))?;
        let mut out = vec![0.0; x.rows * w.rows];
        // Every output is the plain dot product, its bits too; gemm.rs runs many side by side.
        gemm::matmul(&w.data, w.rows, w.cols, &x.data, x.rows, &mut out);
        Ok(CpuAct::new(x.rows, w.rows, out))
    }

    fn mlp(&self, gate_up: &CpuWeight, down: &CpuWeight, x: &CpuAct) -> Result<CpuAct> {
        self.gated_mlp(gate_up, down, x, Activation::Silu)
    }

    fn gated_mlp(
        &self,
        gate_up: &CpuWeight,
        down: &CpuWeight,
        x: &CpuAct,
        act: Activation,
    ) -> Result<CpuAct> {
        let gu = self.matmul(gate_up, x)?;
        let inter = gate_up.rows / 2;
        let f = match act {
            Activation::Silu => silu,
            Activation::GeluTanh => gemma::gelu_tanh,
        };
        let mut h = vec![0.0; x.rows * inter];
        for t in 0..x.rows {
            let row = gu.row(t);
            for i in 0..inter {
                h[t * inter + i] = f(row[i]) * row[inter + i];
            }
        }
        self.matmul(down, &CpuAct::new(x.rows, inter, h))
    }

    fn qk_norm_rope(
        &self,
        qkv: &mut CpuAct,
        q_norm: Option<&CpuWeight>,
        k_norm: Option<&CpuWeight>,
        c: &ModelConfig,
        start: usize,
    ) -> Result<()> {
        shapes::qkv("qk_norm_rope", qkv.cols, c)?;
        let (hd, qd, kd) = (c.head_dim, c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps as f32;
        let rd = c.rotary_dim;
        // inv_freq_i = θ^(−2i/rd), as transformers computes it (partial RoPE uses the rotated width).
        let inv_freq: Vec<f64> = (0..rd / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / rd as f64))
            .collect();
        for t in 0..qkv.rows {
            let pos = (start + t) as f64;
            let row = qkv.row_mut(t);
            let (q, rest) = row.split_at_mut(qd);
            let (k, _v) = rest.split_at_mut(kd);
            for (part, norm, dim) in [(q, q_norm, qd), (k, k_norm, kd)] {
                match (c.qk_norm, norm) {
                    (QkNorm::None, _) => {}
                    (QkNorm::PerHead, Some(w)) if w.data.len() == hd => {
                        for head in part.chunks_mut(hd) {
                            let src = head.to_vec();
                            rms_norm_row(&src, &w.data, eps, head);
                        }
                    }
                    (QkNorm::Whole, Some(w)) if w.data.len() == dim => {
                        let src = part.to_vec();
                        rms_norm_row(&src, &w.data, eps, part);
                    }
                    _ => {
                        return Err(shape_err(
                            "qk_norm_rope",
                            "q/k norm weight missing or misshapen".into(),
                        ))
                    }
                }
                if let Some(clip) = c.clip_qkv {
                    part.iter_mut().for_each(|v| *v = v.clamp(-clip, clip));
                }
                for head in part.chunks_mut(hd) {
                    for (i, f) in inv_freq.iter().enumerate() {
                        let (sin, cos) = (pos * f).sin_cos();
                        let (sin, cos) = (sin as f32, cos as f32);
                        let (a, b) = (head[i], head[i + rd / 2]);
                        head[i] = a * cos - b * sin;
                        head[i + rd / 2] = b * cos + a * sin;
                    }
                }
            }
        }
        if let Some(clip) = c.clip_qkv {
            for t in 0..qkv.rows {
                qkv.row_mut(t)[qd + kd..]
                    .iter_mut()
                    .for_each(|v| *v = v.clamp(-clip, clip));
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuAct,
        kv: &mut CpuKv,
        layer: usize,
        c: &ModelConfig,
        start: usize,
        kv_len: usize,
        mask: AttnMask,
    ) -> Result<CpuAct> {
        let t_len = qkv.rows;
        let (hd, qd, kd) = (c.head_dim, c.q_dim(), c.kv_dim());
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
        for t in 0..t_len {
            let row = qkv.row(t);
            let at = (start + t) * kv.kv_dim;
            kv.k[layer][at..at + kd].copy_from_slice(&row[qd..qd + kd]);
            kv.v[layer][at..at + kd].copy_from_slice(&row[qd + kd..qd + 2 * kd]);
        }
        let group = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // A sliding-window layer sees keys at most window − 1 before the query; keys after it
        // (bidirectional masks) follow the mask alone.
        let window = c.window_of(layer);
        let visible = |pos: usize, j: usize| {
            mask.visible(pos, j) && window.is_none_or(|w| j > pos || pos - j < w)
        };
        let (keys, values) = (&kv.k[layer], &kv.v[layer]);
        let mut out = vec![0.0; t_len * qd];
        let mut scores = vec![0.0f32; kv_len];
        for t in 0..t_len {
            let pos = start + t;
            for h in 0..c.num_heads {
                let q = &qkv.row(t)[h * hd..(h + 1) * hd];
                let kvh = h / group;
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = if visible(pos, j) {
                        let k = &keys[j * kd + kvh * hd..j * kd + (kvh + 1) * hd];
                        dot(q, k) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                    max = max.max(*s);
                }
                let o = &mut out[t * qd + h * hd..t * qd + (h + 1) * hd];
                if max == f32::NEG_INFINITY {
                    continue; // no visible key: zero output (cannot happen for a query that sees itself)
                }
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (j, &p) in scores.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let v = &values[j * kd + kvh * hd..j * kd + (kvh + 1) * hd];
                    let w = p / sum;
                    for (oi, vi) in o.iter_mut().zip(v) {
                        *oi += w * vi;
                    }
                }
            }
        }
        Ok(CpuAct::new(t_len, qd, out))
    }

    fn route(
        &self,
        x: &CpuAct,
        router: &CpuWeight,
        bias: Option<&CpuWeight>,
        c: &ModelConfig,
    ) -> Result<CpuRouting> {
        self.route_rows(x, router, bias, c, None)
    }

    fn route_within_blocks(
        &self,
        x: &CpuAct,
        router: &CpuWeight,
        bias: Option<&CpuWeight>,
        c: &ModelConfig,
        blocks: &BlockRouting,
    ) -> Result<CpuRouting> {
        self.route_rows(x, router, bias, c, Some(blocks))
    }

    fn moe(&self, x: &CpuAct, routing: &CpuRouting, experts: &CpuExperts) -> Result<CpuAct> {
        self.moe_act(x, routing, experts, Activation::Silu)
    }

    fn moe_act(
        &self,
        x: &CpuAct,
        routing: &CpuRouting,
        experts: &CpuExperts,
        act: Activation,
    ) -> Result<CpuAct> {
        let unavailable = |e: usize| BackendError::ExpertUnavailable {
            layer: experts.layer,
            expert: e,
        };
        let mut out = vec![0.0; x.data.len()];
        let mut apply = |expert: &CpuExpert, t: usize, w: f32| -> Result<()> {
            let xt = CpuAct::new(1, x.cols, x.row(t).to_vec());
            let y = self.gated_mlp(&expert.gate_up, &expert.down, &xt, act)?;
            for (o, v) in out[t * x.cols..(t + 1) * x.cols].iter_mut().zip(&y.data) {
                *o += w * v;
            }
            Ok(())
        };
        match &experts.source {
            ExpertSource::Resident(list) => {
                for t in 0..x.rows {
                    for j in 0..routing.k {
                        let e = routing.ids[t * routing.k + j] as usize;
                        if e == list.len() {
                            continue; // the skip expert: no compute, contributes 0
                        }
                        let expert = list
                            .get(e)
                            .and_then(Option::as_ref)
                            .ok_or_else(|| unavailable(e))?;
                        apply(expert, t, routing.weights[t * routing.k + j])?;
                    }
                }
            }
            ExpertSource::Paged { file, pool } => {
                let mut pool = pool
                    .lock()
                    .map_err(|_| BackendError::Gpu("expert pool lock poisoned".into()))?;
                // Expert-major, as the GPU kernel runs: each routed expert is brought in once per
                // layer and applied to all its tokens; only the expert being applied must be
                // resident, so any pool of ≥ top-k slots works.
                let n_experts = file.header.metadata.config.moe.num_experts;
                let mut routed: Vec<usize> = routing
                    .ids
                    .iter()
                    .map(|&e| e as usize)
                    .filter(|&e| e != n_experts) // the skip expert has no weights to page
                    .collect();
                routed.sort_unstable();
                routed.dedup();
                pool.pager.begin_layer(experts.layer, &[]);
                if let Some(t) = pool.trace.as_mut() {
                    t.record(experts.layer, &routed);
                }
                // The layer's misses start their flash reads together, before the first one is
                // waited for (a hint: the pager's decisions below are the same either way).
                for &e in &routed {
                    if pool.pager.slot_of(experts.layer, e).is_none() {
                        file.will_need_expert(experts.layer, e);
                    }
                }
                let mut contrib: Vec<(usize, usize, f32)> = Vec::new(); // (token, j, weight) per expert
                let mut per_token: Vec<Vec<f32>> = vec![Vec::new(); x.rows * routing.k];
                for &e in &routed {
                    let slot = match pool.pager.request(experts.layer, e) {
                        Lookup::Hit { slot } => slot,
                        Lookup::Miss { slot, .. } => {
                            pool.fill(file, slot, experts.layer, e, true)?;
                            slot
                        }
                    };
                    let expert = pool.slots[slot].as_ref().ok_or_else(|| unavailable(e))?;
                    contrib.clear();
                    for t in 0..x.rows {
                        for j in 0..routing.k {
                            if routing.ids[t * routing.k + j] as usize == e {
                                contrib.push((t, j, routing.weights[t * routing.k + j]));
                            }
                        }
                    }
                    for &(t, j, _) in &contrib {
                        let xt = CpuAct::new(1, x.cols, x.row(t).to_vec());
                        per_token[t * routing.k + j] = self
                            .gated_mlp(&expert.gate_up, &expert.down, &xt, act)?
                            .data;
                    }
                }
                // Combine in the same order as the resident path, so paging is bit-exact.
                for t in 0..x.rows {
                    for j in 0..routing.k {
                        let w = routing.weights[t * routing.k + j];
                        if routing.ids[t * routing.k + j] as usize == n_experts {
                            continue;
                        }
                        for (o, v) in out[t * x.cols..(t + 1) * x.cols]
                            .iter_mut()
                            .zip(&per_token[t * routing.k + j])
                        {
                            *o += w * v;
                        }
                    }
                }
            }
        }
        Ok(CpuAct::new(x.rows, x.cols, out))
    }

    fn cca_qkv(
        &self,
        proj: &mut CpuAct,
        w: CcaWeights<'_, CpuWeight>,
        kv: &mut CpuKv,
        p: CcaParams,
    ) -> Result<()> {
        let capacity = kv.capacity;
        let state = kv.cca.as_mut().ok_or_else(|| {
            shape_err(
                "cca_qkv",
                "the cache was made for standard attention".into(),
            )
        })?;
        if p.layer >= state.layers() {
            return Err(shape_err("cca_qkv", format!("layer {}", p.layer)));
        }
        cca::cca_qkv(proj, w, state, capacity, p)
    }

    fn route_mlp(
        &self,
        x: &CpuAct,
        w: MlpRouterWeights<'_, CpuWeight>,
        eda: Option<&CpuAct>,
        p: MlpRouterParams,
    ) -> Result<(CpuRouting, CpuAct)> {
        cca::route_mlp(x, w, eda, p)
    }

    fn scaled_residual_norm(
        &self,
        x: &mut CpuAct,
        delta: &CpuAct,
        scales: &CpuWeight,
        norm: &CpuWeight,
        eps: f32,
    ) -> Result<CpuAct> {
        cca::scaled_residual(x, delta, scales)?;
        self.rms_norm(x, norm, eps)
    }

    fn embed_affine(&self, x: &mut CpuAct, affine: &CpuWeight) -> Result<()> {
        cca::embed_affine(x, affine)
    }

    fn has_canvas_ops(&self) -> bool {
        true
    }

    fn prepare_heads(
        &self,
        proj: &CpuAct,
        q_norm: &CpuWeight,
        k_norm: &CpuWeight,
        p: HeadsParams,
    ) -> Result<CpuAct> {
        gemma::prepare_heads(proj, q_norm, k_norm, p)
    }

    fn attention_heads(&self, qkv: &CpuAct, kv: &mut CpuKv, p: HeadsParams) -> Result<CpuAct> {
        gemma::attention_heads(qkv, kv, p)
    }

    fn route_scaled(
        &self,
        x: &CpuAct,
        proj: &CpuWeight,
        scale: &CpuWeight,
        expert_scale: &CpuWeight,
        p: ScaledRouterParams,
    ) -> Result<CpuRouting> {
        gemma::route_scaled(self, x, proj, scale, expert_scale, p)
    }

    fn scale(&self, x: &mut CpuAct, s: f32) -> Result<()> {
        x.data.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn soft_embed(&self, logits: &[f32], table: &CpuWeight, s: f32) -> Result<CpuAct> {
        gemma::soft_embed(logits, table, s)
    }

    fn canvas_head(
        &self,
        x: &CpuAct,
        table: &CpuWeight,
        p: CanvasHeadParams,
        uniforms: &[f32],
    ) -> Result<(Vec<RowDraw>, Option<CpuAct>)> {
        shapes::canvas_head(
            (x.rows, x.cols),
            (table.rows, table.cols),
            uniforms.len(),
            &p,
        )?;
        let rows = 0..x.rows;
        let logits = match p.cap {
            Some(cap) => self.logits_softcap(x, table, rows, cap)?,
            None => self.logits(x, table, rows)?,
        };
        let tempered: Vec<f32> = logits.iter().map(|l| l / p.temperature).collect();
        let draws = tempered
            .chunks(table.rows)
            .zip(uniforms)
            .map(|(row, &u)| row_draw(row, u))
            .collect();
        let next = p
            .next_input
            .then(|| gemma::soft_embed(&tempered, table, p.embed_scale))
            .transpose()?;
        Ok((draws, next))
    }

    fn lm_head_stats_softcap(
        &self,
        x: &CpuAct,
        head: &CpuWeight,
        rows: Range<usize>,
        cap: f32,
    ) -> Result<Vec<PositionStats>> {
        let logits = self.logits_softcap(x, head, rows, cap)?;
        Ok(logits.chunks(head.rows).map(stats_from_logits).collect())
    }

    fn logits_softcap(
        &self,
        x: &CpuAct,
        head: &CpuWeight,
        rows: Range<usize>,
        cap: f32,
    ) -> Result<Vec<f32>> {
        let mut logits = self.logits(x, head, rows)?;
        gemma::softcap(&mut logits, cap);
        Ok(logits)
    }

    fn routing_to_host(&self, routing: &CpuRouting) -> Result<(Vec<u32>, Vec<f32>)> {
        Ok((routing.ids.clone(), routing.weights.clone()))
    }

    fn lm_head_stats(
        &self,
        x: &CpuAct,
        head: &CpuWeight,
        rows: Range<usize>,
    ) -> Result<Vec<PositionStats>> {
        let logits = self.logits(x, head, rows)?;
        Ok(logits.chunks(head.rows).map(stats_from_logits).collect())
    }

    fn new_canvas(&self, cells: &[Option<u32>], mask: u32) -> Result<CpuCanvas> {
        Ok(denoise::new_canvas(cells, mask))
    }

    fn commit_step(
        &self,
        canvas: &mut CpuCanvas,
        stats: &Vec<PositionStats>,
        p: &super::CommitParams,
    ) -> Result<()> {
        denoise::commit_step(canvas, stats, p)
    }

    fn read_canvas(&self, canvas: &CpuCanvas, steps: Range<usize>) -> Result<super::CanvasState> {
        Ok(denoise::read_canvas(canvas, steps))
    }

    fn stats_rows(
        &self,
        stats: &Vec<PositionStats>,
        rows: Range<usize>,
    ) -> Result<Vec<PositionStats>> {
        crate::backend::shapes::rows_within("stats_rows", &rows, stats.len())?;
        Ok(stats[rows].to_vec())
    }

    fn embed_canvas(
        &self,
        table: &CpuWeight,
        canvas: &CpuCanvas,
        from: usize,
        t: usize,
    ) -> Result<CpuAct> {
        denoise::embed_canvas(self, table, canvas, from, t)
    }

    fn lm_head_stats_kept(
        &self,
        x: &CpuAct,
        head: &CpuWeight,
        rows: Range<usize>,
    ) -> Result<Vec<PositionStats>> {
        self.lm_head_stats(x, head, rows)
    }

    fn upload_stats(&self, stats: &[PositionStats]) -> Result<Vec<PositionStats>> {
        Ok(stats.to_vec())
    }

    fn logits(&self, x: &CpuAct, head: &CpuWeight, rows: Range<usize>) -> Result<Vec<f32>> {
        shapes::rows_within("logits", &rows, x.rows)?;
        shapes::head("logits", (head.rows, head.cols), x.cols)?;
        let sub = CpuAct::new(
            rows.len(),
            x.cols,
            x.data[rows.start * x.cols..rows.end * x.cols].to_vec(),
        );
        Ok(self.matmul(head, &sub)?.data)
    }
}

impl CpuBackend {
    /// The router's top-k per row; with `blocks`, each block's rows choose within its experts.
    fn route_rows(
        &self,
        x: &CpuAct,
        router: &CpuWeight,
        bias: Option<&CpuWeight>,
        c: &ModelConfig,
        blocks: Option<&BlockRouting>,
    ) -> Result<CpuRouting> {
        shapes::router(
            (router.rows, router.cols),
            bias.map(|b| b.data.len()),
            x.cols,
            c,
        )?;
        let logits = self.matmul(router, x)?;
        let (n, k) = (c.moe.num_experts, c.moe.top_k);
        let bias = bias.map(|b| b.data.as_slice());
        let masks = blocks.map(|bl| block_masks(&logits.data, n, bias, c.moe.gating, bl));
        let mut ids = Vec::with_capacity(x.rows * k);
        let mut weights = Vec::with_capacity(x.rows * k);
        for t in 0..x.rows {
            let block = blocks.and_then(|bl| Some((bl, bl.block_of(t)?)));
            let (i, w) = match (block, &masks) {
                (Some((bl, g)), Some(m)) => {
                    // The block's mask on top of the selection bias, in the order the GPU adds them.
                    let b: Vec<f32> = (0..n)
                        .map(|e| bias.map_or(0.0, |b| b[e]) + m[g][e])
                        .collect();
                    let gating = bl.gating(c.moe.gating, n);
                    route_row(logits.row(t), Some(&b), k, gating)
                }
                _ => route_row(logits.row(t), bias, k, c.moe.gating),
            };
            ids.extend(i);
            weights.extend(w);
        }
        Ok(CpuRouting { k, ids, weights })
    }
}

/// Top-k selection of one token's router logits under `gating`; returns (ids, weights).
/// Ties go to the lower expert index.
pub fn route_row(
    logits: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    gating: Gating,
) -> (Vec<u32>, Vec<f32>) {
    let top = |scores: &[f32], k: usize| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx
    };
    match gating {
        Gating::Softmax { renormalize } => {
            // A softmax router has no bias of its own; one present is a pruned model's selection
            // mask, added to the logits so pruned experts get probability 0.
            let logits: Vec<f32> = match bias {
                Some(b) => logits.iter().zip(b).map(|(l, b)| l + b).collect(),
                None => logits.to_vec(),
            };
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let probs: Vec<f32> = exp.iter().map(|e| e / sum).collect();
            let ids = top(&probs, k);
            let mut w: Vec<f32> = ids.iter().map(|&i| probs[i]).collect();
            if renormalize {
                let s: f32 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= s);
            }
            (ids.iter().map(|&i| i as u32).collect(), w)
        }
        Gating::SigmoidGrouped {
            groups,
            top_groups,
            scale,
            renormalize,
        } => {
            let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
            let choice: Vec<f32> = match bias {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            let per = scores.len() / groups;
            let group_score: Vec<f32> = choice
                .chunks(per)
                .map(|g| top(g, 2).iter().map(|&i| g[i]).sum())
                .collect();
            let keep = top(&group_score, top_groups);
            // Experts of dropped groups are masked to −∞ (LLaDA2; transformers ≥ 5.17 DeepSeek-V3).
            let masked: Vec<f32> = choice
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    if keep.contains(&(i / per)) {
                        v
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let ids = top(&masked, k);
            let mut w: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
            if renormalize {
                let s: f32 = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= s);
            }
            w.iter_mut().for_each(|v| *v *= scale);
            (ids.iter().map(|&i| i as u32).collect(), w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_routing_picks_largest_and_renormalises() {
        let (ids, w) = route_row(
            &[0.1, 2.0, -1.0, 1.0],
            None,
            2,
            Gating::Softmax { renormalize: true },
        );
        assert_eq!(ids, vec![1, 3]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(w[0] > w[1]);
    }

    #[test]
    fn grouped_routing_only_picks_from_kept_groups() {
        // 4 groups of 2; group 3 has the best single expert but group 0 the best pair.
        let logits = [3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0, -5.0];
        let g = Gating::SigmoidGrouped {
            groups: 4,
            top_groups: 1,
            scale: 2.5,
            renormalize: true,
        };
        let (ids, w) = route_row(&logits, None, 2, g);
        assert_eq!(ids, vec![0, 1]);
        assert!((w.iter().sum::<f32>() - 2.5).abs() < 1e-5);
    }

    #[test]
    fn masks_follow_their_rules() {
        assert!(AttnMask::Causal.visible(3, 3) && !AttnMask::Causal.visible(3, 4));
        assert!(AttnMask::BlockCausal(4).visible(4, 7) && !AttnMask::BlockCausal(4).visible(3, 4));
        let m = AttnMask::CausalThenBidirectional { draft_start: 8 };
        assert!(m.visible(9, 12) && !m.visible(7, 8) && m.visible(12, 3));
    }
}
