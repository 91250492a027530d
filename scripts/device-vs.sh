#!/usr/bin/env bash
# edgediff side by side with PyTorch/transformers and llama.cpp on the GPU machine (issue 13's
# targets), one model for all three: Qwen3-30B-A3B's layer shapes (hidden 2048, 32 q / 4 kv heads
# of 128, 128 experts top-8 of width 768, vocabulary 151936) with LAYERS (4) of its 48 layers,
# random weights (`synth --arch qwen3_moe --hf-out`: the same weights as a Hugging Face checkpoint).
#   1. forward pass, T new tokens after CONTEXT (1024) cached positions, T in TOKENS (1,16,32):
#      transformers eager in f16 on cuda (scripts/vs/torch_forward.py: CUDA events, median of
#      ITERS) vs `edgediff bench forward` on the same weights in f16 (GPU backend, Vulkan);
#   2. AR decoding, tokens/s: llama.cpp's Vulkan backend, built here from source (.vs/, made by
#      scripts/vs/pack.sh), on the checkpoint converted by llama.cpp's convert_hf_to_gguf.py and
#      quantized to Q4_0 by llama-quantize (`llama-bench -p 0 -n 128 -ngl 99`, plus pp16/pp32)
#      vs `edgediff generate --decoder ar --max-tokens 128` on that same Q4_0 file converted by
#      `edgediff convert` (so both read the same quantized weights), and the f16 pair.
# Phases (one device call each, back to back; /tmp/vs persists while the machine is warm):
#   bash scripts/device-vs.sh build   carry [".bin/edgediff", ".gl", ".vs"]   (~5 min: llama.cpp
#                                      build in parallel with synth + conversions)
#   bash scripts/device-vs.sh run     carry [".bin/edgediff", ".gl"]          (~4 min)
#   or `all` for both in one call. Results: $OUT/vs.md (tables), $OUT/vs.log, $OUT/build.log.
#   SKIP_TORCH=1 leaves out part 1 (transformers and edgediff's f16 forward passes) and QUANTS
#   (default "q4_0 f16") names the GGUF types of part 2: `SKIP_TORCH=1 QUANTS=q4_0 … all` is the
#   llama.cpp comparison alone (≈ 5 minutes, most of it the llama.cpp build).
# Locally (plumbing; CPU llama.cpp, lavapipe edgediff, torch on the CPU, a 2-layer small shape):
#   SMALL=1 LLAMA_VULKAN=0 TORCH_DEVICE=cpu EDGEDIFF=target/release/edgediff PY=/work/venv-zaya/bin/python \
#     OUT=/tmp/vs-out bash scripts/device-vs.sh all
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PHASE=${1:-all}
OUT=${OUT:-/tmp/edgediff-vs}
W=${VS_WORK:-/tmp/vs}
PY=${PY:-python3}
BIN=${EDGEDIFF:-$ROOT/.bin/edgediff}
LAYERS=${LAYERS:-4}
TOKENS=${TOKENS:-1,16,32}
CONTEXT=${CONTEXT:-1024}
ITERS=${ITERS:-10}
TORCH_DEVICE=${TORCH_DEVICE:-cuda}
LLAMA_VULKAN=${LLAMA_VULKAN:-1}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT" "$W"
R="$OUT/vs.md"
L="$OUT/vs.log"
T0=$SECONDS
log() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$L" >&2; }
[[ -d .gl ]] && source scripts/lib/device-vulkan.sh
if [[ -n "${SMALL:-}" ]]; then
  SHAPE=(--arch qwen3_moe --layers 2 --hidden 256 --heads 4 --kv-heads 2 --head-dim 64 --experts 16
    --top-k 4 --expert-ffn 128 --vocab 4096)
  CONTEXT=${SMALL_CONTEXT:-64}
else
  SHAPE=(--arch qwen3_moe --layers "$LAYERS" --hidden 2048 --heads 32 --kv-heads 4 --head-dim 128
    --experts 128 --top-k 8 --expert-ffn 768 --vocab 151936 --max-position 4096)
fi
LLAMA=$W/llama.cpp
LB=$LLAMA/build

build_llama() {
  [[ -x "$LB/bin/llama-bench" ]] && { log "llama.cpp already built"; return 0; }
  [[ -f .vs/llama.cpp.tar.xz ]] || { log "no .vs/llama.cpp.tar.xz (run scripts/vs/pack.sh here, carry .vs)"; return 1; }
  rm -rf "$LLAMA" "$W/sdk" && mkdir -p "$W/sdk"
  tar -xJf .vs/llama.cpp.tar.xz -C "$W" && tar -xJf .vs/vulkan-sdk.tar.xz -C "$W/sdk"
  local sdk=$W/sdk/usr vk=() glslc=$W/sdk/usr/bin/glslc glslib=$W/sdk/usr/lib/x86_64-linux-gnu
  # trixie's glslc (knows the cooperative-matrix / integer-dot extensions) where this glibc runs it
  if LD_LIBRARY_PATH=$W/sdk/new/usr/lib/x86_64-linux-gnu "$W/sdk/new/usr/bin/glslc" --version >/dev/null 2>&1; then
    glslc=$W/sdk/new/usr/bin/glslc glslib=$W/sdk/new/usr/lib/x86_64-linux-gnu
  fi
  log "glslc: $(LD_LIBRARY_PATH=$glslib "$glslc" --version 2>&1 | head -1) ($glslc)"
  export LD_LIBRARY_PATH=$glslib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if [[ "$LLAMA_VULKAN" == 1 ]]; then
    local lib
    lib=$(ldconfig -p | awk '/libvulkan.so.1 /{print $NF; exit}')
    vk=(-DGGML_VULKAN=ON -DVulkan_INCLUDE_DIR="$sdk/include" -DVulkan_LIBRARY="${lib:-/usr/lib/x86_64-linux-gnu/libvulkan.so.1}"
      -DVulkan_GLSLC_EXECUTABLE="$glslc" -DCMAKE_PREFIX_PATH="$sdk")
  fi
  cmake -S "$LLAMA" -B "$LB" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF "${vk[@]}" >"$OUT/build.log" 2>&1 || { log "llama.cpp configure failed"; return 1; }
  grep -E "supported by glslc|Including" "$OUT/build.log" | tee -a "$L" >&2
  ninja -C "$LB" -j "$JOBS" llama-bench llama-quantize >>"$OUT/build.log" 2>&1 \
    || { log "llama.cpp build failed (tail of build.log:)"; tail -20 "$OUT/build.log" >>"$L"; return 1; }
  log "llama.cpp built"
}

# The model: HF checkpoint (f32) + edgediff f16 file from one synth; llama.cpp's GGUF f16 and Q4_0
# from the checkpoint; edgediff's q4 file from that Q4_0 GGUF.
make_models() {
  if [[ ! -f "$W/q3-f16.edm" ]]; then
    "$BIN" synth "${SHAPE[@]}" --dtype f16 --hf-out "$W/hf" -o "$W/q3-f16.edm" >>"$L" 2>&1 \
      || { log "synth failed"; return 1; }
    log "synth done: $(du -sh "$W/hf" | cut -f1) checkpoint, $(du -sh "$W/q3-f16.edm" | cut -f1) f16 .edm"
  fi
}

gguf_models() {
  [[ -f "$W/q3-q4_0.edm" ]] && return 0
  [[ -f "$LLAMA/convert_hf_to_gguf.py" ]] || { log "no llama.cpp source for the GGUF conversion"; return 1; }
  "$PY" scripts/vs/hf_to_gguf.py "$LLAMA" "$W/hf" --outfile "$W/q3-f16.gguf" --outtype f16 >>"$L" 2>&1 \
    || { log "convert_hf_to_gguf failed"; return 1; }
  "$LB/bin/llama-quantize" "$W/q3-f16.gguf" "$W/q3-q4_0.gguf" Q4_0 "$JOBS" >>"$L" 2>&1 \
    || { log "llama-quantize failed"; return 1; }
  "$BIN" convert "$W/q3-q4_0.gguf" -o "$W/q3-q4_0.edm" >>"$L" 2>&1 || { log "edgediff convert of the GGUF failed"; return 1; }
  log "GGUF f16 $(du -sh "$W/q3-f16.gguf" | cut -f1), Q4_0 $(du -sh "$W/q3-q4_0.gguf" | cut -f1), .edm from it $(du -sh "$W/q3-q4_0.edm" | cut -f1)"
}

run_all() {
  : >"$R"
  make_models || return 1
  echo "# edgediff vs PyTorch/transformers vs llama.cpp: ${SHAPE[*]}" >>"$R"
  echo >>"$R"
  [[ -n "${SKIP_TORCH:-}" ]] || forward_pair
  gguf_models || return 1
  for m in ${QUANTS:-q4_0 f16}; do
    decode_pair "$m"
  done
}

# Part 1: T-token forward passes, transformers and edgediff on the same f16 weights.
forward_pair() {
  echo "## 1. Forward pass, f16, T tokens after $CONTEXT cached: transformers (eager, $TORCH_DEVICE)" >>"$R"
  timeout 300 "$PY" scripts/vs/torch_forward.py "$W/hf" --tokens "$TOKENS" --context "$CONTEXT" \
    --iters "$ITERS" --dtype float16 --device "$TORCH_DEVICE" --json-out "$OUT/torch.json" >>"$R" 2>>"$L"
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
  echo >>"$R"
  echo "## 1. The same, edgediff (GPU backend), the same weights in f16" >>"$R"
  timeout 200 "$BIN" bench forward --model "$W/q3-f16.edm" --tokens "$TOKENS" --context "$CONTEXT" \
    --iters "$ITERS" --copy-mib 0 >>"$R" 2>>"$L"
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
}

# Part 2 for GGUF type $1: llama-bench against edgediff's AR decoding on the same weights.
decode_pair() {
  local m=$1 edm=$W/q3-$1.edm
  [[ $m == f16 ]] && edm=$W/q3-f16.edm
  echo >>"$R"
  echo "## 2. AR decoding, $m: llama.cpp (llama-bench, -ngl 99)" >>"$R"
  timeout 200 "$LB/bin/llama-bench" -m "$W/q3-$m.gguf" -ngl 99 -p 16,32 -n 128 -r 3 >>"$R" 2>>"$L"
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
  echo "## 2. AR decoding, $m: edgediff (generate --decoder ar --backend gpu, 128 tokens)" >>"$R"
  for i in 1 2; do
    timeout 120 "$BIN" generate --model "$edm" --backend gpu --decoder ar --max-tokens 128 \
      --ignore-eos --stats "Once upon a time" >/dev/null 2>>"$R"
  done
  echo "exit $? at $((SECONDS - T0)) s" >>"$R"
}

case "$PHASE" in
  build)
    make_models & M=$!
    build_llama; b=$?
    wait $M; m=$?
    (( b == 0 && m == 0 )) && gguf_models
    ;;
  run) run_all ;;
  all)
    make_models & M=$!
    build_llama
    wait $M
    run_all
    ;;
  *) echo "usage: device-vs.sh build|run|all" >&2; exit 2 ;;
esac
rc=$?
log "done ($PHASE), exit $rc"
[[ -f "$R" ]] && cat "$R"
exit $rc
