"""Proves the Terraform checks bite: each mutation of a copy of deploy/azure must be refused by
check_terraform.py with the message of the rule it breaks; likewise each mutation of the alert
rules Terraform deploys (deploy/monitoring/prometheus-rules.yaml) by check_rules.py.
Usage: selftest_terraform.py [DIR]"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AKS_DATA = '''
data "azurerm_kubernetes_cluster" "aks" {
  name                = var.aks_cluster_name
  resource_group_name = var.aks_resource_group_name
}
'''

# what: (file, text in it, its replacement (None deletes the file), a piece of the expected refusal)
MUTATIONS = {
    "a provider without subscription_id (azurerm 4.x plans nothing)":
        ("versions.tf", "  subscription_id = var.subscription_id\n", "", "set subscription_id"),
    "reading the AKS cluster (its admin credentials land in the state)":
        ("main.tf", 'data "azurerm_client_config" "current" {}\n',
         'data "azurerm_client_config" "current" {}\n' + AKS_DATA, "do not read azurerm_kubernetes_cluster"),
    "no lock file":
        (".terraform.lock.hcl", None, None, ".terraform.lock.hcl is missing"),
    "a locked azurerm the constraint refuses":
        (".terraform.lock.hcl", 'version     = "4.81.0"', 'version     = "3.117.0"', "does not satisfy"),
    "a malformed checksum in the lock file":
        (".terraform.lock.hcl", '"zh:0732e7b7', '"zh:0732e7b', "is not a zh:<sha256>"),
    "a pod PID limit below concurrency x max_processes + the daemon's":
        ("variables.tf", "default     = 1024", "default     = 300", "pod_max_pid 300 <"),
    "container logs larger than the pod's share of ephemeral storage":
        ("nodepool.tf", "container_log_max_files   = 5", "container_log_max_files   = 10", "container logs 10 x 50"),
    "a node pool taint the Deployment does not tolerate":
        ("nodepool.tf", "hybrid-worker.io/pool=workers:NoSchedule", "hybrid-worker.io/pool=batch:NoSchedule",
         "is not tolerated"),
    "no alert on throttling":
        ("monitoring.tf", '"ThrottledRequests"', '"IncomingMessages"', "ThrottledRequests"),
    "Service Bus logs not sent":
        ("monitoring.tf", 'category_group = "allLogs"', 'category_group = "audit"', "allLogs"),
    "a backend example with storage keys":
        ("backend.tf.example", "use_azuread_auth     = true", "use_azuread_auth     = false", "use_azuread_auth"),
}

# what: (text in prometheus-rules.yaml, its replacement, a piece of the expected refusal)
RULE_MUTATIONS = {
    "an alert on a metric the daemon does not export":
        ("hybrid_lock_losses_total", "hybrid_lock_lost_total", "hybrid_lock_lost_total is not a metric"),
    "a job outcome the engine never records":
        ('outcome=~"retried|dead_lettered"', 'outcome=~"retried|failed"', "outcome 'failed'"),
    "a `for` Terraform cannot turn into ISO 8601":
        ("for: 15m", "for: 15min", "for '15min'"),
}


def rules_selftest() -> int:
    rules = REPO / "deploy/monitoring/prometheus-rules.yaml"
    check = Path(__file__).with_name("check_rules.py")
    bad = 0
    for what, (old, new, expected) in RULE_MUTATIONS.items():
        text = rules.read_text()
        if old not in text:
            print(f"  FAIL selftest: {what}: {old!r} is not in {rules.name}")
            bad += 1
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=rules.parent) as f:
            f.write(text.replace(old, new, 1))
            f.flush()
            r = subprocess.run([sys.executable, str(check), f.name], capture_output=True, text=True)
        if r.returncode == 0 or expected not in r.stdout:
            print(f"  FAIL selftest: {what} was not refused by its rule ({expected!r}):\n{r.stdout}")
            bad += 1
    print(f"selftest: {len(RULE_MUTATIONS) - bad} of {len(RULE_MUTATIONS)} broken alert rules refused by their rule")
    return bad


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "deploy/azure"
    check = Path(__file__).with_name("check_terraform.py")
    bad = 0
    for what, (name, old, new, expected) in MUTATIONS.items():
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "azure"
            shutil.copytree(source, copy)
            target = copy / name
            if old is None:
                target.unlink()
            else:
                text = target.read_text()
                if old not in text:
                    print(f"  FAIL selftest: {what}: {old!r} is not in {name}")
                    bad += 1
                    continue
                target.write_text(text.replace(old, new, 1))
            r = subprocess.run([sys.executable, str(check), str(copy)], capture_output=True, text=True)
        if r.returncode == 0:
            print(f"  FAIL selftest: {what} was accepted")
            bad += 1
        elif expected not in r.stdout:
            print(f"  FAIL selftest: {what} was refused, but not by its rule ({expected!r}):\n{r.stdout}")
            bad += 1
    print(f"selftest: {len(MUTATIONS) - bad} of {len(MUTATIONS)} broken Terraform configurations refused by their rule")
    bad += rules_selftest()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
