#!/usr/bin/env bash
# Writes small valid model files into fuzz/corpus/edm_open/ as the starting corpus: one per family and
# weight type, with as few layers, experts and vocabulary as synth allows (128–400 KiB each; most of
# it is the 64 KiB alignment of the data section and of each expert). seeds/dense_q8.edm, committed,
# is the first of them. fuzz/corpus/edm_parts/ gets the same models as `header JSON, NUL, data`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=fuzz/corpus/edm_open
mkdir -p "$out"
cargo build -q -p edgediff --bin edgediff
synth() { target/debug/edgediff synth --vocab 264 --tokenizer-vocab 264 --hidden 32 --heads 2 --head-dim 16 "$@"; }
synth --arch qwen3_moe --layers 1 --dense-layers 1 --kv-heads 1 --dense-ffn 32 --experts 2 --top-k 1 \
  --dtype q8 -o "$out/dense_q8.edm"
synth --arch qwen3_moe --layers 1 --dense-layers 0 --kv-heads 1 --experts 2 --top-k 1 --expert-ffn 32 \
  --dtype q4 -o "$out/moe_q4.edm"
synth --arch llada2_moe --layers 2 --dense-layers 1 --kv-heads 1 --experts 4 --top-k 2 --expert-ffn 32 \
  --dense-ffn 32 --shared-experts 1 --dtype f16 -o "$out/llada2_f16.edm"
synth --arch olmoe --layers 1 --kv-heads 2 --experts 2 --top-k 1 --expert-ffn 32 \
  --dtype f32 -o "$out/olmoe_f32.edm"
cp fuzz/seeds/*.edm "$out/"
parts=fuzz/corpus/edm_parts
mkdir -p "$parts"
python3 - "$out" "$parts" <<'PY'
import pathlib, struct, sys
src, dst = map(pathlib.Path, sys.argv[1:])
for f in sorted(src.glob("*.edm")):
    b = f.read_bytes()
    (n,) = struct.unpack_from("<Q", b, 16)
    start = -(-(24 + n) // 65536) * 65536
    (dst / f.name).write_bytes(b[24:24 + n] + b"\0" + b[start:])
PY
