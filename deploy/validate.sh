#!/usr/bin/env bash
# Validates what deploy/ and the Dockerfile describe, without a cluster, a Docker engine,
# kubectl, terraform or bicep (none of them can be installed on this project's machines):
#
#   1. Dockerfile: hadolint (deploy/hadolint.yaml), then check_dockerfile.py: every COPY source
#      exists and is not excluded by .dockerignore, the build context holds everything the Rust
#      build reads, and the image's contract (USER, ENTRYPOINT, CMD, venvs built ahead).
#   2. deploy/aks: render.py renders the base and every overlay (the kustomize subset used);
#      check_manifests.py validates them against Kubernetes' schemas (kubernetes-validate,
#      for each version in K8S_VERSIONS) and KEDA's (deploy/schemas/keda-v1alpha1.json), and
#      checks the project's rules (drain, memory, security context, references).
#      The memory, /tmp and PID budgets come from deploy/validate/budgets.py.
#   3. deploy/azure: check_terraform.py, a structural check of the Terraform (provider settings,
#      lock file, node pool budgets, monitoring); check_rules.py, the alert rules
#      (deploy/monitoring) against the metrics the daemon exports; selftest_terraform.py, broken
#      copies of both refused; `terraform fmt -check` too where a terraform CLI is installed.
#   (deploy/image-smoke.sh, which builds and runs the image's file system, is separate: it
#   needs root and the network.)
#
# Tools install once into target/deploy-venv from deploy/validate/requirements.txt (pinned);
# after that the script runs offline in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS="${K8S_VERSIONS:-1.31 1.33 1.35}"
VENV="$PWD/target/deploy-venv"
REQS=deploy/validate/requirements.txt
if [ ! -x "$VENV/bin/hadolint" ] || ! cmp -s "$REQS" "$VENV/requirements.txt"; then
  echo "== deploy: installing the validators into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$REQS"
  cp "$REQS" "$VENV/requirements.txt"
fi
PY="$VENV/bin/python"
OUT="$PWD/target/deploy-rendered"
mkdir -p "$OUT"
failed=0

echo "== deploy: Dockerfile"
"$VENV/bin/hadolint" --config deploy/hadolint.yaml Dockerfile && echo "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'): ok" || failed=1
"$PY" deploy/validate/check_dockerfile.py || failed=1

echo "== deploy: Kubernetes manifests (Kubernetes $K8S_VERSIONS, KEDA keda.sh/v1alpha1)"
k_args=()
for v in $K8S_VERSIONS; do k_args+=(-k "$v"); done
for dir in deploy/aks/base deploy/aks/overlays/*/; do
  dir="${dir%/}"
  name="$(echo "$dir" | sed 's#deploy/aks/##; s#/#-#g')"
  if ! "$PY" deploy/validate/render.py "$dir" > "$OUT/$name.yaml"; then
    echo "  FAIL $dir does not render"; failed=1; continue
  fi
  final=()
  [ "$dir" = deploy/aks/base ] || final=(--final)
  "$PY" deploy/validate/check_manifests.py "${final[@]}" "${k_args[@]}" "$OUT/$name.yaml" || failed=1
done

"$PY" deploy/validate/selftest.py "$OUT/overlays-example.yaml" "$OUT/overlays-userns.yaml" || failed=1

echo "== deploy: Terraform (deploy/azure) and alert rules (deploy/monitoring)"
"$PY" deploy/validate/check_terraform.py deploy/azure || failed=1
"$PY" deploy/validate/check_rules.py || failed=1
"$PY" deploy/validate/selftest_terraform.py deploy/azure || failed=1
# The terraform CLI is not installable from the registries, but this machine kind's image has
# one: use it for formatting where it is there. `terraform validate` would need the azurerm
# provider, which cannot be downloaded here.
if command -v terraform >/dev/null; then
  : > "$OUT/empty.tfrc"
  export TF_CLI_CONFIG_FILE="$OUT/empty.tfrc"
  if terraform fmt -check -diff deploy/azure; then
    echo "terraform fmt -check ($(terraform version | head -1)): ok"
  else
    echo "  FAIL terraform fmt: run \`terraform fmt deploy/azure\`"; failed=1
  fi
else
  echo "terraform not on PATH: formatting not checked"
fi

if [ "$failed" -ne 0 ]; then
  echo "deploy: validation FAILED"
  exit 1
fi
echo "deploy: all checks passed"
