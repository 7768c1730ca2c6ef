"""Checks the Dockerfile against the repository, as far as a machine without a Docker engine can:

- every COPY/ADD source (other than --from=stage) exists in the repository and is not excluded
  by .dockerignore (Docker's rules: the last matching pattern wins, a pattern that matches a
  parent folder matches its files, `!` re-includes);
- every --from= names an earlier stage;
- everything the build stage compiles is in the build context: Cargo.toml's target paths, the
  workspace members' and path dependencies' manifests and targets, and every
  include_str!/include_bytes! in the copied Rust sources;
- the contract the deployment relies on: cargo builds with --locked, a numeric non-root USER,
  ENTRYPOINT ["hybrid-worker"] and CMD ["run"], venvs built and `build_venvs_on_start` off,
  `servicebus.embedded` = never (a missing Service Bus setting fails the pod, not silently
  serves an empty emulator), the binary stripped with its debug info kept apart;
- base images: every FROM of a registry image ends in a digest ARG (RUST_DIGEST,
  DEBIAN_DIGEST) whose default is empty or "@sha256:<64 hex>"; with REQUIRE_PINNED_BASES=1 (a
  release build) an empty one is refused.

Usage: check_dockerfile.py  (from anywhere; paths are the repository's)
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
errors = []


def fail(message: str) -> None:
    errors.append(message)


def instructions(text: str) -> list:
    """(line number, INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def pattern_regex(pattern: str) -> re.Pattern:
    i, out = 0, ""
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore() -> list:
    path = REPO / ".dockerignore"
    rules = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line.lstrip("!").strip().strip("/")
            rules.append((negate, pattern_regex(line)))
    return rules


def ignored(rel: str, rules: list) -> bool:
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


def tracked_files() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def main() -> int:
    dockerfile = REPO / "Dockerfile"
    steps = instructions(dockerfile.read_text())
    rules = dockerignore()
    files = tracked_files()
    stages, stage, copied = [], None, {}
    global_args = {}
    for line, word, rest in steps:
        where = f"Dockerfile:{line}"
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        if word == "FROM":
            image = rest.split()[0]
            if image != "scratch" and image not in stages:
                m = re.search(r"\$\{([A-Z_]+_DIGEST)\}$", image)
                if not m:
                    fail(f"{where}: FROM {image} is not pinned: end it with a digest ARG (${{..._DIGEST}})")
                elif m.group(1) not in global_args:
                    fail(f"{where}: FROM {image}: ARG {m.group(1)} is not declared before the first FROM")
                else:
                    digest = global_args[m.group(1)]
                    if digest and not re.fullmatch(r"@sha256:[0-9a-f]{64}", digest):
                        fail(f"{where}: ARG {m.group(1)}={digest!r} is not @sha256:<64 hex digits>")
                    elif not digest and os.environ.get("REQUIRE_PINNED_BASES") == "1":
                        fail(f"{where}: ARG {m.group(1)} is empty: a release build pins every base image "
                             "(deploy/operator-guide.md, \"Pinning the base images\")")
                    elif not digest:
                        print(f"  note: {image} is not pinned (ARG {m.group(1)} is empty); "
                              "release builds set REQUIRE_PINNED_BASES=1")
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            stage = m.group(1) if m else str(len(stages))
            stages.append(stage)
            copied[stage] = []
        elif word in ("COPY", "ADD"):
            if rest.startswith("<<"):
                continue
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            paths = [a for a in args if not a.startswith("--")]
            origin = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if len(paths) < 2:
                fail(f"{where}: {word} needs a source and a destination")
                continue
            if origin is not None:
                if origin not in stages[:-1]:
                    fail(f"{where}: --from={origin} names no earlier stage ({', '.join(stages[:-1])})")
                continue
            for source in paths[:-1]:
                if re.match(r"^[a-z]+://", source):
                    fail(f"{where}: {source}: remote sources are not allowed")
                    continue
                rel = source.strip("/").removeprefix("./") or "."
                matches = sorted(REPO.glob(rel)) if any(c in rel for c in "*?[") else [REPO / rel]
                if not matches or not all(m.exists() for m in matches):
                    fail(f"{where}: {word} source {source!r} does not exist in the repository")
                    continue
                for match in matches:
                    r = match.relative_to(REPO).as_posix()
                    under = [f for f in files if f == r or f.startswith(r + "/")]
                    if not under:
                        fail(f"{where}: {word} source {source!r} holds no file tracked by git")
                    elif ignored(r, rules) or all(ignored(f, rules) for f in under):
                        fail(f"{where}: {word} source {source!r} is excluded by .dockerignore")
                    copied[stage].append(r)
        elif word == "RUN":
            if "cargo build" in rest and "--locked" not in rest:
                fail(f"{where}: cargo build without --locked")
        elif word == "USER":
            user = rest.split(":")[0]
            if not user.isdigit() or user == "0":
                fail(f"{where}: USER must be a numeric non-root uid (Kubernetes runAsNonRoot checks it), got {rest!r}")

    def in_context(rel: str, stage_name: str) -> bool:
        return any(rel == c or rel.startswith(c + "/") or c == "." for c in copied.get(stage_name, [])) \
            and not ignored(rel, rules)

    build = next((s for s in stages if any(w == "RUN" and "cargo build" in r for _, w, r in steps)), "build")
    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    needed = [t["path"] for key in ("bin", "example", "test", "bench") for t in manifest.get(key, []) if "path" in t]
    if "path" in manifest.get("lib", {}):
        needed.append(manifest["lib"]["path"])
    # Workspace members (the emulator's crate) and path dependencies are compiled too: their
    # manifests and sources must be in the build context.
    members = [m for m in manifest.get("workspace", {}).get("members", []) if m != "."]
    members += [d["path"] for d in manifest.get("dependencies", {}).values()
                if isinstance(d, dict) and "path" in d and d["path"] not in members]
    rust_roots = [REPO / "src"]
    for member in members:
        needed.append(f"{member}/Cargo.toml")
        member_manifest = tomllib.loads((REPO / member / "Cargo.toml").read_text()) \
            if (REPO / member / "Cargo.toml").exists() else {}
        targets = [t for key in ("bin", "example") for t in member_manifest.get(key, [])]
        targets.append(member_manifest.get("lib", {}))
        needed += [f"{member}/{t['path']}" for t in targets if "path" in t]
        rust_roots.append(REPO / member / "src")
    for rs in sorted(p for root in rust_roots for p in root.rglob("*.rs")):
        for include in re.findall(r'include_(?:str|bytes)!\("([^"]+)"\)', rs.read_text()):
            needed.append((rs.parent / include).resolve().relative_to(REPO).as_posix())
    for rel in needed:
        if rel.startswith("tests/") or rel.startswith("benches/"):
            continue
        if not (REPO / rel).exists():
            fail(f"Cargo/Rust source needs {rel}, which does not exist")
        elif not in_context(rel, build):
            fail(f"the {build} stage compiles code that needs {rel}, which it does not COPY (or .dockerignore excludes)")

    final = [(w, r) for _, w, r in steps[[i for i, s in enumerate(steps) if s[1] == "FROM"][-1]:]]
    def last(word):
        return next((r for w, r in reversed(final) if w == word), None)
    if last("ENTRYPOINT") != '["hybrid-worker"]':
        fail(f'the final stage\'s ENTRYPOINT must be ["hybrid-worker"], got {last("ENTRYPOINT")}')
    if last("CMD") != '["run"]':
        fail(f'the final stage\'s CMD must be ["run"], got {last("CMD")}')
    if last("USER") is None:
        fail("the final stage sets no USER: it would run as root")
    env = " ".join(r for w, r in final if w == "ENV")
    if "HYBRID__ENGINE__BUILD_VENVS_ON_START=false" not in env:
        fail("the final stage must set HYBRID__ENGINE__BUILD_VENVS_ON_START=false (the root file system is read-only)")
    if not any(w == "RUN" and "workers build" in r for w, r in final):
        fail("the final stage must build the worker venvs (hybrid-worker workers build)")
    if "HYBRID__SERVICEBUS__EMBEDDED=never" not in env:
        fail("the final stage must set HYBRID__SERVICEBUS__EMBEDDED=never: a pod without Service Bus "
             "settings must fail, not run on an empty embedded emulator")
    if not any(w == "RUN" and "--strip-debug" in r and "--only-keep-debug" in r for _, w, r in steps):
        fail("the build stage must strip the binary (objcopy --strip-debug) and keep its debug info "
             "(objcopy --only-keep-debug)")

    for e in errors:
        print(f"  FAIL {e}")
    if errors:
        print(f"Dockerfile: {len(errors)} problem(s)")
        return 1
    sources = sorted({c for cs in copied.values() for c in cs})
    print(f"Dockerfile: ok (stages {', '.join(stages)}; COPY sources present and not ignored: {', '.join(sources)}; "
          f"{len(needed)} compile-time paths in the build context)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
