"""conmon: its command lines, the sync and start pipes, and the files it leaves behind.

conmon is the per-container supervisor of the ``oci`` path: it runs the runtime's ``create``,
stays as the container's parent (a subreaper), writes the CRI log, and records the exit code.
Its contract (flags, pipe protocol, files) is section 2 of the behaviour spec; the functions
here are the only place that knows it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.config import MIN_CONMON_VERSION
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ConfigError, ConmonError, InvalidStateError
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command

SYNC_MESSAGE_LIMIT = 1 << 20  # conmon's messages are a line of JSON; anything bigger is garbage
RESIZE_EVENT = 1
REOPEN_LOGS_EVENT = 2
_VERSION = re.compile(r"conmon version (\d+)\.(\d+)\.(\d+)")


def conmon_version(conmon: str) -> Tuple[int, int, int]:
    """Parse ``conmon --version`` (third word, semver)."""
    result = run_command([conmon, "--version"], timeout=30)
    match = _VERSION.search(result.stdout.decode("utf-8", "replace"))
    if not match:
        raise ConfigError("cannot parse the version of conmon {} from {!r}".format(conmon, result.stdout[:80]))
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def require_supported_version(conmon: str, cache_dir: str) -> None:
    """Refuse conmons older than 2.0.21, whose exec timeout could kill every process on the host.

    The answer is cached in ``cache_dir`` under the binary's identity (inode, size, mtime), so
    only the first create after conmon changes pays for running it.
    """
    try:
        info = os.stat(conmon)
    except OSError as exc:
        raise ConfigError("conmon {} is missing: {}".format(conmon, exc)) from exc
    key = "conmon-ok-{}-{}-{}".format(info.st_ino, info.st_size, info.st_mtime_ns)
    marker = os.path.join(cache_dir, key)
    if os.path.exists(marker):
        return
    version = conmon_version(conmon)
    if version < MIN_CONMON_VERSION:
        raise ConfigError("conmon {} is version {}; at least {} is required".format(
            conmon, ".".join(map(str, version)), ".".join(map(str, MIN_CONMON_VERSION))))
    with open(marker, "w", encoding="ascii") as handle:
        handle.write(".".join(map(str, version)))


@dataclass
class CreateOptions:
    """Everything conmon's create command line is made of."""

    conmon: str
    container_id: str
    name: str
    bundle: str
    runtime_path: str
    runtime_root: str
    runtime_args: List[str]
    exits_dir: str
    persist_dir: str
    socket_dir: str
    log_path: str
    log_level: str = "error"
    log_size_max: int = -1
    systemd_cgroup: bool = False
    terminal: bool = False
    stdin: bool = False
    stdin_once: bool = False

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, "pidfile")

    @property
    def conmon_pid_file(self) -> str:
        return os.path.join(self.bundle, "conmon-pidfile")


def create_argv(options: CreateOptions) -> List[str]:
    """conmon's argv for creating a container, flag for flag as in spec section 2.1."""
    argv = [options.conmon, "-b", options.bundle, "-c", options.container_id, "--exit-dir", options.exits_dir,
            "-l", "k8s-file:" + options.log_path, "--log-level", options.log_level, "-n", options.name,
            "-P", options.conmon_pid_file, "-p", options.pid_file, "--persist-dir", options.persist_dir,
            "-r", options.runtime_path, "--runtime-arg", "--root=" + options.runtime_root]
    for argument in options.runtime_args:
        argv += ["--runtime-arg", argument]
    argv += ["--socket-dir-path", options.socket_dir, "-u", options.container_id]
    argv.append("-s" if options.systemd_cgroup else "--syslog")
    if options.log_size_max >= 0:
        argv += ["--log-size-max", str(options.log_size_max)]
    if options.terminal:
        argv.append("-t")
    elif options.stdin:
        if not options.stdin_once:
            argv.append("--leave-stdin-open")
        argv.append("-i")
    return argv


@dataclass
class SpawnedConmon:
    """A conmon just started for create: blocked on the start pipe until ``release``."""

    process: "subprocess.Popen[bytes]"
    sync: socket.socket
    start: socket.socket
    stderr_path: str

    def release(self) -> None:
        """Write the one byte that lets conmon go on (after it was moved into its cgroup)."""
        self.start.sendall(b"\0")
        self.start.close()

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, "rb") as handle:
                return handle.read(8192).decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def close(self) -> None:
        for sock in (self.sync, self.start):
            try:
                sock.close()
            except OSError:
                pass


def spawn_for_create(argv: List[str], env_list: List[str], cwd: str, stderr_path: str,
                     extra_env: Optional[Dict[str, str]] = None) -> SpawnedConmon:
    """Start conmon with the sync and start socket pairs, in its own session, cwd = bundle.

    conmon's environment is exactly ``conmon_env`` plus the two pipe numbers (and
    XDG_RUNTIME_DIR when set): nothing else of ours reaches it. The descriptor numbers exported
    are the ones the child really has (``pass_fds`` keeps the parent's numbers).
    """
    sync_parent, sync_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    start_parent, start_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(item.split("=", 1) for item in env_list if "=" in item)
    env.update(extra_env or {})
    env["_OCI_SYNCPIPE"] = str(sync_child.fileno())
    env["_OCI_STARTPIPE"] = str(start_child.fileno())
    if os.environ.get("XDG_RUNTIME_DIR"):
        env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
    try:
        with open(stderr_path, "wb") as stderr:
            os.fchmod(stderr.fileno(), 0o600)
            process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
                argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env, cwd=cwd,
                pass_fds=(sync_child.fileno(), start_child.fileno()), start_new_session=True)
    except BaseException:
        for sock in (sync_parent, sync_child, start_parent, start_child):
            sock.close()
        raise
    sync_child.close()
    start_child.close()
    return SpawnedConmon(process, sync_parent, start_parent, stderr_path)


def read_sync_message(sock: socket.socket, timeout: float) -> Dict[str, Any]:
    """Read exactly one JSON line from conmon's sync pipe (never until EOF: conmon keeps it open).

    Raises ConmonError on EOF (conmon died without a word), on garbage, and TimeoutError when
    nothing complete arrived within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("conmon sent no message within {:.0f} s".format(timeout))
        readable = select.select([sock], [], [], remaining)[0]
        if not readable:
            continue
        chunk = sock.recv(65536)
        if not chunk:
            if buffer.strip():
                break  # a last message without its newline
            raise ConmonError("error reading container (probably exited) json message: EOF")
        buffer += chunk
        if len(buffer) > SYNC_MESSAGE_LIMIT:
            raise ConmonError("conmon's sync message is larger than {} bytes".format(SYNC_MESSAGE_LIMIT))
    line = buffer.split(b"\n", 1)[0]
    try:
        message = json.loads(line.decode("utf-8", "replace"))
    except ValueError as exc:
        raise ConmonError("conmon sent an unreadable message {!r}: {}".format(line[:200], exc)) from exc
    if not isinstance(message, dict):
        raise ConmonError("conmon sent an unexpected message {!r}".format(line[:200]))
    return message


def read_exit_file(path: str, not_before: Optional[datetime] = None) -> Optional[Tuple[int, datetime]]:
    """(exit code, finished time) from conmon's exit file, or None when it does not exist yet.

    The finished time is the file's ctime: conmon renames the file into place at the exit. The
    kernel stamps ctime from a coarse clock (one timer tick, 4 ms at HZ=250), so a process that
    exits at once can look as if it finished before it started: ``not_before`` (the start time)
    is the earliest finished time reported.
    """
    try:
        with open(path, "r", encoding="ascii") as handle:
            text = handle.read().strip()
            ctime = os.fstat(handle.fileno()).st_ctime
    except FileNotFoundError:
        return None
    try:
        code = int(text)
    except ValueError as exc:
        raise ConmonError("status code conversion failed: exit file {} holds {!r}".format(path, text[:20])) from exc
    finished = datetime.fromtimestamp(ctime, timezone.utc)
    if not_before is not None and finished < not_before:
        finished = not_before
    return code, finished


def write_control(bundle: str, event: int, height: int = 0, width: int = 0) -> None:
    """Send ``"<event> <height> <width>\\n"`` on conmon's control FIFO.

    Opened non-blocking (the reference blocks forever when conmon is dead): ENXIO, no reader,
    means conmon is gone.
    """
    path = os.path.join(bundle, "ctl")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            raise InvalidStateError("container is not running (conmon's control FIFO {} has no reader)"
                                    .format(path)) from exc
        raise
    try:
        os.write(fd, "{} {} {}\n".format(event, height, width).encode("ascii"))
    finally:
        os.close(fd)
