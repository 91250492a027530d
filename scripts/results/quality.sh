#!/usr/bin/env bash
# Quality per domain on the TEST split (docs/RESULTS.md, "Quality"): `edgediff eval` of the default
# model (q8), and of its f16 and q4 conversions when HF=<exported checkpoint dir> is given
#   (python3 training/train.py export --state training/runs/state2 --out /tmp/hf).
# Writes docs/results/quality.<dtype>.json, docs/results/quality-by-ratio.svg (q8) and prints the
# Markdown table. Sizes: the first DOCS test documents per domain, BYTES each, at most MAX_TOKENS
# tokens per domain in windows of 256 (same seed, so every model sees the same masks).
source "$(dirname "$0")/common.sh"
DOCS="${DOCS:-12}"
BYTES="${BYTES:-1000}"
MAX_TOKENS="${MAX_TOKENS:-2048}"
for d in $DOMAINS; do excerpt "$d" test "$DOCS" "$BYTES" "$WORK/test"; done
files=()
for d in $DOMAINS; do files+=("$WORK/test/$d/test.txt"); done

models=("q8:$MODEL")
if [[ -n "${HF:-}" ]]; then
  for dt in f16 q4; do
    "$BIN" convert "$HF" -o "$WORK/default.$dt.edm" --dtype "$dt" >&2
    models+=("$dt:$WORK/default.$dt.edm")
  done
fi
for m in "${models[@]}"; do
  dt=${m%%:*} path=${m#*:}
  svg=()
  [[ $dt == q8 ]] && svg=(--svg "$OUTDIR/quality-by-ratio.svg")
  "$BIN" eval --backend cpu --model "$path" --data "${files[@]}" --max-tokens "$MAX_TOKENS" --seed 0 \
    -o "$OUTDIR/quality.$dt.json" "${svg[@]}" >&2
  # The file name of a temporary conversion is noise in the committed JSON.
  python3 - "$OUTDIR/quality.$dt.json" "$dt" "$(stat -c %s "$path")" <<'PY'
import json, sys
p, dt, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
j = json.load(open(p)); j["model"] = f"default ({dt})"; j["file_bytes"] = size
json.dump(j, open(p, "w"), indent=1)
PY
done
python3 - "$OUTDIR" "${models[@]}" <<'PY'
import json, sys
out = sys.argv[1]
print("| weights | file MiB | domain | tokens | AR NLL | AR acc | masked acc | masked NLL | diffusion bound (nats/token) |")
print("|---|---|---|---|---|---|---|---|---|")
for m in sys.argv[2:]:
    dt = m.split(":")[0]
    j = json.load(open(f"{out}/quality.{dt}.json"))
    for d, r in j["domains"].items():
        print(f"| {dt} | {j['file_bytes']/2**20:.1f} | {d} | {r['tokens']} | {r['ar_nll']:.3f} | {r['ar_accuracy']:.3f} "
              f"| {r['masked_accuracy']:.3f} | {r['masked_nll']:.3f} | {r['diffusion_nll_bound']:.3f} |")
PY
