"""Shared helpers for the testbed scripts (build-image, vm, run-matrix).

The testbed runs on the CI controller, never on a managed node, so it only needs the
controller's Python (3.11 on Debian 12) and the standard library. Everything that waits on a
child process waits on a pidfd, so a wait can also watch a deadline without a polling loop of
growing sleeps, and every child is started in its own process group so that an interrupted run
can take the whole tree (debootstrap -> dpkg -> maintainer scripts, or qemu) down with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

TESTBED_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = "/var/cache/daemonless-oci/testbed"
DEFAULT_STATE = "/var/tmp/daemonless-oci-testbed"


class TestbedError(Exception):
    """A failure the user can act on; the scripts print its message and exit 1."""


class Interrupted(TestbedError):
    """Raised from the SIGINT/SIGTERM handler so that `finally` blocks clean up."""


def cache_dir() -> Path:
    """Image cache; outside the repository so a fresh clone reuses earlier builds."""
    return Path(os.environ.get("TB_CACHE", DEFAULT_CACHE))


def state_dir() -> Path:
    """Per-VM run directories (overlay, key, serial log); on disk, because overlays grow."""
    return Path(os.environ.get("TB_STATE", DEFAULT_STATE))


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays machine-readable (--json)."""
    sys.stderr.write("[testbed %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def install_signal_handlers() -> None:
    """Turn SIGINT/SIGTERM into an exception so every `finally` block runs its cleanup."""

    def _raise(signum: int, _frame: object) -> None:
        # Ignore further signals while cleaning up: a second Ctrl-C must not cut a cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted("interrupted by %s" % signal.Signals(signum).name)

    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


def wait_pidfd(pidfd: int, timeout: Optional[float]) -> bool:
    """Wait until the process behind pidfd exits or timeout passes; True when it exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return bool(poller.poll(ms))


def open_pidfd(pid: int) -> Optional[int]:
    """A pidfd for pid, or None when the process is already gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def proc_start_time(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat: with the pid it names one process instance for good."""
    try:
        data = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the fields after the last ')' do not.
    return int(data.rsplit(")", 1)[1].split()[19])


def kill_process(pid: int, start_time: Optional[int], grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL pid, but only if it is still the process that we started."""
    if start_time is None or proc_start_time(pid) != start_time:
        return
    pidfd = open_pidfd(pid)
    if pidfd is None:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not wait_pidfd(pidfd, grace):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            wait_pidfd(pidfd, grace)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def run(argv: Sequence[str], logf: Optional[IO[str]] = None, cwd: Optional[str] = None,
        env: Optional[dict] = None, capture: bool = False) -> str:
    """Run argv to completion in its own process group; raise TestbedError on failure.

    The group matters on interruption: killing only debootstrap would leave its dpkg running
    inside a rootfs that we are about to delete.
    """
    out = subprocess.PIPE if capture else (logf if logf is not None else None)
    proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT if logf or capture else None,
                            cwd=cwd, env=env, start_new_session=True, text=True)
    try:
        output, _unused = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        detail = ""
        if capture and output:
            detail = ":\n" + output.strip()[-2000:]
        elif logf is not None and getattr(logf, "name", None):
            detail = " (see %s)" % logf.name
        raise TestbedError("command failed with exit %d: %s%s" % (proc.returncode, " ".join(argv), detail))
    return output or ""


def run_child_script(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """Run another testbed script, stdout captured, stderr passed through (its progress).

    On our own interruption the child gets SIGTERM, not SIGKILL, so that it can run its own
    cleanup (a half-built image, a half-booted VM) before we return.
    """
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True)
    try:
        output, _unused = proc.communicate()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, output, None)


def remove_tree(path: Path) -> None:
    """Delete a directory tree without ever crossing into a mount below it.

    An interrupted debootstrap can leave proc/sysfs mounted inside the rootfs: unmount them
    (lazily, deepest first) and let rm stay on one file system as a second guard.
    """
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    mounts = []
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        for line in fh:
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix):
                mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a (serial or build) log, for error messages."""
    try:
        data = path.read_bytes()[-65536:].decode("utf-8", "replace")
    except OSError as exc:
        return "(cannot read %s: %s)" % (path, exc)
    # Serial consoles emit CR and terminal escapes; keep the text readable in a CI log.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.replace("\r", ""))
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on path: two builds of one image must not race."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            log("waiting for the lock %s (another build is running)" % path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
