"""Tokens from the daemon: ``ctx.credential()`` for Azure's Python SDKs.

The object follows azure-core's ``TokenCredential`` protocol (``get_token``) and its newer
``SupportsTokenInfo`` (``get_token_info``) by shape alone, so azure-core need not be installed.
Each call asks the daemon over the job's channel, ``{"t": "token", "id": N, "scopes": [...]}``,
and reads one answer line on the job's input pipe, which the daemon keeps open for workers that
declare ``azure_scopes``. The daemon gets the token with its own identity, only for declared
scopes, and caches it; the job never sees the daemon's credential (docs/secrets.md).
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

ANSWER_TIMEOUT_S = 60.0
ANSWER_LIMIT = 1 << 20


class AccessToken(NamedTuple):
    """azure-core's ``AccessToken`` shape: the token and its expiry (Unix seconds)."""

    token: str
    expires_on: int


class AccessTokenInfo:
    """azure-core's ``AccessTokenInfo`` shape, for ``get_token_info``."""

    __slots__ = ("token", "expires_on", "token_type", "refresh_on")

    def __init__(self, token: str, expires_on: int) -> None:
        self.token = token
        self.expires_on = expires_on
        self.token_type = "Bearer"
        self.refresh_on: Optional[int] = None

    def __repr__(self) -> str:
        return f"AccessTokenInfo(token=<redacted>, expires_on={self.expires_on})"


class CredentialUnavailable(Exception):
    """The daemon could not get a token with its identity (or did not answer)."""


class DaemonCredential:
    """A credential whose tokens come from the daemon, for the worker's declared scopes."""

    def __init__(self, scopes: List[str], send: Callable[[Dict[str, Any]], None], fd: int,
                 denied: Callable[[str], Exception]) -> None:
        self._declared = list(scopes)
        self._send = send
        self._fd = fd
        self._denied = denied
        self._lock = threading.Lock()
        self._next_id = 0
        self._pending = b""

    def __repr__(self) -> str:
        return f"DaemonCredential(scopes={self._declared!r})"

    def get_token(self, *scopes: str, claims: Optional[str] = None,
                  tenant_id: Optional[str] = None, enable_cae: bool = False,
                  **kwargs: Any) -> AccessToken:
        token, expires_on = self._ask(scopes)
        return AccessToken(token, expires_on)

    def get_token_info(self, *scopes: str, options: Optional[Dict[str, Any]] = None
                       ) -> AccessTokenInfo:
        token, expires_on = self._ask(scopes)
        return AccessTokenInfo(token, expires_on)

    def close(self) -> None:
        pass

    def __enter__(self) -> "DaemonCredential":
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def _ask(self, scopes) -> tuple:
        scopes = [str(s) for s in scopes]
        if not scopes:
            raise ValueError("get_token needs at least one scope")
        if self._fd < 0:
            raise self._denied(
                f"no token for {scopes}: this worker declares no azure_scopes in worker.toml")
        with self._lock:
            self._next_id += 1
            ask_id = self._next_id
            self._send({"t": "token", "id": ask_id, "scopes": scopes})
            answer = self._answer(ask_id)
        if "denied" in answer:
            raise self._denied(str(answer["denied"]))
        if "error" in answer:
            raise CredentialUnavailable(str(answer["error"]))
        return str(answer["token"]), int(answer["expires_on"])

    def _answer(self, ask_id: int) -> Dict[str, Any]:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            line, sep, rest = self._pending.partition(b"\n")
            if sep:
                self._pending = rest
                answer = json.loads(line)
                if answer.get("id") == ask_id:
                    return answer
                continue  # an answer to an ask given up on
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise CredentialUnavailable(
                    f"the daemon did not answer a token request within {ANSWER_TIMEOUT_S:.0f}s")
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise CredentialUnavailable("the daemon closed the token channel")
            self._pending += chunk
            if len(self._pending) > ANSWER_LIMIT:
                raise CredentialUnavailable("the daemon's answer is too long")


class AsyncDaemonCredential:
    """The same credential for Azure's asynchronous clients (``azure.*.aio``): azure-core's
    ``AsyncTokenCredential`` and ``AsyncSupportsTokenInfo`` protocols. Each request to the
    daemon runs in the event loop's default executor, so a slow first token (the daemon's
    identity asking Entra ID) never blocks the loop."""

    def __init__(self, credential: DaemonCredential) -> None:
        self._credential = credential

    def __repr__(self) -> str:
        return f"Async{self._credential!r}"

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import asyncio
        import functools

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, functools.partial(method, *args, **kwargs))

    async def get_token(self, *scopes: str, claims: Optional[str] = None,
                        tenant_id: Optional[str] = None, enable_cae: bool = False,
                        **kwargs: Any) -> AccessToken:
        return await self._call(self._credential.get_token, *scopes)

    async def get_token_info(self, *scopes: str, options: Optional[Dict[str, Any]] = None
                             ) -> AccessTokenInfo:
        return await self._call(self._credential.get_token_info, *scopes)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "AsyncDaemonCredential":
        return self

    async def __aexit__(self, *args: Any) -> None:
        pass
