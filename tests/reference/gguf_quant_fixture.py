"""Writes tests/fixtures/gguf/quants.gguf: for each ggml type edgediff dequantizes, a tensor of two
rows of random blocks (scale fields set to finite f16 values, everything else random bytes) and, as
an F32 tensor named `<type>.expected`, the values the `gguf` package's own dequantizer computes.
The file is written by the package's GGUFWriter, so the Rust test also checks our reader against an
independent writer.   pip install gguf numpy; python3 tests/reference/gguf_quant_fixture.py
"""
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, GGMLQuantizationType as T, GGML_QUANT_SIZES
from gguf.quants import dequantize

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "gguf" / "quants.gguf"
rng = np.random.default_rng(14)

# byte offsets of f16 scale fields inside one block, per type
SCALES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]

w = GGUFWriter(str(OUT), "fixture")
for t in TYPES:
    block, size = GGML_QUANT_SIZES[t]
    cols = max(block, 64)
    rows = 2
    nblocks = rows * cols // block
    if t == T.F32:
        raw = rng.standard_normal(rows * cols).astype(np.float32).view(np.uint8)
    elif t == T.F16:
        raw = rng.standard_normal(rows * cols).astype(np.float16).view(np.uint8)
    elif t == T.BF16:
        raw = (rng.standard_normal(rows * cols).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, size=(nblocks, size), dtype=np.uint8)
        for off in SCALES[t]:
            sc = (rng.standard_normal(nblocks) * 0.05).astype(np.float16)
            raw[:, off:off + 2] = sc.view(np.uint8).reshape(nblocks, 2)
        raw = raw.reshape(-1)
    raw = raw.reshape(rows, -1)
    expected = dequantize(raw, t).astype(np.float32).reshape(rows, cols)
    assert np.isfinite(expected).all()
    w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=t)
    w.add_tensor(t.name + ".expected", expected)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("wrote", OUT, OUT.stat().st_size, "bytes", file=sys.stderr)
