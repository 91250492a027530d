#!/usr/bin/env python3
"""Holds edgediff's logits against a reference.json of reference_logits.py, where no Rust is at
hand (the GPU machine): for each case (mask) it runs `edgediff forward --json` on a converted
model with the chosen backend and compares all logits of the case by relative L2, as
tests/tests/parity.rs does (sqrt(sum (ours - theirs)^2 / sum theirs^2), in float64), plus the
argmax per position.

Usage:
    compare_logits.py --bin .bin/edgediff --model m.edm --reference ref.json --backend gpu \
        [--bound 1e-4] [--out result.json]

Prints one line per case and exits 1 if any case exceeds the bound (default 1e-4, the house bound
for f32 backends; parity.rs measures ~5e-7 on the CPU). Needs only numpy.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--bound", type=float, default=1e-4)
    ap.add_argument("--out")
    a = ap.parse_args()

    ref = json.load(open(a.reference))
    # The checkpoint's name: the reference file's (references.sh writes OUT/<checkpoint>.json).
    name = os.path.basename(a.reference).removesuffix(".json")
    tokens = ",".join(str(t) for t in ref["tokens"])
    rows, worst = [], 0.0
    for case in ref["cases"]:
        cmd = [a.bin, "forward", "--model", a.model, "--tokens", tokens, "--mask", case["mask"],
               "--backend", a.backend, "--json"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
        ours = np.asarray(json.loads(run.stdout)["logits"], dtype=np.float64)
        theirs = np.asarray(case["logits"], dtype=np.float64)
        if ours.shape != theirs.shape:
            sys.exit(f"{case['mask']}: logits {ours.shape} vs reference {theirs.shape}")
        rel = float(np.sqrt(((ours - theirs) ** 2).sum() / (theirs ** 2).sum()))
        same = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        worst = max(worst, rel)
        rows.append({"mask": case["mask"], "rel_l2": rel, "argmax_equal": same,
                     "positions": len(theirs)})
        print(f"{name} {a.backend} {case['mask']:>14}: rel L2 {rel:.2e}, "
              f"argmax {same}/{len(theirs)}")
    ok = worst <= a.bound
    print(f"{name} ({ref['family']}) {a.backend}: worst rel L2 {worst:.2e} "
          f"({'within' if ok else 'OVER'} the bound {a.bound:.0e}), reference on "
          f"{ref.get('device')} with transformers {ref.get('transformers_version')}")
    if a.out:
        json.dump({"checkpoint": name, "family": ref["family"], "backend": a.backend, "model": a.model,
                   "reference": a.reference, "bound": a.bound, "worst_rel_l2": worst,
                   "cases": rows}, open(a.out, "w"), indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
