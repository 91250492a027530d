//! Choosing the resident experts of each layer and writing the pruned model file.
//!
//! Selectors (EMO, arXiv 2605.06663): router-probability mass (EMO's criterion; its layer-wise greedy
//! variant re-profiles layer l+1 with layers ≤ l already pruned, see `cli/prune.rs`), token
//! frequency, and random (the control).

use std::path::Path;

use serde_json::json;

use super::{ExpertsError, Profile};
use crate::format::{dtype, DType, EdmFile, EdmWriter, LayoutBuilder};
use crate::model::names;

/// Selection score given to pruned experts: far below any real score, yet finite so the file's
/// finite-values check holds and f32 arithmetic stays NaN-free (e^(−1e30) = 0, σ(x) − 1e30 ≪ 0).
pub const PRUNED_BIAS: f32 = -1e30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selector {
    Mass,
    Frequency,
    Random { seed: u64 },
}

/// How many experts to keep per MoE layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeepSpec {
    Fraction(f64),
    PerLayer(usize),
    /// Bytes for the whole model: dense weights plus the resident experts.
    Bytes(u64),
}

impl std::str::FromStr for KeepSpec {
    type Err = ExpertsError;
    fn from_str(s: &str) -> Result<Self, ExpertsError> {
        let bad = || ExpertsError::BadKeep(s.to_string());
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let f: f64 = p.trim().parse().map_err(|_| bad())?;
            return if f > 0.0 && f <= 100.0 {
                Ok(KeepSpec::Fraction(f / 100.0))
            } else {
                Err(bad())
            };
        }
        let units: [(&str, f64); 7] = [
            ("GiB", 1073741824.0),
            ("MiB", 1048576.0),
            ("KiB", 1024.0),
            ("GB", 1e9),
            ("MB", 1e6),
            ("KB", 1e3),
            ("B", 1.0),
        ];
        for (u, m) in units {
            if let Some(n) = t.strip_suffix(u) {
                let v: f64 = n.trim().parse().map_err(|_| bad())?;
                return if v > 0.0 {
                    Ok(KeepSpec::Bytes((v * m) as u64))
                } else {
                    Err(bad())
                };
            }
        }
        match t.parse::<usize>() {
            Ok(n) if n > 0 => Ok(KeepSpec::PerLayer(n)),
            _ => Err(bad()),
        }
    }
}

/// Experts kept, per MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidentSet {
    /// `(layer, keep[expert])`.
    pub layers: Vec<(usize, Vec<bool>)>,
}

impl ResidentSet {
    pub fn is_resident(&self, layer: usize, expert: usize) -> bool {
        self.layers
            .iter()
            .find(|(l, _)| *l == layer)
            .is_none_or(|(_, k)| k.get(expert).copied().unwrap_or(false))
    }
}

/// Experts to keep per layer under `keep` for `file`.
pub fn keep_count(file: &EdmFile, keep: KeepSpec) -> Result<usize, ExpertsError> {
    let c = &file.header.metadata.config;
    let n = c.moe.num_experts;
    let count = match keep {
        KeepSpec::Fraction(f) => ((n as f64 * f).round() as usize).max(1),
        KeepSpec::PerLayer(k) => k,
        KeepSpec::Bytes(budget) => {
            let dense: u64 = file.header.tensors.iter().map(|t| t.length).sum();
            let per_expert: u64 = file.header.experts.iter().map(|t| t.length).sum();
            if budget <= dense || per_expert == 0 {
                return Err(ExpertsError::BudgetTooSmall(format!(
                    "a budget of {budget} bytes does not cover the {dense} bytes of dense weights"
                )));
            }
            ((budget - dense) / per_expert) as usize
        }
    };
    if count < c.moe.top_k {
        return Err(ExpertsError::BudgetTooSmall(format!(
            "keeping {count} experts per layer is fewer than the router's top-{} ",
            c.moe.top_k
        )));
    }
    Ok(count.min(n))
}

/// The `count` best experts of one layer by `selector`; ties go to the lower index.
pub fn select_layer(
    profile: &Profile,
    layer: usize,
    count: usize,
    selector: Selector,
) -> Result<Vec<bool>, ExpertsError> {
    let n = profile.num_experts;
    let lp = profile
        .layer(layer)
        .ok_or_else(|| ExpertsError::BadProfile(format!("no entry for layer {layer}")))?;
    let score: Vec<f64> = match selector {
        Selector::Mass => lp.mass.clone(),
        Selector::Frequency => lp.tokens.iter().map(|&t| t as f64).collect(),
        Selector::Random { seed } => {
            // splitmix64 keyed by (seed, layer, expert): reproducible and independent per layer.
            (0..n)
                .map(|e| {
                    let mut z =
                        seed ^ ((layer as u64) << 32 | e as u64).wrapping_mul(0x9E3779B97F4A7C15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                    (z ^ (z >> 31)) as f64
                })
                .collect()
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    let mut keep = vec![false; n];
    for &e in order.iter().take(count) {
        keep[e] = true;
    }
    Ok(keep)
}

/// The resident set a profile selects by router-probability mass, `keep` per MoE layer: what
/// `edgediff prune --profile p --keep k` keeps, so a model loaded with it routes exactly like the
/// pruned file.
pub fn resident_from_profile(
    file: &EdmFile,
    profile: &Profile,
    keep: KeepSpec,
) -> Result<ResidentSet, ExpertsError> {
    if file.header.metadata.resident.is_some() {
        return Err(ExpertsError::AlreadyPruned);
    }
    let count = keep_count(file, keep)?;
    let layers = file
        .header
        .experts
        .iter()
        .map(|t| {
            Ok((
                t.layer,
                select_layer(profile, t.layer, count, Selector::Mass)?,
            ))
        })
        .collect::<Result<Vec<_>, ExpertsError>>()?;
    Ok(ResidentSet { layers })
}

/// Per MoE layer, the router's selection bias with every non-resident expert masked (the file's
/// own bias, else zeros): what [`prune_file`] writes, for masking a model in memory instead.
pub fn masked_router_biases(
    file: &EdmFile,
    set: &ResidentSet,
) -> Result<Vec<(usize, Vec<f32>)>, ExpertsError> {
    let n = file.header.metadata.config.moe.num_experts;
    file.header
        .experts
        .iter()
        .map(|t| {
            let name = names::layer(t.layer, names::ROUTER_BIAS);
            let mut bias = match file.tensor_entry(&name) {
                Some(_) => file.tensor(&name)?.to_f32()?,
                None => vec![0.0; n],
            };
            mask_bias(&mut bias, set, t.layer);
            Ok((t.layer, bias))
        })
        .collect()
}

/// Writes `output`: `input` with only the resident experts, and the router masked so it never
/// selects the others. Pruned experts' bytes are not read.
pub fn prune_file(
    input: &EdmFile,
    output: &Path,
    set: &ResidentSet,
    provenance: serde_json::Value,
) -> Result<u64, ExpertsError> {
    let h = &input.header;
    if h.metadata.resident.is_some() {
        return Err(ExpertsError::AlreadyPruned);
    }
    let c = &h.metadata.config;
    let mut meta = h.metadata.clone();
    meta.config.moe.router_bias = true;
    let kept: Vec<(usize, Vec<usize>)> = set
        .layers
        .iter()
        .map(|(l, k)| (*l, (0..k.len()).filter(|&e| k[e]).collect()))
        .collect();
    meta.resident = Some(json!({ "kept": kept, "of": c.moe.num_experts, "selection": provenance }));
    let mut plan = LayoutBuilder::new(meta);
    let bias_name = |l: usize| names::layer(l, names::ROUTER_BIAS);
    for t in &h.tensors {
        plan.tensor(&t.name, t.dtype, &t.shape)?;
    }
    let moe_layers: Vec<usize> = h.experts.iter().map(|t| t.layer).collect();
    let missing_bias: Vec<usize> = moe_layers
        .iter()
        .copied()
        .filter(|&l| input.tensor_entry(&bias_name(l)).is_none())
        .collect();
    for &l in &missing_bias {
        plan.tensor(&bias_name(l), DType::F32, &[c.moe.num_experts])?;
    }
    for t in &h.experts {
        let parts: Vec<(&str, DType, Vec<usize>)> = t
            .parts
            .iter()
            .map(|p| (p.name.as_str(), p.dtype, p.shape.clone()))
            .collect();
        let keep: Vec<bool> = (0..c.moe.num_experts)
            .map(|e| set.is_resident(t.layer, e) && t.offsets[e].is_some())
            .collect();
        plan.experts_subset(t.layer, &keep, &parts)?;
    }
    for b in &h.blobs {
        plan.blob(&b.name, b.length);
    }
    let mut w = EdmWriter::create(output, plan.finish())?;
    for t in &h.tensors {
        let view = input.tensor(&t.name)?;
        if moe_layers.iter().any(|&l| t.name == bias_name(l)) {
            let l = moe_layers
                .iter()
                .copied()
                .find(|&l| t.name == bias_name(l))
                .expect("found");
            let mut bias = view.to_f32()?;
            mask_bias(&mut bias, set, l);
            w.write_tensor(&t.name, &dtype::encode(DType::F32, &bias, bias.len()))?;
        } else {
            w.write_tensor(&t.name, view.bytes)?;
        }
    }
    for &l in &missing_bias {
        let mut bias = vec![0.0; c.moe.num_experts];
        mask_bias(&mut bias, set, l);
        w.write_tensor(&bias_name(l), &dtype::encode(DType::F32, &bias, bias.len()))?;
    }
    for t in &h.experts {
        for e in 0..c.moe.num_experts {
            if !set.is_resident(t.layer, e) || t.offsets[e].is_none() {
                continue;
            }
            for p in &t.parts {
                let view = input.expert_part(t.layer, e, &p.name)?;
                w.write_expert_part(t.layer, e, &p.name, view.bytes)?;
            }
        }
    }
    for b in &h.blobs {
        w.write_blob(&b.name, input.blob(&b.name)?)?;
    }
    let path = w.finish()?;
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

fn mask_bias(bias: &mut [f32], set: &ResidentSet, layer: usize) {
    // Only routed experts can be pruned: a class past them (an MLP router's skip class, id
    // num_experts) holds no weights, and masking it would forbid the model to skip.
    let experts = set
        .layers
        .iter()
        .find(|(l, _)| *l == layer)
        .map_or(0, |(_, k)| k.len());
    for (e, b) in bias.iter_mut().enumerate().take(experts) {
        if !set.is_resident(layer, e) {
            *b = PRUNED_BIAS;
        }
    }
}

/// EMO's layer-wise greedy selection by router-probability mass: choose layer l's experts from a
/// profile in which every earlier MoE layer is already pruned, so later layers are chosen for the
/// hidden states the pruned model will actually produce. One corpus pass per MoE layer.
pub fn select_greedy(
    input: &EdmFile,
    docs: &[Vec<u32>],
    count: usize,
    window: usize,
    scratch: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<ResidentSet, ExpertsError> {
    use crate::backend::cpu::CpuBackend;
    let moe_layers: Vec<usize> = input.header.experts.iter().map(|t| t.layer).collect();
    let n = input.header.metadata.config.moe.num_experts;
    let mut set = ResidentSet {
        layers: moe_layers.iter().map(|&l| (l, vec![true; n])).collect(),
    };
    for (i, &layer) in moe_layers.iter().enumerate() {
        progress(i, moe_layers.len());
        // The model as pruned so far (layers before `layer`); the first layer needs no copy.
        let file = if i == 0 {
            std::sync::Arc::new(EdmFile::open(input.path())?)
        } else {
            prune_file(input, scratch, &set, json!({ "greedy_step": i }))?;
            std::sync::Arc::new(EdmFile::open(scratch)?)
        };
        let model = crate::model::Model::load(&CpuBackend, file.clone(), &|_, _| true)?;
        let mut profile = Profile::empty(&file)?;
        for d in docs {
            profile.add_document(&CpuBackend, &model, d, window)?;
        }
        let keep = select_layer(&profile, layer, count, Selector::Mass)?;
        set.layers[i].1 = keep;
    }
    progress(moe_layers.len(), moe_layers.len());
    let _ = std::fs::remove_file(scratch);
    Ok(set)
}
