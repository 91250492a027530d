"""Instruction-style documents made from the corpus here (issue 19: "instruction-style text if you can make it from
what is here"): every documented function of the python and rust training files becomes one chat exchange, rendered
with SmolLM2-Instruct's own chat template —
  user:      "Write a {Python|Rust} function `<signature>`: <its doc comment>"
  assistant: the function's source.
Each exchange is one document (EMO routes a document within one expert subset). Deterministic: files in corpus order,
functions in source order; `train`/`valid` come from the corpus split of the same name, so no function crosses them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SEP = "\n\x1e\n"
# Bodies longer than this many characters are left out (a 256-token training window should hold most of a pair).
MAX_SOURCE = 1500


def corpus(domain: str, split: str) -> list[str]:
    text = (ROOT / "training/data" / domain / f"{split}.txt").read_text(encoding="utf-8")
    return [d for d in text.split(SEP) if d.strip()]


def first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines()).strip()


def python_pairs(source: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        seg = ast.get_source_segment(source, node)
        if not doc or not seg or len(seg) > MAX_SOURCE:
            continue
        what = first_paragraph(doc)
        if len(what) < 12:
            continue
        args = ast.unparse(node.args)
        out.append((f"Write a Python function `{node.name}({args})`: {what}", seg.strip()))
    return out


RUST_FN = re.compile(r"((?:^[ \t]*///[^\n]*\n)+)([ \t]*(?:pub(?:\([^)]*\))? )?(?:const )?(?:async )?(?:unsafe )?fn "
                     r"(\w+)[^{;]*)\{", re.M)


def rust_pairs(source: str) -> list[tuple[str, str]]:
    out = []
    for m in RUST_FN.finditer(source):
        doc = "\n".join(line.strip()[3:].strip() for line in m.group(1).splitlines())
        what = first_paragraph(doc)
        # The body: braces matched from the opening one (strings holding braces may cut it short: such
        # a pair is dropped when the braces do not balance within MAX_SOURCE).
        depth, i = 0, m.end() - 1
        end = None
        while i < len(source) and i - m.start(2) <= MAX_SOURCE:
            c = source[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
            i += 1
        if end is None or len(what) < 12:
            continue
        sig = " ".join(m.group(2).split()).replace("( ", "(").replace(", )", ")")
        out.append((f"Write a Rust function `{sig}`: {what}", source[m.start(2):end].strip()))
    return out


def pairs(split: str) -> list[tuple[str, str]]:
    out = []
    for doc in corpus("python", split):
        out.extend(python_pairs(doc))
    for doc in corpus("rust", split):
        out.extend(rust_pairs(doc))
    return out


def documents(tokdir: Path, split: str) -> list[str]:
    """The exchanges of `split` as chat-template text (the tokenizer's template, no generation prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokdir))
    return [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    tokenize=False) for q, a in pairs(split)]


if __name__ == "__main__":
    for split in ("train", "valid"):
        p = pairs(split)
        print(split, len(p), "pairs,", sum(len(q) + len(a) for q, a in p), "characters")
    q, a = pairs("valid")[0]
    print("---\n" + q + "\n---\n" + a[:400])
