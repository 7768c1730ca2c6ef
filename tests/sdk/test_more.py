"""Less common client paths: prefetch, the async client, lock renewal helper, DLQ management."""

import asyncio
import time

from azure.servicebus import (
    AutoLockRenewer,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient

WAIT = 5


def test_prefetch_receives_everything_once(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("prefetch") as s:
            s.send_messages([ServiceBusMessage(f"p{i}") for i in range(8)])
        got = []
        with client.get_queue_receiver("prefetch", prefetch_count=5) as r:
            deadline = time.time() + 15
            while len(got) < 8 and time.time() < deadline:
                for m in r.receive_messages(max_message_count=3, max_wait_time=2):
                    got.append(str(m))
                    r.complete_message(m)
        assert sorted(got) == sorted(f"p{i}" for i in range(8))
        with client.get_queue_receiver("prefetch") as r:
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []


def test_async_client_round_trip(conn_str):
    async def run():
        async with AsyncServiceBusClient.from_connection_string(conn_str) as client:
            async with client.get_queue_sender("asyncq") as s:
                await s.send_messages(ServiceBusMessage("from asyncio"))
            async with client.get_queue_receiver("asyncq") as r:
                msgs = await r.receive_messages(max_message_count=1, max_wait_time=WAIT)
                assert [str(m) for m in msgs] == ["from asyncio"]
                await r.complete_message(msgs[0])

    asyncio.run(run())


def test_auto_lock_renewer_keeps_the_lock(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("autorenew") as s:
            s.send_messages(ServiceBusMessage("long"))
        renewer = AutoLockRenewer(max_lock_renewal_duration=30)
        try:
            with client.get_queue_receiver("autorenew") as r:
                (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
                renewer.register(r, m)
                time.sleep(4)  # two lock durations
                r.complete_message(m)
        finally:
            renewer.close()


def test_dead_letter_queue_management_and_session_dlq(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("sessiondlq") as s:
            s.send_messages(ServiceBusMessage("bad", session_id="S"))
        with client.get_queue_receiver("sessiondlq", session_id="S") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            r.dead_letter_message(m, reason="why")
        with client.get_queue_receiver("sessiondlq", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as r:
            peeked = r.peek_messages(max_message_count=5)
            assert [str(p) for p in peeked] == ["bad"]
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m.session_id == "S"
            assert m.dead_letter_reason == "why"
            r.complete_message(m)


def test_auto_forwarding_and_dead_letter_forwarding(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("fwd-in") as s:
            s.send_messages(ServiceBusMessage("hop"))
        with client.get_queue_receiver("fwd-out") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert str(m) == "hop"
            r.dead_letter_message(m, reason="forward me")
        with client.get_queue_receiver("fwd-dead") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert str(m) == "hop"
            assert m.dead_letter_reason == "forward me"
            assert m.dead_letter_source == "fwd-out"
            r.complete_message(m)
