#!/usr/bin/env bash
# GenAI-Perf in an environment of its own (.venv-genai: it is heavy, and the test environment stays
# lean), with this repository's perf_analyzer on PATH. Sets up on first use, then runs genai-perf:
#   scripts/genai_perf.sh profile -m ensemble --endpoint-type kserve --backend tensorrtllm ...
# Results go to ./artifacts (ignored by git).
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
exec "$VENV/bin/genai-perf" "$@"
