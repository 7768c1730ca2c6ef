"""Proves the manifest checks bite: each mutation of the rendered example overlay must be
refused by check_manifests.py. Usage: selftest.py RENDERED_OVERLAY.yaml"""

import subprocess
import sys
import tempfile
from pathlib import Path

MUTATIONS = {
    "a misspelled field (Kubernetes schema, strict)": ("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true"),
    "a grace period shorter than the drain rule": ("terminationGracePeriodSeconds: 150", "terminationGracePeriodSeconds: 90"),
    "a non-numeric KEDA messageCount (KEDA schema)": ("messageCount: '8'", "messageCount: 'eight'"),
    "KEDA scaling another queue than the daemon's": ("queueName: jobs", "queueName: job"),
    "privilege escalation allowed": ("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"),
    "a NetworkPolicy that opens port 80": ("port: 5671", "port: 80"),
    "a probe on another port": ("port: http", "port: 8080"),
    "the base's placeholder client id": ("11111111-2222-3333-4444-555555555555", "00000000-0000-0000-0000-000000000000"),
}


def main() -> int:
    rendered = Path(sys.argv[1]).read_text()
    check = Path(__file__).with_name("check_manifests.py")
    bad = 0
    for what, (old, new) in MUTATIONS.items():
        if old not in rendered:
            print(f"  FAIL selftest: {what}: {old!r} is not in the rendered overlay")
            bad += 1
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(rendered.replace(old, new, 1))
            f.flush()
            r = subprocess.run([sys.executable, str(check), "--final", f.name], capture_output=True, text=True)
        if r.returncode == 0:
            print(f"  FAIL selftest: {what} was accepted")
            bad += 1
    print(f"selftest: {len(MUTATIONS) - bad} of {len(MUTATIONS)} broken manifests refused")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
