//! GGUF tensor names (llama.cpp's `blk.{l}.attn_q.weight`, …) onto the names of a family's
//! Hugging Face layout, so the one converter (`import::write_model_with`) plans and checks a GGUF
//! model exactly as it does a safetensors checkpoint. A stacked expert tensor (`ffn_gate_exps`,
//! `[E, I, H]`) becomes E per-expert names; llama's q/k carry the row order llama.cpp's converter
//! gave them for its interleaved RoPE and are put back into rotate-half order on read.

use crate::import::{HfLayout, QkvNames};

/// How a model-side tensor is read from its GGUF tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    Whole,
    /// Rows of each of `heads` heads stored interleaved (llama.cpp's permutation of llama q/k):
    /// GGUF row `2j + s` of a head is row `s·d/2 + j` of the rotate-half layout.
    Unpermute {
        heads: usize,
    },
    /// Expert `index` of a tensor stacking `count` experts along its outermost dimension.
    Expert {
        index: usize,
        count: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub gguf: String,
    pub read: Read,
}

/// Where llama.cpp puts what a layout needs, per layer.
fn layer_name(lay: &HfLayout, l: usize, rest: &str) -> Option<String> {
    let mlp = |prefix: &str, proj: &str| lay.layer(l, &format!("{prefix}.{proj}.weight"));
    let (q, k, v) = match lay.qkv {
        QkvNames::Separate { q, k, v } => (Some(q), Some(k), Some(v)),
        QkvNames::Fused(_) => (None, None, None),
    };
    Some(match rest {
        "attn_norm.weight" => lay.layer(l, lay.attn_norm),
        "attn_q.weight" => lay.layer(l, q?),
        "attn_k.weight" => lay.layer(l, k?),
        "attn_v.weight" => lay.layer(l, v?),
        "attn_qkv.weight" => match lay.qkv {
            QkvNames::Fused(f) => lay.layer(l, f),
            QkvNames::Separate { .. } => return None,
        },
        "attn_q_norm.weight" => lay.layer(l, lay.q_norm),
        "attn_k_norm.weight" => lay.layer(l, lay.k_norm),
        "attn_output.weight" => lay.layer(l, lay.o),
        "ffn_norm.weight" => lay.layer(l, lay.ffn_norm),
        "ffn_gate.weight" => mlp(lay.dense_mlp, "gate_proj"),
        "ffn_up.weight" => mlp(lay.dense_mlp, "up_proj"),
        "ffn_down.weight" => mlp(lay.dense_mlp, "down_proj"),
        "ffn_gate_inp.weight" => lay.layer(l, lay.router),
        "exp_probs_b.bias" => lay.layer(l, lay.router_bias?),
        "ffn_gate_shexp.weight" => mlp(lay.shared?, "gate_proj"),
        "ffn_up_shexp.weight" => mlp(lay.shared?, "up_proj"),
        "ffn_down_shexp.weight" => mlp(lay.shared?, "down_proj"),
        _ => return None,
    })
}

/// The stacked-expert tensors and the per-expert projection each holds.
fn expert_proj(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "ffn_gate_exps.weight" => "gate_proj",
        "ffn_up_exps.weight" => "up_proj",
        "ffn_down_exps.weight" => "down_proj",
        _ => return None,
    })
}

/// Layout names for one GGUF tensor: one name, E for stacked experts, or none when the layout has
/// no place for it (the converter then reports it as unexpected under its GGUF name).
/// `experts` is the stacked tensor's outermost dimension; `permute` the (q heads, kv heads) of a
/// llama-converted file.
pub fn map(
    lay: &HfLayout,
    gguf: &str,
    experts: usize,
    permute: Option<(usize, usize)>,
) -> Vec<(String, Mapped)> {
    let whole = |name: String, read: Read| {
        vec![(
            name,
            Mapped {
                gguf: gguf.to_string(),
                read,
            },
        )]
    };
    match gguf {
        "token_embd.weight" => return whole(lay.embed.into(), Read::Whole),
        "output_norm.weight" => return whole(lay.final_norm.into(), Read::Whole),
        "output.weight" => return whole(lay.lm_head.into(), Read::Whole),
        _ => {}
    }
    let Some((l, rest)) = gguf
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)))
    else {
        return Vec::new();
    };
    if let Some(proj) = expert_proj(rest) {
        return (0..experts)
            .map(|e| {
                (
                    lay.layer(l, &format!("{}.{e}.{proj}.weight", lay.experts)),
                    Mapped {
                        gguf: gguf.to_string(),
                        read: Read::Expert {
                            index: e,
                            count: experts,
                        },
                    },
                )
            })
            .collect();
    }
    let Some(name) = layer_name(lay, l, rest) else {
        return Vec::new();
    };
    let read = match (rest, permute) {
        ("attn_q.weight", Some((q, _))) => Read::Unpermute { heads: q },
        ("attn_k.weight", Some((_, kv))) => Read::Unpermute { heads: kv },
        _ => Read::Whole,
    };
    whole(name, read)
}

/// Row `r` of the rotate-half layout comes from this row of llama.cpp's interleaved one.
pub fn interleaved_row(r: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (head, i) = (r / d, r % d);
    let (s, j) = (i / (d / 2), i % (d / 2));
    head * d + 2 * j + s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp's converter: reshape(heads, 2, d/2, …).swapaxes(1, 2): HF row (h, s, j) lands
        // at (h, j, s). Build that forward map and check ours inverts it.
        let (heads, d) = (3, 8);
        let rows = heads * d;
        for hf in 0..rows {
            let (h, s, j) = (hf / d, (hf % d) / (d / 2), hf % (d / 2));
            let gguf = h * d + j * 2 + s;
            assert_eq!(interleaved_row(hf, rows, heads), gguf);
        }
    }

    #[test]
    fn stacked_experts_become_one_name_each() {
        let lay = crate::import::layout(crate::model::Architecture::Qwen3Moe);
        let m = map(lay, "blk.3.ffn_down_exps.weight", 4, None);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].0, "model.layers.3.mlp.experts.2.down_proj.weight");
        assert!(map(lay, "rope_freqs.weight", 0, None).is_empty());
        assert!(map(lay, "blk.x.attn_q.weight", 0, None).is_empty());
    }
}
