"""The image in a user namespace, as a pod with `hostUsers: false` runs it (image-smoke.sh
--userns; deploy/operator-guide.md section 9 has what was measured).

With `hostUsers: false` the kubelet gives the pod a user namespace whose uids 0-65535 map to a
range of host uids no other pod has. The daemon can then run as uid 0 *inside* it, with the
capabilities to switch uids (SETUID, SETGID) that mean nothing outside it, so each job runs as a
uid of its own (sandbox.user .. user + users - 1) instead of sharing the daemon's.

This builds the same thing here, on the file system image_smoke.py built from the Dockerfile:
a user namespace mapping 0-65535 to host uids HOST_BASE.., then the mount, PID, network, IPC and
cgroup namespaces of image_smoke.py (read-only root, tmpfs /tmp); the daemon as uid 0 with only
the capabilities, sandbox settings and command of deploy/aks/overlays/userns (read from the
rendered overlay by image_smoke.py); it checks that `workers verify` says `sandbox user on`
with the uid range, that jobs running together get distinct non-zero uids, and that each
worker's job still succeeds.

Usage: image_smoke_userns.py STATE.json   (after image_smoke.py built the file system)
       image_smoke_userns.py --inner STATE.json   (internal)
"""

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image_smoke as smoke  # noqa: E402

CLONE_NEWUSER = 0x10000000
# Above the uids the test suite gives its jobs (200000-239999), so a smoke run beside the suite
# cannot count or kill the suite's processes.
HOST_BASE = 1000000
IDS = 65536
# Capability numbers (linux/capability.h) of those an overlay may add.
CAPABILITY_NUMBERS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7}
# The part inside runs as a host uid of the mapped range: it needs an interpreter every uid can
# reach (a pyenv one under /root is not).
INNER_PYTHON = "/usr/bin/python3"


def outer(state_file: str) -> int:
    """Creates the user namespace (uid_map written by this root parent), then runs --inner in it."""
    libc = ctypes.CDLL(None, use_errno=True)
    log = smoke.WORK / "daemon-userns.log"
    log.write_text("")
    os.chown(log, HOST_BASE, HOST_BASE)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os.write(ready_w, b"E")
            os._exit(1)
        os.write(ready_w, b"R")
        os.read(go_r, 1)
        # Become the namespace's uid 0 (host uid 0 is not mapped in it): an exec keeps the
        # namespace's capabilities only for its root.
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os.execvp("unshare", ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--cgroup", "--fork",
                              "--propagation", "private", "--", INNER_PYTHON, __file__, "--inner", state_file])
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) != b"R":
        os.waitpid(pid, 0)
        smoke.say("image smoke (userns): FAILED: unshare(CLONE_NEWUSER) was refused")
        return 1
    for name in ("uid_map", "gid_map"):
        Path(f"/proc/{pid}/{name}").write_text(f"0 {HOST_BASE} {IDS}\n")
    os.write(go_w, b"G")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def as_namespace_root(state: dict, keep: set):
    """preexec: chroot, uid 0 of the namespace, the bounding set cut to `keep`, no_new_privs."""
    libc = ctypes.CDLL(None, use_errno=True)

    def enter():
        os.chroot(state["root"])
        os.chdir(state["workdir"])
        for cap in range(64):
            if cap not in keep and libc.prctl(smoke.PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        os.setgroups([])
        os.setgid(0)
        os.setuid(0)
        if libc.prctl(smoke.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    return enter


def job_uids(proc: Path, daemon: int) -> set:
    """uids of the daemon's direct children that are job interpreters."""
    uids = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon and "python" in stat.split("(", 1)[1].split(")", 1)[0]:
            uid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:"))
            uids.add(uid)
    return uids


def inner(state_file: str) -> int:
    state = json.loads(Path(state_file).read_text())
    root = Path(state["root"])
    smoke.prepare_namespaces(root)
    binary = state["entrypoint"][0]
    overlay = state["userns"]
    unknown = set(overlay["capabilities"]) - set(CAPABILITY_NUMBERS)
    if unknown or overlay["uid"] != 0:
        smoke.say(f"image smoke (userns): FAILED: the overlay adds {sorted(unknown)} or does not run as uid 0")
        return 1
    caps = {name: CAPABILITY_NUMBERS[name] for name in overlay["capabilities"]}
    job_uid = int(overlay["env"]["HYBRID__SANDBOX__USER"])
    uid_count = int(overlay["env"]["HYBRID__SANDBOX__USERS"])
    env = smoke.image_env(state, HYBRID__SERVICEBUS__EMBEDDED="auto", **overlay["env"])
    enter = as_namespace_root(state, set(caps.values()))

    def run(args, timeout):
        p = subprocess.run(args, env=env, preexec_fn=enter, capture_output=True, text=True, timeout=timeout)
        return p

    smoke.say(f"== userns (deploy/aks/overlays/userns): uids 0-{IDS - 1} -> host {HOST_BASE}-{HOST_BASE + IDS - 1}; "
              f"daemon uid 0 in it, capabilities {', '.join(sorted(caps))}; sandbox.user {job_uid}, users {uid_count}")
    r = run(overlay["command"] + ["workers", "verify"], 60)
    for line in (r.stdout + r.stderr).rstrip().splitlines():
        smoke.say(f"   | {line}")
    smoke.check(r.returncode == 0, f"workers verify exits 0 (got {r.returncode})")
    expected = f"uids {job_uid}-{job_uid + uid_count - 1} (one per running job)"
    smoke.check(expected in r.stdout, f"workers verify: sandbox user on, {expected}")

    log = open(smoke.WORK / "daemon-userns.log", "w")
    daemon = subprocess.Popen(overlay["command"] + state["cmd"], env=env, preexec_fn=enter,
                              stdout=log, stderr=subprocess.STDOUT)
    port = env.get("HYBRID__HTTP__LISTEN", "127.0.0.1:9090").rsplit(":", 1)[1]
    started = time.monotonic()
    while time.monotonic() - started < 60 and daemon.poll() is None:
        if smoke.http_get(f"http://127.0.0.1:{port}/readyz") == 200:
            break
        time.sleep(0.2)
    ready = smoke.check(daemon.poll() is None and smoke.http_get(f"http://127.0.0.1:{port}/readyz") == 200,
                        "run (uid 0 in the namespace) is ready")
    if ready:

        job = root / "tmp/sleep-3s.json"
        job.write_text(json.dumps({"action": "sleep", "seconds": 3}))
        submits = [subprocess.Popen([binary, "submit", "diagnostics", "--input", "/tmp/sleep-3s.json", "--wait",
                                     "--timeout", "60"], env=env, preexec_fn=enter,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(uid_count)]
        seen, deadline = set(), time.monotonic() + 20
        while time.monotonic() < deadline and any(p.poll() is None for p in submits):
            seen |= job_uids(root / "proc", daemon.pid)
            time.sleep(0.05)
        replies = [json.loads(p.communicate()[0] or "{}") for p in submits]
        errors = sorted({json.dumps(rep.get("error"))[:300] for rep in replies if rep.get("status") != "succeeded"})
        smoke.check(not errors, f"{uid_count} concurrent jobs succeeded{': ' + '; '.join(errors) if errors else ''}")
        smoke.check(len(seen) == uid_count and 0 not in seen and all(job_uid <= u < job_uid + uid_count for u in seen),
                    f"the concurrent jobs ran as distinct uids {sorted(seen)} (inside the namespace; on the host "
                    f"{sorted(HOST_BASE + u for u in seen)})")

        for worker in sorted(p for p in (root / "opt/hybrid-worker/workers").iterdir() if (p / "worker.toml").exists()):
            example = "/" + smoke.choose_example(worker).relative_to(root).as_posix()
            r = run([binary, "submit", worker.name, "--input", example, "--wait", "--timeout", "60"], 90)
            try:
                status = json.loads(r.stdout).get("status")
            except json.JSONDecodeError:
                status = f"no reply: {r.stderr.strip()[-200:]}"
            smoke.check(status == "succeeded", f"{worker.name}: reply status {status!r}")
        # A job past its deadline must be killed, though it runs as another uid than the daemon
        # (CAP_KILL), and its temp folder removed, though the job owns it (CAP_DAC_OVERRIDE, FOWNER).
        (root / "tmp/sleep-10s.json").write_text(json.dumps({"action": "sleep", "seconds": 10}))
        t0 = time.monotonic()
        r = run([binary, "exec", "diagnostics", "--input", "/tmp/sleep-10s.json", "--timeout", "1"], 30)
        took = time.monotonic() - t0
        try:
            kind = (json.loads(r.stdout).get("error") or {}).get("kind")
        except json.JSONDecodeError:
            kind = f"no result: {r.stderr.strip()[-200:]}"
        smoke.check(kind == "Timeout" and took < 5, f"a job past its 1 s deadline is stopped: {kind} after {took:.1f} s")
        left = [p.name for p in (root / "tmp/jobs").glob("hybrid-job-*")] if (root / "tmp/jobs").exists() else []
        strays = job_uids(root / "proc", daemon.pid)
        smoke.check(not left, f"no job temp folder left in /tmp/jobs ({left or 'none'})")
        smoke.check(not strays, f"no job process left running ({sorted(strays) or 'none'})")
    daemon.terminate()
    try:
        code = daemon.wait(timeout=90)
    except subprocess.TimeoutExpired:
        daemon.kill()
        code = None
    log.close()
    smoke.check(code == 0, f"run drained and exited {code}")
    if smoke.failures:
        smoke.say(f"   daemon log: {smoke.WORK / 'daemon-userns.log'}")
    smoke.say(f"image smoke (userns): {'FAILED' if smoke.failures else 'passed'}")
    return 1 if smoke.failures else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        sys.exit(inner(sys.argv[2]))
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(outer(sys.argv[1]))
