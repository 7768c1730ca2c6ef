"""Runs one job in this process: the daemon's side of the pipe protocol.

The daemon starts ``python -I -c <stub> RUNTIME_DIR WORKER_DIR MODULE FUNCTION`` with the job on
file descriptor 3 and a channel back on file descriptor 4. The channel carries JSON lines: ``log``
records while the handler runs, then exactly one ``result`` or ``error``. Handler prints go to
stdout/stderr, which the daemon captures separately, so they can never corrupt the result.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from typing import Any, Dict

from hybrid_worker import Context, InvalidInput, PermanentError, PolicyDenied
from hybrid_worker._tokens import DaemonCredential

JOB_FD = 3
CHANNEL_FD = 4
MESSAGE_LIMIT = 2000


def _send(record: Dict[str, Any]) -> None:
    """Writes one line on the channel, straight to its descriptor: no file object (a warm
    child would copy every page such objects touch)."""
    line = memoryview(json.dumps(record, allow_nan=False, separators=(",", ":")).encode() + b"\n")
    while line:
        line = line[os.write(CHANNEL_FD, line):]


def _read_job() -> bytes:
    """The job document: one line. The daemon keeps the pipe open after it when the worker
    declares ``azure_scopes`` (token answers come on it), else closes it."""
    chunks = []
    while True:
        chunk = os.read(JOB_FD, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


class _ChannelHandler(logging.Handler):
    """Forwards the handler's log records to the daemon as structured lines. Inert until a job
    runs in this process (a warm parent installs it once for all its children)."""

    active = False

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.active:
            if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
                logging.lastResort.handle(record)
            return
        try:
            _send({"t": "log", "level": record.levelname, "logger": record.name,
                   "msg": record.getMessage()[:MESSAGE_LIMIT]})
        except Exception:  # a broken log line must never fail the job
            self.handleError(record)


def install_logging() -> None:
    """Sends the root logger's records (INFO and up) to the channel, and only there. A warm
    parent calls this once, after its imports, so that no child sets it up again."""
    global _logging_installed
    root = logging.getLogger()
    root.handlers[:] = [_ChannelHandler()]
    root.setLevel(logging.INFO)
    _logging_installed = True


_logging_installed = False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    message = f"{name}: {text}" if text else name
    return message[:MESSAGE_LIMIT]


def _error(kind: str, message: str, permanent: bool, exc_type: str) -> None:
    _send({"t": "error", "kind": kind, "message": message,
                    "permanent": permanent, "type": exc_type})


# The entry point a warm parent resolved before forking: (module, function) -> callable.
_preloaded: Dict[Any, Any] = {}


def preload(module_name: str, function_name: str) -> None:
    """Resolves the entry point once, in a warm parent (the import stays in `sys.modules`
    either way; a failure is left for the job to report, as spawn mode would)."""
    try:
        module = sys.modules[module_name]
        _preloaded[(module_name, function_name)] = getattr(module, function_name)
    except (KeyError, AttributeError):
        pass


def main() -> None:
    worker_dir, module_name, function_name = sys.argv[2], sys.argv[3], sys.argv[4]
    job = json.loads(_read_job())
    secrets = job.pop("secrets", None) or {}
    scopes = job.pop("azure_scopes", None) or []
    token_fd = JOB_FD if scopes else -1
    if not scopes:
        os.close(JOB_FD)
    credential = DaemonCredential(scopes, _send, token_fd, PolicyDenied)
    if not _logging_installed:
        install_logging()
    _ChannelHandler.active = True
    logger = logging.getLogger(f"worker.{job['worker']}")
    output_dir = job.get("output_dir")
    if output_dir:
        # Made by the job itself, so that it is the job user's to write.
        os.makedirs(output_dir, exist_ok=True)
    ctx = Context(job["job_id"], job["attempt"], job["deadline"], job.get("correlation_id"),
                  job["worker"], logger, job.get("input_path"), output_dir, secrets, credential)
    del secrets

    try:
        handler = _preloaded.get((module_name, function_name))
        if handler is None:
            handler = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:
        traceback.print_exc()
        _error("HandlerError",
               f"cannot load entrypoint {module_name}:{function_name}: {_describe(exc)}",
               True, type(exc).__name__)
        return

    try:
        output = handler(job["input"], ctx)
    except InvalidInput as exc:
        # The kind already says what happened; the message is the handler's explanation.
        message = str(exc).strip()[:MESSAGE_LIMIT] or "the handler rejected the input"
        _error("InvalidInput", message, True, type(exc).__name__)
        return
    except PolicyDenied as exc:
        traceback.print_exc()
        # The kind already says what happened; the message says which secret or scope.
        message = str(exc).strip()[:MESSAGE_LIMIT] or "the worker's policy does not allow this"
        _error("PolicyDenied", message, True, type(exc).__name__)
        return
    except PermanentError as exc:
        traceback.print_exc()
        _error("HandlerError", _describe(exc), True, type(exc).__name__)
        return
    except MemoryError as exc:
        _error("MemoryLimit", "the handler ran out of memory (MemoryError)", True,
               type(exc).__name__)
        return
    except Exception as exc:
        traceback.print_exc()
        _error("HandlerError", _describe(exc), False, type(exc).__name__)
        return

    try:
        _send({"t": "result", "output": output})
    except (TypeError, ValueError) as exc:
        _error("HandlerError",
               f"the handler's output is not JSON-serialisable: {_describe(exc)}", True,
               type(exc).__name__)


def run() -> None:
    """Entry point: run the job, flush, and leave without waiting for stray threads."""
    code = 0
    try:
        main()
    except BaseException:  # the protocol itself failed: the daemon sees no result
        traceback.print_exc()
        code = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)
