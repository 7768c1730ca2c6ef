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

echo "== bench workers, and a fork and a pandas worker pinned to each of: ${HYBRID_BENCH_PYTHONS:=3.11 3.12 3.13}"
# target/bench-workers: bench/workers as they are (on workers.python), plus noop-fork-py3XX and
# pandas-fork-py3XX pinned with `python = "3.X"` (docs/workers.md). A Python the host lacks
# fails here with the command that installs it; HYBRID_BENCH_PYTHONS="3.12" runs fewer.
WORKERS="$PWD/target/bench-workers"
rm -rf "$WORKERS" && mkdir -p "$WORKERS" && cp -r bench/workers/. "$WORKERS/"
for version in $HYBRID_BENCH_PYTHONS; do
  for base in noop-fork pandas-fork; do
    pinned="$WORKERS/$base-py${version/./}"
    cp -r "bench/workers/$base" "$pinned"
    printf 'python = "%s"\n' "$version" >>"$pinned/worker.toml"
  done
done
export HYBRID_BENCH_PYTHONS HYBRID_BENCH_WORKERS="$WORKERS"
echo "== bench worker venvs (pandas is hash-pinned, one hash per CPython wheel)"
HYBRID__WORKERS__DIR="$WORKERS" HYBRID__WORKERS__VENV_ROOT="$PWD/target/bench-venvs" \
  HYBRID__LOG__FORMAT=text target/release/hybrid-worker workers build >/dev/null
HYBRID__WORKERS__VENV_ROOT="${HYBRID_TEST_VENV_ROOT:-$PWD/target/test-venvs}" \
  HYBRID__LOG__FORMAT=text target/release/hybrid-worker workers build >/dev/null

echo "== benchmark"
exec "$VENV/bin/python" bench/e2e/bench.py
