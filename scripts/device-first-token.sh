#!/usr/bin/env bash
# The first token's wait for pipeline compiles, with and without the pipeline store
# (backend/gpu/pipeline_store.rs), on the GPU machine: `generate --decoder ar --backend gpu`
# (128 tokens) on the 20-layer LLaDA2.0-mini-shaped q4 model, each run a fresh process:
#   off       EDGEDIFF_PIPELINE_CACHE=off
#   cold      a store that is empty (its first run: it records the model's pipelines)
#   warm      the same store again (the pipelines built on background threads while it loads)
# each with the NVIDIA driver's own shader disk cache off (__GL_SHADER_DISK_CACHE=0: a driver
# without a cache of its own, as on many phones), then `off` and `warm` with that cache on and
# warm (a desktop driver), REPEAT times each in turn.
# Outputs under $OUT: first-token.md.
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-first-token.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-first-token}"
mkdir -p "$OUT"
[[ -n "${EDGEDIFF_SKIP_LOADER:-}" ]] || source scripts/lib/device-vulkan.sh
BIN="${BIN:-.bin/edgediff}"
MODEL="${MODEL:-${TMPDIR:-/tmp}/llada2-mini-20l-q4.edm}"
REPEAT="${REPEAT:-2}"
R="$OUT/first-token.md"
[[ -f "$MODEL" ]] || timeout 240 "$BIN" synth --arch llada2_moe --preset llada2-mini \
  --dtype q4 -o "$MODEL" >/dev/null 2>&1
STORE=$(mktemp -d)
NVC=$(mktemp -d)
one() { # label, env...
  local label=$1
  shift
  local t0=$SECONDS
  local line
  line=$(env "$@" timeout 120 "$BIN" generate --model "$MODEL" --backend gpu --decoder ar \
    --max-tokens 128 --ignore-eos --stats "Once upon a time" 2>&1 >/dev/null |
    grep -E "time to first token")
  echo "| $label | $line | $((SECONDS - t0)) s |" >>"$R"
}
{
  echo "# First token with and without the pipeline store — $(date -u +%F)"
  echo
  echo "binary: $BIN; model: $MODEL; $("$BIN" devices 2>/dev/null | grep -m1 -i 'chosen\|\*' || true)"
  echo
  echo "| run | generate --stats | process wall |"
  echo "|---|---|---|"
} >"$R"
for _ in $(seq "$REPEAT"); do
  one "off, no driver cache" EDGEDIFF_PIPELINE_CACHE=off __GL_SHADER_DISK_CACHE=0
done
one "store cold, no driver cache" EDGEDIFF_PIPELINE_CACHE="$STORE" __GL_SHADER_DISK_CACHE=0
for _ in $(seq "$REPEAT"); do
  one "store warm, no driver cache" EDGEDIFF_PIPELINE_CACHE="$STORE" __GL_SHADER_DISK_CACHE=0
done
one "off, driver cache cold" EDGEDIFF_PIPELINE_CACHE=off __GL_SHADER_DISK_CACHE_PATH="$NVC"
for _ in $(seq "$REPEAT"); do
  one "off, driver cache warm" EDGEDIFF_PIPELINE_CACHE=off __GL_SHADER_DISK_CACHE_PATH="$NVC"
  one "store warm, driver cache warm" EDGEDIFF_PIPELINE_CACHE="$STORE" \
    __GL_SHADER_DISK_CACHE_PATH="$NVC"
done
echo >>"$R"
echo "store: $(ls -la "$STORE" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ';')" >>"$R"
cat "$R"
