"""containerd shim v2 client: start a shim, talk to its Task service, read its stats, clean up.

This is the layer under the ``vm`` runtime type (behaviour spec section 3). It knows the shim
protocol and nothing about ``Container`` objects, so ``runtime_vm`` can map its ``RuntimeImpl``
methods onto it one call at a time. Four parts:

* ``TaskClient``: one method per ``containerd.task.v2.Task`` RPC (spec 3.4), returning small
  dataclasses; the messages are ``protowire`` schemas declared below, field numbers taken from
  containerd's ``shim.proto``.
* ``decode_metrics``: the ``Stats`` reply (``io.containerd.cgroups.v1.Metrics`` or ``.v2.Metrics``,
  field numbers from containerd/cgroups' ``metrics.proto``) as a plain dict with the same keys
  for both cgroup versions (spec 3.6, deviation: the reference decodes neither).
* ``ShimLog`` and ``ProcessIO``: the FIFOs a shim writes to (its ``log`` FIFO, and each
  process's stdout/stderr), with our read ends open *before* the shim needs them. A shim opens
  its FIFOs for writing without ``O_CREAT`` and blocks until a reader exists, so the reader must
  be in place first (spec 3.2 step 3, 3.5).
* ``start_shim`` / ``shutdown_and_cleanup``: the shim process's life (spec 3.2). We execute the
  configured path (never a ``$PATH`` lookup, issue 4589), read the address from stdout only,
  accept the three address forms, wait with a pidfd, and on any failure remove everything we
  created and kill the shim we spawned.

Ownership of readers: a short-lived module process cannot keep reading a shim's FIFOs after it
exits. A shim survives losing its log reader (writes then fail with EPIPE and are dropped), but a
container whose stdout FIFO has no reader blocks once the pipe buffer (64 KiB) fills. Whoever
outlives the module (a small per-container helper) must own those read ends: ``ShimLog.detach``
and ``ProcessIO.detach_fds`` hand the raw fds over (for ``subprocess.Popen(pass_fds=...)``).
``ShimHandle.record``/``from_record`` let a later process reconnect to a running shim, and
``run_shim_delete`` runs the shim's own ``delete`` action (what containerd does after a shim
died).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import select
import shutil
import signal
import stat
import struct
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    CommandTimeoutError,
    NotFoundError,
    NotInitializedError,
    OciError,
    ValidationError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.ids import validate_id
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity, run_command
from ansible_collections.daemonless.oci.plugins.module_utils.protowire import (
    ANY,
    BOOL,
    EMPTY,
    ENUM,
    MESSAGE,
    STRING,
    TIMESTAMP,
    UINT32,
    UINT64,
    Field,
    Message,
    ProtoError,
    pack_any,
    timestamp_to_datetime,
    timestamp_to_ns,
)
from ansible_collections.daemonless.oci.plugins.module_utils.ttrpc import (
    TtrpcClient,
    TtrpcClosedError,
    TtrpcError,
    TtrpcUnimplementedError,
    dial,
    resolve_address,
)

TASK_SERVICE = "containerd.task.v2.Task"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
METRICS_V1_TYPE = "io.containerd.cgroups.v1.Metrics"
METRICS_V2_TYPE = "io.containerd.cgroups.v2.Metrics"
RUNC_PROCESS_DETAILS_TYPE = "containerd.runc.v1.ProcessDetails"
STATUS_NAMES = {0: "unknown", 1: "created", 2: "running", 3: "stopped", 4: "paused", 5: "pausing"}

DEFAULT_CALL_TIMEOUT = 30.0
OUTPUT_LIMIT = 16 << 20  # exec output cap, as the reference's CVE-2022-1708 fix
_LOG_TAIL_LIMIT = 64 << 10
_READ_CHUNK = 65536
_NAMESPACE_RE = re.compile(r"\A[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")  # containerd's namespace rule
_MAX_ADDRESS_LENGTH = 4096


class ShimError(OciError):
    """A shim could not be started, reached, or stopped."""


class ShimStartError(ShimError):
    """``<shim> start`` failed; carries the command line, its exit status and both outputs."""

    def __init__(self, message: str, argv: Sequence[str] = (), returncode: Optional[int] = None,
                 stdout: bytes = b"", stderr: bytes = b"") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Message schemas (containerd.task.v2, containerd.types, containerd.v1.types)
# ---------------------------------------------------------------------------------------------

def _schema(name: str, *fields: Tuple[Any, ...]) -> Message:
    """A Message from (number, name, kind[, sub-message[, repeated]]) tuples."""
    built = []
    for spec in fields:
        number, fname, kind = spec[:3]
        sub = spec[3] if len(spec) > 3 else None
        repeated = spec[4] if len(spec) > 4 else False
        built.append(Field(number, fname, kind, repeated=repeated, message=sub))
    return Message(name, built)


MOUNT = _schema("containerd.types.Mount", (1, "type", STRING), (2, "source", STRING), (3, "target", STRING),
                (4, "options", STRING, None, True))
STRING_MAP_ENTRY = _schema("MapEntry", (1, "key", STRING), (2, "value", STRING))
ID_REQUEST = _schema("IDRequest", (1, "id", STRING))  # Pause, Resume, Stats, Connect, Pids
PROCESS_REQUEST = _schema("ProcessRequest", (1, "id", STRING), (2, "exec_id", STRING))  # Start, Delete, State, Wait
PID_RESPONSE = _schema("PidResponse", (1, "pid", UINT32))  # CreateTaskResponse, StartResponse
CREATE_TASK_REQUEST = _schema(
    "CreateTaskRequest", (1, "id", STRING), (2, "bundle", STRING), (3, "rootfs", MESSAGE, MOUNT, True),
    (4, "terminal", BOOL), (5, "stdin", STRING), (6, "stdout", STRING), (7, "stderr", STRING),
    (8, "checkpoint", STRING), (9, "parent_checkpoint", STRING), (10, "options", MESSAGE, ANY))
DELETE_RESPONSE = _schema("DeleteResponse", (1, "pid", UINT32), (2, "exit_status", UINT32),
                          (3, "exited_at", MESSAGE, TIMESTAMP))
EXEC_PROCESS_REQUEST = _schema(
    "ExecProcessRequest", (1, "id", STRING), (2, "exec_id", STRING), (3, "terminal", BOOL), (4, "stdin", STRING),
    (5, "stdout", STRING), (6, "stderr", STRING), (7, "spec", MESSAGE, ANY))
RESIZE_PTY_REQUEST = _schema("ResizePtyRequest", (1, "id", STRING), (2, "exec_id", STRING), (3, "width", UINT32),
                             (4, "height", UINT32))
STATE_RESPONSE = _schema(
    "StateResponse", (1, "id", STRING), (2, "bundle", STRING), (3, "pid", UINT32), (4, "status", ENUM),
    (5, "stdin", STRING), (6, "stdout", STRING), (7, "stderr", STRING), (8, "terminal", BOOL),
    (9, "exit_status", UINT32), (10, "exited_at", MESSAGE, TIMESTAMP), (11, "exec_id", STRING))
KILL_REQUEST = _schema("KillRequest", (1, "id", STRING), (2, "exec_id", STRING), (3, "signal", UINT32),
                       (4, "all", BOOL))
CLOSE_IO_REQUEST = _schema("CloseIORequest", (1, "id", STRING), (2, "exec_id", STRING), (3, "stdin", BOOL))
UPDATE_TASK_REQUEST = _schema("UpdateTaskRequest", (1, "id", STRING), (2, "resources", MESSAGE, ANY),
                              (3, "annotations", MESSAGE, STRING_MAP_ENTRY, True))
WAIT_RESPONSE = _schema("WaitResponse", (1, "exit_status", UINT32), (2, "exited_at", MESSAGE, TIMESTAMP))
STATS_RESPONSE = _schema("StatsResponse", (1, "stats", MESSAGE, ANY))
CONNECT_RESPONSE = _schema("ConnectResponse", (1, "shim_pid", UINT32), (2, "task_pid", UINT32),
                           (3, "version", STRING))
SHUTDOWN_REQUEST = _schema("ShutdownRequest", (1, "id", STRING), (2, "now", BOOL))
PROCESS_INFO = _schema("containerd.v1.types.ProcessInfo", (1, "pid", UINT32), (2, "info", MESSAGE, ANY))
PIDS_RESPONSE = _schema("PidsResponse", (1, "processes", MESSAGE, PROCESS_INFO, True))
RUNC_PROCESS_DETAILS = _schema(RUNC_PROCESS_DETAILS_TYPE, (1, "exec_id", STRING))


# ---------------------------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateResponse:
    """A ``State`` reply. ``status`` is created/running/stopped/paused/pausing/unknown.

    ``exit_status`` is always present (0 while running, as the shim sends it); ``exited_at`` is
    None until the process has exited (the runc shim sends Go's zero time meanwhile).
    """

    id: str
    bundle: str
    pid: int
    status: str
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    exit_status: int
    exited_at: Optional[datetime.datetime]
    exited_at_ns: Optional[int]
    exec_id: str


@dataclass(frozen=True)
class ExitResponse:
    """A ``Wait`` or ``Delete`` reply: how the process ended (``pid`` is 0 for Wait)."""

    exit_status: int
    exited_at: Optional[datetime.datetime]
    exited_at_ns: Optional[int]
    pid: int = 0


@dataclass(frozen=True)
class ConnectResponse:
    """A ``Connect`` reply: the shim's own pid and the task's pid (0 if no task yet)."""

    shim_pid: int
    task_pid: int
    version: str


@dataclass(frozen=True)
class ProcessInfo:
    """One ``Pids`` entry; ``exec_id`` is filled from the runc shim's ProcessDetails ("" for init)."""

    pid: int
    info_type_url: str
    exec_id: str


class _DefaultTimeout:
    def __repr__(self) -> str:
        return "DEFAULT_TIMEOUT"


DEFAULT_TIMEOUT: Any = _DefaultTimeout()  # "use the TaskClient's call_timeout"


def json_any(type_url: str, document: Mapping[str, Any]) -> Dict[str, Any]:
    """An Any whose value is a JSON document (how containerd sends OCI spec types)."""
    return pack_any(type_url, json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def _exit_response(decoded: Mapping[str, Any], pid: int = 0) -> ExitResponse:
    return ExitResponse(exit_status=decoded["exit_status"], exited_at=timestamp_to_datetime(decoded["exited_at"]),
                        exited_at_ns=timestamp_to_ns(decoded["exited_at"]), pid=pid)


# ---------------------------------------------------------------------------------------------
# Task client
# ---------------------------------------------------------------------------------------------

class TaskClient:
    """Typed calls to one shim's ``containerd.task.v2.Task`` service over a ``TtrpcClient``.

    Every method takes ``timeout``: seconds, ``None`` for no limit, or ``DEFAULT_TIMEOUT`` for
    ``call_timeout``. ``wait`` has no limit by default (it blocks until the process exits);
    other calls may run concurrently on the same connection meanwhile. Errors are the ttrpc
    exception classes (``TtrpcNotFoundError``, ``TtrpcClosedError``, ...).
    """

    def __init__(self, client: TtrpcClient, call_timeout: Optional[float] = DEFAULT_CALL_TIMEOUT) -> None:
        self.client = client
        self.call_timeout = call_timeout

    @classmethod
    def dial(cls, address: str, namespace: str, dial_timeout: Optional[float] = 10.0,
             call_timeout: Optional[float] = DEFAULT_CALL_TIMEOUT) -> "TaskClient":
        """Dial a shim address (any of the three forms) and return a client for its Task service."""
        return cls(TtrpcClient.connect(address, namespace=namespace, dial_timeout=dial_timeout), call_timeout)

    def close(self) -> None:
        """Close the connection (pending calls fail with ``TtrpcClosedError``)."""
        self.client.close()

    def __enter__(self) -> "TaskClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _call(self, method: str, request: Message, values: Mapping[str, Any], response: Message,
              timeout: Any) -> Dict[str, Any]:
        limit = self.call_timeout if timeout is DEFAULT_TIMEOUT else timeout
        payload = self.client.call(TASK_SERVICE, method, request.encode(values), timeout=limit)
        try:
            return response.decode(payload)
        except ProtoError as exc:
            raise ShimError("shim sent an undecodable {} reply: {}".format(method, exc)) from exc

    def create(self, container_id: str, bundle: str, *, stdin: str = "", stdout: str = "", stderr: str = "",
               terminal: bool = False, rootfs: Sequence[Mapping[str, Any]] = (),
               options: Optional[Mapping[str, Any]] = None, timeout: Any = DEFAULT_TIMEOUT) -> int:
        """``Create``: create the task from ``bundle``; returns the init pid. FIFO paths may be empty."""
        values = {"id": container_id, "bundle": bundle, "stdin": stdin, "stdout": stdout, "stderr": stderr,
                  "terminal": terminal, "rootfs": list(rootfs), "options": options}
        return self._call("Create", CREATE_TASK_REQUEST, values, PID_RESPONSE, timeout)["pid"]

    def start(self, container_id: str, exec_id: str = "", timeout: Any = DEFAULT_TIMEOUT) -> int:
        """``Start`` the init process (``exec_id`` empty) or an exec; returns its pid."""
        values = {"id": container_id, "exec_id": exec_id}
        return self._call("Start", PROCESS_REQUEST, values, PID_RESPONSE, timeout)["pid"]

    def state(self, container_id: str, exec_id: str = "", timeout: Any = DEFAULT_TIMEOUT) -> StateResponse:
        """``State`` of the init process or an exec."""
        got = self._call("State", PROCESS_REQUEST, {"id": container_id, "exec_id": exec_id}, STATE_RESPONSE, timeout)
        return StateResponse(
            id=got["id"], bundle=got["bundle"], pid=got["pid"], status=STATUS_NAMES.get(got["status"], "unknown"),
            stdin=got["stdin"], stdout=got["stdout"], stderr=got["stderr"], terminal=got["terminal"],
            exit_status=got["exit_status"], exited_at=timestamp_to_datetime(got["exited_at"]),
            exited_at_ns=timestamp_to_ns(got["exited_at"]), exec_id=got["exec_id"])

    def wait(self, container_id: str, exec_id: str = "", timeout: Any = None) -> ExitResponse:
        """``Wait`` until the process exits; no time limit unless ``timeout`` is given."""
        got = self._call("Wait", PROCESS_REQUEST, {"id": container_id, "exec_id": exec_id}, WAIT_RESPONSE, timeout)
        return _exit_response(got)

    def kill(self, container_id: str, signal_number: int, *, exec_id: str = "", all_processes: bool = False,
             timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``Kill``: send a signal to the process (``all_processes``: every process of the container)."""
        values = {"id": container_id, "exec_id": exec_id, "signal": int(signal_number), "all": all_processes}
        self._call("Kill", KILL_REQUEST, values, EMPTY, timeout)

    def delete(self, container_id: str, exec_id: str = "", timeout: Any = DEFAULT_TIMEOUT) -> ExitResponse:
        """``Delete`` a stopped task or a finished exec; returns its pid and exit status."""
        got = self._call("Delete", PROCESS_REQUEST, {"id": container_id, "exec_id": exec_id}, DELETE_RESPONSE,
                         timeout)
        return _exit_response(got, pid=got["pid"])

    def pause(self, container_id: str, timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``Pause`` (freeze) every process of the container."""
        self._call("Pause", ID_REQUEST, {"id": container_id}, EMPTY, timeout)

    def resume(self, container_id: str, timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``Resume`` a paused container."""
        self._call("Resume", ID_REQUEST, {"id": container_id}, EMPTY, timeout)

    def update(self, container_id: str, resources: Mapping[str, Any],
               annotations: Optional[Mapping[str, str]] = None, timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``Update`` the container's resources (an OCI ``LinuxResources`` document, sent as JSON)."""
        values = {"id": container_id, "resources": json_any(LINUX_RESOURCES_TYPE_URL, resources),
                  "annotations": [{"key": k, "value": v} for k, v in sorted((annotations or {}).items())]}
        self._call("Update", UPDATE_TASK_REQUEST, values, EMPTY, timeout)

    def exec(self, container_id: str, exec_id: str, process: Mapping[str, Any], *, stdin: str = "",
             stdout: str = "", stderr: str = "", terminal: bool = False, timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``Exec``: register an extra process (an OCI ``Process`` document); ``start`` runs it."""
        values = {"id": container_id, "exec_id": exec_id, "terminal": terminal, "stdin": stdin, "stdout": stdout,
                  "stderr": stderr, "spec": json_any(PROCESS_TYPE_URL, process)}
        self._call("Exec", EXEC_PROCESS_REQUEST, values, EMPTY, timeout)

    def resize_pty(self, container_id: str, width: int, height: int, exec_id: str = "",
                   timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``ResizePty`` of a terminal process."""
        values = {"id": container_id, "exec_id": exec_id, "width": width, "height": height}
        self._call("ResizePty", RESIZE_PTY_REQUEST, values, EMPTY, timeout)

    def close_io(self, container_id: str, exec_id: str = "", stdin: bool = True,
                 timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``CloseIO``: close the process's stdin on the shim side (the process sees EOF)."""
        values = {"id": container_id, "exec_id": exec_id, "stdin": stdin}
        self._call("CloseIO", CLOSE_IO_REQUEST, values, EMPTY, timeout)

    def stats_raw(self, container_id: str, timeout: Any = DEFAULT_TIMEOUT) -> Tuple[str, bytes]:
        """``Stats`` as (type URL, encoded metrics) for callers that decode themselves."""
        got = self._call("Stats", ID_REQUEST, {"id": container_id}, STATS_RESPONSE, timeout)
        stats = got["stats"] or {}
        return stats.get("type_url", ""), stats.get("value", b"")

    def stats(self, container_id: str, timeout: Any = DEFAULT_TIMEOUT) -> Dict[str, Any]:
        """``Stats`` decoded by ``decode_metrics`` (cgroup v1 or v2)."""
        return decode_metrics(*self.stats_raw(container_id, timeout))

    def pids(self, container_id: str, timeout: Any = DEFAULT_TIMEOUT) -> List[ProcessInfo]:
        """``Pids``: every process of the container, with the exec id for exec processes (runc shim)."""
        got = self._call("Pids", ID_REQUEST, {"id": container_id}, PIDS_RESPONSE, timeout)
        return [_process_info(entry) for entry in got["processes"]]

    def connect(self, container_id: str, timeout: Any = DEFAULT_TIMEOUT) -> ConnectResponse:
        """``Connect``: the shim's pid and the task's pid (a cheap "is the shim answering" probe)."""
        got = self._call("Connect", ID_REQUEST, {"id": container_id}, CONNECT_RESPONSE, timeout)
        return ConnectResponse(shim_pid=got["shim_pid"], task_pid=got["task_pid"], version=got["version"])

    def shutdown(self, container_id: str, now: bool = False, timeout: Any = DEFAULT_TIMEOUT) -> None:
        """``Shutdown``: the shim exits if it has no tasks left. Its reply may be lost as it exits,
        so ``TtrpcClosedError`` here is success (the reference ignores it too)."""
        try:
            self._call("Shutdown", SHUTDOWN_REQUEST, {"id": container_id, "now": now}, EMPTY, timeout)
        except TtrpcClosedError:
            pass


def _process_info(entry: Mapping[str, Any]) -> ProcessInfo:
    info = entry["info"] or {}
    type_url = info.get("type_url", "")
    exec_id = ""
    if _type_name(type_url) == RUNC_PROCESS_DETAILS_TYPE:
        try:
            exec_id = RUNC_PROCESS_DETAILS.decode(info.get("value", b""))["exec_id"]
        except ProtoError:
            exec_id = ""
    return ProcessInfo(pid=entry["pid"], info_type_url=type_url, exec_id=exec_id)


def _type_name(type_url: str) -> str:
    """The message name of an Any type URL (after the last '/', if any)."""
    return type_url.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# cgroup metrics (containerd/cgroups stats/v1 and cgroup2/stats metrics.proto)
# ---------------------------------------------------------------------------------------------

def _uint64_fields(names: Sequence[str], first: int = 1) -> List[Tuple[Any, ...]]:
    return [(first + index, name, UINT64) for index, name in enumerate(names)]


PIDS_STAT = _schema("PidsStat", (1, "current", UINT64), (2, "limit", UINT64))
V1_HUGETLB = _schema("v1.HugetlbStat", (1, "usage", UINT64), (2, "max", UINT64), (3, "failcnt", UINT64),
                     (4, "pagesize", STRING))
V1_CPU_USAGE = _schema("v1.CPUUsage", (1, "total", UINT64), (2, "kernel", UINT64), (3, "user", UINT64),
                       (4, "per_cpu", UINT64, None, True))
V1_THROTTLE = _schema("v1.Throttle", *_uint64_fields(("periods", "throttled_periods", "throttled_time")))
V1_CPU = _schema("v1.CPUStat", (1, "usage", MESSAGE, V1_CPU_USAGE), (2, "throttling", MESSAGE, V1_THROTTLE))
V1_MEMORY_ENTRY = _schema("v1.MemoryEntry", *_uint64_fields(("limit", "usage", "max", "failcnt")))
V1_MEMORY = _schema("v1.MemoryStat", *_uint64_fields((
    "cache", "rss", "rss_huge", "mapped_file", "dirty", "writeback", "pg_pg_in", "pg_pg_out", "pg_fault",
    "pg_maj_fault", "inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable",
    "hierarchical_memory_limit", "hierarchical_swap_limit", "total_cache", "total_rss", "total_rss_huge",
    "total_mapped_file", "total_dirty", "total_writeback", "total_pg_pg_in", "total_pg_pg_out", "total_pg_fault",
    "total_pg_maj_fault", "total_inactive_anon", "total_active_anon", "total_inactive_file", "total_active_file",
    "total_unevictable")),
    (33, "usage", MESSAGE, V1_MEMORY_ENTRY), (34, "swap", MESSAGE, V1_MEMORY_ENTRY),
    (35, "kernel", MESSAGE, V1_MEMORY_ENTRY), (36, "kernel_tcp", MESSAGE, V1_MEMORY_ENTRY))
V1_BLKIO_ENTRY = _schema("v1.BlkIOEntry", (1, "op", STRING), (2, "device", STRING), (3, "major", UINT64),
                         (4, "minor", UINT64), (5, "value", UINT64))
V1_BLKIO = _schema("v1.BlkIOStat", *[(number, name, MESSAGE, V1_BLKIO_ENTRY, True) for number, name in enumerate((
    "io_service_bytes_recursive", "io_serviced_recursive", "io_queued_recursive", "io_service_time_recursive",
    "io_wait_time_recursive", "io_merged_recursive", "io_time_recursive", "sectors_recursive"), start=1)])
V1_NETWORK = _schema("v1.NetworkStat", (1, "name", STRING), *_uint64_fields((
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped"),
    first=2))
V1_CGROUP_STATS = _schema("v1.CgroupStats", *_uint64_fields((
    "nr_sleeping", "nr_running", "nr_stopped", "nr_uninterruptible", "nr_io_wait")))
V1_OOM_CONTROL = _schema("v1.MemoryOomControl", *_uint64_fields(("oom_kill_disable", "under_oom", "oom_kill")))
METRICS_V1 = _schema(
    METRICS_V1_TYPE, (1, "hugetlb", MESSAGE, V1_HUGETLB, True), (2, "pids", MESSAGE, PIDS_STAT),
    (3, "cpu", MESSAGE, V1_CPU), (4, "memory", MESSAGE, V1_MEMORY), (5, "blkio", MESSAGE, V1_BLKIO),
    (7, "network", MESSAGE, V1_NETWORK, True), (8, "cgroup_stats", MESSAGE, V1_CGROUP_STATS),
    (9, "memory_oom_control", MESSAGE, V1_OOM_CONTROL))

V2_CPU = _schema("v2.CPUStat", *_uint64_fields((
    "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec")))
V2_MEMORY = _schema("v2.MemoryStat", *_uint64_fields((
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty", "file_writeback",
    "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable", "slab_reclaimable",
    "slab_unreclaimable", "pgfault", "pgmajfault", "workingset_refault", "workingset_activate",
    "workingset_nodereclaim", "pgrefill", "pgscan", "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree",
    "pglazyfreed", "thp_fault_alloc", "thp_collapse_alloc", "usage", "usage_limit", "swap_usage", "swap_limit",
    "max_usage", "swap_max_usage")))
V2_IO_ENTRY = _schema("v2.IOEntry", *_uint64_fields(("major", "minor", "rbytes", "wbytes", "rios", "wios")))
V2_IO = _schema("v2.IOStat", (1, "usage", MESSAGE, V2_IO_ENTRY, True))
V2_HUGETLB = _schema("v2.HugeTlbStat", (1, "current", UINT64), (2, "max", UINT64), (3, "pagesize", STRING))
V2_MEMORY_EVENTS = _schema("v2.MemoryEvents", *_uint64_fields(("low", "high", "max", "oom", "oom_kill")))
METRICS_V2 = _schema(
    METRICS_V2_TYPE, (1, "pids", MESSAGE, PIDS_STAT), (2, "cpu", MESSAGE, V2_CPU), (4, "memory", MESSAGE, V2_MEMORY),
    (6, "io", MESSAGE, V2_IO), (7, "hugetlb", MESSAGE, V2_HUGETLB, True),
    (8, "memory_events", MESSAGE, V2_MEMORY_EVENTS))


def decode_metrics(type_url: str, value: bytes) -> Dict[str, Any]:
    """A shim's ``Stats`` Any as one dict shape for both cgroup versions.

    Keys: ``cgroup_version`` (1/2), ``type_url``, ``pids`` {current, limit}, ``cpu`` {usage_ns,
    user_ns, system_ns, per_cpu_ns}, ``memory`` {usage, limit, inactive_file, working_set, rss,
    cache, swap_usage, oom_kill}, ``io`` [{major, minor, read_bytes, write_bytes, read_ios,
    write_ios}], ``network`` [{name, rx_bytes, ..., tx_dropped}] (v1 only; [] on v2), and ``raw``:
    the whole decoded message. ``working_set`` is usage minus inactive file pages, floored at 0
    (the reference's rule). An unknown type URL raises ``ShimError`` naming it.
    """
    name = _type_name(type_url)
    try:
        if name == METRICS_V1_TYPE:
            return _summarise_v1(type_url, METRICS_V1.decode(value))
        if name == METRICS_V2_TYPE:
            return _summarise_v2(type_url, METRICS_V2.decode(value))
    except ProtoError as exc:
        raise ShimError("cannot decode {} stats: {}".format(name, exc)) from exc
    raise ShimError("unknown stats type {!r} (expected {} or {})".format(type_url, METRICS_V1_TYPE, METRICS_V2_TYPE))


def _pids(raw: Optional[Mapping[str, Any]]) -> Dict[str, int]:
    raw = raw or {}
    return {"current": raw.get("current", 0), "limit": raw.get("limit", 0)}


def _summarise_v1(type_url: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    cpu = metrics["cpu"] or {}
    usage = cpu.get("usage") or V1_CPU_USAGE.decode(b"")
    memory = metrics["memory"] or V1_MEMORY.decode(b"")
    mem_usage = memory["usage"] or V1_MEMORY_ENTRY.decode(b"")
    swap = memory["swap"] or V1_MEMORY_ENTRY.decode(b"")
    oom = metrics["memory_oom_control"] or {}
    return {
        "cgroup_version": 1,
        "type_url": type_url,
        "pids": _pids(metrics["pids"]),
        "cpu": {"usage_ns": usage["total"], "user_ns": usage["user"], "system_ns": usage["kernel"],
                "per_cpu_ns": list(usage["per_cpu"])},
        "memory": {"usage": mem_usage["usage"], "limit": mem_usage["limit"], "max_usage": mem_usage["max"],
                   "inactive_file": memory["total_inactive_file"],
                   "working_set": max(0, mem_usage["usage"] - memory["total_inactive_file"]),
                   "rss": memory["total_rss"], "cache": memory["total_cache"], "swap_usage": swap["usage"],
                   "oom_kill": oom.get("oom_kill", 0)},
        "io": _v1_io(metrics["blkio"] or {}),
        "network": [dict(entry) for entry in metrics["network"]],
        "raw": metrics,
    }


def _v1_io(blkio: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Per-device read/write bytes and operations from the v1 blkio recursive lists."""
    devices: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for key, suffix in (("io_service_bytes_recursive", "bytes"), ("io_serviced_recursive", "ios")):
        for entry in blkio.get(key, []):
            op = entry["op"].lower()
            if op not in ("read", "write"):
                continue
            device = devices.setdefault((entry["major"], entry["minor"]), _io_entry(entry["major"], entry["minor"]))
            device["{}_{}".format(op, suffix)] += entry["value"]
    return [devices[key] for key in sorted(devices)]


def _io_entry(major: int, minor: int) -> Dict[str, Any]:
    return {"major": major, "minor": minor, "read_bytes": 0, "write_bytes": 0, "read_ios": 0, "write_ios": 0}


def _summarise_v2(type_url: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    cpu = metrics["cpu"] or V2_CPU.decode(b"")
    memory = metrics["memory"] or V2_MEMORY.decode(b"")
    events = metrics["memory_events"] or {}
    io = []
    for entry in (metrics["io"] or {}).get("usage", []):
        item = _io_entry(entry["major"], entry["minor"])
        item.update(read_bytes=entry["rbytes"], write_bytes=entry["wbytes"], read_ios=entry["rios"],
                    write_ios=entry["wios"])
        io.append(item)
    return {
        "cgroup_version": 2,
        "type_url": type_url,
        "pids": _pids(metrics["pids"]),
        "cpu": {"usage_ns": cpu["usage_usec"] * 1000, "user_ns": cpu["user_usec"] * 1000,
                "system_ns": cpu["system_usec"] * 1000, "per_cpu_ns": []},
        "memory": {"usage": memory["usage"], "limit": memory["usage_limit"], "max_usage": memory["max_usage"],
                   "inactive_file": memory["inactive_file"],
                   "working_set": max(0, memory["usage"] - memory["inactive_file"]),
                   "rss": memory["anon"], "cache": memory["file"], "swap_usage": memory["swap_usage"],
                   "oom_kill": events.get("oom_kill", 0)},
        "io": sorted(io, key=lambda item: (item["major"], item["minor"])),
        "network": [],
        "raw": metrics,
    }


# ---------------------------------------------------------------------------------------------
# FIFOs
# ---------------------------------------------------------------------------------------------

Sink = Callable[[bytes], None]


class _FifoPump:
    """A thread that reads FIFOs until each reaches EOF, into memory (capped) or into sinks.

    EOF rule for a FIFO opened non-blocking before any writer: Linux reports POLLHUP only after a
    writer has connected and gone, so "no data yet" never looks like the end.
    """

    def __init__(self, fds: Mapping[str, int], sinks: Optional[Mapping[str, Sink]] = None,
                 limit: int = OUTPUT_LIMIT, keep_tail: bool = False) -> None:
        self._fds = dict(fds)
        self._sinks = dict(sinks or {})
        self._limit = limit
        self._keep_tail = keep_tail
        self._data: Dict[str, bytearray] = {name: bytearray() for name in self._fds}
        self._done: Dict[str, threading.Event] = {name: threading.Event() for name in self._fds}
        self.truncated = False
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="fifo-pump", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        by_fd = {fd: name for name, fd in self._fds.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while by_fd:
                events = poller.poll()
                if any(fd == self._wake_r for fd, _mask in events):
                    return
                for fd, _mask in events:
                    if fd in by_fd and not self._read_once(fd, by_fd[fd]):
                        poller.unregister(fd)
                        self._done[by_fd.pop(fd)].set()
        finally:
            for name in by_fd.values():
                self._done[name].set()

    def _read_once(self, fd: int, name: str) -> bool:
        """Read what is there; False at EOF (or on a read error, which ends the stream too)."""
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        sink = self._sinks.get(name)
        if sink is not None:
            sink(data)
            return True
        with self._lock:
            buffer = self._data[name]
            buffer += data
            if len(buffer) > self._limit:
                self.truncated = True
                if self._keep_tail:
                    del buffer[:len(buffer) - self._limit]
                else:
                    del buffer[self._limit:]
        return True

    def data(self, name: str) -> bytes:
        with self._lock:
            return bytes(self._data.get(name, b""))

    def wait(self, timeout: Optional[float]) -> bool:
        """True once every stream reached EOF; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self._done.values():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(remaining):
                return False
        return True

    def stop(self) -> None:
        """Stop reading (the fds stay open and belong to the caller)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _open_fifo_reader(path: str) -> int:
    """Open a FIFO's read side without waiting for a writer."""
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


class ShimLog:
    """The shim's ``<bundle>/log`` FIFO with our read end open (spec 3.2 step 3).

    By default a pump thread keeps the last 64 KiB (for error messages, ``tail()``), or feeds
    ``sink``. ``detach()`` stops the pump and hands the raw fd to the caller, who then owns it
    (for example to pass it to a long-lived helper); ``close()`` closes and removes the FIFO.
    """

    def __init__(self, path: str, fd: int, created: bool) -> None:
        self.path = path
        self.fd: Optional[int] = fd
        self.created = created
        self._pump: Optional[_FifoPump] = None

    @classmethod
    def open(cls, bundle_dir: str) -> "ShimLog":
        """Create ``<bundle>/log`` (mode 0700) unless a FIFO is already there, and open it for reading."""
        path = os.path.join(bundle_dir, "log")
        created = False
        try:
            os.mkfifo(path, 0o700)
            created = True
        except FileExistsError:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                raise ShimError("{} exists and is not a FIFO".format(path)) from None
        try:
            fd = _open_fifo_reader(path)
        except OSError:
            if created:
                os.unlink(path)
            raise
        return cls(path, fd, created)

    def start_pump(self, sink: Optional[Sink] = None) -> None:
        """Read the FIFO in a background thread until EOF (the shim's exit)."""
        if self.fd is None or self._pump is not None:
            return
        self._pump = _FifoPump({"log": self.fd}, {"log": sink} if sink else None, limit=_LOG_TAIL_LIMIT,
                               keep_tail=True)

    def tail(self) -> bytes:
        """The last lines the shim logged (only without a sink)."""
        return self._pump.data("log") if self._pump else b""

    def wait_eof(self, timeout: Optional[float]) -> bool:
        """Wait until every writer closed the FIFO (the shim exited); False on timeout or without a pump."""
        return self._pump.wait(timeout) if self._pump else False

    def detach(self) -> int:
        """Stop our pump and give the read fd to the caller (who must keep reading or close it)."""
        if self.fd is None:
            raise ShimError("shim log {} is already closed or detached".format(self.path))
        self._stop_pump()
        fd, self.fd = self.fd, None
        return fd

    def close(self, remove: bool = True) -> None:
        """Stop reading, close our fd and (by default) remove the FIFO."""
        self._stop_pump()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if remove:
            _unlink_quiet(self.path)

    def _stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None


class ProcessIO:
    """A private directory of FIFOs for one process's stdio, with our ends open (spec 3.5).

    ``create`` makes ``<dir>/stdin`` (optional), ``stdout`` and ``stderr`` and opens them before
    the shim does: stdout/stderr read non-blocking and pumped by a thread (into memory, capped at
    ``limit`` bytes per stream, or into ``sinks``), stdin read-write so opening never blocks.
    Pass ``stdin_path``/``stdout_path``/``stderr_path`` to ``TaskClient.create``/``exec``.
    """

    def __init__(self, directory: str, paths: Dict[str, str], stdin_fd: Optional[int],
                 pump: Optional[_FifoPump], read_fds: Dict[str, int]) -> None:
        self.directory = directory
        self.stdin_path = paths.get("stdin", "")
        self.stdout_path = paths.get("stdout", "")
        self.stderr_path = paths.get("stderr", "")
        self._stdin_fd = stdin_fd
        self._pump = pump
        self._read_fds = read_fds

    @classmethod
    def create(cls, parent_dir: str, prefix: str = "io-", *, stdin: bool = False, stdout: bool = True,
               stderr: bool = True, limit: int = OUTPUT_LIMIT,
               sinks: Optional[Mapping[str, Sink]] = None) -> "ProcessIO":
        """Make the FIFO set in a fresh 0700 directory under ``parent_dir`` and start reading."""
        directory = tempfile.mkdtemp(prefix=prefix, dir=parent_dir)
        paths: Dict[str, str] = {}
        read_fds: Dict[str, int] = {}
        stdin_fd = None
        try:
            for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
                if wanted:
                    paths[name] = os.path.join(directory, name)
                    os.mkfifo(paths[name], 0o600)
            if stdin:
                stdin_fd = os.open(paths["stdin"], os.O_RDWR | os.O_CLOEXEC)
            for name in ("stdout", "stderr"):
                if name in paths:
                    read_fds[name] = _open_fifo_reader(paths[name])
            pump = _FifoPump(read_fds, sinks, limit=limit) if read_fds else None
        except BaseException:
            for fd in list(read_fds.values()) + ([stdin_fd] if stdin_fd is not None else []):
                os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory, paths, stdin_fd, pump, read_fds)

    def write_stdin(self, data: bytes) -> None:
        """Write to the process's stdin (blocks while the pipe is full)."""
        if self._stdin_fd is None:
            raise ShimError("this process has no stdin FIFO (or it was closed)")
        view = memoryview(data)
        while view:
            view = view[os.write(self._stdin_fd, view):]

    def stdin_pending(self) -> int:
        """Bytes written to stdin that the shim has not read yet (0 once drained or closed).

        ``CloseIO`` makes the runc shim close its FIFO reader at once, dropping what is still in
        the pipe; callers wait for 0 here before sending it.
        """
        if self._stdin_fd is None:
            return 0
        return struct.unpack("i", fcntl.ioctl(self._stdin_fd, termios.FIONREAD, b"\0\0\0\0"))[0]

    def close_stdin(self) -> None:
        """Close our end of stdin; pair with ``TaskClient.close_io`` so the process sees EOF."""
        if self._stdin_fd is not None:
            os.close(self._stdin_fd)
            self._stdin_fd = None

    def wait_eof(self, timeout: Optional[float]) -> bool:
        """Wait until stdout and stderr reached EOF (every writer closed); False on timeout."""
        return True if self._pump is None else self._pump.wait(timeout)

    def output(self) -> Tuple[bytes, bytes]:
        """(stdout, stderr) collected so far (empty for streams that go to a sink)."""
        if self._pump is None:
            return b"", b""
        return self._pump.data("stdout"), self._pump.data("stderr")

    def detach_fds(self) -> Dict[str, int]:
        """Stop our reader thread and hand our FIFO ends to the caller ({"stdout": fd, ...}).

        For passing to a long-lived helper (``Popen(pass_fds=...)``); the caller then owns and
        must close them. ``close()`` afterwards only removes the directory (the FIFOs stay usable
        through the open fds).
        """
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
        fds = dict(self._read_fds)
        if self._stdin_fd is not None:
            fds["stdin"] = self._stdin_fd
        self._read_fds, self._stdin_fd = {}, None
        return fds

    @property
    def truncated(self) -> bool:
        """True if a stream went over ``limit`` and was cut."""
        return bool(self._pump and self._pump.truncated)

    def close(self) -> None:
        """Stop reading, close every fd, remove the directory. Safe to call twice."""
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds = {}
        self.close_stdin()
        shutil.rmtree(self.directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Shim process lifecycle
# ---------------------------------------------------------------------------------------------

@dataclass
class ShimHandle:
    """A running shim: its address, its pid (with start time) and our open resources.

    ``record()`` gives the JSON-safe part to store so another process can reconnect with
    ``TaskClient.dial(record['address'], record['namespace'])``. ``log`` is the read side of
    ``<bundle>/log`` (see ``ShimLog`` for who must own it). ``spawned`` is False when ``start``
    returned an already running shim for the same id (the runc shim does that) — then failure
    paths must not kill it.
    """

    shim_path: str
    bundle: str
    container_id: str
    namespace: str
    address: str
    pid: int
    start_time: str
    spawned: bool
    task: Optional[TaskClient] = None
    log: Optional[ShimLog] = None
    start_stderr: bytes = field(default=b"", repr=False)

    @property
    def socket_path(self) -> Optional[str]:
        """The filesystem path of the shim's socket, or None for an abstract socket."""
        label, sockaddr = resolve_address(self.address)
        return None if sockaddr.startswith("\0") else label

    @property
    def identity(self) -> Optional[ProcessIdentity]:
        return ProcessIdentity(self.pid, self.start_time) if self.pid > 0 and self.start_time else None

    def record(self) -> Dict[str, Any]:
        """What to persist to find this shim again (JSON-safe)."""
        return {"shim_path": self.shim_path, "bundle": self.bundle, "container_id": self.container_id,
                "namespace": self.namespace, "address": self.address, "pid": self.pid,
                "start_time": self.start_time}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], connect: bool = True, dial_timeout: Optional[float] = 10.0,
                    call_timeout: Optional[float] = DEFAULT_CALL_TIMEOUT) -> "ShimHandle":
        """Rebuild a handle in a later process from ``record()``; dial the shim when ``connect``.

        The rebuilt handle has no ``log`` reader: the shim keeps running without one (its log
        writes fail with EPIPE and are dropped); a new reader may open ``<bundle>/log`` again.
        ``TtrpcDialError`` if ``connect`` and the shim is gone.
        """
        handle = cls(shim_path=record["shim_path"], bundle=record["bundle"], container_id=record["container_id"],
                     namespace=record["namespace"], address=record["address"], pid=int(record.get("pid") or 0),
                     start_time=record.get("start_time") or "", spawned=True)
        if connect:
            handle.task = TaskClient.dial(handle.address, handle.namespace, dial_timeout, call_timeout)
        return handle


def validate_namespace(namespace: str) -> str:
    """A containerd namespace: letters and digits, separated by single '.', '_' or '-'."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace) or len(namespace) > 76:
        raise ValidationError("invalid containerd namespace {!r}: use letters and digits separated by "
                              "'.', '_' or '-'".format(namespace))
    return namespace


def shim_start_argv(shim_path: str, container_id: str, namespace: str, publish_binary: str = "/bin/true",
                    debug: bool = False) -> List[str]:
    """``<shim> -namespace NS -address "" -publish-binary BIN -id ID [-debug] start`` (spec 3.2 step 2)."""
    argv = [shim_path, "-namespace", namespace, "-address", "", "-publish-binary", publish_binary,
            "-id", container_id]
    if debug:
        argv.append("-debug")
    return argv + ["start"]


def parse_shim_address(output: bytes) -> str:
    """The address a shim's ``start`` printed on stdout, checked to be one of the three forms.

    Accepted: ``unix:///path``, a JSON object with an ``address`` (containerd 2.x), or a bare
    abstract-socket name (no whitespace). Anything else is a ``ShimError`` quoting the output.
    """
    try:
        text = output.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ShimError("shim printed non-UTF-8 output instead of an address: {!r}".format(output[:200])) from None
    if not text:
        raise ShimError("shim printed no address on stdout")
    if len(text) > _MAX_ADDRESS_LENGTH or (not text.startswith("{") and "\n" in text):
        raise ShimError("shim printed something that is not an address: {!r}".format(text[:200]))
    try:
        resolve_address(text)
    except TtrpcError as exc:
        raise ShimError("shim printed something that is not an address: {!r} ({})".format(text[:200], exc)) from exc
    return text


def start_shim(shim_path: str, bundle_dir: str, container_id: str, namespace: str, timeout: float = 30.0, *,
               publish_binary: str = "/bin/true", debug: bool = False,
               env: Optional[Mapping[str, str]] = None, log_sink: Optional[Sink] = None,
               call_timeout: Optional[float] = DEFAULT_CALL_TIMEOUT, fresh_bundle: bool = False) -> ShimHandle:
    """Start a shim for ``container_id`` in ``bundle_dir`` and return it connected and answering.

    ``shim_path`` is executed as given (absolute path required, no ``$PATH`` lookup). ``env``
    replaces our environment for the shim (default: ours); ``TTRPC_ADDRESS`` is always emptied
    and ``GOMAXPROCS=2`` set, as the reference does. ``timeout`` bounds the whole start: the
    ``start`` command (waited with a pidfd), dialing and a ``Connect`` probe whose reply names
    the shim's pid. The log FIFO's reader is pumped in a background thread (tail kept, or fed to
    ``log_sink``).

    On any failure (missing binary, non-zero exit, garbage instead of an address, a socket that
    refuses or never answers) raises ``ShimStartError``/``ShimError`` after removing what this
    call created: shim processes for this bundle/id that were not running before the call
    (found in /proc, since the daemon writes ``shim.pid`` only once it is up), a socket file
    nobody accepts on, the log FIFO. ``fresh_bundle``: the caller just created ``bundle_dir``,
    so no shim can be running there yet and the /proc scan before the start is skipped (it
    costs about 35 us per process on the host).
    """
    validate_id(container_id)
    validate_namespace(namespace)
    _check_executable(shim_path)
    if not os.path.isdir(bundle_dir):
        raise ShimStartError("bundle directory {} does not exist".format(bundle_dir))
    deadline = time.monotonic() + timeout
    running_before = set() if fresh_bundle else set(find_shim_pids(bundle_dir, container_id, namespace))
    log = ShimLog.open(bundle_dir)
    log.start_pump(log_sink)
    handle = ShimHandle(shim_path=shim_path, bundle=bundle_dir, container_id=container_id, namespace=namespace,
                        address="", pid=0, start_time="", spawned=False, log=log)
    try:
        argv = shim_start_argv(shim_path, container_id, namespace, publish_binary, debug)
        stdout, handle.start_stderr = _run_start(argv, bundle_dir, env, deadline)
        handle.address = _address_or_fail(argv, stdout, handle.start_stderr)
        handle.task = _probe(handle, deadline, call_timeout)
        handle.spawned = handle.pid not in running_before
        return handle
    except BaseException as exc:
        _abandon(handle, running_before)
        if isinstance(exc, ShimError) or not isinstance(exc, Exception):
            raise
        raise ShimStartError("starting shim {} for {}: {}".format(shim_path, container_id, exc)) from exc


def find_shim_pids(bundle_dir: str, container_id: str, namespace: str) -> List[int]:
    """Pids of shim daemons serving ``container_id`` in ``namespace`` from ``bundle_dir``.

    A shim daemon runs with the bundle as its working directory and ``-namespace NS ... -id ID``
    on its command line (without the ``start`` action); that is how a failed start finds the
    daemon it may have spawned before the daemon wrote ``shim.pid``.
    """
    bundle = os.path.realpath(bundle_dir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink("/proc/{}/cwd".format(entry)) != bundle:  # one syscall: skips almost every process
                continue
            with open("/proc/{}/cmdline".format(entry), "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if _is_shim_daemon_argv([a.decode("utf-8", "replace") for a in argv if a], container_id, namespace):
            found.append(int(entry))
    return found


def _is_shim_daemon_argv(argv: Sequence[str], container_id: str, namespace: str) -> bool:
    """True for ``... -namespace NS ... -id ID ...`` without a trailing ``start``/``delete`` action."""
    def flag(name: str) -> Optional[str]:
        for index, arg in enumerate(argv[:-1]):
            if arg in ("-" + name, "--" + name):
                return argv[index + 1]
        return None
    if not argv or argv[-1] in ("start", "delete"):
        return False
    return flag("id") == container_id and flag("namespace") == namespace


def _check_executable(shim_path: str) -> None:
    if not os.path.isabs(shim_path):
        raise ShimStartError("shim path {!r} must be absolute (no $PATH lookup is done)".format(shim_path))
    if not os.path.isfile(shim_path):
        raise ShimStartError("shim binary {} does not exist".format(shim_path))
    if not os.access(shim_path, os.X_OK):
        raise ShimStartError("shim binary {} is not executable".format(shim_path))


def _shim_env(env: Optional[Mapping[str, str]]) -> Dict[str, str]:
    merged = dict(os.environ if env is None else env)
    merged["TTRPC_ADDRESS"] = ""
    merged["GOMAXPROCS"] = "2"
    return merged


def _run_start(argv: List[str], bundle_dir: str, env: Optional[Mapping[str, str]],
               deadline: float) -> Tuple[bytes, bytes]:
    """Run ``<shim> ... start`` to completion (pidfd wait); (stdout, stderr) or ``ShimStartError``."""
    try:
        done = run_command(argv, cwd=bundle_dir, env=_shim_env(env), check=False,
                           timeout=max(0.1, deadline - time.monotonic()))
    except CommandTimeoutError as exc:
        raise ShimStartError("shim start did not finish in time: {}".format(exc), argv, None, exc.stdout,
                             exc.stderr) from exc
    except OSError as exc:
        raise ShimStartError("cannot execute shim {}: {}".format(argv[0], exc.strerror or exc), argv) from exc
    if done.returncode != 0:
        raise ShimStartError("shim start `{}` exited with status {}: {}".format(
            " ".join(a or "''" for a in argv), done.returncode, _text(done.stderr or done.stdout) or "no output"),
            argv, done.returncode, done.stdout, done.stderr)
    return done.stdout, done.stderr


def _address_or_fail(argv: List[str], stdout: bytes, stderr: bytes) -> str:
    try:
        return parse_shim_address(stdout)
    except ShimError as exc:
        raise ShimStartError("{} (stderr: {})".format(exc, _text(stderr) or "empty"), argv, 0, stdout, stderr) from exc


def _probe(handle: ShimHandle, deadline: float, call_timeout: Optional[float]) -> TaskClient:
    """Dial the address and make one ``Connect`` call, which also names the shim's pid."""
    remaining = max(0.1, deadline - time.monotonic())
    try:
        task = TaskClient.dial(handle.address, handle.namespace, dial_timeout=remaining, call_timeout=call_timeout)
    except TtrpcError as exc:
        raise ShimError("shim at {} is not reachable: {}".format(handle.address, exc)) from exc
    try:
        handle.pid = task.connect(handle.container_id, timeout=max(0.1, deadline - time.monotonic())).shim_pid
    except TtrpcUnimplementedError:
        handle.pid = _pid_from_file(os.path.join(handle.bundle, "shim.pid"))  # it answered: enough for a probe
    except TtrpcError as exc:
        task.close()
        raise ShimError("shim at {} does not answer: {}".format(handle.address, exc)) from exc
    handle.start_time = _start_time_quiet(handle.pid)
    return task


def _pid_from_file(path: str) -> int:
    text = _read_quiet(path)
    return int(text) if text.isdigit() else 0


def _start_time_quiet(pid: int) -> str:
    if pid <= 0:
        return ""
    try:
        return ProcessIdentity.of(pid).start_time
    except (NotFoundError, NotInitializedError):
        return ""


def _abandon(handle: ShimHandle, running_before: Sequence[int]) -> None:
    """Undo a failed start: close the client, kill daemons we spawned, remove a dead socket, the FIFO."""
    if handle.task is not None:
        handle.task.close()
        handle.task = None
    spawned = [pid for pid in find_shim_pids(handle.bundle, handle.container_id, handle.namespace)
               if pid not in running_before]
    for pid in spawned:
        identity = ProcessIdentity(pid, _start_time_quiet(pid))
        if identity.start_time and identity.signal(signal.SIGKILL):
            identity.wait_gone(5.0)
    address = handle.address or _read_quiet(os.path.join(handle.bundle, "address"))
    if address and not _answers(address):
        _remove_socket_quiet(address)
        if spawned or not running_before:
            _unlink_quiet(os.path.join(handle.bundle, "address"))
            _unlink_quiet(os.path.join(handle.bundle, "shim.pid"))
    if handle.log is not None:
        handle.log.close(remove=handle.log.created)
        handle.log = None


def _answers(address: str) -> bool:
    """True if something accepts connections on ``address`` (a live socket must not be removed)."""
    try:
        sock = dial(address, timeout=1.0)
    except TtrpcError:
        return False
    sock.close()
    return True


def _read_quiet(path: str) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def shutdown_and_cleanup(handle: ShimHandle, timeout: float = 10.0, force: bool = False) -> bool:
    """Stop a shim and remove what it leaves; True if it exited by itself, False if it had to be killed.

    Sends ``Shutdown{id}`` (a lost reply is fine), closes the connection and waits (pidfd) up to
    ``timeout`` for the shim to exit. A shim that still has tasks does not exit: without
    ``force`` that is a ``ShimError`` and nothing is removed (delete the tasks first). With
    ``force`` it is killed, and in every case the shim's own ``delete`` action then runs (what
    containerd does after a shim died): it force-deletes the runc container and unmounts the
    rootfs, and is harmless when there is nothing left. Finally the socket file, the log FIFO
    and ``<bundle>/address``/``shim.pid`` are removed.
    """
    deadline = time.monotonic() + timeout
    shutdown_error: Optional[BaseException] = None
    if handle.task is not None:
        try:
            handle.task.shutdown(handle.container_id, timeout=max(0.1, deadline - time.monotonic()))
        except TtrpcError as exc:
            shutdown_error = exc
        handle.task.close()
        handle.task = None
    identity = handle.identity
    exited = identity is None or identity.wait_gone(max(0.0, deadline - time.monotonic()))
    if not exited:
        if not force:
            raise ShimError("shim pid {} for {} is still running after Shutdown{}; delete its tasks first or "
                            "use force".format(handle.pid, handle.container_id,
                                               " ({})".format(shutdown_error) if shutdown_error else ""))
        identity.signal(signal.SIGKILL)
        identity.wait_gone(5.0)
    delete_error: Optional[ShimError] = None
    if force:
        try:
            run_shim_delete(handle)
        except ShimError as exc:
            delete_error = exc
    _remove_socket_quiet(handle.address)
    for name in ("address", "shim.pid"):
        _unlink_quiet(os.path.join(handle.bundle, name))
    if handle.log is not None:
        handle.log.close(remove=True)
        handle.log = None
    else:
        _unlink_quiet(os.path.join(handle.bundle, "log"))
    if delete_error is not None:
        raise delete_error
    return exited


def run_shim_delete(handle: ShimHandle, timeout: float = 30.0) -> ExitResponse:
    """Run ``<shim> ... -id ID -bundle B delete``: clean up after a dead shim (runc state, mounts).

    This is what containerd does when a shim dies; its stdout is a ``DeleteResponse``. The runc
    shim (1.6) looks for its files in ``dirname(bundle)/<id>``, i.e. it assumes containerd's
    layout where the bundle directory is named after the container, and it takes that
    directory from its working directory. When our bundle is named otherwise, the action runs
    in a temporary ``<tmp>/<id>`` symlink to the bundle (with ``$PWD`` set to it, which Go's
    ``os.Getwd`` prefers to resolving the link).
    """
    bundle = os.path.realpath(handle.bundle)
    alias_dir = None
    if os.path.basename(bundle) != handle.container_id:
        alias_dir = tempfile.mkdtemp(prefix="dloci-shim-delete-")
        os.symlink(bundle, os.path.join(alias_dir, handle.container_id))
        bundle = os.path.join(alias_dir, handle.container_id)
    argv = [handle.shim_path, "-namespace", handle.namespace, "-address", "", "-publish-binary", "/bin/true",
            "-id", handle.container_id, "-bundle", bundle, "delete"]
    try:
        env = _shim_env(None)
        env["PWD"] = bundle  # Go's os.Getwd trusts $PWD when it names the cwd: keeps the alias unresolved
        done = run_command(argv, cwd=bundle, env=env, check=False, timeout=timeout)
    finally:
        if alias_dir is not None:
            shutil.rmtree(alias_dir, ignore_errors=True)
    if done.returncode != 0:
        raise ShimError("shim delete for {} failed (status {}): {}".format(
            handle.container_id, done.returncode, _text(done.stderr or done.stdout)))
    try:
        decoded = DELETE_RESPONSE.decode(done.stdout)
    except ProtoError as exc:
        raise ShimError("shim delete printed an undecodable reply: {}".format(exc)) from exc
    return _exit_response(decoded, pid=decoded["pid"])


def _remove_socket_quiet(address: str) -> None:
    """Remove a filesystem socket named by ``address`` (abstract sockets vanish by themselves)."""
    if not address:
        return
    try:
        label, sockaddr = resolve_address(address)
    except TtrpcError:
        return
    if not sockaddr.startswith("\0"):
        try:
            if stat.S_ISSOCK(os.lstat(label).st_mode):
                os.unlink(label)
        except OSError:
            pass


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()[:2000]
