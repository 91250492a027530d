#!/usr/bin/env bash
# Lazy paging hit rate (docs/RESULTS.md, "Lazy paging"): per domain, `edgediff bench experts` decodes
# PROMPTS prompts taken from the domain's TEST split (the first line of ≥ 30 characters of each of the
# first documents; bench prompts are one per line) for NEW tokens each with the default decoder (block
# diffusion, threshold policy) and with AR, records the routing trace, and replays it through the pager
# at pool sizes 100 / 50 / 25 / 12.5 % of all routed experts, for LRU / LFU / least-stale eviction,
# with and without previous-step prefetch. CPU trace replay: hit rates, not timings.
# Writes $OUTDIR/$NAME.<decoder>.<domain>.json (default docs/results/paging.<decoder>.<domain>.json) and prints
# the Markdown tables.
source "$(dirname "$0")/common.sh"
PROMPTS="${PROMPTS:-6}"
NEW="${NEW:-128}"
DECODERS="${DECODERS:-block ar}"
NAME="${NAME:-paging}" # the JSONs' name prefix in OUTDIR, so another model's run does not overwrite the default's
for d in $DOMAINS; do
  python3 - "$DATA/$d/test.txt" "$PROMPTS" > "$WORK/$d.prompts" <<'PY'
import sys
docs = [d for d in open(sys.argv[1], encoding="utf-8").read().split("\n\x1e\n") if d.strip()]
n = 0
for doc in docs:
    line = next((l.strip() for l in doc.splitlines() if len(l.strip()) >= 30), None)
    if line:
        print(line[:200])
        n += 1
        if n == int(sys.argv[2]):
            break
PY
  for dec in $DECODERS; do
    "$BIN" bench experts --model "$MODEL" --prompts "$WORK/$d.prompts" --decoder "$dec" \
      --max-tokens "$NEW" --json "$OUTDIR/$NAME.$dec.$d.json" > "$WORK/$dec.$d.md" 2>/dev/null
    head -1 "$WORK/$dec.$d.md" | sed "s|^|$dec/$d: |" >&2
  done
done
python3 - "$OUTDIR" "$DECODERS" "$DOMAINS" "$NAME" <<'PY'
import json, sys
out, decoders, domains, name = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
for dec in decoders:
    runs = {d: json.load(open(f"{out}/{name}.{dec}.{d}.json")) for d in domains}
    print(f"\n{dec} decoder: hit rate per domain\n")
    print("| pool | slots | policy | prefetch | " + " | ".join(domains) + " |")
    print("|---|---|---|---|" + "---|" * len(domains))
    for i, r in enumerate(runs[domains[0]]):
        cells = [f"{100*runs[d][i]['hit_rate']:.1f} %" for d in domains]
        print(f"| {r['pool_percent']} % | {r['slots']} | {r['policy']} | {'step' if r['prefetch'] else 'off'} | " + " | ".join(cells) + " |")
PY
