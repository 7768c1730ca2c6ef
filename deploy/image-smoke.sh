#!/usr/bin/env bash
# Proves the container image without Docker: builds the runtime stage's file system from
# Debian's packages (debootstrap) by executing the Dockerfile's own steps, starts the daemon in
# it as the image's non-root USER with a read-only root and a writable /tmp only, runs one job of
# every shipped worker through the embedded emulator, and checks every reply.
# deploy/validate/image_smoke.py says what exactly; deploy/operator-guide.md what it does not
# cover. Needs root, network to Debian's archive, PyPI and crates.io (as `docker build` does),
# and debootstrap (installed here when missing). Exits non-zero on any failure.
#
#   deploy/image-smoke.sh
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
exec python3 deploy/validate/image_smoke.py "$@"
