#!/usr/bin/env bash
# The Kotlin SDK tested on the JVM against the real library: builds the host libedgediff_ffi and the
# CLI, generates the Kotlin bindings, writes tiny synthetic models (a qwen3_moe, a diffusion_gemma)
# and runs the Maven project in android/jvm-test (generated bindings + the Android library's
# wrapper + tests). Needs a JDK (17+)
# and Maven; the Kotlin compiler, JNA and kotlinx-coroutines come from Maven Central.
#
#   bash bindings/scripts/jvm-test.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
case "$target" in /*) ;; *) target=$root/$target ;; esac

# The whole workspace, as scripts/test.sh's `cargo test --workspace` built it: a narrower package set
# resolves some dependencies' features differently (kernel-stats turns on ash's defaults under
# wgpu-hal), so it would compile wgpu and the runtime a second time (≈ 1.5–3 min of CI on 2 cores).
cargo build -q --release --workspace
case "$(uname -s)" in Darwin) ext=dylib ;; *) ext=so ;; esac
lib=$target/release/libedgediff_ffi.$ext

jvm=$root/android/jvm-test
generated=$jvm/target/generated-sources/uniffi
rm -rf "$generated"
bash bindings/scripts/generate.sh kotlin "$generated" "$lib"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$target/release/edgediff" synth --arch qwen3_moe --seed 3 -o "$tmp/tiny.edm" >/dev/null
# A DiffusionGemma (canvas of 5) for the canvas decoder's tests.
"$target/release/edgediff" synth --arch diffusion_gemma --seed 3 --block-size 5 -o "$tmp/dg.edm" >/dev/null

cd "$jvm"
mvn -q -B -Dstyle.color=never test \
  -Djna.library.path="$target/release" \
  -Dedgediff.model="$tmp/tiny.edm" \
  -Dedgediff.canvasModel="$tmp/dg.edm" \
  -Duniffi.sources="$generated"
echo "jvm-test: Kotlin SDK tests passed" >&2
