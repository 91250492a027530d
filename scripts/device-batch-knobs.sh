#!/usr/bin/env bash
# `bench batch` on the LLaDA2.0-mini shape (LAYERS layers, q4) under kernel knob sets, side by side in
# one call on the GPU machine: how a knob moves a batched pass of many short sequences (issue 16's
# AR streams: 16 sequences of 2 rows) against one sequence's pass.
# KNOBS: space-separated sets, each a comma-separated list of VAR=value; "-" is the defaults.
# There (run tool, carry [".bin/edgediff", ".gl"]): KNOBS="- EDGEDIFF_WIDE_MIN_CHUNKS=4" bash scripts/device-batch-knobs.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-batch-knobs}"
mkdir -p "$OUT"
source scripts/lib/device-vulkan.sh
BIN=.bin/edgediff
LAYERS="${LAYERS:-4}"
KNOBS="${KNOBS:--}"
MODEL="${TMPDIR:-/tmp}/llada2-mini-${LAYERS}l-q4.edm"
R="$OUT/batch-knobs.md"
: >"$R"
[[ -f "$MODEL" ]] || timeout 200 "$BIN" synth --arch llada2_moe --preset llada2-mini --layers "$LAYERS" \
  --dtype q4 -o "$MODEL" >/dev/null 2>>"$OUT/log.txt"
for k in $KNOBS; do
  env_set=()
  [[ "$k" != - ]] && env_set=(${k//,/ })
  echo "## bench batch, ${k}" >>"$R"
  env "${env_set[@]}" timeout 150 "$BIN" bench batch --model "$MODEL" --tokens "${BATCH_TOKENS:-2}" \
    --sequences "${BATCH_SEQUENCES:-1,16}" --context "${BATCH_CONTEXT:-512}" --iters 10 --copy-mib 0 --shapes ${BATCH_FLAGS:-} \
    >>"$R" 2>>"$OUT/log.txt"
  echo "exit $?" >>"$R"
done
cat "$R"
