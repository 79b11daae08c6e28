#!/usr/bin/env bash
# ZeroShot Server's two commands (and their shared set-up step):
#   ./dev.sh serve   set up .venv if needed, then `bentoml serve` on port 3000 (ZSS_* settings from the environment)
#   ./dev.sh test    set up .venv if needed, then ruff (lint, format), the import contracts and the whole test suite
#                    (what .ci/run runs); installs Debian's chromium (the web page's tests) and redis-server (the
#                    replica tests) if missing (as root), and builds the image the container tests run (podman; the
#                    machine's extra CAs are trusted in its stand-in base images, --host-cas)
#   ./dev.sh image   the bento's OCI image with podman (deploy/image.sh: installs podman as root, makes base images from
#                    Debian's packages where no registry answers); options go to deploy/image.sh
#   ./dev.sh setup   only the set-up step
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv

setup() {
  # Re-install only when the requirement files changed since the last set-up.
  local stamp="$VENV/.requirements.sha"
  local want
  want=$(cat requirements.txt requirements-dev.txt requirements-ray.txt | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements-dev.txt -r requirements-ray.txt
  echo "$want" > "$stamp"
}

# The web page's tests drive Debian's Chromium (never a downloaded browser): install it when it is missing and we are
# root (CI); otherwise stop with the reason. The tests themselves fail, never skip, without a browser.
ensure_chromium() {
  local chromium=${ZSS_CHROMIUM:-/usr/bin/chromium}
  [ -x "$chromium" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "dev.sh: $chromium is missing; installing Debian's chromium (apt-get)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  fi
  if [ ! -x "$chromium" ]; then
    echo "dev.sh: the web page's tests need Chromium at $chromium: run 'apt-get install -y chromium' as root" \
         "(or set ZSS_CHROMIUM to a Chromium binary); never 'playwright install'" >&2
    exit 1
  fi
}

# The replica tests run a real Redis (Debian's redis-server, started by the tests on a port of their own): install it
# when missing and we are root (CI); otherwise stop with the reason. The tests fail, never skip, without it.
ensure_redis() {
  local server=${ZSS_REDIS_SERVER:-/usr/bin/redis-server}
  [ -x "$server" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "dev.sh: $server is missing; installing Debian's redis-server (apt-get)" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
  fi
  if [ ! -x "$server" ]; then
    echo "dev.sh: the replica tests need redis-server at $server: run 'apt-get install -y redis-server' as root" \
         "(or set ZSS_REDIS_SERVER to a redis-server binary)" >&2
    exit 1
  fi
}

case "${1:-}" in
  setup)
    setup
    ;;
  image)
    setup
    shift
    exec bash deploy/image.sh "$@"
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
    ensure_chromium
    ensure_redis
    # tests/deploy run this image under podman (a failed build fails the run: those tests never skip).
    echo "dev.sh: building the bento's image for the container tests (deploy/image.sh)" >&2
    ZSS_TEST_IMAGE=$(bash deploy/image.sh --host-cas)
    export ZSS_TEST_IMAGE
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh serve|test|image|setup" >&2
    exit 2
    ;;
esac
