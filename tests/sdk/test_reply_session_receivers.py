"""A flow waiting for its answers opens a receive-and-delete session receiver on its reply session
again and again (the flow maker's guide's "Do until" loop) while the daemon is still replying
into that session. On Service Bus a closed receiver releases its session and the next one accepts
it cleanly, with a fresh session lock. Here the reply queue's lock is 4 s and the loop runs well
past two of them, so a receiver handed a stale lock (or a session its predecessor still held)
fails with SessionLockLostError or SessionCannotBeLockedError, and the test with it.
"""

from __future__ import annotations

import json
import pathlib
import time
import uuid

from azure.servicebus import ServiceBusReceiveMode

from daemon_harness import Daemon, body, job

JOBS = 400
REPLY_LOCK_S = 4


def short_reply_lock(path: pathlib.Path) -> pathlib.Path:
    config = {
        "UserConfig": {
            "Namespaces": [
                {
                    "Name": "sbemulatorns",
                    "Queues": [
                        {"Name": "jobs", "Properties": {"LockDuration": "PT3S", "MaxDeliveryCount": 10}},
                        {
                            "Name": "results",
                            "Properties": {
                                "RequiresSession": True,
                                "LockDuration": f"PT{REPLY_LOCK_S}S",
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


def test_receivers_opened_one_after_another_on_a_reply_session_each_accept_it(tmp_path):
    d = Daemon(tmp_path)
    d.env["HYBRID__EMULATOR__ENTITIES"] = str(short_reply_lock(tmp_path / "Config.json"))
    d.start()
    try:
        session = f"flow-{uuid.uuid4()}"
        with d.client() as sb:
            with sb.get_queue_sender("jobs") as sender:
                for start in range(0, JOBS, 50):
                    sender.send_messages(
                        [job("diagnostics", {"action": "echo", "value": i}, session) for i in range(start, start + 50)]
                    )
            values: list[int] = []
            receivers = 0
            began = time.monotonic()
            # Each receiver lives about a second; a flow's loop closes and reopens just like this.
            while len(values) < JOBS and time.monotonic() - began < 180:
                with sb.get_queue_receiver(
                    "results",
                    session_id=session,
                    receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE,
                    max_wait_time=1,
                ) as receiver:
                    receivers += 1
                    for msg in receiver.receive_messages(max_message_count=40, max_wait_time=1):
                        values.append(body(msg)["output"]["echo"])
            spent = time.monotonic() - began
    finally:
        d.stop()
    assert spent > 2 * REPLY_LOCK_S, f"the loop ended in {spent:.1f}s, inside two session locks"
    assert receivers >= 5, receivers
    assert len(values) == len(set(values)), "a reply was delivered twice"
    # Receive-and-delete settles on transfer: a reply in flight when a receiver closes is gone,
    # here as on Service Bus (the guide says so). Nearly all must arrive.
    assert len(values) >= JOBS * 0.95, f"{len(values)} of {JOBS} replies in {receivers} receivers"
