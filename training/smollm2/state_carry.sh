#!/usr/bin/env bash
# Lays the trained state's pieces, fetched from the GPU machine (scripts/device-train19.sh state-out N, one
# piece a call), into carry chunks for the next session's `device-train19.sh state-in`: training/carry/s<i>/
# holds piece i and the sha256 list (checked here first). Usage: state_carry.sh DIR...
set -euo pipefail
cd "$(dirname "$0")/../.."
(($#)) || { echo "usage: $0 DIR... (the dirs holding state.piece.* and state.sha256)" >&2; exit 2; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for d in "$@"; do cp "$d"/state.piece.* "$d"/state.sha256 "$W/" 2>/dev/null || true; done
[[ -f "$W/state.sha256" ]] || { echo "no state.sha256 in $*" >&2; exit 1; }
(cd "$W" && sha256sum -c --quiet state.sha256) || { echo "state pieces missing or damaged" >&2; exit 1; }
rm -rf training/carry/s[0-9]*
n=0
for p in "$W"/state.piece.*; do
  i=${p##*.}
  mkdir -p "training/carry/s$i" && cp "$p" "$W/state.sha256" "training/carry/s$i/"
  n=$((n + 1))
done
echo "$n state chunks: $(cd training/carry && ls -d s[0-9]* | tr '\n' ' ')(carry one a call: device-train19.sh state-in)"
