#!/usr/bin/env bash
# Generates the Kotlin or Swift bindings of edgediff-ffi, in library mode: the interface is read
# from the built library itself, with the uniffi-bindgen of this workspace (same uniffi version).
#
#   bash bindings/scripts/generate.sh kotlin|swift [out_dir] [library]
#
# out_dir defaults to bindings/generated/<language>; library defaults to a fresh host release build
# (the interface is the same on every target, so the host library serves Android and iOS too).
set -euo pipefail
cd "$(dirname "$0")/../.."

lang=${1:?usage: generate.sh kotlin|swift [out_dir] [library]}
case "$lang" in kotlin | swift) ;; *) echo "unknown language '$lang' (kotlin or swift)" >&2; exit 2 ;; esac
out=${2:-bindings/generated/$lang}
lib=${3:-}

if [ -z "$lib" ]; then
  cargo build -q -p edgediff-ffi --release
  case "$(uname -s)" in Darwin) ext=dylib ;; *) ext=so ;; esac
  lib="${CARGO_TARGET_DIR:-target}/release/libedgediff_ffi.$ext"
fi

mkdir -p "$out"
# Separate invocation: built together with edgediff-ffi, uniffi's `cli` feature would reach the library.
cargo run -q --release -p uniffi-bindgen --bin uniffi-bindgen -- \
  generate --library "$lib" --language "$lang" --out-dir "$out" --no-format
echo "$lang bindings in $out" >&2
