"""End to end: `hybrid-worker run` on its embedded emulator, with the official Python SDK as the
flow. Each test starts its own daemon (own port, data folder and log)."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid

import pytest

from daemon_harness import Daemon, body, dead_letters, job, props, replies


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    d.stop()


def test_a_job_is_answered_on_its_reply_session(daemon):
    with daemon.client() as sb:
        msg = job("diagnostics", {"action": "echo", "value": {"n": 1}})
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msg)
        [reply] = replies(sb, msg.reply_to_session_id, 1)
    result = body(reply)
    assert result["job_id"] == msg.message_id
    assert result["worker"] == "diagnostics"
    assert result["status"] == "succeeded"
    assert result["output"] == {"echo": {"n": 1}}
    assert result["error"] is None
    assert result["attempt"] == 1
    assert result["duration_ms"] >= 0
    assert result["resources"]["max_rss_kb"] > 0
    assert reply.correlation_id == msg.message_id
    assert reply.session_id == msg.reply_to_session_id
    assert reply.message_id == f"{msg.message_id}:result"
    assert props(reply) == {"status": "succeeded", "worker": "diagnostics", "job_id": msg.message_id}


def test_a_failing_job_is_answered_and_dead_lettered_with_its_reason(daemon):
    with daemon.client() as sb:
        msg = job("diagnostics", {"action": "invalid", "message": "amount must be positive"})
        bad = job("no-such-worker", {})
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages([msg, bad])
        [reply] = replies(sb, msg.reply_to_session_id, 1)
        [bad_reply] = replies(sb, bad.reply_to_session_id, 1)
        dead = {m.message_id: m for m in dead_letters(sb)}
    result = body(reply)
    assert result["status"] == "failed"
    assert result["error"] == {
        "kind": "InvalidInput",
        "message": "amount must be positive",
        "retryable": False,
    }
    assert body(bad_reply)["error"]["kind"] == "UnknownWorker"
    assert dead[msg.message_id].dead_letter_reason == "InvalidInput"
    assert "amount" not in dead[msg.message_id].dead_letter_error_description, "no payload text"
    assert dead[bad.message_id].dead_letter_reason == "UnknownWorker"


def test_a_malformed_body_is_answered_and_dead_lettered(daemon):
    from azure.servicebus import ServiceBusMessage

    session = f"flow-{uuid.uuid4()}"
    msg = ServiceBusMessage(
        "this is not json", message_id="garbage-1", reply_to="results", reply_to_session_id=session
    )
    with daemon.client() as sb:
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msg)
        [reply] = replies(sb, session, 1)
        [dead] = dead_letters(sb)
    assert body(reply)["error"]["kind"] == "MalformedJob"
    assert dead.dead_letter_reason == "MalformedJob"


def test_a_retryable_failure_is_retried_with_backoff_then_dead_lettered(daemon):
    with daemon.client() as sb:
        msg = job("diagnostics", {"action": "fail", "message": "flaky backend"})
        started = time.monotonic()
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msg)
        [reply] = replies(sb, msg.reply_to_session_id, 1)
        took = time.monotonic() - started
        [dead] = dead_letters(sb)
    result = body(reply)
    assert result["error"]["kind"] == "MaxAttemptsExceeded"
    assert "flaky backend" in result["error"]["message"]
    assert result["attempt"] == 3
    # Two backoff delays (1-2 s, then 2-4 s) separate the three attempts.
    assert took >= 3.0, took
    assert dead.dead_letter_reason == "MaxAttemptsExceeded"
    log = daemon.log()
    assert len(re.findall(r"will be retried", log)) == 2


def test_a_job_longer_than_the_lock_succeeds_once(daemon):
    # The jobs queue's LockDuration is 3 s; the job takes 7 s.
    with daemon.client() as sb:
        msg = job("diagnostics", {"action": "sleep", "seconds": 7})
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msg)
        [reply] = replies(sb, msg.reply_to_session_id, 1, wait=60)
        assert body(reply)["status"] == "succeeded"
        assert replies(sb, msg.reply_to_session_id, 1, wait=6) == [], "not run a second time"
    assert daemon.log().count('"The job started."') == 1


def test_dlq_replay_moves_a_fixed_dead_letter_back_and_it_succeeds(daemon, tmp_path):
    with daemon.client() as sb:
        msg = job("diagnostics", {"action": "invalid", "message": "needs fixing"})
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msg)
        [first] = replies(sb, msg.reply_to_session_id, 1)
        assert body(first)["status"] == "failed"

        listed = daemon.run_cli("dlq", "list", "--queue", "jobs", "--reason", "InvalidInput")
        assert listed.returncode == 0, listed.stderr
        assert msg.message_id in listed.stdout

        fixed = tmp_path / "fixed.json"
        fixed.write_text(json.dumps({"action": "echo", "value": "fixed"}))
        replay = daemon.run_cli("dlq", "replay", "--queue", "jobs", "--edit-input", str(fixed))
        assert replay.returncode == 0, replay.stderr
        audit = [json.loads(line) for line in replay.stdout.splitlines()]
        assert [(a["action"], a["job_id"], a["result"]) for a in audit] == [
            ("replay", msg.message_id, "moved")
        ]

        [second] = replies(sb, msg.reply_to_session_id, 1)
        result = body(second)
        assert result["status"] == "succeeded"
        assert result["job_id"] == msg.message_id, "the replayed job keeps its id"
        assert result["output"] == {"echo": "fixed"}
        assert dead_letters(sb) == [], "moved, not copied"


def test_sigkill_mid_run_loses_no_job(tmp_path):
    daemon = Daemon(tmp_path).start()
    session = f"bulk-{uuid.uuid4()}"
    messages = [job("diagnostics", {"action": "sleep", "seconds": 0.05}, session) for _ in range(200)]
    ids = {m.message_id for m in messages}
    answered: dict[str, int] = {}
    try:
        with daemon.client() as sb:
            with sb.get_queue_sender("jobs") as sender:
                for i in range(0, 200, 50):
                    sender.send_messages(messages[i : i + 50])
            for reply in replies(sb, session, 40):
                answered[body(reply)["job_id"]] = answered.get(body(reply)["job_id"], 0) + 1
            assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
            daemon.start()
            for reply in replies(sb, session, 200 - len(answered), wait=180):
                job_id = body(reply)["job_id"]
                answered[job_id] = answered.get(job_id, 0) + 1
            dead = {m.message_id for m in dead_letters(sb)}
    finally:
        daemon.stop()
    second_run = (tmp_path / "daemon-2.log").read_text().count('"The job started."')
    assert second_run > 0, "the kill landed after all jobs were done; the test proved nothing"
    missing = ids - set(answered) - dead
    assert not missing, f"{len(missing)} jobs lost"
    doubled = {k: n for k, n in answered.items() if n > 1}
    assert not doubled, f"replies delivered twice: {doubled}"


def test_the_daemon_keeps_working_across_token_expiries(tmp_path):
    daemon = Daemon(
        tmp_path,
        {"HYBRID__SERVICEBUS__TOKEN_LIFETIME_S": "2", "RUST_LOG": "info,hybrid_worker::servicebus=debug"},
    ).start()
    try:
        with daemon.client() as sb:
            for _ in range(5):
                msg = job("diagnostics", {"action": "echo", "value": 1})
                with sb.get_queue_sender("jobs") as sender:
                    sender.send_messages(msg)
                [reply] = replies(sb, msg.reply_to_session_id, 1, wait=20)
                assert body(reply)["status"] == "succeeded"
                time.sleep(1.5)
    finally:
        daemon.stop()
    puts = daemon.log().count("Put a token on $cbs.")
    assert puts >= 4, f"tokens were put {puts} times over ~10 s of 2 s tokens"
