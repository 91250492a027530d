#!/usr/bin/env bash
# Runs reference_logits.py on every committed fixture checkpoint, writing OUT_DIR/<family>.json.
# The token list and masks live here so the device call and a local re-run use the same ones.
# Usage: tests/reference/references.sh OUT_DIR [--device cpu]
# FAMILIES picks the checkpoints (subdirectories of FIXTURES, default tests/fixtures); each writes
# OUT_DIR/<name>.json. PYTHON: the interpreter (python3).
set -euo pipefail
out=${1:?usage: references.sh OUT_DIR [extra args for reference_logits.py]}
shift
here=$(cd "$(dirname "$0")" && pwd)
fixtures=${FIXTURES:-$here/../fixtures}
# 18 tokens: bos, text-ish ids, a run of mask tokens (id 3) and a lone one, eos. 18 is not a multiple
# of 4 or 8, so the last block of block:4 and block:8 is partial.
tokens=1,87,301,45,212,9,460,130,3,3,3,3,3,3,77,500,3,2
masks=causal,bidirectional,block:4,block:8
mkdir -p "$out"
for family in ${FAMILIES:-qwen3_moe olmoe llada2_moe zaya}; do
    "${PYTHON:-python3}" "$here/reference_logits.py" "$fixtures/$family" --tokens "$tokens" --masks "$masks" \
        --out "$out/$family.json" "$@"
done
