#!/usr/bin/env bash
# Host cost of a forward pass, before and after, side by side in one run on the GPU machine
# (issue 13): the 20-layer LLaDA2.0-mini-shaped q4 model, `bench forward` at 1, 16 and 32 tokens
# after 1024 cached positions, under three recording modes:
#   per-dispatch  one compute pass per dispatch, one submission per pass (the earlier behaviour)
#   shared        consecutive dispatches share a compute pass, one submission per pass
#   default       shared passes, submitted every 96 dispatches without waiting (GPU starts early)
# then `generate --decoder ar --backend gpu` on the same model in the first and last mode.
# Outputs under $OUT: host-cost.md (tables), host-cost.log.
# Here: cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff target/release/edgediff
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-host-cost.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-host-cost}"
mkdir -p "$OUT"
BIN="${EDGEDIFF:-.bin/edgediff}"
[[ -x "$BIN" ]] || BIN=target/release/edgediff
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[[ -z "${VK_DRIVER_FILES:-}" && -f "$NV_ICD" ]] && export VK_DRIVER_FILES="$NV_ICD"
LAYERS="${LAYERS:-20}"
TOKENS="${TOKENS:-1,16,32}"
MODEL="${TMPDIR:-/tmp}/llada2-mini-${LAYERS}l-q4.edm"
R="$OUT/host-cost.md"
L="$OUT/host-cost.log"
: >"$R"
[[ -f "$MODEL" ]] || timeout 240 "$BIN" synth --arch llada2_moe --preset llada2-mini \
  --layers "$LAYERS" --dtype q4 -o "$MODEL" >>"$L" 2>&1
mode() {
  case $1 in
  per-dispatch) echo "EDGEDIFF_PASS=per-dispatch EDGEDIFF_SUBMIT_EVERY=0" ;;
  shared) echo "EDGEDIFF_SUBMIT_EVERY=0" ;;
  default) echo "" ;;
  esac
}
for m in per-dispatch shared default; do
  echo "## bench forward, mode $m ($(mode $m))" >>"$R"
  env $(mode "$m") timeout 150 "$BIN" bench forward --model "$MODEL" --tokens "$TOKENS" \
    --iters 10 --context 1024 --copy-mib 1024 >>"$R" 2>>"$L"
  echo "exit $?" >>"$R"
done
for m in per-dispatch default; do
  echo "## generate --decoder ar, mode $m" >>"$R"
  env $(mode "$m") timeout 90 "$BIN" generate --model "$MODEL" --backend gpu --decoder ar \
    --max-tokens 128 --ignore-eos --stats "Once upon a time" >/dev/null 2>>"$R"
  echo "exit $?" >>"$R"
done
cat "$R"
