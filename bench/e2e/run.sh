#!/usr/bin/env bash
# The end-to-end benchmark in one command: hybrid-worker (spawn and fork mode, trivial and pandas
# jobs) against Celery 5 on a local Redis, and the floors. Installs what it needs (redis-server
# from Debian, the harness's Python packages from PyPI, the bench workers' hash-pinned venvs),
# builds the release binary, then runs bench/e2e/bench.py, which writes bench/results/e2e-*.json
# and .png and prints whether each target is met. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v redis-server >/dev/null; then
  echo "== redis-server (Debian package)"
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi

VENV="$PWD/target/bench-venv"
if [ ! -x "$VENV/bin/python" ] || ! cmp -s bench/e2e/requirements.txt "$VENV/requirements.txt"; then
  echo "== harness venv (celery, redis, azure-servicebus, matplotlib)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r bench/e2e/requirements.txt
  cp bench/e2e/requirements.txt "$VENV/requirements.txt"
fi

echo "== release build"
cargo build --release --locked --quiet

echo "== bench worker venvs (pandas is hash-pinned)"
HYBRID__WORKERS__DIR=bench/workers HYBRID__WORKERS__VENV_ROOT="$PWD/target/bench-venvs" \
  HYBRID__LOG__FORMAT=text target/release/hybrid-worker workers build >/dev/null
HYBRID__WORKERS__VENV_ROOT="${HYBRID_TEST_VENV_ROOT:-$PWD/target/test-venvs}" \
  HYBRID__LOG__FORMAT=text target/release/hybrid-worker workers build >/dev/null

echo "== benchmark"
exec "$VENV/bin/python" bench/e2e/bench.py
