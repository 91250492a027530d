#!/usr/bin/env python3
"""Steps 2-3 of the SmolLM2 pipeline (issue 19): train the upcycled MoE (model.py) from the plan prepare.py made,
export it for `edgediff convert`, and check it against edgediff's CPU backend.

Objective per step (rows are windows of L tokens laid out [noisy | clean] as in training/train.py, block 16):
  diffusion  masked-diffusion ELBO on the noisy half (masked rows predict their own token; mask id 4)
  AR         next-token CE on the clean half's causal rows
  KD         KL(teacher || student) of the next-token distributions on the same causal rows; the teacher is the
             dense dequantised SmolLM2 (bf16, frozen), which keeps the student near the base
  EMO        in --emo-frac of the rows, every token of a document routes within one document-level subset of N
             experts per layer: the top-N by the document-mean router probability over its clean tokens, N drawn
             per document from --emo-sizes; the top-k is then taken inside the subset (both halves)
  balance    no loss term: the selection-only expert bias moves by --bias-rate towards equal load after each step
             (DeepSeek-V3's auxiliary-loss-free balancing), so it never fights the objective
  router     with top-1 the renormalised routing weight is the constant scale, so the loss gives the router no
             gradient; --router-grad st (default) passes it straight through from the sigmoid score (model.py
             ROUTER_GRAD: forward values unchanged)
  total = diffusion + ar_weight * AR + kd_weight * KD
Rows: random windows of the bundle's domain streams, uniformly by domain; with --selfchat DIR, --selfchat-frac of them
(0.25) from the conversations selfchat.py sampled from the base itself (self-distillation chat, against the collapse
of the base's chat after run 3), evaluated as a sixth held-out domain `selfchat`.

Subcommands:
  train    --bundle DIR (unpacked carry: base.gguf, plan.*, bin/, tokenizer/) --out STATE --deadline S
           [--resume STATE] [--selfchat DIR [--selfchat-frac F]] [--router-grad st|none]; a state is
           student.q8delta.pt (the delta from the upcycled start, int8: save_student) + state.json
  export   --bundle DIR --state STATE --out HF_DIR   (HF checkpoint in the bailing_moe_v2 layout)
  parity   --edm FILE (--hf HF_DIR | --gguf FILE) [--edgediff BIN]: logits vs `edgediff forward` (causal and
           block:16 with masks), relative L2 must be <= 1e-4; exit status 1 otherwise
  upcycled --bundle DIR --out HF_DIR: the upcycled student before training (for parity)
  tiny     a random tiny MoE exported to --out (for a parity check of the layout alone)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import model as M  # noqa: E402
from train import add_noise, allowed_2l  # noqa: E402  (the default model's masks and noise, unchanged)

# The same domains as prepare.py (whose bundle holds their streams), instruction-style text included.
DOMAINS = ["prose", "rust", "python", "c", "instruct"]
# Conversations sampled from the base (selfchat.py), outside the bundle: --selfchat DIR, --selfchat-frac.
SELFCHAT = "selfchat"
BLOCK = 16
# What state.json keeps of each training run (its `runs` list).
RUN_KEYS = ("steps", "train_seconds", "tokens", "seed", "args", "valid_before", "valid_after", "history")


def log(*a):
    print(*a, flush=True)


def moe_cfg(base: M.Cfg, plan_json: dict) -> M.Cfg:
    r = plan_json["moe"]
    return M.Cfg(**{**base.to_json(), "experts": r["experts"], "shared_ffn": r["shared"],
                    "expert_ffn": r["expert_ffn"], "top_k": r["top_k"], "scale": float(r["top_k"])})


def upcycled(bundle: Path, layers: int | None = None):
    """The student's deterministic starting point, rebuilt from the bundle (dense base + plan): (moe cfg, its
    state dict, dense cfg, dense state dict)."""
    from safetensors.torch import load_file

    c, dense_sd = M.read_dense(bundle / "base.gguf", layers)  # layers: tiny local runs cut the first N
    mc = moe_cfg(c, json.loads((bundle / "plan.json").read_text()))
    return mc, M.upcycle(dense_sd, c, load_file(str(bundle / "plan.safetensors")), mc), c, dense_sd


def load_student_and_teacher(bundle: Path, device, layers: int | None = None):
    mc, sd, c, dense_sd = upcycled(bundle, layers)
    student = M.Model(mc)
    student.load_state_dict(sd)
    teacher = M.Model(c)
    teacher.load_state_dict(dense_sd)
    return student.to(device), teacher.to(device), mc


def doc_ids(x: torch.Tensor) -> torch.Tensor:
    """[B, L] -> document index of each token within its row (a document ends with its <|endoftext|>)."""
    ends = (x == M.EOT).long()
    return torch.cumsum(ends, 1) - ends


class Emo:
    """Builds the route hook restricting each document's tokens to its top-N experts (per layer)."""

    def __init__(self, docs_clean: torch.Tensor, rows: torch.Tensor, sizes: list[int], gen: torch.Generator):
        self.docs = docs_clean  # [B, L]
        self.rows = rows  # [B] bool: EMO applies to this row
        D = int(docs_clean.max()) + 1
        self.onehot = F.one_hot(docs_clean, D).float()  # [B, L, D]
        self.count = self.onehot.sum(1).clamp_min(1)  # [B, D]
        choice = torch.tensor(sizes)[torch.randint(len(sizes), (docs_clean.shape[0], D), generator=gen)]
        self.n = choice.to(docs_clean.device)  # [B, D]

    @torch.no_grad()
    def __call__(self, layer, moe, x):
        B, T, _ = x.shape
        L = self.docs.shape[1]
        scores = torch.sigmoid(F.linear(x[:, T - L:].float(), moe.gate.weight.float()))  # clean half [B, L, E]
        mean = torch.einsum("bld,ble->bde", self.onehot, scores) / self.count[..., None]
        rank = mean.argsort(-1, descending=True).argsort(-1)
        allowed_doc = rank < self.n[..., None]  # [B, D, E]
        allowed_doc |= ~self.rows[:, None, None]
        a = torch.gather(allowed_doc, 1, self.docs[..., None].expand(-1, -1, allowed_doc.shape[-1]))
        return a.repeat(1, T // L, 1)


def expert_load(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 [E]): torch.bincount's counts, without the two host syncs per call
    (max and min .item()) bincount makes on CUDA."""
    flat = ids.reshape(-1)
    return torch.zeros(experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def add_noise_drafting(x, gen, full_frac):
    """train.py's add_noise, then each block, with probability `full_frac`, masked whole (t = 1): the state a
    self-speculative draft is made from (a block of masks after a clean prefix, decode/speculative.rs), which
    t ~ U(0, 1) alone almost never draws. full_frac 0 draws exactly what add_noise draws."""
    xt, masked, t = add_noise(x, BLOCK, gen)
    if full_frac <= 0:
        return xt, masked, t
    B, L = x.shape
    full = (torch.rand(B, L // BLOCK, generator=gen) < full_frac).repeat_interleave(BLOCK, dim=1).to(x.device)
    masked = masked | full
    t = torch.where(full, torch.ones_like(t), t)
    xt = torch.where(masked, torch.full_like(x, 3), x)  # train.py's mask id, as add_noise writes it
    return xt, masked, t


def losses(student, teacher, x, causal_rows, masks, gen, emo_hook, a, full_frac=0.0):
    B, L = x.shape
    xt, masked, t = add_noise_drafting(x, gen, full_frac)
    xt = torch.where(xt == 3, torch.full_like(xt, M.MASK), xt)  # train.py's mask id is 3; ours is 4
    inp = torch.cat([xt, x], 1)
    pos = torch.arange(L, device=x.device).repeat(2)
    mask = torch.where(causal_rows[:, None, None, None], masks[0], masks[1])
    with record_function("student_forward"):
        h, routes = student(inp, pos, mask, route_hook=emo_hook, return_hidden=True)
    r = {}
    # log_softmax(., dtype=float32) then nll_loss is what cross_entropy(logits.float()) computes (its definition),
    # without a separate fp32 copy of the [tokens, vocab] logits (CUDA fuses the cast into the kernel; CPU casts
    # first, as before). Same for the AR rows below, whose log-probabilities the KD term now shares instead of
    # taking a second log_softmax of the same logits.
    ce = F.nll_loss(F.log_softmax(student.logits(h[:, :L][masked]), -1, dtype=torch.float32), x[masked],
                    reduction="none")
    r["diff"] = (ce / t[masked].clamp_min(1.0 / BLOCK)).sum() / (B * L)
    r["diff_ce"] = ce.mean().detach()
    if causal_rows.any():
        hc = h[:, L:2 * L - 1][causal_rows]
        sp = F.log_softmax(student.logits(hc), -1, dtype=torch.float32)
        tgt = x[causal_rows][:, 1:]
        r["ar"] = F.nll_loss(sp.reshape(-1, sp.shape[-1]), tgt.reshape(-1))
        if a.kd_weight > 0:
            with torch.no_grad(), record_function("teacher_forward"):
                xc = x[causal_rows]
                tl, _ = teacher(xc, torch.arange(L, device=x.device), M.causal(L, x.device))
                tp = F.log_softmax(tl[:, :-1], -1, dtype=torch.float32)
            r["kd"] = (tp.exp() * (tp - sp)).sum(-1).mean()
        else:
            r["kd"] = h.sum() * 0
    else:
        r["ar"] = r["kd"] = h.sum() * 0
    return r, routes


def cmd_train(a):
    t_start = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    student, teacher, mc = load_student_and_teacher(a.bundle, dev, a.layers)
    init = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}  # what the delta is from
    # The runs this state already went through (a state saved before runs were kept: one).
    prev = resume_into(student, a.resume, mc, a.bundle, init) if a.resume else None
    earlier = (prev.get("runs") or [{k: prev[k] for k in RUN_KEYS if k in prev}]) if prev else []
    teacher = teacher.to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval().requires_grad_(False)
    M.ROUTER_GRAD = a.router_grad
    if mc.top_k == 1:
        log(f"router gradient (top-1): {a.router_grad}" + (" (straight-through from the sigmoid score)"
                                                           if a.router_grad == "st" else " (renormalised weight: ~0)"))
    if a.sdpa_gqa:
        if M.sdpa_has_gqa():
            M.GQA = "sdpa"
        else:
            log(f"--sdpa-gqa: torch {torch.__version__} has no enable_gqa (2.5+): k/v repeated as before")
    if a.compile:  # in place (nn.Module.compile): the state dict's names stay as they are
        for l in student.layers:
            for m in (l.input_layernorm, l.attention, l.post_attention_layernorm, l.mlp):
                m.compile()
        student.norm.compile()
    log(f"device {dev}, student {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params, {mc}, "
        f"load {time.time() - t_start:.0f} s")
    streams = {d: np.fromfile(a.bundle / "bin" / f"{d}.train.u16", dtype=np.uint16) for d in DOMAINS}
    valid = {d: np.fromfile(a.bundle / "bin" / f"{d}.valid.u16", dtype=np.uint16) for d in DOMAINS}
    L = a.seq
    # Self-distillation chat (selfchat.py: conversations sampled from the base) drawn in --selfchat-frac of the rows
    sc = a.selfchat / "selfchat.train.u16" if a.selfchat else None
    if sc is not None and not sc.exists():
        raise SystemExit(f"--selfchat {a.selfchat}: no selfchat.train.u16 there")
    if a.selfchat_frac is None:
        a.selfchat_frac = 0.25 if sc is not None else 0.0
    if sc is not None:  # evaluated whenever given, trained on when its fraction is > 0
        valid[SELFCHAT] = np.fromfile(a.selfchat / "selfchat.valid.u16", dtype=np.uint16)
    if a.selfchat_frac > 0:
        if sc is None:
            raise SystemExit("--selfchat-frac > 0 needs --selfchat DIR")
        streams[SELFCHAT] = np.fromfile(sc, dtype=np.uint16)
        if len(streams[SELFCHAT]) <= L:
            raise SystemExit(f"{sc}: {len(streams[SELFCHAT])} tokens, fewer than a row ({L})")
        log(f"selfchat: {len(streams[SELFCHAT])} train tokens ({int((streams[SELFCHAT] == M.EOT).sum())} "
            f"conversations), {len(valid[SELFCHAT])} valid; {a.selfchat_frac:.0%} of the rows")
    eval_domains = DOMAINS + ([SELFCHAT] if SELFCHAT in valid else [])
    masks = (allowed_2l(L, BLOCK, True, dev)[None, None], allowed_2l(L, BLOCK, False, dev)[None, None])
    router = [p for n, p in student.named_parameters() if "gate.weight" in n]
    rest = [p for n, p in student.named_parameters() if "gate.weight" not in n]
    opt = torch.optim.AdamW([{"params": rest, "lr": a.lr}, {"params": router, "lr": a.router_lr}],
                            betas=(0.9, 0.95), weight_decay=0.0, fused=dev.type == "cuda")
    base_lrs = [g["lr"] for g in opt.param_groups]
    # A resumed run draws other batches than the runs before it (same recipe, next seed).
    seed = a.seed + len(earlier)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if a.emo_sizes == "auto":
        sizes = sorted({max(mc.top_k + 1, mc.experts // 8), max(mc.top_k + 1, mc.experts // 4)})
    else:
        sizes = [int(s) for s in a.emo_sizes.split(",")]
    log(f"EMO subset sizes {sizes} in {a.emo_frac:.0%} of the rows")

    # bf16 autocast on cuda; EDGEDIFF_TRAIN_AUTOCAST=1 turns it on for a CPU run too, so a local tiny run
    # takes the GPU's mixed-precision code paths (dtype mismatches show here, not on the GPU machine).
    mixed = dev.type == "cuda" or os.environ.get("EDGEDIFF_TRAIN_AUTOCAST") == "1"

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=mixed)

    def batch(src, n):
        rows = []
        for _ in range(n):
            # (without selfchat the same draws as before it existed)
            if a.selfchat_frac > 0 and rng.random() < a.selfchat_frac:
                s = src[SELFCHAT]
            else:
                s = src[DOMAINS[rng.integers(len(DOMAINS))]]
            o = int(rng.integers(0, len(s) - L))
            rows.append(s[o:o + L].astype(np.int64))
        return torch.from_numpy(np.stack(rows)).to(dev)

    @torch.no_grad()
    def evaluate(n=8):
        student.eval()
        ev = {}
        g = torch.Generator().manual_seed(99)
        for d in eval_domains:
            nr = min(n, len(valid[d]) // L)  # (a small selfchat valid split may hold fewer than n rows)
            if nr == 0:
                log(f"evaluate: {d}'s valid split ({len(valid[d])} tokens) is shorter than a row: skipped")
                continue
            x = torch.from_numpy(valid[d][: nr * L].astype(np.int64).reshape(nr, L)).to(dev)
            with autocast():
                rows = torch.ones(nr, dtype=torch.bool, device=dev)
                r, _ = losses(student, teacher, x, rows, masks, g, None, a)
                # Every block masked whole: how well the model drafts (the diffusion CE of its drafts).
                rd, _ = losses(student, teacher, x, rows, masks, torch.Generator().manual_seed(98), None, a, 1.0)
            ev[d] = {k: round(float(v), 4) for k, v in r.items()}
            ev[d]["draft"] = round(float(rd["diff_ce"]), 4)
        student.train()
        return ev

    prof_n, prof, warm = a.profile_steps, None, a.profile_warmup
    if prof_n:
        log(f"profile: {warm} warm-up steps, then torch.profiler over {prof_n} steps; training stops after them "
            f"(no evaluation, no state saved)")
        if dev.type == "cuda":
            sdpa_report(student.c, a.batch, 2 * L, dev)
    else:
        ev0 = evaluate()
        log("valid before", json.dumps(ev0))
    train_s = a.deadline - (time.time() - t_start) - a.reserve
    t0 = time.time()
    step, tokens, hist = 0, 0, []
    student.train()
    while (step < warm + prof_n if prof_n else
           time.time() - t0 < train_s and (a.steps == 0 or step < a.steps)):
        if prof_n and step == warm and prof is None:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                            if dev.type == "cuda" else [])
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
            tp0, tok0 = time.time(), tokens
        prog = min(1.0, (time.time() - t0) / max(1.0, train_s))
        f = min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        x = batch(streams, a.batch)
        causal_rows = torch.from_numpy(rng.random(a.batch) < a.causal_frac).to(dev)
        emo_rows = torch.from_numpy(rng.random(a.batch) < a.emo_frac).to(dev)
        hook = Emo(doc_ids(x), emo_rows, sizes, gen) if a.emo_frac > 0 else None
        opt.zero_grad(set_to_none=True)
        try:
            with autocast():
                r, routes = losses(student, teacher, x, causal_rows, masks, gen, hook, a, a.full_mask_frac)
                loss = r["diff"] + a.ar_weight * r["ar"] + a.kd_weight * r["kd"]
            with record_function("backward"):
                loss.backward()
        except torch.OutOfMemoryError:
            if a.batch == 1:
                raise
            r = routes = loss = None
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            a.batch //= 2
            log(f"out of memory: batch {a.batch} from now on")
            continue
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
        with torch.no_grad(), record_function("balance"):  # auxiliary-loss-free balancing of the selection bias
            for l, (_, ids) in zip(student.layers, routes):
                load = expert_load(ids, mc.experts).float()
                l.mlp.gate.expert_bias += a.bias_rate * torch.sign(load.mean() - load)
        step += 1
        tokens += x.numel()
        if step % a.log_every == 0:
            el = time.time() - t0
            loads = torch.stack([expert_load(ids, mc.experts) for _, ids in routes]).float()
            rec = {"step": step, "s": round(el, 1), "lr": round(opt.param_groups[0]["lr"], 7),
                   "loss": round(float(loss), 4), **{k: round(float(v), 4) for k, v in r.items()},
                   "tok_per_s": round(tokens / el), "max_load_over_mean": round(float((loads.max(1).values /
                                                                                        loads.mean(1)).mean()), 2)}
            if dev.type == "cuda":
                rec["mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
            hist.append(rec)
            log(json.dumps(rec))
    if prof is not None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        el = time.time() - tp0
        prof.__exit__(None, None, None)
        cuda = dev.type == "cuda"
        log(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30))
        if cuda:
            peak = f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB allocated (CUDA)"
        else:
            import resource
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB RSS (CPU)"
        log(f"profile: {prof_n} steps in {el:.2f} s (under the profiler) = {1000 * el / prof_n:.0f} ms/step, "
            f"{(tokens - tok0) / el:.0f} window tokens/s, batch {a.batch} x {L}, peak memory {peak}; torch "
            f"{torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'}, gqa {M.GQA}, "
            f"compile {a.compile}; stopped after profiling, no state saved")
        return
    ev1 = evaluate()
    log("valid after", json.dumps(ev1))
    a.out.mkdir(parents=True, exist_ok=True)
    save_student(student.state_dict(), init, a.bundle, a.out)
    run = {"steps": step, "train_seconds": round(time.time() - t0, 1), "tokens": tokens, "seed": seed,
           "args": {k: str(v) for k, v in vars(a).items()}, "valid_before": ev0, "valid_after": ev1,
           "history": hist}
    runs = earlier + [run]
    # Totals over every run of this state (a resumed state carries its earlier runs).
    meta = {"cfg": mc.to_json(), "steps": sum(r["steps"] for r in runs),
            "train_seconds": round(sum(r["train_seconds"] for r in runs), 1),
            "tokens": sum(r["tokens"] for r in runs), "args": run["args"],
            "valid_before": runs[0]["valid_before"], "valid_after": ev1, "history": hist, "runs": runs}
    (a.out / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"saved {a.out} after {step} steps, {tokens / 1e6:.1f}M window tokens, {time.time() - t_start:.0f} s in all"
        f" ({meta['steps']} steps over {len(runs)} run(s))")


def sdpa_report(c: M.Cfg, B: int, T: int, dev):
    """Which fused SDPA kernels take the student's attention call (bf16, bool mask), with k/v repeated and with
    enable_gqa; torch says why not (warnings) where one does not."""
    import warnings

    q = torch.zeros(B, c.heads, T, c.head_dim, device=dev, dtype=torch.bfloat16)
    kv = torch.zeros(B, c.kv_heads, T, c.head_dim, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(B, 1, T, T, device=dev, dtype=torch.bool)
    for name, k, gqa in (("repeat", q, False), ("sdpa", kv, True)):
        try:
            params = torch.backends.cuda.SDPAParams(q, k, k, mask, 0.0, False, gqa)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                can = {n: bool(getattr(torch.backends.cuda, f"can_use_{n}_attention")(params, True))
                       for n in ("flash", "efficient", "cudnn") if hasattr(torch.backends.cuda, f"can_use_{n}_attention")}
            log(f"sdpa gqa={name}: fused kernels usable {can}; " + " | ".join(str(x.message)[:160] for x in w))
        except Exception as e:  # older torch: another SDPAParams signature
            log(f"sdpa gqa={name}: no report ({type(e).__name__}: {e})")


# The saved student (a state is it + state.json). Its starting point is rebuilt from the bundle, which every
# session stages anyway, so only the training's delta from it is kept: per row of each matrix int8 (round to
# nearest) times an fp32 scale absmax/127 (fp16 would flush the small rows' scales to subnormals). That is half
# of bf16's bytes (≈ 137 MB for the full model, against 270 MB: 3 state-out calls and 5 state-in calls, not 6
# and 9) and closer to the trained weights than bf16 is, as a delta is ~100x smaller than the weight it moves.
# 1-D tensors (norms, expert_bias) and small ones (the routers) are kept exactly, whole, in fp32.
STUDENT = "student.q8delta.pt"
STUDENT_BF16 = "student.pt"  # the form states were saved in before: whole weights in bf16, still read
EXACT_BELOW = 1 << 16  # elements: smaller tensors are not worth quantising


def bundle_id(bundle: Path) -> dict:
    """The files the starting point comes from: a delta only means something on top of the same ones."""
    return {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in ("base.gguf", "plan.safetensors")}


def save_student(sd: dict, init: dict, bundle: Path, out: Path):
    q, scale, exact = {}, {}, {}
    for k, v in sd.items():
        v = v.detach().to("cpu", torch.float32)
        if v.ndim < 2 or v.numel() < EXACT_BELOW:
            exact[k] = v.clone()
            continue
        d = (v - init[k].float()).flatten(0, -2)  # rows: every index but the last (a Linear's output rows)
        s = d.abs().amax(1, keepdim=True) / 127
        q[k] = torch.round(d / torch.where(s > 0, s, 1)).clamp(-127, 127).to(torch.int8)
        scale[k] = s
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "q8delta", "bundle": bundle_id(bundle), "q": q, "scale": scale, "exact": exact},
               out / STUDENT)
    (out / STUDENT_BF16).unlink(missing_ok=True)  # an older form in the same dir would only mislead


def read_student(state: Path, bundle: Path, init: dict | None = None) -> dict:
    """The saved student's weights (fp32) from either form; the compact one adds its delta to init (rebuilt from
    the bundle when not given)."""
    if not (state / STUDENT).exists():
        return {k: v.float() for k, v in torch.load(state / STUDENT_BF16, map_location="cpu").items()}
    z = torch.load(state / STUDENT, map_location="cpu")
    if z["bundle"] != bundle_id(bundle):
        raise SystemExit(f"{state / STUDENT}: saved on top of another bundle ({z['bundle']}) than {bundle}")
    if init is None:
        init = upcycled(bundle, json.loads((state / "state.json").read_text())["cfg"]["layers"])[1]
    sd = dict(z["exact"])
    for k, qk in z["q"].items():
        sd[k] = init[k].float() + (qk.float() * z["scale"][k]).view(init[k].shape)
    return sd


def resume_into(student: M.Model, state: Path, mc: M.Cfg, bundle: Path, init: dict) -> dict:
    """Loads a saved state into the freshly upcycled student: training goes on from there. The optimizer starts
    afresh (its moments are not saved: 2x the weights, more than a device call returns), behind the usual
    warm-up."""
    meta = json.loads((state / "state.json").read_text())
    if meta["cfg"] != mc.to_json():
        raise SystemExit(f"--resume {state}: its model {meta['cfg']} is not this plan's {mc.to_json()}")
    missing, extra = student.load_state_dict(read_student(state, bundle, init), strict=False)
    if missing or extra:
        raise SystemExit(f"--resume {state}: missing {missing[:4]}, unexpected {extra[:4]}")
    log(f"resumed from {state}: {meta['steps']} steps, {meta['tokens'] / 1e6:.1f}M tokens before this run")
    return meta


def load_state(state: Path, bundle: Path) -> M.Model:
    meta = json.loads((state / "state.json").read_text())
    m = M.Model(M.Cfg(**meta["cfg"]))
    m.load_state_dict(read_student(state, bundle))
    return m.eval(), meta


def cmd_export(a):
    m, meta = load_state(a.state, a.bundle)
    M.export_hf(m, a.out, a.bundle / "tokenizer", {"edgediff_training": {
        "recipe": "training/smollm2 (SmolLM2-135M-Instruct upcycled; diffusion + AR + KD + EMO)",
        "steps": meta["steps"], "train_seconds": meta["train_seconds"]}})
    log(f"exported {a.out}")


def edgediff_logits(binary, edm, tokens, mask):
    out = subprocess.run([binary, "forward", "--model", str(edm), "--tokens", ",".join(map(str, tokens)),
                          "--mask", mask, "--json"], check=True, capture_output=True, text=True).stdout
    return torch.tensor(json.loads(out)["logits"])


def hf_model(d: Path) -> M.Model:
    """Reads an exported bailing_moe_v2 checkpoint back into model.py (the inverse of export_hf)."""
    from safetensors.torch import load_file

    c = json.loads((d / "config.json").read_text())
    cfg = M.Cfg(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"],
                rope_theta=c["rope_theta"], eps=c["rms_norm_eps"], experts=c["num_experts"],
                top_k=c["num_experts_per_tok"], expert_ffn=c["moe_intermediate_size"],
                shared_ffn=c["moe_shared_expert_intermediate_size"], scale=c["routed_scaling_factor"])
    t = {k.removeprefix("model."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    sd = {k: v for k, v in t.items() if ".mlp.experts." not in k}
    for i in range(cfg.layers):
        p = f"layers.{i}.mlp."
        sd[p + "gate_up"] = torch.stack([torch.cat([t[p + f"experts.{e}.gate_proj.weight"],
                                                    t[p + f"experts.{e}.up_proj.weight"]]) for e in range(cfg.experts)])
        sd[p + "down"] = torch.stack([t[p + f"experts.{e}.down_proj.weight"] for e in range(cfg.experts)])
    m = M.Model(cfg)
    m.load_state_dict(sd)
    return m.eval()


def cmd_parity(a):
    torch.set_num_threads(2)
    m = M.dense_model(a.gguf) if a.gguf else hf_model(a.hf)
    m.eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(a.tokenizer))
    ids = tok.encode(a.text, add_special_tokens=False).ids[:40]
    n = len(ids)
    cut = (n // 16) * 16 if n % 16 else n - 16
    noisy = ids[:cut] + [M.MASK if i % 2 == 0 else t for i, t in enumerate(ids[cut:])]
    worst = 0.0
    for name, toks, mask in (("causal", ids, "causal"), ("block:16", noisy, "block:16")):
        i = torch.arange(len(toks))
        allow = (i[None, :] <= i[:, None]) if mask == "causal" else ((i[None, :] // 16) <= (i[:, None] // 16))
        with torch.no_grad():
            ref, _ = m(torch.tensor([toks]), i, allow[None, None])
        ref = ref[0]
        got = edgediff_logits(a.edgediff, a.edm, toks, mask)
        rel = float((got - ref).norm() / ref.norm())
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        worst = max(worst, rel)
        log(f"{name:9s} {len(toks)} tokens: relative L2 {rel:.2e}, top-1 agreement {agree:.3f}")
    if worst > a.tol:
        log(f"parity FAILED: {worst:.2e} > {a.tol:.0e}")
        raise SystemExit(1)
    log("parity OK")


def cmd_upcycled(a):
    """The upcycled student before any training, exported (its parity with edgediff is the upcycling's check)."""
    student, _, mc = load_student_and_teacher(a.bundle, "cpu", a.layers)
    M.export_hf(student.eval(), a.out, a.bundle / "tokenizer")
    log(f"upcycled (untrained) {mc} -> {a.out}")


def cmd_tiny(a):
    """A random tiny MoE in the exported layout (vocab of the SmolLM2 tokenizer, 2 layers)."""
    torch.manual_seed(a.seed)
    c = M.Cfg(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, expert_ffn=32,
              shared_ffn=48, scale=2.0)
    m = M.Model(c)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 0.08)
        for l in m.layers:
            l.mlp.gate.expert_bias.normal_(0, 0.05)
    M.export_hf(m, a.out, a.tokenizer_dir)
    log(f"tiny random model -> {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--bundle", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--deadline", type=float, default=520.0, help="seconds from start to the saved state")
    t.add_argument("--reserve", type=float, default=45.0, help="seconds kept for the final eval and save")
    t.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the deadline only)")
    t.add_argument("--resume", type=Path, help="a saved state (--out of an earlier run) to go on training from")
    t.add_argument("--layers", type=int, help="first N layers only (tiny local runs)")
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--router-lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--ar-weight", type=float, default=1.0)
    t.add_argument("--kd-weight", type=float, default=1.0)
    t.add_argument("--causal-frac", type=float, default=0.75)
    t.add_argument("--full-mask-frac", type=float, default=0.0,
                   help="fraction of the noisy half's blocks masked whole (t = 1: the drafts of self-speculative "
                        "decoding); the rest t ~ U(0, 1). Training only: evaluation keeps U(0, 1) for `diff` and reports "
                        "every block masked whole as `draft`")
    t.add_argument("--emo-frac", type=float, default=0.8, help="rows routed within document subsets")
    t.add_argument("--emo-sizes", default="auto", help="subset sizes N drawn per document; auto: E/8, E/4 "
                   "(at least top-k + 1)")
    t.add_argument("--bias-rate", type=float, default=1e-3)
    t.add_argument("--selfchat", type=Path, help="dir with selfchat.{train,valid}.u16 (selfchat.py: chat sampled "
                   "from the base); its valid split is evaluated as domain `selfchat`")
    t.add_argument("--selfchat-frac", type=float, help="fraction of the rows drawn from the selfchat stream (the "
                   "rest from the bundle's domains as before); default 0.25 with --selfchat, 0 without")
    t.add_argument("--router-grad", choices=("st", "none"), default="st",
                   help="top-1 router gradient: st = straight-through (value unchanged, gradient of the score times "
                   "scale, so gate.weight learns from the loss); none = the renormalised weight's own (~0, runs 1-3)")
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--seed", type=int, default=7)
    t.add_argument("--profile-steps", type=int, default=0,
                   help="profile: after --profile-warmup steps run torch.profiler (CPU + CUDA) over N steps, log its "
                   "table (by CUDA time) and ms/step + peak memory, then stop: no evaluation, no state saved, "
                   "--deadline and --steps ignored (0: off)")
    t.add_argument("--profile-warmup", type=int, default=3, help="steps before the profiled ones")
    t.add_argument("--compile", action="store_true", help="torch.compile the student's norms, attention and MoE "
                   "(in place, state dict unchanged); checked on CPU only, untested on the GPU")
    t.add_argument("--sdpa-gqa", action="store_true", help="SDPA's enable_gqa (torch >= 2.5) instead of repeating "
                   "k/v; off by default: the fused kernels that take a mask may not take grouped heads (model.py GQA)")
    e = sub.add_parser("export")
    e.add_argument("--bundle", type=Path, required=True)
    e.add_argument("--state", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("parity")
    p.add_argument("--edm", type=Path, required=True)
    p.add_argument("--hf", type=Path)
    p.add_argument("--gguf", type=Path)
    p.add_argument("--tokenizer", type=Path, default=HERE.parent / "runs/smollm2/tokenizer/tokenizer.json")
    p.add_argument("--edgediff", default="target/release/edgediff")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--text", default="fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n"
                                     "The quick brown fox jumps over the lazy dog.")
    u = sub.add_parser("upcycled")
    u.add_argument("--bundle", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--layers", type=int)
    y = sub.add_parser("tiny")
    y.add_argument("--out", type=Path, required=True)
    y.add_argument("--tokenizer-dir", type=Path, default=HERE.parent / "runs/smollm2/tokenizer")
    y.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    {"train": cmd_train, "export": cmd_export, "parity": cmd_parity, "upcycled": cmd_upcycled,
     "tiny": cmd_tiny}[a.cmd](a)


if __name__ == "__main__":
    main()
