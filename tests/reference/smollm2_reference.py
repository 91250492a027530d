"""Reference data for the SmolLM2-135M-Instruct GGUF tests (tests/tests/gguf_smollm2.rs), written to
tests/fixtures/gguf/smollm2_reference.json. Nothing of the model is committed: only token ids and a
few logits per position.

- logits: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, which dequantizes to
  float32 and undoes llama.cpp's q/k permutation), causal forward on CPU; per position the argmax and
  the reference's eight best logits (ids + values).
- tokens: llama.cpp's tokenizer of the same GGUF (llama-cpp-python, vocab only, special tokens not
  parsed) and the tokenizer transformers builds from the GGUF, on prose, code, numbers, whitespace
  runs, emoji and non-Latin text.

    pip install gguf transformers torch llama-cpp-python
    python3 tests/reference/smollm2_reference.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = Path(sys.argv[1]).resolve()
OUT = Path(__file__).resolve().parents[1] / "fixtures" / "gguf" / "smollm2_reference.json"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "Pi is 3.14159, e is 2.71828 and 1234567890 has ten digits; 1,000,000 ≠ 10⁶.",
    "spaces:   three,     five,\ttab,\n\n\nthree newlines,  \n trailing   ",
    "Emoji: 🙂👍🏽🇫🇷 and ❤️‍🔥!",
    "Здравствуй, мир! こんにちは世界。 مرحبا بالعالم. 你好，世界。 Ελληνικά ٣٤٥",
    "<|im_start|>user\nHi<|im_end|>",
    "  leading spaces and CamelCaseWords, don't won't I'm we'll they've",
]

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]

tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
model.eval()

texts = []
try:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    llama_cpp = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
    llama_cpp_special = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)
except Exception as e:  # noqa: BLE001 - record why, keep the transformers half
    print("llama.cpp tokenizer unavailable:", e, file=sys.stderr)
    llama_cpp = llama_cpp_special = None

for t in TEXTS:
    row = {"text": t, "transformers": tok.encode(t, add_special_tokens=False)}
    if llama_cpp:
        row["llama_cpp"] = llama_cpp(t)
        row["llama_cpp_special"] = llama_cpp_special(t)
    texts.append(row)

cases = []
with torch.no_grad():
    for p in PROMPTS:
        ids = tok.encode(p, add_special_tokens=False)
        logits = model(torch.tensor([ids])).logits[0].float()
        positions = []
        for row in logits:
            top = torch.topk(row, 8)
            positions.append({"ids": top.indices.tolist(), "logits": [round(v, 5) for v in top.values.tolist()]})
        cases.append({"prompt": p, "tokens": ids, "positions": positions})

OUT.write_text(json.dumps({
    "source": "transformers " + __import__("transformers").__version__ + " GGUF loader, torch " + torch.__version__ + " CPU float32",
    "texts": texts,
    "cases": cases,
}, ensure_ascii=False, indent=1) + "\n")
print("wrote", OUT, file=sys.stderr)
