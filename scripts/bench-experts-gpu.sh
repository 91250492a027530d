#!/usr/bin/env bash
# Exact lazy paging on the GPU (issue 5, docs/PERF.md): `edgediff bench experts --live gpu` decodes
# the same prompts with the routed experts paged through a bounded GPU pool for each pool size
# (percent of all routed experts) × eviction policy × step prefetch (the optimistic pass), checks the
# tokens equal the all-resident run's, and reports tokens/s, hit rate, MiB read from the file, stall
# time, optimistic passes re-run, peak RSS and the pool's GPU bytes (dense weights: the header line).
#
# Models: `mini` — a synthetic LLaDA2.0-mini-shaped q4 model (`edgediff synth --preset llada2-mini`,
# LAYERS layers; random weights, so its routing is not text-like), without the CPU trace replay
# (its CPU pool would hold f32 experts); `default` — models/default.edm, with the CPU trace replay.
# The file was just written or read, so "flash" reads come from the page cache: stall times are a
# lower bound for a phone's storage.
#
# On this machine: cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff
#   target/release/edgediff; on the GPU machine (run tool, carry [".bin", ".gl"], as
#   scripts/device-bench.sh): bash scripts/bench-experts-gpu.sh   (OUT is set by the device tool)
# Locally on lavapipe, tiny: LAYERS=2 POOLS=12.5 POLICIES=lru NEW=4 WHICH=mini OUT=/tmp/p bash scripts/bench-experts-gpu.sh
#   env: EDGEDIFF (binary: .bin/edgediff, else target/release/edgediff), OUT (default
#        /tmp/edgediff-paging), WHICH ("mini default"), LAYERS (20), POOLS (100,50,25,12.5),
#        POLICIES (lru,lfu,least-stale), NEW (tokens per prompt, 32), WORK (the synthetic model:
#        ~8 GB for 20 layers; default /tmp/edgediff-paging-work, reused across runs)
# One row of the mini model decodes 3 prompts × NEW tokens; split POOLS over several runs to stay
# within a time limit. Writes $OUT/paging-gpu.<model>.<pools>.json and .md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EDGEDIFF:-}
for b in .bin/edgediff target/release/edgediff; do
  [[ -z "$BIN" && -x "$b" ]] && BIN=$b
done
[[ -n "$BIN" ]] || { echo "no edgediff binary (.bin/edgediff, target/release/edgediff or EDGEDIFF)" >&2; exit 1; }
OUT=${OUT:-/tmp/edgediff-paging}
WORK=${WORK:-/tmp/edgediff-paging-work}
WHICH=${WHICH:-mini default}
LAYERS=${LAYERS:-20}
POOLS=${POOLS:-100,50,25,12.5}
POLICIES=${POLICIES:-lru,lfu,least-stale}
NEW=${NEW:-32}
mkdir -p "$OUT" "$WORK"
# The Vulkan loader, as scripts/device-bench.sh: the device image may lack libvulkan.
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && compgen -G ".gl/*.deb" >/dev/null; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$NV_ICD" ]]; then
  export VK_DRIVER_FILES="$NV_ICD"
fi
printf '%s\n' "fn main() {" "The history of the town" "def parse(path):" > "$WORK/prompts.txt"
for m in $WHICH; do
  extra=()
  case $m in
    mini)
      model=$WORK/llada2-mini-${LAYERS}l-q4.edm
      [ -f "$model" ] || "$BIN" synth --arch llada2_moe --preset llada2-mini --layers "$LAYERS" \
        --dtype q4 -o "$model"
      extra=(--no-replay)
      ;;
    default) model=models/default.edm ;;
    *) echo "unknown model '$m' (mini, default)" >&2; exit 2 ;;
  esac
  tag="$m.${POOLS//,/-}"
  "$BIN" devices > "$OUT/devices.txt" 2>&1 || true
  "$BIN" bench experts --model "$model" --live gpu "${extra[@]}" --prompts "$WORK/prompts.txt" \
    --pools "$POOLS" --policies "$POLICIES" --max-tokens "$NEW" \
    --json "$OUT/paging-gpu.$tag.json" | tee "$OUT/paging-gpu.$tag.md"
done
