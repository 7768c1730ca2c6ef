#!/usr/bin/env bash
# Measures the job sandbox's start-up cost per job (release build): bench/sandbox/run.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo run --quiet --release --example sandbox_bench -- "${1:-30}"
