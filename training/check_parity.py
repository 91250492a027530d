#!/usr/bin/env python3
"""Compares an exported checkpoint run in transformers (fp32, eager) with `edgediff forward` on the converted
model file, for the two calls the runtime makes: AR (causal mask) and diffusion (block-causal mask, 16, with
<|mask|> tokens in the last block). Prints the relative L2 error of the logits and the top-1 agreement.

Usage: python3 training/check_parity.py --hf DIR --edm model.edm [--edgediff target/release/edgediff]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

MASK = 3


def edgediff_logits(binary, edm, tokens, mask):
    out = subprocess.run([binary, "forward", "--model", str(edm), "--tokens", ",".join(map(str, tokens)),
                          "--mask", mask, "--json"], check=True, capture_output=True, text=True).stdout
    return torch.tensor(json.loads(out)["logits"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", type=Path, required=True)
    ap.add_argument("--edm", type=Path, required=True)
    ap.add_argument("--edgediff", default="target/release/edgediff")
    ap.add_argument("--text", default="fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n"
                                      "The quick brown fox jumps over the lazy dog.")
    a = ap.parse_args()
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeForCausalLM

    tok = Tokenizer.from_file(str(a.hf / "tokenizer.json"))
    ids = tok.encode(a.text, add_special_tokens=False).ids[:40]
    model = Qwen3MoeForCausalLM.from_pretrained(str(a.hf), dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").eval()
    n = len(ids)
    cut = (n // 16) * 16 if n % 16 else n - 16  # last (partial) block gets masks
    noisy = ids[:cut] + [MASK if i % 2 == 0 else t for i, t in enumerate(ids[cut:])]
    for name, toks, mask in (("causal", ids, "causal"), ("block:16", noisy, "block:16")):
        i = torch.arange(len(toks))
        allow = (i[None, :] <= i[:, None]) if mask == "causal" else ((i[None, :] // 16) <= (i[:, None] // 16))
        m = torch.where(allow, 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([toks]), attention_mask=m).logits[0]
        got = edgediff_logits(a.edgediff, a.edm, toks, mask)
        rel = float((got - ref).norm() / ref.norm())
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"{name:9s} {len(toks)} tokens: relative L2 {rel:.2e}, top-1 agreement {agree:.3f}")


if __name__ == "__main__":
    main()
