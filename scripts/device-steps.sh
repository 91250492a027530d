#!/usr/bin/env bash
# Denoising steps chained on the GPU vs one host round trip per step (issue 13 step 4), side by
# side in one run: `bench decode --backend gpu --device-steps host|device` on the committed default
# model (hybrid prediction, trained: several tokens a step) and on a 20-layer LLaDA2.0-mini-shaped
# q4 synth (random weights: the threshold commits about one token a step, the most steps a block
# can take). Per row: tokens/s, forwards, host round trips (GPU read-backs) and dispatches.
# Rows other than block diffusion with a greedy threshold / fixed / entropy / margin policy run the
# host loop either way (credit, bidirectional, speculative, AR), so they are the control.
# DECODE_ARGS: extra `bench decode` flags for every run (e.g. "--decoder block" to skip the control rows).
# Outputs under $OUT: steps.md (tables), steps.log.
# Here: cargo build --release -p edgediff && strip -o .bin/edgediff target/release/edgediff
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-steps.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-steps}"
mkdir -p "$OUT"
source scripts/lib/device-vulkan.sh
BIN=.bin/edgediff
MODEL="${TMPDIR:-/tmp}/llada2-mini-20l-q4.edm"
R="$OUT/steps.md"
L="$OUT/steps.log"
: >"$R"
T0=$SECONDS
for steps in host device; do
  echo "## default model, --device-steps $steps" >>"$R"
  timeout 240 "$BIN" bench decode --backend gpu --model models/default.edm --max-tokens 64 \
    --device-steps "$steps" ${DECODE_ARGS:-} >>"$R" 2>>"$L"
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
done
[[ -f "$MODEL" ]] || timeout 240 "$BIN" synth --arch llada2_moe --preset llada2-mini \
  --dtype q4 -o "$MODEL" >>"$L" 2>&1
for steps in host device; do
  echo "## LLaDA2.0-mini shape q4 (random weights), --device-steps $steps" >>"$R"
  timeout 300 "$BIN" bench decode --backend gpu --model "$MODEL" --max-tokens 64 \
    --block-size 32 --device-steps "$steps" ${DECODE_ARGS:-} >>"$R" 2>>"$L"
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
done
cat "$R"
