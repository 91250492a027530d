#!/usr/bin/env python3
"""Reference logits from transformers for edgediff's parity fixtures (the oracle's oracle).

Given a Hugging Face checkpoint directory (as `edgediff synth --arch X --hf-out DIR` writes it), a
token list and attention masks, runs the model with transformers in float32 and writes
`reference.json`:

    {family, oracle, tokens, device, transformers_version, torch_version, numpy_version,
     checkpoint_sha256, settings, checks: {...},
     cases: [{mask, logits: [[vocab] per position],
              routing: [{layer, ids: [[k]], weights: [[k]], scores: [[E]]} per MoE layer],
              cpu_rel_l2}]}

How the oracle is set up, and why:
- `dtype=torch.float32`, `attn_implementation="eager"`, `experts_implementation="eager"`, eval mode,
  no grad, TF32 off and matmul precision "highest" on CUDA: the plainest f32 path transformers has.
- The mask is always given as an ADDITIVE float 4-D mask [1, 1, L, L] holding 0 (attend) or
  finfo(float32).min (masked). transformers 5 hands a 4-D mask to the attention function as-is and
  eager ADDS it to the scores, so a boolean mask would add +1/+0 and mask nothing.
- Each case also records, per MoE layer, the router's (expert ids, weights) from a hook on `mlp.gate`
  and the scores its top-k selected on (softmax probabilities; sigmoid + bias for LLaDA2), so a
  consumer can tell a near-tie from a wrong routing; and (on an accelerator) the relative L2 between
  the device's logits and the same run on the CPU.
- Sanity checks that fail loudly: the forced causal mask reproduces the model's own causal path, and
  the bidirectional mask changes the logits (so the mask is not silently ignored).

Families:
- qwen3_moe: `Qwen3MoeForCausalLM.from_pretrained(dir)`.
- olmoe: `OlmoeForCausalLM.from_pretrained(dir)`.
- zaya (ZAYA1): `ZayaForCausalLM.from_pretrained(dir)`. Its router returns (logits over experts + 1
  classes, weights, ids with a chosen skip expert masked to id 0 and weight 0); the recorded ids
  keep the skip class as id `num_experts` (edgediff's convention), recomputed from the scores it
  selected on (softmax + `balancing_biases`). With a forced 4-D mask transformers applies no
  sliding window, so the fixture's window spans the whole token list (its sliding layers still
  differ by RoPE θ), and the CCA conv sees no padding mask (none is given). transformers 5.17's
  weight init sets `balancing_biases[-1] = -1` (the skip class's selection bias) even when the
  checkpoint holds another value; the script copies the checkpoint's buffers back (listed under
  `checks.restored_from_checkpoint`) so the oracle computes the checkpoint's function, skip expert
  choices included.
- llada2_moe (LLaDA2.0 / BailingMoeV2): transformers has no such class and inclusionAI's remote code
  does not run on transformers 5 (its rotary init asks ROPE_INIT_FUNCTIONS["default"], gone in 5.x).
  It is verified in two independent ways:
  1. Full model: the weights are remapped into transformers' `Glm4MoeForCausalLM`, which has exactly
     LLaDA2's pieces: partial RoPE (rotate_half over the first int(head_dim * partial_rotary_factor)
     dims, inv_freq denominator = the rotary dim), per-head q/k RMSNorm before RoPE, the sigmoid +
     selection-bias group-limited top-k router with scaling after renormalisation, shared experts of
     size moe_intermediate_size * num_shared_experts, the first `first_k_dense_replace` layers dense,
     scaling head_dim**-0.5. Mapping: word_embeddings -> embed_tokens; query_key_value rows
     [0, nh*hd) -> q_proj, [nh*hd, (nh+nkv)*hd) -> k_proj, the rest -> v_proj (contiguous split, as
     LLaDA2's `qkv.split([nh, nkv, nkv], dim=-2)`); attention.dense -> o_proj; query_layernorm ->
     q_norm; key_layernorm -> k_norm; mlp.gate.expert_bias -> e_score_correction_bias; experts,
     shared experts and norms keep their names. LLaDA2 renormalises the top-k weights iff top_k > 1
     (it ignores norm_topk_prob), so glm4's norm_topk_prob is set to (top_k > 1). What glm4_moe cannot
     express is refused: use_bias (an o_proj bias), norm_head, rope scaling. This route was checked
     against a float64 transcription of modeling_llada2_moe.py and against the real dFactory
     LLaDA2MoeModelLM under transformers 4.52.3: both within 5.5e-7 relative L2.
  2. Router alone, on every run: for each MoE layer, the inputs the glm4 router saw are fed to
     transformers' `DeepseekV3TopkRouter` (and the whole `DeepseekV3MoE` block: routed + shared
     experts) loaded with the same weights, and to a line-by-line transcription of LLaDA2's
     `LLaDA2MoeGate` (below). The max abs differences of expert ids and weights (after sorting each
     token's top-k by id, since the routers disagree only on order) and of the block output are
     recorded under `checks`, and the run fails if ids differ.

Self-contained: torch, transformers, safetensors, numpy.

Usage:
    python3 reference_logits.py CHECKPOINT_DIR --tokens 1,2,3 --masks causal,bidirectional,block:4 \
        --out reference.json [--device cuda|cpu]
"""

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers


def allowed_matrix(spec: str, n: int) -> torch.Tensor:
    """Which keys each query may see, [n, n] bool; the same rules as edgediff's AttnMask."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    if spec == "causal":
        return k <= q
    if spec == "bidirectional":
        return torch.ones(n, n, dtype=torch.bool)
    if spec.startswith("block:"):
        b = int(spec.split(":", 1)[1])
        if b <= 0:
            raise ValueError(f"block size must be positive: {spec}")
        return (k // b) <= (q // b)
    raise ValueError(f"unknown mask {spec!r} (causal, bidirectional or block:N)")


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    zero = torch.tensor(0.0, dtype=torch.float32)
    neg = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(allowed, zero, neg)[None, None]


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- model loading ------------------------------------------------------------------------------

ORACLE_KW = dict(dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")


def load_hf(cls, ckpt: pathlib.Path):
    return cls.from_pretrained(ckpt, **ORACLE_KW).eval()


@torch.no_grad()
def restore_buffers(model, ckpt: pathlib.Path) -> list:
    """Copies every checkpoint tensor that loading left different back into the model; returns their names."""
    weights = safetensors.torch.load_file(ckpt / "model.safetensors")
    state = model.state_dict()
    restored = []
    for name, value in weights.items():
        if name in state and not torch.equal(state[name].cpu(), value.to(state[name].dtype)):
            state[name].copy_(value)
            restored.append(name)
    return restored


def glm4_config_from_llada2(c: dict):
    for key in ("use_bias", "norm_head"):
        if c.get(key):
            raise SystemExit(f"llada2: {key}=true cannot be expressed in glm4_moe")
    if c.get("rope_scaling"):
        raise SystemExit("llada2: rope_scaling is not supported by this oracle")
    if c.get("score_function", "sigmoid") != "sigmoid":
        raise SystemExit("llada2: only the sigmoid router exists in the modeling code")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    top_k = c["num_experts_per_tok"]
    return transformers.Glm4MoeConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        moe_intermediate_size=c["moe_intermediate_size"],
        n_routed_experts=c["num_experts"],
        num_experts_per_tok=top_k,
        n_group=c.get("n_group", 1),
        topk_group=c.get("topk_group", 1),
        n_shared_experts=c.get("num_shared_experts") or 0,
        routed_scaling_factor=c.get("routed_scaling_factor", 1.0),
        first_k_dense_replace=c.get("first_k_dense_replace", 0),
        norm_topk_prob=top_k > 1,
        use_qk_norm=True,
        partial_rotary_factor=c.get("partial_rotary_factor", 1.0),
        rope_theta=c.get("rope_theta", 10000.0),
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        attention_bias=bool(c.get("use_qkv_bias")),
        tie_word_embeddings=bool(c.get("tie_word_embeddings")),
        max_position_embeddings=c.get("max_position_embeddings", 4096),
    )


def glm4_state_from_llada2(c: dict, w: dict) -> dict:
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or c["hidden_size"] // nh
    n_exp = c["num_experts"]
    first_dense = c.get("first_k_dense_replace", 0)
    if not c.get("use_qk_norm", True) and "model.layers.0.attention.query_layernorm.weight" not in w:
        raise SystemExit("llada2 without q/k norm is not expressible in this glm4_moe mapping")
    sd = {"model.embed_tokens.weight": w["model.word_embeddings.weight"], "model.norm.weight": w["model.norm.weight"]}
    if "lm_head.weight" in w:
        sd["lm_head.weight"] = w["lm_head.weight"]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        qkv = w[p + "attention.query_key_value.weight"]
        sd[p + "self_attn.q_proj.weight"] = qkv[: nh * hd]
        sd[p + "self_attn.k_proj.weight"] = qkv[nh * hd : (nh + nkv) * hd]
        sd[p + "self_attn.v_proj.weight"] = qkv[(nh + nkv) * hd :]
        sd[p + "self_attn.o_proj.weight"] = w[p + "attention.dense.weight"]
        sd[p + "self_attn.q_norm.weight"] = w[p + "attention.query_layernorm.weight"]
        sd[p + "self_attn.k_norm.weight"] = w[p + "attention.key_layernorm.weight"]
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[p + n + ".weight"] = w[p + n + ".weight"]
        if layer < first_dense:
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.{n}.weight"] = w[p + f"mlp.{n}.weight"]
            continue
        sd[p + "mlp.gate.weight"] = w[p + "mlp.gate.weight"]
        sd[p + "mlp.gate.e_score_correction_bias"] = w[p + "mlp.gate.expert_bias"]
        e = p + "mlp.experts."
        # transformers 5 holds experts fused in memory: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
        sd[e + "gate_up_proj"] = torch.stack(
            [torch.cat([w[e + f"{i}.gate_proj.weight"], w[e + f"{i}.up_proj.weight"]], 0) for i in range(n_exp)]
        )
        sd[e + "down_proj"] = torch.stack([w[e + f"{i}.down_proj.weight"] for i in range(n_exp)])
        if c.get("num_shared_experts"):
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.shared_experts.{n}.weight"] = w[p + f"mlp.shared_experts.{n}.weight"]
    return sd


def load_llada2(ckpt: pathlib.Path, c: dict):
    cfg = glm4_config_from_llada2(c)
    model = transformers.Glm4MoeForCausalLM._from_config(
        cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    ).eval()
    weights = safetensors.torch.load_file(ckpt / "model.safetensors")
    sd = glm4_state_from_llada2(c, {k: v.float() for k, v in weights.items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"llada2 -> glm4_moe mapping incomplete: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    hd = cfg.head_dim
    rot = 2 * model.model.rotary_emb.inv_freq.numel()
    want = int(hd * c.get("partial_rotary_factor", 1.0))
    if rot != want:
        raise SystemExit(f"glm4_moe rotates {rot} dims, LLaDA2 rotates {want}")
    return model, cfg


# --- the LLaDA2 router, transcribed from modeling_llada2_moe.py (LLaDA2MoeGate) ------------------


def llada2_gate(h, weight, expert_bias, n_group, topk_group, top_k, routed_scaling_factor):
    logits = F.linear(h.type(torch.float32), weight.type(torch.float32))
    scores = torch.sigmoid(logits.float()).type_as(logits)
    scores_for_routing = scores + expert_bias
    # group_limited_topk(scores_for_routing)
    num_tokens, num_experts = scores_for_routing.shape
    group_scores = scores_for_routing.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(num_tokens, n_group, num_experts // n_group).reshape(num_tokens, -1)
    )
    masked_scores = scores_for_routing.masked_fill(~score_mask.bool(), float("-inf"))
    _, topk_idx = torch.topk(masked_scores, k=top_k, dim=-1)
    scores = torch.gather(scores, dim=1, index=topk_idx).type_as(logits)
    topk_weight = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if top_k > 1 else scores
    topk_weight = topk_weight * routed_scaling_factor
    return topk_idx, topk_weight


def sorted_routing(ids: torch.Tensor, weights: torch.Tensor):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


@torch.no_grad()
def check_llada2_router(model, cfg, mlp_inputs: dict, device) -> dict:
    """DeepseekV3 router and MoE block, and the transcribed LLaDA2 gate, against glm4_moe's."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    ds_cfg = transformers.DeepseekV3Config(
        hidden_size=cfg.hidden_size,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_shared_experts=cfg.n_shared_experts,
        hidden_act="silu",
        experts_implementation="eager",
    )
    worst = {"dsv3_router_ids": 0, "dsv3_router_weights": 0.0, "llada2_gate_ids": 0, "llada2_gate_weights": 0.0,
             "dsv3_moe_block_rel_l2": 0.0, "tokens_checked": 0}
    for layer, inputs in mlp_inputs.items():
        glm_moe = model.model.layers[layer].mlp
        ds = DeepseekV3MoE(ds_cfg).to(device).eval()
        ds.load_state_dict(glm_moe.state_dict(), strict=True)
        for h in inputs:
            flat = h.view(-1, cfg.hidden_size)
            _, gw, gi = glm_moe.gate(flat)
            _, dw, di = ds.gate(flat)
            li, lw = llada2_gate(flat, glm_moe.gate.weight, glm_moe.gate.e_score_correction_bias, cfg.n_group,
                                 cfg.topk_group, cfg.num_experts_per_tok, cfg.routed_scaling_factor)
            gi, gw = sorted_routing(gi, gw)
            di, dw = sorted_routing(di, dw)
            li, lw = sorted_routing(li, lw)
            worst["dsv3_router_ids"] = max(worst["dsv3_router_ids"], int((gi - di).abs().max()))
            worst["dsv3_router_weights"] = max(worst["dsv3_router_weights"], float((gw - dw).abs().max()))
            worst["llada2_gate_ids"] = max(worst["llada2_gate_ids"], int((gi - li).abs().max()))
            worst["llada2_gate_weights"] = max(worst["llada2_gate_weights"], float((gw - lw).abs().max()))
            ours, theirs = glm_moe(h), ds(h)
            worst["dsv3_moe_block_rel_l2"] = max(worst["dsv3_moe_block_rel_l2"], rel_l2(ours.cpu(), theirs.cpu()))
            worst["tokens_checked"] += flat.shape[0]
    if worst["dsv3_router_ids"] or worst["llada2_gate_ids"]:
        raise SystemExit(f"llada2 router check failed: {worst}")
    return worst


# --- running ------------------------------------------------------------------------------------


def run(model, tokens, mask_spec, device, capture_mlp=False):
    """Logits [L, V], routing per MoE layer, and (optionally) each MoE layer's input."""
    n = len(tokens)
    routing, mlp_in, hooks = [], {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if not isinstance(gate, torch.nn.Module):
            continue

        def on_gate(m, _inp, out, i=i):
            logits, weights, ids = out[:3]
            if hasattr(m, "balancing_biases"):
                # ZAYA: recover the skip class (masked to id 0 by the router) from the selection.
                scores = selection_scores(m, logits)
                ids = scores.topk(m.top_k, dim=-1).indices
                weights = torch.where(ids == m.num_experts, torch.zeros_like(weights), weights)
            ids, weights = sorted_routing(ids, weights.float())
            routing.append({"layer": i, "ids": ids.cpu().tolist(), "weights": f32_list(weights),
                            "scores": f32_list(selection_scores(m, logits))})

        hooks.append(gate.register_forward_hook(on_gate))
        if capture_mlp:
            hooks.append(layer.mlp.register_forward_hook(lambda _m, inp, _o, i=i: mlp_in.setdefault(i, []).append(inp[0])))
    ids = torch.tensor([tokens], device=device)
    pos = torch.arange(n, device=device)[None]
    mask = None if mask_spec is None else additive_mask(allowed_matrix(mask_spec, n)).to(device)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits.float().cpu().numpy(), routing, mlp_in


def selection_scores(gate, router_logits):
    """The scores top-k selects on, [T, E]: softmax probabilities, or sigmoid plus selection bias."""
    if hasattr(gate, "balancing_biases"):
        return router_logits.float().softmax(dim=-1) + gate.balancing_biases.float()
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is not None:
        return router_logits.float().sigmoid() + bias
    return router_logits.float().softmax(dim=-1)


def f32_list(t):
    """Nested lists of floats printed with 9 significant digits: exact for f32, half the bytes of repr."""
    a = np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float32)
    if a.ndim == 1:
        return [float(f"{v:.9g}") for v in a.tolist()]
    return [f32_list(row) for row in a]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=pathlib.Path)
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--masks", default="causal,bidirectional,block:4,block:8")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)

    tokens = [int(t) for t in a.tokens.split(",")]
    masks = a.masks.split(",")
    config = json.loads((a.checkpoint / "config.json").read_text())
    family = config["model_type"]
    if family == "qwen3_moe":
        model, oracle = load_hf(transformers.Qwen3MoeForCausalLM, a.checkpoint), "Qwen3MoeForCausalLM"
    elif family == "olmoe":
        model, oracle = load_hf(transformers.OlmoeForCausalLM, a.checkpoint), "OlmoeForCausalLM"
    elif family == "zaya":
        model, oracle = load_hf(transformers.ZayaForCausalLM, a.checkpoint), "ZayaForCausalLM"
        restored = restore_buffers(model, a.checkpoint)
    elif family == "llada2_moe":
        model, glm_cfg = load_llada2(a.checkpoint, config)
        oracle = "Glm4MoeForCausalLM with LLaDA2 weights remapped; router checked against DeepseekV3MoE"
    else:
        raise SystemExit(f"unsupported model_type {family!r}")
    if max(tokens) >= model.config.vocab_size or min(tokens) < 0:
        raise SystemExit("token id outside the vocabulary")

    cpu_model = None
    if a.device != "cpu":
        import copy
        cpu_model = copy.deepcopy(model)
    model.to(a.device)

    cases, mlp_inputs = [], {}
    for spec in masks:
        logits, routing, mlp_in = run(model, tokens, spec, a.device, capture_mlp=family == "llada2_moe")
        for k, v in mlp_in.items():
            mlp_inputs.setdefault(k, []).extend(v)
        case = {"mask": spec, "logits": f32_list(logits), "routing": routing}
        if cpu_model is not None:
            case["cpu_rel_l2"] = rel_l2(run(cpu_model, tokens, spec, "cpu")[0], logits)
        cases.append(case)
        print(f"{family} {spec}: logits {logits.shape}, |logits| {np.linalg.norm(logits):.4f}"
              + (f", device vs cpu rel L2 {case['cpu_rel_l2']:.2e}" if "cpu_rel_l2" in case else ""))

    checks = {}
    if family == "zaya":
        checks["restored_from_checkpoint"] = restored
    by_mask = {c["mask"]: np.array(c["logits"]) for c in cases}
    # The forced causal mask must reproduce the model's own causal path: the 4-D mask reached attention.
    if "causal" in by_mask:
        builtin = run(model, tokens, None, a.device)[0]
        checks["forced_causal_vs_builtin_rel_l2"] = rel_l2(by_mask["causal"], builtin)
        if checks["forced_causal_vs_builtin_rel_l2"] > 1e-5:
            raise SystemExit(f"forced causal mask differs from the built-in one: {checks}")
    if "causal" in by_mask and "bidirectional" in by_mask:
        checks["bidirectional_vs_causal_rel_l2"] = rel_l2(by_mask["bidirectional"], by_mask["causal"])
        if checks["bidirectional_vs_causal_rel_l2"] < 1e-3:
            raise SystemExit("the bidirectional mask did not change the logits: masks are being ignored")
    if family == "llada2_moe":
        checks["llada2_router"] = check_llada2_router(model, glm_cfg, mlp_inputs, a.device)
    print(f"{family} checks: {json.dumps(checks)}")

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    out = {
        "family": family,
        "oracle": oracle,
        "checkpoint_sha256": hashlib.sha256((a.checkpoint / "model.safetensors").read_bytes()).hexdigest(),
        "tokens": tokens,
        "device": f"{a.device} ({device_name})",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "settings": "float32, attn eager, experts eager, additive 4-D mask 0/finfo.min, TF32 off",
        "checks": checks,
        "cases": cases,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
