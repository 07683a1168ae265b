"""Exec in a running container: exec-sync with a hard timeout and an output cap, and streaming exec.

Two paths, chosen per call (the rule ``oci_exec`` documents):

* **conmon's exec mode** (the reference's ``ExecSyncContainer``, spec 2.6) for runc and crun
  without stdin. conmon is the exec'd process's subreaper, writes its output to a k8s-file log
  and reports the exit code on the sync pipe. It returns as soon as the *main* process exits:
  output that background children write later is dropped (spec row 15).
* **the runtime directly** (``runtime exec --process``, pidfd waits, our own reaping, process
  kill and output cap; spec row 20 allows it) when stdin is given (conmon's exec mode has no
  stdin) and always on runsc: there the exec'd process lives inside the sandbox, invisible to
  the host, and conmon's timeout kill hits conmon's own process group (runsc's waiter shares
  it) instead of the command. The runtime in the foreground copies the command's output until
  EOF, so this path returns when *every* holder of the output pipes is done: a background
  child (``sleep 300 &``) keeps it open, and the timeout is the backstop (spec row 15 lets us
  pick either rule per path, as long as it is documented).

Timeout rule: at ``timeout`` seconds we kill the exec's whole process tree ourselves: every
process in the container's pid namespace that belongs to the exec's session or process group
(runc makes the exec'd process a session leader; crun leaves it in the group of the runtime
process). Forks racing the kill are caught by re-scanning until a scan finds nothing. A process
that called ``setsid`` itself has left the exec on purpose (a daemon) and survives, as in the
reference. On runsc the tree inside the sandbox is found with ``runsc ps`` (parent links from
the exec'd process, whose sandbox pid ``--internal-pid-file`` gives) and killed with
``runsc kill --pid``. conmon's own ``-T`` is still passed, one second later than ours, as a
backstop that outlives this process. A timed-out exec *returns* ``exit_code=-1``,
``timed_out=True`` and stderr "command timed out" (spec row 1), it does not raise.

Output: stdout + stderr together are capped at ``output_limit`` bytes (16 MiB by default, spec
row 4); the rest is read and discarded (conmon: ``--log-size-max`` bounds the log on disk) and
``truncated`` says so. Temporary files live in a root-only directory under the container's
run directory, never in ``/tmp``, and are removed on every path (spec row 5).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ExecSyncError, OciError, \
    ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.impl import ExecSyncResponse
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import rootfs_path
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity, read_pid_file, wait_child

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024
TIMED_OUT_MESSAGE = "command timed out"
DRAIN_SECONDS = 0.25          # after a timeout kill, how long to read what is still buffered
CONMON_EXIT_WAIT = 10.0       # how long conmon may take to report after its command was killed
KILL_RESCAN_SECONDS = 5.0     # bound on the stop-and-rescan loop (it ends as soon as a scan finds nothing new)
KILL_SETTLE_SECONDS = 0.02    # after a kill round, time for forks that were in flight to become visible
STDIN_CHUNK = 65536
_NOT_FOUND_MARKERS = ("no such file or directory", "not found", "failed to load")
_NOT_EXECUTABLE_MARKERS = ("permission denied", "exec format error", "is a directory", "not executable",
                           "operation not permitted")


# options
@dataclass
class ExecOptions:
    """What a caller may change about the exec'd process, validated once."""

    env: Optional[Union[List[str], Dict[str, str]]] = None
    user: Optional[Union[str, int]] = None
    workdir: Optional[str] = None
    tty: Optional[bool] = None
    stdin: Optional[bytes] = None
    output_limit: int = DEFAULT_OUTPUT_LIMIT

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> "ExecOptions":
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValidationError("unknown exec options: {}".format(", ".join(sorted(unknown))))
        parsed = cls(**options)
        if parsed.output_limit is None:
            parsed.output_limit = DEFAULT_OUTPUT_LIMIT
        if int(parsed.output_limit) <= 0:
            raise ValidationError("output_limit must be positive, got {}".format(parsed.output_limit))
        parsed.output_limit = int(parsed.output_limit)
        if parsed.stdin is not None and not isinstance(parsed.stdin, (bytes, bytearray)):
            raise ValidationError("stdin must be bytes")
        if parsed.workdir is not None and not str(parsed.workdir).startswith("/"):
            raise ValidationError("workdir must be an absolute path inside the container, got {!r}".format(
                parsed.workdir))
        return parsed


def check_command(command: Sequence[str]) -> List[str]:
    """The reference rejects an empty command before anything runs; so do we, and non-strings too."""
    if not command or not all(isinstance(part, str) for part in command):
        raise ValidationError("exec needs a non-empty command made of strings, got {!r}".format(command))
    if any("\0" in part for part in command):
        raise ValidationError("exec command arguments cannot contain NUL bytes")
    return list(command)


# the process spec
def merge_env(base: Sequence[str], extra: Optional[Union[List[str], Dict[str, str]]]) -> List[str]:
    """The container's env with ``extra`` applied: same name replaces, new names are appended.

    Values are kept byte for byte (newlines and ``=`` included): the spec carries them as JSON.
    """
    items = list(extra.items()) if isinstance(extra, dict) else [_split_env(item) for item in (extra or [])]
    merged = {}
    order = []
    for entry in base:
        name, value = _split_env(entry)
        if name not in merged:
            order.append(name)
        merged[name] = value
    for name, value in items:
        if not name or "=" in name or "\0" in name:
            raise ValidationError("invalid environment variable name {!r}".format(name))
        if name not in merged:
            order.append(name)
        merged[name] = str(value)
    return ["{}={}".format(name, merged[name]) for name in order]


def _split_env(entry: str) -> Tuple[str, str]:
    name, _unused, value = str(entry).partition("=")
    return name, value


def resolve_user(rootfs: str, user: Union[str, int]) -> Dict[str, Any]:
    """``user``, ``uid``, ``user:group`` or ``uid:gid`` -> an OCI ``process.user``.

    Names are looked up in the container's own ``/etc/passwd`` and ``/etc/group`` (the host's
    mean nothing inside). A uid without a passwd entry gets gid 0, as container engines do.
    """
    text = str(user)
    name, _unused, group = text.partition(":")
    if not name:
        raise ValidationError("exec user must not be empty")
    passwd = _read_db(os.path.join(rootfs, "etc", "passwd"))
    if name.isdigit():
        uid = int(name)
        entry = next((row for row in passwd if row[2:3] == [name]), None)
        gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    else:
        entry = next((row for row in passwd if row and row[0] == name), None)
        if entry is None or len(entry) < 4 or not (entry[2].isdigit() and entry[3].isdigit()):
            raise ValidationError("user {!r} is not in the container's /etc/passwd".format(name))
        uid, gid = int(entry[2]), int(entry[3])
    if group:
        gid = _resolve_group(rootfs, group)
    return {"uid": uid, "gid": gid}


def _resolve_group(rootfs: str, group: str) -> int:
    if group.isdigit():
        return int(group)
    entry = next((row for row in _read_db(os.path.join(rootfs, "etc", "group")) if row and row[0] == group), None)
    if entry is None or len(entry) < 3 or not entry[2].isdigit():
        raise ValidationError("group {!r} is not in the container's /etc/group".format(group))
    return int(entry[2])


def _read_db(path: str) -> List[List[str]]:
    """Rows of a colon-separated database; a missing file is an empty one."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n").split(":") for line in handle if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def exec_process(container: Container, command: List[str], options: ExecOptions, terminal: bool,
                 console_size: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """The container's ``process`` with args replaced; everything else (caps, rlimits, labels) inherited.

    ``console_size`` (height, width) becomes ``consoleSize``: the runtime sizes the new console
    before the command starts, so its first look at the terminal already sees it.
    """
    spec = _bundle_spec(container)
    process = dict(spec.get("process") or {})
    process["args"] = list(command)
    process["terminal"] = bool(terminal)
    process.pop("consoleSize", None)
    if terminal and console_size:
        process["consoleSize"] = {"height": int(console_size[0]), "width": int(console_size[1])}
    process["env"] = merge_env(process.get("env") or [], options.env)
    if options.workdir:
        process["cwd"] = options.workdir
    if options.user is not None and str(options.user) != "":
        process["user"] = resolve_user(rootfs_path(spec, container.bundle_path), options.user)
    return process


def _bundle_spec(container: Container) -> Dict[str, Any]:
    """The spec the container runs with: its bundle's config.json (one read and parse, much cheaper
    than deep-copying the stored spec on every exec), else the stored spec."""
    try:
        with open(os.path.join(container.bundle_path, "config.json"), "r", encoding="utf-8") as handle:
            document = json.load(handle)
        if isinstance(document, dict):
            return document
    except (OSError, ValueError):
        pass
    return container.spec()


# the k8s-file log
class LogSplitter:
    """Split conmon's k8s-file log into stdout and stderr, keeping at most ``limit`` bytes in total.

    Fed in arbitrary chunks (records may straddle chunk boundaries). ``P`` records carry a
    newline conmon added, which is dropped, so the concatenation is the original byte stream.
    """

    def __init__(self, limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.stdout: List[bytes] = []
        self.stderr: List[bytes] = []
        self.size = 0
        self.truncated = False
        self.skipped = 0
        self._rest = b""

    def feed(self, data: bytes) -> None:
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            self._record(line + b"\n")

    def close(self) -> None:
        """A last record without its newline (conmon was killed mid-write) still counts."""
        if self._rest:
            self._record(self._rest)
            self._rest = b""

    def _record(self, line: bytes) -> None:
        parts = line.split(b" ", 3)
        if len(parts) < 4:
            self.skipped += 1
            return
        _unused, stream, tag, content = parts
        if tag == b"P" and content.endswith(b"\n"):
            content = content[:-1]
        target = {b"stdout": self.stdout, b"stderr": self.stderr}.get(stream)
        if target is None:
            self.skipped += 1
            return
        self._keep(target, content)

    def _keep(self, target: List[bytes], content: bytes) -> None:
        room = self.limit - self.size
        if len(content) > room:
            self.truncated = True
            content = content[:max(room, 0)]
        if content:
            target.append(content)
            self.size += len(content)

    def result(self) -> Tuple[bytes, bytes]:
        return b"".join(self.stdout), b"".join(self.stderr)


def parse_log(data: bytes, limit: int = DEFAULT_OUTPUT_LIMIT) -> Tuple[bytes, bytes]:
    """The reference's ``parseLog``: (stdout, stderr) of a whole k8s-file log."""
    splitter = LogSplitter(limit)
    splitter.feed(data)
    splitter.close()
    return splitter.result()


def read_log_fd(fd: int, limit: int) -> LogSplitter:
    """Read a log through an fd we opened before conmon ran, in bounded chunks."""
    splitter = LogSplitter(limit)
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        splitter.feed(chunk)
        if splitter.truncated:
            break
    splitter.close()
    return splitter


def log_size_max_for(limit: int) -> int:
    """conmon's ``--log-size-max``: room for ``limit`` payload bytes plus record headers, bounded.

    conmon *truncates* (reopens) the log when it would grow past this, so the file we read keeps
    the first part; our fd still points at the original file after the rename.
    """
    return max(4 * limit + (1 << 20), 65536)


# failures
def failure_response(message: str) -> ExecSyncResponse:
    """The runtime could not start the command: 127 when it is missing, 126 when not executable."""
    lowered = message.lower()
    if any(marker in lowered for marker in _NOT_EXECUTABLE_MARKERS):
        return ExecSyncResponse(stderr=message.encode("utf-8", "replace"), exit_code=126)
    if any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        return ExecSyncResponse(stderr=message.encode("utf-8", "replace"), exit_code=127)
    raise ExecSyncError(message.strip() or "the runtime failed to start the command")


def timed_out_response(stdout: bytes = b"", stderr: bytes = b"", truncated: bool = False) -> ExecSyncResponse:
    """The reference's answer to a timeout: a successful response with exit code -1."""
    text = stderr + (b"\n" if stderr and not stderr.endswith(b"\n") else b"") + TIMED_OUT_MESSAGE.encode("ascii")
    return ExecSyncResponse(stdout=stdout, stderr=text, exit_code=-1, timed_out=True, truncated=truncated)


# the workspace for temporary files
class ExecWorkspace:
    """One exec's process file, log and pid files, under a random name in a root-only directory.

    Files, not a directory per exec: a mkdir + rmdir per exec measurably slows the fast path.
    Every name this exec may create is removed on exit, whatever happened.
    """

    NAMES = ("process.json", "log", "pid", "sandbox-pid", "console")

    def __init__(self, exec_dir: str) -> None:
        self.exec_dir = exec_dir
        self.token = ""

    def __enter__(self) -> "ExecWorkspace":
        os.makedirs(self.exec_dir, mode=0o700, exist_ok=True)
        self.token = "exec-" + secrets.token_hex(8)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for name in self.NAMES:
            try:
                os.unlink(self.file(name))
            except FileNotFoundError:
                pass

    def file(self, name: str) -> str:
        return os.path.join(self.exec_dir, "{}.{}".format(self.token, name))

    def write_process(self, process: Dict[str, Any]) -> str:
        path = self.file("process.json")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(process, handle)
        except OSError as exc:
            raise ExecSyncError("cannot write the exec's process file in {}: {}".format(
                self.exec_dir, exc.strerror or exc)) from exc
        return path

    def create_log(self) -> int:
        """The log conmon appends to, created (and kept open) by us so a rotation cannot hide its start."""
        try:
            return os.open(self.file("log"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ExecSyncError("cannot create the exec's log in {}: {}".format(
                self.exec_dir, exc.strerror or exc)) from exc


# killing what an exec left
def _ns_inode(pid: int, kind: str = "pid") -> Optional[int]:
    try:
        return os.stat("/proc/{}/ns/{}".format(pid, kind)).st_ino
    except OSError:
        return None


def _stat_fields(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, pgrp, session) of a pid from /proc, or None when gone."""
    try:
        with open("/proc/{}/stat".format(pid), "r", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if len(fields) < 4:
        return None
    return fields[0], int(fields[2]), int(fields[3])


def processes_in_namespace(ns_inode: int) -> Iterator[Tuple[int, str, int, int]]:
    """(pid, state, pgrp, session) of every live process whose pid namespace is ``ns_inode``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if _ns_inode(pid) != ns_inode:
            continue
        fields = _stat_fields(pid)
        if fields is not None and fields[0] not in ("Z", "X"):
            yield (pid,) + fields


def pipe_holders(pids: Sequence[int], pipe_inodes: Set[int]) -> Set[int]:
    """Which of ``pids`` hold one of our output pipes open: the exec's leftovers, whatever their session."""
    wanted = {"pipe:[{}]".format(inode) for inode in pipe_inodes}
    holders = set()
    for pid in pids:
        directory = "/proc/{}/fd".format(pid)
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(os.path.join(directory, name)) in wanted:
                    holders.add(pid)
                    break
            except OSError:
                continue
    return holders


@dataclass
class _ExecTree:
    """What identifies an exec's processes inside the container: sessions/groups, pipe holders."""

    ns_inode: int
    init: ProcessIdentity
    groups: Set[int]
    pipe_inodes: Set[int]
    protected: Set[int]

    def victims(self) -> List[int]:
        inside = [entry for entry in processes_in_namespace(self.ns_inode) if entry[0] != self.init.pid]
        if self.pipe_inodes:
            for pid, _unused, pgrp, session in inside:
                if pid in pipe_holders([pid], self.pipe_inodes):
                    self.groups |= {pid} | ({pgrp, session} - self.protected)
        return [pid for pid, _unused, pgrp, session in inside
                if pid in self.groups or pgrp in self.groups or session in self.groups]


def kill_exec_tree(container: Container, exec_pid: Optional[int], extra_groups: Sequence[int] = (),
                   pipe_inodes: Sequence[int] = ()) -> int:
    """Kill every process of an exec inside the container; returns how many were killed.

    An exec's processes are those of its session or process group (runc makes the exec'd
    process a session leader; crun leaves it in a session led by a runtime process outside the
    namespace) and, after the main process is gone, whoever still holds our output pipes. Each
    is first stopped (a stopped process cannot fork), the namespace re-scanned until nothing new
    shows up, then all are killed. Only processes in the container's pid namespace are touched,
    never its init nor init's own group or session, and each signal goes through a
    start-time-checked pidfd (no bare group kill, whose number could be recycled).
    """
    try:
        init = container.state.init_process()
        init.verify()
    except OciError:
        return 0
    ns_inode = _ns_inode(init.pid)
    if ns_inode is None:
        return 0
    init_fields = _stat_fields(init.pid)
    protected = {0, 1, init.pid} | set(init_fields[1:] if init_fields else ())
    groups = {group for group in extra_groups if group > 1}
    if exec_pid:
        groups.add(exec_pid)
        fields = _stat_fields(exec_pid)
        if fields is not None and _ns_inode(exec_pid) == ns_inode:
            groups.update(fields[1:])
    tree = _ExecTree(ns_inode, init, groups - protected, set(pipe_inodes), protected)
    return _stop_then_kill(tree, exec_pid if exec_pid and _ns_inode(exec_pid) == ns_inode else None)


def _stop_then_kill(tree: _ExecTree, exec_pid: Optional[int]) -> int:
    """Stop the main process first (the usual forker), then every member until a scan finds none new."""
    stopped: Dict[int, ProcessIdentity] = {}
    main = _identity(exec_pid) if exec_pid else None
    if main is not None and main.signal(signal.SIGSTOP):
        stopped[main.pid] = main
    deadline = time.monotonic() + KILL_RESCAN_SECONDS
    killed = 0
    while time.monotonic() < deadline:
        _stop_members(tree, stopped, deadline)
        killed += sum(1 for identity in stopped.values() if identity.signal(signal.SIGKILL))
        stopped.clear()
        # A fork that was in flight when its parent stopped shows up only now: look once more.
        time.sleep(KILL_SETTLE_SECONDS)
        if not tree.victims():
            break
    return killed


def _stop_members(tree: _ExecTree, stopped: Dict[int, ProcessIdentity], deadline: float) -> None:
    """SIGSTOP every member (a stopped process cannot fork) until a scan finds none new."""
    while time.monotonic() < deadline:
        fresh = [pid for pid in tree.victims() if pid not in stopped]
        if not fresh:
            return
        for pid in fresh:
            identity = _identity(pid)
            if identity is not None and identity.signal(signal.SIGSTOP):
                stopped[pid] = identity


def _identity(pid: int) -> Optional[ProcessIdentity]:
    try:
        return ProcessIdentity.of(pid)
    except OciError:
        return None


def kill_sandbox_tree(rt: Any, container: Container, sandbox_pid: int) -> int:
    """runsc: kill the exec'd process and its descendants inside the sandbox by sandbox pid.

    The tree comes from ``runsc ps`` (PID and PPID columns). Every member is first stopped
    (SIGSTOP): a stopped process cannot fork, and does not exit, so its children keep their
    parent link. The listing is repeated until it shows no new descendant, then all are
    killed. Processes orphaned *before* the timeout (their parent had already exited) were
    re-parented to the sandbox's init and cannot be told apart from the container's own; they
    survive (``runsc ps`` shows no session or group). ``runsc ps`` also lists zombies, hence
    the set of pids already handled. The signals run in parallel: one ``runsc kill`` costs tens
    of milliseconds.
    """
    stopped: Set[int] = set()
    deadline = time.monotonic() + KILL_RESCAN_SECONDS
    while time.monotonic() < deadline:
        victims = _descendants(_sandbox_processes(rt, container), {sandbox_pid} | stopped) - stopped
        if not victims:
            break
        _signal_in_sandbox(rt, container, victims, "STOP")
        stopped |= victims
    _signal_in_sandbox(rt, container, stopped, "KILL")
    return len(stopped)


def _signal_in_sandbox(rt: Any, container: Container, pids: Set[int], signal_name: str) -> None:
    _run_parallel([rt.runtime_argv("kill", "--pid", str(pid), container.id, signal_name) for pid in sorted(pids)],
                  rt.runtime_env())


def _run_parallel(commands: List[List[str]], env: Dict[str, str], width: int = 32) -> None:
    """Run short commands ``width`` at a time, output discarded, each waited for on its pidfd."""
    for start in range(0, len(commands), width):
        running = [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,  # noqa: S603
                                    stderr=subprocess.DEVNULL, env=env, start_new_session=True)
                   for argv in commands[start:start + width]]
        for process in running:
            if wait_child(process, CONMON_EXIT_WAIT) is None:
                _kill_session(process)


def _sandbox_processes(rt: Any, container: Container) -> Dict[int, int]:
    """pid -> ppid from ``runsc ps``."""
    result = rt.run_runtime("ps", container.id, check=False)
    table: Dict[int, int] = {}
    for line in result.stdout.decode("utf-8", "replace").splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 3 and columns[1].isdigit() and columns[2].isdigit():
            table[int(columns[1])] = int(columns[2])
    return table


def _descendants(table: Dict[int, int], roots: Set[int]) -> Set[int]:
    """Every live pid in ``table`` that is one of ``roots`` or descends from one."""
    found = {pid for pid in roots if pid in table}
    changed = True
    while changed:
        children = {pid for pid, parent in table.items() if parent in found or parent in roots} - found
        found |= children
        changed = bool(children)
    return found


# the conmon path
def conmon_exec_argv(rt: Any, container: Container, workspace: ExecWorkspace, timeout: float, terminal: bool,
                     log_size_max: int) -> List[str]:
    """conmon's exec-mode command line, flag for flag as in spec 2.6 (plus ``--log-size-max``)."""
    snapshot = rt.snapshot
    argv = [snapshot.conmon, "-c", container.id, "-n", container.name, "-r", snapshot.runtime_path,
            "-p", workspace.file("pid"), "-e", "-l", workspace.file("log"), "--socket-dir-path", rt.paths.attach_dir,
            "--log-level", rt.config.log_level, "--sync", "--log-size-max", str(log_size_max)]
    if terminal:
        argv.append("-t")
    if timeout > 0:
        argv += ["-T", str(int(math.ceil(timeout)) + 1)]  # backstop only: our own kill comes first
    argv += ["--exec-process-spec", workspace.file("process.json"), "--runtime-arg", "--root=" + snapshot.runtime_root]
    for argument in snapshot.runtime_args:
        argv += ["--runtime-arg", argument]
    return argv


def _conmon_env(rt: Any, sync_fd: int) -> Dict[str, str]:
    env = dict(item.split("=", 1) for item in rt.snapshot.conmon_env if "=" in item)
    env["_OCI_SYNCPIPE"] = str(sync_fd)
    if os.environ.get("XDG_RUNTIME_DIR"):
        env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
    return env


def uses_direct_path(rt: Any, options: ExecOptions) -> bool:
    """stdin needs the direct path; so does runsc (see the module docstring)."""
    return options.stdin is not None or os.path.basename(rt.snapshot.runtime_path) == "runsc"


def conmon_exec_sync(rt: Any, container: Container, command: List[str], timeout: float,
                     **options: Any) -> ExecSyncResponse:
    """Run ``command`` in the container and wait for it, with a hard timeout and an output cap."""
    command = check_command(command)
    parsed = ExecOptions.parse(options)
    if container.is_spoofed:
        return ExecSyncResponse()
    timeout = float(timeout or 0)
    if uses_direct_path(rt, parsed):
        return direct_exec_sync(rt, container, command, timeout, parsed)
    terminal = container.terminal if parsed.tty is None else bool(parsed.tty)
    with ExecWorkspace(rt.paths.exec_dir(container.id)) as workspace:
        workspace.write_process(exec_process(container, command, parsed, terminal))
        log_fd = workspace.create_log()
        try:
            return _run_conmon_exec(rt, container, workspace, timeout, terminal, parsed.output_limit, log_fd)
        finally:
            os.close(log_fd)


def _run_conmon_exec(rt: Any, container: Container, workspace: ExecWorkspace, timeout: float, terminal: bool,
                     limit: int, log_fd: int) -> ExecSyncResponse:
    argv = conmon_exec_argv(rt, container, workspace, timeout, terminal, log_size_max_for(limit))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=_conmon_env(rt, write_end), pass_fds=(write_end,), start_new_session=True)
        finally:
            os.close(write_end)
        timed_out = _wait_conmon(container, process, workspace, timeout)
        message = _read_sync(read_end)
        conmon_stderr = process.stderr.read(65536) if process.stderr else b""
    finally:
        os.close(read_end)
    return _conmon_result(container, workspace, message, conmon_stderr, timed_out, limit, log_fd)


def _wait_conmon(container: Container, process: "subprocess.Popen[bytes]", workspace: ExecWorkspace,
                 timeout: float) -> bool:
    """Wait for conmon (= for the command); at the deadline kill the exec's tree. True if we did."""
    code = wait_child(process, timeout if timeout > 0 else None)
    if code is not None:
        return False
    exec_pid = _optional_pid(workspace.file("pid"))
    kill_exec_tree(container, exec_pid, extra_groups=_runtime_groups(process.pid))
    if wait_child(process, CONMON_EXIT_WAIT) is None:
        _kill_session(process)
    return True


def _runtime_groups(conmon_pid: int) -> List[int]:
    """crun leaves the exec'd process in the runtime's group; conmon's children name that group."""
    groups = []
    try:
        with open("/proc/{pid}/task/{pid}/children".format(pid=conmon_pid), "r", encoding="ascii") as handle:
            for child in handle.read().split():
                fields = _stat_fields(int(child))
                if fields is not None:
                    groups.append(fields[1])
    except OSError:
        pass
    return [group for group in groups if group != conmon_pid]


def _optional_pid(path: str) -> Optional[int]:
    try:
        return read_pid_file(path)
    except (OSError, ValueError):
        return None


def _kill_session(process: "subprocess.Popen[bytes]") -> None:
    """Last resort for a conmon that did not finish: its session (we made it leader) is ours alone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _read_sync(fd: int) -> Optional[Dict[str, Any]]:
    """The one JSON object conmon writes on the sync pipe (None when it wrote nothing usable)."""
    chunks = []
    total = 0
    while total < (1 << 20):
        ready, _unused, _unused = select.select([fd], [], [], 0)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        message = json.loads(text.splitlines()[0])
    except ValueError:
        return {"exit_code": -1, "message": "conmon sent an unreadable message: " + text[:200]}
    return message if isinstance(message, dict) else None


def _conmon_result(container: Container, workspace: ExecWorkspace, message: Optional[Dict[str, Any]],
                   conmon_stderr: bytes, timed_out: bool, limit: int, log_fd: int) -> ExecSyncResponse:
    splitter = read_log_fd(log_fd, limit)
    stdout, stderr = splitter.result()
    truncated = splitter.truncated or _rotated(workspace.file("log"), log_fd)
    code = None if message is None else message.get("exit_code")
    if timed_out or (code == -1 and message.get("message") == TIMED_OUT_MESSAGE):
        if not timed_out:
            kill_exec_tree(container, _optional_pid(workspace.file("pid")))
        return timed_out_response(stdout, stderr, truncated)
    if not isinstance(code, int):
        raise ExecSyncError("conmon reported no exit code for the exec: {}".format(
            conmon_stderr.decode("utf-8", "replace").strip() or "(no message)"), stderr=conmon_stderr)
    if code == -1:
        return failure_response(str(message.get("message") or ""))
    return ExecSyncResponse(stdout=stdout, stderr=stderr, exit_code=code, truncated=truncated)


def _rotated(path: str, fd: int) -> bool:
    """conmon replaced the log (it grew past --log-size-max), so what we hold is only the start."""
    try:
        return os.stat(path).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return True


# the direct path
def exec_argv(rt: Any, container: Container, process_file: str, pid_file: str, sandbox_pid_file: str = "",
              extra: Sequence[str] = ()) -> List[str]:
    """``runtime --root R exec --process F --pid-file P [--internal-pid-file I] [extra] ID`` (foreground)."""
    argv = rt.runtime_argv("exec", "--process", process_file, "--pid-file", pid_file)
    if sandbox_pid_file:
        argv += ["--internal-pid-file", sandbox_pid_file]
    return argv + list(extra) + [container.id]


def is_sandboxed(rt: Any) -> bool:
    return os.path.basename(rt.snapshot.runtime_path) == "runsc"


class CappedOutput:
    """stdout and stderr read from pipes, together at most ``limit`` bytes; the rest is discarded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: Dict[str, List[bytes]] = {"stdout": [], "stderr": []}
        self.size = 0
        self.truncated = False

    def add(self, stream: str, data: bytes) -> None:
        room = self.limit - self.size
        if len(data) > room:
            self.truncated = True
            data = data[:max(room, 0)]
        if data:
            self.parts[stream].append(data)
            self.size += len(data)

    def get(self, stream: str) -> bytes:
        return b"".join(self.parts[stream])


@dataclass
class _Pump:
    """The pipes of one direct exec and what is left to write."""

    process: "subprocess.Popen[bytes]"
    pending: memoryview
    output: CappedOutput


def direct_exec_sync(rt: Any, container: Container, command: List[str], timeout: float,
                     options: ExecOptions) -> ExecSyncResponse:
    """Run ``runtime exec`` ourselves: feed stdin, cap output, wait on a pidfd, kill the tree on timeout.

    No tty here (a terminal has no separate stdin EOF and merges the streams): callers who need
    one use the conmon path (runc, crun) or the streaming ``runtime_exec``.
    """
    if options.tty:
        raise ValidationError("an exec-sync with a tty cannot take stdin or run on runsc; use the streaming exec")
    with ExecWorkspace(rt.paths.exec_dir(container.id)) as workspace:
        process_file = workspace.write_process(exec_process(container, command, options, False))
        sandbox_file = workspace.file("sandbox-pid") if is_sandboxed(rt) else ""
        argv = exec_argv(rt, container, process_file, workspace.file("pid"), sandbox_file)
        process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            argv, stdin=subprocess.PIPE if options.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=rt.runtime_env(), start_new_session=True)
        pump = _Pump(process, memoryview(bytes(options.stdin or b"")), CappedOutput(options.output_limit))
        try:
            timed_out = _pump_until_exit(pump, timeout)
        except BaseException:
            _kill_direct(rt, container, workspace, process)
            raise
        if timed_out:
            _kill_direct(rt, container, workspace, process)
            _drain(pump, time.monotonic() + DRAIN_SECONDS)
        _close_pipes(process)
        return _direct_result(pump, workspace, timed_out, bool(sandbox_file))


def _pump_until_exit(pump: _Pump, timeout: float) -> bool:
    """Move stdin and output until the runtime has exited *and* the output pipes reached EOF.

    runc copies the command's output itself until EOF; crun and runsc hand our pipes straight
    to the command and exit with it. Reading to EOF ourselves gives one rule for every runtime:
    whoever holds the pipes (a background child) keeps the call open, up to the timeout.
    Returns True when the timeout expired first.
    """
    process = pump.process
    pidfd = os.pidfd_open(process.pid)
    poller = select.poll()
    fds = _register_pipes(poller, pump)
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    exited = False
    try:
        while not exited or any(name != "stdin" for name in fds.values()):
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
            events = poller.poll(wait_ms)
            if not events and deadline is not None and time.monotonic() >= deadline:
                return True
            for fd, event in events:
                if fd == pidfd:
                    poller.unregister(pidfd)
                    process.wait()
                    exited = True
                    _stop_feeding(pump, poller, fds)
                elif fd in fds:
                    _service(pump, poller, fds, fd, event)
        return False
    finally:
        os.close(pidfd)


def _stop_feeding(pump: _Pump, poller: "select.poll", fds: Dict[int, str]) -> None:
    """The runtime is gone: nobody will read the rest of stdin."""
    stdin = pump.process.stdin
    if stdin is not None and not stdin.closed:
        if fds.pop(stdin.fileno(), None) is not None:
            poller.unregister(stdin.fileno())
        stdin.close()


def _register_pipes(poller: "select.poll", pump: _Pump) -> Dict[int, str]:
    process = pump.process
    fds = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr"}
    for fd in fds:
        poller.register(fd, select.POLLIN)
    if process.stdin is not None:
        if pump.pending:
            fds[process.stdin.fileno()] = "stdin"
            os.set_blocking(process.stdin.fileno(), False)
            poller.register(process.stdin.fileno(), select.POLLOUT)
        else:
            process.stdin.close()
    return fds


def _service(pump: _Pump, poller: "select.poll", fds: Dict[int, str], fd: int, event: int) -> None:
    """Handle one ready pipe: write the next stdin piece, or read output."""
    stream = fds.get(fd)
    if stream == "stdin":
        _write_stdin(pump, poller, fds, fd, event)
        return
    data = os.read(fd, 65536) if event & (select.POLLIN | select.POLLHUP | select.POLLERR) else b""
    if data:
        pump.output.add(stream, data)
    else:
        poller.unregister(fd)
        fds.pop(fd, None)


def _write_stdin(pump: _Pump, poller: "select.poll", fds: Dict[int, str], fd: int, event: int) -> None:
    if not event & (select.POLLERR | select.POLLHUP):
        try:
            written = os.write(fd, pump.pending[:STDIN_CHUNK])
            pump.pending = pump.pending[written:]
            if pump.pending:
                return
        except BlockingIOError:
            return
        except BrokenPipeError:
            pass
    poller.unregister(fd)
    fds.pop(fd, None)
    pump.process.stdin.close()  # EOF: the command sees the end of its input


def _drain(pump: _Pump, until: float) -> None:
    """After a kill: read what is still buffered in the output pipes, until EOF or ``until``."""
    process = pump.process
    fds = {stream.fileno(): name for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
           if stream is not None and not stream.closed}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    _stop_feeding(pump, poller, fds)
    while fds:
        remaining = until - time.monotonic()
        if remaining <= 0:
            break
        for fd, event in poller.poll(int(remaining * 1000) + 1):
            _service(pump, poller, fds, fd, event)


def _close_pipes(process: "subprocess.Popen[bytes]") -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except OSError:
                pass


def _kill_direct(rt: Any, container: Container, workspace: ExecWorkspace,
                 process: "subprocess.Popen[bytes]") -> None:
    """Kill the exec's tree (in the sandbox too), then the runtime's own session, and reap it."""
    if is_sandboxed(rt):
        sandbox_pid = _optional_pid(workspace.file("sandbox-pid"))
        if sandbox_pid:
            kill_sandbox_tree(rt, container, sandbox_pid)
    else:
        kill_exec_tree(container, _optional_pid(workspace.file("pid")), extra_groups=[process.pid],
                       pipe_inodes=_pipe_inodes(process))
    _kill_session(process)


def _pipe_inodes(process: "subprocess.Popen[bytes]") -> List[int]:
    return [os.fstat(stream.fileno()).st_ino for stream in (process.stdout, process.stderr)
            if stream is not None and not stream.closed]


def _direct_result(pump: _Pump, workspace: ExecWorkspace, timed_out: bool, sandboxed: bool) -> ExecSyncResponse:
    output = pump.output
    if timed_out:
        return timed_out_response(output.get("stdout"), output.get("stderr"), output.truncated)
    started = os.path.exists(workspace.file("sandbox-pid" if sandboxed else "pid"))
    code = pump.process.returncode
    if not started:
        return failure_response(output.get("stderr").decode("utf-8", "replace").strip()
                                or "runtime exec failed with status {}".format(code))
    if code < 0:
        code = 128 - code  # the runtime itself died of a signal
    return ExecSyncResponse(stdout=output.get("stdout"), stderr=output.get("stderr"), exit_code=code,
                            truncated=output.truncated)


# streaming exec
def runtime_exec(rt: Any, container: Container, command: List[str], stdin: Optional[BinaryIO], stdout: Any,
                 stderr: Any, tty: bool, resize: Optional[Callable[[], Optional[Tuple[int, int]]]] = None,
                 **options: Any) -> int:
    """The reference's ``ExecContainer`` (streamed stdio, optional tty); lives in ``exec_stream``."""
    from ansible_collections.daemonless.oci.plugins.module_utils import exec_stream
    return exec_stream.runtime_exec(rt, container, command, stdin, stdout, stderr, tty, resize, **options)
