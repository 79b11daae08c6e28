#!/usr/bin/env bash
# ZeroShot Server's two commands (and their shared set-up step):
#   ./dev.sh serve   set up .venv if needed, then `bentoml serve` on port 3000 (ZSS_* settings from the environment)
#   ./dev.sh test    set up .venv if needed, then ruff (lint, format), the import contracts and the whole test suite
#                    (what .ci/run runs)
#   ./dev.sh setup   only the set-up step
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
  # Re-install only when the requirement files changed since the last set-up.
  local stamp="$VENV/.requirements.sha"
  local want
  want=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
}

case "${1:-}" in
  setup)
    setup
    ;;
  serve)
    setup
    shift
    exec "$VENV/bin/bentoml" serve service:ZeroShot --host "${ZSS_HOST:-0.0.0.0}" --port "${ZSS_PORT:-3000}" "$@"
    ;;
  test)
    setup
    shift
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/lint-imports"  # the layer contracts (pyproject.toml)
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh serve|test|setup" >&2
    exit 2
    ;;
esac
