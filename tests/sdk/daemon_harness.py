"""Starts `hybrid-worker run` on its embedded emulator for end-to-end tests, where the official
Python SDK plays the Power Automate flow: it sends jobs with ReplyTo + ReplyToSessionId and waits
for the reply on its session.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import time
import uuid
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("HYBRID_WORKER_BIN", str(ROOT / "target" / "debug" / "hybrid-worker"))
VENVS = os.environ.get("HYBRID_TEST_VENV_ROOT", str(ROOT / "target" / "test-venvs"))

KEY = "SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entities(path: pathlib.Path, lock: str = "PT3S", jobs_sessions: bool = False) -> pathlib.Path:
    """The daemon's queues: `jobs` with a short lock (so renewal is exercised; with
    `jobs_sessions`, requiring sessions) and a session-enabled `results` queue with duplicate
    detection (so a resent reply is dropped)."""
    jobs = {"LockDuration": lock, "MaxDeliveryCount": 10}
    if jobs_sessions:
        jobs["RequiresSession"] = True
    config = {
        "UserConfig": {
            "Namespaces": [
                {
                    "Name": "sbemulatorns",
                    "Queues": [
                        {"Name": "jobs", "Properties": jobs},
                        {
                            "Name": "results",
                            "Properties": {
                                "RequiresSession": True,
                                "RequiresDuplicateDetection": True,
                                "DuplicateDetectionHistoryTimeWindow": "PT10M",
                            },
                        },
                    ],
                }
            ],
            "Logging": {"Type": "Console"},
        }
    }
    path.write_text(json.dumps(config))
    return path


class Daemon:
    """One `hybrid-worker run` process with its own port, data folder and log file."""

    def __init__(self, tmp: pathlib.Path, extra_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.connection_string = (
            f"Endpoint=sb://127.0.0.1:{self.port};{KEY};UseDevelopmentEmulator=true;"
        )
        self.env = {
            **os.environ,
            "HYBRID__EMULATOR__LISTEN": f"127.0.0.1:{self.port}",
            # Metrics and probes on a free port: a fixed one collides with any other daemon.
            "HYBRID__HTTP__LISTEN": "127.0.0.1:0",
            "HYBRID__EMULATOR__DATA_DIR": str(tmp / "data"),
            "HYBRID__EMULATOR__ENTITIES": str(entities(tmp / "Config.json")),
            "HYBRID__WORKERS__DIR": str(ROOT / "workers"),
            "HYBRID__WORKERS__VENV_ROOT": VENVS,
            "HYBRID__ENGINE__CONCURRENCY": "4",
            "HYBRID__ENGINE__RECEIVE_WAIT_S": "1",
            "HYBRID__ENGINE__DRAIN_TIMEOUT_S": "10",
            "HYBRID__LOG__FORMAT": "json",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> pathlib.Path:
        return self.tmp / f"daemon-{self.starts}.log"

    def start(self) -> "Daemon":
        self.starts += 1
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([BIN, "run"], env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.log_path.read_text()[-3000:]}")
            if "receiving jobs" in self.log_path.read_text():
                return self
            time.sleep(0.05)
        raise RuntimeError("the daemon did not start receiving within 60 s")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def log(self) -> str:
        return "".join(
            (self.tmp / f"daemon-{n}.log").read_text() for n in range(1, self.starts + 1)
        )

    def client(self) -> ServiceBusClient:
        return ServiceBusClient.from_connection_string(self.connection_string)

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BIN, *args], env=self.env, capture_output=True, text=True, timeout=120)


def job(worker: str, input: Any, session: str | None = None, **extra: Any) -> ServiceBusMessage:
    """A job message as a flow sends it."""
    job_id = str(uuid.uuid4())
    return ServiceBusMessage(
        json.dumps({"worker": worker, "input": input, **extra}),
        message_id=job_id,
        correlation_id=f"flow-run-{job_id}",
        reply_to="results",
        reply_to_session_id=session or f"flow-{job_id}",
        content_type="application/json",
        application_properties={"flow_run_id": f"run-{job_id}"},
    )


def replies(sb: ServiceBusClient, session: str, count: int, wait: float = 60) -> list[Any]:
    """Receives `count` replies on a session (completing them), or fewer if time runs out."""
    got: list[Any] = []
    deadline = time.monotonic() + wait
    with sb.get_queue_receiver("results", session_id=session, max_wait_time=5) as receiver:
        while len(got) < count and time.monotonic() < deadline:
            for msg in receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2):
                got.append(msg)
                receiver.complete_message(msg)
    return got


def dead_letters(sb: ServiceBusClient, wait: float = 3) -> list[Any]:
    """Every message in the jobs queue's dead-letter sub-queue (completed as read)."""
    got: list[Any] = []
    with sb.get_queue_receiver(
        "jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER, max_wait_time=wait
    ) as receiver:
        while True:
            batch = receiver.receive_messages(max_message_count=50, max_wait_time=wait)
            if not batch:
                return got
            for msg in batch:
                got.append(msg)
                receiver.complete_message(msg)


def body(msg: Any) -> Any:
    return json.loads(b"".join(msg.body))


def props(msg: Any) -> dict[str, str]:
    """Application properties with the SDK's bytes decoded."""
    decode = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    return {decode(k): decode(v) for k, v in (msg.application_properties or {}).items()}
