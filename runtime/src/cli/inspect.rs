//! `edgediff inspect`: reads only the preamble and header (no tensor data, no tokenizer blob).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;

use super::human_bytes;
use crate::format::EdmFile;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (*.edm, or a GGUF file to see what `convert` would make of it).
    pub model: PathBuf,
    /// Print the header as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

fn kind_of(name: &str) -> &'static str {
    match name {
        "embed" => "embedding",
        "lm_head" => "lm head",
        n if n.ends_with("norm") => "norms",
        n if n.contains(".attn.") => "attention",
        n if n.contains("router") => "router",
        n if n.contains("moe.shared") => "shared experts",
        n if n.contains(".mlp.") => "dense mlp",
        _ => "other",
    }
}

/// `inspect model.gguf`: the GGUF header, its metadata abbreviated, bytes by ggml type, and what
/// `convert` would make of it (or why it would refuse).
fn run_gguf(a: &Args) -> anyhow::Result<()> {
    use crate::format::gguf::GgufFile;
    let f = GgufFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let h = &f.header;
    println!(
        "file          {} ({}), GGUF version {}, alignment {}, data at byte {}",
        a.model.display(),
        human_bytes(f.file_len()),
        h.version,
        h.alignment,
        h.data_start
    );
    println!("metadata      {} keys:", h.metadata.len());
    for (k, v) in &h.metadata {
        println!("  {k:<44} {}", v.summary(if a.json { 100_000 } else { 90 }));
    }
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in &h.tensors {
        let e = by_type.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.byte_len;
    }
    println!("tensors       {}:", h.tensors.len());
    for (ty, (n, bytes)) in &by_type {
        println!("  {ty:<8} {n:>5} tensors {:>12}", human_bytes(*bytes));
    }
    match crate::import::gguf::read_meta(&f) {
        Ok((fam, meta)) => {
            let c = &meta.config;
            let (total, active) = c.parameter_counts();
            println!(
                "converts to   {} ({} layers, hidden {}, {} heads / {} kv heads × {}, vocab {}, {} parameters, {active} active), prediction {}",
                c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                c.head_dim, c.vocab_size, total, fam.prediction.name()
            );
        }
        Err(e) => println!("converts to   nothing: {e}"),
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if crate::import::gguf::is_gguf(&a.model) {
        return run_gguf(&a);
    }
    let f = EdmFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let h = &f.header;
    if a.json {
        println!("{}", serde_json::to_string_pretty(h)?);
        return Ok(());
    }
    let c = &h.metadata.config;
    let (total, active) = c.parameter_counts();
    println!(
        "file          {} ({})",
        a.model.display(),
        human_bytes(f.file_len())
    );
    println!("architecture  {}", c.architecture);
    println!(
        "shape         {} layers, hidden {}, {} heads / {} kv heads × {}, rotary {} (θ {}), vocab {}, context {}",
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.rotary_dim, c.rope_theta,
        c.vocab_size, c.max_position
    );
    println!(
        "moe           {} experts top-{}, expert ffn {}, shared ffn {}, gating {:?}, dense layers {:?} (ffn {})",
        c.moe.num_experts, c.moe.top_k, c.moe.expert_ffn, c.moe.shared_ffn, c.moe.gating, c.dense_layers, c.dense_ffn
    );
    if let Some(g) = &c.block.global {
        let s = c.sliding.as_ref();
        println!(
            "global layers {} heads / {} kv heads × {}{}, RoPE on {} of {} pairs (θ {}); sliding window {} (θ {}) on layers {:?}",
            c.num_heads, g.kv_heads, g.head_dim, if g.k_eq_v { ", K = V" } else { "" },
            g.rope_pairs, g.head_dim / 2, c.rope_theta,
            s.map_or(0, |s| s.window), s.map_or(0.0, |s| s.rope_theta),
            s.map(|s| s.layers.as_slice()).unwrap_or(&[])
        );
    }
    if c.block != Default::default() {
        let b = &c.block;
        println!(
            "block         {:?} norms, {:?} FFN, {:?}, router {:?}, embedding {:?}, score scale {:?}, logit softcap {:?}, canvas {:?}",
            b.norms, b.ffn, b.activation, c.router, c.embedding, b.attn_scale, b.logit_softcap, b.canvas
        );
    }
    println!("parameters    {total} total, {active} active per token");
    let mut by_kind: BTreeMap<(String, String), u64> = BTreeMap::new();
    for t in &h.tensors {
        *by_kind
            .entry((kind_of(&t.name).into(), t.dtype.to_string()))
            .or_default() += t.length;
    }
    let mut experts_present = 0;
    let mut pruned = 0;
    for t in &h.experts {
        for p in &t.parts {
            let n = t.offsets.iter().flatten().count() as u64;
            *by_kind
                .entry(("routed experts".into(), p.dtype.to_string()))
                .or_default() += p.length * n;
        }
        experts_present += t.offsets.iter().flatten().count();
        pruned += t.offsets.iter().filter(|o| o.is_none()).count();
    }
    println!("bytes by kind:");
    for ((kind, dtype), bytes) in &by_kind {
        println!("  {kind:<16} {dtype:<4} {:>12}", human_bytes(*bytes));
    }
    if let Some(t) = h.experts.first() {
        let parts: Vec<String> = t
            .parts
            .iter()
            .map(|p| format!("{} {:?} {} @+{}", p.name, p.shape, p.dtype, p.offset))
            .collect();
        println!(
            "experts       {} MoE layers, {experts_present} experts stored, {pruned} pruned; each one range of {} ({}), 16 KiB aligned: {}",
            h.experts.len(),
            t.length,
            human_bytes(t.length),
            parts.join(", ")
        );
    }
    let s = &h.metadata.special_tokens;
    let tok = h.blobs.iter().find(|b| b.name == "tokenizer.json");
    println!(
        "tokenizer     {} embedded; special ids mask {:?} eos {:?} bos {:?} pad {:?}; chat template {}",
        tok.map_or("none".into(), |b| human_bytes(b.length)),
        s.mask, s.eos, s.bos, s.pad,
        if h.metadata.chat_template.is_some() { "yes" } else { "no" }
    );
    let d = &h.metadata.decoding;
    println!(
        "decoding      block {} threshold {} steps {}",
        d.block_size, d.threshold, d.steps
    );
    if let Some(c) = &d.canvas {
        println!(
            "canvas        sampler: {} steps, entropy bound {}, t {} → {}, stability {}, confidence {}",
            c.steps, c.entropy_bound, c.t_max, c.t_min, c.stability, c.confidence
        );
    }
    if h.metadata.resident.is_some() {
        println!("resident set  present (pruned model)");
    }
    println!(
        "read          {} bytes of the file (preamble + header)",
        f.header_bytes_read()
    );
    Ok(())
}
