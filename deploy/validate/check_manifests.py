"""Validates rendered Kubernetes manifests (a YAML stream from render.py).

1. Kubernetes kinds: strict schema validation with kubernetes-validate (Kubernetes' own
   OpenAPI schemas, bundled in the package) for each Kubernetes version named with -k.
2. KEDA kinds: deploy/schemas/keda-v1alpha1.json (jsonschema); the ScaledObject's HPA
   behavior against autoscaling/v2 from (1). The Secrets Store CSI driver's
   SecretProviderClass: deploy/schemas/secrets-store-v1.json (jsonschema).
3. This project's rules, which tie the manifests to the code: the securityContext the
   sandbox is built for, probes on the `http` port the image listens on, the drain rule
   (terminationGracePeriodSeconds >= engine.drain_timeout_s + the longest worker timeout_s),
   the memory and ephemeral-storage budgets of budgets.py (request = limit >= concurrency x
   memory_mb + the daemon's; the /tmp emptyDir >= concurrency x the per-file limit + the
   daemon's; the pod's ephemeral storage >= that + the container logs), DNS egress that works
   with node-local resolvers, every reference (ServiceAccount, ConfigMap, KEDA
   target and authentication, selectors) resolving, the config file's keys existing in
   config/default.toml, the jobs' secrets (a read-only CSI volume of the SecretProviderClass
   at HYBRID__SECRETS__DIR, read with the daemon's identity, holding every secret the
   workers declare), and (with --final) no placeholder left.

Usage: check_manifests.py [--final] [-k 1.31 ...] RENDERED.yaml
"""

import argparse
import copy
import json
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from budgets import CONTAINER_LOGS_MIB, budget, workers_limits

REPO = Path(__file__).resolve().parents[2]
PLACEHOLDER_UUID = "00000000-0000-0000-0000-000000000000"
UUID = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")

errors = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def memory_mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024,
             "k": 1000 / 1024 / 1024, "M": 1000 * 1000 / 1024 / 1024, "G": 1000 ** 3 / 1024 / 1024}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"cannot read memory quantity {quantity!r}")
    return float(m.group(1)) * units.get(m.group(2), 1 / 1024 / 1024)


def dockerfile_facts() -> dict:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    facts = {}
    m = re.search(r"^USER\s+(\d+)(?::(\d+))?", text, re.M)
    facts["uid"] = int(m.group(1)) if m else None
    m = re.search(r"HYBRID__HTTP__LISTEN=\S*:(\d+)", text)
    facts["http_port"] = int(m.group(1)) if m else None
    m = re.search(r"HYBRID__ENGINE__TEMP_DIR=(\S+)", text)
    facts["temp_dir"] = m.group(1) if m else None
    return facts


# Where pods send DNS besides the kube-dns pods: AKS LocalDNS's two listeners and NodeLocal
# DNSCache's default address. They run on the node, so a pod selector never matches them.
NODE_LOCAL_DNS = ("169.254.10.10/32", "169.254.10.11/32", "169.254.20.10/32")


def check_kubernetes_schema(obj: dict, versions: list) -> None:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            fail(where, f"Kubernetes {version} schema: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(where, f"Kubernetes {version} has no schema for {obj['apiVersion']} {obj['kind']}")


def check_keda_schema(obj: dict, versions: list) -> None:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    schema = json.loads((REPO / "deploy/schemas/keda-v1alpha1.json").read_text())
    sub = dict(schema)
    sub["$ref"] = f"#/$defs/{obj['kind']}"
    validator = jsonschema.Draft202012Validator(sub)
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
        fail(where, f"KEDA schema: {'/'.join(str(p) for p in e.path)}: {e.message}")
    behavior = (obj.get("spec", {}).get("advanced", {})
                .get("horizontalPodAutoscalerConfig", {}).get("behavior"))
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "behavior-check"},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"},
                        "maxReplicas": 1, "behavior": copy.deepcopy(behavior)}}
        for version in versions:
            try:
                kubernetes_validate.validate(hpa, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(where, f"advanced.horizontalPodAutoscalerConfig.behavior (autoscaling/v2, "
                            f"Kubernetes {version}): {'/'.join(str(p) for p in e.path)}: {e.message}")


def check_secrets_store_schema(obj: dict) -> None:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    schema = json.loads((REPO / "deploy/schemas/secrets-store-v1.json").read_text())
    if obj["kind"] not in schema["$defs"]:
        fail(where, f"no schema for {obj['apiVersion']} {obj['kind']} in deploy/schemas/secrets-store-v1.json")
        return
    sub = dict(schema)
    sub["$ref"] = f"#/$defs/{obj['kind']}"
    for e in jsonschema.Draft202012Validator(sub).iter_errors(obj):
        fail(where, f"Secrets Store schema: {'/'.join(str(p) for p in e.path)}: {e.message}")


# A secret's file name as worker.toml's `secrets` accepts it (src/secrets/mod.rs, check_name).
SECRET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}")


def secret_files(spc: dict, where: str) -> set:
    """The file names the Azure provider writes for a SecretProviderClass: each object's
    objectAlias, else its objectName."""
    try:
        objects = yaml.safe_load(spc["spec"]["parameters"]["objects"]) or {}
        entries = [yaml.safe_load(e) for e in objects.get("array", [])]
    except (yaml.YAMLError, KeyError, AttributeError, TypeError) as e:
        fail(where, f"parameters.objects is not the provider's YAML array of objects: {e}")
        return set()
    names = set()
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("objectName"):
            fail(where, f"an object without objectName: {entry!r}")
            continue
        if entry.get("objectType") != "secret":
            fail(where, f"object {entry['objectName']!r}: objectType must be secret (keys and certificates are not handed to jobs)")
        name = str(entry.get("objectAlias") or entry["objectName"])
        if not SECRET_NAME.fullmatch(name):
            fail(where, f"file name {name!r} is not a secret name worker.toml accepts")
        names.add(name)
    return names


def check_secrets(where: str, pod: dict, main: dict, by_kind: dict, final: bool) -> None:
    """The jobs' secrets (docs/secrets.md): a read-only CSI volume of a SecretProviderClass in
    the manifests, mounted at HYBRID__SECRETS__DIR, read with the daemon's identity, and holding
    every secret the image's workers declare."""
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    secrets_dir = env.get("HYBRID__SECRETS__DIR")
    if not secrets_dir:
        fail(where, "HYBRID__SECRETS__DIR is not set: workers declaring secrets would have every job refused")
        return
    mount = next((m for m in main.get("volumeMounts", []) if m["mountPath"].rstrip("/") == secrets_dir.rstrip("/")), None)
    volume = next((v for v in pod.get("volumes", []) if mount and v["name"] == mount["name"]), None)
    if mount is None or volume is None or "csi" not in volume:
        fail(where, f"HYBRID__SECRETS__DIR={secrets_dir} is not the mount of a CSI volume")
        return
    if mount.get("readOnly") is not True or volume["csi"].get("readOnly") is not True:
        fail(where, f"the secrets volume at {secrets_dir} must be read-only (mount and csi.readOnly)")
    if volume["csi"].get("driver") != "secrets-store.csi.k8s.io":
        fail(where, "the secrets volume's driver must be secrets-store.csi.k8s.io")
    name = volume["csi"].get("volumeAttributes", {}).get("secretProviderClass")
    spc = by_kind.get("SecretProviderClass", {}).get(name)
    if spc is None:
        fail(where, f"secretProviderClass {name!r} is not in the manifests")
        return
    sw = f"SecretProviderClass/{name}"
    params = spc["spec"].get("parameters", {})
    sa = by_kind.get("ServiceAccount", {}).get(pod.get("serviceAccountName"), {})
    client_id = sa.get("metadata", {}).get("annotations", {}).get("azure.workload.identity/client-id")
    if params.get("clientID") != client_id:
        fail(sw, f"clientID {params.get('clientID')!r} is not the daemon's identity {client_id!r} (the ServiceAccount's client-id)")
    if final and (params.get("tenantId") == PLACEHOLDER_UUID or params.get("keyvaultName") == "placeholder-vault"):
        fail(sw, "tenantId or keyvaultName is still the base's placeholder")
    files = secret_files(spc, sw)
    if final:
        for toml_path in sorted((REPO / "workers").glob("*/worker.toml")):
            declared = tomllib.loads(toml_path.read_text()).get("secrets", [])
            for missing in sorted(set(declared) - files):
                fail(sw, f"no object for secret {missing!r}, which {toml_path.parent.name} declares")


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_config_keys(config: dict, where: str) -> None:
    defaults = tomllib.loads((REPO / "config/default.toml").read_text())
    for section, values in config.items():
        if section not in defaults:
            fail(where, f"config.toml: unknown section [{section}]")
            continue
        for key in values:
            if key not in defaults[section]:
                fail(where, f"config.toml: unknown key {section}.{key}")


# What the daemon needs, as root of a pod's user namespace, to run each job as its own uid:
# SETUID/SETGID to switch, CHOWN to hand it its temp folder, KILL to stop it at its deadline,
# DAC_OVERRIDE/FOWNER to remove what it left (deploy/validate/image_smoke_userns.py).
USERNS_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID"}
# A pod user namespace maps uids 0-65535.
USERNS_IDS = 65536


def check_userns(where: str, main: dict, by_kind: dict) -> None:
    """A hostUsers: false pod: the guard against a runtime that ignores it, job uids inside the
    namespace's range and one per concurrent job, a Pod Security level that admits it."""
    command = " ".join(main.get("command", []))
    if "/proc/self/uid_map" not in command or "4294967295" not in command:
        fail(where, "with hostUsers: false the container's command must refuse to start when /proc/self/uid_map "
                    "maps the whole uid range (a runtime that ignored hostUsers would run the daemon as the node's root)")
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    defaults = tomllib.loads((REPO / "config/default.toml").read_text())["sandbox"]
    try:
        user = int(env.get("HYBRID__SANDBOX__USER") or defaults["user"])
        users = int(env.get("HYBRID__SANDBOX__USERS") or defaults["users"])
    except ValueError:
        fail(where, "HYBRID__SANDBOX__USER and HYBRID__SANDBOX__USERS must be numbers")
        return
    concurrency = None
    for cm in by_kind.get("ConfigMap", {}).values():
        for text in cm.get("data", {}).values():
            try:
                concurrency = tomllib.loads(text).get("engine", {}).get("concurrency", concurrency)
            except tomllib.TOMLDecodeError:
                pass
    concurrency = concurrency or tomllib.loads((REPO / "config/default.toml").read_text())["engine"]["concurrency"]
    if user < 1 or user + users - 1 >= USERNS_IDS:
        fail(where, f"sandbox uids {user}-{user + users - 1} are outside the user namespace's 1-{USERNS_IDS - 1}")
    if users < concurrency:
        fail(where, f"HYBRID__SANDBOX__USERS {users} < engine.concurrency {concurrency}: running jobs would share uids")
    for ns in by_kind.get("Namespace", {}).values():
        level = ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        if level == "restricted":
            fail(f"Namespace/{ns['metadata']['name']}", "enforces the restricted Pod Security Standard, which refuses "
                 "the added capabilities: use baseline for a hostUsers: false pod")


def check_project_rules(objects: list, final: bool) -> None:
    by_kind = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    docker = dockerfile_facts()
    longest = max(w["timeout_s"] for w in workers_limits().values())

    deployments = by_kind.get("Deployment", {})
    if len(deployments) != 1:
        fail("manifests", f"expected one Deployment, found {len(deployments)}")
        return
    dep = next(iter(deployments.values()))
    where = f"Deployment/{dep['metadata']['name']}"
    spec, pod_meta = dep["spec"], dep["spec"]["template"]["metadata"]
    pod = dep["spec"]["template"]["spec"]
    pod_labels = pod_meta.get("labels", {})
    if "replicas" in spec:
        fail(where, "spec.replicas is set, but KEDA owns the replica count (remove it)")
    if not labels_match(spec["selector"], pod_labels):
        fail(where, "the selector does not match the pod template's labels")

    # Security context: what the sandbox and the image are built for. With a user namespace
    # (hostUsers: false, overlays/userns) the daemon is root of that namespace instead.
    psc = pod.get("securityContext", {})
    userns = pod.get("hostUsers") is False
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(where, "pod securityContext.seccompProfile.type must be RuntimeDefault")
    if userns:
        if psc.get("runAsUser") != 0:
            fail(where, "with hostUsers: false the daemon runs as uid 0 of the pod's user namespace (runAsUser: 0)")
    else:
        if psc.get("runAsNonRoot") is not True:
            fail(where, "pod securityContext.runAsNonRoot must be true")
        if docker["uid"] is not None and psc.get("runAsUser") != docker["uid"]:
            fail(where, f"pod runAsUser {psc.get('runAsUser')} differs from the Dockerfile's USER {docker['uid']}")
    if pod.get("automountServiceAccountToken") is not False:
        fail(where, "automountServiceAccountToken must be false: the daemon never calls the Kubernetes API")

    containers = pod["containers"]
    main = next((c for c in containers if c["name"] == "hybrid-worker"), None)
    if main is None:
        fail(where, "no container named hybrid-worker")
        return
    csc = main.get("securityContext", {})
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(where, "container readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(where, "container allowPrivilegeEscalation must be false")
    added = set(csc.get("capabilities", {}).get("add") or [])
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        fail(where, "container capabilities must drop ALL")
    if userns and not added <= USERNS_CAPABILITIES:
        fail(where, f"with hostUsers: false the container may add only {sorted(USERNS_CAPABILITIES)}, "
                    f"not {sorted(added - USERNS_CAPABILITIES)}")
    elif not userns and added:
        fail(where, "container capabilities must add none (only a user-namespace pod may add the job-switching ones)")
    if csc.get("privileged"):
        fail(where, "container must not be privileged")
    if userns:
        check_userns(where, main, by_kind)
    check_secrets(where, pod, main, by_kind, final)

    ports = {p.get("name"): p["containerPort"] for p in main.get("ports", [])}
    if ports.get("http") != docker["http_port"]:
        fail(where, f"container port `http` is {ports.get('http')}, the image listens on {docker['http_port']} (HYBRID__HTTP__LISTEN)")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = main.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("http", docker["http_port"]):
            fail(where, f"{probe} must GET {path} on port http")

    # Drain: SIGTERM stops receiving; running jobs get engine.drain_timeout_s, then leftovers
    # are stopped (SIGTERM, SIGKILL 2 s later) and abandoned.
    config, config_where = {}, "ConfigMap"
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    mounts = {m["name"]: m for m in main.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_path = env.get("HYBRID_CONFIG")
    if not config_path:
        fail(where, "HYBRID_CONFIG is not set: the ConfigMap's config.toml would be ignored")
    else:
        mount = next((m for m in mounts.values() if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        volume = volumes.get(mount["name"]) if mount else None
        if not volume or "configMap" not in volume:
            fail(where, f"HYBRID_CONFIG={config_path} is not inside a mounted ConfigMap")
        else:
            name = volume["configMap"]["name"]
            key = config_path[len(mount["mountPath"].rstrip("/")) + 1:]
            cm = by_kind.get("ConfigMap", {}).get(name)
            config_where = f"ConfigMap/{name}"
            if cm is None:
                fail(where, f"the ConfigMap {name} it mounts is not in the manifests")
            elif key not in cm.get("data", {}):
                fail(config_where, f"has no key {key!r} (HYBRID_CONFIG={config_path})")
            else:
                try:
                    config = tomllib.loads(cm["data"][key])
                except tomllib.TOMLDecodeError as e:
                    fail(config_where, f"{key} is not valid TOML: {e}")
                check_config_keys(config, config_where)
    defaults = tomllib.loads((REPO / "config/default.toml").read_text())
    engine = {**defaults["engine"], **config.get("engine", {})}
    drain = engine["drain_timeout_s"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < drain + longest:
        fail(where, f"terminationGracePeriodSeconds {grace} < engine.drain_timeout_s {drain} + the longest worker timeout_s {longest}")
    if drain < longest:
        fail(config_where, f"engine.drain_timeout_s {drain} < the longest worker timeout_s {longest}: a scale-in would cut that job short")

    # Budgets (budgets.py): a container OOM kills the daemon and every job together
    # (memory.oom.group), and a full emptyDir evicts the pod.
    plan = budget(config)
    resources = main.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    quantities = {}
    for kind, table in (("limits", limits), ("requests", requests)):
        for key in ("memory", "ephemeral-storage"):
            if key not in table:
                fail(where, f"container resources.{kind}.{key} is not set")
                continue
            try:
                quantities[(kind, key)] = memory_mib(table[key])
            except ValueError as e:
                fail(where, f"resources.{kind}.{key}: {e}")
    if ("limits", "memory") in quantities:
        if quantities[("limits", "memory")] < plan.memory_mib:
            fail(where, f"memory limit {limits['memory']} < {plan.explain_memory()}")
        if quantities.get(("requests", "memory")) != quantities[("limits", "memory")]:
            fail(where, f"memory request {requests.get('memory')} != limit {limits['memory']}: "
                        "the scheduler must reserve the whole budget, or node memory pressure evicts "
                        "this pod before others")

    temp = docker["temp_dir"] or "/tmp"
    writable = [m for m in mounts.values() if not m.get("readOnly")
                and "emptyDir" in volumes.get(m["name"], {})
                and (temp + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    if not writable:
        fail(where, f"engine.temp_dir {temp} is not on a mounted emptyDir (the root file system is read-only)")
    for mount in writable:
        empty_dir = volumes[mount["name"]]["emptyDir"] or {}
        size = empty_dir.get("sizeLimit")
        if empty_dir.get("medium") == "Memory":
            fail(where, f"emptyDir {mount['name']} is in memory: job files would count against the memory budget")
        if size is None:
            fail(where, f"emptyDir {mount['name']} has no sizeLimit ({plan.explain_tmp()})")
            continue
        try:
            size_mib = memory_mib(size)
        except ValueError as e:
            fail(where, f"emptyDir {mount['name']} sizeLimit: {e}")
            continue
        if size_mib < plan.tmp_mib:
            fail(where, f"emptyDir {mount['name']} sizeLimit {size} < {plan.explain_tmp()}")
        storage = quantities.get(("limits", "ephemeral-storage"))
        if storage is not None and storage < size_mib + CONTAINER_LOGS_MIB:
            fail(where, f"ephemeral-storage limit {limits['ephemeral-storage']} < the emptyDir's {size} "
                        f"+ the container logs' {CONTAINER_LOGS_MIB}Mi: the kubelet would evict the pod "
                        "before the emptyDir is full")
        if storage is not None and quantities.get(("requests", "ephemeral-storage")) != storage:
            fail(where, f"ephemeral-storage request {requests.get('ephemeral-storage')} != limit "
                        f"{limits['ephemeral-storage']}: the scheduler must reserve the whole budget")

    # Service Bus and workload identity.
    sb = {**defaults["servicebus"], **config.get("servicebus", {})}
    queues = {**defaults["queues"], **config.get("queues", {})}
    if sb.get("connection_string"):
        fail(config_where, "servicebus.connection_string must not be in a ConfigMap (use workload identity)")
    fqdn = sb.get("namespace", "")
    if not re.fullmatch(r"[a-z][a-z0-9-]{4,48}[a-z0-9]\.servicebus\.windows\.net", fqdn):
        fail(config_where, f"servicebus.namespace {fqdn!r} is not a <name>.servicebus.windows.net FQDN")
    if sb.get("credential") not in ("workload", "auto"):
        fail(config_where, "servicebus.credential must be workload (or auto) on AKS")
    if pod_labels.get("azure.workload.identity/use") != "true":
        fail(where, 'pod label azure.workload.identity/use: "true" is missing')
    sa_name = pod.get("serviceAccountName")
    sa = by_kind.get("ServiceAccount", {}).get(sa_name)
    if sa is None:
        fail(where, f"ServiceAccount {sa_name!r} is not in the manifests")
    else:
        client_id = sa["metadata"].get("annotations", {}).get("azure.workload.identity/client-id", "")
        if not UUID.match(client_id):
            fail(f"ServiceAccount/{sa_name}", "annotation azure.workload.identity/client-id must be a client id (UUID)")
        elif final and client_id == PLACEHOLDER_UUID:
            fail(f"ServiceAccount/{sa_name}", "the client id is still the base's placeholder")

    # KEDA.
    scaled = by_kind.get("ScaledObject", {})
    if len(scaled) != 1:
        fail("manifests", f"expected one ScaledObject, found {len(scaled)}")
    for so in scaled.values():
        sw = f"ScaledObject/{so['metadata']['name']}"
        ref = so["spec"]["scaleTargetRef"]
        if ref.get("kind", "Deployment") != "Deployment" or ref["name"] != dep["metadata"]["name"]:
            fail(sw, f"scaleTargetRef {ref} does not name the Deployment")
        for trig in so["spec"]["triggers"]:
            md = trig.get("metadata", {})
            if trig["type"] != "azure-servicebus":
                continue
            if md.get("queueName") != queues["jobs"]:
                fail(sw, f"queueName {md.get('queueName')!r} is not the jobs queue {queues['jobs']!r}")
            if fqdn and md.get("namespace") != fqdn.split(".")[0]:
                fail(sw, f"namespace {md.get('namespace')!r} is not the configured namespace's name {fqdn.split('.')[0]!r}")
            auth = trig.get("authenticationRef", {}).get("name")
            ta = by_kind.get("TriggerAuthentication", {}).get(auth)
            if ta is None:
                fail(sw, f"authenticationRef {auth!r} is not in the manifests")
            else:
                pid = ta["spec"].get("podIdentity", {})
                if pid.get("provider") != "azure-workload":
                    fail(f"TriggerAuthentication/{auth}", "podIdentity.provider must be azure-workload")
                if final and pid.get("identityId") == PLACEHOLDER_UUID:
                    fail(f"TriggerAuthentication/{auth}", "identityId is still the base's placeholder")
        if so["spec"].get("minReplicaCount", 0) > so["spec"].get("maxReplicaCount", 100):
            fail(sw, "minReplicaCount > maxReplicaCount")

    # Disruption budget and network policy select the pods.
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        found = by_kind.get(kind, {})
        if not found:
            fail("manifests", f"no {kind}")
        for obj in found.values():
            selector = obj["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            if not labels_match(selector, pod_labels):
                fail(f"{kind}/{obj['metadata']['name']}", "its selector does not select the worker pods")
    for np in by_kind.get("NetworkPolicy", {}).values():
        nw = f"NetworkPolicy/{np['metadata']['name']}"
        if set(np["spec"].get("policyTypes", [])) != {"Ingress", "Egress"}:
            fail(nw, "policyTypes must be Ingress and Egress")
        allowed = {(p.get("protocol", "TCP"), p.get("port")) for rule in np["spec"].get("egress", [])
                   for p in rule.get("ports", [])}
        for need in (("UDP", 53), ("TCP", 53), ("TCP", 5671), ("TCP", 443)):
            if need not in allowed:
                fail(nw, f"egress does not allow {need[0]} {need[1]}")
        extra = allowed - {("UDP", 53), ("TCP", 53), ("TCP", 5671), ("TCP", 443)}
        if extra:
            fail(nw, f"egress allows more than DNS, Service Bus and Entra ID: {sorted(extra)}")
        if any(not rule.get("ports") for rule in np["spec"].get("egress", [])):
            fail(nw, "an egress rule without ports allows every port")
        dns_peers = [peer for rule in np["spec"].get("egress", [])
                     if {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])} & {("UDP", 53)}
                     for peer in rule.get("to", [])]
        dns_blocks = {peer["ipBlock"]["cidr"] for peer in dns_peers if "ipBlock" in peer}
        if not any(peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns"
                   for peer in dns_peers):
            fail(nw, "DNS egress does not reach the kube-dns pods")
        for cidr in NODE_LOCAL_DNS:
            if cidr not in dns_blocks:
                fail(nw, f"DNS egress does not allow the node-local resolver {cidr} (AKS LocalDNS / "
                         "NodeLocal DNSCache): every lookup would fail on such a cluster")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    parser.add_argument("--final", action="store_true", help="refuse the base's placeholders")
    parser.add_argument("rendered")
    args = parser.parse_args()
    versions = args.versions or ["1.31"]
    objects = [o for o in yaml.safe_load_all(Path(args.rendered).read_text()) if o]
    for obj in objects:
        if obj.get("apiVersion", "").startswith("keda.sh/"):
            check_keda_schema(obj, versions)
        elif obj.get("apiVersion", "").startswith("secrets-store.csi.x-k8s.io/"):
            check_secrets_store_schema(obj)
        else:
            check_kubernetes_schema(obj, versions)
    check_project_rules(objects, args.final)
    for e in errors:
        print(f"  FAIL {e}")
    kinds = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    if errors:
        print(f"{args.rendered}: {len(errors)} problem(s)")
        return 1
    print(f"{args.rendered}: ok ({len(objects)} objects, Kubernetes {', '.join(versions)}): {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
