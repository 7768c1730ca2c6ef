"""End to end, ordered jobs per key (docs/sessions.md): `hybrid-worker run` with
`queues.jobs_sessions = true` on its embedded emulator, the official Python SDK as the flow.

Three keys (SessionIds) × 25 jobs, sent interleaved; each key's replies go to its own reply
session, so the order a flow sees is the order the daemon replied in.
"""

from __future__ import annotations

import json
import pathlib
import signal
import time
import uuid

import pytest
from azure.servicebus import ServiceBusReceiveMode

from daemon_harness import Daemon, body, dead_letters, entities, job

KEYS = ("alpha", "bravo", "charlie")
PER_KEY = 25


def session_daemon(tmp_path: pathlib.Path) -> Daemon:
    d = Daemon(tmp_path, {"HYBRID__QUEUES__JOBS_SESSIONS": "true", "HYBRID__QUEUES__SESSION_IDLE_TIMEOUT_S": "2"})
    # A jobs queue that requires sessions, lock 5 s: the slow key's 8 s job needs renewals.
    d.env["HYBRID__EMULATOR__ENTITIES"] = str(
        entities(tmp_path / "SessionConfig.json", lock="PT5S", jobs_sessions=True)
    )
    return d


def keyed_jobs(run: str, special: dict[tuple[str, int], dict]) -> dict[str, list]:
    """Per key, its jobs in send order; `special` replaces the input of (key, index)."""
    out = {}
    for key in KEYS:
        msgs = []
        for i in range(PER_KEY):
            payload = special.get((key, i), {"action": "echo", "value": [key, i]})
            msg = job("diagnostics", payload, f"reply-{run}-{key}")
            msg.session_id = f"{run}-{key}"
            msgs.append(msg)
        out[key] = msgs
    return out


def send_interleaved(sb, jobs: dict[str, list]) -> None:
    with sb.get_queue_sender("jobs") as sender:
        for i in range(PER_KEY):
            sender.send_messages([jobs[key][i] for key in KEYS])


def read_replies(sb, session: str, count: int, wait: float) -> list:
    """Up to `count` replies of a reply session, in the order the broker holds them.

    Receive-and-delete: in peek-lock with no prefetch, the SDK releases a reply that reaches the
    link between two `receive_messages` calls. That reply goes back to the session after ones
    already on their way, and the reader sees it late although the daemon sent it in order."""
    got = []
    deadline = time.monotonic() + wait
    with sb.get_queue_receiver(
        "results", session_id=session, max_wait_time=5, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
    ) as receiver:
        while len(got) < count and time.monotonic() < deadline:
            got.extend(receiver.receive_messages(max_message_count=count - len(got), max_wait_time=2))
    return got


@pytest.fixture
def daemon(tmp_path):
    d = session_daemon(tmp_path).start()
    yield d
    d.stop()


def test_jobs_of_a_key_are_answered_once_in_order_and_a_slow_key_holds_none_back(daemon):
    run = uuid.uuid4().hex[:8]
    special = {
        # Fails on its first attempt: retried in place, before the key's later jobs.
        ("alpha", 5): {"action": "flaky", "failures": 1, "value": ["alpha", 5]},
        # The slow key: its first job sleeps while the other keys run all of theirs.
        ("charlie", 0): {"action": "sleep", "seconds": 8},
    }
    jobs = keyed_jobs(run, special)
    with daemon.client() as sb:
        send_interleaved(sb, jobs)
        got = {key: read_replies(sb, f"reply-{run}-{key}", PER_KEY, wait=120) for key in KEYS}
        extra = {key: read_replies(sb, f"reply-{run}-{key}", 1, wait=3) for key in KEYS}
        assert dead_letters(sb, wait=1) == []
    for key in KEYS:
        sent = [m.message_id for m in jobs[key]]
        answered = [body(r)["job_id"] for r in got[key]]
        assert answered == sent, f"{key}: answered out of order or not at all"
        assert extra[key] == [], f"{key}: answered twice"
        assert all(body(r)["status"] == "succeeded" for r in got[key])
    flaky = body(got["alpha"][5])
    assert flaky["attempt"] == 2 and flaky["output"] == {"echo": ["alpha", 5], "attempt": 2}
    assert "retrying in place" in daemon.log()
    # The slow key's first reply came after every reply of the other keys.
    slow_first = got["charlie"][0].enqueued_time_utc
    for key in ("alpha", "bravo"):
        assert got[key][-1].enqueued_time_utc < slow_first, f"{key} waited for the slow key"


def test_sigkill_mid_run_resumes_in_order_with_nothing_lost_or_doubled(tmp_path):
    daemon = session_daemon(tmp_path).start()
    run = uuid.uuid4().hex[:8]
    special = {
        (key, i): {"action": "sleep", "seconds": 0.1} for key in KEYS for i in range(PER_KEY)
    }
    jobs = keyed_jobs(run, special)
    try:
        with daemon.client() as sb:
            send_interleaved(sb, jobs)
            first = {key: read_replies(sb, f"reply-{run}-{key}", 5, wait=60) for key in KEYS}
            assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
            daemon.start()
            rest = {
                key: read_replies(sb, f"reply-{run}-{key}", PER_KEY - len(first[key]), wait=120)
                for key in KEYS
            }
            extra = {key: read_replies(sb, f"reply-{run}-{key}", 1, wait=3) for key in KEYS}
            dead = dead_letters(sb, wait=1)
    finally:
        daemon.stop()
    second_run = (tmp_path / "daemon-2.log").read_text().count('"The job started."')
    assert second_run > 0, "the kill landed after all jobs were done; the test proved nothing"
    assert dead == []
    for key in KEYS:
        sent = [m.message_id for m in jobs[key]]
        answered = [body(r)["job_id"] for r in first[key] + rest[key]]
        assert answered == sent, f"{key}: lost, doubled or reordered across the kill"
        assert extra[key] == [], f"{key}: answered twice"


def test_submit_session_sets_the_jobs_session_id(daemon, tmp_path):
    payload = tmp_path / "input.json"
    payload.write_text(json.dumps({"action": "echo", "value": "keyed"}))
    done = daemon.run_cli(
        "submit", "diagnostics", "--input", str(payload), "--session", "order-42", "--wait", "--timeout", "60"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == {"echo": "keyed"}
    assert '"session_id":"order-42"' in daemon.log()
    too_long = daemon.run_cli("submit", "diagnostics", "--input", str(payload), "--session", "k" * 129)
    assert too_long.returncode == 2 and "--session" in too_long.stderr
