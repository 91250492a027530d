#!/usr/bin/env bash
# Issue 15 (ZAYA1) on the GPU machine, one run (no Rust, no network there; the device has PyTorch
# and transformers ≥ 5.17 with CUDA):
# 1. Parity with transformers (step 2): the committed tests/fixtures/zaya checkpoint and two zaya
#    checkpoints of other odd shapes written here by `synth --hf-out` (2 layers, hidden 72, 4 q
#    heads over 1 KV head of 20, 3 experts, vocab 700; 4 layers, hidden 96, 8 q / 2 KV heads of 16,
#    7 experts, vocab 515); transformers' f32 logits on cuda under causal, bidirectional, block:4
#    and block:8 masks (tests/reference/references.sh), then each checkpoint converted to f32 and
#    `edgediff forward --backend cpu|gpu` held against them (tests/reference/compare_logits.py:
#    relative L2 ≤ 1e-4 per case, argmax per position)  → parity/*.json, parity.txt
# 2. The ZAYA1-8B shape (step 5): `synth --arch zaya --preset zaya1-8b --dtype q4` (40 layers,
#    hidden 2048, 16 experts top-1 + skip, vocab 262,272; ~4.7 GB), then
#    `bench forward` (blocks of 1, 16, 32 after 1024 cached)        → forward.md, forward.json
#    `bench experts --live gpu` (all resident, pools 25 / 12.5 %, least-stale, 2 readers, the
#    speculative decoder with drafts of 16, 8 tokens of 2 prompts)   → experts.md, experts.json
#    memory rows: `generate --backend gpu --decoder speculative --stats` all experts resident,
#    then exact paging through a 25 % and a 12.5 % pool (`--expert-memory`), each reporting peak
#    RSS + peak GPU buffer bytes (the `memory:` line)               → memory.txt
# Every command is echoed into log.txt (with its exit status and seconds) and its output goes to
# the file named above; a failed step is logged and the others still run; the exit status is the
# number of failed steps. Expected device time ≈ 4 minutes (3 reference runs ≈ 75 s, synth ≈ 60 s).
#
# On this machine: cargo build --release -p edgediff && mkdir -p .bin &&
#   strip -o .bin/edgediff target/release/edgediff   (.gl: the Vulkan loader debs)
# On the device (run tool, carry [".bin", ".gl"]):
#   bash scripts/device-zaya.sh
# Locally (plumbing only: the tiny zaya instead of the 8B shape, references on the CPU, lavapipe):
#   PRESET=tiny DEVICE=cpu PY=/work/venv-zaya/bin/python3 EDGEDIFF=target/debug/edgediff \
#     OUT=/tmp/zaya-dry bash scripts/device-zaya.sh
# Knobs: PRESET (zaya1-8b | tiny), DEVICE (torch device of the references: cuda | cpu), PY,
#   EDGEDIFF (binary), OUT (/tmp/edgediff-zaya), WORK (/tmp/edgediff-zaya-work; the synthetic
#   model is reused when present), BUDGET (seconds for the whole script, 420).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS
OUT=${OUT:-/tmp/edgediff-zaya}
WORK=${WORK:-/tmp/edgediff-zaya-work}
PRESET=${PRESET:-zaya1-8b}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT/parity" "$WORK"
LOG=$OUT/log.txt
: >"$LOG"
FAILED=0
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$LOG" >&2; }
left() { echo $((BUDGET - (SECONDS - T0))); }

BIN=${EDGEDIFF:-}
for b in .bin/edgediff target/release/edgediff; do
  [[ -z "$BIN" && -x "$b" ]] && BIN=$b
done
[[ -n "$BIN" ]] || { log "no edgediff binary (.bin/edgediff, target/release/edgediff or EDGEDIFF)"; exit 1; }

source scripts/lib/device-vulkan.sh

# step LIMIT NAME OUTFILE CMD...: CMD with at most LIMIT seconds (less when the budget is
# shorter), echoed into the log; stdout and stderr appended to OUTFILE under a header line.
step() {
  local limit=$1 name=$2 out=$3
  shift 3
  local l rc t0
  l=$(left)
  ((l < limit)) && limit=$l
  if ((limit < 5)); then
    log "$name: skipped (budget spent)"
    FAILED=$((FAILED + 1))
    return 1
  fi
  log "$name (≤ ${limit}s): $*"
  echo "=== $name: $*" >>"$out"
  t0=$SECONDS
  timeout -k 5 "$limit" "$@" >>"$out" 2>&1
  rc=$?
  log "$name: exit $rc after $((SECONDS - t0))s"
  ((rc == 0)) || FAILED=$((FAILED + 1))
  return $rc
}

"$BIN" devices >"$OUT/devices.txt" 2>&1
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)' \
  >>"$OUT/devices.txt" 2>&1
cat "$OUT/devices.txt" >>"$LOG"

# --- 1. parity with transformers -----------------------------------------------------------------
CK=$WORK/checkpoints
mkdir -p "$CK"
rm -rf "$CK/zaya" && cp -r tests/fixtures/zaya "$CK/zaya" && rm -f "$CK/zaya/reference.json"
[[ -d $CK/zaya-odd1 ]] || step 30 synth-odd1 "$OUT/parity.txt" "$BIN" synth --arch zaya --seed 11 \
  --layers 2 --hidden 72 --heads 4 --kv-heads 1 --head-dim 20 --experts 3 --top-k 1 \
  --expert-ffn 40 --vocab 700 --hf-out "$CK/zaya-odd1"
[[ -d $CK/zaya-odd2 ]] || step 30 synth-odd2 "$OUT/parity.txt" "$BIN" synth --arch zaya --seed 12 \
  --layers 4 --hidden 96 --heads 8 --kv-heads 2 --head-dim 16 --experts 7 --top-k 1 \
  --expert-ffn 56 --vocab 515 --hf-out "$CK/zaya-odd2"
step 150 references "$OUT/parity.txt" env FAMILIES="zaya zaya-odd1 zaya-odd2" FIXTURES="$CK" \
  PYTHON="$PY" bash tests/reference/references.sh "$OUT/parity" --device "$DEVICE"
for c in zaya zaya-odd1 zaya-odd2; do
  [[ -f $OUT/parity/$c.json ]] || { log "$c: no reference, not compared"; continue; }
  step 30 "convert-$c" "$OUT/parity.txt" "$BIN" convert "$CK/$c" -o "$WORK/$c.f32.edm" --dtype f32 ||
    continue
  for backend in cpu gpu; do
    step 60 "parity-$c-$backend" "$OUT/parity.txt" "$PY" tests/reference/compare_logits.py \
      --bin "$BIN" --model "$WORK/$c.f32.edm" --reference "$OUT/parity/$c.json" \
      --backend "$backend" --bound 1e-4 --out "$OUT/parity/$c.$backend.result.json"
  done
done

# --- 2. the ZAYA1-8B shape: speed and memory -----------------------------------------------------
if [[ $PRESET == tiny ]]; then
  # Plumbing on a CPU adapter: the tiny zaya (3 layers, 5 experts; context 512).
  FORWARD=(--tokens 1,16,32 --context 64 --iters 1 --copy-mib 0)
  T_SYNTH=60 T_FORWARD=120 T_EXPERTS=300 T_GEN=120
else
  FORWARD=(--tokens 1,16,32 --context 1024 --iters 10 --copy-mib 1024)
  T_SYNTH=200 T_FORWARD=60 T_EXPERTS=100 T_GEN=45
fi
# Few tokens: a speculative pass of 17 positions routes up to 16 experts per layer, so a small pool
# pages most of the 4.5 GB of experts on every pass (random weights reject every draft).
MODEL=$WORK/zaya-$PRESET-q4.edm
if [[ ! -f $MODEL ]]; then
  step "$T_SYNTH" synth "$OUT/synth.txt" "$BIN" synth --arch zaya --preset "$PRESET" --dtype q4 \
    -o "$MODEL.part" && mv "$MODEL.part" "$MODEL"
fi
if [[ -f $MODEL ]]; then
  ls -la "$MODEL" >>"$LOG"
  step 20 inspect "$OUT/synth.txt" "$BIN" inspect "$MODEL"
  step "$T_FORWARD" bench-forward "$OUT/forward.md" "$BIN" bench forward --model "$MODEL" \
    "${FORWARD[@]}" --json-out "$OUT/forward.json"
  printf '%s\n' "The history of the town" "fn main() {" >"$WORK/prompts.txt"
  step "$T_EXPERTS" bench-experts "$OUT/experts.md" "$BIN" bench experts --model "$MODEL" \
    --live gpu --no-replay --prompts "$WORK/prompts.txt" --decoder speculative --pools 25,12.5 \
    --policies least-stale --readers 2 --max-tokens 8 --ignore-eos \
    --json "$OUT/experts.json"
  GEN=(generate --model "$MODEL" --backend gpu --decoder speculative --stats --ignore-eos
    --max-tokens 16)
  step "$T_GEN" memory-resident "$OUT/memory.txt" "$BIN" "${GEN[@]}" "The history of the town"
  for pool in 25% 12.5%; do
    step "$T_GEN" "memory-paged-$pool" "$OUT/memory.txt" "$BIN" "${GEN[@]}" \
      --expert-memory "$pool" "The history of the town"
  done
else
  log "no synthetic model: forward, experts and memory skipped"
  FAILED=$((FAILED + 4))
fi

{
  echo "--- summary"
  grep -h "worst rel L2" "$OUT/parity.txt"
  grep -h "^===\|^memory:\|tokens/s" "$OUT/memory.txt"
} >>"$LOG" 2>/dev/null
log "done in $((SECONDS - T0))s, $FAILED failed step(s); files in $OUT:"
ls -la "$OUT" "$OUT/parity" >>"$LOG"
exit "$FAILED"
