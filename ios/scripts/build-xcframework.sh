#!/usr/bin/env bash
# Builds EdgeDiffFFI.xcframework (static libraries + C headers + module map) for the Swift package,
# and generates the Swift bindings into Sources/EdgeDiff/Generated. Needs macOS with Xcode and
# rustup. Slices: iOS devices (aarch64-apple-ios), the iOS simulator (aarch64-apple-ios-sim and
# x86_64-apple-ios, one fat library), macOS (aarch64- and x86_64-apple-darwin, one fat library).
#
#   bash ios/scripts/build-xcframework.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(uname -s)" = Darwin ] || { echo "build-xcframework.sh needs macOS with Xcode (xcodebuild, lipo)" >&2; exit 1; }

targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
rustup target add "${targets[@]}"

# Match Package.swift's platforms; apps get no debug info (the workspace's release profile keeps
# it for host profiling).
export IPHONEOS_DEPLOYMENT_TARGET=15.0 MACOSX_DEPLOYMENT_TARGET=12.0 CARGO_PROFILE_RELEASE_DEBUG=false
for t in "${targets[@]}"; do
  cargo build --release -p edgediff-ffi --target "$t"
done

target=${CARGO_TARGET_DIR:-target}
build=ios/build
rm -rf "$build" ios/EdgeDiffFFI.xcframework ios/Sources/EdgeDiff/Generated
mkdir -p "$build/ios-simulator" "$build/macos"
lib=libedgediff_ffi.a
lipo -create "$target/aarch64-apple-ios-sim/release/$lib" "$target/x86_64-apple-ios/release/$lib" \
  -output "$build/ios-simulator/$lib"
lipo -create "$target/aarch64-apple-darwin/release/$lib" "$target/x86_64-apple-darwin/release/$lib" \
  -output "$build/macos/$lib"

# The interface is read from a built library (the same on every slice). A plain `module` map: the
# XCFramework holds libraries with headers, not frameworks. Separate cargo invocation: built with
# edgediff-ffi, uniffi's `cli` feature would reach the library.
meta="$target/aarch64-apple-darwin/release/libedgediff_ffi.dylib"
bindgen=(cargo run -q --release -p uniffi-bindgen --bin uniffi-bindgen-swift --)
"${bindgen[@]}" --headers --modulemap --module-name EdgeDiffFFI --modulemap-filename module.modulemap \
  "$meta" "$build/include"
"${bindgen[@]}" --swift-sources "$meta" ios/Sources/EdgeDiff/Generated

xcodebuild -create-xcframework \
  -library "$target/aarch64-apple-ios/release/$lib" -headers "$build/include" \
  -library "$build/ios-simulator/$lib" -headers "$build/include" \
  -library "$build/macos/$lib" -headers "$build/include" \
  -output ios/EdgeDiffFFI.xcframework
echo "ios/EdgeDiffFFI.xcframework and ios/Sources/EdgeDiff/Generated are ready: swift build --package-path ios" >&2
