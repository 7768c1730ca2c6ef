#!/usr/bin/env bash
# Emulator throughput with Microsoft's Python SDK: one command, release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --locked
VENV="$PWD/target/sdk-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r tests/sdk/requirements.txt
fi
exec "$VENV/bin/python" bench/emulator/throughput.py
