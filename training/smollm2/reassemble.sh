#!/usr/bin/env bash
# Rebuilds the trained q4 model file from the pieces scripts/device-train19.sh returned (export: pieces 0-3 and
# q4.sha256; return-2: the rest), checking every piece and the whole file against q4.sha256.
# Usage: bash training/smollm2/reassemble.sh OUTPUT.edm DIR [DIR ...]   (the directories the fetched files lie in)
set -euo pipefail
out=${1:?usage: reassemble.sh OUTPUT.edm DIR [DIR ...]}
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for d in "$@"; do cp "$d"/q4.piece.* "$d"/q4.sha256 "$work"/ 2>/dev/null || true; done
[[ -f "$work/q4.sha256" ]] || { echo "no q4.sha256 in $*" >&2; exit 1; }
(cd "$work" && grep 'q4.piece' q4.sha256 | sha256sum -c --quiet) || { echo "a piece is missing or corrupt" >&2; exit 1; }
want=$(grep 'smollm2-moe-q4.edm' "$work/q4.sha256" | cut -d' ' -f1)
cat $(ls "$work"/q4.piece.* | sort -t. -k3 -n) > "$out.tmp"
got=$(sha256sum "$out.tmp" | cut -d' ' -f1)
[[ "$got" == "$want" ]] || { echo "reassembled file sha256 $got, want $want" >&2; rm -f "$out.tmp"; exit 1; }
mv "$out.tmp" "$out"
echo "$out: $(stat -c %s "$out") bytes, sha256 ok"
