# Shared by scripts/results/*.sh (sourced, not run): the binary, the model, the domains and the
# corpus excerpts every table is measured on.
#
# The corpus splits live in training/data/<domain>/{train,valid,test}.txt (gitignored; rebuild with
# `python3 training/build_corpus.py`). Documents inside a split are separated by a line holding only
# U+001E; the splits were shuffled by build_corpus.py, so the first documents of a split are a fair
# sample of it. Excerpts keep evaluation cheap on a laptop-class CPU: the first DOCS documents of a
# split, each cut to its first BYTES bytes at a line end.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BIN="${EDGEDIFF:-target/release/edgediff}"
MODEL="${MODEL:-models/default.edm}"
DATA="${DATA:-training/data}"
DOMAINS="${DOMAINS:-prose rust python c}"
OUTDIR="${OUTDIR:-docs/results}"
WORK="${WORK:-$(mktemp -d /tmp/edgediff-results.XXXXXX)}"
mkdir -p "$OUTDIR" "$WORK"

if [[ ! -x "$BIN" ]]; then
  cargo build --release -p edgediff
fi
for d in $DOMAINS; do
  [[ -f "$DATA/$d/test.txt" ]] || {
    echo "missing $DATA/$d/test.txt: run python3 training/build_corpus.py" >&2
    exit 1
  }
done

# excerpt DOMAIN SPLIT DOCS BYTES OUT: the first DOCS documents of the split, each cut to its first
# BYTES bytes at a line end, written as a split (separator lines kept) to OUT/<domain>/<split>.txt so
# that `edgediff eval` names the domain after the directory.
excerpt() {
  local domain=$1 split=$2 docs=$3 bytes=$4 out=$5
  mkdir -p "$out/$domain"
  python3 - "$DATA/$domain/$split.txt" "$docs" "$bytes" "$out/$domain/$split.txt" <<'PY'
import sys
src, ndocs, nbytes, dst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
SEP = "\n\x1e\n"
docs = [d for d in open(src, encoding="utf-8").read().split(SEP) if d.strip()][:ndocs]
cut = []
for d in docs:
    b = d.encode("utf-8")[:nbytes].decode("utf-8", "ignore")
    if len(b) < len(d) and "\n" in b:
        b = b[: b.rfind("\n") + 1]
    cut.append(b)
open(dst, "w", encoding="utf-8").write(SEP.join(cut))
PY
}
