"""Send, receive and settle: the core paths of azure-servicebus against the emulator."""

import datetime
import time

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.exceptions import ServiceBusError

WAIT = 5


def receive(client, queue, n=1, **kwargs):
    with client.get_queue_receiver(queue, **kwargs) as r:
        return r, r.receive_messages(max_message_count=n, max_wait_time=WAIT)


def test_send_single_and_complete(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("basic") as s:
            s.send_messages(ServiceBusMessage("hello", application_properties={"k": "v"}))
        with client.get_queue_receiver("basic") as r:
            msgs = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert len(msgs) == 1
            m = msgs[0]
            assert str(m) == "hello"
            assert m.application_properties[b"k"] == b"v"
            assert m.delivery_count == 0
            assert m.sequence_number >= 1
            assert m.enqueued_time_utc is not None
            r.complete_message(m)
        with client.get_queue_receiver("basic") as r:
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []


def test_send_batch(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("batch") as s:
            batch = s.create_message_batch()
            for i in range(5):
                batch.add_message(ServiceBusMessage(f"m{i}"))
            s.send_messages(batch)
            s.send_messages([ServiceBusMessage("list-a"), ServiceBusMessage("list-b")])
        got = []
        with client.get_queue_receiver("batch") as r:
            deadline = time.time() + 10
            while len(got) < 7 and time.time() < deadline:
                for m in r.receive_messages(max_message_count=10, max_wait_time=2):
                    got.append(str(m))
                    r.complete_message(m)
        assert got == [f"m{i}" for i in range(5)] + ["list-a", "list-b"]


def test_a_batch_the_sdk_filled_to_its_limit_is_accepted(conn_str):
    """The SDK fills a batch up to the link's max-message-size by its own estimate, which leaves
    out a few bytes of the batch's envelope: the broker must accept what the SDK built."""
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("batch") as s:
            batch = s.create_message_batch()
            count = 0
            while True:
                try:
                    batch.add_message(ServiceBusMessage(f'{{"worker": "w", "input": {{"n": {count}}}}}',
                                                        message_id=f"full-{count}"))
                except ValueError:
                    break
                count += 1
            assert batch.size_in_bytes > 250_000
            s.send_messages(batch)
        got = 0
        with client.get_queue_receiver("batch") as r:
            deadline = time.time() + 30
            while got < count and time.time() < deadline:
                msgs = r.receive_messages(max_message_count=500, max_wait_time=2)
                for m in msgs:
                    r.complete_message(m)
                got += len(msgs)
        assert got == count


def test_scheduled_message_arrives_later(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
        with client.get_queue_sender("scheduled") as s:
            (seq,) = s.schedule_messages(ServiceBusMessage("later"), at)
            assert seq >= 1
            m = ServiceBusMessage("annotated")
            m.scheduled_enqueue_time_utc = at
            s.send_messages(m)
        with client.get_queue_receiver("scheduled") as r:
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []
            got = []
            deadline = time.time() + 10
            while len(got) < 2 and time.time() < deadline:
                for m in r.receive_messages(max_message_count=2, max_wait_time=2):
                    got.append(str(m))
                    r.complete_message(m)
        assert sorted(got) == ["annotated", "later"]


def test_abandon_raises_delivery_count(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("abandon") as s:
            s.send_messages(ServiceBusMessage("again"))
        with client.get_queue_receiver("abandon") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m.delivery_count == 0
            r.abandon_message(m)
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m.delivery_count == 1
            r.complete_message(m)


def test_dead_letter_with_reason(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("deadletter") as s:
            s.send_messages(ServiceBusMessage("poison"))
        with client.get_queue_receiver("deadletter") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            r.dead_letter_message(m, reason="BadInput", error_description="field x missing")
        with client.get_queue_receiver("deadletter", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert str(m) == "poison"
            assert m.dead_letter_reason == "BadInput"
            assert m.dead_letter_error_description == "field x missing"
            r.complete_message(m)


def test_max_delivery_count_moves_to_dlq(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("maxdelivery") as s:
            s.send_messages(ServiceBusMessage("flaky"))
        with client.get_queue_receiver("maxdelivery") as r:
            for _ in range(2):
                (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
                r.abandon_message(m)
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []
        with client.get_queue_receiver("maxdelivery", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m.dead_letter_reason == "MaxDeliveryCountExceeded"
            r.complete_message(m)


def test_lock_expiry_redelivers(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("lockexpiry") as s:
            s.send_messages(ServiceBusMessage("slow"))
        with client.get_queue_receiver("lockexpiry") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m.delivery_count == 0
            time.sleep(3)
            (m2,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m2.sequence_number == m.sequence_number
            assert m2.delivery_count == 1
            r.complete_message(m2)


def test_renew_lock(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("renew") as s:
            s.send_messages(ServiceBusMessage("long job"))
        with client.get_queue_receiver("renew") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            before = m.locked_until_utc
            for _ in range(3):
                time.sleep(1.5)
                r.renew_message_lock(m)
            assert m.locked_until_utc > before
            r.complete_message(m)


def test_peek(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("peek") as s:
            s.send_messages([ServiceBusMessage("p1"), ServiceBusMessage("p2")])
        with client.get_queue_receiver("peek") as r:
            peeked = r.peek_messages(max_message_count=5)
            assert [str(m) for m in peeked] == ["p1", "p2"]
            assert peeked[0].sequence_number < peeked[1].sequence_number
            msgs = r.receive_messages(max_message_count=2, max_wait_time=WAIT)
            assert len(msgs) >= 1


def test_cancel_scheduled(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
        with client.get_queue_sender("cancel") as s:
            seqs = s.schedule_messages([ServiceBusMessage("x"), ServiceBusMessage("y")], at)
            s.cancel_scheduled_messages(seqs)
        time.sleep(3)
        with client.get_queue_receiver("cancel") as r:
            assert r.receive_messages(max_message_count=2, max_wait_time=1) == []


def test_defer_and_receive_deferred(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("defer") as s:
            s.send_messages(ServiceBusMessage("later please"))
        with client.get_queue_receiver("defer") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            seq = m.sequence_number
            r.defer_message(m)
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []
            (d,) = r.receive_deferred_messages([seq])
            assert str(d) == "later please"
            r.complete_message(d)
            with pytest.raises(ServiceBusError):
                r.receive_deferred_messages([seq])


def test_receive_and_delete(conn_str):
    from azure.servicebus import ServiceBusReceiveMode

    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("receivedelete") as s:
            s.send_messages(ServiceBusMessage("once"))
        with client.get_queue_receiver(
            "receivedelete", receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE
        ) as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert str(m) == "once"
        with client.get_queue_receiver("receivedelete") as r:
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []


def test_duplicate_detection(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("dedupe") as s:
            s.send_messages(ServiceBusMessage("a", message_id="same"))
            s.send_messages(ServiceBusMessage("b", message_id="same"))
        with client.get_queue_receiver("dedupe") as r:
            msgs = r.receive_messages(max_message_count=2, max_wait_time=2)
            assert [str(m) for m in msgs] == ["a"]
            r.complete_message(msgs[0])
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []


def test_ttl_expiry_dead_letters(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("ttl") as s:
            s.send_messages(ServiceBusMessage("stale"))
        time.sleep(2)
        with client.get_queue_receiver("ttl") as r:
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []
        with client.get_queue_receiver("ttl", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert m.dead_letter_reason == "TTLExpiredException"
            r.complete_message(m)


def test_large_message_crosses_frames(conn_str):
    body = bytes(range(256)) * 800  # 200 KiB: several 64 KiB frames each way
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("large") as s:
            s.send_messages(ServiceBusMessage(body))
        with client.get_queue_receiver("large") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert b"".join(m.body) == body
            r.complete_message(m)
