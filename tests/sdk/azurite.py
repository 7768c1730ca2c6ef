"""Azurite, Microsoft's Blob Storage emulator (npm `azurite`, pinned in tests/azurite and
installed there by `npm ci`), for the claim-check tests and bench/storage: started on a free port
of 127.0.0.1 with its data in a folder of the test (so a restart on the same port keeps its
blobs), stopped at the end.
"""

from __future__ import annotations

import pathlib
import re
import signal
import subprocess
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = ROOT / "tests" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# The emulator's public, documented key: valid against the emulator only.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite:
    def __init__(self, data: pathlib.Path) -> None:
        if not BIN.exists():
            raise RuntimeError(f"Azurite is not installed: run `npm ci` in {BIN.parents[2]}")
        self.data = data
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> "Azurite":
        self.proc = subprocess.Popen(
            [str(BIN), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
             "--location", str(self.data), "--skipApiVersionCheck", "--disableTelemetry",
             "--loose", "--silent"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"listens on http://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                # Its later output is not read: with --silent it writes no access log.
                return self
        self.stop()
        raise RuntimeError("Azurite did not start: " + "".join(seen))

    def stop(self) -> None:
        """Stops it (an outage), keeping its blobs: SIGTERM lets it save its index."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    def env(self) -> dict[str, str]:
        """The daemon's settings for this Azurite."""
        return {"HYBRID__STORAGE__CONNECTION_STRING": self.connection_string}


def pid_rss_kb(pid: int) -> int:
    """The resident memory of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

