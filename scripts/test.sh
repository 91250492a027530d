#!/usr/bin/env bash
# All tests: the Rust workspace (unit, integration, GPU kernels on whatever adapter exists — lavapipe
# in CI), then the Kotlin binding test on the JVM when bindings are present.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
if [ -x bindings/scripts/jvm-test.sh ]; then
  bash bindings/scripts/jvm-test.sh
fi
