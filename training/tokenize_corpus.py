#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer on the corpus's train splits and tokenizes every split.

Tokenizer (Hugging Face `tokenizers`, same layout as runtime/src/tokenizer/train.rs): special tokens
<|pad|> <|bos|> <|eos|> <|mask|> <|user|> <|assistant|> <|system|> at ids 0..6, then the 256 byte symbols,
then merges; GPT-2 byte-level pre-tokenizer (no prefix space), byte-level decoder, a post-processor that
prepends <|bos|> when special tokens are requested. Trained on the train splits only (valid/test never
influence it).

Token streams: every document becomes <|bos|> ids… <|eos|>; documents are concatenated per split into
training/data/bin/<domain>.<split>.u16 (little-endian uint16). training/data/bin/meta.json records counts,
bytes per token and sha256s.

Usage (needs `tokenizers` and `numpy`): python3 training/tokenize_corpus.py [--vocab 8192]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
SEP = "\n\x1e\n"
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|user|>", "<|assistant|>", "<|system|>"]
PAD, BOS, EOS, MASK = 0, 1, 2, 3
DOMAINS = ["prose", "rust", "python", "c"]

# Chat template over the special tokens. The default model is a base model (no instruction data), so the
# template mainly fixes the format a later fine-tune and the runtime agree on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{% elif message['role'] == 'user' %}<|user|>"
    "{% else %}<|assistant|>{% endif %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def docs_of(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d for d in text.rstrip("\n").split(SEP) if d]


def train_tokenizer(data: Path, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def corpus():
        for d in DOMAINS:
            yield from docs_of(data / d / "train.txt")

    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", BOS)]
    )
    for i, s in enumerate(SPECIALS):
        if tok.token_to_id(s) != i:
            raise SystemExit(f"special token {s} got id {tok.token_to_id(s)}, want {i}")
    return tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--tokenizer-dir", type=Path, default=HERE / "data" / "tokenizer")
    args = ap.parse_args()

    tok = train_tokenizer(args.data, args.vocab)
    args.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.tokenizer_dir / "tokenizer.json"), pretty=False)
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>",
        "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"],
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (args.tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1) + "\n")

    out = args.data / "bin"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": tok.get_vocab_size(), "specials": SPECIALS,
            "tokenizer_sha256": hashlib.sha256((args.tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest(),
            "format": "little-endian uint16; each document = <|bos|> tokens <|eos|>", "splits": {}}
    for d in DOMAINS:
        for s in ("train", "valid", "test"):
            docs = docs_of(args.data / d / f"{s}.txt")
            enc = tok.encode_batch(docs, add_special_tokens=False)
            ids = []
            for e in enc:
                ids.append(BOS)
                ids.extend(e.ids)
                ids.append(EOS)
            arr = np.asarray(ids, dtype=np.uint16)
            arr.tofile(out / f"{d}.{s}.u16")
            nbytes = sum(len(x.encode()) for x in docs)
            meta["splits"][f"{d}.{s}"] = {
                "docs": len(docs), "tokens": int(arr.size), "text_bytes": nbytes,
                "bytes_per_token": round(nbytes / max(1, arr.size - 2 * len(docs)), 3),
                "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
            }
            print(f"{d}.{s}: {len(docs)} docs, {arr.size} tokens, "
                  f"{meta['splits'][f'{d}.{s}']['bytes_per_token']} bytes/token", file=sys.stderr)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
