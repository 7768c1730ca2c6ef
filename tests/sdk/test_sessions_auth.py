"""Sessions, authorisation and durability."""

import time

import pytest
from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusError

WAIT = 5


def test_named_session(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("sessions") as s:
            s.send_messages([ServiceBusMessage(f"a{i}", session_id="A") for i in range(3)])
            s.send_messages(ServiceBusMessage("b0", session_id="B"))
        with client.get_queue_receiver("sessions", session_id="A") as r:
            assert r.session.session_id == "A"
            assert r.session.locked_until_utc is not None
            got = []
            deadline = time.time() + 10
            while len(got) < 3 and time.time() < deadline:
                for m in r.receive_messages(max_message_count=3, max_wait_time=2):
                    assert m.session_id == "A"
                    got.append(str(m))
                    r.complete_message(m)
            assert got == ["a0", "a1", "a2"]
        with client.get_queue_receiver("sessions", session_id="B") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert str(m) == "b0"
            r.complete_message(m)


def test_next_available_session(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("nextsession") as s:
            s.send_messages(ServiceBusMessage("hi", session_id="S1"))
        with client.get_queue_receiver("nextsession", session_id=NEXT_AVAILABLE_SESSION) as r:
            assert r.session.session_id == "S1"
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            assert str(m) == "hi"
            r.complete_message(m)
            r.session.renew_lock()


def test_session_state(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("sessionstate") as s:
            s.send_messages(ServiceBusMessage("x", session_id="st"))
        with client.get_queue_receiver("sessionstate", session_id="st") as r:
            assert r.session.get_state() is None
            r.session.set_state("progress=1")
            assert r.session.get_state() == b"progress=1"
            r.session.set_state(None)
            assert r.session.get_state() is None


def test_wrong_key_is_refused(conn_str):
    bad = conn_str.replace("SharedAccessKey=SAS_KEY_VALUE", "SharedAccessKey=wrong")
    with ServiceBusClient.from_connection_string(bad, retry_total=0) as client:
        with pytest.raises(ServiceBusError):
            with client.get_queue_sender("basic") as s:
                s.send_messages(ServiceBusMessage("nope"))


def test_unknown_queue_is_refused(conn_str):
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with pytest.raises(ServiceBusError):
            with client.get_queue_sender("no-such-queue") as s:
                s.send_messages(ServiceBusMessage("nope"))


def test_restart_loses_no_accepted_message(durable_emulator):
    emu = durable_emulator
    with ServiceBusClient.from_connection_string(emu.connection_string) as client:
        with client.get_queue_sender("restart") as s:
            for i in range(10):
                s.send_messages(ServiceBusMessage(f"r{i}"))
        with client.get_queue_receiver("restart") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            r.complete_message(m)
    emu.stop(kill=True)
    emu.start()
    got = []
    with ServiceBusClient.from_connection_string(emu.connection_string) as client:
        with client.get_queue_receiver("restart") as r:
            deadline = time.time() + 15
            while len(got) < 9 and time.time() < deadline:
                for m in r.receive_messages(max_message_count=10, max_wait_time=2):
                    got.append(str(m))
                    r.complete_message(m)
    assert got == [f"r{i}" for i in range(1, 10)]


def test_next_available_times_out_when_no_session_is_free(conn_str):
    from azure.servicebus.exceptions import OperationTimeoutError

    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        start = time.time()
        with pytest.raises(OperationTimeoutError):
            with client.get_queue_receiver(
                "emptysessions", session_id=NEXT_AVAILABLE_SESSION, max_wait_time=2
            ) as r:
                r.receive_messages(max_message_count=1, max_wait_time=1)
        assert time.time() - start < 30


def test_locked_session_cannot_be_taken_twice(conn_str):
    from azure.servicebus.exceptions import SessionCannotBeLockedError

    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_sender("sessionlock") as s:
            s.send_messages(ServiceBusMessage("x", session_id="L"))
        with client.get_queue_receiver("sessionlock", session_id="L") as first:
            with pytest.raises(SessionCannotBeLockedError):
                with client.get_queue_receiver("sessionlock", session_id="L") as second:
                    second.receive_messages(max_message_count=1, max_wait_time=1)
            (m,) = first.receive_messages(max_message_count=1, max_wait_time=WAIT)
            first.complete_message(m)


def test_expired_session_lock_is_lost(conn_str):
    from azure.servicebus.exceptions import SessionLockLostError

    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with client.get_queue_sender("shortsession") as s:
            s.send_messages(ServiceBusMessage("x", session_id="E"))
        with client.get_queue_receiver("shortsession", session_id="E") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=WAIT)
            time.sleep(3)
            with pytest.raises(SessionLockLostError):
                r.complete_message(m)


def test_list_queue_sessions(conn_str):
    import datetime

    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("listsessions") as s:
            s.send_messages([ServiceBusMessage("x", session_id=sid) for sid in ("L1", "L2")])
        before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
        with client.get_queue_receiver("listsessions", session_id="L2") as r:
            r.session.set_state("s")
        assert sorted(client.list_queue_sessions("listsessions")) == ["L1", "L2"]
        assert list(client.list_queue_sessions("listsessions", state_updated_after=before)) == ["L2"]
