"""The PyTorch side of the SmolLM2 upcycling pipeline (issue 19): the GGUF base read into Hugging Face layout, and
one model class for both the dense teacher and the upcycled MoE student, in the layout edgediff imports as
`bailing_moe_v2` (runtime/src/import/llada2.rs): fused query_key_value, Llama attention (GQA, RoPE with
rotate_half, no q/k norm: `use_qk_norm: false`), RMSNorm, and per layer either the dense SwiGLU FFN or a MoE
FFN = shared expert + E routed experts, sigmoid router with a selection-only expert bias, top-k renormalised,
times `routed_scaling_factor` (the runtime's Gating::SigmoidGrouped with one group).

There is no transformers class for bailing, so this file is the model; its oracle is edgediff's CPU backend
(train_moe.py parity). The routed experts are computed densely (all E experts, weighted by a [T, E] routing
matrix that is zero off the top-k): E x width equals at most the dense FFN's width, so this costs no more than
the base and is exact, with no gather/scatter.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# SmolLM2's special tokens: 0 <|endoftext|> (document separator here), 1 <|im_start|>, 2 <|im_end|>; ids 3-16
# are StarCoder leftovers no chat or text uses. 4 (<reponame>, a duplicate of 3) becomes the diffusion mask.
EOT, IM_START, IM_END, MASK = 0, 1, 2, 4


@dataclass
class Cfg:
    vocab: int = 49152
    hidden: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    ffn: int = 1536  # dense FFN width (teacher)
    rope_theta: float = 100000.0
    eps: float = 1e-5
    # MoE (experts == 0: dense)
    experts: int = 0
    top_k: int = 2
    expert_ffn: int = 32
    shared_ffn: int = 512
    scale: float = 2.0

    def to_json(self):
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(pos, d, theta, device):
    """cos, sin [B|1, 1, T, d] (fp32) of Llama's rotate_half RoPE for pos [B, T] or [T]. Model.forward makes them
    once per forward and every layer's q and k share them (the same values each layer computed for itself before)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    ang = pos.float()[..., None] * inv  # [.., T, D/2]
    if ang.dim() == 2:
        ang = ang[None]
    ang = torch.cat([ang, ang], -1)[:, None]  # [B, 1, T, D]
    return ang.cos(), ang.sin()


def rope(x, pos, theta, cs=None):
    """x [B, H, T, D], pos [B, T] or [T]: Llama's rotate_half RoPE (cs: rope_cos_sin's, when already made)."""
    d = x.shape[-1]
    cos, sin = cs if cs is not None else rope_cos_sin(pos, d, theta, x.device)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


# GQA in SDPA: "repeat" expands k/v to the query heads (repeat_interleave) and calls SDPA with equal head counts;
# "sdpa" passes enable_gqa=True (torch >= 2.5) instead. With an explicit mask, as here, the memory-efficient CUDA
# kernel (the one that runs now) and CPU's flash kernel do not take grouped heads (sdp_utils.cpp:
# check_batch_size_and_num_heads_dense<false>), so "sdpa" may fall back to the math kernel or to cuDNN: opt-in
# (train_moe.py --sdpa-gqa) until a profile on the GPU shows it helps. Same result either way (CPU check).
GQA = "repeat"


def sdpa_has_gqa() -> bool:
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.query_key_value = nn.Linear(c.hidden, (c.heads + 2 * c.kv_heads) * c.head_dim, bias=False)
        self.dense = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x, pos, mask, cs=None):
        """cs: (cos, sin) of rope_cos_sin for pos, shared by the layers (made here when None)."""
        c = self.c
        B, T, _ = x.shape
        H, KV, D = c.heads, c.kv_heads, c.head_dim
        qkv = self.query_key_value(x)
        # q and k rotated together (one set of elementwise kernels over H + KV heads: the same values per element)
        qk = qkv[..., : (H + KV) * D].view(B, T, H + KV, D).transpose(1, 2)
        qk = rope(qk, pos, c.rope_theta, cs)
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2)
        if GQA == "sdpa" and H != KV:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            rep = H // KV  # GQA by repeating k/v: every SDPA kernel takes it with a mask
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(o.transpose(1, 2).reshape(B, T, -1))


class Mlp(nn.Module):
    def __init__(self, hidden, width):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# The router's gradient with top-1 routing (Moe.route): "st" straight-through from the sigmoid score (the forward value
# unchanged), "none" the renormalised weight's own (≈ 0: the router then learns only from the balancing bias, not the
# loss). Training flag (train_moe.py --router-grad); no effect on values, exports or top-k > 1.
ROUTER_GRAD = "st"


class Gate(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c.experts, c.hidden))
        # selection-only bias (aux-loss-free balancing updates it outside the optimiser)
        self.register_buffer("expert_bias", torch.zeros(c.experts))


class Moe(nn.Module):
    """shared expert + E routed experts stored stacked: gate_up [E, 2W, H], down [E, H, W]."""

    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.gate = Gate(c)
        self.shared_experts = Mlp(c.hidden, c.shared_ffn)
        E, W, H = c.experts, c.expert_ffn, c.hidden
        self.gate_up = nn.Parameter(torch.zeros(E, 2 * W, H))
        self.down = nn.Parameter(torch.zeros(E, H, W))

    def route(self, x, allowed=None):
        """-> (scores [.., E] fp32 sigmoid, dense routing weights [.., E] zero off the top-k)."""
        logits = F.linear(x.float(), self.gate.weight.float())
        scores = torch.sigmoid(logits)
        choice = scores.detach() + self.gate.expert_bias
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        ids = choice.topk(self.c.top_k, -1).indices
        s = scores.gather(-1, ids)
        w = s / (s.sum(-1, keepdim=True) + 1e-20) * self.c.scale
        if self.c.top_k == 1 and ROUTER_GRAD == "st" and s.requires_grad:
            # Top-1 renormalised is s / (s + 1e-20) * scale = scale whatever s is: its gradient wrt s is ~1e-20/s,
            # so the LM loss never reaches the router. Straight-through: the value stays the renormalised weight
            # bit for bit (s - s.detach() is exactly +0), the gradient wrt s is exactly scale, that of the
            # unnormalised weight s * scale.
            w = w.detach() + (s - s.detach()) * self.c.scale
        dense_w = torch.zeros_like(scores).scatter(-1, ids, w.to(scores.dtype))
        return scores, dense_w, ids

    def forward(self, x, allowed=None):
        c = self.c
        E, W, H = c.experts, c.expert_ffn, c.hidden
        scores, w, ids = self.route(x, allowed)
        gu = F.linear(x, self.gate_up.reshape(E * 2 * W, H)).unflatten(-1, (E, 2, W))
        a = F.silu(gu[..., 0, :]) * gu[..., 1, :] * w.to(x.dtype)[..., None]  # [.., E, W]
        routed = F.linear(a.flatten(-2), self.down.permute(1, 0, 2).reshape(H, E * W))
        return self.shared_experts(x) + routed, scores, ids


class Layer(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.attention = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.mlp = Moe(c) if c.experts else Mlp(c.hidden, c.ffn)


class Model(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.word_embeddings = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)

    def forward(self, ids, pos, mask, route_hook=None, return_hidden=False):
        """ids [B, T]; pos [T] or [B, T]; mask bool (True = attend) [B|1, 1, T, T]. route_hook(layer, moe, x) -> allowed
        [B, T, E] bool or None (EMO's document subsets). Returns (logits or hidden, [(scores, ids)] per layer)."""
        h = self.word_embeddings(ids)
        routes = []
        cs = rope_cos_sin(pos, self.c.head_dim, self.c.rope_theta, h.device)  # once for every layer
        for i, l in enumerate(self.layers):
            h = h + l.attention(l.input_layernorm(h), pos, mask, cs)
            x = l.post_attention_layernorm(h)
            if self.c.experts:
                allowed = route_hook(i, l.mlp, x) if route_hook else None
                y, scores, ids_ = l.mlp(x, allowed)
                routes.append((scores, ids_))
            else:
                y = l.mlp(x)
            h = h + y
        h = self.norm(h)
        return (h if return_hidden else self.logits(h)), routes

    def logits(self, h):
        return F.linear(h, self.word_embeddings.weight)


def additive(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def causal(T, device):
    """[1, 1, T, T] bool, True = may attend (SDPA's boolean mask)."""
    i = torch.arange(T, device=device)
    return (i[None, :] <= i[:, None])[None, None]


# ---------------------------------------------------------------------------------------------------------
# The GGUF base


def read_gguf(path: Path) -> tuple[Cfg, dict[str, torch.Tensor]]:
    """SmolLM2's GGUF (llama) dequantised to fp32, in this file's dense layout. llama.cpp stores q/k rows
    permuted for its interleaved RoPE; they are permuted back to Hugging Face's rotate_half order."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def kv(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else None

    c = Cfg(hidden=kv("llama.embedding_length"), layers=kv("llama.block_count"),
            heads=kv("llama.attention.head_count"), kv_heads=kv("llama.attention.head_count_kv"),
            ffn=kv("llama.feed_forward_length"), rope_theta=float(kv("llama.rope.freq_base")),
            eps=float(kv("llama.attention.layer_norm_rms_epsilon")))
    c.head_dim = c.hidden // c.heads
    raw = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        raw[t.name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(
            [int(x) for x in reversed(t.shape.tolist())]))
    c.vocab = raw["token_embd.weight"].shape[0]

    def unpermute(w, n):
        return w.reshape(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = {"word_embeddings.weight": raw["token_embd.weight"], "norm.weight": raw["output_norm.weight"]}
    for i in range(c.layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        q = unpermute(raw[b + "attn_q.weight"], c.heads)
        k = unpermute(raw[b + "attn_k.weight"], c.kv_heads)
        sd[p + "attention.query_key_value.weight"] = torch.cat([q, k, raw[b + "attn_v.weight"]], 0)
        sd[p + "attention.dense.weight"] = raw[b + "attn_output.weight"]
        sd[p + "input_layernorm.weight"] = raw[b + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = raw[b + "ffn_norm.weight"]
        for n, g in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            sd[p + f"mlp.{n}.weight"] = raw[b + g + ".weight"]
    return c, sd


def read_dense(path: Path, layers: int | None = None) -> tuple[Cfg, dict[str, torch.Tensor]]:
    """read_gguf, cut to the first `layers` layers when given (tiny local runs)."""
    c, sd = read_gguf(path)
    if layers:
        c.layers = layers
        sd = {k: v for k, v in sd.items() if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    return c, sd


def dense_model(path: Path, device="cpu", layers: int | None = None) -> Model:
    c, sd = read_dense(path, layers)
    m = Model(c)
    m.load_state_dict(sd)
    return m.to(device)


# ---------------------------------------------------------------------------------------------------------
# Upcycling: a plan (neuron order + router init per layer, made by prepare.py) applied to the dense weights


def upcycle(dense_sd: dict, c: Cfg, plan: dict, moe: Cfg) -> dict:
    """plan["perm.{l}"]: [ffn] neuron order (shared first, then expert 0's neurons, ...), plan["router.{l}"]:
    [E, H]. Returns the student's state dict; the layer keeps exactly the dense FFN's neurons."""
    sd = {k: v for k, v in dense_sd.items() if ".mlp." not in k}
    S, E, W = moe.shared_ffn, moe.experts, moe.expert_ffn
    assert S + E * W == c.ffn, (S, E, W, c.ffn)
    for i in range(c.layers):
        p = f"layers.{i}.mlp."
        perm = plan[f"perm.{i}"].long()
        g, u, d = (dense_sd[p + n + ".weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        g, u, d = g[perm], u[perm], d[:, perm]
        sd[p + "shared_experts.gate_proj.weight"] = g[:S].clone()
        sd[p + "shared_experts.up_proj.weight"] = u[:S].clone()
        sd[p + "shared_experts.down_proj.weight"] = d[:, :S].clone()
        gr, ur = g[S:].reshape(E, W, -1), u[S:].reshape(E, W, -1)
        sd[p + "gate_up"] = torch.cat([gr, ur], 1).contiguous()
        sd[p + "down"] = d[:, S:].reshape(-1, E, W).permute(1, 0, 2).contiguous()
        sd[p + "gate.weight"] = plan[f"router.{i}"].float().clone()
        sd[p + "gate.expert_bias"] = plan.get(f"bias.{i}", torch.zeros(E)).float().clone()
    return sd


# ---------------------------------------------------------------------------------------------------------
# Export: a Hugging Face checkpoint dir edgediff converts as bailing_moe_v2


def export_hf(model: Model, out: Path, tokenizer_dir: Path, extra: dict | None = None):
    from safetensors.torch import save_file

    c = model.c
    out.mkdir(parents=True, exist_ok=True)
    t = {"model.word_embeddings.weight": model.word_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, l in enumerate(model.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = l.input_layernorm.weight
        t[p + "post_attention_layernorm.weight"] = l.post_attention_layernorm.weight
        t[p + "attention.query_key_value.weight"] = l.attention.query_key_value.weight
        t[p + "attention.dense.weight"] = l.attention.dense.weight
        m = l.mlp
        t[p + "mlp.gate.weight"] = m.gate.weight
        t[p + "mlp.gate.expert_bias"] = m.gate.expert_bias
        for n in ("gate_proj", "up_proj", "down_proj"):
            t[p + f"mlp.shared_experts.{n}.weight"] = getattr(m.shared_experts, n).weight
        W = c.expert_ffn
        for e in range(c.experts):
            q = p + f"mlp.experts.{e}."
            t[q + "gate_proj.weight"] = m.gate_up[e, :W]
            t[q + "up_proj.weight"] = m.gate_up[e, W:]
            t[q + "down_proj.weight"] = m.down[e]
    t = {k: v.detach().float().cpu().contiguous() for k, v in t.items()}
    save_file(t, str(out / "model.safetensors"))
    cfg = {
        "architectures": ["BailingMoeV2ForCausalLM"], "model_type": "bailing_moe_v2",
        "vocab_size": c.vocab, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
        "rope_theta": c.rope_theta, "partial_rotary_factor": 1.0, "rms_norm_eps": c.eps,
        "max_position_embeddings": 8192, "use_qk_norm": False, "use_qkv_bias": False, "use_bias": False,
        "num_experts": c.experts, "num_experts_per_tok": c.top_k, "moe_intermediate_size": c.expert_ffn,
        "num_shared_experts": 1, "moe_shared_expert_intermediate_size": c.shared_ffn,
        "score_function": "sigmoid", "n_group": 1, "topk_group": 1, "routed_scaling_factor": c.scale,
        "norm_topk_prob": True, "first_k_dense_replace": 0, "tie_word_embeddings": True,
        "bos_token_id": IM_START, "eos_token_id": IM_END, "pad_token_id": EOT, "mask_token_id": MASK,
        "block_size": 16, "denoising_steps": 16, "threshold": 0.9, "prediction": "hybrid",
    }
    cfg.update(extra or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    # transformers 5 saves the GGUF's chat template beside tokenizer_config.json (chat_template.jinja) and names
    # <|im_start|> as eos; edgediff reads the template from tokenizer_config.json, and chat turns end at <|im_end|>.
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tpl = out / "chat_template.jinja"
    if tpl.exists() and "chat_template" not in tc:
        tc["chat_template"] = tpl.read_text()
    tc.update({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "mask_token": "<reponame>"})
    tc.pop("bos_token_id", None), tc.pop("eos_token_id", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
