#!/usr/bin/env bash
# `edgediff serve` under load on the GPU machine (issue 16's benchmark): aggregate tokens/s and
# latency at 1, 4, 16 and 64 concurrent streams, AR and block diffusion per stream, on
#   - models/default.edm, and
#   - a LLaDA2.0-mini-shaped synthetic model (synth --preset llada2-mini, q4, MOE_LAYERS layers,
#     default 4 as in device-bench.sh; synthesized there with the carried binary).
# One server per model (--max-batch 64, GPU backend); each point is tests/serve/load.py for
# SECONDS_PER_POINT (default 10; requests in flight then finish) with every request generating
# MAX_TOKENS (default 32, EOS ignored). The sequences in flight share batched forward passes
# (continuous batching, runtime/src/batch.rs; on the GPU AR passes batch, and diffusion-block
# passes batch with passes whose row counts choose the same kernels, ops/batch_class.rs); each row
# reports the mean batched pass of its point (sequences / rows a pass, from /metrics). BASELINE=1
# adds, on the LLaDA2.0-mini shape and from the same binary, side by side: the unbatched baseline
# (--pass-sequences 1: one sequence a pass, AR and block) and the block decoder with block passes
# kept apart as before exact block batching (EDGEDIFF_BATCH_BLOCKS=0: only AR-sized passes batch),
# and both decoders with every cache in buffers of its own (EDGEDIFF_KV_ARENA=0: attention one
# sequence at a time, as before the KV arena).
# Results: $OUT/serve-bench.md (table), $OUT/<model>-<decoder>-<streams>.json, serve-*.log,
# log.txt; on the GPU first $OUT/bench-batch.md (`bench batch` on the LLaDA2.0-mini shape: S
# sequences' 1/16/32-token passes one after another vs one batched pass, exact or the run fails;
# BENCH_BATCH=0 skips it). Each point has a time limit; the whole run should take ~7 minutes on
# the H200 (to split it, STREAMS="1 4" and STREAMS="16 64" in two runs); exit status = failed
# points.
#
# On this machine (the release binary, stripped, carried as .bin/edgediff; .gl: Vulkan loader debs):
#   cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff target/release/edgediff
# On the device (run tool, carry [".bin", ".gl"]):
#   bash scripts/device-serve-bench.sh
# Locally (lavapipe or CPU, tiny): STREAMS="1 2" SECONDS_PER_POINT=3 MAX_TOKENS=8 BACKEND=cpu SYNTH_QUICK=1 \
#   OUT=/tmp/sb bash scripts/device-serve-bench.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT="${OUT:-/tmp/edgediff-serve-bench}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
START=$(date +%s)
FAILED=0
STREAMS="${STREAMS:-1 4 16 64}"
SECS="${SECONDS_PER_POINT:-10}"
MAX_TOKENS="${MAX_TOKENS:-32}"
BACKEND="${BACKEND:-gpu}"
LAYERS="${MOE_LAYERS:-4}"
PY="${PYTHON:-python3}"

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG" >&2; }

BIN="${EDGEDIFF:-}"
for b in target/release/edgediff .bin/edgediff; do
  [[ -z "$BIN" && -x "$b" ]] && BIN="$b"
done
[[ -n "$BIN" ]] || { log "no edgediff binary (.bin/edgediff or target/release/edgediff; or set EDGEDIFF)"; exit 1; }

source scripts/lib/device-vulkan.sh
if [[ "${VK_DRIVER_FILES:-}" == "$NV_ICD" ]]; then
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

MODEL_DIR="${TMPDIR:-/tmp}/edgediff-serve-bench"
mkdir -p "$MODEL_DIR"
SYN="$MODEL_DIR/llada2-mini-${LAYERS}l-q4.edm"
SYNTH_SHAPE=()
if [[ "${SYNTH_QUICK:-0}" == 1 ]]; then
  SYN="$MODEL_DIR/llada2-mini-quick.edm"
  SYNTH_SHAPE=(--hidden 256 --heads 4 --kv-heads 2 --head-dim 64 --experts 32 --top-k 8
    --expert-ffn 128 --dense-ffn 512 --vocab 4096 --tokenizer-vocab 1024)
  LAYERS=2
fi
if [[ ! -f "$SYN" ]]; then
  log "synth: llada2-mini, $LAYERS layers, q4"
  timeout 150 "$BIN" synth --arch llada2_moe --preset llada2-mini --layers "$LAYERS" \
    "${SYNTH_SHAPE[@]}" --dtype q4 -o "$SYN" >/dev/null 2>>"$LOG" || { log "synth failed"; FAILED=$((FAILED + 1)); }
fi

# The batched pass itself (GPU only): S sequences' passes one after another against one batched
# pass, exactness checked (bench batch; the command fails if a batched pass differs).
if [[ "$BACKEND" == gpu && -f "$SYN" && "${BENCH_BATCH:-1}" == 1 ]]; then
  log "bench batch: $SYN"
  timeout 300 "$BIN" bench batch --model "$SYN" --tokens "${BATCH_TOKENS:-1,16,32}" \
    --sequences "${BATCH_SEQUENCES:-1,4,16}" --context "${BATCH_CONTEXT:-512}" --iters 5 \
    --copy-mib 0 --shapes ${BATCH_FLAGS:-} >"$OUT/bench-batch.md" 2>>"$LOG" || { log "bench batch failed"; FAILED=$((FAILED + 1)); }
  cat "$OUT/bench-batch.md" >>"$LOG"
  if [[ -n "${VARIANT_ENV:-}" ]]; then
    log "bench batch with $VARIANT_ENV"
    env $VARIANT_ENV timeout 300 "$BIN" bench batch --model "$SYN" --tokens "${BATCH_TOKENS:-1,16,32}" \
      --sequences "${BATCH_SEQUENCES:-1,4,16}" --context "${BATCH_CONTEXT:-512}" --iters 5 \
      --copy-mib 0 ${BATCH_FLAGS:-} >"$OUT/bench-batch-variant.md" 2>>"$LOG" || { log "bench batch (variant) failed"; FAILED=$((FAILED + 1)); }
    cat "$OUT/bench-batch-variant.md" >>"$LOG"
  fi
fi

printf '| model | decoder | streams | requests | failed | tokens/s | TTFT p50 / p99 ms | per token p50 / p99 ms | piece gap p50 / p99 ms | RSS MiB start → end | pass: sequences / rows |\n|---|---|---|---|---|---|---|---|---|---|---|\n' >"$OUT/serve-bench.md"

# bench_model NAME MODEL [DECODERS] [extra serve flags...]; SERVE_ENV: VAR=value for the server.
bench_model() {
  local name=$1 model=$2 decoders=${3:-ar block}
  shift 3 2>/dev/null || shift $#
  [[ -f "$model" ]] || { log "$name: no model at $model"; FAILED=$((FAILED + 1)); return; }
  local slog="$OUT/serve-$name.log"
  env ${SERVE_ENV:-} "$BIN" serve --model "$model" --backend "$BACKEND" --port 0 --max-batch 64 --max-queue 256 \
    --kv-memory 16GiB --max-tokens 1024 "$@" 2>"$slog" &
  local pid=$! url=
  for _ in $(seq 1200); do
    url=$(grep -o 'listening on http://[0-9.:]*' "$slog" | sed 's/listening on //' || true)
    [[ -n "$url" ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -z "$url" ]]; then
    log "$name: the server did not start (see $slog)"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    FAILED=$((FAILED + 1))
    return
  fi
  log "$name: $(head -1 "$slog")"
  for decoder in $decoders; do
    # Warm-up: pipelines and first allocations for this decoder's pass shapes.
    timeout 120 "$PY" tests/serve/load.py --url "$url" --streams 1 --seconds 0.1 --max-tokens 8 \
      --decoder "$decoder" --label warm-up >/dev/null 2>>"$LOG"
    for n in $STREAMS; do
      local j="$OUT/$name-$decoder-$n.json"
      log "$name $decoder $n streams"
      "$PY" tests/serve/batch_stats.py --url "$url" --save "$OUT/.metrics-before" >/dev/null 2>>"$LOG"
      if ! timeout $((SECS + 120)) "$PY" tests/serve/load.py --url "$url" --streams "$n" \
        --seconds "$SECS" --max-tokens "$MAX_TOKENS" --decoder "$decoder" --ignore-eos --pid "$pid" \
        --timeout 100 --label "$name $decoder x$n" --json "$j" >>"$LOG" 2>&1; then
        FAILED=$((FAILED + 1))
      fi
      "$PY" tests/serve/batch_stats.py --url "$url" --since "$OUT/.metrics-before" --json \
        >"$j.batch" 2>>"$LOG" || echo '{}' >"$j.batch"
      [[ -f "$j" ]] && "$PY" - "$j" "$name" "$j.batch" >>"$OUT/serve-bench.md" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
b = json.load(open(sys.argv[3]))
mib = lambda k: "?" if k is None else f"{k / 1024:.0f}"
print(f"| {sys.argv[2]} | {s['decoder']} | {s['streams']} | {s['requests_ok']} | {s['failures']} | "
      f"{s['tokens_per_second']} | {s['ttft_ms_p50']} / {s['ttft_ms_p99']} | {s['tpot_ms_p50']} / {s['tpot_ms_p99']} | "
      f"{s['piece_gap_ms_p50']} / {s['piece_gap_ms_p99']} | {mib(s['rss_kib_start'])} → {mib(s['rss_kib_end'])} | "
      f"{b.get('mean_sequences', '?')} / {b.get('mean_rows', '?')} |")
PYEOF
    done
  done
  curl -s "$url/metrics" >"$OUT/metrics-$name.txt" 2>/dev/null || true
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

# MODELS picks the servers (default "default llada2-mini"), DECODERS the decoders (default "ar block").
# VARIANT_ENV="VAR=value ..." adds, on the LLaDA2.0-mini shape, a server run with those knobs, side by
# side with the plain one in the same call (named llada2-mini+variant). HOST_STEPS=1 adds, for each
# model, a server with --device-steps host (named <model>-host-steps): every AR token a host round
# trip, as before batched AR steps chained on the device.
for m in ${MODELS:-default llada2-mini}; do
  case $m in
  default) path=models/default.edm ;;
  llada2-mini) path="$SYN" ;;
  *) log "unknown model $m (MODELS: default, llada2-mini)"; FAILED=$((FAILED + 1)); continue ;;
  esac
  bench_model "$m" "$path" "${DECODERS:-ar block}"
  if [[ "${HOST_STEPS:-0}" == 1 ]]; then
    bench_model "$m-host-steps" "$path" "${DECODERS:-ar block}" --device-steps host
  fi
done
if [[ -n "${VARIANT_ENV:-}" ]]; then
  SERVE_ENV="$VARIANT_ENV" bench_model llada2-mini+variant "$SYN" "${DECODERS:-ar block}"
fi
if [[ "${BASELINE:-0}" == 1 ]]; then
  bench_model llada2-mini-unbatched "$SYN" "ar block" --pass-sequences 1
  SERVE_ENV=EDGEDIFF_BATCH_BLOCKS=0 bench_model llada2-mini-blocks-apart "$SYN" block
  SERVE_ENV=EDGEDIFF_KV_ARENA=0 bench_model llada2-mini-own-caches "$SYN"
fi

log "done in $(($(date +%s) - START))s, $FAILED failed point(s)"
cat "$OUT/serve-bench.md" | tee -a "$LOG" >&2
exit "$FAILED"
