#!/usr/bin/env bash
# A bounded load test of `edgediff serve` on this machine: starts the server on a free 127.0.0.1
# port, runs STREAMS concurrent streaming clients back to back for SECONDS (tests/serve/load.py,
# Python standard library only), stops the server. Reports failures, aggregate tokens/s, p50/p99
# time to first token, time per output token and gap between streamed pieces, and the server's RSS
# at the start (after one warm-up request) and the end. Fails on any failed request, or when the
# RSS grew by more than RSS_GROWTH_MIB (default 64) — it must stay flat.
#
#   bash scripts/serve-load.sh [STREAMS=8] [SECONDS=20]
# Knobs (environment): MODEL (default models/default.edm), BACKEND (cpu), DECODER (ar; block,
# speculative, bidirectional, default), MAX_TOKENS (32), MAX_BATCH (= STREAMS), SERVE_ARGS (more
# serve flags, e.g. "--pass-sequences 1" for the unbatched baseline), EDGEDIFF (the binary;
# default: build target/release/edgediff), OUT (a directory for load.json and serve.log).
# Also prints the mean batched pass (sequences and rows a pass) from /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
streams=${1:-8}
seconds=${2:-20}
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target=$root/$target ;; esac
bin=${EDGEDIFF:-}
if [ -z "$bin" ]; then
  # The whole workspace, as scripts/test.sh's `cargo test --workspace` built it: a narrower package set
  # resolves some dependencies' features differently (kernel-stats turns on ash's defaults under
  # wgpu-hal), so it would compile wgpu and the runtime a second time (≈ 1.5–3 min of CI on 2 cores).
  cargo build -q --release --workspace
  bin=$target/release/edgediff
fi
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

"$bin" serve --model "${MODEL:-models/default.edm}" --backend "${BACKEND:-cpu}" --port 0 \
  --max-batch "${MAX_BATCH:-$streams}" --max-queue $((streams * 2)) --max-tokens 1024 \
  ${SERVE_ARGS:-} 2>"$out/serve.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
url=
for _ in $(seq 3000); do
  url=$(grep -o 'listening on http://[0-9.:]*' "$out/serve.log" | sed 's/listening on //' || true)
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$out/serve.log" >&2; echo "serve-load: the server did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "serve-load: no address after 300 s" >&2; exit 1; }

py=${PYTHON:-python3}
# Warm-up (first-pass allocations, pipeline compilation on the GPU), then the measured run.
"$py" tests/serve/load.py --url "$url" --streams 1 --seconds 0.1 --max-tokens 8 \
  --decoder "${DECODER:-ar}" --label warm-up >/dev/null
rc=0
"$py" tests/serve/load.py --url "$url" --streams "$streams" --seconds "$seconds" \
  --max-tokens "${MAX_TOKENS:-32}" --decoder "${DECODER:-ar}" --ignore-eos --pid "$pid" \
  --label "${LABEL:-serve-load}" --json "$out/load.json" || rc=$?
"$py" tests/serve/batch_stats.py --url "$url" || rc=$?
growth=$("$py" -c 'import json,sys; s=json.load(open(sys.argv[1])); print(((s["rss_kib_end"] or 0)-(s["rss_kib_start"] or 0))//1024)' "$out/load.json")
if [ "$growth" -gt "${RSS_GROWTH_MIB:-64}" ]; then
  echo "serve-load: the server's RSS grew by $growth MiB (limit ${RSS_GROWTH_MIB:-64})" >&2
  rc=1
fi
exit $rc
