#!/usr/bin/env bash
# Proves the container image without Docker: builds the runtime stage's file system from
# Debian's packages (debootstrap) by executing the Dockerfile's own steps, starts the daemon in
# it as the image's non-root USER with a read-only root and a writable /tmp only, runs one job of
# every shipped worker through the embedded emulator, and checks every reply.
# deploy/validate/image_smoke.py says what exactly; deploy/operator-guide.md what it does not
# cover. Needs root, network to Debian's archive, PyPI and crates.io (as `docker build` does),
# and debootstrap (installed here when missing). Exits non-zero on any failure.
#
#   deploy/image-smoke.sh            the image as deploy/aks deploys it (uid 10001)
#   deploy/image-smoke.sh --userns   and as deploy/aks/overlays/userns does (hostUsers: false)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "image smoke: run as root (debootstrap, chroot and namespaces need it)" >&2
  exit 1
fi
missing=()
for tool in debootstrap ip objcopy; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing debootstrap, iproute2 and binutils (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap iproute2 binutils >/dev/null
fi
# PyYAML (pinned in deploy/validate/requirements.txt) reads the userns overlay.
PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  VENV="$PWD/target/image-smoke-venv"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$(grep -i '^PyYAML==' deploy/validate/requirements.txt)"
  fi
  PY="$VENV/bin/python"
fi
exec "$PY" deploy/validate/image_smoke.py "$@"
