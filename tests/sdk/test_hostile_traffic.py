"""Hostile messages against `hybrid-worker run`, with the official Python SDK as the sender:
reply routing, dead letters of every body type and size, and what the `dlq` tools do with
them (issue 17's probes, kept as tests)."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageBodyType

from daemon_harness import Daemon, body, job, replies


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, {"HYBRID__ENGINE__CONCURRENCY": "8"}).start()
    yield d
    d.stop()


def peek_dead_letters(sb, count: int = 100) -> list:
    with sb.get_queue_receiver("jobs", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as receiver:
        got: list = []
        while True:
            page = receiver.peek_messages(max_message_count=count)
            if not page:
                return got
            got.extend(page)


def wait_dead_letters(sb, count: int, wait: float = 60) -> list:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        got = peek_dead_letters(sb)
        if len(got) >= count:
            return got
        time.sleep(0.5)
    return peek_dead_letters(sb)


def reason(msg) -> str | None:
    return msg.dead_letter_reason


def test_hostile_reply_to_never_runs_and_never_slows_the_other_jobs(daemon):
    session = f"bulk-{uuid.uuid4()}"
    normal = [job("diagnostics", {"action": "echo", "value": i}, session) for i in range(100)]
    hostile = []
    for target in ["no-such-queue", "jobs/$DeadLetterQueue", "jobs"]:
        msg = job("diagnostics", {"action": "echo", "value": target})
        msg.reply_to = target
        hostile.append(msg)
    with daemon.client() as sb:
        started = time.monotonic()
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(hostile)
            for i in range(0, 100, 50):
                sender.send_messages(normal[i : i + 50])
        got = replies(sb, session, 100, wait=120)
        took = time.monotonic() - started
        dead = wait_dead_letters(sb, 3)
    print(f"100 jobs beside 3 hostile ReplyTo answered in {took:.1f} s")
    assert len(got) == 100
    assert sorted(m.message_id for m in dead) == sorted(m.message_id for m in hostile)
    assert all(reason(m) == "PolicyDenied" for m in dead)
    log = daemon.log()
    assert log.count('"The job started."') == 100, "the hostile jobs never ran"
    assert log.count("Connected to Service Bus.") == 1, "no send tore the connection down"


def test_dlq_tools_handle_large_bodies_and_purge_asks_for_yes(daemon):
    with daemon.client() as sb:
        with sb.get_queue_sender("jobs") as sender:
            for i in range(5):
                # Not JSON: each is dead-lettered as MalformedJob.
                sender.send_messages(ServiceBusMessage(b"x" * 250_000, message_id=f"big-{i}"))
        assert len(wait_dead_letters(sb, 5)) == 5

    for args in (["list"], ["list", "--limit", "1"], ["replay", "--dry-run"], ["purge", "--dry-run"]):
        out = daemon.run_cli("dlq", *args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
    listed = daemon.run_cli("dlq", "list")
    assert all(f"big-{i}" in listed.stdout for i in range(5))

    refused = daemon.run_cli("dlq", "purge")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    with daemon.client() as sb:
        assert len(peek_dead_letters(sb)) == 5, "nothing deleted without --yes"

    purged = daemon.run_cli("dlq", "purge", "--yes")
    assert purged.returncode == 0, purged.stderr[-2000:]
    audit = [json.loads(line) for line in purged.stdout.splitlines()]
    assert [a["result"] for a in audit] == ["purged"] * 5
    with daemon.client() as sb:
        assert peek_dead_letters(sb) == []


def test_replay_keeps_value_and_sequence_bodies(daemon):
    value = AmqpAnnotatedMessage(
        value_body={"worker": "diagnostics", "n": 1}, properties={"message_id": "value-body"}
    )
    sequence = AmqpAnnotatedMessage(
        sequence_body=[[1, "two"]], properties={"message_id": "sequence-body"}
    )
    with daemon.client() as sb:
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(value)
            sender.send_messages(sequence)
        first = wait_dead_letters(sb, 2)
    assert len(first) == 2

    out = daemon.run_cli("dlq", "replay")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [json.loads(line)["result"] for line in out.stdout.splitlines()] == ["moved"] * 2

    # The daemon cannot run them (they are not JSON documents) and dead-letters them again:
    # with their bodies as they were, not emptied.
    with daemon.client() as sb:
        deadline = time.monotonic() + 60
        again: list = []
        while time.monotonic() < deadline:
            again = [m for m in peek_dead_letters(sb) if m.sequence_number not in {f.sequence_number for f in first}]
            if len(again) == 2:
                break
            time.sleep(0.5)
    kinds = {m.body_type for m in again}
    assert kinds == {AmqpMessageBodyType.VALUE, AmqpMessageBodyType.SEQUENCE}, kinds
    for m in again:
        if m.body_type == AmqpMessageBodyType.VALUE:
            assert {k.decode() if isinstance(k, bytes) else k: v for k, v in m.body.items()}["n"] == 1
        else:
            assert list(m.body) == [[1, b"two"]] or list(m.body) == [[1, "two"]], list(m.body)
