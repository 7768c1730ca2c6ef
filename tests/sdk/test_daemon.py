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
            deadline = time.monotonic() + 180
            while len(answered) < 200 and time.monotonic() < deadline:
                for reply in replies(sb, session, 200 - len(answered), wait=30):
                    job_id = body(reply)["job_id"]
                    answered[job_id] = answered.get(job_id, 0) + 1
            # A second answer to any job would show up here.
            for reply in replies(sb, session, 50, wait=5):
                job_id = body(reply)["job_id"]
                answered[job_id] = answered.get(job_id, 0) + 1
            dead = {m.message_id for m in dead_letters(sb)}
    finally:
        daemon.stop()
    second_run = (tmp_path / "daemon-2.log").read_text().count('"The job started."')
    assert second_run > 0, "the kill landed after all jobs were done; the test proved nothing"
    doubled = {k: n for k, n in answered.items() if n > 1}
    assert not doubled, f"replies delivered twice: {doubled}"
    missing = ids - set(answered) - dead
    assert not missing, f"{len(missing)} jobs lost"


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


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def test_metrics_and_probes_follow_an_end_to_end_run(tmp_path):
    from daemon_harness import free_port

    port = free_port()
    daemon = Daemon(tmp_path, {"HYBRID__HTTP__LISTEN": f"127.0.0.1:{port}"}).start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert _get(f"{base}/healthz")[0] == 200
        assert _get(f"{base}/readyz")[0] == 200
        with daemon.client() as sb:
            ok = [job("diagnostics", {"action": "echo", "value": i}) for i in range(3)]
            slow = job("diagnostics", {"action": "sleep", "seconds": 4})  # longer than the 3 s lock
            invalid = job("diagnostics", {"action": "invalid", "message": "no"})
            flaky = job("diagnostics", {"action": "fail", "message": "down"})
            with sb.get_queue_sender("jobs") as sender:
                sender.send_messages([*ok, slow, invalid, flaky])
            for m in [*ok, slow, invalid, flaky]:
                assert len(replies(sb, m.reply_to_session_id, 1)) == 1
        status, text = _get(f"{base}/metrics")
        assert status == 200
        assert _metric(text, "hybrid_jobs_total", worker="diagnostics", outcome="succeeded") == 4
        assert _metric(text, "hybrid_jobs_total", worker="diagnostics", outcome="dead_lettered") == 2
        assert _metric(text, "hybrid_jobs_total", worker="diagnostics", outcome="retried") == 2
        assert _metric(text, "hybrid_retries_scheduled_total", worker="diagnostics") == 2
        assert _metric(text, "hybrid_dead_letters_total", reason="InvalidInput") == 1
        assert _metric(text, "hybrid_dead_letters_total", reason="MaxAttemptsExceeded") == 1
        assert _metric(text, "hybrid_lock_renewals_total") >= 1
        assert _metric(text, "hybrid_lock_losses_total") == 0
        assert _metric(text, "hybrid_broker_connects_total") >= 1
        assert _metric(text, "hybrid_jobs_in_flight") == 0
        assert _metric(text, "hybrid_free_slots") == 4
        # 3 echo + 1 sleep + 1 invalid + 3 attempts of the flaky job = 8 processes.
        assert _metric(text, "hybrid_process_start_seconds_count", mode="spawn") == 8
        assert _metric(text, "hybrid_job_duration_seconds_count", worker="diagnostics") == 8
        assert _metric(text, "hybrid_job_queue_wait_seconds_count", worker="diagnostics") == 8
        assert 'job_id' not in text, "no job ids as labels"

        # Draining: a running job keeps the daemon up while /readyz says no.
        with daemon.client() as sb:
            long = job("diagnostics", {"action": "sleep", "seconds": 3})
            with sb.get_queue_sender("jobs") as sender:
                sender.send_messages(long)
            deadline = time.monotonic() + 10
            def started() -> bool:
                return any(
                    long.message_id in l and '"The job started."' in l for l in daemon.log().splitlines()
                )

            while not started() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert started()
            daemon.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert daemon.proc.poll() is None, "still draining"
            assert _get(f"{base}/readyz")[0] == 503
            assert _get(f"{base}/healthz")[0] == 200
            assert daemon.proc.wait(timeout=30) == 0
            # The embedded emulator stopped with the daemon, so the log is the witness.
            assert any(
                long.message_id in l and "The job succeeded" in l for l in daemon.log().splitlines()
            ), "the running job finished during the drain"
    finally:
        daemon.stop()

    # Every log line of a job carries its ids.
    lines = [json.loads(l) for l in daemon.log().splitlines() if l.startswith("{")]
    started = [l for l in lines if l.get("message") == "The job started."]
    assert started
    for line in started:
        span = next(s for s in line["spans"] if s["name"] == "job")
        assert {"job_id", "correlation_id", "worker", "attempt", "flow_run_id"} <= set(span)


def test_readyz_is_false_while_the_broker_is_unreachable(tmp_path):
    from daemon_harness import free_port

    port, dead = free_port(), free_port()
    cs = f"Endpoint=sb://127.0.0.1:{dead};SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;"
    daemon = Daemon(
        tmp_path,
        {"HYBRID__HTTP__LISTEN": f"127.0.0.1:{port}", "HYBRID__SERVICEBUS__CONNECTION_STRING": cs},
    )
    log = open(tmp_path / "unreachable.log", "wb")
    import subprocess

    from daemon_harness import BIN

    proc = subprocess.Popen([BIN, "run"], env=daemon.env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        status, text = _get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503
        assert "broker_up=false" in text
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
