"""A structural check of deploy/azure's Terraform, for a machine where neither `terraform`
nor the Bicep compiler can be installed (neither is served by the registries this project's
machines reach). It is not `terraform validate`: it parses the HCL with python-hcl2 and checks

- every resource and data block is of a type listed below, with only the arguments azurerm
  4.x documents for it and every required one present;
- every reference (var., local., resource and data addresses and their attributes) resolves,
  and every declared variable is used; terraform.tfvars.example sets only declared variables;
- this project's rules: the jobs queue dead-letters expired messages, is not session-enabled and
  has a max delivery count and a lock duration of at most 5 minutes; the results queue is
  session-enabled with duplicate detection; the daemon's identity has Data Receiver and Data
  Sender, KEDA's Data Owner; the federated credentials' subjects name the ServiceAccount of
  deploy/aks and the issuer is the AKS cluster's; the namespace allows Entra ID only;
- that it applies as written: the azurerm provider block sets subscription_id (azurerm 4.x plans
  nothing without it; a null variable falls back to ARM_SUBSCRIPTION_ID); no
  azurerm_kubernetes_cluster data source (it stores the cluster's admin credentials in the
  state); a .terraform.lock.hcl that pins an azurerm release the constraint accepts, with
  well-formed checksums; backend.tf.example parses as an azurerm backend with Entra ID auth;
- the workers' node pool: its kubelet's pod_max_pid covers budgets.py's PID budget for the example
  overlay's engine.concurrency, its container logs fit the pod's share for them, and its label
  and taint are the ones the Deployment selects and tolerates;
- monitoring: Service Bus logs (allLogs) and metrics (AllMetrics) go to Log Analytics; metric
  alerts watch dead letters, active messages, server errors and throttling; the Prometheus rule
  group takes its rules from deploy/monitoring/prometheus-rules.yaml.

Usage: check_terraform.py [DIR]  (default deploy/azure)
"""

import re
import sys
import tomllib
from pathlib import Path

import hcl2
import yaml

from budgets import CONTAINER_LOGS_MIB, budget

REPO = Path(__file__).resolve().parents[2]
META = {"count", "for_each", "depends_on", "lifecycle", "provider", "dynamic"}

# type: (required, optional, exported attributes) — azurerm 4.x.
RESOURCES = {
    "azurerm_servicebus_namespace": (
        {"name", "location", "resource_group_name", "sku"},
        {"capacity", "premium_messaging_partitions", "local_auth_enabled", "public_network_access_enabled",
         "minimum_tls_version", "identity", "customer_managed_key", "network_rule_set", "tags"},
        {"id", "name", "endpoint", "location", "resource_group_name"}),
    "azurerm_servicebus_queue": (
        {"name", "namespace_id"},
        {"lock_duration", "max_message_size_in_kilobytes", "max_size_in_megabytes", "requires_duplicate_detection",
         "requires_session", "default_message_ttl", "dead_lettering_on_message_expiration",
         "duplicate_detection_history_time_window", "max_delivery_count", "status", "batched_operations_enabled",
         "auto_delete_on_idle", "partitioning_enabled", "express_enabled", "forward_to",
         "forward_dead_lettered_messages_to"},
        {"id", "name"}),
    "azurerm_user_assigned_identity": (
        {"name", "location", "resource_group_name"}, {"tags"},
        {"id", "name", "client_id", "principal_id", "tenant_id"}),
    "azurerm_federated_identity_credential": (
        {"name", "resource_group_name", "parent_id", "audience", "issuer", "subject"}, set(), {"id"}),
    "azurerm_kubernetes_cluster_node_pool": (
        {"name", "kubernetes_cluster_id"},
        {"vm_size", "mode", "auto_scaling_enabled", "min_count", "max_count", "node_count", "node_labels",
         "node_taints", "temporary_name_for_rotation", "tags", "kubelet_config", "linux_os_config",
         "os_disk_size_gb", "os_disk_type", "os_sku", "max_pods", "zones", "vnet_subnet_id", "pod_subnet_id",
         "orchestrator_version", "upgrade_settings", "priority", "eviction_policy", "spot_max_price",
         "host_encryption_enabled", "node_public_ip_enabled", "kubelet_disk_type", "fips_enabled"},
        {"id", "name"}),
    "azurerm_log_analytics_workspace": (
        {"name", "location", "resource_group_name"},
        {"sku", "retention_in_days", "daily_quota_gb", "local_authentication_enabled", "tags", "identity",
         "internet_ingestion_enabled", "internet_query_enabled", "allow_resource_only_permissions"},
        {"id", "name", "workspace_id"}),
    "azurerm_monitor_diagnostic_setting": (
        {"name", "target_resource_id"},
        {"log_analytics_workspace_id", "log_analytics_destination_type", "enabled_log", "enabled_metric",
         "storage_account_id", "eventhub_name", "eventhub_authorization_rule_id", "partner_solution_id"},
        {"id"}),
    "azurerm_monitor_action_group": (
        {"name", "resource_group_name", "short_name"},
        {"enabled", "location", "email_receiver", "webhook_receiver", "arm_role_receiver",
         "azure_app_push_receiver", "sms_receiver", "voice_receiver", "tags"},
        {"id", "name"}),
    "azurerm_monitor_metric_alert": (
        {"name", "resource_group_name", "scopes"},
        {"criteria", "dynamic_criteria", "action", "enabled", "auto_mitigate", "description", "frequency",
         "severity", "target_resource_type", "target_resource_location", "window_size", "tags"},
        {"id"}),
    "azurerm_monitor_alert_prometheus_rule_group": (
        {"name", "location", "resource_group_name", "rule", "scopes"},
        {"cluster_name", "description", "rule_group_enabled", "interval", "tags"},
        {"id"}),
    "azurerm_key_vault": (
        {"name", "location", "resource_group_name", "tenant_id", "sku_name"},
        {"rbac_authorization_enabled", "purge_protection_enabled", "soft_delete_retention_days",
         "public_network_access_enabled", "network_acls", "enabled_for_deployment",
         "enabled_for_disk_encryption", "enabled_for_template_deployment", "tags"},
        {"id", "name", "vault_uri", "tenant_id"}),
    "azurerm_role_assignment": (
        {"scope", "principal_id"},
        {"role_definition_name", "role_definition_id", "principal_type", "name", "description", "condition",
         "condition_version", "skip_service_principal_aad_check", "delegated_managed_identity_resource_id"},
        {"id", "principal_type"}),
}
DATA = {
    "azurerm_resource_group": ({"name"}, set(), {"id", "name", "location", "tags"}),
    "azurerm_client_config": (set(), set(), {"client_id", "tenant_id", "subscription_id", "object_id"}),
}
# Data sources refused outright, with the reason.
FORBIDDEN_DATA = {
    "azurerm_kubernetes_cluster": "it stores the cluster's admin kubeconfig (kube_admin_config) in the state; "
                                  "take the OIDC issuer URL as a variable",
}
# Nested blocks: (resource type, block) -> (required, optional) arguments, azurerm 4.x.
NESTED = {
    ("azurerm_kubernetes_cluster_node_pool", "kubelet_config"): (
        set(), {"allowed_unsafe_sysctls", "container_log_max_files", "container_log_max_size_mb",
                "cpu_cfs_quota_enabled", "cpu_cfs_quota_period", "cpu_manager_policy", "image_gc_high_threshold",
                "image_gc_low_threshold", "pod_max_pid", "topology_manager_policy"}),
    ("azurerm_monitor_diagnostic_setting", "enabled_log"): (set(), {"category", "category_group"}),
    ("azurerm_monitor_diagnostic_setting", "enabled_metric"): ({"category"}, set()),
    ("azurerm_monitor_metric_alert", "criteria"): (
        {"metric_namespace", "metric_name", "aggregation", "operator", "threshold"},
        {"dimension", "skip_metric_validation"}),
    ("azurerm_monitor_metric_alert", "action"): ({"action_group_id"}, {"webhook_properties"}),
    ("azurerm_monitor_action_group", "email_receiver"): ({"name", "email_address"}, {"use_common_alert_schema"}),
    ("azurerm_monitor_alert_prometheus_rule_group", "rule"): (
        {"expression"}, {"action", "alert", "annotations", "enabled", "for", "labels", "record",
                         "alert_resolution", "severity"}),
}
SERVICEBUS_ALERT_METRICS = {"DeadletteredMessages", "ActiveMessages", "ServerErrors", "ThrottledRequests"}

errors = []


def fail(message: str) -> None:
    errors.append(message)


def unquote(s):
    return s[1:-1] if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] == '"' else s


def clean(value):
    """python-hcl2 keeps quotes and adds __comments__/__is_block__ keys; drop both."""
    if isinstance(value, dict):
        return {unquote(k): clean(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return unquote(value)


def strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def dynamic_blocks(body: dict):
    """(name, content) of each `dynamic "name" { content { … } }` block."""
    for block in body.get("dynamic", []):
        for name, spec in block.items():
            for content in spec.get("content", []):
                yield name, content


def nested_blocks(body: dict):
    """(name, body) of each nested block, dynamic ones included."""
    for name, value in body.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value) and name != "dynamic":
            for v in value:
                yield name, v
    yield from dynamic_blocks(body)


def example_config() -> dict:
    """The config.toml the example overlay deploys (its ConfigMap patch), else the base's."""
    for path in (REPO / "deploy/aks/overlays/example/kustomization.yaml", REPO / "deploy/aks/base/configmap.yaml"):
        text = path.read_text()
        m = re.search(r"^( *)(?:value|config\.toml): \|\n((?:\1  .*\n|\n)+)", text, re.M)
        if m:
            indent = len(m.group(1)) + 2
            return tomllib.loads("\n".join(line[indent:] for line in m.group(2).splitlines()))
    return {}


def check_lock_file(folder: Path, constraint: str) -> None:
    lock = folder / ".terraform.lock.hcl"
    if not lock.exists():
        fail(".terraform.lock.hcl is missing: commit the file `terraform init` (or "
             "`terraform providers lock`) writes, so every apply uses the same provider build")
        return
    try:
        with lock.open() as f:
            doc = clean(hcl2.load(f))
    except Exception as e:
        fail(f".terraform.lock.hcl does not parse: {e}")
        return
    blocks = {name: body for block in doc.get("provider", []) for name, body in block.items()}
    body = blocks.get("registry.terraform.io/hashicorp/azurerm")
    if body is None:
        fail(".terraform.lock.hcl has no registry.terraform.io/hashicorp/azurerm")
        return
    version = str(body.get("version", ""))
    m = re.fullmatch(r"~>\s*(\d+)\.(\d+)", constraint or "")
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        fail(f".terraform.lock.hcl: azurerm version {version!r} is not a release")
    elif not m or version.split(".")[0] != m.group(1) or int(version.split(".")[1]) < int(m.group(2)):
        fail(f".terraform.lock.hcl: azurerm {version} does not satisfy versions.tf's constraint {constraint!r}")
    hashes = body.get("hashes", [])
    if not any(h.startswith("zh:") for h in hashes):
        fail(".terraform.lock.hcl: azurerm has no zh: (release archive) checksums")
    for h in hashes:
        if not re.fullmatch(r"zh:[0-9a-f]{64}|h1:[A-Za-z0-9+/]{43}=", h):
            fail(f".terraform.lock.hcl: {h!r} is not a zh:<sha256> or h1:<base64> checksum")


def check_backend_example(folder: Path) -> None:
    example = folder / "backend.tf.example"
    if not example.exists():
        fail("backend.tf.example (a remote state for a team) is missing")
        return
    with example.open() as f:
        doc = clean(hcl2.load(f))
    backends = [b for t in doc.get("terraform", []) for b in t.get("backend", [])]
    azurerm = next((b["azurerm"] for b in backends if "azurerm" in b), None)
    if azurerm is None:
        fail("backend.tf.example: no backend \"azurerm\"")
        return
    for key in ("resource_group_name", "storage_account_name", "container_name", "key"):
        if key not in azurerm:
            fail(f"backend.tf.example: backend azurerm needs {key}")
    if azurerm.get("use_azuread_auth") is not True:
        fail("backend.tf.example: use_azuread_auth = true (no storage account key in anyone's environment)")


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "deploy/azure"
    parsed = {}
    for tf in sorted(folder.glob("*.tf")):
        try:
            with tf.open() as f:
                parsed[tf.name] = clean(hcl2.load(f))
        except Exception as e:  # the parser's errors carry the line
            fail(f"{tf.name}: does not parse as HCL: {e}")
    if errors:
        return report()
    variables, locals_, resources, data, outputs = {}, {}, {}, {}, {}
    for name, doc in parsed.items():
        for block in doc.get("variable", []):
            variables.update(block)
        for block in doc.get("locals", []):
            locals_.update(block)
        for block in doc.get("output", []):
            outputs.update(block)
        for kind, table, store in (("resource", RESOURCES, resources), ("data", DATA, data)):
            for block in doc.get(kind, []):
                for rtype, named in block.items():
                    for rname, body in named.items():
                        where = f"{name}: {kind} {rtype}.{rname}"
                        if kind == "data" and rtype in FORBIDDEN_DATA:
                            fail(f"{where}: do not read {rtype}: {FORBIDDEN_DATA[rtype]}")
                            continue
                        if rtype not in table:
                            fail(f"{where}: type not known to this check (add its arguments to check_terraform.py)")
                            continue
                        required, optional, _ = table[rtype]
                        args = (set(body) - META) | {name for name, _ in dynamic_blocks(body)}
                        for missing in sorted(required - args):
                            fail(f"{where}: required argument {missing} is missing")
                        for unknown in sorted(args - required - optional):
                            fail(f"{where}: {unknown} is not an argument of {rtype} (azurerm 4.x)")
                        for block_name, block_body in nested_blocks(body):
                            schema = NESTED.get((rtype, block_name))
                            if schema is None:
                                continue
                            for missing in sorted(schema[0] - set(block_body)):
                                fail(f"{where}: block {block_name}: required argument {missing} is missing")
                            for unknown in sorted(set(block_body) - schema[0] - schema[1]):
                                fail(f"{where}: block {block_name}: {unknown} is not one of its arguments (azurerm 4.x)")
                        if rtype == "azurerm_role_assignment" and ("role_definition_name" in body) == ("role_definition_id" in body):
                            fail(f"{where}: exactly one of role_definition_name and role_definition_id")
                        store[(rtype, rname)] = body

    everything = [parsed[n] for n in parsed]
    used_vars = set()
    for text in strings(everything):
        for ref in re.findall(r"\bvar\.([A-Za-z0-9_]+)", text):
            used_vars.add(ref)
            if ref not in variables:
                fail(f"var.{ref} is used but not declared")
        for ref in re.findall(r"\blocal\.([A-Za-z0-9_]+)", text):
            if ref not in locals_:
                fail(f"local.{ref} is used but not defined")
        for prefix, rtype, rname, attr in re.findall(r"(?<![\w.])(data\.)?(azurerm_[a-z_]+)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)", text):
            table, store = (DATA, data) if prefix else (RESOURCES, resources)
            if (rtype, rname) not in store:
                fail(f"{prefix}{rtype}.{rname} is referenced but not defined")
            elif attr not in table[rtype][2]:
                fail(f"{prefix}{rtype}.{rname}.{attr}: {rtype} exports no attribute {attr} (known: {sorted(table[rtype][2])})")
    for name in sorted(set(variables) - used_vars):
        fail(f"variable {name} is declared but never used")
    example = folder / "terraform.tfvars.example"
    if example.exists():
        for key in re.findall(r"^([A-Za-z0-9_]+)\s*=", example.read_text(), re.M):
            if key not in variables:
                fail(f"terraform.tfvars.example sets {key}, which is not a variable")

    def value(body, key):
        v = body.get(key)
        m = re.fullmatch(r"\$\{var\.([A-Za-z0-9_]+)\}", v) if isinstance(v, str) else None
        if m and m.group(1) in variables:
            return variables[m.group(1)].get("default")
        return v

    queues = {value(b, "name"): b for (t, _), b in resources.items() if t == "azurerm_servicebus_queue"}
    jobs, results = queues.get("jobs"), queues.get("results")
    if jobs is None or results is None:
        fail(f"expected queues jobs and results (by default), found {sorted(map(str, queues))}")
    else:
        if value(jobs, "dead_lettering_on_message_expiration") is not True:
            fail("jobs queue: dead_lettering_on_message_expiration must be true")
        if value(jobs, "requires_session") is True:
            fail("jobs queue: must not be session-enabled (the daemon receives without sessions)")
        if not isinstance(value(jobs, "max_delivery_count"), int):
            fail("jobs queue: set max_delivery_count")
        lock = value(jobs, "lock_duration") or ""
        m = re.fullmatch(r"PT(?:(\d+)M)?(?:(\d+)S)?", lock)
        if not m or int(m.group(1) or 0) * 60 + int(m.group(2) or 0) > 300 or lock == "PT":
            fail(f"jobs queue: lock_duration {lock!r} must be an ISO 8601 duration of at most PT5M")
        if value(results, "requires_session") is not True:
            fail("results queue: requires_session must be true (flows wait on their session)")
        if value(results, "requires_duplicate_detection") is not True:
            fail("results queue: requires_duplicate_detection must be true (a resent reply is dropped)")
    for (t, n), b in resources.items():
        if t == "azurerm_servicebus_namespace" and b.get("local_auth_enabled") is not False:
            fail(f"{t}.{n}: local_auth_enabled must be false (Entra ID only; no SAS keys to leak)")
    roles = {}
    for (t, n), b in resources.items():
        if t == "azurerm_role_assignment":
            m = re.search(r"azurerm_user_assigned_identity\.([a-z_]+)\.principal_id", b.get("principal_id", ""))
            if m:
                roles.setdefault(m.group(1), set()).add(b.get("role_definition_name"))
    for identity, needed in (("worker", {"Azure Service Bus Data Receiver", "Azure Service Bus Data Sender"}),
                             ("keda", {"Azure Service Bus Data Owner"})):
        if not needed <= roles.get(identity, set()):
            fail(f"identity {identity}: needs roles {sorted(needed)}, has {sorted(roles.get(identity, set()))}")
    overlay_ns = None
    kustomization = REPO / "deploy/aks/overlays/example/kustomization.yaml"
    if kustomization.exists():
        m = re.search(r"^namespace:\s*(\S+)", kustomization.read_text(), re.M)
        overlay_ns = m.group(1) if m else None
    sa = re.search(r"^  name:\s*(\S+)", (REPO / "deploy/aks/base/serviceaccount.yaml").read_text(), re.M).group(1)
    fic = resources.get(("azurerm_federated_identity_credential", "worker"))
    if fic is None:
        fail("no federated credential for the worker identity")
    else:
        subject = fic["subject"].replace("${var.k8s_namespace}", str(variables["k8s_namespace"].get("default"))) \
                                .replace("${var.k8s_service_account}", str(variables["k8s_service_account"].get("default")))
        if subject != f"system:serviceaccount:{overlay_ns}:{sa}":
            fail(f"the worker's federated subject {subject!r} is not the example overlay's ServiceAccount "
                 f"system:serviceaccount:{overlay_ns}:{sa}")
    for (t, n), b in resources.items():
        if t == "azurerm_federated_identity_credential":
            if "oidc_issuer_url" not in b.get("issuer", ""):
                fail(f"{t}.{n}: issuer must be the AKS cluster's oidc_issuer_url")
            if b.get("audience") != ["api://AzureADTokenExchange"]:
                fail(f"{t}.{n}: audience must be [\"api://AzureADTokenExchange\"]")
    for name in ("servicebus_fqdn", "servicebus_namespace_name", "worker_identity_client_id", "keda_identity_client_id"):
        if name not in outputs:
            fail(f"output {name} (the overlay's values) is missing")

    # Applies as written: provider settings, no credentials in the state, a lock file.
    providers = {name: body for doc in everything for block in doc.get("provider", []) for name, body in block.items()}
    if "azurerm" not in providers:
        fail("no provider \"azurerm\" block")
    elif "subscription_id" not in providers["azurerm"]:
        fail("provider azurerm: set subscription_id (azurerm 4.x refuses to plan without it; a null variable "
             "falls back to ARM_SUBSCRIPTION_ID)")
    constraint = None
    for doc in everything:
        for t in doc.get("terraform", []):
            for rp in t.get("required_providers", []):
                if "azurerm" in rp:
                    constraint = rp["azurerm"].get("version")
    if not constraint:
        fail("terraform.required_providers.azurerm has no version constraint")
    check_lock_file(folder, constraint)
    check_backend_example(folder)

    # The workers' node pool against the pod's budgets.
    plan = budget(example_config())
    pools = [b for (t, _), b in resources.items() if t == "azurerm_kubernetes_cluster_node_pool"]
    if not pools:
        fail("no azurerm_kubernetes_cluster_node_pool: nothing sets the pod PID limit (podMaxPids), the only "
             "bound on a job's processes in the non-root pod")
    deployment = (REPO / "deploy/aks/base/deployment.yaml").read_text()
    for pool in pools:
        kubelet = (pool.get("kubelet_config") or [{}])[0]
        pids = value(kubelet, "pod_max_pid")
        if not isinstance(pids, int):
            fail("node pool: kubelet_config.pod_max_pid is not set")
        elif pids < plan.pids:
            fail(f"node pool: pod_max_pid {pids} < {plan.explain_pids()}")
        size, files = value(kubelet, "container_log_max_size_mb"), value(kubelet, "container_log_max_files")
        if not isinstance(size, int) or not isinstance(files, int):
            fail("node pool: set kubelet_config container_log_max_size_mb and container_log_max_files "
                 "(container logs count against the pod's ephemeral storage)")
        elif size * files > CONTAINER_LOGS_MIB:
            fail(f"node pool: container logs {files} x {size} MB > the {CONTAINER_LOGS_MIB}Mi the pod's "
                 "ephemeral-storage budget leaves for them")
        for label, label_value in (pool.get("node_labels") or {}).items():
            if not re.search(rf"^\s+{re.escape(label)}: {re.escape(label_value)}\s*$", deployment, re.M):
                fail(f"node pool label {label}={label_value} is not the Deployment's nodeSelector")
        for taint in pool.get("node_taints") or []:
            key, _, rest = taint.partition("=")
            taint_value, _, effect = rest.partition(":")
            if not all(re.search(rf"{field}: {re.escape(v)}\s*$", deployment, re.M)
                       for field, v in (("key", key), ("value", taint_value), ("effect", effect))):
                fail(f"node pool taint {taint} is not tolerated by the Deployment")

    # Monitoring.
    settings = [b for (t, _), b in resources.items() if t == "azurerm_monitor_diagnostic_setting"]
    if not any("azurerm_servicebus_namespace." in b.get("target_resource_id", "") for b in settings):
        fail("no azurerm_monitor_diagnostic_setting on the Service Bus namespace")
    for b in settings:
        if "log_analytics_workspace_id" not in b:
            fail("diagnostic setting: log_analytics_workspace_id (Log Analytics) is not set")
        if not any(log.get("category_group") == "allLogs" for log in b.get("enabled_log", [])):
            fail("diagnostic setting: enabled_log { category_group = \"allLogs\" } is missing")
        if not any(m.get("category") == "AllMetrics" for m in b.get("enabled_metric", [])):
            fail("diagnostic setting: enabled_metric { category = \"AllMetrics\" } is missing")
    alerted = set()
    for (t, _), b in resources.items():
        if t != "azurerm_monitor_metric_alert":
            continue
        for criterion in b.get("criteria", []):
            name = criterion.get("metric_name", "")
            m = re.fullmatch(r"\$\{each\.value\.([a-z_]+)\}", name)
            source = re.fullmatch(r"\$\{local\.([a-z_]+)\}", str(b.get("for_each", "")))
            if m and source:
                table = locals_.get(source.group(1), {})
                alerted |= {entry.get(m.group(1)) for entry in table.values() if isinstance(entry, dict)}
            else:
                alerted.add(name)
    for metric in sorted(SERVICEBUS_ALERT_METRICS - alerted):
        fail(f"no metric alert on Service Bus' {metric}")
    rules_file = REPO / "deploy/monitoring/prometheus-rules.yaml"
    groups = [b for (t, _), b in resources.items() if t == "azurerm_monitor_alert_prometheus_rule_group"]
    if not groups:
        fail("no azurerm_monitor_alert_prometheus_rule_group for the daemon's alerts")
    elif not any("monitoring/prometheus-rules.yaml" in str(v) for v in locals_.values()):
        fail("the Prometheus rule group does not take its rules from deploy/monitoring/prometheus-rules.yaml")
    elif not rules_file.exists() or not yaml.safe_load(rules_file.read_text()).get("groups"):
        fail("deploy/monitoring/prometheus-rules.yaml is missing or has no groups")
    if not errors:
        print(f"Terraform: ok ({len(resources)} resources, {len(data)} data sources, {len(variables)} variables, "
              f"{len(outputs)} outputs; structural check, not terraform validate)")
    return report()


def report() -> int:
    for e in errors:
        print(f"  FAIL {e}")
    if errors:
        print(f"Terraform: {len(errors)} problem(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
