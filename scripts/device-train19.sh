#!/usr/bin/env bash
# Issue 19's GPU-machine part: SmolLM2-135M-Instruct upcycled to a 32-expert MoE and trained as a block-diffusion
# model (training/smollm2/, training/README.md "SmolLM2"). One phase per device call; each is self-contained,
# resumable and writes its results under $OUT. The repository copy's gitignored files persist between calls
# while the machine is warm, so the chunks staged by earlier calls are still there for the later ones.
#
# Here first: /work/venv-zaya/bin/python training/smollm2/prepare.py   (makes training/carry/c0..c3 + manifest)
#             cargo build --release -p edgediff && mkdir -p .bin && strip -o .bin/edgediff target/release/edgediff
# Then, back to back (run tool):
#   bash scripts/device-train19.sh stage      carry ["training/carry/c0"]   (then c1, c2, c3: one call each)
#   bash scripts/device-train19.sh train      carry []          (<= 540 s: unpack, train to DEADLINE, save state)
#   bash scripts/device-train19.sh export     carry [".bin", ".gl"]  (HF export, convert q4/q8/f32, parity, bench
#                                              decode on the GPU, q4 pieces 0-3 of the .edm + logs to $OUT)
#   bash scripts/device-train19.sh return-2   carry []          (the q4 .edm's remaining pieces)
# Or, where the machine may be taken back between calls (it was, twice, 2026-12-05: a trained state
# exists only on the machine until the q4 file comes back), the last chunk's call does it all:
#   bash scripts/device-train19.sh stage      carry ["training/carry/c0"]   (then c1, c2)
#   bash scripts/device-train19.sh oneshot    carry ["training/carry/c3", ".bin/c", ".gl"]
#        (.bin/c/edgediff.xz: the binary xz-compressed; the plain one no longer fits beside c3)
#        (<= 600 s: stage c3, train to DEADLINE (300), export, convert q4 + f32, q4 pieces 0-3 back,
#        then parity and bench decode q4 while BUDGET (560 s from the start) lasts)
#   bash scripts/device-train19.sh return-2   carry []   (the q4 file is ~78 MiB: a call returns 64 MiB)
# Back here: bash training/smollm2/reassemble.sh models/smollm2-moe-q4.edm <dirs with the fetched files>
# Training across sessions (a state lives only on the machine): train and oneshot resume from the state
# there when one exists (RESUME=0: start from the upcycled plan). The state is student.q8delta.pt (the delta from
# the upcycled start, int8 per row: train_moe.py save_student) + state.json, ≈ 137 MB for the full model, so
# 9 pieces of 16 MB. A call returns at most 8 files of ≤ 16 MiB, 64 MiB in all; it carries ≤ 64 MiB with the
# ≈ 26 MB checkout. Before the session ends:
#   bash scripts/device-train19.sh state-out 0   carry []   (then 1, 2: 3 pieces a call, 3 calls; each says how many)
# here: bash training/smollm2/state_carry.sh <dirs with the fetched pieces>   (-> training/carry/s0..s4, 2 pieces
#       each, and prints the state-in calls)
# next session, after staging the bundle (c0..c3):
#   bash scripts/device-train19.sh state-in      carry ["training/carry/s0"]   (then s1..s4: 5 calls)
# Self-distillation chat (after run 3 the candidate answered 1 of 8 everyday questions, the base 4: the corpus has no
# everyday chat and training wore the base's away; training/README.md "Self-distillation chat"): the selfchat phase
# samples conversations (user question and assistant answer, both from the base, its own chat template) on the GPU,
# and train mixes them into 25 % of the rows (train_moe.py --selfchat-frac) and evaluates a `selfchat` domain.
# Call order (run 4's state, step 3,269, is in training/carry/s0..s4 and its selfchat stream in
# training/carry/selfchat: carry that with the first train call instead of the selfchat call):
#   bash scripts/device-train19.sh stage      carry ["training/carry/c0"]   (then c1, c2, c3: 4 calls)
#   bash scripts/device-train19.sh state-in   carry ["training/carry/s0"]   (then s1..s4: 5 calls)
#   bash scripts/device-train19.sh selfchat   carry []   (SELFCHAT_N = 8192 conversations into $DEV/selfchat, ~1-2 min
#        on the GPU; returns selfchat.piece.* + selfchat.sha256 (+ selfchat.json, selfchat.samples.md to read);
#        here: mkdir -p training/carry/selfchat && cp <files_at>/selfchat.piece.* <files_at>/selfchat.sha256 there)
#   bash scripts/device-train19.sh train      carry []   (resumes the state; selfchat rows from $DEV/selfchat; the
#        top-1 routers now learn from the loss, --router-grad st; repeat while time lasts)
#   then state-out 0..2 (and export, return-2) as above.
# A later session carries the stream instead of sampling it again: carry ["training/carry/selfchat"] with its first
# train (or oneshot) call; train unpacks it (sha256 checked) when $DEV/selfchat has none.
# Env: OUT (results), DEADLINE (train: seconds from start to saved state, 520), TRAIN_ARGS (extra train_moe.py
# flags, e.g. --selfchat-frac 0), PY (python3), EDGEDIFF (binary; .bin/edgediff or target/release/edgediff), PIECE
# (bytes, 16000000), SELFCHAT_N (8192), SELFCHAT_DEADLINE (selfchat.py: no batch started after it, 480 s),
# SELFCHAT_ARGS (extra selfchat.py flags: --batch, --max-new, --temperature, --top-p, --seed, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:?usage: device-train19.sh stage|selfchat|train|export|return-2|oneshot|state-out N|state-in}
OUT=${OUT:-/tmp/edgediff-train19}
PY=${PY:-python3}
# Absolute: state-out and export work inside it from subshells that cd elsewhere (a relative DEV broke
# state-out on the GPU machine, 2026-12-05).
DEV=$(realpath -m "${DEV:-training/runs/smollm2-dev}")   # gitignored: survives while the machine is warm
BUNDLE=$DEV/bundle
STATE=$DEV/state
SC_DIR=$DEV/selfchat   # selfchat.py's conversations sampled from the base (selfchat phase, or carried in)
SC_CARRY=training/carry/selfchat
PIECE=${PIECE:-16000000}
mkdir -p "$OUT" "$DEV"
LOG=$OUT/$PHASE.log
T0=$SECONDS
log() { echo "[$((SECONDS - T0))s] $*" | tee -a "$LOG" >&2; }

# Verifies the chunks present against their manifest and unpacks the bundle once all are there.
stage() {
  local man
  man=$(ls training/carry/c*/manifest.json "$DEV"/manifest.json 2>/dev/null | head -1)
  [[ -n "$man" ]] || { log "no training/carry/c*/manifest.json: run prepare.py here and carry a chunk"; return 1; }
  cp "$man" "$DEV/manifest.json" 2>/dev/null
  for d in training/carry/c*/; do
    [[ -f "$d/part" ]] || continue
    local n; n=$(basename "$d")
    if [[ ! -f "$DEV/$n.ok" ]]; then
      local want got
      want=$($PY -c "import json,sys; m=json.load(open('$DEV/manifest.json')); print([p['sha256'] for p in m['parts'] if p['dir'].endswith('/$n')][0])")
      got=$(sha256sum "$d/part" | cut -d' ' -f1)
      if [[ "$want" == "$got" ]]; then cp "$d/part" "$DEV/$n.part" && touch "$DEV/$n.ok" && log "$n: sha256 ok";
      else log "$n: sha256 MISMATCH ($got, want $want)"; fi
    fi
  done
  local total have
  total=$($PY -c "import json; print(len(json.load(open('$DEV/manifest.json'))['parts']))")
  have=$(ls "$DEV"/c*.ok 2>/dev/null | wc -l)
  log "chunks staged: $have of $total"
  ls -la "$DEV" >> "$LOG"
  if [[ -f "$BUNDLE/.done" ]]; then log "bundle already unpacked"; return 0; fi
  ((have == total)) || return 0
  local tarsum want
  for i in $(seq 0 $((total - 1))); do cat "$DEV/c$i.part"; done > "$DEV/bundle.tar"
  tarsum=$(sha256sum "$DEV/bundle.tar" | cut -d' ' -f1)
  want=$($PY -c "import json; print(json.load(open('$DEV/manifest.json'))['tar_sha256'])")
  if [[ "$tarsum" != "$want" ]]; then log "bundle sha256 MISMATCH ($tarsum, want $want)"; return 1; fi
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE" && tar -xf "$DEV/bundle.tar" -C "$BUNDLE" && rm -f "$DEV/bundle.tar"
  mkdir -p "$DEV/site"
  $PY -m pip install --no-index --no-deps --quiet --target "$DEV/site" "$BUNDLE"/wheel/*.whl >> "$LOG" 2>&1
  rm -f "$DEV"/c*.part
  touch "$BUNDLE/.done"
  log "bundle unpacked: $(du -sh "$BUNDLE" | cut -f1); gguf package in $DEV/site"
}

train() { # deadline
  stage || return 1
  [[ -f "$BUNDLE/.done" ]] || { log "bundle incomplete: stage every chunk first"; return 1; }
  nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
  local resume=() sc=()
  if have_state && [[ "${RESUME:-1}" != 0 ]]; then resume=(--resume "$STATE"); fi
  selfchat_in || return 1
  [[ -f "$SC_DIR/selfchat.train.u16" ]] && sc=(--selfchat "$SC_DIR")
  log "train (deadline $1 s${resume:+, resuming $STATE}${sc:+, selfchat rows from $SC_DIR})"
  PYTHONPATH="$DEV/site" $PY training/smollm2/train_moe.py train --bundle "$BUNDLE" --out "$STATE" \
    --deadline "$1" "${resume[@]}" "${sc[@]}" ${TRAIN_ARGS:-} 2>&1 | tee -a "$LOG" | grep -v '^{"step"' >&2
  local r=${PIPESTATUS[0]}
  cp "$STATE/state.json" "$OUT/" 2>/dev/null
  log "train exit $r"
  return "$r"
}

# Files that travel between sessions (the state, the selfchat stream) go as one tar cut into pieces of $PIECE bytes
# (a returned file may be 16 MiB at most) with a sha256 list: pack_pieces DIR NAME SRC FILES... writes
# DIR/NAME.piece.NN + DIR/NAME.sha256 from SRC's FILES; pieces_ok DIR NAME checks them; unpack_pieces DIR NAME DEST
# extracts them.
pack_pieces() {
  local dir=$1 name=$2 src=$3
  shift 3
  ( cd "$dir" && rm -f "$name".piece.* && tar -cf - -C "$src" "$@" \
    | split -b "$PIECE" -d -a 2 - "$name".piece. && sha256sum "$name".piece.* > "$name".sha256 )
}
pieces_ok() { ( cd "$1" && sha256sum -c --quiet "$2".sha256 ) >> "$LOG" 2>&1; }
unpack_pieces() { mkdir -p "$3" && cat "$1"/"$2".piece.* | tar -xf - -C "$3"; }

# Self-distillation chat: selfchat.py samples SELFCHAT_N conversations (8192) from the dense base into $SC_DIR
# (selfchat.{train,valid}.u16 in the bundle's document format), which `train` then mixes in (--selfchat-frac, 0.25).
# The stream (train + valid + selfchat.json, one tar) also comes back in pieces of $PIECE bytes with their sha256
# list, to be carried into later sessions as training/carry/selfchat/ (train unpacks it there when $SC_DIR is empty).
selfchat_phase() {
  stage || return 1
  [[ -f "$BUNDLE/.done" ]] || { log "bundle incomplete: stage every chunk first"; return 1; }
  nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
  rm -rf "$SC_DIR"   # a new sample replaces the one here
  log "selfchat: ${SELFCHAT_N:-8192} conversations from the base (deadline ${SELFCHAT_DEADLINE:-480} s)"
  PYTHONPATH="$DEV/site" $PY training/smollm2/selfchat.py --bundle "$BUNDLE" --out "$SC_DIR" \
    --n "${SELFCHAT_N:-8192}" --deadline "${SELFCHAT_DEADLINE:-480}" ${SELFCHAT_ARGS:-} 2>&1 | tee -a "$LOG" >&2
  local r=${PIPESTATUS[0]}
  ((r == 0)) || { log "selfchat.py exit $r"; return "$r"; }
  pack_pieces "$SC_DIR" selfchat "$SC_DIR" selfchat.train.u16 selfchat.valid.u16 selfchat.json || return 1
  local n; n=$(ls "$SC_DIR"/selfchat.piece.* | wc -l)
  ((n <= 5)) || log "WARNING: $n pieces, more than one call returns (8 files, 64 MiB): fewer SELFCHAT_N"
  cp "$SC_DIR"/selfchat.piece.* "$SC_DIR"/selfchat.{sha256,json,samples.md} "$OUT/"
  log "selfchat: $(stat -c %s "$SC_DIR/selfchat.train.u16") + $(stat -c %s "$SC_DIR/selfchat.valid.u16") bytes" \
    "(train + valid) in $n piece(s) in \$OUT; here: cp them and selfchat.sha256 into $SC_CARRY/"
}

# The carried selfchat stream (training/carry/selfchat: pieces + sha256 list) unpacked into $SC_DIR unless a stream
# is already there (sampled on this machine by the selfchat phase).
selfchat_in() {
  [[ -f "$SC_DIR/selfchat.train.u16" ]] && return 0
  [[ -f "$SC_CARRY/selfchat.sha256" ]] || return 0
  pieces_ok "$SC_CARRY" selfchat || { log "$SC_CARRY: sha256 MISMATCH or piece missing"; return 1; }
  unpack_pieces "$SC_CARRY" selfchat "$SC_DIR" || return 1
  log "selfchat stream from $SC_CARRY: $(stat -c %s "$SC_DIR/selfchat.train.u16") bytes (train)"
}

export_model() {
  have_state || { log "no trained state in $STATE (run train first, same warm machine)"; return 1; }
  BIN=$(binary) || return 1
  source scripts/lib/device-vulkan.sh
  local rc=0
  HF=$DEV/hf
  # The essential part first (q4 file in pieces to $OUT), then checks and benchmarks while the budget lasts.
  run_for() { local lim=$1; shift; local l=$((BUDGET - (SECONDS - T0))); ((l < lim)) && lim=$l
              if ((lim < 10)); then log "skipped (budget): $*"; return 1; fi; timeout "$lim" "$@"; }
  BUDGET=${BUDGET:-560}
  PYTHONPATH="$DEV/site" run_for 120 $PY training/smollm2/train_moe.py export --bundle "$BUNDLE" --state "$STATE" \
    --out "$HF" >> "$LOG" 2>&1 || rc=1
  local dts="q4 q8 f32"; [[ -n "${QUICK:-}" ]] && dts="q4 f32"
  for dt in $dts; do
    run_for 120 "$BIN" convert "$HF" -o "$DEV/smollm2-moe-$dt.edm" --dtype $dt --mask-token-id 4 --block-size 16 \
      >> "$LOG" 2>&1 || { log "convert $dt failed"; rc=1; }
    if [[ $dt == q4 ]]; then
      ( cd "$DEV" && rm -f q4.piece.* && split -b "$PIECE" -d -a 1 smollm2-moe-q4.edm q4.piece. \
        && sha256sum smollm2-moe-q4.edm q4.piece.* > q4.sha256 )
      cp "$DEV/q4.sha256" "$OUT/"
      local pat='[0-3]'; [[ $PIECES == all ]] && pat='*'
      for p in "$DEV"/q4.piece.$pat; do [[ -f "$p" ]] && cp "$p" "$OUT/"; done
      log "q4 file $(stat -c %s "$DEV/smollm2-moe-q4.edm") bytes in $(ls "$DEV"/q4.piece.* | wc -l) pieces; $PIECES in \$OUT"
    fi
  done
  log "parity (edgediff CPU vs PyTorch, f32)"
  run_for 120 $PY training/smollm2/train_moe.py parity --hf "$HF" --edm "$DEV/smollm2-moe-f32.edm" --edgediff "$BIN" \
    --tokenizer "$HF/tokenizer.json" >> "$LOG" 2>&1 || { log "parity failed"; rc=1; }
  rm -f "$DEV/smollm2-moe-f32.edm"
  "$BIN" devices >> "$LOG" 2>&1
  log "generate (q4, GPU, chat)"
  run_for 40 "$BIN" generate --backend gpu --chat --model "$DEV/smollm2-moe-q4.edm" --max-tokens 64 \
    "What is the capital of France?" >> "$LOG" 2>&1
  local benches="q4 q8"; [[ -n "${QUICK:-}" ]] && benches="q4"
  for dt in $benches; do
    log "bench decode $dt"
    run_for 110 "$BIN" bench decode --backend gpu --model "$DEV/smollm2-moe-$dt.edm" --max-tokens 64 \
      --thresholds 0.5,0.7,0.9 --betas 1,0.8,0.5 > "$OUT/decode-$dt.md" 2>> "$LOG" || { log "bench $dt failed"; rc=1; }
  done
  log "export done, exit $rc"
  return $rc
}

binary() {
  local b=${EDGEDIFF:-}
  # The checkout (≈ 25 MB), c3 (29 MB) and a plain binary (17 MB) pass the 64 MiB a call carries:
  # oneshot carries the binary xz-compressed (`xz -3 -c .bin/edgediff > .bin/c/edgediff.xz`, 5 MB).
  if [[ -z "$b" && ! -x .bin/edgediff && -f .bin/c/edgediff.xz ]]; then
    xz -dc .bin/c/edgediff.xz > .bin/edgediff && chmod +x .bin/edgediff
  fi
  for c in .bin/edgediff target/release/edgediff; do [[ -z "$b" && -x "$c" ]] && b=$c; done
  [[ -n "$b" ]] || { log "no edgediff binary (carry .bin)"; return 1; }
  echo "$b"
}

# The trained state out in pieces a call can return and back in the next session as carried chunks, so training
# resumes across sessions. Pieces of $PIECE bytes (16000000 ≤ 16 MiB, the most a returned file may be); 3 a call
# (48 MB of the 64 MiB a call returns) with the sha256 list and state.json. The compact student
# (student.q8delta.pt) is what travels; a state saved before it (student.pt, bf16) still does, twice the calls.
student_file() {
  local f
  for f in student.q8delta.pt student.pt; do [[ -f "$STATE/$f" ]] && { echo "$f"; return 0; }; done
  return 1
}
have_state() { student_file > /dev/null; }

state_out() { # call index N: pieces 3N, 3N+1, 3N+2
  local f; f=$(student_file) || { log "no trained state in $STATE"; return 1; }
  local sums=$DEV/state.sha256
  if [[ ! -f "$sums" || "$STATE/$f" -nt "$sums" || "$STATE/state.json" -nt "$sums" ]]; then
    pack_pieces "$DEV" state "$STATE" "$f" state.json || return 1
  fi
  local n calls i p sent=()
  n=$(ls "$DEV"/state.piece.* | wc -l); calls=$(((n + 2) / 3))
  ((${1} < calls)) || { log "no call $1: $n pieces, calls 0..$((calls - 1))"; return 1; }
  for i in $((3 * $1)) $((3 * $1 + 1)) $((3 * $1 + 2)); do
    p="$DEV/state.piece.$(printf %02d "$i")"
    [[ -f "$p" ]] && cp "$p" "$OUT/" && sent+=("$i")
  done
  cp "$DEV/state.sha256" "$STATE/state.json" "$OUT/"
  log "state ($f, $(stat -c %s "$STATE/$f") bytes): pieces ${sent[*]} of 0..$((n - 1)) in \$OUT;" \
    "state-out calls needed: $calls (N = 0..$((calls - 1)))"
}

state_in() {
  mkdir -p "$DEV/statein"
  for d in training/carry/s*/; do
    [[ -f "$d/state.sha256" ]] || continue
    cp "$d"/state.piece.* "$d/state.sha256" "$DEV/statein/" 2>/dev/null
  done
  [[ -f "$DEV/statein/state.sha256" ]] || { log "no training/carry/s*/state.sha256 carried"; return 1; }
  local want have
  want=$(wc -l < "$DEV/statein/state.sha256"); have=$(ls "$DEV"/statein/state.piece.* 2>/dev/null | wc -l)
  log "state pieces here: $have of $want"
  ((have == want)) || return 0
  pieces_ok "$DEV/statein" state || { log "state pieces: sha256 MISMATCH"; return 1; }
  # The carried state replaces the one here (whichever form it was in).
  mkdir -p "$STATE" && rm -f "$STATE"/student*.pt && unpack_pieces "$DEV/statein" state "$STATE" \
    && rm -rf "$DEV/statein"
  log "state restored: $($PY -c "import json; m=json.load(open('$STATE/state.json')); print(m['steps'], 'steps,', round(m['tokens']/1e6, 1), 'M tokens')")"
}

case "$PHASE" in
  state-out)
    state_out "${2:-0}"; rc=$?
    ;;
  state-in)
    state_in; rc=$?
    ;;
  stage)
    stage; rc=$?
    ;;
  selfchat)
    selfchat_phase; rc=$?
    ;;
  train)
    train "${DEADLINE:-520}"; rc=$?
    ;;
  oneshot)
    # Training and export in one call: a trained state lives only on the machine, which may be
    # taken back between calls; the q4 file's first 4 pieces come back with this call.
    train "${DEADLINE:-300}" || exit 1
    BUDGET=${BUDGET:-560} PIECES=0-3 QUICK=1 export_model; rc=$?
    ;;
  export)
    PIECES=${PIECES:-0-3} export_model; rc=$?
    ;;
  return-2)
    ls "$DEV"/q4.piece.* >/dev/null 2>&1 || { log "no pieces (run export first, same warm machine)"; exit 1; }
    cp "$DEV/q4.sha256" "$OUT/"
    n=0
    for p in "$DEV"/q4.piece.[4-9]; do [[ -f "$p" ]] && cp "$p" "$OUT/" && n=$((n + 1)); done
    log "$n more pieces in \$OUT"
    rc=0
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
exit "${rc:-0}"
