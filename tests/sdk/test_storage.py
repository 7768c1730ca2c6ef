"""Claim-check end to end: `hybrid-worker run` on its embedded emulator with Azurite as its Blob
Storage, and Microsoft's Python SDKs (azure-storage-blob, azure-servicebus) as the flow: upload,
send the job, take the reply, download what it lists and check bytes and sha256."""

from __future__ import annotations

import hashlib
import csv
import io
import json
import time

import pytest
from azure.storage.blob import BlobServiceClient

from azurite import Azurite
from daemon_harness import Daemon, body, dead_letters, job, replies


@pytest.fixture
def azurite(tmp_path):
    a = Azurite(tmp_path / "azurite").start()
    yield a
    a.stop()


@pytest.fixture
def blobs(azurite):
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    for name in ("inputs", "results"):
        service.create_container(name)
    return service


@pytest.fixture
def daemon(tmp_path, azurite, blobs):
    d = Daemon(tmp_path, azurite.env()).start()
    yield d
    d.stop()


def export_csv(target_bytes: int) -> bytes:
    """A messy export of about `target_bytes`: padded cells, blank lines, repeated rows."""
    out = io.StringIO()
    out.write(" Customer ID ,Signup Date,Amount (EUR),Country\n")
    i = 0
    while out.tell() < target_bytes:
        cid = i % 50_000
        out.write(f"{cid}, 2024-{cid % 12 + 1:02}-{cid % 28 + 1:02} ,{cid % 997}.25, FR \n")
        if i % 500 == 0:
            out.write(",,,\n")
        i += 1
    return out.getvalue().encode()


def download(service: BlobServiceClient, listed: dict) -> bytes:
    """What the flow's "Get blob content (V2)" does with the path a reply lists."""
    container, name = listed["path"].split("/", 1)
    data = service.get_blob_client(container, name).download_blob().readall()
    assert len(data) == listed["bytes"]
    assert hashlib.sha256(data).hexdigest() == listed["sha256"]
    assert listed["url"].endswith(listed["path"])
    return data


def send(daemon: Daemon, msg) -> dict:
    with daemon.client() as sb:
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msg)
        [reply] = replies(sb, msg.reply_to_session_id, 1, wait=180)
    return body(reply)


def test_a_5_mb_csv_blob_goes_through_csv_normalize_and_comes_back_as_artifacts(daemon, blobs):
    data = export_csv(5 * 1024 * 1024)
    blobs.get_blob_client("inputs", "exports/may.csv").upload_blob(data)
    msg = job("csv-normalize", {"key": ["customer_id"]}, input_blob="inputs/exports/may.csv")
    result = send(daemon, msg)
    assert result["status"] == "succeeded", result
    artifacts = {a["name"]: a for a in result["artifacts"]}
    assert set(artifacts) == {"normalized.csv", "report.json"}
    assert artifacts["normalized.csv"]["path"] == f"results/{msg.message_id}/normalized.csv"
    assert artifacts["normalized.csv"]["content_type"] == "text/csv"
    normalized = download(blobs, artifacts["normalized.csv"]).decode()
    report = json.loads(download(blobs, artifacts["report.json"]))
    rows = list(csv.reader(io.StringIO(normalized)))
    assert rows[0] == ["customer_id", "signup_date", "amount_eur", "country"]
    assert rows[1] == ["0", "2024-01-01", "0.25", "FR"]
    # De-duplicated by customer: one row per id, the report says how many went.
    assert len(rows) - 1 == 50_000 == report["rows_out"] == result["output"]["summary"]["rows_out"]
    assert len(report["duplicates_removed"]) == result["output"]["summary"]["duplicates_removed"] > 0
    assert '"Fetched the job\'s input blob."' in daemon.log()


def test_a_400_kb_result_comes_back_as_output_blob(daemon, blobs):
    msg = job("diagnostics", {"action": "result", "kb": 400})
    result = send(daemon, msg)
    assert result["status"] == "succeeded", result
    assert result["output"] is None
    listed = result["output_blob"]
    assert listed["path"] == f"results/{msg.message_id}/result.json"
    assert listed["content_type"] == "application/json"
    assert len(json.loads(download(blobs, listed))) == 400 * 1024


@pytest.mark.parametrize(
    "reference",
    [
        "results/someone-else/result.json",
        "private/payroll.csv",
        "http://127.0.0.1:{port}/otheraccount/inputs/a.csv",
        "https://attacker.example/devstoreaccount1/inputs/a.csv",
        "http://169.254.169.254/metadata/identity/oauth2/token",
    ],
)
def test_foreign_containers_accounts_and_urls_are_refused(daemon, blobs, azurite, reference):
    reference = reference.format(port=azurite.port)
    blobs.create_container("private")
    blobs.get_blob_client("private", "payroll.csv").upload_blob(b"secret")
    msg = job("csv-normalize", {}, input_blob=reference)
    result = send(daemon, msg)
    assert result["status"] == "failed"
    assert result["error"]["kind"] == "PolicyDenied", result
    assert result["error"]["retryable"] is False
    with daemon.client() as sb:
        [dead] = dead_letters(sb)
    assert dead.dead_letter_reason == "PolicyDenied"
    assert "Fetched the job's input blob" not in daemon.log()


def test_azurite_stopped_mid_way_loses_no_job(daemon, blobs, azurite):
    blobs.get_blob_client("inputs", "small.csv").upload_blob(b"id,name\n1,Ada\n2,Bob\n")
    azurite.stop()
    msgs = [job("csv-normalize", {}, input_blob="inputs/small.csv") for _ in range(3)]
    with daemon.client() as sb:
        with sb.get_queue_sender("jobs") as sender:
            sender.send_messages(msgs)
    deadline = time.monotonic() + 90
    while "its own fault" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.5)
    azurite.start()
    with daemon.client() as sb:
        results = [body(r) for m in msgs for r in replies(sb, m.reply_to_session_id, 1, wait=180)]
        assert dead_letters(sb, wait=2) == []
    assert len(results) == 3
    for result in results:
        assert result["status"] == "succeeded", result
        assert result["attempt"] == 1
        assert result["output"]["summary"]["rows_out"] == 2
