#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds the binary, installs what the tests need
# (each worker's pinned venv, from PyPI in hash-checking mode), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 - <<'PY'
import sys
if sys.version_info < (3, 9):
    sys.exit(f"tests need Python 3.9 or newer, found {sys.version.split()[0]}")
PY

# As root, jobs run as uid 65534, which must reach the venvs: inside the checkout when it can
# (a checkout under /root, mode 700, it cannot), else in the daemon's own system folder.
if [ -z "${HYBRID_TEST_VENV_ROOT:-}" ]; then
  HYBRID_TEST_VENV_ROOT="$PWD/target/test-venvs"
  if [ "$(id -u)" = 0 ] && ! setpriv --reuid=65534 --regid=65534 --clear-groups -- test -x "$PWD" 2>/dev/null; then
    HYBRID_TEST_VENV_ROOT=/var/lib/hybrid-worker/test-venvs
  fi
fi
export HYBRID_TEST_VENV_ROOT
# The job-cgroup tests need root and a writable cgroup v2 folder. CI has both, so there a test
# that cannot run fails rather than skips; set HYBRID_TEST_REQUIRE_CGROUP=0 where they are missing.
export HYBRID_TEST_REQUIRE_CGROUP="${HYBRID_TEST_REQUIRE_CGROUP:-1}"
# The interpreter-pin tests (tests/it/python_pin.rs) run a worker pinned to Python 3.12, which
# CI has (pyenv); set HYBRID_TEST_REQUIRE_PYTHONS=0 on a host without it to skip them instead.
export HYBRID_TEST_REQUIRE_PYTHONS="${HYBRID_TEST_REQUIRE_PYTHONS:-1}"

echo "== build"
cargo build --locked --workspace --all-targets

echo "== worker venvs (in $HYBRID_TEST_VENV_ROOT)"
HYBRID__WORKERS__VENV_ROOT="$HYBRID_TEST_VENV_ROOT" HYBRID__LOG__FORMAT=text \
  target/debug/hybrid-worker workers build

echo "== Azurite (npm azurite, pinned in tests/azurite/package-lock.json) for the claim-check tests"
# tests/it/storage.rs, tests/sdk/test_storage.py and bench/storage start it on free ports; without
# it they fail (HYBRID_TEST_REQUIRE_AZURITE=0 makes the Rust ones skip instead).
(cd tests/azurite && npm ci --silent --no-audit --no-fund)

echo "== cargo test"
cargo test --locked --workspace --all-targets

echo "== Service Bus SDK suite (azure-servicebus, pinned) against the emulator and the daemon"
SDK_VENV="$PWD/target/sdk-venv"
if [ ! -x "$SDK_VENV/bin/pytest" ] || ! cmp -s tests/sdk/requirements.txt "$SDK_VENV/requirements.txt"; then
  rm -rf "$SDK_VENV"
  python3 -m venv "$SDK_VENV"
  "$SDK_VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  cp tests/sdk/requirements.txt "$SDK_VENV/requirements.txt"
fi
HYBRID_WORKER_BIN="$PWD/target/debug/hybrid-worker" "$SDK_VENV/bin/pytest" tests/sdk -q -p no:cacheprovider

echo "== JS SDK referee (@azure/service-bus, pinned in tests/js/package-lock.json)"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  (cd tests/js && npm ci --silent --no-audit --no-fund && HYBRID_WORKER_BIN="$OLDPWD/target/debug/hybrid-worker" node --test)
else
  echo "node and npm are not installed: the JS referee did not run" >&2
fi
