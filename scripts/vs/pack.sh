#!/usr/bin/env bash
# Packs what the GPU machine needs to build llama.cpp from source for the side-by-side run
# (scripts/device-vs.sh), into .vs/ (gitignored; carry it): the GPU machine has CMake, ninja, g++
# and nvcc but no network, no Vulkan headers and no GLSL compiler.
#   .vs/llama.cpp.tar.xz   llama.cpp's source as the PyPI sdist llama_cpp_python==$LCP_VERSION
#                          vendors it (fetched with pip), without docs, test models, examples and
#                          the backends not built there; tools/CMakeLists.txt cut to llama-bench
#                          and llama-quantize
#   .vs/vulkan-sdk.tar.xz  usr/: Debian trixie's Vulkan headers (libvulkan-dev 1.4.309: llama.cpp
#                          needs newer than bookworm's 1.3.239) and spirv-headers (CMake config), and
#                          bookworm's glslc 2023.2 + libshaderc1 (run on glibc 2.34+); new/usr/:
#                          trixie's glslc 2025.2 + libshaderc1 (glibc 2.38+), which knows the
#                          cooperative-matrix and integer-dot GLSL extensions: device-vs.sh takes it
#                          where it runs, else the older one (llama.cpp then builds without them)
# Run here, from the repository root: bash scripts/vs/pack.sh   (needs pip and apt-get download)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LCP_VERSION=${LCP_VERSION:-0.3.36}
grep -qx '/.vs/' .git/info/exclude 2>/dev/null || echo /.vs/ >> .git/info/exclude
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p .vs
python3 -m pip download --quiet --no-deps --no-binary :all: "llama_cpp_python==$LCP_VERSION" -d "$W"
tar -xzf "$W"/llama_cpp_python-"$LCP_VERSION".tar.gz -C "$W"
S="$W/llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
rm -rf "$S"/{docs,models,tests,examples,media,benches,pocs,ci,skills,app,grammars}
for b in "$S"/ggml/src/ggml-*/; do
  case $(basename "$b") in ggml-cpu|ggml-vulkan|ggml-cuda) ;; *) rm -rf "$b" ;; esac
done
for t in "$S"/tools/*/; do
  case $(basename "$t") in llama-bench|quantize) ;; *) rm -rf "$t" ;; esac
done
cat > "$S/tools/CMakeLists.txt" <<'CM'
# Cut by edgediff's scripts/vs/pack.sh: only the tools the side-by-side run uses.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
CM
tar -cJf .vs/llama.cpp.tar.xz -C "$(dirname "$S")" llama.cpp
mkdir -p "$W/deb" "$W/new" "$W/sdk/new"
(cd "$W/deb" && apt-get download glslc libshaderc1 2>/dev/null)
POOL=http://deb.debian.org/debian/pool/main
TRIXIE=(v/vulkan-loader/libvulkan-dev_1.4.309.0-1_amd64.deb s/spirv-headers/spirv-headers_1.6.1+1.4.309.0-1_all.deb)
for f in "${TRIXIE[@]}"; do curl -sfL -o "$W/deb/$(basename "$f")" "$POOL/$f"; done
for f in s/shaderc/glslc_2025.2-1_amd64.deb s/shaderc/libshaderc1_2025.2-1_amd64.deb; do
  curl -sfL -o "$W/new/$(basename "$f")" "$POOL/$f"
done
for f in "$W"/deb/*.deb; do dpkg -x "$f" "$W/sdk"; done
for f in "$W"/new/*.deb; do dpkg -x "$f" "$W/sdk/new"; done
rm -rf "$W/sdk/usr/share/doc" "$W/sdk/usr/share/man" "$W/sdk/new/usr/share"
tar -cJf .vs/vulkan-sdk.tar.xz -C "$W/sdk" usr new
echo "llama.cpp commit: $(cd "$S" && git log -1 --format=%H 2>/dev/null || echo unknown)" > .vs/SOURCE
echo "llama_cpp_python $LCP_VERSION (PyPI sdist); Debian: $(cd "$W/deb" && ls *.deb | tr '\n' ' ')$(cd "$W/new" && ls *.deb | tr '\n' ' ')" >> .vs/SOURCE
du -sh .vs/*
