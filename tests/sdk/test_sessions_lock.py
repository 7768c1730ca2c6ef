"""Session locks govern their messages (docs/servicebus-protocol.md §7), as on Service Bus.

Real seconds: the SDK is the referee, and the lock has to outlive the queue's LockDuration.
"""

import time

from azure.servicebus import ServiceBusClient, ServiceBusMessage


def test_session_message_lives_as_long_as_the_session_lock(conn_str):
    # LockDuration 5 s; the message is completed at about 9 s, after three session renewals.
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_queue_sender("sessioncover") as s:
            s.send_messages(ServiceBusMessage("covered", session_id="cover"))
        with client.get_queue_receiver("sessioncover", session_id="cover") as r:
            (m,) = r.receive_messages(max_message_count=1, max_wait_time=5)
            assert m.delivery_count == 0
            started = time.monotonic()
            for _ in range(3):
                time.sleep(3)
                r.session.renew_lock()
            assert time.monotonic() - started >= 9
            r.complete_message(m)
        with client.get_queue_receiver("sessioncover", session_id="cover") as r:
            assert r.receive_messages(max_message_count=1, max_wait_time=1) == []
