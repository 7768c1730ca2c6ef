"""Renders a kustomization the way `kustomize build` does, for the subset of kustomize this
project's manifests use, so that CI can validate what would be applied without kubectl or a
kustomize binary (neither is installable from the registries this project's machines reach).

Supported, with kustomize's semantics: `resources` (files and other kustomization folders),
`namespace` (set on every namespaced object), `images` (name -> newName/newTag/digest on
containers and initContainers), `patches` with an inline JSON 6902 patch and a `target`
(kind/name/namespace/group/version). Any other field of a Kustomization is refused, so a
manifest change that needs a real kustomize fails here loudly instead of rendering wrong.

Usage: render.py DIR  (the rendered YAML stream goes to stdout)
"""

import copy
import sys
from pathlib import Path

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
# Kinds used here that are cluster-scoped; everything else gets `namespace`.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "StorageClass", "PriorityClass", "PersistentVolume"}


class RenderError(Exception):
    pass


def load_kustomization(folder: Path) -> dict:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = folder / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            unknown = set(data) - SUPPORTED
            if unknown:
                raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
            if data.get("kind", "Kustomization") != "Kustomization":
                raise RenderError(f"{path}: kind must be Kustomization")
            return data
    raise RenderError(f"{folder}: no kustomization.yaml")


def build(folder: Path) -> list:
    folder = folder.resolve()
    k = load_kustomization(folder)
    objects = []
    for entry in k.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects.extend(build(path))
        elif path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                if doc is not None:
                    objects.append(doc)
        else:
            raise RenderError(f"{folder}: resource {entry!r} does not exist")
    seen = set()
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"), obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            raise RenderError(f"{folder}: {key} is defined twice")
        seen.add(key)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        apply_image(objects, image)
    for patch in k.get("patches", []):
        apply_patch(folder, objects, patch)
    return objects


def split_image(ref: str):
    """name, tag, digest of an image reference (a port in the registry is not a tag)."""
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    name, tag = ref, None
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
    return name, tag, digest


def apply_image(objects: list, image: dict) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise RenderError(f"images: unsupported fields {sorted(unknown)}")
    matched = False
    for obj in objects:
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec") if "template" in spec else None
        if obj["kind"] == "Pod":
            pod = spec
        if not pod:
            continue
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag, digest = split_image(container["image"])
            if name != image["name"]:
                continue
            matched = True
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            elif "newTag" in image:
                container["image"] = f"{name}:{image['newTag']}"
            else:
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    if not matched:
        raise RenderError(f"images: no container uses image {image['name']!r}")


def target_matches(obj: dict, target: dict) -> bool:
    unknown = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unknown:
        raise RenderError(f"patches: unsupported target fields {sorted(unknown)}")
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "kind": obj.get("kind"),
        "name": obj["metadata"].get("name"),
        "namespace": obj["metadata"].get("namespace"),
        "group": group,
        "version": version,
    }
    return all(checks[key] == value for key, value in target.items())


def apply_patch(folder: Path, objects: list, patch: dict) -> None:
    if set(patch) - {"target", "patch"} or "patch" not in patch or "target" not in patch:
        raise RenderError(f"{folder}: only inline JSON 6902 patches with a target are supported")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise RenderError(f"{folder}: a strategic-merge patch is not supported; write JSON 6902 ops")
    targets = [o for o in objects if target_matches(o, patch["target"])]
    if not targets:
        raise RenderError(f"{folder}: patch target {patch['target']} matches nothing")
    for obj in targets:
        for op in ops:
            json6902(obj, op)


def pointer(path: str) -> list:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def walk(doc, parts):
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict) and part in doc:
            doc = doc[part]
        else:
            raise RenderError(f"path element {part!r} does not exist")
    return doc


def json6902(obj: dict, op: dict) -> None:
    kind = op.get("op")
    parts = pointer(op["path"])
    parent = walk(obj, parts[:-1])
    last = parts[-1]
    where = f"{obj['kind']}/{obj['metadata']['name']} {op['path']}"
    if kind in ("replace", "remove"):
        exists = (isinstance(parent, dict) and last in parent) or (
            isinstance(parent, list) and last.isdigit() and int(last) < len(parent))
        if not exists:
            raise RenderError(f"{kind} {where}: no such path")
    if kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            elif kind == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            parent[last] = value
    elif kind == "remove":
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    else:
        raise RenderError(f"{where}: op {kind!r} is not supported")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        objects = build(Path(sys.argv[1]))
    except (RenderError, KeyError, ValueError, IndexError) as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
