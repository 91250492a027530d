#!/usr/bin/env bash
# The cost of a forward pass (issue 13), before and after, side by side in one run on the GPU
# machine: the 20-layer LLaDA2.0-mini-shaped q4 model, `bench forward` at 1, 4, 16, 32 and 64
# tokens after 1024 cached positions, with
#   before   .bin/edgediff-before (an earlier commit, built here; see docs/PERF.md for which)
#   after    .bin/edgediff (this commit), default kernel choice
#   knobs    the same binary under EDGEDIFF_* kernel knobs (backend/gpu/choice.rs) named in KNOBS
# then `generate --decoder ar --backend gpu` (128 tokens, twice: cold, then stored pipelines) with both binaries, and (ZAYA_LAYERS > 0)
# `bench forward` on ZAYA1-8B's shapes with that many layers, with both binaries.
# Outputs under $OUT: pass.md (tables, GPU µs per entry point), pass.log.
# Here: cargo build --release -p edgediff && strip -o .bin/edgediff target/release/edgediff
#       (and the earlier commit's binary as .bin/edgediff-before)
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-pass.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-pass}"
mkdir -p "$OUT"
source scripts/lib/device-vulkan.sh
AFTER=.bin/edgediff
BEFORE=.bin/edgediff-before
TOKENS="${TOKENS:-1,4,16,32,64}"
MODEL="${TMPDIR:-/tmp}/llada2-mini-20l-q4.edm"
# Space-separated knob sets, each a comma-separated list of VAR=value.
# Default: the previous defaults beside the current ones (naga's runtime checks back on; four
# tokens a pass in the list-path experts), and the fused-norm forward off.
KNOBS="${KNOBS:-EDGEDIFF_SHADER_CHECKS=all EDGEDIFF_MOE_CHUNK=4 EDGEDIFF_FUSE_NORMS_MAX_T=0}"
R="$OUT/pass.md"
L="$OUT/pass.log"
: >"$R"
T0=$SECONDS
[[ -f "$MODEL" ]] || timeout 240 "$AFTER" synth --arch llada2_moe --preset llada2-mini \
  --dtype q4 -o "$MODEL" >>"$L" 2>&1
echo "synth done at $((SECONDS - T0)) s" >>"$L"
bench() { # label, binary, extra flags, env...
  local label=$1 bin=$2 flags=$3
  shift 3
  echo "## bench forward, $label ($*)" >>"$R"
  env "$@" timeout 150 "$bin" bench forward --model "$MODEL" --tokens "$TOKENS" \
    --iters 10 --context 1024 --copy-mib 1024 $flags >>"$R" 2>>"$L"
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
}
[[ -x "$BEFORE" ]] && bench before "$BEFORE" ""
# The default run also lists GPU µs by dispatch shape (which matrix takes the time).
bench after "$AFTER" --shapes
for k in $KNOBS; do
  bench "after, $k" "$AFTER" "" ${k//,/ }
done
# Twice each: the first run on a fresh machine builds its pipelines, the second finds them stored.
for b in "$BEFORE" "$AFTER"; do
  [[ -x "$b" ]] || continue
  for run in "first run" "second run"; do
    echo "## generate --decoder ar --backend gpu, $b, $run" >>"$R"
    timeout 90 "$b" generate --model "$MODEL" --backend gpu --decoder ar \
      --max-tokens 128 --ignore-eos --stats "Once upon a time" >/dev/null 2>>"$R"
    echo "exit $?" >>"$R"
  done
done
# ZAYA1-8B's shapes with ZAYA_LAYERS of its 40 layers (0: skip), before and after.
ZAYA_LAYERS="${ZAYA_LAYERS:-0}"
if [[ "$ZAYA_LAYERS" != 0 ]]; then
  ZMODEL="${TMPDIR:-/tmp}/zaya1-8b-${ZAYA_LAYERS}l-q4.edm"
  [[ -f "$ZMODEL" ]] || timeout 200 "$AFTER" synth --arch zaya --preset zaya1-8b \
    --layers "$ZAYA_LAYERS" --dtype q4 -o "$ZMODEL" >>"$L" 2>&1
  for b in "$BEFORE" "$AFTER"; do
    [[ -x "$b" ]] || continue
    echo "## zaya1-8b ${ZAYA_LAYERS} layers, bench forward, $b" >>"$R"
    timeout 120 "$b" bench forward --model "$ZMODEL" --tokens 1,16 --iters 10 --context 1024 \
      --copy-mib 256 >>"$R" 2>>"$L"
    echo "exit $? at $((SECONDS - T0)) s" >>"$R"
  done
fi
cat "$R"
