"""The runtime a hybrid-worker handler imports as ``hybrid_worker``.

It ships inside the daemon (never from PyPI), so a handler's behaviour cannot change because of
an unpinned package. A handler is ``def run(input, ctx)`` returning JSON-serialisable output.

Raise :class:`InvalidInput` (or another :class:`PermanentError`) when retrying cannot help: the
job is answered and dead-lettered at once. Any other exception is retried with backoff up to the
worker's ``max_attempts``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from hybrid_worker._tokens import AsyncDaemonCredential, CredentialUnavailable

__all__ = ["Context", "CredentialUnavailable", "InvalidInput", "PermanentError", "PolicyDenied"]


class PermanentError(Exception):
    """A failure that another attempt cannot fix: the job is dead-lettered at once."""


class InvalidInput(PermanentError):
    """The input does not fit what the handler accepts. Say which field and what was expected."""


class PolicyDenied(PermanentError):
    """The worker's policy does not allow this: a secret or an Azure scope it does not declare
    in ``worker.toml``. Unhandled, the job fails with the error kind ``PolicyDenied``."""


class Context:
    """What a handler knows about the job it runs."""

    __slots__ = ("job_id", "attempt", "deadline", "correlation_id", "worker", "logger",
                 "input_path", "output_dir", "_secrets", "_credential")

    def __init__(
        self,
        job_id: str,
        attempt: int,
        deadline: float,
        correlation_id: Optional[str],
        worker: str,
        logger: logging.Logger,
        input_path: Optional[str] = None,
        output_dir: Optional[str] = None,
        secrets: Optional[Dict[str, str]] = None,
        credential: Any = None,
    ) -> None:
        #: The job's id (the Service Bus MessageId of the job message).
        self.job_id = job_id
        #: 1 for the first run of the job, 2 for its first retry, and so on.
        self.attempt = attempt
        #: Unix time after which the job is stopped.
        self.deadline = deadline
        #: The flow's CorrelationId, if it set one.
        self.correlation_id = correlation_id
        #: The worker's name.
        self.worker = worker
        #: Lines logged here reach the daemon's structured log with the job's ids.
        self.logger = logger
        #: The local path of the job's ``input_blob``, fetched by the daemon before the job
        #: started (read-only); ``None`` when the job names none.
        self.input_path = input_path
        #: A folder for files to hand back: each file written directly in it is uploaded as
        #: ``<results container>/<job id>/<file name>`` and listed in the reply's ``artifacts``
        #: (where the daemon has Blob Storage; ``exec --output-dir`` copies them locally).
        self.output_dir = output_dir
        self._secrets = dict(secrets or {})
        self._credential = credential

    def secret(self, name: str) -> str:
        """The value of secret ``name``, one the worker declares in ``worker.toml``'s
        ``secrets`` (read by the daemon at this job's start). The daemon replaces it by
        ``[redacted:<name>]`` wherever it appears in what the job sends back."""
        try:
            return self._secrets[name]
        except (KeyError, TypeError):
            raise PolicyDenied(
                f"secret {name!r} is not declared in worker.toml's secrets "
                f"(declared: {sorted(self._secrets)})") from None

    def credential(self) -> Any:
        """A credential for Azure's Python SDKs (azure-core's ``TokenCredential`` and
        ``SupportsTokenInfo`` protocols): tokens come from the daemon's identity, for the
        scopes the worker declares in ``azure_scopes``; another scope raises
        :class:`PolicyDenied`."""
        return self._credential

    def async_credential(self) -> Any:
        """:meth:`credential` for Azure's asynchronous clients (``azure.*.aio``): azure-core's
        ``AsyncTokenCredential`` and ``AsyncSupportsTokenInfo`` protocols."""
        return AsyncDaemonCredential(self._credential)

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.time())

    def __repr__(self) -> str:
        return f"Context(job_id={self.job_id!r}, attempt={self.attempt}, worker={self.worker!r})"
