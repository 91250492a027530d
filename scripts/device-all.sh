#!/usr/bin/env bash
# Several GPU-machine scripts in one call. Device time is scarce and every machine start costs a
# minute or more, so one call runs STAGES in order (default "dgref pass steps serve"), each into
# $OUT/<stage>/ with its own log; what finished before the call's limit comes back either way.
#   dgref  scripts/device-diffusion-gemma.sh with SYNTH=0 (transformers references on cuda; issue 18),
#          in the background: it uses Python and CUDA, the others Vulkan and the disk
#   pass   scripts/device-pass.sh (issue 13; TOKENS default 1,16,32, no knob rows;
#          .bin/edgediff-before, when carried, is the before column)
#   steps  scripts/device-steps.sh with DECODE_ARGS="--decoder block" (issue 13 step 4)
#   serve  scripts/device-serve-bench.sh, STREAMS="1 16", BASELINE=1, 5 s a point (issue 16)
#   dgbench scripts/device-diffusion-gemma-bench.sh (issue 18; not in the default list: ~14 GB synth)
# Stages share the LLaDA2.0-mini synth in $TMPDIR (pass writes it, steps reuses it).
# Here: cargo build --release -p edgediff && strip -o .bin/edgediff target/release/edgediff
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-all.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-all}"
STAGES="${STAGES:-dgref pass steps serve}"
mkdir -p "$OUT"
source scripts/lib/device-vulkan.sh
T0=$SECONDS
note() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/stages.txt"; }
BG=
for s in $STAGES; do
  mkdir -p "$OUT/$s"
  note "start $s"
  case $s in
    dgref)
      SYNTH=0 OUT="$OUT/$s" bash scripts/device-diffusion-gemma.sh >"$OUT/$s/run.txt" 2>&1 &
      BG=$!
      continue
      ;;
    pass) TOKENS="${TOKENS:-1,16,32}" KNOBS="${KNOBS:- }" OUT="$OUT/$s" bash scripts/device-pass.sh ;;
    steps) DECODE_ARGS="${DECODE_ARGS:---decoder block}" OUT="$OUT/$s" bash scripts/device-steps.sh ;;
    serve)
      STREAMS="${STREAMS:-1 16}" BASELINE="${BASELINE:-1}" SECONDS_PER_POINT="${SECONDS_PER_POINT:-5}" \
        OUT="$OUT/$s" bash scripts/device-serve-bench.sh
      ;;
    dgbench) OUT="$OUT/$s" bash scripts/device-diffusion-gemma-bench.sh ;;
    *) note "unknown stage $s" ;;
  esac >"$OUT/$s/run.txt" 2>&1
  note "end $s: exit $?"
done
if [[ -n "$BG" ]]; then
  wait "$BG"
  note "end dgref: exit $?"
fi
