#!/usr/bin/env bash
# DiffusionGemma on the GPU machine (issue 18 step 4): the 26B-A4B shape in q4
# (`synth --arch diffusion_gemma --preset 26b-a4b`, random weights, ~14 GB in $WORK, removed at
# the end), on the GPU backend:
#   1. bench forward: the encoder over t committed tokens and one canvas denoising step over t
#      (statistics only, and with the [t, vocab] logits read back as the host sampler does), after
#      CONTEXT cached positions, t in TOKENS, one invocation each (ITERS iterations, 3);
#   2. decode: `generate --stats` with the canvas decoder (canvas 256, STEPS denoising steps per
#      canvas at most — a random model never becomes confident, so every canvas runs all of them;
#      the real checkpoint stops earlier), MAX_TOKENS tokens, seeded; the stats line has tokens/s,
#      passes and peak RSS + GPU bytes, all experts resident;
#   2b. `bench decode` (the canvas decoder alone: the model has no AR decoder to compare with) on
#      its built-in prompts, DECODE_TOKENS (64) tokens each;
#   3. the memory row: the same generate with the routed experts paged through a pool of each
#      share in POOLS (default 25%: `--expert-memory 25%`), PAGED_TOKENS tokens, PAGED_STEPS steps
#      per canvas (the peaks do not depend on the step count; random routing touches nearly every
#      expert each pass, so a small pool re-reads most of them every pass: slow, not the real
#      model's hit rate), after the same run with every expert resident; each prints peak RSS +
#      GPU bytes (and the pager's counters), and the paged runs' text must be the resident one's;
#   4. the same generate with --backend cpu on a 2-layer cut of the shape, CPU_STEPS (4) steps per
#      canvas, for the CPU reference's number (CPU_LAYERS; 0 skips).
# Outputs under $OUT: dg-bench.md (tables and stats lines), dg-bench.log, text-*.txt (step 3).
# Here: cargo build --release -p edgediff && strip -o .bin/edgediff target/release/edgediff
# There (run tool, carry [".bin", ".gl"]): bash scripts/device-diffusion-gemma-bench.sh
# Locally (plumbing, lavapipe, the tiny shape): PRESET=tiny LAYERS=3 TOKENS=1,6 CONTEXT=16 \
#   MAX_TOKENS=12 STEPS=3 CPU_LAYERS=3 EDGEDIFF=target/debug/edgediff OUT=/tmp/dg-bench \
#   bash scripts/device-diffusion-gemma-bench.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/edgediff-dg-bench}"
mkdir -p "$OUT"
[[ -f scripts/lib/device-vulkan.sh && -d .gl ]] && source scripts/lib/device-vulkan.sh
BIN="${EDGEDIFF:-.bin/edgediff}"
WORK="${WORK:-/tmp/edgediff-dg-work}"
PRESET="${PRESET:-26b-a4b}"
LAYERS="${LAYERS:-30}"
TOKENS="${TOKENS:-1,16,64,256}"
CONTEXT="${CONTEXT:-512}"
MAX_TOKENS="${MAX_TOKENS:-256}"
STEPS="${STEPS:-48}"
DECODE_TOKENS="${DECODE_TOKENS:-64}"
POOLS="${POOLS:-25%}"
PAGED_TOKENS="${PAGED_TOKENS:-256}"
PAGED_STEPS="${PAGED_STEPS:-4}"
CPU_LAYERS="${CPU_LAYERS:-2}"
CPU_STEPS="${CPU_STEPS:-4}"
R="$OUT/dg-bench.md"
L="$OUT/dg-bench.log"
: >"$R"
mkdir -p "$WORK"
MODEL="$WORK/dg-$PRESET-${LAYERS}l-q4.edm"
T0=$SECONDS
FAILED=0
step() { # title, command...
  local title=$1
  shift
  echo "## $title" >>"$R"
  echo "\$ $*" >>"$R"
  if ! "$@" >>"$R" 2>>"$L"; then
    echo "FAILED: $title" | tee -a "$R"
    FAILED=$((FAILED + 1))
  fi
  echo "(at $((SECONDS - T0)) s)" >>"$R"
}
gen() { # backend, model, steps, extra...
  local backend=$1 model=$2 steps=$3
  shift 3
  # The stats go to stderr: keep them in the report, the gibberish text in the log.
  timeout 500 "$BIN" generate --model "$model" --backend "$backend" \
    --max-tokens "${GEN_TOKENS:-$MAX_TOKENS}" \
    --steps "$steps" --seed 1 --ignore-eos --stats "$@" "The capital of France is" \
    2>&1 >>"${GEN_TEXT:-$L}" | grep -v -e '^edgediff:' -e XDG_RUNTIME_DIR || return 1
}
step "synth $PRESET q4, $LAYERS layers" timeout 900 "$BIN" synth --arch diffusion_gemma \
  --preset "$PRESET" --layers "$LAYERS" --dtype q4 -o "$MODEL"
step "inspect" "$BIN" inspect "$MODEL"
# One invocation per token count, smallest first: a call's limit then cuts the last rows, not the
# whole table (2026-12-05: 1/16/64/256 in one invocation did not finish in the ≈ 200 s left).
for t in ${TOKENS//,/ }; do
  step "bench forward (GPU), $t tokens, context $CONTEXT" timeout 300 "$BIN" bench forward \
    --model "$MODEL" --tokens "$t" --context "$CONTEXT" --iters "${ITERS:-3}"
done
step "generate, canvas decoder, GPU, $STEPS steps per canvas" gen gpu "$MODEL" "$STEPS"
step "bench decode (GPU), canvas decoder, $STEPS steps per canvas, $DECODE_TOKENS tokens a prompt" \
  timeout 300 "$BIN" bench decode --model "$MODEL" --backend gpu --steps "$STEPS" \
  --max-tokens "$DECODE_TOKENS"
rm -f "$OUT"/text-*.txt
GEN_TOKENS=$PAGED_TOKENS GEN_TEXT=$OUT/text-resident.txt step "memory: generate, GPU, every \
expert resident, $PAGED_TOKENS tokens, $PAGED_STEPS steps per canvas" gen gpu "$MODEL" "$PAGED_STEPS"
for pool in $POOLS; do
  GEN_TOKENS=$PAGED_TOKENS GEN_TEXT=$OUT/text-$pool.txt step "memory: generate, GPU, experts \
paged through a $pool pool, $PAGED_TOKENS tokens, $PAGED_STEPS steps per canvas" \
    gen gpu "$MODEL" "$PAGED_STEPS" --expert-memory "$pool"
  step "the $pool pool's text is the resident run's (exact paging)" \
    cmp "$OUT/text-resident.txt" "$OUT/text-$pool.txt"
done
rm -f "$MODEL"
if [[ "$CPU_LAYERS" != 0 ]]; then
  CMODEL="$WORK/dg-$PRESET-${CPU_LAYERS}l-q4.edm"
  step "synth $PRESET q4, $CPU_LAYERS layers (CPU row)" timeout 300 "$BIN" synth \
    --arch diffusion_gemma --preset "$PRESET" --layers "$CPU_LAYERS" --dtype q4 -o "$CMODEL"
  step "generate, canvas decoder, CPU, $CPU_LAYERS layers, $CPU_STEPS steps per canvas" \
    gen cpu "$CMODEL" "$CPU_STEPS"
  rm -f "$CMODEL"
fi
echo "failed: $FAILED (total $((SECONDS - T0)) s)" | tee -a "$R"
exit "$FAILED"
