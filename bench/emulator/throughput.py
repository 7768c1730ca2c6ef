"""Emulator throughput, measured with Microsoft's Python SDK (azure-servicebus) as the client.

Starts `hybrid-worker emulator` (release build) twice — in memory, and on its SQLite store — and
for each measures: single sends, batch sends, and receive (peek-lock) + complete. Prints a table
and writes JSON next to this file. Run it with `bench/emulator/run.sh`.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from azure.servicebus import ServiceBusClient, ServiceBusMessage

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("HYBRID_WORKER_BIN", str(ROOT / "target" / "release" / "hybrid-worker"))
N = int(os.environ.get("BENCH_MESSAGES", "3000"))
BODY = json.dumps({"worker": "diagnostics", "input": {"action": "echo", "value": "x" * 200}})


def start(data: pathlib.Path | None) -> tuple[subprocess.Popen, str]:
    args = [BIN, "emulator", "--listen", "127.0.0.1:0"]
    args += ["--data", str(data)] if data else ["--in-memory"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("Endpoint="):
        proc.kill()
        raise SystemExit(f"the emulator did not start: {line!r}")
    return proc, line


def measure(cs: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with ServiceBusClient.from_connection_string(cs) as sb:
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(ServiceBusMessage("warm-up"))
            started = time.perf_counter()
            for _ in range(N):
                sender.send_messages(ServiceBusMessage(BODY))
            out["send_single_per_s"] = N / (time.perf_counter() - started)
            started = time.perf_counter()
            sent = 0
            while sent < N:
                batch = sender.create_message_batch()
                for _ in range(min(100, N - sent)):
                    batch.add_message(ServiceBusMessage(BODY))
                    sent += 1
                sender.send_messages(batch)
            out["send_batch_per_s"] = N / (time.perf_counter() - started)
        total = 2 * N + 1
        with sb.get_queue_receiver("jobs", prefetch_count=100) as receiver:
            started = time.perf_counter()
            done = 0
            while done < total:
                msgs = receiver.receive_messages(max_message_count=100, max_wait_time=5)
                if not msgs:
                    break
                for m in msgs:
                    receiver.complete_message(m)
                done += len(msgs)
            out["receive_complete_per_s"] = done / (time.perf_counter() - started)
            out["received"] = done
    return out


def main() -> None:
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}",
        "messages": N,
        "sdk": "azure-servicebus " + __import__("azure.servicebus").servicebus.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in [("in_memory", None), ("sqlite", pathlib.Path(tmp) / "data")]:
            proc, cs = start(data)
            try:
                results[name] = measure(cs)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    print(f"emulator throughput, {N} messages of {len(BODY)} bytes, {results['sdk']}, {results['machine']}")
    print(f"{'store':<10} {'send (single)':>14} {'send (batch)':>14} {'receive+complete':>18}")
    for name in ("in_memory", "sqlite"):
        r = results[name]
        print(
            f"{name:<10} {r['send_single_per_s']:>12.0f}/s {r['send_batch_per_s']:>12.0f}/s "
            f"{r['receive_complete_per_s']:>16.0f}/s"
        )
        if r["received"] != 2 * N + 1:
            sys.exit(f"{name}: received {r['received']} of {2 * N + 1}")
    out = pathlib.Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
