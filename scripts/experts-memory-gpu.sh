#!/usr/bin/env bash
# Issue 5 on the GPU machine, one run (docs/PERF.md, "Expert paging"):
# 1. The memory goal: synthesize the full 20-layer LLaDA2.0-mini-shaped q4 model, profile it on a
#    little text on the GPU, prune it to 12.5 % of the experts per layer (router-probability mass;
#    random when the profile step fails or times out), decode with --backend gpu --stats and report
#    peak RSS + peak GPU buffer bytes (`memory:` line). The full model decoding with a 12.5 % expert
#    pool (exact paging, --expert-memory) is measured the same way.
# 2. Read-ahead: `bench experts --live gpu --readers 0,2` (stall, tokens/s) on models/default.edm and
#    on the full synthetic model (fewer tokens: its random routing pages gigabytes per pass).
# Every step has a time limit and the script goes on after a failure. $OUT gets steps.txt (every
# step's output), experts-memory.log (timeline), devices.txt and the two bench JSON files.
#
# On this machine: cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff
#   target/release/edgediff; on the GPU machine (run tool, carry [".bin", ".gl"]):
#   bash scripts/experts-memory-gpu.sh
#   env: EDGEDIFF (binary), OUT (/tmp/edgediff-experts), WORK (/tmp/edgediff-paging-work; the
#   ~8.7 GB model is reused when present), BUDGET (seconds for the whole script, 400)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
BIN=${EDGEDIFF:-}
for b in .bin/edgediff target/release/edgediff; do
  [[ -z "$BIN" && -x "$b" ]] && BIN=$b
done
[[ -n "$BIN" ]] || { echo "no edgediff binary" >&2; exit 1; }
OUT=${OUT:-/tmp/edgediff-experts}
WORK=${WORK:-/tmp/edgediff-paging-work}
BUDGET=${BUDGET:-400}
mkdir -p "$OUT" "$WORK"
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && compgen -G ".gl/*.deb" >/dev/null; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$NV_ICD" ]]; then
  export VK_DRIVER_FILES="$NV_ICD"
fi
LOG=$OUT/experts-memory.log
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
# step LIMIT NAME CMD...: runs CMD with at most LIMIT seconds (less if the budget is shorter).
step() {
  local limit=$1 name=$2
  shift 2
  local l; l=$(left)
  ((l < limit)) && limit=$l
  if ((limit < 5)); then log "$name: skipped (budget spent)"; return 1; fi
  log "$name (≤ ${limit}s): $*"
  echo "=== $name: $*" >> "$OUT/steps.txt"
  timeout "$limit" "$@" >> "$OUT/steps.txt" 2>&1
  local rc=$?
  log "$name: exit $rc"
  return $rc
}
"$BIN" devices > "$OUT/devices.txt" 2>&1 || true
nproc >> "$OUT/devices.txt"
FULL=$WORK/llada2-mini-20l-q4.edm
PRUNED=$WORK/llada2-mini-20l-q4.12.5.edm
PROMPT="The history of the town"
printf '%s\n' "fn main() {" "The history of the town" > "$WORK/prompts2.txt"

# Reads ahead on the small trained model first (fast).
step 60 bench-default "$BIN" bench experts --model models/default.edm --live gpu --no-replay \
  --pools 25,12.5 --policies lru,least-stale --readers 0,2,4 --max-tokens 16 \
  --json "$OUT/paging-gpu.default.readers.json"

if [ ! -f "$FULL" ]; then
  step 240 synth "$BIN" synth --arch llada2_moe --preset llada2-mini --dtype q4 -o "$FULL.part" \
    && mv "$FULL.part" "$FULL"
fi
ls -la "$WORK" >> "$LOG"
if [ -f "$FULL" ]; then
  cat README.md docs/*.md > "$WORK/corpus.txt" 2>/dev/null
  if step 60 profile "$BIN" profile --model "$FULL" --corpus "$WORK/corpus.txt" --backend gpu \
      --window 128 --max-tokens 512 -o "$WORK/mini.profile.json"; then
    step 60 prune "$BIN" prune --model "$FULL" --profile "$WORK/mini.profile.json" --keep 12.5% \
      -o "$PRUNED"
  else
    step 60 prune "$BIN" prune --model "$FULL" --selector random --keep 12.5% -o "$PRUNED"
  fi
  if [ -f "$PRUNED" ]; then
    ls -la "$PRUNED" >> "$LOG"
    step 60 generate-pruned "$BIN" generate --model "$PRUNED" --backend gpu --stats \
      --max-tokens 32 --ignore-eos "$PROMPT"
  fi
  step 60 generate-paged "$BIN" generate --model "$FULL" --backend gpu --stats \
    --expert-memory 12.5% --max-tokens 8 --ignore-eos "$PROMPT"
  step 180 bench-full "$BIN" bench experts --model "$FULL" --live gpu --no-replay \
    --prompts "$WORK/prompts2.txt" --pools 25,12.5 --policies least-stale --readers 0,2,4 \
    --max-tokens 8 --json "$OUT/paging-gpu.full.readers.json"
fi
log "done"
grep -h "^===\|memory:\|experts:" "$OUT/steps.txt" >> "$LOG" 2>/dev/null
