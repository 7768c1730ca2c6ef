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
  deploy/aks and the issuer is the AKS cluster's; the namespace allows Entra ID only.

Usage: check_terraform.py [DIR]  (default deploy/azure)
"""

import re
import sys
from pathlib import Path

import hcl2

REPO = Path(__file__).resolve().parents[2]
META = {"count", "for_each", "depends_on", "lifecycle", "provider"}

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
    "azurerm_role_assignment": (
        {"scope", "principal_id"},
        {"role_definition_name", "role_definition_id", "principal_type", "name", "description", "condition",
         "condition_version", "skip_service_principal_aad_check", "delegated_managed_identity_resource_id"},
        {"id", "principal_type"}),
}
DATA = {
    "azurerm_resource_group": ({"name"}, set(), {"id", "name", "location", "tags"}),
    "azurerm_kubernetes_cluster": ({"name", "resource_group_name"}, set(),
                                   {"id", "location", "oidc_issuer_url", "oidc_issuer_enabled",
                                    "workload_identity_enabled", "node_resource_group"}),
}

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
                        if rtype not in table:
                            fail(f"{where}: type not known to this check (add its arguments to check_terraform.py)")
                            continue
                        required, optional, _ = table[rtype]
                        args = set(body) - META
                        for missing in sorted(required - args):
                            fail(f"{where}: required argument {missing} is missing")
                        for unknown in sorted(args - required - optional):
                            fail(f"{where}: {unknown} is not an argument of {rtype} (azurerm 4.x)")
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
