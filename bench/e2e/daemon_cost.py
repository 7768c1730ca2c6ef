"""The daemon's own cost per fork-mode trivial job, in numbers that load on the machine moves
little: its CPU time (utime + stime from /proc) and, with --strace, its system calls (strace -c
over every thread of the daemon, not its warm parent or the jobs). The emulator runs in its own
process so that its share is separate.

    target/bench-venv/bin/python bench/e2e/daemon_cost.py [--strace] [--jobs N] [BINARY ...]

Each binary (default: target/release/hybrid-worker) serves the bench's noop-fork worker at
concurrency 2; N jobs (default 1000) are sent in one batch after 20 warm-up jobs. Needs the
venvs bench/e2e/run.sh builds (target/bench-venvs).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
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


def send_and_wait(sb, session: str, n: int) -> None:
    with sb.get_queue_sender("jobs") as sender, sb.get_queue_receiver(
            "results", session_id=session,
            receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
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
            got += len(receiver.receive_messages(max_message_count=250, max_wait_time=5))


def measure(binary: str, jobs: int, trace: bool, tmp: pathlib.Path) -> str:
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
    emulator = subprocess.Popen([binary, "emulator"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    daemon = None
    try:
        time.sleep(1.5)
        daemon = subprocess.Popen(
            [binary, "run"], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
            env={**env, "HYBRID__SERVICEBUS__CONNECTION_STRING": connection,
                 "HYBRID__WORKERS__DIR": str(ROOT / "bench" / "workers"),
                 "HYBRID__WORKERS__VENV_ROOT": str(ROOT / "target" / "bench-venvs"),
                 "HYBRID__WORKERS__ALLOW": "noop-fork",
                 "HYBRID__ENGINE__CONCURRENCY": "2", "HYBRID__HTTP__LISTEN": "127.0.0.1:0",
                 "HYBRID__LOG__LEVEL": "info"})
        while "is receiving jobs" not in log.read_text():
            if daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        session = f"cost-{uuid.uuid4()}"
        with ServiceBusClient.from_connection_string(connection) as sb:
            send_and_wait(sb, session, 20)
            tracer = None
            if trace:
                threads = os.listdir(f"/proc/{daemon.pid}/task")
                tracer = subprocess.Popen(
                    ["strace", "-c", "-o", str(tmp / "strace.txt")]
                    + [arg for t in threads for arg in ("-p", t)], stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            daemon_cpu, emulator_cpu = cpu_seconds(daemon.pid), cpu_seconds(emulator.pid)
            started = time.perf_counter()
            send_and_wait(sb, session, jobs)
            seconds = time.perf_counter() - started
            daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu
            emulator_cpu = cpu_seconds(emulator.pid) - emulator_cpu
            if tracer:
                tracer.send_signal(signal.SIGINT)
                tracer.wait()
        line = (f"{binary}: {jobs} jobs, {jobs / seconds:.1f} jobs/s (load {os.getloadavg()[0]:.1f}); "
                f"daemon CPU {1000 * daemon_cpu / jobs:.2f} ms/job, "
                f"emulator CPU {1000 * emulator_cpu / jobs:.2f} ms/job")
        if trace:
            counts = {}
            for row in (tmp / "strace.txt").read_text().splitlines():
                parts = row.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    counts[parts[-1]] = int(parts[3])
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
            line += (f"\n  system calls per job: {sum(counts.values()) / jobs:.0f} ("
                     + ", ".join(f"{k} {v / jobs:.1f}" for k, v in top) + ")")
        return line
    finally:
        for proc in (daemon, emulator):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="*",
                        default=[str(ROOT / "target" / "release" / "hybrid-worker")])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--strace", action="store_true")
    args = parser.parse_args()
    for binary in args.binaries:
        with tempfile.TemporaryDirectory(prefix="hybrid-cost-") as tmp:
            print(measure(binary, args.jobs, args.strace, pathlib.Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
