#!/usr/bin/env bash
# Runs the emulator's SDK referee suites: Python (pytest) and, when node is installed, JS.
# Usage: tests/sdk/run.sh [pytest args...]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cargo build --manifest-path "$root/Cargo.toml"
venv="$root/target/sdk-venv"
if [ ! -x "$venv/bin/pytest" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$root/tests/sdk/requirements.txt"
fi
"$venv/bin/pytest" "$root/tests/sdk" -q "$@"
if command -v node >/dev/null 2>&1; then
  (cd "$root/tests/js" && npm ci --silent --no-audit --no-fund && node --test)
else
  echo "node not found: skipping the JS referee" >&2
fi
