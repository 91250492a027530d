#!/usr/bin/env bash
# Several GPU-machine scripts in one call. Device time is scarce and every machine start costs a
# minute or more, so one call runs STAGES in order (default "dgref pass steps serve"), each into
# <stage>/ with its own log, all packed into $OUT/all.tgz; what finished before a TERM (the
# caller's `timeout`) comes back either way.
#   dgref  scripts/device-diffusion-gemma.sh with SYNTH=0 (transformers references on cuda; issue 18),
#          in the background: it uses Python and CUDA, the others Vulkan and the disk
#   pass   scripts/device-pass.sh (issue 13; TOKENS default 1,2,16,32, its default knob rows;
#          .bin/edgediff-before, when carried, is the before column)
#   steps  scripts/device-steps.sh with DECODE_ARGS="--decoder block" (issue 13 step 4)
#   serve  scripts/device-serve-bench.sh, STREAMS="1 16", BASELINE=1, 5 s a point (issue 16)
#   dgbench scripts/device-diffusion-gemma-bench.sh (issue 18; not in the default list: ~14 GB synth)
#   gputests scripts/device-gpu-tests.sh run (needs `bash scripts/device-gpu-tests.sh pack` here);
#          it waits for dgref first, whose references it checks the GPU backend against
# Stages share the LLaDA2.0-mini synth in $TMPDIR (pass writes it, steps reuses it).
# Here: cargo build --release -p edgediff && strip -o .bin/edgediff target/release/edgediff
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-all.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-all}"
STAGES="${STAGES:-dgref pass steps serve}"
# The stages write to RES and the end packs it into $OUT/all.tgz: a device call returns only a
# limited number of files (a run of 2026-12-05 lost its 90 result files that way). A TERM (the
# caller's `timeout`) packs what is there.
RES="${RES:-/tmp/edgediff-all-res}"
rm -rf "$RES" && mkdir -p "$RES" "$OUT"
source scripts/lib/device-vulkan.sh
T0=$SECONDS
note() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$RES/stages.txt"; }
pack() {
  find "$RES" -name '*.edm' -delete
  tar -czf "$OUT/all.tgz" -C "$RES" . && echo "results packed: $OUT/all.tgz ($(du -h "$OUT/all.tgz" | cut -f1))"
}
trap 'note "terminated"; pack; trap - TERM; kill 0; exit 143' TERM
stage() {
  case $1 in
    pass) TOKENS="${TOKENS:-1,2,16,32}" OUT="$RES/$1" bash scripts/device-pass.sh ;;
    steps) DECODE_ARGS="${DECODE_ARGS:---decoder block}" OUT="$RES/$1" bash scripts/device-steps.sh ;;
    serve)
      STREAMS="${STREAMS:-1 16}" BASELINE="${BASELINE:-1}" SECONDS_PER_POINT="${SECONDS_PER_POINT:-5}" \
        OUT="$RES/$1" bash scripts/device-serve-bench.sh
      ;;
    dgbench) OUT="$RES/$1" bash scripts/device-diffusion-gemma-bench.sh ;;
    gputests) OUT="$RES/$1" DG_REFS="$RES/dgref/dg" bash scripts/device-gpu-tests.sh run ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}
BG=
for s in $STAGES; do
  mkdir -p "$RES/$s"
  note "start $s"
  if [[ $s == dgref ]]; then
    SYNTH=0 OUT="$RES/$s" bash scripts/device-diffusion-gemma.sh >"$RES/$s/run.txt" 2>&1 &
    BG=$!
    continue
  fi
  if [[ $s == gputests && -n "$BG" ]]; then
    wait "$BG"
    note "end dgref: exit $?"
    BG=
  fi
  # In the background and waited for, so a TERM runs the trap at once (bash defers traps until
  # a foreground child ends).
  stage "$s" >"$RES/$s/run.txt" 2>&1 &
  wait $!
  note "end $s: exit $?"
done
if [[ -n "$BG" ]]; then
  wait "$BG"
  note "end dgref: exit $?"
fi
pack
