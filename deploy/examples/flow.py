"""Plays a Power Automate flow against hybrid-worker with Microsoft's Service Bus SDK: the
same message properties the connector's "Send message" sets, then "Get messages from a queue
(peek-lock)" on the reply session and "Complete the message". deploy/flow-maker-guide.md
walks through it.

    pip install azure-servicebus==7.15.0
    python deploy/examples/flow.py WORKER INPUT.json [--timeout-s N] [--wait-s 60]

Connects with SERVICEBUS_CONNECTION_STRING (default: the embedded emulator's on
127.0.0.1:5672; the daemon prints its own at start), or, with SERVICEBUS_NAMESPACE set
(<name>.servicebus.windows.net), with Entra ID (azure-identity's DefaultAzureCredential).
"""

import argparse
import json
import os
import sys
import uuid
from datetime import timedelta

from azure.servicebus import ServiceBusClient, ServiceBusMessage

EMULATOR = ("Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;"
            "SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;")


def client() -> ServiceBusClient:
    namespace = os.environ.get("SERVICEBUS_NAMESPACE")
    if namespace:
        from azure.identity import DefaultAzureCredential
        return ServiceBusClient(namespace, DefaultAzureCredential())
    return ServiceBusClient.from_connection_string(os.environ.get("SERVICEBUS_CONNECTION_STRING", EMULATOR))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("worker")
    parser.add_argument("input", help="a JSON file: the job's input")
    parser.add_argument("--timeout-s", type=int, help="the job's own deadline (capped by the worker's)")
    parser.add_argument("--wait-s", type=int, default=60, help="how long to wait for the reply")
    parser.add_argument("--jobs", default="jobs")
    parser.add_argument("--results", default="results")
    args = parser.parse_args()
    with open(args.input) as f:
        body = {"worker": args.worker, "input": json.load(f)}
    if args.timeout_s is not None:
        body["timeout_s"] = args.timeout_s

    job_id = str(uuid.uuid4())        # Message Id: guid()
    session = job_id                  # Reply To Session Id: the same guid()
    run_id = f"flow-run-{job_id[:8]}"  # Correlation Id: workflow()?['run']?['name']
    with client() as sb:
        # 1. Send message (queue `jobs`)
        with sb.get_queue_sender(args.jobs) as sender:
            sender.send_messages(ServiceBusMessage(
                json.dumps(body),
                content_type="application/json",
                message_id=job_id,
                correlation_id=run_id,
                reply_to=args.results,
                reply_to_session_id=session,
                application_properties={"flow_run_id": run_id},
                time_to_live=timedelta(hours=1),
            ))
        print(f"sent job {job_id} (correlation {run_id}); waiting on session {session} of {args.results}",
              file=sys.stderr)
        # 2. Get messages from a queue (peek-lock), Session Id = the Reply To Session Id
        with sb.get_queue_receiver(args.results, session_id=session, max_wait_time=args.wait_s) as receiver:
            replies = receiver.receive_messages(max_message_count=1, max_wait_time=args.wait_s)
            if not replies:
                print(f"no reply within {args.wait_s} s", file=sys.stderr)
                return 1
            reply = replies[0]
            props = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                     for k, v in (reply.application_properties or {}).items()}
            print(f"reply: session {reply.session_id}, correlation id {reply.correlation_id}, "
                  f"message id {reply.message_id}, properties {json.dumps(props, sort_keys=True)}", file=sys.stderr)
            result = json.loads(str(reply))
            # 3. Complete the message (its lock token, on the same session)
            receiver.complete_message(reply)
    print(json.dumps(result, indent=2))
    return 0 if result.get("status") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
