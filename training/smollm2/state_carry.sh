#!/usr/bin/env bash
# Lays the trained state's pieces, fetched from the GPU machine (scripts/device-train19.sh state-out N, 3 pieces
# a call), into carry chunks for the next session's `device-train19.sh state-in`: training/carry/s<i>/ holds
# pieces 2i and 2i+1 (≈ 32 MB: with the ≈ 26 MB checkout a call carries at most 64 MiB) and the sha256 list
# (checked here first). Prints the state-in calls. Usage: state_carry.sh DIR...
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
  d=training/carry/s$((n / 2))
  mkdir -p "$d" && cp "$p" "$W/state.sha256" "$d/"
  n=$((n + 1))
done
chunks=$(((n + 1) / 2))
echo "$n state pieces in $chunks carry chunks; next session, after staging c0..c3, one call each:"
for i in $(seq 0 $((chunks - 1))); do
  echo "  command: bash scripts/device-train19.sh state-in   carry: [\"training/carry/s$i\"]"
done
