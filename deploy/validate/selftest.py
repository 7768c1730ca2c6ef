"""Proves the manifest checks bite: each mutation of the rendered example overlay (and of the
user-namespace overlay, when given) must be refused by check_manifests.py, with the message of
the rule it breaks (so a mutation refused for another reason does not count).
Usage: selftest.py RENDERED_EXAMPLE.yaml [RENDERED_USERNS.yaml]"""

import subprocess
import sys
import tempfile
from pathlib import Path

# what: (text in the rendered overlay, its replacement, a piece of the expected refusal)
MUTATIONS = {
    "a misspelled field (Kubernetes schema, strict)":
        ("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", "readOnlyRootFilesytem"),
    "a grace period shorter than the drain rule":
        ("terminationGracePeriodSeconds: 150", "terminationGracePeriodSeconds: 90", "terminationGracePeriodSeconds 90"),
    "a non-numeric KEDA messageCount (KEDA schema)":
        ("messageCount: '8'", "messageCount: 'eight'", "KEDA schema"),
    "KEDA scaling another queue than the daemon's":
        ("queueName: jobs", "queueName: job", "is not the jobs queue"),
    "privilege escalation allowed":
        ("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", "allowPrivilegeEscalation must be false"),
    "a NetworkPolicy that opens port 80":
        ("port: 5671", "port: 80", "egress allows more than"),
    "a probe on another port":
        ("port: http", "port: 8080", "must GET"),
    "the base's placeholder client id":
        ("11111111-2222-3333-4444-555555555555", "00000000-0000-0000-0000-000000000000", "placeholder"),
    "a memory limit below concurrency x memory_mb + the daemon's":
        ("limits:\n            memory: 2304Mi", "limits:\n            memory: 2048Mi", "memory limit 2048Mi <"),
    "a memory request below the limit (overcommitted budget)":
        ("requests:\n            cpu: 500m\n            memory: 2304Mi", "requests:\n            cpu: 500m\n            memory: 1Gi",
         "memory request 1Gi != limit"),
    "a concurrency the memory limit and the emptyDir do not cover":
        ("concurrency = 4", "concurrency = 6", "engine.concurrency 6 x the largest worker memory_mb"),
    "an emptyDir smaller than concurrency x the per-file limit":
        ("sizeLimit: 4352Mi", "sizeLimit: 2Gi", "sizeLimit 2Gi <"),
    "an ephemeral-storage limit with no room for the container logs":
        ("limits:\n            memory: 2304Mi\n            ephemeral-storage: 4608Mi",
         "limits:\n            memory: 2304Mi\n            ephemeral-storage: 4352Mi", "ephemeral-storage limit 4352Mi <"),
    "a secrets volume the daemon may write":
        ("          driver: secrets-store.csi.k8s.io\n          readOnly: true",
         "          driver: secrets-store.csi.k8s.io\n          readOnly: false", "must be read-only"),
    "HYBRID__SECRETS__DIR elsewhere than the secrets mount":
        ("value: /mnt/secrets", "value: /tmp/secrets", "is not the mount of a CSI volume"),
    "a SecretProviderClass read with another identity than the daemon's":
        ("clientID: 11111111-2222-3333-4444-555555555555", "clientID: 99999999-2222-3333-4444-555555555555",
         "is not the daemon's identity"),
    "a secret file name worker.toml refuses":
        ("objectAlias: crm-api-key", "objectAlias: ../crm-api-key", "is not a secret name"),
    "a misspelled provider parameter (Secrets Store schema)":
        ("keyvaultName: contoso-hw-kv", "keyVaultName: contoso-hw-kv", "Secrets Store schema"),
    "DNS egress without NodeLocal DNSCache's address":
        ("cidr: 169.254.20.10/32", "cidr: 10.0.0.10/32", "node-local resolver 169.254.20.10/32"),
}
# Mutations of overlays/userns (hostUsers: false).
USERNS_MUTATIONS = {
    "a user-namespace pod adding a capability the jobs do not need":
        ("            - SETUID\n", "            - SETUID\n            - SYS_ADMIN\n", "not ['SYS_ADMIN']"),
    "a user-namespace pod without the guard against a runtime that ignores hostUsers":
        ("/proc/self/uid_map", "/proc/self/gid_map", "must refuse to start"),
    "fewer job uids than running jobs":
        ("name: HYBRID__SANDBOX__USERS\n          value: '4'", "name: HYBRID__SANDBOX__USERS\n          value: '2'",
         "HYBRID__SANDBOX__USERS 2 < engine.concurrency 4"),
    "a root pod in the node's user namespace":
        ("      hostUsers: false\n", "      hostUsers: true\n", "runAsNonRoot must be true"),
    "the restricted Pod Security Standard, which refuses the capabilities":
        ("pod-security.kubernetes.io/enforce: baseline", "pod-security.kubernetes.io/enforce: restricted",
         "use baseline"),
}


def refused(rendered: str, mutations: dict) -> int:
    check = Path(__file__).with_name("check_manifests.py")
    bad = 0
    for what, (old, new, expected) in mutations.items():
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
        elif expected not in r.stdout:
            print(f"  FAIL selftest: {what} was refused, but not by its rule ({expected!r}):\n{r.stdout}")
            bad += 1
    return bad


def main() -> int:
    bad = refused(Path(sys.argv[1]).read_text(), MUTATIONS)
    total = len(MUTATIONS)
    if len(sys.argv) > 2:
        bad += refused(Path(sys.argv[2]).read_text(), USERNS_MUTATIONS)
        total += len(USERNS_MUTATIONS)
    print(f"selftest: {total - bad} of {total} broken manifests refused by their rule")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
