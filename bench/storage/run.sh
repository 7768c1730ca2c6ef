#!/usr/bin/env bash
# Claim-check throughput and memory in one command: installs Azurite (npm, pinned in
# tests/azurite) and the SDK harness (tests/sdk/requirements.txt), builds the release binary and
# the diagnostics worker's venv, then runs bench/storage/bench.py for 5 MB and 50 MB inputs and
# writes bench/results/storage-<date>.json. About a minute on 2 cores after the build.
set -euo pipefail
cd "$(dirname "$0")/../.."

(cd tests/azurite && npm ci --silent --no-audit --no-fund)

VENV="$PWD/target/sdk-venv"
if [ ! -x "$VENV/bin/pytest" ] || ! cmp -s tests/sdk/requirements.txt "$VENV/requirements.txt"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  cp tests/sdk/requirements.txt "$VENV/requirements.txt"
fi

cargo build --release --locked --quiet
export HYBRID_TEST_VENV_ROOT="${HYBRID_TEST_VENV_ROOT:-$PWD/target/test-venvs}"
HYBRID__WORKERS__VENV_ROOT="$HYBRID_TEST_VENV_ROOT" HYBRID__LOG__FORMAT=text \
  target/release/hybrid-worker workers build diagnostics >/dev/null

HYBRID_WORKER_BIN="$PWD/target/release/hybrid-worker" "$VENV/bin/python" bench/storage/bench.py \
  --sizes-mb "${SIZES_MB:-5,50}" --runs "${RUNS:-3}" \
  --out "bench/results/storage-$(date -u +%F).json"
