#!/usr/bin/env bash
# Pruning, EMO-style (docs/RESULTS.md, "Pruning"): per domain, masked-token accuracy on the TEST split
# with 100 / 50 / 25 / 12.5 % of the experts of every MoE layer kept, chosen three ways:
#   in-domain  EMO's layer-wise greedy selection by router-probability mass (`prune --greedy`),
#              calibrated on that domain's VALID split (never test);
#   general    the same selection calibrated on a mix of all domains' VALID splits, same token budget;
#   random     uniformly random experts per layer (seed 0), the control.
# SELECT=mass replaces the greedy selection (one corpus pass per MoE layer) with one profile pass per
# calibration set (`edgediff profile`, then `prune --profile`: the same router-probability mass, no
# re-profiling of later layers) for deep models where the greedy's cost is out of reach; same calibration text.
# Writes $OUTDIR/$NAME.json (default docs/results/pruning.json) and prints the Markdown table. Sizes:
# calibration CAL_DOCS valid documents × CAL_BYTES per domain (general: CAL_DOCS/4 per domain); evaluation
# EVAL_DOCS test documents × EVAL_BYTES per domain, at most MAX_TOKENS tokens per domain, seed 0 (every
# model sees the same masks, so differences are paired).
source "$(dirname "$0")/common.sh"
CAL_DOCS="${CAL_DOCS:-8}"
CAL_BYTES="${CAL_BYTES:-1200}"
EVAL_DOCS="${EVAL_DOCS:-8}"
EVAL_BYTES="${EVAL_BYTES:-600}"
MAX_TOKENS="${MAX_TOKENS:-1024}"
KEEPS="${KEEPS:-50 25 12.5}"
NAME="${NAME:-pruning}" # the JSON's name in OUTDIR, so another model's run does not overwrite the default's
SELECT="${SELECT:-greedy}"
[[ $SELECT == greedy || $SELECT == mass ]] || { echo "SELECT is greedy or mass, not $SELECT" >&2; exit 1; }
for d in $DOMAINS; do
  excerpt "$d" test "$EVAL_DOCS" "$EVAL_BYTES" "$WORK/test"
  excerpt "$d" valid "$CAL_DOCS" "$CAL_BYTES" "$WORK/cal"
  excerpt "$d" valid $((CAL_DOCS / 4)) "$CAL_BYTES" "$WORK/general"
done
general=()
for d in $DOMAINS; do general+=("$WORK/general/$d/valid.txt"); done
if [[ $SELECT == mass ]]; then
  for d in $DOMAINS; do
    "$BIN" profile --backend cpu --model "$MODEL" --corpus "$WORK/cal/$d/valid.txt" -o "$WORK/$d.profile.json" >&2
  done
  "$BIN" profile --backend cpu --model "$MODEL" --corpus "${general[@]}" -o "$WORK/general.profile.json" >&2
fi
# select_experts NAME KEEP OUT CORPUS...: the in-domain (NAME = a domain) or general selection of KEEP % of the experts.
select_experts() {
  local name=$1 k=$2 out=$3
  shift 3
  if [[ $SELECT == mass ]]; then
    "$BIN" prune --model "$MODEL" --keep "$k%" --profile "$WORK/$name.profile.json" -o "$out" >&2
  else
    "$BIN" prune --model "$MODEL" --keep "$k%" --greedy --corpus "$@" -o "$out" >&2
  fi
}

ev() { # ev OUT MODEL DOMAIN...
  local out=$1 model=$2
  shift 2
  local files=()
  for d in "$@"; do files+=("$WORK/test/$d/test.txt"); done
  "$BIN" eval --backend cpu --model "$model" --data "${files[@]}" --max-tokens "$MAX_TOKENS" --seed 0 -o "$out" 2>/dev/null
}
# One unit of work per (selection, keep): prune, then evaluate. Units are independent; JOBS of them run at
# once (default 1: every model sees the same masks either way, so JOBS changes only the wall time).
unit() { # unit NAME KEEP
  local name=$1 k=$2
  case $name in
    full) ev "$WORK/full.json" "$MODEL" $DOMAINS ;;
    general)
      select_experts general "$k" "$WORK/general.$k.edm" "${general[@]}"
      ev "$WORK/general.$k.json" "$WORK/general.$k.edm" $DOMAINS ;;
    random)
      "$BIN" prune --model "$MODEL" --keep "$k%" --selector random --seed 0 -o "$WORK/random.$k.edm" >&2
      ev "$WORK/random.$k.json" "$WORK/random.$k.edm" $DOMAINS ;;
    *)
      select_experts "$name" "$k" "$WORK/$name.$k.edm" "$WORK/cal/$name/valid.txt"
      ev "$WORK/$name.$k.json" "$WORK/$name.$k.edm" "$name" ;;
  esac
}
JOBS="${JOBS:-1}"
units=("full 100")
for k in $KEEPS; do
  units+=("general $k" "random $k")
  for d in $DOMAINS; do units+=("$d $k"); done
done
pids=()
for u in "${units[@]}"; do
  # shellcheck disable=SC2086
  unit $u &
  pids+=($!)
  while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$WORK" "$OUTDIR/$NAME.json" "$KEEPS" "$DOMAINS" "$SELECT" <<'PY'
import json, sys
work, out, keeps, domains, select = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split(), sys.argv[5]
load = lambda n: json.load(open(f"{work}/{n}.json"))["domains"]
full = load("full")
rows = []
for d in domains:
    base = full[d]["masked_accuracy"]
    row = {"domain": d, "tokens": full[d]["tokens"], "masked_tokens": full[d]["masked_tokens"],
           "full": {"masked_accuracy": base, "masked_nll": full[d]["masked_nll"]}}
    for k in keeps:
        for sel, name in (("in-domain", f"{d}.{k}"), ("general", f"general.{k}"), ("random", f"random.{k}")):
            r = load(name)[d]
            row[f"{sel}@{k}"] = {"masked_accuracy": r["masked_accuracy"], "masked_nll": r["masked_nll"],
                                 "relative_loss": (base - r["masked_accuracy"]) / base}
    rows.append(row)
json.dump({"keeps_percent": keeps, "selection": select, "rows": rows}, open(out, "w"), indent=1)
print("| domain | 100 % | " + " | ".join(f"{k} % {s}" for k in keeps for s in ("in-domain", "general", "random")) + " |")
print("|---|---|" + "---|" * (3 * len(keeps)))
for r in rows:
    cells = [f"{r['full']['masked_accuracy']:.3f}"]
    for k in keeps:
        for s in ("in-domain", "general", "random"):
            c = r[f"{s}@{k}"]
            cells.append(f"{c['masked_accuracy']:.3f} ({-100*c['relative_loss']:+.1f} %)")
    print(f"| {r['domain']} | " + " | ".join(cells) + " |")
PY
