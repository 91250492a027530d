"""llama.cpp's convert_hf_to_gguf.py for edgediff's synthetic checkpoints.

    python3 scripts/vs/hf_to_gguf.py LLAMA_CPP_DIR CHECKPOINT --outfile F.gguf --outtype f16

The converter names a BPE tokenizer's pre-tokenizer by the hash of how it splits a test text and
refuses hashes it does not know; a `synth` checkpoint's tokenizer is edgediff's own, so it is named
"default" here (the benchmark never tokenizes text that depends on it). Everything else is the
converter as shipped.
"""

import sys

llama = sys.argv.pop(1)
sys.path[:0] = [llama, llama + "/gguf-py"]

import conversion.base as base  # noqa: E402  (llama.cpp's, from LLAMA_CPP_DIR)
import convert_hf_to_gguf  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.exit(convert_hf_to_gguf.main())
