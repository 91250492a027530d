#!/usr/bin/env bash
# The GPU benchmarks of docs/PERF.md in one run, for the GPU machine (no Rust, no network there):
#   1. `edgediff devices`                         → devices.txt
#   2. `edgediff bench kernels` (LLaDA2.0-mini-shaped q4, synthesized there with the carried binary,
#      dense f16 4096³ matmul, copy bandwidth)    → kernels.md, kernels.json
#   3. `edgediff bench forward` (same model, blocks of 1, 4, 16, 32, 64 tokens after 1024 cached)
#                                                 → forward.md, forward.json
#   4. `edgediff bench decode --backend gpu` on models/default.edm: AR baseline, block diffusion with
#      every policy and a threshold sweep, bidirectional caches, speculative β = 1 (lossless) and
#      β < 1                                      → decode.md
#   plus log.txt (stderr, timings, exit codes): 7 files, each far below 16 MiB, all under $OUT.
# Each step has its own time limit so the whole run stays under 8 minutes; a failed step is
# logged and the others still run (the exit status is the number of failed steps).
#
# On this machine (build, then carry a stripped binary: target/release/edgediff is ~100 MiB with
# debug info, over the 64 MiB a run may carry):
#   cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff target/release/edgediff
#   (.gl: the Vulkan loader debs, see /work/.library/device/README.md; both paths are gitignored)
# On the device (run tool, carry [".bin", ".gl"]):
#   bash scripts/device-bench.sh
# Locally against lavapipe, small shapes and one iteration (~minutes on a CPU adapter):
#   EDGEDIFF_BENCH_QUICK=1 OUT=/tmp/bench bash scripts/device-bench.sh
# Knobs: EDGEDIFF (binary), MOE_LAYERS (synthetic layers, default 4: 1 dense + 3 MoE), OUT.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT="${OUT:-/tmp/edgediff-device-bench}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
QUICK="${EDGEDIFF_BENCH_QUICK:-0}"
START=$(date +%s)
FAILED=0

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG" >&2; }

# The binary: $EDGEDIFF, else the local build, else the carried stripped one (the device has no
# target/: it is gitignored and too large to carry).
BIN="${EDGEDIFF:-}"
for b in target/release/edgediff .bin/edgediff; do
  [[ -z "$BIN" && -x "$b" ]] && BIN="$b"
done
if [[ -z "$BIN" ]]; then
  log "no edgediff binary (.bin/edgediff or target/release/edgediff; or set EDGEDIFF)"
  exit 1
fi

# The Vulkan loader: the device image has the NVIDIA driver but may lack libvulkan.
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1; then
  if compgen -G ".gl/*.deb" >/dev/null; then
    log "unpacking the Vulkan loader from .gl/"
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  else
    log "no libvulkan and no .gl/*.deb: the GPU backend will find no adapter"
  fi
fi
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$NV_ICD" ]]; then
  export VK_DRIVER_FILES="$NV_ICD"
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

# step NAME SECONDS STDOUT-FILE COMMAND...: runs with a time limit, stdout to the file, stderr to
# the log.
step() {
  local name=$1 limit=$2 out=$3
  shift 3
  log "$name: $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out" 2>>"$LOG"
  rc=$?
  log "$name: exit $rc after $(($(date +%s) - t0))s (limit ${limit}s)"
  if [[ $rc -ne 0 ]]; then
    FAILED=$((FAILED + 1))
  fi
}

if [[ "$QUICK" == 1 ]]; then
  # Plumbing check on a CPU adapter: LLaDA2.0-mini's structure, small widths.
  SYNTH_SHAPE=(--hidden 256 --heads 4 --kv-heads 2 --head-dim 64 --experts 32 --top-k 8
    --expert-ffn 128 --dense-ffn 512 --vocab 4096 --tokenizer-vocab 1024)
  LAYERS=2
  BENCH=(--tokens 1,4 --iters 1 --context 64 --copy-mib 16)
  MATMUL_N=128
  DECODE=(--max-tokens 8 --thresholds 0.5 --betas 1,0.5)
  T_SYNTH=120 T_KERNELS=240 T_FORWARD=240 T_DECODE=300
  printf 'Once upon a time\n' >"$OUT/.prompts"
else
  SYNTH_SHAPE=()
  LAYERS="${MOE_LAYERS:-4}"
  BENCH=(--tokens 1,4,16,32,64 --iters 10 --context 1024 --copy-mib 1024)
  MATMUL_N=4096
  DECODE=(--max-tokens 64 --thresholds 0.5,0.7,0.8,0.95 --betas 1,0.8,0.5)
  T_SYNTH=110 T_KERNELS=80 T_FORWARD=100 T_DECODE=150
  : >"$OUT/.prompts"
fi

step devices 30 "$OUT/devices.txt" "$BIN" devices

MODEL_DIR="${TMPDIR:-/tmp}/edgediff-device-bench"
mkdir -p "$MODEL_DIR"
SYN="$MODEL_DIR/llada2-mini-${LAYERS}l-q4-quick${QUICK}.edm"
if [[ ! -f "$SYN" ]]; then
  step synth "$T_SYNTH" /dev/null "$BIN" synth --arch llada2_moe --preset llada2-mini \
    --layers "$LAYERS" "${SYNTH_SHAPE[@]}" --dtype q4 -o "$SYN"
fi

if [[ -f "$SYN" ]]; then
  step kernels "$T_KERNELS" "$OUT/kernels.md" "$BIN" bench kernels --model "$SYN" \
    "${BENCH[@]}" --matmul-n "$MATMUL_N" --json-out "$OUT/kernels.json"
  step forward "$T_FORWARD" "$OUT/forward.md" "$BIN" bench forward --model "$SYN" \
    "${BENCH[@]}" --json-out "$OUT/forward.json"
else
  log "no synthetic model: kernels and forward skipped"
  FAILED=$((FAILED + 2))
fi

PROMPTS=()
[[ -s "$OUT/.prompts" ]] && PROMPTS=(--prompts "$OUT/.prompts")
step decode "$T_DECODE" "$OUT/decode.md" "$BIN" bench decode --backend gpu \
  --model models/default.edm "${PROMPTS[@]}" "${DECODE[@]}"
rm -f "$OUT/.prompts"

log "done in $(($(date +%s) - START))s, $FAILED failed step(s); files in $OUT:"
ls -la "$OUT" | tee -a "$LOG" >&2
exit "$FAILED"
