"""Processes: start times from /proc, liveness, pidfd waits and signals, and running commands.

Two rules from the reference and from measurement on the project's machines live here:

* A pid alone is never trusted: it is paired with the start time (field 22 of
  ``/proc/PID/stat``) read when we first saw it, and every later check compares both, so a
  recycled pid is never mistaken for ours. Signals go through a pidfd opened *before* the start
  time is re-checked, which closes the window between check and kill.
* Waiting for a child never uses ``subprocess.run(timeout=...)`` or ``Popen.wait(timeout)``:
  CPython polls ``waitpid`` with growing sleeps there, which can double a 35 ms runtime call.
  We wait on a pidfd with ``select.poll`` instead, which wakes the moment the process exits.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    CommandError,
    CommandTimeoutError,
    NotFoundError,
    NotInitializedError,
)

START_TIME_FIELD = 22  # field of /proc/PID/stat that holds the start time (clock ticks since boot)
_DRAIN_GRACE_SECONDS = 1.0  # how long to keep reading pipes a grandchild may still hold open


def parse_stat(text: str) -> Tuple[str, str]:
    """Return (state letter, start time) from the text of a ``/proc/PID/stat`` file.

    The command name (field 2) is in parentheses and may itself contain spaces and ``)``, so the
    fields are counted from the *last* ``)``. Any shortfall is ``NotFoundError``.
    """
    end = text.rfind(")")
    if end < 0:
        raise NotFoundError("container process not found: no ')' in stat data")
    fields = text[end + 1:].split()
    index = START_TIME_FIELD - 3  # fields[0] is field 3 (state)
    if len(fields) <= index:
        raise NotFoundError("container process not found: stat data has only {} fields".format(len(fields) + 2))
    return fields[0], fields[index]


def start_time_from_file(path: str) -> str:
    """The start time recorded in a ``/proc/PID/stat``-formatted file (the reference's GetPidStartTimeFromFile)."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        raise NotFoundError("container process not found: {}".format(exc)) from exc
    return parse_stat(text)[1]


def read_stat(pid: int) -> Tuple[str, str]:
    """(state, start time) of a live pid; ``NotFoundError`` when it does not exist."""
    if pid <= 0:
        raise NotInitializedError()
    try:
        with open("/proc/{}/stat".format(pid), "r", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        raise NotFoundError("container process not found: {}".format(exc)) from exc
    return parse_stat(text)


def start_time(pid: int) -> str:
    """The start time of ``pid`` as the string the kernel prints."""
    return read_stat(pid)[1]


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as (pid, start time): the only safe handle on a process we did not spawn ourselves."""

    pid: int
    start_time: str

    @classmethod
    def of(cls, pid: int) -> "ProcessIdentity":
        """Capture the identity of a running pid now."""
        return cls(pid, start_time(pid))

    def verify(self) -> None:
        """Raise ``NotFoundError`` unless this exact process still runs (a zombie counts as gone)."""
        if self.pid <= 0 or not self.start_time:
            raise NotInitializedError()
        state, started = read_stat(self.pid)
        if started != self.start_time:
            raise NotFoundError("container process not found: PID wrap may have occurred "
                                "(pid {} started at {}, expected {})".format(self.pid, started, self.start_time))
        if state in ("Z", "X"):
            raise NotFoundError("container process not found: pid {} has exited".format(self.pid))

    def is_alive(self) -> bool:
        """True while this exact process runs."""
        try:
            self.verify()
        except (NotFoundError, NotInitializedError):
            return False
        return True

    def signal(self, signum: int) -> bool:
        """Send ``signum`` if and only if this is still our process. Returns False when it is gone.

        The pidfd is opened first and the start time checked after: from then on the pidfd names
        this process even if the pid is recycled, so the signal cannot reach a stranger.
        """
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return False
        try:
            if not self.is_alive():
                return False
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                return False
            return True
        finally:
            os.close(pidfd)

    def wait_gone(self, timeout: Optional[float]) -> bool:
        """Wait until the process exits (or is found already gone); False if ``timeout`` passed first."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        try:
            if not self.is_alive():
                return True
            return wait_fd_readable(pidfd, timeout)
        finally:
            os.close(pidfd)


def wait_fd_readable(fd: int, timeout: Optional[float]) -> bool:
    """Block until ``fd`` is readable or ``timeout`` seconds pass (None: forever). True if readable."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    while True:
        remaining_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        try:
            if poller.poll(remaining_ms):
                return True
        except InterruptedError:
            continue
        if deadline is not None and time.monotonic() >= deadline:
            return False


def read_pid_file(path: str) -> int:
    """Read a pid written by conmon or a runtime (decimal, maybe without a newline)."""
    with open(path, "r", encoding="ascii") as handle:
        text = handle.read().strip()
    try:
        pid = int(text)
    except ValueError as exc:
        raise ValueError("pid file {} does not hold a pid: {!r}".format(path, text[:40])) from exc
    if pid <= 0:
        raise ValueError("pid file {} holds an invalid pid {}".format(path, pid))
    return pid


@dataclass
class CompletedCommand:
    """What a finished command printed and how it ended."""

    argv: List[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float


def run_command(argv: Sequence[str], *, input_data: Optional[bytes] = None, timeout: Optional[float] = None,
                env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None, check: bool = True,
                pass_fds: Sequence[int] = ()) -> CompletedCommand:
    """Run ``argv`` to completion, feeding ``input_data`` and capturing both output streams.

    The wait is a pidfd wait, so the call returns as soon as the process exits. On ``timeout``
    the command's whole process group is killed and ``CommandTimeoutError`` raised. With
    ``check`` a non-zero exit raises ``CommandError`` carrying the command line and output.
    """
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - argv list, never a shell
        list(argv), stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env) if env is not None else None,
        cwd=cwd, start_new_session=True, pass_fds=tuple(pass_fds))
    try:
        stdout, stderr, timed_out = _communicate(proc, input_data, timeout)
    except BaseException:
        _kill_group(proc)
        raise
    result = CompletedCommand(list(argv), proc.returncode, stdout, stderr, time.monotonic() - started)
    if timed_out:
        raise CommandTimeoutError(argv, -1, stdout, stderr,
                                  message="`{}` timed out after {:.1f} s".format(" ".join(argv), timeout))
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stdout, stderr)
    return result


def _communicate(proc: "subprocess.Popen[bytes]", input_data: Optional[bytes],
                 timeout: Optional[float]) -> Tuple[bytes, bytes, bool]:
    """Pump stdin/stdout/stderr and wait on a pidfd; returns (stdout, stderr, timed_out)."""
    pidfd = os.pidfd_open(proc.pid)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: Dict[int, List[bytes]] = {out_fd: [], err_fd: []}
    open_readers = set(chunks)
    pending = memoryview(input_data or b"")
    writer = proc.stdin.fileno() if proc.stdin else None
    poller = select.poll()
    for fd in open_readers:
        poller.register(fd, select.POLLIN)
    if writer is not None:
        if pending:
            os.set_blocking(writer, False)
            poller.register(writer, select.POLLOUT)
        else:
            proc.stdin.close()
            writer = None
    poller.register(pidfd, select.POLLIN)
    deadline = None if timeout is None else time.monotonic() + timeout
    exited_at: Optional[float] = None
    try:
        while open_readers or writer is not None or exited_at is None:
            now = time.monotonic()
            if exited_at is None and deadline is not None and now >= deadline:
                _kill_group(proc)
                return _joined(chunks, out_fd), _joined(chunks, err_fd), True
            if exited_at is not None and now - exited_at > _DRAIN_GRACE_SECONDS:
                break  # a grandchild keeps a pipe open: the command itself is done
            wait_ms = _poll_wait_ms(now, deadline, exited_at)
            for fd, events in poller.poll(wait_ms):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    proc.wait()
                    exited_at = time.monotonic()
                elif fd == writer:
                    pending, writer = _feed(poller, proc, pending, events)
                elif fd in open_readers:
                    data = os.read(fd, 65536)
                    if data:
                        chunks[fd].append(data)
                    else:
                        poller.unregister(fd)
                        open_readers.discard(fd)
            if exited_at is not None and writer is not None:
                poller.unregister(writer)
                proc.stdin.close()
                writer = None
    finally:
        os.close(pidfd)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
    return _joined(chunks, out_fd), _joined(chunks, err_fd), False


def _poll_wait_ms(now: float, deadline: Optional[float], exited_at: Optional[float]) -> Optional[int]:
    """How long the next poll may block, in ms (None: no limit)."""
    limits = []
    if exited_at is None and deadline is not None:
        limits.append(deadline - now)
    if exited_at is not None:
        limits.append(exited_at + _DRAIN_GRACE_SECONDS - now)
    if not limits:
        return None
    return max(0, int(min(limits) * 1000) + 1)


def _feed(poller: "select.poll", proc: "subprocess.Popen[bytes]", pending: memoryview,
          events: int) -> Tuple[memoryview, Optional[int]]:
    """Write the next piece of stdin; close it when done or when the reader went away."""
    writer = proc.stdin.fileno()
    if events & (select.POLLERR | select.POLLHUP):
        pending = pending[len(pending):]
    else:
        try:
            written = os.write(writer, pending[:65536])
            pending = pending[written:]
        except BrokenPipeError:
            pending = pending[len(pending):]
        except BlockingIOError:
            return pending, writer
    if pending:
        return pending, writer
    poller.unregister(writer)
    proc.stdin.close()
    return pending, None


def _joined(chunks: Dict[int, List[bytes]], fd: int) -> bytes:
    return b"".join(chunks.get(fd, []))


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    """Kill a command we started in its own session, and reap it."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
    proc.wait()


def wait_child(proc: "subprocess.Popen[bytes]", timeout: Optional[float]) -> Optional[int]:
    """Wait for a child started with Popen through a pidfd; its exit code, or None on timeout."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        if not wait_fd_readable(pidfd, timeout):
            return None
    finally:
        os.close(pidfd)
    return proc.wait()
