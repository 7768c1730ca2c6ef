"""Claim-check throughput and the daemon's memory: `hybrid-worker run` (embedded emulator) with
Azurite as its Blob Storage. For each input size a blob is uploaded, then jobs of the
`diagnostics` worker's `files` action (read the input, hash it, write it back as an artifact)
run one at a time; each reply's sha256 is checked against the upload. Reported per size: the
daemon's download and upload rates (from its own log lines), the whole job's wall time, and the
daemon's resident memory before and at its peak while the job ran (sampled every 10 ms from
/proc), which stays flat if transfers are streamed and would grow by the blob's size if they
were buffered.

Usage: bench.py [--sizes-mb 5,50] [--runs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "sdk"))

from azure.storage.blob import BlobServiceClient  # noqa: E402

from azurite import Azurite, pid_rss_kb  # noqa: E402
from daemon_harness import Daemon, body, job, replies  # noqa: E402


class RssSampler:
    """The peak resident memory of a process while it is sampled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pid_rss_kb(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def log_lines(daemon: Daemon, message: str) -> list[dict]:
    out = []
    for line in daemon.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == message:
            out.append(record)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-mb", default="5,50")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-storage-"))
    azurite = Azurite(tmp / "azurite").start()
    env = {**azurite.env(), "HYBRID__ENGINE__CONCURRENCY": "1", "HYBRID__LOG__LEVEL": "info"}
    daemon = Daemon(tmp, env)
    results = []
    try:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        for name in ("inputs", "results"):
            service.create_container(name)
        daemon.start()
        pid = daemon.proc.pid
        time.sleep(2)
        idle_kb = pid_rss_kb(pid)
        with daemon.client() as sb, sb.get_queue_sender("jobs") as sender:
            for mb in sizes:
                data = os.urandom(mb * 1024 * 1024)
                digest = hashlib.sha256(data).hexdigest()
                service.get_blob_client("inputs", f"bench/{mb}mb.bin").upload_blob(data, overwrite=True)
                del data
                runs = []
                for _ in range(args.runs):
                    before_kb = pid_rss_kb(pid)
                    msg = job("diagnostics", {"action": "files", "copy": True},
                              input_blob=f"inputs/bench/{mb}mb.bin")
                    started = time.monotonic()
                    with RssSampler(pid) as rss:
                        sender.send_messages(msg)
                        [reply] = replies(sb, msg.reply_to_session_id, 1, wait=600)
                    wall = time.monotonic() - started
                    result = body(reply)
                    assert result["status"] == "succeeded", result
                    assert result["output"]["sha256"] == digest, "the job read other bytes"
                    [artifact] = result["artifacts"]
                    assert artifact["sha256"] == digest, "the artifact differs"
                    runs.append({"wall_s": wall, "rss_before_kb": before_kb, "rss_peak_kb": rss.peak})
                fetched = [f for f in log_lines(daemon, "Fetched the job's input blob.")
                           if f["bytes"] == mb * 1024 * 1024][-args.runs:]
                stored = [f for f in log_lines(daemon, "Stored the job's results in Blob Storage.")
                          if f["bytes"] == mb * 1024 * 1024][-args.runs:]
                row = {
                    "size_mb": mb,
                    "runs": args.runs,
                    "download_mb_s": statistics.median(f["mb_per_s"] for f in fetched),
                    "upload_mb_s": statistics.median(mb / f["seconds"] for f in stored),
                    "job_wall_s": statistics.median(r["wall_s"] for r in runs),
                    "rss_idle_kb": idle_kb,
                    "rss_before_kb": max(r["rss_before_kb"] for r in runs),
                    "rss_peak_kb": max(r["rss_peak_kb"] for r in runs),
                }
                row["rss_growth_kb"] = row["rss_peak_kb"] - row["rss_before_kb"]
                results.append(row)
                print(
                    f"{mb:>4} MB: download {row['download_mb_s']:.0f} MB/s, upload "
                    f"{row['upload_mb_s']:.0f} MB/s, job {row['job_wall_s']:.2f} s; daemon RSS "
                    f"{row['rss_before_kb'] / 1024:.1f} -> peak {row['rss_peak_kb'] / 1024:.1f} MiB "
                    f"(+{row['rss_growth_kb'] / 1024:.1f} MiB for a {mb} MB blob)",
                    flush=True,
                )
    finally:
        daemon.stop()
        azurite.stop()
    report = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
