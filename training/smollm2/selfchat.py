#!/usr/bin/env python3
"""Self-distillation chat data for the SmolLM2 student (issue 19): conversations sampled from the dense base itself.

After run 3 (2,568 steps on docs, source and docstring->function exchanges) the student answered 1 of 8 everyday
questions where the base answered 4 (docs/results/smollm2/chat-run3/answers.md): the corpus has no everyday chat, so
training wore the base's chat away. This samples that chat from the base (SmolLM2-135M-Instruct, the dense teacher
read from the bundle's GGUF) to mix back into training (train_moe.py --selfchat).

Each conversation starts from the chat template's user-turn opener, the template's default system block followed by
`<|im_start|>user\\n` (both read from the bundle's tokenizer/chat_template.jinja, and checked against the first
document of the bundle's instruct stream, which prepare.py rendered with the same template), and the base writes the
user's question until `<|im_end|>`; then the assistant opener `\\n<|im_start|>assistant\\n` is forced and the base
answers until `<|im_end|>` closes the turn. Kept: both turns closed within --max-question / --max-new tokens, both
non-empty, no special token or broken UTF-8 inside, no exact duplicate. Each kept conversation is rendered as text with
the template (contents stripped) and tokenised again exactly as prepare.py tokenises its documents (ids, then
<|endoftext|>), so the stream has the bundle's document format; every 50th (2 %, --valid-every) goes to the valid
split.

Sampling: temperature 0.9, top-p 0.95, seeded (one torch generator per batch: seed + batch index), batches of rows
decoded together with a KV cache (all rows share the prefix, so they stay position-aligned; attention over the cache is
GQA by grouping the query heads, the same function as model.py's Attention without its mask). fp32 by default.

Usage: selfchat.py --bundle DIR --out DIR [--n 8192] [--batch 1024] [--max-new 448] [--max-question 128]
                   [--temperature 0.9] [--top-p 0.95] [--seed 0] [--deadline S] [--layers N (tiny local runs)]
Writes selfchat.train.u16, selfchat.valid.u16, selfchat.json (counts, lengths, settings), selfchat.samples.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model as M  # noqa: E402

SPECIAL_BELOW = 17  # ids 0-16: <|endoftext|>, <|im_start|>, <|im_end|> and the StarCoder leftovers


def log(*a):
    print(*a, flush=True)


def template_parts(tokdir: Path) -> tuple[str, str, str]:
    """(system block, user opener, assistant opener) of the tokenizer's chat template: the template adds its default
    system block when the conversation has none, and each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""
    f = tokdir / "chat_template.jinja"
    tpl = f.read_text() if f.exists() else json.loads((tokdir / "tokenizer_config.json").read_text())["chat_template"]
    m = re.search(r"messages\[0\]\['role'\] != 'system' %\}\{\{ '(.*?)' \}\}", tpl, re.S)
    if not m or "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'" not in tpl:
        raise SystemExit(f"unexpected chat template in {tokdir}:\n{tpl}")
    system = m.group(1)
    assert system.startswith("<|im_start|>system\n") and system.endswith("<|im_end|>\n"), system
    return system, "<|im_start|>user\n", "<|im_start|>assistant\n"


def render(system: str, q: str, a: str) -> str:
    """The chat template's text of [user q, assistant a] (no generation prompt), as instruct.documents makes it."""
    return f"{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"


def teacher(bundle: Path, layers: int | None, device, dtype) -> M.Model:
    m = M.dense_model(bundle / "base.gguf", device, layers)  # layers: tiny local runs cut the first N
    return m.to(dtype=dtype).eval().requires_grad_(False)


class Cache:
    """Per layer k, v [B, KV, T, D] of the positions decoded so far."""

    def __init__(self, m: M.Model, B: int, T: int, device, dtype):
        c = m.c
        self.k = [torch.zeros(B, c.kv_heads, T, c.head_dim, device=device, dtype=dtype) for _ in range(c.layers)]
        self.v = [torch.zeros_like(k) for k in self.k]


@torch.no_grad()
def decode_step(m: M.Model, tok: torch.Tensor, pos: int, cache: Cache) -> torch.Tensor:
    """tok [B] at position pos (every row the same) -> next-token logits [B, V] (fp32): Model.forward's causal
    result for the last position, with the earlier positions' k/v from the cache."""
    c = m.c
    B = tok.shape[0]
    H, KV, D = c.heads, c.kv_heads, c.head_dim
    h = m.word_embeddings(tok[:, None])  # [B, 1, hidden]
    cs = M.rope_cos_sin(torch.tensor([pos], device=tok.device), D, c.rope_theta, tok.device)
    for i, l in enumerate(m.layers):
        a = l.attention
        qkv = a.query_key_value(l.input_layernorm(h))
        qk = M.rope(qkv[..., : (H + KV) * D].view(B, 1, H + KV, D).transpose(1, 2), None, c.rope_theta, cs)
        cache.k[i][:, :, pos] = qk[:, H:, 0]
        cache.v[i][:, :, pos] = qkv[..., (H + KV) * D:].reshape(B, KV, D)
        k, v = cache.k[i][:, :, : pos + 1], cache.v[i][:, :, : pos + 1]  # [B, KV, t, D]
        # GQA as repeat_interleave: query head j reads kv head j // (H / KV), i.e. q viewed [B, KV, H / KV, D]
        q = qk[:, :H, 0].reshape(B, KV, H // KV, D)
        att = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(D), -1)
        o = (att @ v.float()).to(h.dtype).reshape(B, 1, H * D)
        h = h + a.dense(o)
        y = l.mlp(l.post_attention_layernorm(h))
        h = h + (y[0] if isinstance(y, tuple) else y)  # an MoE layer returns (y, scores, ids)
    return m.logits(m.norm(h))[:, 0].float()


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p (the first always)."""
    p = torch.softmax(logits / temperature, -1)
    ps, idx = p.sort(-1, descending=True)
    keep = (ps.cumsum(-1) - ps) < top_p
    ps = ps * keep
    choice = torch.multinomial(ps, 1, generator=gen)
    return idx.gather(-1, choice)[:, 0]


@torch.no_grad()
def generate(m: M.Model, prefix: list[int], opener: list[int], B: int, a, gen: torch.Generator):
    """B conversations from prefix: the question until <|im_end|> (at most a.max_question tokens), then the forced
    assistant opener (the tokens after that <|im_end|>), then the answer until <|im_end|>; a.max_new tokens in all.
    Returns the generated tokens [B, steps] (whatever follows a finished row is left there) and each row's phase
    (3: both turns closed)."""
    dev = next(m.parameters()).device
    dtype = next(m.parameters()).dtype
    P = len(prefix)
    cache = Cache(m, B, P + a.max_new, dev, dtype)
    pre = torch.tensor(prefix, device=dev)
    for i in range(P - 1):
        decode_step(m, pre[i].expand(B), i, cache)
    cur = pre[-1].expand(B).contiguous()
    forced = torch.tensor(opener, device=dev)
    # phase 0: question, 1: forced opener (fi: its next index), 2: answer, 3: closed, 4: failed
    phase = torch.zeros(B, dtype=torch.long, device=dev)
    fi = torch.zeros(B, dtype=torch.long, device=dev)
    out = torch.zeros(B, a.max_new, dtype=torch.long, device=dev)
    for t in range(a.max_new):
        logits = decode_step(m, cur, P - 1 + t, cache)
        s = sample(logits, a.temperature, a.top_p, gen)
        fed = phase == 1
        nxt = torch.where(fed, forced[fi.clamp(max=len(opener) - 1)], s)
        out[:, t] = nxt
        end = nxt == M.IM_END
        fi = torch.where(fed, fi + 1, fi)
        new = phase.clone()
        new[(phase == 0) & end] = 1
        new[fed & (fi == len(opener))] = 2
        new[(phase == 2) & end] = 3
        if t + 1 >= a.max_question:
            new[(phase == 0) & ~end] = 4
        phase = new
        cur = nxt
        if t % 16 == 15 and bool((phase >= 3).all()):
            return out[:, : t + 1], phase
    return out, phase


def split_conversation(row: list[int], opener: list[int], tok) -> tuple[str, str] | str:
    """(question, answer) texts of a generated row, or why it is not kept."""
    try:
        e1 = row.index(M.IM_END)
    except ValueError:
        return "question not closed"
    q = row[:e1]
    rest = row[e1 + 1:]
    if rest[: len(opener)] != opener:
        return "question not closed"  # (max_new reached inside the forced opener)
    rest = rest[len(opener):]
    try:
        e2 = rest.index(M.IM_END)
    except ValueError:
        return "answer not closed"
    ans = rest[:e2]
    if any(i < SPECIAL_BELOW for i in q + ans):
        return "special token inside"
    qt, at = tok.decode(q, skip_special_tokens=False), tok.decode(ans, skip_special_tokens=False)
    if "\ufffd" in qt or "\ufffd" in at:
        return "broken UTF-8"
    qt, at = qt.strip(), at.strip()
    if not qt or not at:
        return "empty turn"
    return qt, at


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8192, help="conversations to sample (kept: the well-formed ones)")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--max-new", type=int, default=448, help="generated tokens per conversation (question + answer)")
    ap.add_argument("--max-question", type=int, default=128, help="the question must close within this many tokens")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--deadline", type=float, default=0, help="seconds: start no batch after this (0: none)")
    ap.add_argument("--valid-every", type=int, default=50, help="every Nth kept conversation goes to the valid split")
    ap.add_argument("--layers", type=int, help="first N layers of the base only (tiny local runs)")
    a = ap.parse_args()
    t0 = time.time()
    from tokenizers import Tokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    tok = Tokenizer.from_file(str(a.bundle / "tokenizer/tokenizer.json"))
    system, user, assistant = template_parts(a.bundle / "tokenizer")
    prefix = tok.encode(system + user, add_special_tokens=False).ids
    close = tok.encode("<|im_end|>\n" + assistant, add_special_tokens=False).ids
    assert close[0] == M.IM_END and prefix[0] == M.IM_START and prefix[-1] != M.IM_END, (prefix, close)
    opener = close[1:]
    inst = a.bundle / "bin/instruct.train.u16"
    if inst.exists():  # prepare.py rendered these documents with the same template
        head = np.fromfile(inst, dtype=np.uint16, count=len(prefix)).tolist()
        if head != prefix:
            raise SystemExit(f"the template's user opener {prefix} is not how the instruct stream starts {head}")
        log(f"prefix ({len(prefix)} tokens) = the instruct stream's document opener; assistant opener {opener}")
    m = teacher(a.bundle, a.layers, dev, torch.float32 if a.dtype == "fp32" else torch.bfloat16)
    log(f"teacher {m.c.layers} layers on {dev} ({a.dtype}), load {time.time() - t0:.0f} s; sampling {a.n} "
        f"conversations, T {a.temperature}, top-p {a.top_p}, seed {a.seed}, batch {a.batch}, max {a.max_new} tokens")
    kept, seen, why = [], set(), {}
    done, b = 0, 0
    gen_tokens, t_gen = 0, time.time()
    while done < a.n:
        if a.deadline and time.time() - t0 > a.deadline:
            log(f"deadline: {done} of {a.n} sampled")
            break
        B = min(a.batch, a.n - done)
        gen = torch.Generator(device=dev).manual_seed(a.seed + b)
        tb = time.time()
        out, phase = generate(m, prefix, opener, B, a, gen)
        rows, phase = out.cpu().tolist(), phase.cpu().tolist()
        nk, wb = 0, {}
        for row, ph in zip(rows, phase):
            r = ({0: "question not closed", 1: "answer not closed", 2: "answer not closed",
                  4: "question too long"}[ph] if ph != 3 else split_conversation(row, opener, tok))
            if isinstance(r, str) or r in seen:
                r = r if isinstance(r, str) else "duplicate"
                why[r] = why.get(r, 0) + 1
                wb[r] = wb.get(r, 0) + 1
            else:
                seen.add(r)
                kept.append(r)
                nk += 1
        gen_tokens += B * len(rows[0])
        done += B
        b += 1
        log(f"batch {b}: {B} rows x {len(rows[0])} steps in {time.time() - tb:.1f} s, kept {nk}; "
            f"{len(kept)} of {done} so far; dropped {wb}")
    sampling_s = time.time() - t_gen
    a.out.mkdir(parents=True, exist_ok=True)
    if not kept:  # no stream at all rather than an empty one that train would pick up
        for split in ("train", "valid"):
            (a.out / f"selfchat.{split}.u16").unlink(missing_ok=True)
        (a.out / "selfchat.json").write_text(json.dumps({"sampled": done, "kept": 0, "dropped": why}) + "\n")
        raise SystemExit(f"no well-formed conversation in {done} ({why}): no stream written")
    docs = {"train": [], "valid": []}
    for i, (q, ans) in enumerate(kept):
        docs["valid" if i % a.valid_every == a.valid_every - 1 else "train"].append(render(system, q, ans))
    stats = {}
    for split, texts in docs.items():
        ids = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(M.EOT)
        np.array(ids, dtype=np.uint16).tofile(a.out / f"selfchat.{split}.u16")
        stats[split] = {"conversations": len(texts), "tokens": len(ids)}
    qlen = [len(tok.encode(q, add_special_tokens=False).ids) for q, _ in kept]
    alen = [len(tok.encode(x, add_special_tokens=False).ids) for _, x in kept]
    meta = {"sampled": done, "kept": len(kept), "dropped": why, "splits": stats,
            "question_tokens_mean": round(float(np.mean(qlen)), 1) if kept else 0,
            "answer_tokens_mean": round(float(np.mean(alen)), 1) if kept else 0,
            "unique_questions": len({q for q, _ in kept}), "sampling_seconds": round(sampling_s, 1),
            "generated_tokens": gen_tokens, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "teacher_layers": m.c.layers, "prefix_ids": prefix, "assistant_opener_ids": opener,
            "args": {k: str(v) for k, v in vars(a).items()}}
    (a.out / "selfchat.json").write_text(json.dumps(meta, indent=1) + "\n")
    with open(a.out / "selfchat.samples.md", "w") as f:
        f.write(f"First {min(40, len(kept))} of {len(kept)} conversations sampled from the base "
                f"(T {a.temperature}, top-p {a.top_p}, seed {a.seed}).\n\n")
        for i, (q, ans) in enumerate(kept[:40]):
            f.write(f"### {i + 1}\n\n**user:** {q}\n\n**assistant:** {ans}\n\n")
    log(f"kept {len(kept)} of {done} ({why}); train {stats['train']}, valid {stats['valid']}; sampling "
        f"{sampling_s:.0f} s, {time.time() - t0:.0f} s in all -> {a.out}")


if __name__ == "__main__":
    main()
