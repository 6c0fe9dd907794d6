#!/usr/bin/env bash
# GenAI-Perf in an environment of its own (.venv-genai: it is heavy, and the test environment stays
# lean), with this repository's perf_analyzer on PATH. Sets up on first use.
#
#   scripts/genai_perf.sh mix [chat|completions]   # an adapter mix against the OpenAI server of `make serve`
#   scripts/genai_perf.sh profile ...              # any genai-perf command
#
# The mix: streamed requests whose `model` GenAI-Perf picks at random from a list in which the most
# popular adapter appears 16 times and every other model (the base included) once: 80% of requests go
# to 20% of the models. OPENAI_URL (localhost:9000), LORA_ADAPTER_DIR / LORA_BASE_MODEL (the demo),
# HOT (the popular adapter: the first by name), CONCURRENCY (8), REQUESTS (200), INPUT_TOKENS (128),
# OUTPUT_TOKENS (64). Results go to ./artifacts (ignored by git).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv-genai
bash "$ROOT/scripts/setup.sh" >/dev/null  # perf_analyzer and its libraries
want=$(sha256sum <"$ROOT/scripts/genai_perf_requirements.txt" | cut -d' ' -f1)
if [[ $(cat "$VENV/.requirements.sha256" 2>/dev/null) != "$want" ]]; then
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r "$ROOT/scripts/genai_perf_requirements.txt"
  echo "$want" >"$VENV/.requirements.sha256"
fi
export PATH="$ROOT/.venv/bin:$PATH"
[[ ${1:-} == mix ]] || exec "$VENV/bin/genai-perf" "$@"

endpoint=${2:-chat}
adapter_dir=${LORA_ADAPTER_DIR:-$ROOT/.demo/adapters}
mapfile -t adapters < <("$ROOT/.venv/bin/python" -c '
import sys
from backend.naming import adapter_folders
print("\n".join(f.name for f in adapter_folders(sys.argv[1])))' "$adapter_dir")
(( ${#adapters[@]} )) || { echo "genai_perf.sh: no adapters in $adapter_dir" >&2; exit 1; }
hot=${HOT:-${adapters[0]}}
models=()
for _ in $(seq 16); do models+=("$hot"); done
for name in base "${adapters[@]}"; do [[ $name == "$hot" ]] || models+=("$name"); done
exec "$VENV/bin/genai-perf" profile -m "${models[@]}" --model-selection-strategy random \
  --endpoint-type "$endpoint" --streaming -u "${OPENAI_URL:-localhost:9000}" \
  --tokenizer "${LORA_BASE_MODEL:-$ROOT/.demo/base}" --concurrency "${CONCURRENCY:-8}" \
  --request-count "${REQUESTS:-200}" --warmup-request-count 8 \
  --synthetic-input-tokens-mean "${INPUT_TOKENS:-128}" --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean "${OUTPUT_TOKENS:-64}" --extra-inputs ignore_eos:true --random-seed 0 \
  --profile-export-file "mix-$endpoint.json"
