#!/usr/bin/env bash
# Block-level expert routing on the GPU machine (issue 19 step 4, docs/RESULTS.md "Block-level
# routing"): the 20-layer LLaDA2.0-mini-shaped q4 model (`edgediff synth --preset llada2-mini`,
# 256 experts top-8; random weights, so its routing is not text-like and its text is noise — only
# bytes, hits and speed mean something) decodes one prompt, NEW tokens in blocks of BLOCK, with its
# experts paged through a pool of POOLS (% of all routed experts), exactly (no flag) and with
# `--block-experts N` for each N in NS, each from a COLD page cache (the model file's pages dropped
# with posix_fadvise(DONTNEED) through `dd iflag=nocache count=0`) and then WARM (the same run
# again). Reported per run (`generate --stats`): tokens/s, forward passes, pool hits / misses / hit
# rate, MiB read from the file, stall time, re-run passes. Then `bench decode` rows of
# models/default.edm with and without --block-experts (tokens/s and AR NLL of the outputs).
#
# On this machine: cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff
#   target/release/edgediff; on the GPU machine (run tool, carry [".bin", ".gl"]):
#   bash scripts/device-block-experts.sh            (OUT is set by the device tool)
#   env: EDGEDIFF (binary), OUT (/tmp/edgediff-block-experts), WORK (/tmp/edgediff-paging-work; the
#   ~8 GB model is made there once and reused), NS ("64 32 16"), POOLS ("25% 12.5%"), NEW (16),
#   BLOCK (16), BUDGET (seconds for the whole script, 560), STEP (seconds per decode, 90), LAYERS (20),
#   DEFAULT (1: also bench decode models/default.edm exact / N = 8 / N = 4), DISK (0; 1: first time
#   cold reads of the whole file, buffered / O_DIRECT / 8 O_DIRECT readers: the flash bound)
# Within one 10-minute command: POOLS=25% first (it also makes the model), then POOLS=12.5% DEFAULT=0.
# Locally on lavapipe, tiny: LAYERS=2 NS=16 POOLS=12.5% NEW=4 OUT=/tmp/bx bash scripts/device-block-experts.sh
# Writes $OUT/steps.txt (every step's output), $OUT/summary.md (one row per run), devices.txt, log.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
BIN=${EDGEDIFF:-}
for b in .bin/edgediff target/release/edgediff; do
  [[ -z "$BIN" && -x "$b" ]] && BIN=$b
done
[[ -n "$BIN" ]] || { echo "no edgediff binary (.bin/edgediff, target/release/edgediff or EDGEDIFF)" >&2; exit 1; }
OUT=${OUT:-/tmp/edgediff-block-experts}
WORK=${WORK:-/tmp/edgediff-paging-work}
NS=${NS:-64 32 16}
POOLS=${POOLS:-25% 12.5%}
NEW=${NEW:-16}
BLOCK=${BLOCK:-16}
BUDGET=${BUDGET:-560}
STEP=${STEP:-90}
LAYERS=${LAYERS:-20}
mkdir -p "$OUT" "$WORK"
source scripts/lib/device-vulkan.sh
LOG=$OUT/log.txt
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$LOG" >&2; }
left() { echo $((BUDGET - (SECONDS - T0))); }
# step LIMIT NAME CMD...: CMD with at most LIMIT seconds (less when the budget is shorter).
step() {
  local limit=$1 name=$2
  shift 2
  local l; l=$(left)
  ((l < limit)) && limit=$l
  if ((limit < 5)); then log "$name: skipped (budget spent)"; return 1; fi
  log "$name (≤ ${limit}s): $*"
  echo "=== $name: $*" >> "$OUT/steps.txt"
  timeout "$limit" "$@" > "$OUT/step.out" 2>&1
  local rc=$?
  cat "$OUT/step.out" >> "$OUT/steps.txt"
  log "$name: exit $rc"
  return $rc
}
# drop FILE: evicts FILE's pages from the page cache (GNU dd: posix_fadvise DONTNEED on the whole
# file); reports the cached share before and after when fincore exists.
drop() {
  local before after
  before=$(fincore -nb -o RES "$1" 2>/dev/null | tr -d ' ')
  sync "$1" 2>/dev/null
  dd if="$1" iflag=nocache count=0 status=none
  after=$(fincore -nb -o RES "$1" 2>/dev/null | tr -d ' ')
  log "dropped $1 from the page cache (resident bytes ${before:-?} -> ${after:-?})"
}
"$BIN" devices > "$OUT/devices.txt" 2>&1 || true
FULL=$WORK/llada2-mini-${LAYERS}l-q4.edm
if [ ! -f "$FULL" ]; then
  step 240 synth "$BIN" synth --arch llada2_moe --preset llada2-mini --layers "$LAYERS" --dtype q4 \
    -o "$FULL.part" && mv "$FULL.part" "$FULL"
fi
[ -f "$FULL" ] || { log "no model"; exit 1; }
# The machine's flash bound for cold paging (DISK=1): the model file read whole from a cold page
# cache, buffered (one dd, 16 MiB reads, the kernel's read-ahead), direct (O_DIRECT, no page
# cache), and direct by 8 readers of disjoint eighths at once (a deep queue): GB/s each.
if [[ ${DISK:-0} == 1 ]]; then
  size=$(stat -c %s "$FULL")
  gbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", b / s / 1e9 }'; }
  timed() { local t0 t1; t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N); awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'; }
  drop "$FULL"
  s1=$(timed dd if="$FULL" of=/dev/null bs=16M status=none)
  drop "$FULL"
  s2=$(timed dd if="$FULL" of=/dev/null bs=16M iflag=direct status=none)
  drop "$FULL"
  per=$(( (size / 8 / 16777216) + 1 ))
  par() { for i in 0 1 2 3 4 5 6 7; do dd if="$FULL" of=/dev/null bs=16M iflag=direct skip=$((i * per)) count=$per status=none & done; wait; }
  s3=$(timed par)
  {
    echo "| read of the $((size / 1000000)) MB model file, cold | seconds | GB/s |"
    echo "|---|---:|---:|"
    echo "| buffered, one reader (16 MiB reads) | $s1 | $(gbps "$size" "$s1") |"
    echo "| O_DIRECT, one reader (16 MiB reads) | $s2 | $(gbps "$size" "$s2") |"
    echo "| O_DIRECT, 8 readers of disjoint eighths | $s3 | $(gbps "$size" "$s3") |"
  } | tee "$OUT/disk.md" | tee -a "$LOG"
fi
echo "| pool | N | cache | tokens/s | passes | hits | misses | hit rate | MiB read | stall ms | re-runs |" > "$OUT/summary.md"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" >> "$OUT/summary.md"
row() { # row POOL N CACHE: one summary line from the last step's output
  local tps passes hits misses rate mib stall rerun
  tps=$(grep -o '[0-9.]* tokens/s' "$OUT/step.out" | tail -1 | cut -d' ' -f1)
  passes=$(grep -o 'forward passes [0-9]*' "$OUT/step.out" | tail -1 | awk '{print $3}')
  read -r hits misses rate mib stall rerun < <(grep '^experts:' "$OUT/step.out" | tail -1 |
    sed -E 's/experts: ([0-9]+) hits, ([0-9]+) misses \(([0-9.]+) % hit rate\).* ([0-9.]+) MiB read from flash, ([0-9.]+) ms stalled, ([0-9]+) passes re-run.*/\1 \2 \3 \4 \5 \6/')
  echo "| $1 | $2 | $3 | ${tps:-—} | ${passes:-—} | ${hits:-—} | ${misses:-—} | ${rate:-—} % | ${mib:-—} | ${stall:-—} | ${rerun:-—} |" >> "$OUT/summary.md"
}
PROMPT="The history of the town"
for pool in $POOLS; do
  for n in exact $NS; do
    flag=()
    [[ $n == exact ]] || flag=(--block-experts "$n")
    for cache in cold warm; do
      [[ $cache == cold ]] && drop "$FULL"
      step "$STEP" "mini $pool N=$n $cache" "$BIN" generate --model "$FULL" --backend gpu --stats \
        --expert-memory "$pool" --block-size "$BLOCK" --max-tokens "$NEW" --ignore-eos \
        "${flag[@]}" "$PROMPT"
      row "$pool" "$n" "$cache"
    done
  done
done
# The trained default model: decode speed and the AR NLL of the outputs, exact vs block-routed
# (DEFAULT=0 skips it, e.g. in a second run for another pool).
for n in exact 8 4; do
  [[ ${DEFAULT:-1} == 0 ]] && break
  flag=()
  [[ $n == exact ]] || flag=(--block-experts "$n")
  step 60 "default bench decode N=$n" "$BIN" bench decode --backend gpu --model models/default.edm \
    --max-tokens 64 --thresholds 0.9 --betas 1 "${flag[@]}"
done
log "done"
cat "$OUT/summary.md" | tee -a "$LOG"
