#!/usr/bin/env bash
# Builds libedgediff_ffi.so for Android with cargo-ndk into the library's jniLibs, and generates the
# Kotlin bindings the library compiles. Run from anywhere; then build with Gradle (android/README.md).
#
#   bash android/scripts/build-jni.sh            # arm64-v8a and x86_64
#   ABIS="arm64-v8a" bash android/scripts/build-jni.sh
#
# Needs an Android NDK (r26 or newer) in ANDROID_NDK_HOME, cargo-ndk (`cargo install cargo-ndk`)
# and the Rust targets (added below).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME to an Android NDK (r26 or newer)}"
command -v cargo-ndk >/dev/null || { echo "cargo-ndk is missing: cargo install cargo-ndk" >&2; exit 1; }

abis=${ABIS:-"arm64-v8a x86_64"}
targets=()
ndk_args=()
for abi in $abis; do
  case "$abi" in
    arm64-v8a) targets+=(aarch64-linux-android) ;;
    x86_64) targets+=(x86_64-linux-android) ;;
    *) echo "unsupported ABI '$abi' (arm64-v8a, x86_64)" >&2; exit 2 ;;
  esac
  ndk_args+=(-t "$abi")
done
rustup target add "${targets[@]}"

# Phones get no debug info (the workspace's release profile keeps it for host profiling); the
# dynamic symbol table JNA binds against survives stripping. API 24 matches the library's minSdk.
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo ndk "${ndk_args[@]}" --platform 24 -o android/edgediff/src/main/jniLibs \
  build --release -p edgediff-ffi

# The interface is the same on every target, so the host build's metadata serves Android too.
bash bindings/scripts/generate.sh kotlin android/edgediff/generated/uniffi
find android/edgediff/src/main/jniLibs -name '*.so' -exec ls -l {} \;
