"""The per-container monitor of the ``vm`` runtime type: what conmon is on the ``oci`` path.

A module is a short-lived process, but a shim v2 container needs a reader on its stdout/stderr
FIFOs for its whole life (a full pipe blocks the container), a reader on the shim's ``log`` FIFO,
and someone who is there when the task exits to record the exit code (spec 3.1, 3.5). So the
library starts this small process, detached (own session, stdio on /dev/null, double fork so it
is nobody's child), once the task exists. It:

* writes the container's output to the CRI log in conmon's k8s-file format (spec 2.7): one
  timestamp per read chunk of at most 8192 bytes, local time with 9 fractional digits and a
  numeric offset, ``F`` for a line ended by its newline, ``P`` (plus an added newline) for the
  rest of a chunk; the same ``--log-size-max`` truncation; ``reopen`` on request (log rotation,
  which the reference's VM path ignores);
* calls ``Wait`` on the task and, once the output is drained (bounded), writes the exit status
  to the container's persist-dir ``exit`` file exactly like conmon (decimal, atomic rename), so
  the status code of both runtime types reads the same file;
* reports its own (pid, start time) to the library, which stores it where conmon's identity
  goes, so a killed monitor is noticed like a dead conmon;
* keeps the shim's log lines in a small file next to its state (the last 1 MiB);
* exits when the shim is gone (its log FIFO hangs up) and the output is drained, or on ``quit``
  from its control FIFO (the library's delete).

The library half (``prespawn``/``PendingMonitor.start``, ``send``, ``library_root``) is at the
end. The monitor runs from a real directory: the library's own checkout when it is imported
from one, otherwise the copy that ``selfinstall`` keeps under the persist root (a module's
AnsiballZ zip vanishes when it exits). Every module the monitor needs is imported at start,
before the library is told it is ready. Its interpreter is started before the shim, so its
start-up overlaps the shim's; configuration and fds follow on a socket (``SCM_RIGHTS``).
"""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity, wait_child
from ansible_collections.daemonless.oci.plugins.module_utils.shim import ExitResponse, TaskClient
from ansible_collections.daemonless.oci.plugins.module_utils.ttrpc import TtrpcError

READ_CHUNK = 8192              # conmon's read size: one log timestamp per chunk
DRAIN_SECONDS = 2.0            # after the task exited, how long output may still arrive before the exit file
SHIM_LOG_LIMIT = 1 << 20       # the shim's own log is kept to its last MiB
READY_TIMEOUT = 20.0
CONTROL_LINE_LIMIT = 256
BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from ansible_collections.daemonless.oci.plugins.module_utils import vm_monitor; "
             "sys.exit(vm_monitor.main(sys.argv[2:]))")


class MonitorError(OciError):
    """The monitor could not be started or did not answer."""


# ---------------------------------------------------------------------------------------------
# The CRI log format (pure)
# ---------------------------------------------------------------------------------------------

def cri_timestamp(time_ns: int, gmtoff: Optional[int] = None) -> str:
    """``2021-01-02T03:04:05.123456789+01:00``: local time, 9 digits, numeric offset (never ``Z``)."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    local = time.localtime(seconds)
    offset = local.tm_gmtoff if gmtoff is None else gmtoff
    if gmtoff is not None:
        local = time.gmtime(seconds + gmtoff)
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return "{}.{:09d}{}{:02d}:{:02d}".format(time.strftime("%Y-%m-%dT%H:%M:%S", local), nanos, sign, hours, minutes)


def cri_records(stream: str, chunk: bytes, timestamp: str) -> bytes:
    """The log records for one read chunk, as conmon writes them.

    Every newline closes an ``F`` record; bytes after the last newline become a ``P`` record to
    which a newline is added (it is not part of the output). Concatenating the contents, with
    that one added newline dropped from each ``P``, gives back the chunk exactly.
    """
    prefix = "{} {} ".format(timestamp, stream).encode("ascii")
    records = []
    start = 0
    while start < len(chunk):
        end = chunk.find(b"\n", start)
        if end < 0:
            records.append(prefix + b"P " + chunk[start:] + b"\n")
            break
        records.append(prefix + b"F " + chunk[start:end + 1])
        start = end + 1
    return b"".join(records)


class CriLog:
    """The container's log file: append records, truncate at ``size_max``, reopen on request."""

    def __init__(self, path: str, size_max: int = -1) -> None:
        self.path = path
        self.size_max = size_max
        self.fd = -1
        self.size = 0
        self.open()

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size

    def reopen(self) -> None:
        """Start an empty file: ``<log>.tmp`` created truncated and renamed over the log (conmon's way)."""
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.rename(temporary, self.path)
        os.close(self.fd)
        self.open()

    def write(self, stream: str, chunk: bytes, time_ns: Optional[int] = None) -> None:
        data = cri_records(stream, chunk, cri_timestamp(time.time_ns() if time_ns is None else time_ns))
        if self.size_max > 0 and self.size + len(data) > self.size_max:
            self.reopen()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_control(buffer: bytes) -> Tuple[List[str], bytes]:
    """Complete command lines from the control FIFO, and the unfinished rest (bounded)."""
    *lines, rest = buffer.split(b"\n")
    if len(rest) > CONTROL_LINE_LIMIT:
        rest = b""
    return [line.decode("ascii", "replace").strip() for line in lines if line.strip()], rest


def write_exit_file(path: str, exit_status: int) -> None:
    """conmon's exit file: the decimal status, renamed into place (its ctime is the exit time)."""
    directory = os.path.dirname(path)
    temporary = os.path.join(directory, ".exit.{}.tmp".format(os.getpid()))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, str(int(exit_status)).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, path)


# ---------------------------------------------------------------------------------------------
# The monitor process
# ---------------------------------------------------------------------------------------------

@dataclass
class MonitorConfig:
    """Everything the monitor needs, passed as JSON on its command line (nothing secret in it)."""

    container_id: str
    namespace: str
    address: str
    log_path: str
    log_size_max: int
    exit_file: str
    control_fifo: str
    shim_log_file: str
    identity_file: str
    stdout_fd: int = -1
    stderr_fd: int = -1
    stdin_fd: int = -1
    shim_log_fd: int = -1
    extra: Dict[str, Any] = field(default_factory=dict)

    FD_FIELDS = ("stdout_fd", "stderr_fd", "stdin_fd", "shim_log_fd")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MonitorConfig":
        return cls(**json.loads(text))

    def as_message(self) -> Tuple[bytes, List[int]]:
        """The JSON with each fd replaced by its index in the list of fds sent alongside."""
        fds: List[int] = []
        document = asdict(self)
        for name in self.FD_FIELDS:
            if document[name] >= 0:
                fds.append(document[name])
                document[name] = len(fds) - 1
        return json.dumps(document, sort_keys=True).encode("utf-8"), fds

    @classmethod
    def from_message(cls, data: bytes, fds: List[int]) -> "MonitorConfig":
        """Inverse of ``as_message`` on the receiving side (indexes -> the fds received)."""
        config = cls.from_json(data.decode("utf-8"))
        for name in cls.FD_FIELDS:
            index = getattr(config, name)
            setattr(config, name, fds[index] if 0 <= index < len(fds) else -1)
        return config


class _Waiter:
    """``Wait`` on the task in a thread; wakes the main loop through a pipe when it returns."""

    def __init__(self, task: TaskClient, container_id: str) -> None:
        self.result: Optional[ExitResponse] = None
        self.error: Optional[BaseException] = None
        self.done = False
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._task = task
        self._id = container_id
        threading.Thread(target=self._run, name="task-wait", daemon=True).start()

    def _run(self) -> None:
        try:
            self.result = self._task.wait(self._id)
        except (TtrpcError, OciError) as exc:
            self.error = exc
        self.done = True
        os.write(self.wake_w, b"x")


class Monitor:
    """The event loop: FIFOs in, log and exit file out."""

    def __init__(self, config: MonitorConfig, task: TaskClient) -> None:
        self.config = config
        self.log = CriLog(config.log_path, config.log_size_max)
        pairs = ((config.stdout_fd, "stdout"), (config.stderr_fd, "stderr"))
        self.streams: Dict[int, str] = {fd: name for fd, name in pairs if fd >= 0}
        self.control_fd = os.open(config.control_fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.control_buffer = b""
        self.waiter = _Waiter(task, config.container_id)
        self.shim_log_fd = config.shim_log_fd
        self.exit_written = False
        self.drain_deadline: Optional[float] = None
        self.quit = False
        self.poller = select.poll()
        for fd in list(self.streams) + [self.control_fd, self.waiter.wake_r] + \
                ([self.shim_log_fd] if self.shim_log_fd >= 0 else []):
            self.poller.register(fd, select.POLLIN)

    def run(self) -> None:
        while not self._finished():
            for fd, _events in self.poller.poll(self._poll_ms()):
                self._service(fd)
            self._maybe_write_exit()

    def _finished(self) -> bool:
        if self.quit:
            return True
        shim_gone = self.shim_log_fd < 0
        return shim_gone and self.waiter.done and not self.streams and (self.exit_written or
                                                                        self.waiter.result is None)

    def _poll_ms(self) -> Optional[int]:
        if self.drain_deadline is None or self.exit_written:
            return None
        return max(0, int((self.drain_deadline - time.monotonic()) * 1000) + 1)

    def _service(self, fd: int) -> None:
        if fd in self.streams:
            self._read_stream(fd)
        elif fd == self.shim_log_fd:
            self._read_shim_log()
        elif fd == self.control_fd:
            self._read_control()
        elif fd == self.waiter.wake_r:
            os.read(fd, 16)
            self.poller.unregister(fd)
            if self.waiter.result is not None:
                self.drain_deadline = time.monotonic() + DRAIN_SECONDS

    def _read_stream(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            try:
                self.log.write(self.streams[fd], data)
            except OSError:
                pass  # a full disk or a removed directory must not kill the reader: the container would block
            return
        self.poller.unregister(fd)
        os.close(fd)
        del self.streams[fd]

    def _read_shim_log(self) -> None:
        try:
            data = os.read(self.shim_log_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.poller.unregister(self.shim_log_fd)
            os.close(self.shim_log_fd)
            self.shim_log_fd = -1
            return
        _append_capped(self.config.shim_log_file, data)

    def _read_control(self) -> None:
        try:
            self.control_buffer += os.read(self.control_fd, 4096)
        except BlockingIOError:
            return
        commands, self.control_buffer = parse_control(self.control_buffer)
        for command in commands:
            if command == "reopen":
                try:
                    self.log.reopen()
                except OSError:
                    pass  # the log's directory is gone (container removed): keep reading the FIFOs
            elif command == "quit":
                self.quit = True

    def _maybe_write_exit(self) -> None:
        result = self.waiter.result
        if result is None or self.exit_written or self.drain_deadline is None:
            return  # no exit yet, done, or the waiter's wake-up not seen yet (the drain starts there)
        if self.streams and time.monotonic() < self.drain_deadline:
            return
        try:
            write_exit_file(self.config.exit_file, result.exit_status)
        except OSError:
            pass  # the container was removed meanwhile
        self.exit_written = True


def _append_capped(path: str, data: bytes) -> None:
    try:
        if os.path.getsize(path) + len(data) > SHIM_LOG_LIMIT:
            os.truncate(path, 0)
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, data[-SHIM_LOG_LIMIT:])
    finally:
        os.close(fd)


def _report(sock: socket.socket, document: Dict[str, Any]) -> None:
    try:
        sock.sendall(json.dumps(document).encode("utf-8"))
    except OSError:
        pass


def _daemonize() -> None:
    """Second fork: the first process exits at once, so the monitor is nobody's child."""
    if os.fork() != 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    if devnull > 2:
        os.close(devnull)
    os.chdir("/")
    os.umask(0o077)


def main(argv: List[str]) -> int:
    """Entry point of the monitor process: ``--socket FD``.

    Started before the shim (its interpreter start-up overlaps the shim's), it daemonizes, then
    waits for its configuration and fds on the socket; EOF there means the create was given up.
    """
    sock = socket.socket(fileno=int(argv[argv.index("--socket") + 1]))
    _daemonize()
    try:
        data, fds, _flags, _address = socket.recv_fds(sock, 65536, 8)
        if not data:
            return 0
        config = MonitorConfig.from_message(data, fds)
        task = TaskClient.dial(config.address, config.namespace, dial_timeout=10.0, call_timeout=30.0)
        monitor = Monitor(config, task)
        me = ProcessIdentity.of(os.getpid())
        with open(config.identity_file + ".tmp", "w", encoding="utf-8") as handle:
            json.dump({"pid": me.pid, "start_time": me.start_time}, handle)
        os.rename(config.identity_file + ".tmp", config.identity_file)
    except BaseException as exc:  # noqa: BLE001 - the library must hear why we could not start
        _report(sock, {"error": "{}: {}".format(type(exc).__name__, exc)})
        return 1
    _report(sock, {"pid": me.pid, "start_time": me.start_time})
    sock.close()
    monitor.run()
    monitor.log.close()
    os._exit(0)  # skip interpreter teardown (the task-wait and ttrpc threads): delete waits for our exit


# ---------------------------------------------------------------------------------------------
# The library side
# ---------------------------------------------------------------------------------------------

def library_root(persist_root: str, use_checkout: bool = True) -> str:
    """A directory the monitor can import this package from after the caller exits.

    When this file lives in a real ``.../ansible_collections/daemonless/oci/...`` tree (a
    checkout, an installed collection) that tree's root is used. Otherwise (a module's zip) the
    loaded sources are copied under the persist root by ``selfinstall`` (only when they changed).
    """
    here = os.path.abspath(__file__)
    root = here
    for _level in range(6):  # .../<root>/ansible_collections/daemonless/oci/plugins/module_utils/vm_monitor.py
        root = os.path.dirname(root)
    if use_checkout and os.path.isfile(here) and os.path.isdir(os.path.join(root, "ansible_collections")):
        return root
    from ansible_collections.daemonless.oci.plugins.module_utils import selfinstall
    sources = selfinstall.collect_sources()
    if "vm_monitor.py" not in sources:
        raise MonitorError("cannot install the vm monitor: the source of vm_monitor.py is not readable")
    if selfinstall.needs_install(persist_root, sources):
        selfinstall.install(persist_root, sources)
    return selfinstall.library_root(persist_root)


class PendingMonitor:
    """A monitor process started ahead of time, waiting for its configuration.

    ``prespawn`` runs the interpreter while the library starts the shim; ``start`` sends the
    configuration and fds (``SCM_RIGHTS``) and returns the daemon's identity once it runs;
    ``cancel`` gives it up (the daemon sees EOF and exits). The caller keeps its fd copies.
    """

    def __init__(self, process: "subprocess.Popen[bytes]", sock: socket.socket) -> None:
        self.process = process
        self.sock = sock

    def start(self, config: MonitorConfig, timeout: float = READY_TIMEOUT) -> ProcessIdentity:
        deadline = time.monotonic() + timeout
        data, fds = config.as_message()
        try:
            socket.send_fds(self.sock, [data], fds)
            self._reap(deadline)
            report = _read_report(self.sock, max(0.1, deadline - time.monotonic()))
        except OSError as exc:
            raise MonitorError("the vm monitor went away before it started: {}".format(exc)) from exc
        finally:
            self.cancel()
        if "error" in report or not isinstance(report.get("pid"), int):
            raise MonitorError("the vm monitor failed to start: {}".format(report.get("error", report)))
        return ProcessIdentity(report["pid"], str(report.get("start_time", "")))

    def _reap(self, deadline: float) -> None:
        """The first process exits right after its fork (pidfd wait)."""
        code = wait_child(self.process, max(0.1, deadline - time.monotonic()))
        errors = self.process.stderr.read(4096).decode("utf-8", "replace").strip() if code is not None else ""
        if code is None:
            raise MonitorError("the vm monitor did not start within {:.0f} s".format(READY_TIMEOUT))
        if code != 0:
            raise MonitorError("the vm monitor exited with status {}: {}".format(code, errors or "no message"))

    def cancel(self) -> None:
        """Close our end (a waiting daemon exits) and reap the first process. Safe to call twice."""
        self.sock.close()
        if self.process.returncode is None:
            if wait_child(self.process, 10.0) is None:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def prespawn(root: str) -> PendingMonitor:
    """Start a monitor interpreter from ``root`` (see ``library_root``), detached, not yet configured."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    argv = [sys.executable, "-I", "-S", "-c", BOOTSTRAP, root, "--socket", str(child.fileno())]
    try:
        process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(child.fileno(),), start_new_session=True, cwd="/",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return PendingMonitor(process, parent)


def _read_report(sock: socket.socket, timeout: float) -> Dict[str, Any]:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if not poller.poll(int(timeout * 1000) + 1):
        raise MonitorError("the vm monitor did not report within {:.0f} s".format(timeout))
    data = sock.recv(65536)
    if not data:
        return {"error": "the monitor exited without a word"}
    try:
        report = json.loads(data.decode("utf-8"))
    except ValueError:
        report = {"error": "unreadable report {!r}".format(data[:200])}
    return report if isinstance(report, dict) else {"error": repr(report)}


def send(control_fifo: str, command: str) -> bool:
    """Write a command line to a monitor's control FIFO; False when no monitor reads it."""
    try:
        fd = os.open(control_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, command.encode("ascii") + b"\n")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def read_identity(identity_file: str) -> Optional[ProcessIdentity]:
    """The identity the monitor recorded for itself, or None."""
    try:
        with open(identity_file, "r", encoding="utf-8") as handle:
            document = json.load(handle)
        return ProcessIdentity(int(document["pid"]), str(document["start_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
