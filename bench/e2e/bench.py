"""End-to-end benchmark, one run, side by side: hybrid-worker (spawn and fork mode, trivial and
pandas jobs) through its embedded Service Bus emulator, Celery 5 on a local Redis (prefork pool,
default and `worker_max_tasks_per_child=1`), and the floors (a bare Python loop, a bare fork
loop, fork mode's own runtime with no transport, a bare fork of the pandas job), and the fork
and pandas rows and floors again on each interpreter of HYBRID_BENCH_PYTHONS (workers pinned
with `python = "3.X"`). Writes bench/results/e2e-<date>.json and .png and prints whether each
target is met.

Run by bench/e2e/run.sh, which builds the release binary and installs what this needs.

Method, the same for every system:
- throughput: N jobs enqueued at once (one batch), clock from the first send to the last reply;
- latency: M jobs one after the other, each from enqueue to its reply (closed loop, so it is the
  path's own latency, not queueing behind the others);
- concurrency 2 everywhere (this machine has 2 cores);
- a few warm-up jobs first, not counted.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("HYBRID_WORKER_BIN", str(ROOT / "target" / "release" / "hybrid-worker"))
VENVS = str(ROOT / "target" / "bench-venvs")
# The workers the daemon serves: bench/workers, or run.sh's copy of them with the pinned
# variants (noop-fork-py312, pandas-fork-py312, ...) for each of HYBRID_BENCH_PYTHONS.
WORKERS = pathlib.Path(os.environ.get("HYBRID_BENCH_WORKERS", str(ROOT / "bench" / "workers")))
PYTHONS = [v for v in os.environ.get("HYBRID_BENCH_PYTHONS", "").split() if v]
TEST_VENVS = os.environ.get("HYBRID_TEST_VENV_ROOT", str(ROOT / "target" / "test-venvs"))
RESULTS = ROOT / "bench" / "results"
CONCURRENCY = 2
# HYBRID_BENCH_ONLY=noop-fork,celery-prefork runs only those (for profiling); targets then
# print only where both sides ran.
ONLY = {x for x in os.environ.get("HYBRID_BENCH_ONLY", "").split(",") if x}


def pinned(base: str, version: str) -> str:
    """The name of `base` pinned to `version` by run.sh (`noop-fork-py312`)."""
    return f"{base}-py{version.replace('.', '')}"


def wanted(name: str) -> bool:
    return not ONLY or name in ONLY


def venv_python(worker: str) -> pathlib.Path:
    """The venv interpreter of a bench worker (`<worker>-<16 hex>`; `noop-fork-*` would also
    match the pinned `noop-fork-py312-*`)."""
    for path in sorted(pathlib.Path(VENVS).glob(f"{worker}-*")):
        key = path.name[len(worker) + 1:]
        if len(key) == 16 and all(c in "0123456789abcdef" for c in key):
            return path / "bin" / "python"
    raise RuntimeError(f"no venv for bench worker {worker} under {VENVS} (run bench/e2e/run.sh)")
KEY = "SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE"

# Sizes: large enough for stable numbers, small enough for the whole run to stay near 5 minutes.
SIZES = {
    "noop-spawn": (300, 100),
    "noop-fork": (2000, 200),
    "pandas-spawn": (30, 15),
    "pandas-fork": (600, 100),
    "celery-prefork": (2000, 200),
    "celery-per-child": (100, 50),
    "floor-loop": (20000, 0),
    "floor-fork": (4000, 0),
    "floor-runtime": (2000, 0),
    "floor-pandas": (600, 0),
}
for _version in PYTHONS:
    SIZES[pinned("noop-fork", _version)] = SIZES["noop-fork"]
    SIZES[pinned("pandas-fork", _version)] = SIZES["pandas-fork"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary(name: str, n: int, seconds: float, latencies_ms: list[float]) -> dict:
    out = {"name": name, "jobs": n, "seconds": round(seconds, 3),
           "throughput_per_s": round(n / seconds, 1)}
    if latencies_ms:
        out.update({"latency_samples": len(latencies_ms),
                    "p50_ms": round(pct(latencies_ms, 50), 2),
                    "p99_ms": round(pct(latencies_ms, 99), 2),
                    "mean_ms": round(statistics.mean(latencies_ms), 2)})
    print(f"  {name:<18} {out['throughput_per_s']:>9.1f} jobs/s"
          + (f"   p50 {out['p50_ms']:>8.2f} ms   p99 {out['p99_ms']:>8.2f} ms" if latencies_ms else ""),
          flush=True)
    return out


def rss_kb(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- hybrid-worker


def entities(path: pathlib.Path) -> pathlib.Path:
    path.write_text(json.dumps({"UserConfig": {"Namespaces": [{"Name": "sbemulatorns", "Queues": [
        {"Name": "jobs", "Properties": {"LockDuration": "PT30S", "MaxDeliveryCount": 10}},
        {"Name": "results", "Properties": {"RequiresSession": True}},
    ]}], "Logging": {"Type": "Console"}}}))
    return path


class Daemon:
    def __init__(self, tmp: pathlib.Path, workers: pathlib.Path, venvs: str) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.connection_string = f"Endpoint=sb://127.0.0.1:{self.port};{KEY};UseDevelopmentEmulator=true;"
        self.env = {
            **os.environ,
            "HYBRID__EMULATOR__LISTEN": f"127.0.0.1:{self.port}",
            "HYBRID__EMULATOR__DATA_DIR": str(tmp / "data"),
            "HYBRID__EMULATOR__ENTITIES": str(entities(tmp / "Config.json")),
            "HYBRID__WORKERS__DIR": str(workers),
            "HYBRID__WORKERS__VENV_ROOT": venvs,
            "HYBRID__ENGINE__CONCURRENCY": str(CONCURRENCY),
            "HYBRID__LOG__FORMAT": "json",
            "HYBRID__LOG__LEVEL": "warn",
        }
        self.log = tmp / "daemon.log"

    def start(self) -> "Daemon":
        self.proc = subprocess.Popen([BIN, "run"], env={**self.env, "HYBRID__LOG__LEVEL": "info"},
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log.read_text()[-3000:]}")
            if "is receiving jobs" in self.log.read_text():
                return self
            time.sleep(0.05)
        raise RuntimeError("the daemon did not start receiving")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def hybrid_runs(sb, worker: str, n: int, m: int) -> dict:
    from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode

    session = f"bench-{uuid.uuid4()}"

    def message(i: int) -> ServiceBusMessage:
        job_id = str(uuid.uuid4())
        return ServiceBusMessage(json.dumps({"worker": worker, "input": {"n": i}}),
                                 message_id=job_id, reply_to="results",
                                 reply_to_session_id=session, content_type="application/json")

    with sb.get_queue_sender("jobs") as sender, sb.get_queue_receiver(
            "results", session_id=session, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
            prefetch_count=0) as receiver:
        runner_ms = []  # the job's own time in the daemon's runner (the reply's duration_ms)

        def await_replies(count: int) -> None:
            got = 0
            deadline = time.monotonic() + 600
            while got < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{worker}: {got} of {count} replies")
                for reply in receiver.receive_messages(max_message_count=min(count - got, 250),
                                                       max_wait_time=5):
                    result = json.loads(b"".join(reply.body))
                    status = result["status"]
                    runner_ms.append(result["duration_ms"])
                    if status != "succeeded":
                        raise RuntimeError(f"{worker}: a job failed: {b''.join(reply.body)[:500]!r}")
                    got += 1

        sender.send_messages([message(i) for i in range(3)])  # warm-up
        await_replies(3)
        latencies = []
        for i in range(m):
            started = time.perf_counter()
            sender.send_messages(message(i))
            await_replies(1)
            latencies.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        batch = sender.create_message_batch()
        for i in range(n):
            msg = message(i)
            try:
                batch.add_message(msg)
            except ValueError:  # MessageSizeExceededError: the batch is full
                sender.send_messages(batch)
                batch = sender.create_message_batch()
                batch.add_message(msg)
        sender.send_messages(batch)
        await_replies(n)
        seconds = time.perf_counter() - started
    out = summary(f"hybrid {worker}", n, seconds, latencies)
    # The rest of each job's latency is transport: SDK, emulator, engine, reply and settlement.
    out["runner_p50_ms"] = pct(runner_ms, 50)
    print(f"  {'':<18} the runner's own time per job (duration_ms), p50: {out['runner_p50_ms']} ms",
          flush=True)
    return out


# ---------------------------------------------------------------- Celery

CELERY_APP = '''
import os
from celery import Celery
app = Celery("bench", broker=os.environ["BROKER"], backend=os.environ["BROKER"])
app.conf.update(task_acks_late=True, worker_concurrency={concurrency},
                worker_max_tasks_per_child=int(os.environ["PER_CHILD"]) or None,
                task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True)

@app.task
def noop(n):
    return {{"n": n}}
'''


def celery_runs(tmp: pathlib.Path, per_child: int, name: str, n: int, m: int) -> dict:
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app_dir = tmp / f"celery-{per_child}"
    app_dir.mkdir()
    (app_dir / "bench_app.py").write_text(CELERY_APP.format(concurrency=CONCURRENCY))
    env = {**os.environ, "BROKER": f"redis://127.0.0.1:{port}/0", "PER_CHILD": str(per_child),
           "PYTHONPATH": str(app_dir)}
    worker = None
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "--pool=prefork",
             f"--concurrency={CONCURRENCY}", "--loglevel=WARNING", "--without-gossip",
             "--without-mingle", "--without-heartbeat"],
            cwd=app_dir, env=env, stdout=open(app_dir / "worker.log", "wb"), stderr=subprocess.STDOUT)
        sys.path.insert(0, str(app_dir))
        os.environ.update({"BROKER": env["BROKER"], "PER_CHILD": env["PER_CHILD"]})
        sys.modules.pop("bench_app", None)
        import bench_app  # noqa: E402

        for r in [bench_app.noop.delay(i) for i in range(3)]:  # warm-up (and worker start)
            r.get(timeout=120)
        latencies = []
        for i in range(m):
            started = time.perf_counter()
            bench_app.noop.delay(i).get(timeout=60)
            latencies.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        pending = [bench_app.noop.delay(i) for i in range(n)]
        for r in pending:
            r.get(timeout=600)
        seconds = time.perf_counter() - started
        # Forget the results while their Redis still runs (their finalisers talk to it).
        del pending, r
        import gc

        gc.collect()
        bench_app.app.close()
        sys.path.remove(str(app_dir))
        return summary(name, n, seconds, latencies)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        redis.terminate()
        redis.wait(timeout=30)


# ---------------------------------------------------------------- floors


FORK_FLOOR = """
import gc, importlib, os, sys, time
sys.path.insert(0, sys.argv[1])
job = importlib.import_module(sys.argv[4])
gc.collect()
gc.freeze()
n, procs = int(sys.argv[2]), int(sys.argv[3])
def loop(count):
    for i in range(count):
        pid = os.fork()
        if pid == 0:
            job.run({"n": i}, None)
            os._exit(0)
        os.waitpid(pid, 0)
started = time.perf_counter()
kids = []
for _ in range(procs):
    pid = os.fork()
    if pid == 0:
        loop(n // procs)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
print(time.perf_counter() - started)
"""


RUNTIME_FLOOR = """
import gc, json, os, sys, time
runtime, worker_dir, n, procs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [runtime, worker_dir]
from hybrid_worker import _bootstrap, _zygote
import noop
sys.argv = ["-c", runtime, worker_dir, "noop", "run", "[]"]
_bootstrap.preload("noop", "run")
_bootstrap.install_logging()
gc.collect()
gc.freeze()
null = os.open(os.devnull, os.O_WRONLY)
def loop(count):
    spares = _zygote._Spares([], os.getpid(), sys.argv[:5])
    env = dict(os.environ)
    for i in range(count):
        job_r, job_w = os.pipe()
        chan_r, chan_w = os.pipe()
        os.write(job_w, json.dumps({"job_id": str(i), "attempt": 1, "deadline": time.time() + 60,
                                    "worker": "noop", "input": {"n": i}}).encode())
        os.close(job_w)
        control = json.dumps({"t": "fork", "id": i, "cwd": "/tmp", "env": env,
                              "landlock": False, "cgroup": False}).encode()
        pid = spares.take(control, [job_r, chan_w, null, null])
        os.close(job_r)
        os.close(chan_w)
        spares.fork()
        reply = b""
        while chunk := os.read(chan_r, 65536):
            reply += chunk
        os.close(chan_r)
        os.wait4(pid, 0)
        if b'"result"' not in reply:
            raise SystemExit(f"no result: {reply!r}")
    spares.stop()
started = time.perf_counter()
kids = []
for _ in range(procs):
    pid = os.fork()
    if pid == 0:
        loop(n // procs)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    _, status = os.waitpid(pid, 0)
    if status:
        raise SystemExit("a runtime floor loop failed")
print(time.perf_counter() - started)
"""


def floor_runs(n_loop: int, n_fork: int, n_runtime: int, n_pandas: int) -> list[dict]:
    """The same job with no transport at all: called in a loop in one process, and forked per
    call by a bare loop. The fork loop runs in a fresh interpreter of the bench worker's venv
    that imported only the job's module (as a warm parent does), at the same concurrency, so
    its children cost what a fresh process per job costs at the least (a fork from this
    harness, which imported the SDK, Celery and matplotlib, costs several times more)."""
    worker_dir = ROOT / "bench" / "workers" / "noop-spawn"
    sys.path.insert(0, str(worker_dir))
    import noop  # noqa: E402

    started = time.perf_counter()
    for i in range(n_loop):
        noop.run({"n": i}, None)
    loop = summary("floor python loop", n_loop, time.perf_counter() - started, [])
    python = venv_python("noop-spawn")
    seconds = float(subprocess.run(
        [str(python), "-I", "-B", "-c", FORK_FLOOR, str(worker_dir), str(n_fork), str(CONCURRENCY),
         "noop"],
        check=True, capture_output=True, text=True).stdout)
    fork = summary("floor fork loop", n_fork, seconds, [])
    # The runtime's own floor: fork mode's warm parent and child code (a spare forked ahead,
    # the job and its result through pipes, the handler's context) with no daemon, broker or
    # sandbox; the most fork mode can do here whatever carries the jobs.
    runtime = runtime_floor("floor runtime fork", python, n_runtime)
    pandas = pandas_floor("floor pandas fork", venv_python("pandas-fork"), n_pandas)
    return [loop, fork, runtime, pandas]


def runtime_floor(name: str, python: pathlib.Path, n: int) -> dict:
    """Fork mode's warm parent and child code (a spare forked ahead, the job and its result
    through pipes, the handler's context) with no daemon, broker or sandbox: the most fork mode
    can do here whatever carries the jobs."""
    worker_dir = ROOT / "bench" / "workers" / "noop-spawn"
    seconds = float(subprocess.run(
        [str(python), "-I", "-B", "-c", RUNTIME_FLOOR, str(ROOT / "src" / "python"),
         str(worker_dir), str(n), str(CONCURRENCY)],
        check=True, capture_output=True, text=True).stdout)
    return summary(name, n, seconds, [])


def pandas_floor(name: str, python: pathlib.Path, n: int) -> dict:
    """The pandas job the same way: a bare fork of an interpreter that imported pandas, the
    job, exit; no runtime, transport or sandbox (the pandas worker's thread settings)."""
    seconds = float(subprocess.run(
        [str(python), "-I", "-B", "-c", FORK_FLOOR,
         str(ROOT / "bench" / "workers" / "pandas-fork"), str(n), str(CONCURRENCY),
         "pandas_job"],
        check=True, capture_output=True, text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}).stdout)
    return summary(name, n, seconds, [])


def python_floors() -> dict:
    """The runtime and pandas floors on each pinned interpreter, from the pinned workers'
    venvs (floor-runtime-py312, floor-pandas-py312, ...)."""
    out = {}
    for version in PYTHONS:
        tag = pinned("", version).lstrip("-")
        if wanted(f"floor-runtime-{tag}"):
            out[f"floor-runtime-{tag}"] = runtime_floor(
                f"floor runtime {version}", venv_python(pinned("noop-fork", version)),
                SIZES["floor-runtime"][0])
        if wanted(f"floor-pandas-{tag}"):
            out[f"floor-pandas-{tag}"] = pandas_floor(
                f"floor pandas {version}", venv_python(pinned("pandas-fork", version)),
                SIZES["floor-pandas"][0])
    return out


# ---------------------------------------------------------------- main


def idle_rss(tmp: pathlib.Path) -> dict:
    """The daemon's resident set, idle, with the repository's three workers configured."""
    daemon = Daemon(tmp, ROOT / "workers", TEST_VENVS).start()
    time.sleep(3)
    kb = rss_kb(daemon.proc.pid)
    daemon.stop()
    print(f"  daemon idle RSS with the 3 repository workers: {kb / 1024:.1f} MiB", flush=True)
    return {"workers": 3, "rss_kb": kb}


def main() -> int:
    started = time.time()
    load_before = os.getloadavg()
    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), platform.processor()),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": [round(x, 2) for x in load_before],
    }
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}, "
          f"load {machine['load_before']}", flush=True)
    results = {"machine": machine, "concurrency": CONCURRENCY, "runs": {}}
    from azure.servicebus import ServiceBusClient

    with tempfile.TemporaryDirectory(prefix="hybrid-bench-") as tmp_s:
        tmp = pathlib.Path(tmp_s)
        if wanted("daemon-idle"):
            (tmp / "rss").mkdir()
            results["daemon_idle"] = idle_rss(tmp / "rss")
        names = ["noop-spawn", "noop-fork", "pandas-spawn", "pandas-fork"]
        for version in PYTHONS:
            names += [pinned("noop-fork", version), pinned("pandas-fork", version)]
        hybrid = [w for w in names if wanted(w)]
        if hybrid:
            (tmp / "hw").mkdir()
            daemon = Daemon(tmp / "hw", WORKERS, VENVS).start()
            try:
                with ServiceBusClient.from_connection_string(daemon.connection_string) as sb:
                    for worker in hybrid:
                        n, m = SIZES[worker]
                        results["runs"][worker] = hybrid_runs(sb, worker, n, m)
                results["daemon_after_runs_rss_kb"] = rss_kb(daemon.proc.pid)
            finally:
                daemon.stop()
        for per_child, name in [(0, "celery-prefork"), (1, "celery-per-child")]:
            if wanted(name):
                n, m = SIZES[name]
                results["runs"][name] = celery_runs(tmp, per_child, name, n, m)
        if any(wanted(k) for k in ("floor-loop", "floor-fork", "floor-runtime", "floor-pandas")):
            floors = floor_runs(*(SIZES[k][0] for k in
                                  ("floor-loop", "floor-fork", "floor-runtime", "floor-pandas")))
            for key, run in zip(("floor-loop", "floor-fork", "floor-runtime", "floor-pandas"),
                                floors):
                results["runs"][key] = run
        results["runs"].update(python_floors())
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    machine["run_seconds"] = round(time.time() - started, 1)

    r = results["runs"]
    results["targets"] = targets(results)
    results["per_python"] = per_python(r)
    print(f"\nload average before {machine['load_before']}, after {machine['load_after']}; "
          f"run took {machine['run_seconds']} s")
    print("targets (issue 19; fork mode on workers.python):")
    for t in results["targets"]:
        mark = "" if t["needed"] is None else (
            f" [{'MET' if t['met'] else 'NOT MET'}] (target {t['bound']} {t['needed']}x)")
        print(f"  {t['target']}: {t['ratio']}x{mark}")
    if results["per_python"]:
        print("per interpreter (pinned workers, python = \"3.X\"):")
        for row in results["per_python"]:
            print("  " + "   ".join(f"{k} {v}" for k, v in row.items()))
    if ONLY:
        print("partial run (HYBRID_BENCH_ONLY): no result files written")
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"e2e-{time.strftime('%Y-%m-%d', time.gmtime())}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.json').relative_to(ROOT)} and {stem.with_suffix('.png').relative_to(ROOT)}")
    return 0


def targets(results: dict) -> list[dict]:
    """The issue's four ratios, fork-mode trivial jobs against the floor and Celery of the same
    run (`bound` says which way a target points; `needed` None: reported without a pass
    mark), then the earlier pandas and memory targets."""
    r = results["runs"]
    tp = lambda k: r[k]["throughput_per_s"]  # noqa: E731
    checks = [
        ("fork trivial throughput / runtime fork floor", ("noop-fork", "floor-runtime"),
         lambda: tp("noop-fork") / tp("floor-runtime"), ">=", 0.75),
        ("fork trivial throughput / Celery max_tasks_per_child=1",
         ("noop-fork", "celery-per-child"), lambda: tp("noop-fork") / tp("celery-per-child"),
         ">=", 100.0),
        ("fork trivial p50 / Celery prefork p50", ("noop-fork", "celery-prefork"),
         lambda: r["noop-fork"]["p50_ms"] / r["celery-prefork"]["p50_ms"], "<=", 1.5),
        ("fork trivial throughput / Celery prefork throughput", ("noop-fork", "celery-prefork"),
         lambda: tp("noop-fork") / tp("celery-prefork"), None, None),
        ("fork pandas throughput / spawn pandas", ("pandas-fork", "pandas-spawn"),
         lambda: tp("pandas-fork") / tp("pandas-spawn"), ">=", 50.0),
    ]
    out = []
    for name, keys, ratio, bound, needed in checks:
        if not all(k in r for k in keys):
            continue
        value = ratio()
        met = None if needed is None else (value >= needed if bound == ">=" else value <= needed)
        out.append({"target": name, "ratio": round(value, 2), "bound": bound, "needed": needed,
                    "met": met})
    if "daemon_idle" in results:
        value = results["daemon_idle"]["rss_kb"] / 1024 / 40
        out.append({"target": "daemon idle RSS / 40 MiB (3 workers)", "ratio": round(value, 2),
                    "bound": "<=", "needed": 1.0, "met": value <= 1.0})
    return out


def per_python(r: dict) -> list[dict]:
    """One row per pinned interpreter: its fork and pandas rates end to end, its floors, and
    fork mode's share of its own runtime floor."""
    rows = []
    for version in PYTHONS:
        tag = pinned("", version).lstrip("-")
        fork, pandas = r.get(pinned("noop-fork", version)), r.get(pinned("pandas-fork", version))
        floor, pandas_floor_run = r.get(f"floor-runtime-{tag}"), r.get(f"floor-pandas-{tag}")
        row = {"python": version}
        if fork:
            row.update({"fork/s": fork["throughput_per_s"], "fork p50 ms": fork["p50_ms"]})
        if floor:
            row["floor runtime/s"] = floor["throughput_per_s"]
        if fork and floor:
            row["fork/floor"] = round(fork["throughput_per_s"] / floor["throughput_per_s"], 2)
        if pandas:
            row.update({"pandas/s": pandas["throughput_per_s"], "pandas p50 ms": pandas["p50_ms"]})
        if pandas_floor_run:
            row["floor pandas/s"] = pandas_floor_run["throughput_per_s"]
        rows.append(row)
    return rows


def chart(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = list(runs)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = ["#4c72b0" if n.startswith(("noop", "pandas")) else
              "#dd8452" if n.startswith("celery") else "#8c8c8c" for n in names]
    ax1.barh(names, [runs[n]["throughput_per_s"] for n in names], color=colors)
    ax1.set_xscale("log")
    ax1.set_xlabel("jobs per second (log scale)")
    ax1.set_title("Throughput, end to end")
    for i, n in enumerate(names):
        ax1.text(runs[n]["throughput_per_s"], i, f" {runs[n]['throughput_per_s']:.0f}", va="center")
    lat = [n for n in names if "p50_ms" in runs[n]]
    y = range(len(lat))
    ax2.barh([i + 0.2 for i in y], [runs[n]["p50_ms"] for n in lat], height=0.4, label="p50",
             color="#55a868")
    ax2.barh([i - 0.2 for i in y], [runs[n]["p99_ms"] for n in lat], height=0.4, label="p99",
             color="#c44e52")
    ax2.set_yticks(list(y), lat)
    ax2.set_xscale("log")
    ax2.set_xlabel("ms, enqueue to reply (log scale)")
    ax2.set_title("Latency, one job at a time")
    ax2.legend()
    m = results["machine"]
    fig.suptitle(f"hybrid-worker vs Celery 5 — {m['date']}, {m['cpu']}, {m['cores']} cores, "
                 f"concurrency {results['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # Not a normal exit: Celery result objects left to the interpreter's finalisers would try
    # to reach their (stopped) Redis for minutes.
    os._exit(code)
