#!/usr/bin/env bash
# All tests: first what a fresh Debian machine lacks (scripts/test-deps.sh: lavapipe, the Vulkan
# loader, a JDK and Maven, installed with apt-get when it can, else one line naming them), then the
# Rust workspace (unit, integration, GPU kernels on whatever adapter exists — lavapipe in CI), then
# the Kotlin binding test on the JVM, the server with the official openai Python client, and a short
# load test of the server (127.0.0.1 only, 8 streams for 20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
cargo test --workspace --release
if [ -x bindings/scripts/jvm-test.sh ]; then
  bash bindings/scripts/jvm-test.sh
fi
bash scripts/serve-openai-test.sh
bash scripts/serve-load.sh 8 20
