"""The container image, proven without Docker (deploy/image-smoke.sh runs this as root).

No Docker engine or registry is reachable on this project's machines, so this builds what the
Dockerfile describes from its own steps: it parses the Dockerfile, builds the binary with the
build stage's commands that produce /out (on the host, into target/image-smoke/out), makes the
runtime stage's base with debootstrap (minbase of the same Debian release as the `FROM
debian:<release>-slim` line), then executes every runtime-stage instruction in order — RUN in a
chroot with the ENV so far, COPY from /out or from the build context with .dockerignore applied,
ENV, WORKDIR, USER — so the image cannot drift from what is tested here.

It then starts the image as a pod would, in fresh mount, PID, network, IPC and cgroup
namespaces: the root file system read-only, a writable tmpfs on /tmp only (the emptyDir), the
image's USER with no capabilities and no_new_privs, the image's ENV. It checks that:
1. `run` as shipped (servicebus.embedded = never, no Service Bus configured) exits 2 and names
   the settings;
2. `workers verify` passes (printed);
3. `run` with the embedded emulator switched on (HYBRID__SERVICEBUS__EMBEDDED=auto) becomes
   ready, runs one job of every shipped worker submitted with `submit --wait`, and each reply
   succeeds with the result `exec` gives for the same input in the same image;
4. the daemon's own memory and /tmp use fit budgets.py's shares;
5. SIGTERM drains and `run` exits 0.

With --userns it then runs the image as deploy/aks/overlays/userns deploys it (hostUsers:
false): image_smoke_userns.py, with that overlay's capabilities, sandbox settings and command.
The overlay's guard is also run here, outside a user namespace, where it must refuse to start.

Usage: image_smoke.py [--userns]   (deploy/image-smoke.sh)
       image_smoke.py --inner STATE.json   (internal: the part inside the namespaces)
"""

import argparse
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budgets  # noqa: E402
from check_dockerfile import dockerignore, ignored, instructions  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "target/image-smoke"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")

failures = []


def say(message: str) -> None:
    print(message, flush=True)


def check(ok: bool, message: str) -> bool:
    say(f"  {'ok  ' if ok else 'FAIL'} {message}")
    if not ok:
        failures.append(message)
    return ok


class SmokeError(Exception):
    """A step that cannot go on; the message says which and why."""


# ---------------------------------------------------------------- the Dockerfile, as stages


def parse_dockerfile() -> list:
    """[{name, base, steps: [(line, INSTRUCTION, args)]}] with the global ARGs expanded in FROM."""
    global_args, stages = {}, []
    for line, word, rest in instructions((REPO / "Dockerfile").read_text()):
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        elif word == "FROM":
            expanded = re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: global_args.get(m.group(1), ""), rest)
            parts = expanded.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append({"name": name, "base": parts[0], "steps": []})
        elif stages:
            stages[-1]["steps"].append((line, word, rest))
    return stages


def run_build_stage(stage: dict, out: Path) -> None:
    """The build stage's RUN steps that produce /out, on the host, from the repository."""
    ran = 0
    for line, word, rest in stage["steps"]:
        if word != "RUN" or "/out/" not in rest:
            continue
        command = re.sub(r"^(--mount=\S+\s+)+", "", rest).replace("/out/", f"{out}/")
        say(f"== build stage, Dockerfile:{line}: {command[:110]}{'…' if len(command) > 110 else ''}")
        subprocess.run(["/bin/sh", "-c", command], cwd=REPO, check=True)
        ran += 1
    if not ran:
        raise SmokeError("the build stage has no RUN step that writes /out/")


# ---------------------------------------------------------------- the runtime stage's file system


def debian_release(base: str) -> str:
    m = re.fullmatch(r"debian:([a-z]+)-slim(@sha256:[0-9a-f]{64})?", base)
    if not m:
        raise SmokeError(f"the runtime stage's base {base!r} is not debian:<release>-slim: debootstrap cannot stand in for it")
    return m.group(1)


def base_rootfs(release: str) -> Path:
    """debootstrap --variant=minbase of the release, kept in target/image-smoke between runs."""
    base = WORK / f"base-{release}"
    if (base / ".complete").exists():
        say(f"== base: {base} (debootstrap {release} minbase, cached)")
        return base
    shutil.rmtree(base, ignore_errors=True)
    say(f"== base: debootstrap --variant=minbase {release} {base} ({MIRROR})")
    subprocess.run(["debootstrap", "--variant=minbase", release, str(base), MIRROR], check=True,
                   stdout=subprocess.DEVNULL)
    (base / ".complete").write_text(release + "\n")
    return base


# Lent to RUN steps from the host, as `docker build` on this host would need them: the proxy
# variables (Docker passes them as predefined build arguments) and the host's CA bundle, mounted
# read-only over the image's for the step only (as a BuildKit secret mount would be), for hosts
# whose egress goes through a TLS-inspecting proxy. The image keeps Debian's own bundle.
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def chroot_run(root: Path, command: str, env: dict, workdir: str) -> None:
    """A RUN step: /bin/sh -c in the chroot, as root, with /proc, /dev and the host's resolver."""
    script = (
        'set -e; R="$1"; mount -t proc proc "$R/proc"; mount --rbind /dev "$R/dev"; '
        'touch "$R/etc/resolv.conf" 2>/dev/null || true; mount --bind /etc/resolv.conf "$R/etc/resolv.conf"; '
        f'if [ -f {HOST_CA_BUNDLE} ] && [ -f "$R{HOST_CA_BUNDLE}" ]; then '
        f'mount --bind -o ro {HOST_CA_BUNDLE} "$R{HOST_CA_BUNDLE}"; fi; '
        'mkdir -p "$R$3"; exec chroot "$R" /bin/sh -c "cd \\"\\$0\\" && $2" "$3"'
    )
    lent = {k: os.environ[k] for k in PROXY_VARS if k in os.environ}
    subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
                    "sh", str(root), command, workdir], env={**lent, **env}, check=True)


def copy_into(src: Path, dest: Path, rules: list, rel: str) -> None:
    """Docker's COPY of a build-context path: a folder's contents, .dockerignore applied, owned by root."""
    if src.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        for child in sorted(src.iterdir()):
            child_rel = f"{rel}/{child.name}" if rel else child.name
            if not ignored(child_rel, rules):
                copy_into(child, dest / child.name, rules, child_rel)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest, follow_symlinks=False)
    os.lchown(dest, 0, 0)


def build_runtime(stage: dict, base: Path, out: Path) -> dict:
    root = WORK / "rootfs"
    if root.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    (root / ".complete").unlink(missing_ok=True)
    rules = dockerignore()
    env, workdir, user, entrypoint, cmd = {"PATH": DEFAULT_PATH}, "/", None, [], []
    for line, word, rest in stage["steps"]:
        where = f"Dockerfile:{line}"
        if word == "RUN":
            if user is not None:
                raise SmokeError(f"{where}: RUN after USER is not supported by this smoke test")
            say(f"== runtime stage, {where}: RUN {rest[:100]}{'…' if len(rest) > 100 else ''}")
            chroot_run(root, rest, {**env, "HOME": "/root"}, workdir)
        elif word == "COPY":
            args = shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            paths = [a for a in args if not a.startswith("--")]
            origin = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            dest_text = paths[-1] if paths[-1].startswith("/") else f"{workdir.rstrip('/')}/{paths[-1]}"
            for source in paths[:-1]:
                if origin is not None:
                    if not source.startswith("/out/"):
                        raise SmokeError(f"{where}: COPY --from={origin} {source}: only /out/ of the build stage is known here")
                    src, rel = out / source[len("/out/"):], None
                else:
                    rel = source.strip("/").removeprefix("./")
                    src = REPO / rel
                dest = root / dest_text.lstrip("/")
                if dest_text.endswith("/") and not src.is_dir():
                    dest = dest / src.name
                say(f"== runtime stage, {where}: COPY {source} -> {dest_text}")
                copy_into(src, dest, rules if rel is not None else [], rel or "")
        elif word == "ENV":
            for token in shlex.split(rest):
                if "=" not in token:
                    raise SmokeError(f"{where}: ENV {token!r}: only the KEY=value form is supported")
                key, _, value = token.partition("=")
                env[key] = re.sub(r"\$\{?([A-Za-z_]+)\}?", lambda m: env.get(m.group(1), ""), value)
        elif word == "WORKDIR":
            workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
            (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif word == "USER":
            user = rest
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "CMD":
            cmd = json.loads(rest)
        elif word in ("EXPOSE", "STOPSIGNAL", "LABEL", "ARG"):
            pass
        else:
            raise SmokeError(f"{where}: {word} is not supported by this smoke test")
    if user is None or not re.fullmatch(r"\d+(:\d+)?", user):
        raise SmokeError(f"the runtime stage's USER {user!r} is not numeric uid[:gid]")
    uid, _, gid = user.partition(":")
    return {"root": str(root), "env": env, "workdir": workdir, "uid": int(uid), "gid": int(gid or uid),
            "entrypoint": entrypoint, "cmd": cmd}


# ---------------------------------------------------------------- inside the namespaces

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def prepare_namespaces(root: Path) -> None:
    """What the kubelet and the runtime give the container: a read-only root, an emptyDir on /tmp,
    a fresh /proc, a minimal /dev, /sys and the cgroup file system read-only, loopback up."""
    mount("--bind", str(root), str(root))
    mount("-o", "remount,bind,ro", str(root))
    mount("-t", "tmpfs", "-o", "mode=0777,size=4352m", "tmpfs", str(root / "tmp"))
    mount("-t", "proc", "proc", str(root / "proc"))
    mount("-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", str(root / "dev"))
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        (root / "dev" / node).touch()
        mount("--bind", f"/dev/{node}", str(root / "dev" / node))
    (root / "dev/shm").mkdir()
    mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", str(root / "dev/shm"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        (root / "dev" / name).symlink_to(target)
    mount("-o", "remount,ro,bind", str(root / "dev"))
    mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", str(root / "sys"))
    mount("-t", "cgroup2", "-o", "ro,nosuid,nodev,noexec", "cgroup2", str(root / "sys/fs/cgroup"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def as_image_user(state: dict):
    """preexec: chroot, the image's WORKDIR and USER, every capability dropped, no_new_privs."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter():
        os.chroot(state["root"])
        os.chdir(state["workdir"])
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        os.setgroups([])
        os.setgid(state["gid"])
        os.setuid(state["uid"])
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    return enter


def image_env(state: dict, **overrides: str) -> dict:
    return {**state["env"], "HOME": "/nonexistent", "HOSTNAME": "image-smoke", **overrides}


def start(state: dict, args: list, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, preexec_fn=as_image_user(state), **kwargs)


def run(state: dict, args: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    p = start(state, args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return subprocess.CompletedProcess(args, None, out, err)
    return subprocess.CompletedProcess(args, p.returncode, out, err)


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def process_tree_rss_kib(proc: Path, pid: int) -> tuple:
    """VmRSS of pid and its descendants (read from the namespace's own /proc)."""
    parents = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0
    for p in tree:
        try:
            for line in (proc / str(p) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total, len(tree)


def folder_bytes(path: Path, skip: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        if Path(dirpath).is_relative_to(skip):
            continue
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def choose_example(worker: Path) -> Path:
    examples = sorted((worker / "examples").glob("*.json"))
    if not examples:
        raise SmokeError(f"worker {worker.name} ships no examples/*.json to submit")
    return next((e for e in examples if e.name == "echo.json"), examples[0])


def inner(state_file: str) -> int:
    state = json.loads(Path(state_file).read_text())
    root = Path(state["root"])
    prepare_namespaces(root)
    command = state["entrypoint"] + state["cmd"]
    binary = state["entrypoint"][0]
    shipped = image_env(state)

    say(f"== 1. `{' '.join(command)}` as shipped: no Service Bus configured, servicebus.embedded = "
        f"{shipped.get('HYBRID__SERVICEBUS__EMBEDDED', '(unset)')}")
    r = run(state, command, shipped, timeout=20)
    check(r.returncode == 2, f"exits 2 (got {r.returncode})")
    check("servicebus.connection_string" in r.stderr and "servicebus.namespace" in r.stderr,
          "the message names servicebus.connection_string and servicebus.namespace")

    say(f"== 2. `{binary} workers verify` (uid {state['uid']}, read-only root, /tmp writable)")
    r = run(state, [binary, "workers", "verify"], shipped, timeout=60)
    for line in (r.stdout + r.stderr).rstrip().splitlines():
        say(f"   | {line}")
    check(r.returncode == 0, f"workers verify exits 0 (got {r.returncode})")

    env = image_env(state, HYBRID__SERVICEBUS__EMBEDDED="auto")
    say("== 3. `run` on the embedded emulator (HYBRID__SERVICEBUS__EMBEDDED=auto)")
    log = open(WORK / "daemon.log", "w")
    daemon = start(state, command, env, stdout=log, stderr=subprocess.STDOUT)
    port = env.get("HYBRID__HTTP__LISTEN", "127.0.0.1:9090").rsplit(":", 1)[1]
    started, ready = time.monotonic(), False
    while time.monotonic() - started < 60 and daemon.poll() is None:
        if http_get(f"http://127.0.0.1:{port}/readyz") == 200:
            ready = True
            break
        time.sleep(0.2)
    check(ready, f"/readyz answers 200 ({time.monotonic() - started:.1f} s after start)")
    workers_dir = root / env["HYBRID__WORKERS__DIR"].lstrip("/")
    jobs = 0
    if ready:
        for worker in sorted(p for p in workers_dir.iterdir() if (p / "worker.toml").exists()):
            example = choose_example(worker)
            inside = "/" + example.relative_to(root).as_posix()
            t0 = time.monotonic()
            sub = run(state, [binary, "submit", worker.name, "--input", inside, "--wait", "--timeout", "60"], env, timeout=90)
            took = time.monotonic() - t0
            direct = run(state, [binary, "exec", worker.name, "--input", inside], shipped, timeout=90)
            try:
                reply, expected = json.loads(sub.stdout), json.loads(direct.stdout)
            except json.JSONDecodeError:
                check(False, f"{worker.name} ({example.name}): reply or exec output is not JSON:\n"
                             f"submit: {sub.stdout}{sub.stderr}\nexec: {direct.stdout}{direct.stderr}")
                continue
            jobs += 1
            check(sub.returncode == 0 and reply.get("status") == "succeeded",
                  f"{worker.name} ({example.name}): reply status {reply.get('status')!r} in {took:.2f} s")
            check(reply.get("result") == expected.get("result") and expected.get("status") == "succeeded",
                  f"{worker.name}: the reply's result is the one `exec` gives for the same input")
        rss_kib, processes = process_tree_rss_kib(root / "proc", daemon.pid)
        rss_mib = rss_kib / 1024
        check(rss_mib <= budgets.DAEMON_MEMORY_MIB,
              f"the daemon's own memory: {rss_mib:.1f} MiB resident in {processes} process(es), embedded "
              f"emulator included (budget {budgets.DAEMON_MEMORY_MIB} MiB, deploy/validate/budgets.py)")
        tmp_mib = folder_bytes(root / "tmp", skip=root / "tmp/emulator") / 2**20
        check(tmp_mib <= budgets.DAEMON_TMP_MIB,
              f"the daemon's own files in /tmp after the jobs: {tmp_mib:.1f} MiB (budget {budgets.DAEMON_TMP_MIB} MiB)")
    check(jobs == len([p for p in workers_dir.iterdir() if (p / "worker.toml").exists()]),
          f"one job for each of the {jobs} shipped workers")

    if "userns" in state:
        guard = state["userns"]["command"] + ["workers", "verify"]
        say("== userns overlay's command outside a user namespace (a runtime that ignored hostUsers)")
        r = run(state, guard, shipped, timeout=30)
        check(r.returncode == 2 and "hostUsers: false did not take effect" in r.stderr,
              f"refuses to start: exit {r.returncode}, {r.stderr.strip()[:100]!r}")

    say("== 4. SIGTERM")
    t0 = time.monotonic()
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        code = daemon.wait(timeout=90)
    except subprocess.TimeoutExpired:
        daemon.kill()
        code = None
    log.close()
    check(code == 0, f"`run` drained and exited {code} ({time.monotonic() - t0:.1f} s)")
    if failures:
        say(f"   daemon log: {WORK / 'daemon.log'}")
    return 1 if failures else 0


# ---------------------------------------------------------------- outside


def userns_overlay() -> dict:
    """The hybrid-worker container of the rendered userns overlay: its command, capabilities and
    sandbox variables, which image_smoke_userns.py applies."""
    import render
    objects = render.build(REPO / "deploy/aks/overlays/userns")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = next(c for c in pod["containers"] if c["name"] == "hybrid-worker")
    if pod.get("hostUsers") is not False:
        raise SmokeError("deploy/aks/overlays/userns does not set hostUsers: false")
    return {
        "command": main.get("command", []),
        "capabilities": main["securityContext"]["capabilities"].get("add", []),
        "env": {e["name"]: e["value"] for e in main.get("env", []) if e["name"].startswith("HYBRID__SANDBOX__")},
        "uid": pod["securityContext"].get("runAsUser"),
    }


def outer(userns: bool) -> int:
    if os.geteuid() != 0:
        raise SmokeError("run as root: debootstrap, chroot and namespaces need it")
    for tool in ("debootstrap", "unshare", "chroot", "mount", "ip", "objcopy", "cargo"):
        if shutil.which(tool) is None:
            raise SmokeError(f"{tool} is not installed (apt-get install debootstrap iproute2 binutils)")
    t0 = time.monotonic()
    stages = parse_dockerfile()
    runtime = stages[-1]
    release = debian_release(runtime["base"])
    build = next((s for s in stages if any(w == "RUN" and "/out/" in r for _, w, r in s["steps"])), None)
    if build is None:
        raise SmokeError("no stage writes /out/")
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    run_build_stage(build, out)
    t_build = time.monotonic()
    base = base_rootfs(release)
    state = build_runtime(runtime, base, out)
    t_image = time.monotonic()
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    say(f"== binary: {', '.join(f'{n} {s / 2**20:.1f} MiB' for n, s in sorted(sizes.items()))}")
    if userns:
        state["userns"] = userns_overlay()
    state_file = WORK / "state.json"
    state_file.write_text(json.dumps(state))
    r = subprocess.run(["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--cgroup", "--fork",
                        "--propagation", "private", "--", sys.executable, __file__, "--inner", str(state_file)])
    code = r.returncode
    if userns:
        import image_smoke_userns
        code = image_smoke_userns.outer(str(state_file)) or code
    t_end = time.monotonic()
    say(f"== times: build stage {t_build - t0:.0f} s, runtime file system {t_image - t_build:.0f} s, "
        f"checks {t_end - t_image:.0f} s, total {t_end - t0:.0f} s")
    if code != 0:
        say("image smoke: FAILED")
        return 1
    say("image smoke: passed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", metavar="STATE.json")
    parser.add_argument("--userns", action="store_true", help="also run deploy/aks/overlays/userns's setup")
    args = parser.parse_args()
    try:
        return inner(args.inner) if args.inner else outer(args.userns)
    except (SmokeError, subprocess.CalledProcessError, OSError) as e:
        say(f"image smoke: FAILED: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
