#!/usr/bin/env bash
# Block-level expert routing (docs/RESULTS.md, "Block-level routing"): `--block-experts N` against
# exact routing, on the CPU backend (deterministic).
#   quality  `edgediff eval` on the TEST split excerpts of quality.sh (DOCS × BYTES per domain, at most
#            MAX_TOKENS tokens, seed 0: every N sees the same masks): masked NLL and accuracy with the
#            diffusion passes routed within N experts per block and layer, and the distinct experts
#            per layer of a noisy block pass;
#   paging   `edgediff bench experts` with the block decoder on the prompts of paging.sh (PROMPTS test
#            documents' first lines, NEW tokens each), its routing trace replayed through the pager
#            at POOLS % of all routed experts (LRU / least-stale, prefetch off / step): hit rate and
#            bytes paged, and the distinct experts per layer per pass.
# NS lists the N to measure ("exact" is no --block-experts). Writes docs/results/block-experts.*.json
# and prints the Markdown tables. PARTS=quality or PARTS=paging runs one part; TABLES_ONLY=1 prints
# the tables from the JSON files already there (runs split over several invocations).
source "$(dirname "$0")/common.sh"
NS="${NS:-exact 16 12 8 6 4}"
PARTS="${PARTS:-quality paging}"
DOCS="${DOCS:-12}"
BYTES="${BYTES:-1000}"
MAX_TOKENS="${MAX_TOKENS:-2048}"
PROMPTS="${PROMPTS:-6}"
NEW="${NEW:-128}"
POOLS="${POOLS:-25,12.5}"
flag() { [[ $1 == exact ]] || echo "--block-experts $1"; }

if [[ " $PARTS " == *" quality "* ]]; then
  for d in $DOMAINS; do excerpt "$d" test "$DOCS" "$BYTES" "$WORK/test"; done
  files=()
  for d in $DOMAINS; do files+=("$WORK/test/$d/test.txt"); done
  for n in $NS; do
    [[ -n "${TABLES_ONLY:-}" ]] && break
    # shellcheck disable=SC2046
    "$BIN" eval --backend cpu --model "$MODEL" --data "${files[@]}" --max-tokens "$MAX_TOKENS" \
      --seed 0 $(flag "$n") -o "$OUTDIR/block-experts.quality.$n.json" >&2
  done
  python3 - "$OUTDIR" "$NS" <<'PY'
import json, sys
out, ns = sys.argv[1], sys.argv[2].split()
runs = {n: json.load(open(f"{out}/block-experts.quality.{n}.json")) for n in ns}
base = runs["exact"]["domains"] if "exact" in runs else None
print("| N | domain | experts/layer/block | masked acc | masked NLL | Δ NLL vs exact | diffusion bound |")
print("|---|---|---:|---:|---:|---:|---:|")
for n, j in runs.items():
    for d, r in j["domains"].items():
        dn = ""
        if base:
            b = base[d]["masked_nll"]
            dn = f"{100 * (r['masked_nll'] - b) / b:+.1f} %"
        print(f"| {n} | {d} | {r['experts_per_block']:.1f} | {r['masked_accuracy']:.3f} | {r['masked_nll']:.3f} | {dn} | {r['diffusion_nll_bound']:.3f} |")
PY
fi

if [[ " $PARTS " == *" paging "* ]]; then
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
    for n in $NS; do
      [[ -n "${TABLES_ONLY:-}" ]] && break
      # shellcheck disable=SC2046
      "$BIN" bench experts --model "$MODEL" --prompts "$WORK/$d.prompts" --decoder block \
        --max-tokens "$NEW" --pools "$POOLS" --policies lru,least-stale $(flag "$n") \
        --json "$OUTDIR/block-experts.paging.$n.$d.json" > "$WORK/$n.$d.md" 2>/dev/null
      head -1 "$WORK/$n.$d.md" | sed "s|^|$n/$d: |" >&2
    done
  done
  python3 - "$OUTDIR" "$NS" "$DOMAINS" <<'PY'
import json, sys
out, ns, domains = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
runs = {(n, d): json.load(open(f"{out}/block-experts.paging.{n}.{d}.json")) for n in ns for d in domains}
print("| N | experts/layer/pass | tokens/pass | pool | policy | prefetch | " + " | ".join(f"{d} hits" for d in domains) + " | MiB paged (all domains) |")
print("|---|---:|---:|---|---|---|" + "---:|" * (len(domains) + 1))
for n in ns:
    rows0 = runs[(n, domains[0])]
    per_pass = sum(runs[(n, d)][0]["experts_per_layer_pass"] for d in domains) / len(domains)
    tpf = sum(runs[(n, d)][0]["tokens"] for d in domains) / sum(runs[(n, d)][0]["forwards"] for d in domains)
    for i, r in enumerate(rows0):
        hits = [f"{100 * runs[(n, d)][i]['hit_rate']:.1f} %" for d in domains]
        mib = sum(runs[(n, d)][i]["bytes_paged"] for d in domains) / 2**20
        print(f"| {n} | {per_pass:.1f} | {tpf:.2f} | {r['pool_percent']} % | {r['policy']} | {'step' if r['prefetch'] else 'off'} | " + " | ".join(hits) + f" | {mib:.1f} |")
PY
fi
