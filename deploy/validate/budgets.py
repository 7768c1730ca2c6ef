"""The pod's memory, disk and process budgets, derived from what ships: config/default.toml (or
the ConfigMap's config.toml over it), workers/*/worker.toml, and the sandbox's per-file limit in
src/sandbox/mod.rs. check_manifests.py holds the Deployment to them, check_terraform.py the node
pool's kubelet settings, and deploy/image-smoke.sh measures the daemon's own share against them.

Why each number must hold (deploy/operator-guide.md, "Memory and disk budgets"):
- memory: on cgroup v2 with Kubernetes 1.28+ the kubelet sets memory.oom.group=1 on the
  container (kubernetes#117793), so an OOM at the container's limit kills the daemon and every
  running job together;
- /tmp: past an emptyDir's sizeLimit the kubelet evicts the whole pod;
- PIDs: the node pool's podMaxPids is the only bound on a job's processes in a non-root pod.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The daemon's own memory, without its jobs: its resident set (tokio runtime, AMQP links, HTTP,
# metrics) plus the warm parents of fork-mode workers. deploy/image-smoke.sh measures it in the
# image's file system after one job per worker and fails when it exceeds this budget.
DAEMON_MEMORY_MIB = 256
# The daemon's own files in /tmp besides the jobs' temp folders (the job runtime it installs
# there); image-smoke.sh measures this too.
DAEMON_TMP_MIB = 256
# Container logs count against the pod's ephemeral storage: the node pool keeps at most
# container_log_max_line (5) files of container_log_max_size_mb (50) each (deploy/azure).
CONTAINER_LOGS_MIB = 256
# Processes and threads of the daemon itself (tokio's workers, one per node CPU, and its
# blocking pool), and of the warm parents, on top of the jobs' max_processes.
DAEMON_PIDS = 512


@dataclass
class Budget:
    concurrency: int
    biggest_memory_mb: int
    biggest_max_processes: int
    max_file_mib: int

    @property
    def memory_mib(self) -> int:
        return self.concurrency * self.biggest_memory_mb + DAEMON_MEMORY_MIB

    @property
    def tmp_mib(self) -> int:
        return self.concurrency * self.max_file_mib + DAEMON_TMP_MIB

    @property
    def ephemeral_mib(self) -> int:
        return self.tmp_mib + CONTAINER_LOGS_MIB

    @property
    def pids(self) -> int:
        return self.concurrency * self.biggest_max_processes + DAEMON_PIDS

    def explain_memory(self) -> str:
        return (f"engine.concurrency {self.concurrency} x the largest worker memory_mb "
                f"{self.biggest_memory_mb} + the daemon's {DAEMON_MEMORY_MIB} = {self.memory_mib}Mi")

    def explain_tmp(self) -> str:
        return (f"engine.concurrency {self.concurrency} x the per-file limit {self.max_file_mib}Mi "
                f"(RLIMIT_FSIZE, src/sandbox/mod.rs) + the daemon's {DAEMON_TMP_MIB} = {self.tmp_mib}Mi")

    def explain_pids(self) -> str:
        return (f"engine.concurrency {self.concurrency} x the largest worker max_processes "
                f"{self.biggest_max_processes} + the daemon's {DAEMON_PIDS} = {self.pids}")


def max_file_mib() -> int:
    """MAX_FILE_BYTES from src/sandbox/mod.rs, in MiB (a product of integer literals)."""
    source = (REPO / "src/sandbox/mod.rs").read_text()
    m = re.search(r"pub const MAX_FILE_BYTES: u64 = ([0-9_ *]+);", source)
    if not m:
        raise ValueError("src/sandbox/mod.rs: no `pub const MAX_FILE_BYTES: u64 = …;` to budget /tmp from")
    value = 1
    for factor in m.group(1).split("*"):
        value *= int(factor.strip().replace("_", ""))
    return -(-value // (1024 * 1024))


def workers_limits() -> dict:
    """Each shipped worker's limits, with the defaults of src/worker/mod.rs where unset."""
    limits = {}
    for toml in sorted((REPO / "workers").glob("*/worker.toml")):
        data = tomllib.loads(toml.read_text())
        limits[toml.parent.name] = {
            "timeout_s": data.get("timeout_s", 60),
            "memory_mb": data.get("memory_mb", 512),
            "max_processes": data.get("max_processes", 64),
        }
    return limits


def engine_settings(config: dict) -> dict:
    """[engine] of config/default.toml with a config.toml's over it."""
    defaults = tomllib.loads((REPO / "config/default.toml").read_text())
    return {**defaults["engine"], **config.get("engine", {})}


def budget(config: dict) -> Budget:
    workers = workers_limits()
    return Budget(
        concurrency=engine_settings(config)["concurrency"],
        biggest_memory_mb=max(w["memory_mb"] for w in workers.values()),
        biggest_max_processes=max(w["max_processes"] for w in workers.values()),
        max_file_mib=max_file_mib(),
    )
