"""The CPU a fork-mode trivial job costs, process by process, in numbers that load on the
machine moves little, and what that budget allows on this machine's cores.

    target/bench-venv/bin/python bench/e2e/daemon_cost.py [--strace] [--jobs N] [--no-floor]
        [--set HYBRID__KEY=VALUE ...] [BINARY ...]

Each binary (default: target/release/hybrid-worker) serves the bench's noop-fork worker at
concurrency 2; N jobs (default 1000) are sent in one batch after 20 warm-up jobs, on links opened before
the clock starts. The emulator
runs in its own process. CPU time (user + system) is read per share:

- the daemon: utime + stime of its process (/proc);
- the warm parent and the job children: the cgroup v2 folder the daemon runs in (a fresh one
  made for the run; the daemon moves itself into its leaf and makes the job cgroups beside it),
  less the daemon's own share;
- the emulator: its own cgroup;
- the producer and consumer (the Python SDK in this process): getrusage of this process;
- the runtime fork floor (bench.py's, no daemon, broker or sandbox): getrusage of its process
  and its children.

With --strace, the daemon's system calls (strace -c over its threads, not the warm parent or
the jobs); strace slows the daemon, so read CPU from runs without it. Needs root (cgroups) and
the venvs bench/e2e/run.sh builds (target/bench-venvs).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusReceiveMode

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY = "SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cgroup2_root() -> pathlib.Path:
    for line in pathlib.Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return pathlib.Path(fields[1])
    raise RuntimeError("no cgroup2 mount: the CPU budget needs cgroup v2")


def cgroup_cpu_seconds(folder: pathlib.Path) -> float:
    for line in (folder / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value) / 1e6
    raise RuntimeError(f"{folder}/cpu.stat has no usage_usec")


def enter(folder: pathlib.Path):
    """A preexec_fn that moves the new process into `folder`."""
    def move() -> None:
        (folder / "cgroup.procs").write_text("0")
    return move


def remove_cgroups(folder: pathlib.Path) -> None:
    """Removes `folder` and what the daemon left in it, deepest first (each must be empty)."""
    for sub in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if sub.is_dir():
            try:
                sub.rmdir()
            except OSError as e:
                print(f"  (could not remove {sub}: {e})", file=sys.stderr)
    try:
        folder.rmdir()
    except OSError as e:
        print(f"  (could not remove {folder}: {e})", file=sys.stderr)


def runtime_floor(jobs: int) -> tuple[float, float]:
    """bench.py's runtime fork floor: (jobs/s, CPU seconds per job of it and its children)."""
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import bench  # noqa: PLC0415 (bench.py's floor, not a copy of it)
    before = own_cpu_seconds(resource.RUSAGE_CHILDREN)
    rate = bench.runtime_floor("floor runtime fork", bench.venv_python("noop-fork"), jobs)["throughput_per_s"]
    return rate, (own_cpu_seconds(resource.RUSAGE_CHILDREN) - before) / jobs


def send_and_wait(sender, receiver, session: str, n: int) -> float:
    """Sends n jobs in batches and waits for their n replies; returns the seconds taken."""
    started = time.perf_counter()
    batch = sender.create_message_batch()
    for i in range(n):
        msg = ServiceBusMessage(json.dumps({"worker": "noop-fork", "input": {"n": i}}),
                                message_id=str(uuid.uuid4()), reply_to="results",
                                reply_to_session_id=session, content_type="application/json")
        try:
            batch.add_message(msg)
        except ValueError:  # the batch is full
            sender.send_messages(batch)
            batch = sender.create_message_batch()
            batch.add_message(msg)
    sender.send_messages(batch)
    got = 0
    while got < n:
        got += len(receiver.receive_messages(max_message_count=min(n - got, 250),
                                             max_wait_time=5))
    return time.perf_counter() - started


def measure(binary: str, jobs: int, trace: bool, tmp: pathlib.Path, extra: dict) -> dict:
    port = free_port()
    (tmp / "Config.json").write_text(json.dumps({"UserConfig": {"Namespaces": [{
        "Name": "sbemulatorns", "Queues": [
            {"Name": "jobs", "Properties": {"LockDuration": "PT30S", "MaxDeliveryCount": 10}},
            {"Name": "results", "Properties": {"RequiresSession": True}}]}],
        "Logging": {"Type": "Console"}}}))
    env = {**os.environ, "HYBRID__EMULATOR__LISTEN": f"127.0.0.1:{port}",
           "HYBRID__EMULATOR__DATA_DIR": str(tmp / "data"),
           "HYBRID__EMULATOR__ENTITIES": str(tmp / "Config.json"),
           "HYBRID__LOG__FORMAT": "json", "HYBRID__LOG__LEVEL": "warn"}
    connection = f"Endpoint=sb://127.0.0.1:{port};{KEY};UseDevelopmentEmulator=true;"
    log = tmp / "daemon.log"
    groups = cgroup2_root() / f"hybrid-cost-{uuid.uuid4().hex[:8]}"
    daemon_group, emulator_group = groups / "daemon-folder", groups / "emulator"
    for folder in (groups, daemon_group, emulator_group):
        folder.mkdir()
    emulator = subprocess.Popen([binary, "emulator"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=enter(emulator_group))
    daemon = None
    try:
        time.sleep(1.5)
        daemon = subprocess.Popen(
            [binary, "run"], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            preexec_fn=enter(daemon_group),
            env={**env, "HYBRID__SERVICEBUS__CONNECTION_STRING": connection,
                 "HYBRID__WORKERS__DIR": str(ROOT / "bench" / "workers"),
                 "HYBRID__WORKERS__VENV_ROOT": str(ROOT / "target" / "bench-venvs"),
                 "HYBRID__WORKERS__ALLOW": "noop-fork",
                 "HYBRID__ENGINE__CONCURRENCY": "2", "HYBRID__HTTP__LISTEN": "127.0.0.1:0",
                 "HYBRID__LOG__LEVEL": "info", **extra})
        while "is receiving jobs" not in log.read_text():
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        session = f"cost-{uuid.uuid4()}"
        with ServiceBusClient.from_connection_string(connection) as sb, \
                sb.get_queue_sender("jobs") as sender, \
                sb.get_queue_receiver("results", session_id=session, prefetch_count=0,
                                      receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
                                      ) as receiver:
            send_and_wait(sender, receiver, session, 20)
            tracer = None
            if trace:
                threads = os.listdir(f"/proc/{daemon.pid}/task")
                tracer = subprocess.Popen(
                    ["strace", "-c", "-o", str(tmp / "strace.txt")]
                    + [arg for t in threads for arg in ("-p", t)], stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            before = (cpu_seconds(daemon.pid), cgroup_cpu_seconds(daemon_group),
                      cgroup_cpu_seconds(emulator_group), own_cpu_seconds())
            seconds = send_and_wait(sender, receiver, session, jobs)
            after = (cpu_seconds(daemon.pid), cgroup_cpu_seconds(daemon_group),
                     cgroup_cpu_seconds(emulator_group), own_cpu_seconds())
            if tracer:
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
        daemon_cpu, folder_cpu, emulator_cpu, producer_cpu = (
            1000 * (a - b) / jobs for a, b in zip(after, before))
        out = {"binary": binary, "jobs": jobs, "jobs_per_s": jobs / seconds,
               "load": os.getloadavg()[0], "ms_per_job": {
                   "daemon": daemon_cpu, "warm parent and job children": folder_cpu - daemon_cpu,
                   "emulator": emulator_cpu, "producer and consumer (SDK)": producer_cpu}}
        if trace:
            counts = {}
            for row in (tmp / "strace.txt").read_text().splitlines():
                parts = row.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    counts[parts[-1]] = int(parts[3])
            out["syscalls_per_job"] = {k: v / jobs for k, v in
                                       sorted(counts.items(), key=lambda kv: -kv[1])}
        return out
    finally:
        for proc in (daemon, emulator):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        remove_cgroups(groups)


def report(m: dict, floor: tuple[float, float] | None) -> str:
    cores = os.cpu_count() or 1
    total = sum(m["ms_per_job"].values())
    lines = [f"{m['binary']}: {m['jobs']} jobs, {m['jobs_per_s']:.1f} jobs/s (load {m['load']:.1f})",
             "  CPU per job: " + ", ".join(f"{k} {v:.2f} ms" for k, v in m["ms_per_job"].items())
             + f"; total {total:.2f} ms",
             f"  {cores} cores at that cost allow at most {1000 * cores / total:.0f} jobs/s"]
    if floor:
        rate, cpu = floor
        target = 0.75 * rate
        lines.append(f"  runtime fork floor: {rate:.1f} jobs/s, {1000 * cpu:.2f} ms CPU per job; "
                     f"0.75x of it ({target:.0f} jobs/s) leaves {1000 * cores / target:.2f} ms "
                     f"of CPU per job for everything")
    if "syscalls_per_job" in m:
        calls = m["syscalls_per_job"]
        lines.append(f"  daemon system calls per job: {sum(calls.values()):.0f} ("
                     + ", ".join(f"{k} {v:.1f}" for k, v in list(calls.items())[:12]) + ")")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="*",
                        default=[str(ROOT / "target" / "release" / "hybrid-worker")])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--no-floor", action="store_true", help="skip the runtime fork floor")
    parser.add_argument("--set", action="append", default=[], metavar="HYBRID__KEY=VALUE",
                        help="a setting for the daemon (HYBRID__SANDBOX__CGROUP=off, ...)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    floor = None if args.no_floor else runtime_floor(2000)
    for binary in args.binaries:
        with tempfile.TemporaryDirectory(prefix="hybrid-cost-") as tmp:
            print(report(measure(binary, args.jobs, args.strace, pathlib.Path(tmp), extra), floor),
                  flush=True)


if __name__ == "__main__":
    main()
