"""Drive every job outcome on purpose, for the daemon's tests and for operators.

Each action provokes one behaviour the daemon must handle — a result, a retryable failure, a
permanent failure, a timeout, a memory limit, a crash, oversized output — so that a deployment
can be checked end to end without writing a faulty worker. The handler itself never logs or
prints except when asked to, so that tests can count exactly what an action produced.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from hybrid_worker import InvalidInput

Params = dict[str, Any]

_MIB = 1024 * 1024
_PAGE = 4096
# `print` writes lines of this many bytes (newline included): readable, and easy to cap.
_LINE_BYTES = 80
_CHUNK_LINES = 1024
# Upper bounds on sizes and durations: far beyond any job's limits, yet small enough that Python
# itself never overflows (which would surface as a retryable error instead of InvalidInput).
_MAX_SECONDS = 86_400
_MAX_MB = 1 << 20
_MAX_BYTES = 1 << 40
_MAX_KB = 1 << 30
_MAX_LINES = 1_000_000_000


def run(input: Any, ctx: Any) -> Any:
    """Entry point: dispatch on input["action"]; see README.md for every action."""
    if not isinstance(input, dict):
        raise InvalidInput(f"input must be a JSON object with an action; {_valid_actions()}")
    action = input.get("action")
    if not isinstance(action, str) or action not in _ACTIONS:
        raise InvalidInput(f"input.action must name an action; {_valid_actions()}")
    handler, allowed = _ACTIONS[action]
    unknown = sorted(set(input) - {"action", *allowed})
    if unknown:
        expected = ", ".join(allowed) if allowed else "none"
        raise InvalidInput(
            f"unknown field(s) {', '.join(map(repr, unknown))} for action {action!r}; "
            f"its fields: {expected}"
        )
    return handler(input, ctx)


def _echo(params: Params, ctx: Any) -> Any:
    if "value" not in params:
        raise InvalidInput("action 'echo' needs input.value (any JSON value)")
    return {"echo": params["value"]}


def _sleep(params: Params, ctx: Any) -> Any:
    """Sleep past the deadline to test timeouts; ignore_sigterm tests the escalation to SIGKILL."""
    seconds = _seconds(params, "sleep")
    ignore_sigterm = params.get("ignore_sigterm", False)
    if not isinstance(ignore_sigterm, bool):
        raise InvalidInput("input.ignore_sigterm must be true or false")
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return {"slept": params["seconds"]}


def _fail(params: Params, ctx: Any) -> NoReturn:
    raise RuntimeError(_message(params, "diagnostics: requested failure"))


def _flaky(params: Params, ctx: Any) -> Any:
    """Fail (retryably) on the first `failures` attempts, then echo: retries, seen from outside."""
    failures = _count(params, "failures", 100)
    if ctx.attempt <= failures:
        raise RuntimeError(f"diagnostics: flaky failure on attempt {ctx.attempt} of {failures}")
    return {"echo": params.get("value"), "attempt": ctx.attempt}


def _invalid(params: Params, ctx: Any) -> NoReturn:
    raise InvalidInput(_message(params, "diagnostics: requested invalid input"))


def _print(params: Params, ctx: Any) -> Any:
    """Write exactly N bytes of ASCII lines, to test output capture and its cap."""
    total = _count(params, "bytes", _MAX_BYTES)
    stream_name = params.get("stream", "stdout")
    if stream_name not in ("stdout", "stderr"):
        raise InvalidInput('input.stream must be "stdout" or "stderr"')
    stream = sys.stdout if stream_name == "stdout" else sys.stderr
    chunk = ("x" * (_LINE_BYTES - 1) + "\n") * _CHUNK_LINES
    remaining = total
    while remaining > 0:
        part = chunk[: min(remaining, len(chunk))]
        stream.write(part)
        remaining -= len(part)
    stream.flush()
    return {"printed": total}


def _alloc(params: Params, ctx: Any) -> Any:
    """Allocate and touch every page, so the memory is resident rather than merely reserved."""
    mb = _count(params, "mb", _MAX_MB)
    buffer = bytearray(mb * _MIB)
    buffer[::_PAGE] = b"\x01" * len(range(0, len(buffer), _PAGE))
    return {"allocated_mb": mb}


def _signal(params: Params, ctx: Any) -> Any:
    """Send a signal to this process; a fatal one ends it without a result (a crash)."""
    name = params.get("signal")
    if not isinstance(name, str) or name not in signal.Signals.__members__:
        raise InvalidInput(
            'input.signal must be a signal name such as "SIGKILL", "SIGSEGV" or "SIGABRT"'
        )
    os.kill(os.getpid(), signal.Signals[name])
    # Reached only for a signal whose default action does not end the process (e.g. SIGCHLD).
    return {"signal": name, "survived": True}


def _exit(params: Params, ctx: Any) -> NoReturn:
    """Exit at once, skipping the result: the daemon must report it as a crash."""
    code = _count(params, "code", 255)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _env(params: Params, ctx: Any) -> Any:
    """Show the job's environment, to check that none of the daemon's secrets reach Python."""
    return {"env": dict(os.environ)}


def _log(params: Params, ctx: Any) -> Any:
    """Log N lines, alternating info and warning, to test the log bridge and its levels."""
    lines = _count(params, "lines", _MAX_LINES)
    for number in range(1, lines + 1):
        log = ctx.logger.info if number % 2 else ctx.logger.warning
        log("diagnostics log line %d of %d", number, lines)
    return {"logged": lines}


def _result(params: Params, ctx: Any) -> Any:
    """Return a bare string of exactly N KiB, to test the result size limit."""
    return "x" * (_count(params, "kb", _MAX_KB) * 1024)


def _cwd(params: Params, ctx: Any) -> Any:
    """Write into the working directory, to check it is private, writable and starts empty."""
    with open("diagnostics-probe.txt", "w", encoding="utf-8") as probe:
        probe.write(f"written by job {ctx.job_id}\n")
    return {"cwd": os.getcwd(), "files": sorted(os.listdir("."))}


def _files(params: Params, ctx: Any) -> Any:
    """Read the job's input file (its input_blob) and, with `copy`, write it back as an artifact,
    to check the claim-check path end to end: the hash says whether the bytes arrived intact."""
    copy = params.get("copy", False)
    if not isinstance(copy, bool):
        raise InvalidInput("input.copy must be true or false")
    path = getattr(ctx, "input_path", None)
    if path is None:
        return {"input_path": None, "bytes": 0, "sha256": None, "copied": False}
    digest = hashlib.sha256()
    size = 0
    out = open(os.path.join(ctx.output_dir, "copy.bin"), "wb") if copy else None
    try:
        with open(path, "rb") as source:
            while chunk := source.read(_MIB):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
    finally:
        if out is not None:
            out.close()
    return {"input_path": path, "bytes": size, "sha256": digest.hexdigest(), "copied": copy}


def _context(params: Params, ctx: Any) -> Any:
    return {
        "job_id": ctx.job_id,
        "attempt": ctx.attempt,
        "correlation_id": ctx.correlation_id,
        "deadline": ctx.deadline,
        "remaining_s": ctx.remaining(),
    }


# Job ids this process has served. A fresh process per job (spawn, or a fork of a warm parent
# that never runs jobs) always reports an empty list: nothing of a job survives it.
_SERVED: list[str] = []


def _process(params: Params, ctx: Any) -> Any:
    """Where the job runs, and what earlier jobs left in this interpreter."""
    earlier = list(_SERVED)
    _SERVED.append(ctx.job_id)
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
            "uid": os.getuid(), "euid": os.geteuid(), "earlier_jobs": earlier}


def _spin(params: Params, ctx: Any) -> Any:
    """Burn CPU rather than sleep, to test the CPU-time limit and timeouts of a busy process.
    Counts CPU time, not wall time, so that a busy machine cannot make it burn less."""
    seconds = _seconds(params, "spin")
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return {"spun": params["seconds"]}


def _seconds(params: Params, action: str) -> float:
    seconds = params.get("seconds")
    if (
        isinstance(seconds, (int, float))
        and not isinstance(seconds, bool)
        and 0 <= seconds <= _MAX_SECONDS  # also rejects NaN, which Python's json module accepts
    ):
        return float(seconds)
    raise InvalidInput(f"action {action!r} needs input.seconds, a number from 0 to {_MAX_SECONDS}")


def _count(params: Params, name: str, maximum: int) -> int:
    value = params.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    raise InvalidInput(f"input.{name} must be an integer from 0 to {maximum}")


def _message(params: Params, default: str) -> str:
    message = params.get("message", default)
    if not isinstance(message, str):
        raise InvalidInput("input.message must be a string")
    return message


def _valid_actions() -> str:
    return f"valid actions: {', '.join(_ACTIONS)}"


# action -> (handler, the input fields it accepts besides "action")
_ACTIONS: dict[str, tuple[Callable[[Params, Any], Any], tuple[str, ...]]] = {
    "echo": (_echo, ("value",)),
    "sleep": (_sleep, ("seconds", "ignore_sigterm")),
    "fail": (_fail, ("message",)),
    "flaky": (_flaky, ("failures", "value")),
    "invalid": (_invalid, ("message",)),
    "print": (_print, ("bytes", "stream")),
    "alloc": (_alloc, ("mb",)),
    "signal": (_signal, ("signal",)),
    "exit": (_exit, ("code",)),
    "env": (_env, ()),
    "log": (_log, ("lines",)),
    "result": (_result, ("kb",)),
    "cwd": (_cwd, ()),
    "files": (_files, ("copy",)),
    "context": (_context, ()),
    "spin": (_spin, ("seconds",)),
    "process": (_process, ()),
}
