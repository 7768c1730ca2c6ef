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

from hybrid_worker import Context, InvalidInput, PermanentError

JOB_FD = 3
CHANNEL_FD = 4
MESSAGE_LIMIT = 2000


def _send(channel, record: Dict[str, Any]) -> None:
    channel.write(json.dumps(record, allow_nan=False, separators=(",", ":")).encode() + b"\n")
    channel.flush()


class _ChannelHandler(logging.Handler):
    """Forwards the handler's log records to the daemon as structured lines."""

    def __init__(self, channel) -> None:
        super().__init__(logging.DEBUG)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send(
                self._channel,
                {"t": "log", "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()[:MESSAGE_LIMIT]},
            )
        except Exception:  # a broken log line must never fail the job
            self.handleError(record)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    message = f"{name}: {text}" if text else name
    return message[:MESSAGE_LIMIT]


def _error(channel, kind: str, message: str, permanent: bool, exc_type: str) -> None:
    _send(channel, {"t": "error", "kind": kind, "message": message,
                    "permanent": permanent, "type": exc_type})


def main() -> None:
    worker_dir, module_name, function_name = sys.argv[2], sys.argv[3], sys.argv[4]
    with os.fdopen(JOB_FD, "rb") as job_pipe:
        job = json.loads(job_pipe.read())
    channel = os.fdopen(CHANNEL_FD, "wb")

    root = logging.getLogger()
    root.handlers[:] = [_ChannelHandler(channel)]
    root.setLevel(logging.INFO)
    logger = logging.getLogger(f"worker.{job['worker']}")
    ctx = Context(job["job_id"], job["attempt"], job["deadline"], job.get("correlation_id"),
                  job["worker"], logger)

    try:
        module = importlib.import_module(module_name)
        handler = getattr(module, function_name)
    except Exception as exc:
        traceback.print_exc()
        _error(channel, "HandlerError",
               f"cannot load entrypoint {module_name}:{function_name}: {_describe(exc)}",
               True, type(exc).__name__)
        return

    try:
        output = handler(job["input"], ctx)
    except InvalidInput as exc:
        # The kind already says what happened; the message is the handler's explanation.
        message = str(exc).strip()[:MESSAGE_LIMIT] or "the handler rejected the input"
        _error(channel, "InvalidInput", message, True, type(exc).__name__)
        return
    except PermanentError as exc:
        traceback.print_exc()
        _error(channel, "HandlerError", _describe(exc), True, type(exc).__name__)
        return
    except MemoryError as exc:
        _error(channel, "MemoryLimit", "the handler ran out of memory (MemoryError)", True,
               type(exc).__name__)
        return
    except Exception as exc:
        traceback.print_exc()
        _error(channel, "HandlerError", _describe(exc), False, type(exc).__name__)
        return

    try:
        _send(channel, {"t": "result", "output": output})
    except (TypeError, ValueError) as exc:
        _error(channel, "HandlerError",
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
