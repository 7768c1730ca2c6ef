"""Topics and subscriptions from the official Config.json shape, with rules."""

import datetime
import time

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusError

WAIT = 3


def drain(client, topic, sub):
    got = []
    with client.get_subscription_receiver(topic, sub) as r:
        while True:
            msgs = r.receive_messages(max_message_count=10, max_wait_time=WAIT)
            if not msgs:
                return got
            for m in msgs:
                got.append(str(m))
                r.complete_message(m)


def test_rules_decide_which_subscription_gets_a_copy(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_topic_sender("orders") as s:
            s.send_messages(
                ServiceBusMessage("blue-big", subject="order", application_properties={"color": "blue", "size": 5})
            )
            s.send_messages(ServiceBusMessage("red-small", application_properties={"color": "red", "size": 1}))
        assert sorted(drain(client, "orders", "all")) == ["blue-big", "red-small"]
        assert drain(client, "orders", "blue") == ["blue-big"]
        assert drain(client, "orders", "big-orders") == ["blue-big"]
        assert drain(client, "orders", "none") == []


def test_scheduled_on_topic_can_be_cancelled(conn_str):
    with ServiceBusClient.from_connection_string(conn_str) as client:
        at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
        with client.get_topic_sender("events") as s:
            (seq,) = s.schedule_messages(ServiceBusMessage("cancel me"), at)
            s.schedule_messages(ServiceBusMessage("keep me"), at)
            s.cancel_scheduled_messages(seq)
        time.sleep(3)
        assert drain(client, "events", "s1") == ["keep me"]


def test_sending_to_a_subscription_is_refused(conn_str):
    with ServiceBusClient.from_connection_string(conn_str, retry_total=0) as client:
        with pytest.raises(ServiceBusError):
            with client.get_queue_sender("orders/Subscriptions/all") as s:
                s.send_messages(ServiceBusMessage("nope"))
