#!/usr/bin/env python3
"""Builds edgediff's multi-domain training corpus from text already on this machine.

Domains and where their documents come from (one document = one file):

  prose   English documentation: README/NEWS/*.md/*.rst/*.txt/FAQ/TODO/HTML under /usr/share/doc (fenced
          code blocks and licence sections removed) and English man pages (/usr/share/man/man[1-8],
          rendered to plain text with groff).
  rust    *.rs of the crates in ~/.cargo/registry/src (newest version of each crate).
  python  *.py of the CPython standard library (/usr/lib/python3.X) and of /usr/lib/python3/dist-packages.
  c       C headers under /usr/include (C++ trees and C++-looking files skipped) and *.c files found in
          /usr/share/doc, /usr/local/go and the cargo registry.

Licence boilerplate is stripped: comment blocks (code) and paragraphs or sections (prose) that talk about
licences/copyright are removed; copyright/LICENSE/COPYING/changelog files are never read.

Determinism: candidate files are listed in sorted order, shuffled with a fixed seed per pool, deduplicated by
content hash, and assigned in that order to test, then valid, then train until each split reaches its byte
target; a per-source cap (a Debian package, a crate, a Python top-level package) keeps one source from
dominating. The same machine contents give byte-identical splits: the manifest records the sha256 of each.

Output (training/data is gitignored; the manifest is committed):
  training/data/<domain>/{train,valid,test}.txt   documents separated by "\\n\\x1e\\n" (ASCII record separator
                                                  on its own line; \\x1e never occurs inside a document)
  training/corpus_manifest.json                   sources, licences, counts, bytes and sha256 of each split

Standard library only. Usage: python3 training/build_corpus.py [--train-mb 12] [--seed 7]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
SEP = "\n\x1e\n"
SPLITS = ("test", "valid", "train")  # fill order: held-out splits first

# ----------------------------------------------------------------------------------------------------------
# Licences


def _dpkg_owner_map() -> dict[str, str]:
    """file path -> Debian package, from dpkg's file lists."""
    owners: dict[str, str] = {}
    for lst in sorted(glob.glob("/var/lib/dpkg/info/*.list")):
        pkg = os.path.basename(lst)[: -len(".list")].split(":")[0]
        try:
            with open(lst, encoding="utf-8", errors="replace") as f:
                for line in f:
                    owners.setdefault(line.rstrip("\n"), pkg)
        except OSError:
            pass
    return owners


KNOWN_LICENCES = [
    ("Apache-2.0", r"Apache License,? Version 2\.0|Apache-2\.0"),
    ("MIT", r"Permission is hereby granted, free of charge|\bMIT\b"),
    ("BSD-3-Clause", r"Neither the name of|BSD-3"),
    ("BSD-2-Clause", r"BSD-2|Redistributions in binary form must reproduce"),
    ("LGPL", r"GNU Lesser General Public License|GNU Library General Public License|\bLGPL"),
    ("GPL", r"GNU General Public License|\bGPL"),
    ("PSF-2.0", r"PYTHON SOFTWARE FOUNDATION LICENSE|PSF"),
    ("Zlib", r"zlib License|\bZlib\b"),
    ("ISC", r"\bISC\b"),
    ("public-domain", r"public domain"),
]


def licence_from_text(text: str) -> str:
    found = [name for name, pat in KNOWN_LICENCES if re.search(pat, text[:20000])]
    return " / ".join(found) if found else "unknown (see source)"


_licence_cache: dict[str, str] = {}


def debian_licence(pkg: str) -> str:
    """Licences a Debian package's copyright file declares (DEP-5 `License:` lines, else a text guess)."""
    if pkg in _licence_cache:
        return _licence_cache[pkg]
    path = Path("/usr/share/doc") / pkg / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        _licence_cache[pkg] = "unknown (no copyright file)"
        return _licence_cache[pkg]
    names: list[str] = []
    if text.startswith("Format:") or "\nFiles:" in text:
        for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)", text, re.M):
            v = m.group(1).strip()
            if v not in names:
                names.append(v)
    res = " / ".join(names[:8]) if names else licence_from_text(text)
    if len(names) > 8:
        res += f" / … ({len(names)} in all)"
    _licence_cache[pkg] = res + f" (per /usr/share/doc/{pkg}/copyright)"
    return _licence_cache[pkg]


# ----------------------------------------------------------------------------------------------------------
# Cleaning

LICENCE_WORDS = [
    r"licen[cs]e", r"copyright", r"warrant", r"redistribut", r"permission is hereby granted",
    r"spdx", r"free software foundation", r"all rights reserved", r"\bgpl\b", r"merchantability",
    r"without (any )?warranty", r"terms and conditions", r"\(c\)",
]
_LICENCE_RES = [re.compile(w, re.I) for w in LICENCE_WORDS]


def licence_score(text: str) -> int:
    return sum(1 for r in _LICENCE_RES if r.search(text))


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x1e", " ").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def strip_code_licences(text: str, lang: str) -> str:
    """Removes comment blocks that are licence boilerplate (two or more licence markers)."""
    pats = []
    if lang in ("c", "rust"):
        pats.append(re.compile(r"^[ \t]*/\*.*?\*/[ \t]*\n?", re.S | re.M))
        pats.append(re.compile(r"(?:^[ \t]*//[^\n]*\n)+", re.M))
    if lang == "python":
        pats.append(re.compile(r"(?:^[ \t]*#[^\n]*\n)+", re.M))
    for p in pats:
        text = p.sub(lambda m: "" if licence_score(m.group(0)) >= 2 else m.group(0), text)
    text = re.sub(r"^[^\n]*SPDX-License-Identifier[^\n]*\n", "", text, flags=re.M)
    return text


def strip_prose_licences(text: str) -> str:
    """Drops markdown/rst sections titled licence/copyright and paragraphs full of licence words."""
    out, skip_level = [], None
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"^(#{1,6})\s+(.*)", line)
        underline = i + 1 < len(lines) and re.match(r"^([=\-~^]{3,})\s*$", lines[i + 1] or "")
        if m:
            title, level = m.group(2), len(m.group(1))
        elif underline and line.strip():
            title, level = line, (1 if lines[i + 1][0] == "=" else 2)
        else:
            title, level = None, None
        if title is not None:
            if skip_level is not None and level <= skip_level:
                skip_level = None
            if skip_level is None and re.search(r"licen[cs]|copyright|copying", title, re.I):
                skip_level = level
        if skip_level is None:
            out.append(line)
    paras = re.split(r"\n\s*\n", "\n".join(out))
    keep = [p for p in paras if licence_score(p) < 2]
    return "\n\n".join(keep)


def strip_markdown_code(text: str) -> str:
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)
    text = re.sub(r"^~~~.*?^~~~[^\n]*$", "", text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return text


class _HtmlText(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre", "dt", "dd", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "pre", "code", "nav"):
            self.skip += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "pre", "code", "nav") and self.skip:
            self.skip -= 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(raw: str) -> str:
    p = _HtmlText()
    try:
        p.feed(raw)
        p.close()
    except Exception:  # malformed HTML: drop the document
        return ""
    text = "".join(p.parts)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text)


def prose_ok(text: str) -> bool:
    if len(text) < 400:
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters / len(text) < 0.70:
        return False
    words = re.findall(r"[A-Za-z]+", text)
    common = sum(w.lower() in ("the", "and", "to", "of", "a", "is", "in", "for", "be", "with") for w in words)
    return len(words) > 60 and common / max(1, len(words)) > 0.06  # English, not tables/lists of names


def code_ok(text: str) -> bool:
    if len(text) < 300:
        return False
    lines = text.split("\n")
    if max(len(line) for line in lines) > 400:  # minified or generated data
        return False
    return sum(len(line) for line in lines) / len(lines) < 90


CPP_MARKERS = re.compile(r"^\s*(namespace\s+\w+\s*\{|template\s*<|class\s+\w+[^;]*\{|public:|private:|protected:)", re.M)

# ----------------------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    key: str  # path, unique
    source: str  # for the cap and the manifest: "deb:git", "crate:serde", ...
    licence: str
    load: Callable[[], Optional[str]]


def read_maybe_gz(path: str) -> Optional[str]:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(4_000_000)
        else:
            with open(path, "rb") as f:
                data = f.read(4_000_000)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def sorted_files(root: str, pred: Callable[[str], bool]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            if os.path.isfile(p) and not os.path.islink(p) and pred(p):
                out.append(p)
    return sorted(out)


MAX_DOC = 150_000  # characters after cleaning; larger documents are skipped (generated or reference dumps)
SKIP_NAMES = re.compile(r"(?i)^(copyright|licen[cs]e|copying|changelog|changes|authors|thanks|credits|contributors|code_of_conduct|security|governance)")


def doc_candidates(owners) -> list[Candidate]:
    root = "/usr/share/doc"
    exts = re.compile(r"(?i)(\.(md|rst|txt|html?|text)|^(readme|news|faq|todo|bugs|install|usage|hacking)([._-].*)?)(\.gz)?$")

    def pred(p):
        name = os.path.basename(p)
        return bool(exts.search(name)) and not SKIP_NAMES.match(name) and "/examples/" not in p

    files = sorted_files(root, pred)
    stems = {(p.split("/")[4], re.sub(r"(?i)\.(md|rst|txt|html?)(\.gz)?$", "", os.path.basename(p)))
             for p in files if not re.search(r"(?i)\.html?(\.gz)?$", p)}
    out = []
    for p in files:
        pkg = p.split("/")[4]
        is_html = bool(re.search(r"(?i)\.html?(\.gz)?$", p))
        if is_html and (pkg, re.sub(r"(?i)\.html?(\.gz)?$", "", os.path.basename(p))) in stems:
            continue  # the same document exists as source text

        def load(p=p, is_html=is_html):
            raw = read_maybe_gz(p)
            if raw is None:
                return None
            text = html_to_text(raw) if is_html else strip_markdown_code(raw)
            text = normalise(strip_prose_licences(text))
            return text if prose_ok(text) and len(text) <= MAX_DOC else None

        out.append(Candidate(p, f"deb:{pkg}", debian_licence(pkg), load))
    return out


def man_candidates(owners) -> list[Candidate]:
    files = []
    for sec in range(1, 9):
        files += sorted_files(f"/usr/share/man/man{sec}", lambda p: True)
    out = []
    for p in sorted(files):
        pkg = owners.get(p, "unknown")

        def load(p=p):
            raw = read_maybe_gz(p)
            if raw is None or raw.lstrip().startswith(".so ") or len(raw) < 300:
                return None
            try:
                r = subprocess.run(
                    ["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=96n", "-rHY=0", "-dAD=l", "-rIN=4n"],
                    input=raw.encode(), capture_output=True, timeout=20, env={**os.environ, "LC_ALL": "C.UTF-8"},
                )
            except (subprocess.TimeoutExpired, OSError):
                return None
            text = r.stdout.decode("utf-8", errors="replace")
            lines = text.split("\n")
            body = [line[4:] if line.startswith("    ") else line for line in lines[1:-2]]  # drop header/footer
            text = normalise(strip_prose_licences("\n".join(body)))
            text = re.sub(r"[ \t]{2,}", " ", text)  # remaining justification gaps
            return text if prose_ok(text) and len(text) <= MAX_DOC else None

        out.append(Candidate(p, f"deb:{pkg}", debian_licence(pkg), load))
    return out


def _version_key(v: str):
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.+-]", v))


def crate_dirs() -> list[tuple[str, str, str, str]]:
    """(dir, name, version, licence) of the newest version of each crate in the cargo registry."""
    best: dict[str, tuple] = {}
    for d in sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/*/"))):
        try:
            meta = tomllib.loads(Path(d, "Cargo.toml").read_text())
            pkg = meta["package"]
            name, ver = pkg["name"], str(pkg.get("version", "0"))
            lic = pkg.get("license") or ("file " + pkg["license-file"] if "license-file" in pkg else "unknown")
        except Exception:
            continue
        if not isinstance(ver, str) or not isinstance(lic, str):
            continue
        if name not in best or _version_key(ver) > _version_key(best[name][2]):
            best[name] = (d.rstrip("/"), name, ver, lic)
    return [best[k] for k in sorted(best)]


def code_loader(p: str, lang: str):
    def load():
        raw = read_maybe_gz(p)
        if raw is None:
            return None
        if lang == "c" and CPP_MARKERS.search(raw):
            return None
        text = normalise(strip_code_licences(raw, lang))
        return text if code_ok(text) and len(text) <= MAX_DOC else None

    return load


def rust_candidates(owners) -> list[Candidate]:
    out = []
    for d, name, ver, lic in crate_dirs():
        for p in sorted_files(d, lambda p: p.endswith(".rs")):
            out.append(Candidate(p, f"crate:{name}-{ver}", lic, code_loader(p, "rust")))
    return out


def stdlib_dir() -> str:
    """The newest system CPython standard library (independent of the interpreter running this script)."""
    dirs = [d for d in glob.glob("/usr/lib/python3.[0-9]*") if os.path.exists(os.path.join(d, "os.py"))]
    return max(dirs, key=lambda d: int(d.rsplit(".", 1)[1]))


def py_stdlib_candidates(owners) -> list[Candidate]:
    root = stdlib_dir()
    files = sorted_files(root, lambda p: p.endswith(".py") and "/site-packages/" not in p and "/dist-packages/" not in p)
    out = []
    for p in files:
        rel = os.path.relpath(p, root)
        top = rel.split("/")[0] if "/" in rel else "(modules)"
        out.append(Candidate(p, f"cpython-stdlib:{top}", f"PSF-2.0 (CPython {os.path.basename(root)})",
                             code_loader(p, "python")))
    return out


def py_dist_candidates(owners) -> list[Candidate]:
    root = "/usr/lib/python3/dist-packages"
    out = []
    for p in sorted_files(root, lambda p: p.endswith(".py")):
        pkg = owners.get(p, "unknown")
        out.append(Candidate(p, f"deb:{pkg}", debian_licence(pkg), code_loader(p, "python")))
    return out


C_SKIP_DIRS = re.compile(r"^/usr/include/(c\+\+|llvm-1\d|gtest|gmock|node|finclude|boost)(/|$)")


def c_header_candidates(owners) -> list[Candidate]:
    out = []
    for p in sorted_files("/usr/include", lambda p: p.endswith(".h") and not C_SKIP_DIRS.match(p)):
        pkg = owners.get(p, "unknown")
        lic = debian_licence(pkg) if pkg != "unknown" else "unknown"
        out.append(Candidate(p, f"deb:{pkg}", lic, code_loader(p, "c")))
    return out


def c_source_candidates(owners) -> list[Candidate]:
    out = []
    for p in sorted_files("/usr/share/doc", lambda p: re.search(r"\.c(\.gz)?$", p) is not None):
        pkg = p.split("/")[4]
        out.append(Candidate(p, f"deb:{pkg}", debian_licence(pkg), code_loader(p, "c")))
    if os.path.isdir("/usr/local/go"):
        lic = licence_from_text(Path("/usr/local/go/LICENSE").read_text()) if os.path.exists(
            "/usr/local/go/LICENSE") else "unknown"
        ver = Path("/usr/local/go/VERSION").read_text().split("\n")[0] if os.path.exists(
            "/usr/local/go/VERSION") else "go"
        for p in sorted_files("/usr/local/go", lambda p: p.endswith(".c")):
            out.append(Candidate(p, f"go:{ver}", lic + " (per /usr/local/go/LICENSE)", code_loader(p, "c")))
    for d, name, ver, lic in crate_dirs():
        for p in sorted_files(d, lambda p: p.endswith(".c")):
            out.append(Candidate(p, f"crate:{name}-{ver}", lic, code_loader(p, "c")))
    return out


# domain -> [(pool name, share of the domain's bytes, candidate lister)]; small pools first: the last pool of a
# domain gets whatever the earlier ones could not fill.
DOMAINS = {
    "prose": [("doc", 0.5, doc_candidates), ("man", 0.5, man_candidates)],
    "rust": [("crates", 1.0, rust_candidates)],
    "python": [("stdlib", 0.5, py_stdlib_candidates), ("dist-packages", 0.5, py_dist_candidates)],
    "c": [("sources", 0.25, c_source_candidates), ("headers", 0.75, c_header_candidates)],
}

# ----------------------------------------------------------------------------------------------------------
# Selection


@dataclass
class SplitState:
    docs: list = field(default_factory=list)  # (key, source, text)
    bytes: int = 0


def fill(cands: list[Candidate], targets: dict[str, int], cap: int, rng: random.Random, seen: set) -> dict:
    cands = list(cands)
    rng.shuffle(cands)
    out = {s: SplitState() for s in SPLITS}
    per_source: dict[str, int] = {}
    for c in cands:
        split = next((s for s in SPLITS if out[s].bytes < targets[s]), None)
        if split is None:
            break
        if per_source.get(c.source, 0) >= cap:
            continue
        text = c.load()
        if not text:
            continue
        h = hashlib.sha256(text.encode()).digest()
        if h in seen:
            continue
        seen.add(h)
        n = len(text.encode())
        per_source[c.source] = per_source.get(c.source, 0) + n
        out[split].docs.append((c.key, c.source, c.licence, text))
        out[split].bytes += n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-mb", type=float, default=12.0, help="train bytes per domain (MB, 1e6)")
    ap.add_argument("--heldout-kb", type=float, default=300.0, help="valid and test bytes per domain (kB, 1e3)")
    ap.add_argument("--source-cap", type=float, default=0.08,
                    help="max share of a pool's bytes one source (package, crate) may take")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--out", type=Path, default=HERE / "data")
    ap.add_argument("--manifest", type=Path, default=HERE / "corpus_manifest.json")
    args = ap.parse_args()

    owners = _dpkg_owner_map()
    manifest = {
        "generator": "training/build_corpus.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("out", "manifest")},
        "separator": "\\n\\x1e\\n (documents joined by a line holding only the ASCII record separator)",
        "split_rule": "per pool: sorted candidates shuffled with random.Random(f'{seed}:{domain}:{pool}'), "
                      "deduplicated by content sha256, assigned in order to test, valid, train until each split "
                      "reaches its byte target; one source takes at most source_cap of the pool",
        "domains": {},
    }
    for di, domain in enumerate(args.domains.split(",")):
        pools = DOMAINS[domain]
        total = {"train": int(args.train_mb * 1e6), "valid": int(args.heldout_kb * 1e3),
                 "test": int(args.heldout_kb * 1e3)}
        got = {s: [] for s in SPLITS}
        filled = {s: 0 for s in SPLITS}
        seen: set = set()
        pool_info = []
        for pi, (pname, share, lister) in enumerate(pools):
            last = pi == len(pools) - 1
            targets = {s: (total[s] - filled[s]) if last else int(total[s] * share) for s in SPLITS}
            cands = lister(owners)
            rng = random.Random(f"{args.seed}:{domain}:{pname}")
            cap = int(args.source_cap * sum(targets.values()))
            res = fill(cands, targets, cap, rng, seen)
            for s in SPLITS:
                got[s] += res[s].docs
                filled[s] += res[s].bytes
            pool_info.append({"pool": pname, "candidates": len(cands),
                              "bytes": {s: res[s].bytes for s in SPLITS},
                              "docs": {s: len(res[s].docs) for s in SPLITS}})
            print(f"{domain}/{pname}: {len(cands)} candidates -> "
                  + ", ".join(f"{s} {res[s].bytes/1e6:.2f} MB/{len(res[s].docs)} docs" for s in SPLITS),
                  file=sys.stderr)
        ddir = args.out / domain
        ddir.mkdir(parents=True, exist_ok=True)
        splits_info = {}
        sources: dict[str, dict] = {}
        for s in SPLITS:
            docs = got[s]
            random.Random(f"{args.seed}:{domain}:{s}:order").shuffle(docs)
            blob = SEP.join(d[3].rstrip("\n") for d in docs) + "\n"
            (ddir / f"{s}.txt").write_text(blob, encoding="utf-8")
            (ddir / f"{s}.docs").write_text("".join(f"{d[0]}\n" for d in docs), encoding="utf-8")
            splits_info[s] = {"docs": len(docs), "bytes": len(blob.encode()),
                              "sha256": hashlib.sha256(blob.encode()).hexdigest()}
            for key, src, lic, text in docs:
                e = sources.setdefault(src, {"source": src, "licence": lic, "docs": {}, "bytes": 0})
                e["docs"][s] = e["docs"].get(s, 0) + 1
                e["bytes"] += len(text.encode())
        manifest["domains"][domain] = {
            "pools": pool_info,
            "splits": {s: splits_info[s] for s in ("train", "valid", "test")},
            "sources": sorted(sources.values(), key=lambda e: (-e["bytes"], e["source"])),
        }
    args.manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    for d, info in manifest["domains"].items():
        print(d, {s: (v["docs"], v["bytes"]) for s, v in info["splits"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
