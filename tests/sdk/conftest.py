"""Starts `hybrid-worker emulator` for the SDK referee tests.

The binary comes from HYBRID_WORKER_BIN (default target/debug/hybrid-worker). Each test uses
its own queue, so one emulator serves the whole session.
"""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("HYBRID_WORKER_BIN", str(ROOT / "target" / "debug" / "hybrid-worker"))

QUEUES = {
    "basic": {},
    "batch": {},
    "scheduled": {},
    "abandon": {},
    "deadletter": {},
    "maxdelivery": {"MaxDeliveryCount": 2},
    "lockexpiry": {"LockDuration": "PT2S"},
    "renew": {"LockDuration": "PT3S"},
    "peek": {},
    "cancel": {},
    "defer": {},
    "receivedelete": {},
    "dedupe": {"RequiresDuplicateDetection": True, "DuplicateDetectionHistoryTimeWindow": "PT1M"},
    "ttl": {"DefaultMessageTimeToLive": "PT1S", "DeadLetteringOnMessageExpiration": True},
    "sessions": {"RequiresSession": True},
    "nextsession": {"RequiresSession": True},
    "sessionstate": {"RequiresSession": True},
    "restart": {},
    "large": {},
    "prefetch": {},
    "asyncq": {},
    "autorenew": {"LockDuration": "PT2S"},
    "sessiondlq": {"RequiresSession": True},
    "listsessions": {"RequiresSession": True},
    "fwd-in": {"ForwardTo": "fwd-out"},
    "fwd-out": {"ForwardDeadLetteredMessagesTo": "fwd-dead"},
    "fwd-dead": {},
    "emptysessions": {"RequiresSession": True},
    "sessionlock": {"RequiresSession": True},
    "shortsession": {"RequiresSession": True, "LockDuration": "PT2S"},
    "sessioncover": {"RequiresSession": True, "LockDuration": "PT5S"},
    "replysession": {"RequiresSession": True},
}


TOPICS = [
    {
        "Name": "orders",
        "Properties": {"DefaultMessageTimeToLive": "PT1H"},
        "Subscriptions": [
            {"Name": "all", "Properties": {}},
            {
                "Name": "blue",
                "Properties": {},
                "Rules": [
                    {
                        "Name": "blue-only",
                        "Properties": {
                            "FilterType": "Correlation",
                            "CorrelationFilter": {"Properties": {"color": "blue"}},
                        },
                    }
                ],
            },
            {
                "Name": "big-orders",
                "Properties": {},
                "Rules": [
                    {
                        "Name": "big",
                        "Properties": {
                            "FilterType": "Sql",
                            "SqlFilter": {"SqlExpression": "size = 5 AND sys.Label = 'order'"},
                        },
                    }
                ],
            },
            {
                "Name": "none",
                "Properties": {},
                "Rules": [
                    {"Name": "never", "Properties": {"FilterType": "Sql", "SqlFilter": {"SqlExpression": "1=0"}}}
                ],
            },
        ],
    },
    {"Name": "events", "Properties": {}, "Subscriptions": [{"Name": "s1", "Properties": {}}]},
]


def write_entities(path: pathlib.Path) -> pathlib.Path:
    config = {
        "UserConfig": {
            "Namespaces": [
                {
                    "Name": "sbemulatorns",
                    "Queues": [{"Name": n, "Properties": p} for n, p in QUEUES.items()],
                    "Topics": TOPICS,
                }
            ],
            "Logging": {"Type": "Console"},
        }
    }
    path.write_text(json.dumps(config))
    return path


class Emulator:
    """A running emulator process and the connection string it printed."""

    def __init__(self, entities: pathlib.Path, data: pathlib.Path | None):
        self.entities = entities
        self.data = data
        self.proc = None
        self.connection_string = None
        self.listen = "127.0.0.1:0"

    def start(self):
        args = [BIN, "emulator", "--listen", self.listen, "--entities", str(self.entities)]
        args += ["--data", str(self.data)] if self.data else ["--in-memory"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("Endpoint="):
            self.stop()
            raise RuntimeError(f"emulator did not print a connection string: {line!r}")
        self.connection_string = line
        # Reuse the port on restart so clients keep their connection string.
        self.listen = line.split("sb://", 1)[1].split(";", 1)[0]
        return self

    def stop(self, kill: bool = False):
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def entities_file(tmp_path_factory):
    return write_entities(tmp_path_factory.mktemp("entities") / "Config.json")


@pytest.fixture(scope="session")
def conn_str(entities_file):
    emulator = Emulator(entities_file, None).start()
    yield emulator.connection_string
    emulator.stop()


@pytest.fixture
def durable_emulator(entities_file, tmp_path):
    emulator = Emulator(entities_file, tmp_path / "data").start()
    yield emulator
    emulator.stop()
