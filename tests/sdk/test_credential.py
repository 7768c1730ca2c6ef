"""`ctx.credential()` against azure-core itself: the runtime's DaemonCredential (which imports
nothing of azure-core) must be what Azure's Python SDKs take as a credential. The daemon's side
of the token channel is played by a thread on two pipes, in the daemon's line format
(docs/secrets.md)."""

import json
import os
import pathlib
import sys
import threading

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "src" / "python"))

from azure.core.credentials import SupportsTokenInfo, TokenCredential  # noqa: E402
from azure.core.pipeline import PipelineRequest, PipelineContext  # noqa: E402
from azure.core.pipeline.policies import BearerTokenCredentialPolicy  # noqa: E402
from azure.core.rest import HttpRequest  # noqa: E402

from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential  # noqa: E402
from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy  # noqa: E402

from hybrid_worker import PolicyDenied  # noqa: E402
from hybrid_worker._tokens import AsyncDaemonCredential, DaemonCredential  # noqa: E402

STORAGE = "https://storage.azure.com/.default"


class FakeDaemon:
    """Reads asks from the job's channel and answers on its input pipe, as the daemon does."""

    def __init__(self):
        self.asks = []
        channel_r, self.channel_w = os.pipe()
        self.answer_r, answer_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, args=(channel_r, answer_w), daemon=True)
        self._thread.start()

    def send(self, record):
        os.write(self.channel_w, json.dumps(record).encode() + b"\n")

    def _serve(self, channel_r, answer_w):
        with os.fdopen(channel_r, "rb") as lines:
            for line in lines:
                ask = json.loads(line)
                self.asks.append(ask)
                if ask["scopes"] == [STORAGE]:
                    answer = {"id": ask["id"], "token": "tok-abc", "expires_on": 4102444800}
                else:
                    answer = {"id": ask["id"], "denied": f"scope {ask['scopes'][0]!r} is not declared"}
                os.write(answer_w, json.dumps(answer).encode() + b"\n")


@pytest.fixture
def credential():
    daemon = FakeDaemon()
    return DaemonCredential([STORAGE], daemon.send, daemon.answer_r, PolicyDenied), daemon


def test_it_is_a_token_credential_and_supports_token_info(credential):
    cred, _ = credential
    assert isinstance(cred, TokenCredential)
    assert isinstance(cred, SupportsTokenInfo)
    token = cred.get_token(STORAGE)
    assert (token.token, token.expires_on) == ("tok-abc", 4102444800)
    info = cred.get_token_info(STORAGE, options={"enable_cae": True})
    assert (info.token, info.expires_on, info.token_type) == ("tok-abc", 4102444800, "Bearer")
    assert "tok-abc" not in repr(info)


def test_an_sdk_pipeline_authorizes_its_request_with_the_daemons_token(credential):
    cred, daemon = credential
    policy = BearerTokenCredentialPolicy(cred, STORAGE)
    request = PipelineRequest(HttpRequest("GET", "https://example.blob.core.windows.net/c/b"),
                              PipelineContext(None))
    policy.on_request(request)
    assert request.http_request.headers["Authorization"] == "Bearer tok-abc"
    assert daemon.asks[0]["t"] == "token" and daemon.asks[0]["scopes"] == [STORAGE]


def test_an_undeclared_scope_is_policy_denied(credential):
    cred, _ = credential
    with pytest.raises(PolicyDenied, match="vault.azure.net"):
        cred.get_token("https://vault.azure.net/.default")


def test_a_worker_without_scopes_asks_nothing():
    sent = []
    cred = DaemonCredential([], sent.append, -1, PolicyDenied)
    with pytest.raises(PolicyDenied, match="declares no azure_scopes"):
        cred.get_token(STORAGE)
    assert sent == []


def test_the_async_credential_serves_an_async_sdk_pipeline(credential):
    import asyncio

    cred, daemon = credential
    async_cred = AsyncDaemonCredential(cred)
    assert isinstance(async_cred, AsyncTokenCredential)
    assert isinstance(async_cred, AsyncSupportsTokenInfo)

    async def authorize():
        policy = AsyncBearerTokenCredentialPolicy(async_cred, STORAGE)
        request = PipelineRequest(HttpRequest("GET", "https://example.blob.core.windows.net/c/b"),
                                  PipelineContext(None))
        await policy.on_request(request)
        return request.http_request.headers["Authorization"]

    assert asyncio.run(authorize()) == "Bearer tok-abc"
    with pytest.raises(PolicyDenied):
        asyncio.run(async_cred.get_token("https://vault.azure.net/.default"))
