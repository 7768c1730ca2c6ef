"""The warm parent of fork mode: imports a worker's handler once, then forks one child per job.

The daemon starts ``python -I -B -c <stub> RUNTIME_DIR WORKER_DIR MODULE FUNCTION PRELOAD_JSON``
exactly as it starts a job in spawn mode (same interpreter, same clean environment, same sandbox
applied before exec, except that its seccomp filter still allows ``setpgid``), with a Unix
SOCK_SEQPACKET control socket on file descriptor 3. Messages are JSON, one per packet.

daemon -> parent
    ``{"t": "init", "filters": HEX, "cgroup": BOOL}``  the job's seccomp filters, installed by
        every child[, with the `cgroup.procs` of the first spare child's cgroup]
    ``{"t": "fork", "id": N, "cwd": DIR, "env": {...}, "landlock": BOOL, "cgroup": BOOL}``
        with descriptors (job in, channel out, stdout, stderr[, Landlock ruleset][, the
        `cgroup.procs` of the next spare child's cgroup]) passed by SCM_RIGHTS
    ``{"t": "kill", "id": N, "sig": S}``  signal the job's whole process group
parent -> daemon
    ``{"t": "ready", "pid", "preloaded", "failed", "threads"}`` (``threads``: the names of the
        Python threads beside the main one once the imports are done),
    ``{"t": "started", "id": N, "pid": P}``,
    ``{"t": "exited", "id": N, "code", "signal", "cpu_ms", "max_rss_kb"}``,
    ``{"t": "failed", "id": N, "error": TEXT}`` (the fork itself failed)

The parent never reads a job's input and never runs a handler: a child does, then leaves with
``os._exit`` (it never returns into this loop). To keep the fork off a job's path the parent
keeps one spare child, forked ahead: it has already left the parent's process group and
installed the job's seccomp layer, and waits on a socket of its own for one job's message and
descriptors. When a job comes the parent hands it to the spare and forks the next spare. A
child still runs exactly one job and has never seen another's: a spare holds no job data until
its own arrives. The parent reaps each child with ``wait4`` (the
only call that reports its CPU time and peak memory) after killing what is left of its process
group, and it alone signals its children, so a signal can never reach a reused process group id.
When the daemon closes the socket (it retired this parent, or died) the parent kills its
children and exits.
"""

from __future__ import annotations

import array
import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import tempfile

# Imported here, once, so that no child pays for the runtime's own imports (json, logging), or
# for `tempfile` (with shutil, random, bz2, lzma: ~5 ms), which each child resets below.
from hybrid_worker import _bootstrap

CONTROL_FD = 3
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SYS_LANDLOCK_RESTRICT_SELF = 446  # the same number on every architecture Linux added it to
MAX_PACKET = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _parse_filters(blob: bytes):
    """Splits `seccomp::to_bytes` output into (instruction count, buffer) pairs, made before any
    fork so that a child only makes system calls."""
    filters, at = [], 0
    while at < len(blob):
        (count,) = struct.unpack_from("<I", blob, at)
        at += 4
        body = blob[at:at + 8 * count]
        at += 8 * count
        filters.append((count, ctypes.create_string_buffer(body, len(body))))
    return filters


def _send(ctl: socket.socket, record) -> None:
    ctl.send(json.dumps(record, separators=(",", ":")).encode())


def _close_all_but(keep: int) -> None:
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)


def _spare(sock: socket.socket, cgroup_fd, filters, parent_pid: int, argv) -> None:
    """In a spare child: enter the cgroup of the job it will run, leave the parent's group, take
    the job's seccomp layer, then wait for one job and become it. Never returns; any failure
    before the job runs exits with code 71 (a spare whose parent closed its socket exits with
    0)."""
    try:
        if cgroup_fd is not None:
            # First of all, before anything could fork. The daemon opened the file, so the
            # kernel checks the move against its credentials, not this uid's.
            os.write(cgroup_fd, b"0")
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setpgid(0, 0)
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        if os.getppid() != parent_pid:  # the parent died before the line above
            os._exit(71)
        for count, buf in filters:
            prog = _SockFprog(count, ctypes.addressof(buf))
            _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
                   "prctl(SECCOMP)")
        # The parent's control socket and everything else it held: only this spare's socket
        # stays open until the job's descriptors arrive.
        _close_all_but(sock.fileno())
        data, fds, _, _ = socket.recv_fds(sock, MAX_PACKET, 8)
        if not data:
            os._exit(0)
        message = json.loads(data)
        ruleset = fds[4] if message.get("landlock") else None
        job_in, channel, out, err = fds[:4]
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.dup2(job_in, 3)
        os.dup2(channel, 4)
        if ruleset is not None:
            _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
        # This socket, the ruleset and the job's original descriptors: none stays open.
        os.closerange(5, 1 << 16)
        os.chdir(message["cwd"])
        _set_environ(message["env"])
        tempfile.tempdir = None  # a preloaded module may have cached the parent's folder
        if "numpy" in sys.modules:  # its global generator is not reseeded at fork
            try:
                sys.modules["numpy"].random.seed()
            except Exception:
                pass
        sys.argv = argv
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(71)
    _bootstrap.run()  # ends with os._exit
    os._exit(70)


def _set_environ(env) -> None:
    """Makes the environment exactly `env`. The parent's is the same allow-list but for the
    job's own variables, so only those change (`os.environ.clear()` then `update()` unset and
    set every variable: ~0.4 ms of a job of 2)."""
    for key in [k for k in os.environ if k not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


class _Spares:
    """The spare child (forked ahead, waiting for its job) and what the parent needs to know
    about it."""

    def __init__(self, filters, parent_pid: int, argv) -> None:
        self.filters = filters
        self.parent_pid = parent_pid
        self.argv = argv
        self.pid = 0
        self.sock = None
        # The `cgroup.procs` of the cgroup the next spare enters (the daemon's job cgroups).
        self.cgroup_fd = None

    def fork(self) -> None:
        """Forks a new spare unless one is waiting; an OSError (no memory, process limit) is
        left to the caller."""
        if self.pid:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            ours.close()
            _spare(theirs, self.cgroup_fd, self.filters, self.parent_pid, self.argv)
        theirs.close()
        try:
            os.setpgid(pid, pid)  # also in the child: whichever runs first
        except OSError:
            pass
        self.pid, self.sock = pid, ours

    def next_cgroup(self, fd) -> None:
        """The cgroup for spares forked from now on (the one taken over by a job is closed)."""
        if self.cgroup_fd is not None:
            os.close(self.cgroup_fd)
        self.cgroup_fd = fd

    def take(self, data: bytes, fds) -> int:
        """Hands one job to the spare (forking one first if none waits, into the same cgroup)
        and returns its pid."""
        for _ in range(2):
            self.fork()
            pid, sock = self.pid, self.sock
            self.pid, self.sock = 0, None
            try:
                socket.send_fds(sock, [data], fds)
                return pid
            except OSError:  # the spare died before its job came: try a fresh one
                continue
            finally:
                sock.close()
        raise OSError("the spare child died before it took the job")

    def gone(self, pid: int) -> bool:
        """Forgets the spare if `pid` was it (it died waiting)."""
        if pid and pid == self.pid:
            self.sock.close()
            self.pid, self.sock = 0, None
            return True
        return False

    def stop(self) -> None:
        if self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass


def _reap(pid: int):
    """Kills what is left of the exited child's group while its zombie still holds the group
    id, then reaps it with its resource usage."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    _, status, usage = os.wait4(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    cpu_ms = int((usage.ru_utime + usage.ru_stime) * 1000)
    return code, sig, cpu_ms, int(usage.ru_maxrss)


def _reap_before_exit(limit_s: float = 2.0) -> None:
    """Reaps the killed children (and the orphans this subreaper inherited) before the parent
    leaves, so that none is handed to init as a zombie that still counts against the uid's
    process limit until init gets to it."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


def _reap_all(ctl: socket.socket, children, spares) -> None:
    """Reaps every exited process: a job's child (reported to the daemon), or an orphan of a
    job that the kernel handed to this subreaper (so that no zombie keeps counting against the
    uid's process limit until init gets to it)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no child at all
            return
        if info is None or info.si_pid == 0:
            return
        pid = info.si_pid
        job_id = children.pop(pid, None)
        if job_id is None:
            spares.gone(pid)
            os.waitpid(pid, 0)
            continue
        code, sig, cpu_ms, rss = _reap(pid)
        _send(ctl, {"t": "exited", "id": job_id, "code": code, "signal": sig,
                    "cpu_ms": cpu_ms, "max_rss_kb": rss})


def serve() -> None:
    runtime_dir, worker_dir, module_name, function_name, preload = sys.argv[1:6]
    ctl = socket.socket(fileno=CONTROL_FD)
    preloaded, failed = [], []
    for name in [module_name] + json.loads(preload):
        try:
            importlib.import_module(name)
            preloaded.append(name)
        except Exception:
            # The child imports it again and reports the failure as the job's, as spawn does.
            traceback.print_exc()
            failed.append(name)
    sys.stdout.flush()
    sys.stderr.flush()
    # What every child would otherwise do first: the entry point's look-up and the root
    # logger's handler (inert in this process).
    _bootstrap.preload(module_name, function_name)
    _bootstrap.install_logging()
    # Everything imported so far is moved out of the collector's reach: a child's collections
    # then never touch (and so never copy) the parent's pages.
    gc.collect()
    gc.freeze()
    me = os.getpid()
    argv = ["-c", runtime_dir, worker_dir, module_name, function_name]
    spares = _Spares([], me, argv)
    # Orphans of a job (its helpers, once the job's child died) come here rather than to
    # init, and are reaped at once.
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    # A fork copies only the thread that forks: a thread started by an import (a client's
    # background loop, a thread pool) is gone in every child, and any lock it held at the fork
    # stays held there. The daemon warns; these are the names Python knows.
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    _send(ctl, {"t": "ready", "pid": me, "preloaded": preloaded, "failed": failed,
                "threads": threads})
    children = {}  # pid -> job id
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    buffer = bytearray(MAX_PACKET)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_read:
                try:
                    while os.read(wake_read, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap_all(ctl, children, spares)
                continue
            data, fds = _receive(ctl, buffer)
            if not data:
                spares.stop()
                for pid in children:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
                _reap_before_exit()
                os._exit(0)
            message = json.loads(data)
            kind = message["t"]
            if kind == "init":
                spares.filters = _parse_filters(bytes.fromhex(message["filters"]))
                if message.get("cgroup") and fds:
                    spares.next_cgroup(fds[0])
                try:
                    spares.fork()
                except OSError:
                    pass  # tried again at the first job, which then reports the error
            elif kind == "kill":
                for pid, job_id in children.items():
                    if job_id == message["id"]:
                        try:
                            os.killpg(pid, message["sig"])
                        except OSError:
                            pass
            elif kind == "fork":
                next_cgroup = fds.pop() if message.get("cgroup") and fds else None
                try:
                    pid = spares.take(data, fds)
                except OSError as exc:
                    _send(ctl, {"t": "failed", "id": message["id"], "error": str(exc)})
                    continue
                finally:
                    for fd in fds:
                        os.close(fd)
                    if next_cgroup is not None:
                        spares.next_cgroup(next_cgroup)
                children[pid] = message["id"]
                _send(ctl, {"t": "started", "id": message["id"], "pid": pid})
                try:
                    spares.fork()  # the next job's, off this one's path
                except OSError:
                    pass  # tried again at the next job, which then reports the error
        # A SIGCHLD that arrived while a message was handled is in the wake-up pipe; this
        # also catches a child that exited before it was entered in `children`.
        _reap_all(ctl, children, spares)


def _receive(ctl: socket.socket, buffer: bytearray):
    """One packet and the descriptors passed with it, into a buffer reused for every packet
    (`socket.recv_fds` would allocate, and map, a fresh megabyte per message)."""
    size, ancillary, flags, _ = ctl.recvmsg_into([buffer], socket.CMSG_SPACE(8 * 4))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError("a control message was larger than the parent accepts")
    return bytes(buffer[:size]), list(fds)
