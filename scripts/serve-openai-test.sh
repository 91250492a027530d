#!/usr/bin/env bash
# `edgediff serve` with the official `openai` Python package as the client
# (tests/serve/openai_client.py): builds the release CLI, installs `openai` into a venv under
# ~/.cache (EDGEDIFF_PY_VENV to move it; pip reaches PyPI once, later runs reuse it), starts the
# server on a free 127.0.0.1 port with an API key and the CPU backend on the default model, runs the
# client and stops the server. Part of scripts/test.sh.
#
#   bash scripts/serve-openai-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target=$root/$target ;; esac

# The whole workspace, as scripts/test.sh's `cargo test --workspace` built it: a narrower package set
# resolves some dependencies' features differently (kernel-stats turns on ash's defaults under
# wgpu-hal), so it would compile wgpu and the runtime a second time (≈ 1.5–3 min of CI on 2 cores).
cargo build -q --release --workspace
venv=${EDGEDIFF_PY_VENV:-$HOME/.cache/edgediff/openai-venv}
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  echo "serve-openai-test: installing the openai package into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40,<4'
fi

tmp=$(mktemp -d)
key="test-key-$RANDOM$RANDOM"
"$target/release/edgediff" serve --backend cpu --port 0 --api-key "$key" --max-tokens 64 \
  --max-batch 4 2>"$tmp/serve.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT
url=
for _ in $(seq 600); do
  url=$(grep -o 'listening on http://[0-9.:]*' "$tmp/serve.log" | sed 's/listening on //' || true)
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$tmp/serve.log" >&2; echo "serve-openai-test: the server did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { cat "$tmp/serve.log" >&2; echo "serve-openai-test: no address after 60 s" >&2; exit 1; }
EDGEDIFF_URL=$url EDGEDIFF_KEY=$key "$venv/bin/python" tests/serve/openai_client.py
