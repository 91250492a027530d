#!/usr/bin/env bash
# Issue 18 (DiffusionGemma) step 2 on the GPU machine: transformers' logits on cuda for random
# diffusion_gemma checkpoints of odd shapes (no Rust there; PyTorch + transformers >= 5.17).
# For each shape below, tests/reference/diffusion_gemma_reference.py writes OUT/dg/<name>/
# (checkpoint, tokenizer, reference.json: the encoder pass, the canvas pass with and without
# self-conditioning over a cached prefix, a commit re-encoded and a second canvas; plus the same
# passes on the device's CPU as cpu_rel_l2; two generate() runs with their draws recorded, for the
# canvas sampler's replay). Shapes: every one has both layer types and K = V
# global layers of another head size; windows shorter and longer than the prefix; GQA groups of
# 1, 2, 3; top-k up to 5 of 16; vocabularies that are no power of two.
#
# With a release binary (.bin/edgediff, carry [".bin"]) it also writes the 26B-A4B shape
# (`synth --arch diffusion_gemma --preset 26b-a4b --dtype q4`, ~14 GB in /tmp, removed after) and
# keeps `inspect` of it (inspect-26b-a4b.txt); SYNTH=0 skips that.
#
# On the device (run tool):  bash scripts/device-diffusion-gemma.sh
# Then here, with the returned files (files_at/dg):
#   EDGEDIFF_DG_REFERENCES=<files_at>/dg cargo test --release --workspace --test it \
#     -- diffusion_gemma:: --ignored --nocapture   (edgediff's CPU reference and the GPU backend here (lavapipe)
#                                         against each: rel L2 <= 1e-4, and decode::canvas commits
#                                         generate()'s tokens given its draws)
# The GPU machine's own speed and memory: scripts/device-diffusion-gemma-bench.sh.
# Locally (plumbing): DEVICE=cpu PY=/work/venv-zaya/bin/python3 OUT=/tmp/dg-dry bash scripts/device-diffusion-gemma.sh
# Knobs: DEVICE (cuda | cpu), PY (python3), OUT (/tmp/edgediff-dg; $OUT on the device).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=${OUT:-/tmp/edgediff-dg}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT/dg"
FAILED=0
run() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  if ! "$PY" "$ROOT/tests/reference/diffusion_gemma_reference.py" "$OUT/dg/$name" --device "$DEVICE" "$@" \
      >>"$OUT/log.txt" 2>&1; then
    echo "FAILED $name" | tee -a "$OUT/log.txt"
    FAILED=$((FAILED + 1))
  fi
}
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))' \
  | tee -a "$OUT/log.txt"
run fixture                                   # the committed fixture's shape, on the device
run seven-layers --seed 7 --vocab 301 --hidden 40 --layers 7 --heads 6 --kv-heads 3 --head-dim 10 \
  --global-head-dim 14 --global-kv-heads 1 --ffn 28 --experts 9 --top-k 3 --expert-ffn 11 \
  --window 6 --prefix 13 --canvas 11
run wide-global --seed 11 --vocab 157 --hidden 36 --layers 4 --heads 4 --kv-heads 4 --head-dim 6 \
  --global-head-dim 20 --global-kv-heads 2 --ffn 24 --experts 16 --top-k 5 --expert-ffn 7 \
  --window 3 --prefix 5 --canvas 9
run long-window --seed 5 --vocab 211 --hidden 48 --layers 2 --heads 6 --kv-heads 2 --head-dim 8 \
  --global-head-dim 16 --global-kv-heads 3 --ffn 44 --experts 7 --top-k 2 --expert-ffn 13 \
  --window 40 --prefix 10 --canvas 6
BIN=${EDGEDIFF:-}
for b in "$ROOT/.bin/edgediff" "$ROOT/target/release/edgediff"; do
  [[ -z "$BIN" && -x "$b" ]] && BIN=$b
done
if [[ "${SYNTH:-1}" == 1 && -n "$BIN" ]]; then
  WORK=${WORK:-/tmp/edgediff-dg-work}
  mkdir -p "$WORK"
  echo "== synth 26b-a4b q4" | tee -a "$OUT/log.txt"
  t0=$SECONDS
  if "$BIN" synth --arch diffusion_gemma --preset 26b-a4b --dtype q4 -o "$WORK/dg-26b-a4b.edm" >>"$OUT/log.txt" 2>&1 \
      && "$BIN" inspect "$WORK/dg-26b-a4b.edm" >"$OUT/inspect-26b-a4b.txt" 2>&1; then
    echo "synth + inspect: $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  else
    echo "FAILED synth/inspect 26b-a4b" | tee -a "$OUT/log.txt"
    FAILED=$((FAILED + 1))
  fi
  rm -f "$WORK/dg-26b-a4b.edm"
fi
grep -h "device vs cpu" "$OUT/log.txt" || true
echo "failed: $FAILED" | tee -a "$OUT/log.txt"
exit "$FAILED"
