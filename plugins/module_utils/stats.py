"""Container statistics read straight from the kernel: cgroup v1 or v2 files and /proc/PID/net/dev.

The reference (CRI-O ``ContainerStats``, behaviour spec 1.10) loads the cgroup through a library
and fills ``CPU``, ``CPUNano``, ``SystemNano``, ``MemUsage``, ``MemLimit``, ``MemPerc``,
``NetInput``, ``NetOutput``, ``BlockInput``, ``BlockOutput``, ``PIDs`` and ``WorkingSetBytes``.
This file computes the same numbers the same way, with four deliberate differences:

* The cgroup is found from the container's own ``/proc/PID/cgroup``, per controller, never
  computed from its id: on hybrid hosts runc nests the memory cgroup under the caller's cgroup
  (known problem 16: reading the wrong cgroup reported pod totals for every container).
* ``cpu`` is a real percentage from two samples, ``delta usage / delta wall x 100``, i.e. percent
  of ONE core, as docker and podman print it (100 = one core busy, 200 = two). The reference's
  number divides lifetime CPU by the time since 1970 and is 0 on cgroup v2 (known problem 17), so
  it is not reproduced. A single sample gives ``cpu = None``.
* Network covers every interface of the container's network namespace, not only ``eth0``. A
  container that shares the host's namespace reports ``host_network`` and no counters, because
  the host's counters are not the container's.
* gVisor (runsc) sandboxes are recognised by their executable: cgroup figures are the whole
  sandbox's (Sentry, gofer and ptrace stubs), ``pids`` counts the sandbox's host tasks, and the
  network is gVisor's own user-space stack, which the host cannot see, so it is not reported.

Cost: each container is one pass over its files (about 12 small reads through ``os.open`` /
``os.read``, no subprocess); ``collect_many`` sleeps once for all containers when an interval is
asked for. The pid's start time is re-checked through a ``/proc/PID`` directory descriptor that
is opened first, so a recycled pid's cgroup is never read (known problem 9).

Kernel note measured on the project's machines (kernel 6.x, cgroup v1): the v1 files
``blkio.throttle.io_service_bytes*`` count only on devices where blk-throttle is active, which
since kernel 6.10 means a throttle limit was set on that device by some cgroup. Without one,
block figures read 0 even for O_DIRECT writes; this is the kernel's figure, reported as is.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils import cgroups
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    NotFoundError,
    NotInitializedError,
    OciError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity

MAX_U64 = 2 ** 64 - 1           # what the reference makes of "max"
UNLIMITED_FROM = 2 ** 62        # v1 prints ~2^63 rounded to a page for "no limit"
_READ_SIZE = 65536              # cgroup/proc seq files return everything in one read when it fits
_GVISOR_EXE = "runsc"
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC

Counters = Dict[str, int]


@dataclass
class InterfaceStats:
    """One network interface of the container's namespace (64-bit counters from /proc/PID/net/dev)."""

    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_drops: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_drops: int = 0


@dataclass
class BlockDeviceStats:
    """Block I/O of the container's cgroup on one device."""

    major: int
    minor: int
    name: str = ""
    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


@dataclass
class ContainerStats:
    """One container's figures. The first fields carry the reference's names and meanings.

    ``mem_perc`` is a FRACTION (0.25 = a quarter of the limit), as in the reference;
    ``to_dict()`` shows it as a percentage. ``cpu`` is percent of one core over the sampling
    interval, or None after a single sample.
    ``cpu_user_nano``/``cpu_system_nano`` are the kernel's split of ``cpu_nano``, scaled by the
    kernel to add up to it (v1 ``cpuacct.stat``, 10 ms resolution; v2 ``user_usec``/``system_usec``).
    v1 ``cpuacct.usage_all`` is not used: its raw tick samples can be half the real figure.
    """

    container: str = ""
    cpu: Optional[float] = None
    cpu_nano: int = 0
    system_nano: int = 0
    mem_usage: int = 0
    mem_limit: int = 0
    mem_perc: float = 0.0
    net_input: int = 0
    net_output: int = 0
    block_input: int = 0
    block_output: int = 0
    pids: int = 0
    working_set_bytes: int = 0
    # beyond the reference
    running: bool = True
    cpu_user_nano: int = 0
    cpu_system_nano: int = 0
    cpu_throttled_periods: int = 0
    cpu_throttled_nano: int = 0
    mem_rss: int = 0
    mem_cache: int = 0
    mem_raw_limit: Optional[int] = None   # None: no limit set on the cgroup
    oom_events: int = 0
    pids_limit: Optional[int] = None      # None: no limit
    networks: Dict[str, InterfaceStats] = field(default_factory=dict)
    block_devices: Dict[str, BlockDeviceStats] = field(default_factory=dict)
    host_network: bool = False
    network_available: bool = True
    sandbox: str = ""                     # "gvisor" for runsc sandboxes
    cgroup_version: str = ""              # "v1", "v2" or "hybrid" (controllers split across both)
    cgroup_paths: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    monotonic_ns: int = field(default=0, repr=False)  # when CPU usage was read (for cpu percent)

    @classmethod
    def stopped(cls, container_id: str) -> "ContainerStats":
        """A container whose init process is gone: no figures, only the time of the look."""
        return cls(container=container_id, system_nano=time.time_ns(), running=False)

    @property
    def timestamp(self) -> str:
        """``system_nano`` as an RFC 3339 UTC time."""
        seconds, nanos = divmod(self.system_nano, 1_000_000_000)
        moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
        return "{}.{:06d}Z".format(moment.strftime("%Y-%m-%dT%H:%M:%S"), nanos // 1000)

    def to_dict(self) -> Dict[str, Any]:
        """The ``oci_stats`` module's shape for this container."""
        result: Dict[str, Any] = {"id": self.container, "status": "running" if self.running else "stopped",
                                  "timestamp": self.timestamp, "timestamp_ns": self.system_nano}
        if not self.running:
            return result
        result.update(self._sections())
        return result

    def _sections(self) -> Dict[str, Any]:
        """The figures of a running container, grouped as the module documents them."""
        return {
            "cpu": {"usage_ns": self.cpu_nano, "user_ns": self.cpu_user_nano, "system_ns": self.cpu_system_nano,
                    "throttled_periods": self.cpu_throttled_periods, "throttled_ns": self.cpu_throttled_nano,
                    "percent": None if self.cpu is None else round(self.cpu, 2)},
            "memory": {"usage_bytes": self.mem_usage, "working_set_bytes": self.working_set_bytes,
                       "rss_bytes": self.mem_rss, "cache_bytes": self.mem_cache, "limit_bytes": self.mem_limit,
                       "cgroup_limit_bytes": self.mem_raw_limit, "percent": round(self.mem_perc * 100, 2),
                       "oom_events": self.oom_events},
            "pids": {"current": self.pids, "limit": self.pids_limit},
            "network": {name: vars(counters).copy() for name, counters in self.networks.items()}
            if self.network_available and not self.host_network else None,
            "host_network": self.host_network,
            "block_io": {key: vars(device).copy() for key, device in self.block_devices.items()},
            "block_io_total": {"read_bytes": self.block_input, "write_bytes": self.block_output},
            "cgroup_version": self.cgroup_version,
            "sandbox": self.sandbox or None,
            "warnings": list(self.warnings),
        }


@dataclass
class StatsTarget:
    """What ``collect_many`` needs to know about one container."""

    pid: int
    start_time: str
    container_id: str = ""
    host_network: bool = False


# ---------------------------------------------------------------- parsers (pure, tested on canned text)

def parse_value(text: str) -> Optional[int]:
    """A single-number cgroup file; ``max`` (no limit) is None."""
    value = text.strip()
    if value == "max":
        return None
    return int(value)


def parse_flat_keyed(text: str) -> Counters:
    """``key value`` lines (memory.stat, cpu.stat, memory.events, memory.oom_control) into a dict.

    Lines that are not exactly two fields or whose value is not an integer are skipped, so a
    kernel that adds a key of a new shape does not break the reader. The common case (every line
    ``key value``) takes a fast path: this runs on memory.stat (~50 lines) for every container.
    """
    words = text.split()
    if len(words) == 2 * text.count("\n") and all(value.isdigit() for value in words[1::2]):
        return dict(zip(words[::2], map(int, words[1::2])))
    result: Counters = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                result[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return result


def parse_blkio_v1(text: str) -> Dict[str, Counters]:
    """v1 ``blkio.throttle.io_service*`` lines ``MAJ:MIN Op Value`` into {"MAJ:MIN": {op: value}}.

    Ops are lower-cased; the trailing ``Total N`` line (no device) is dropped.
    """
    result: Dict[str, Counters] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and ":" in parts[0]:
            result.setdefault(parts[0], {})[parts[1].lower()] = int(parts[2])
    return result


def parse_io_stat_v2(text: str) -> Dict[str, Counters]:
    """v2 ``io.stat`` lines ``MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=..`` into {"MAJ:MIN": {key: value}}."""
    result: Dict[str, Counters] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        counters = result.setdefault(parts[0], {})
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if sep and value.isdigit():
                counters[key] = int(value)
    return result


def parse_net_dev(text: str) -> Dict[str, InterfaceStats]:
    """Every interface of ``/proc/PID/net/dev`` (the namespace of that pid).

    Columns after ``name:`` are 8 receive counters then 8 transmit counters; we keep bytes,
    packets, errs and drop of each direction.
    """
    result: Dict[str, InterfaceStats] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 12:
            continue
        numbers = [int(value) for value in fields[:12]]
        result[name.strip()] = InterfaceStats(numbers[0], numbers[1], numbers[2], numbers[3],
                                              numbers[8], numbers[9], numbers[10], numbers[11])
    return result


# ---------------------------------------------------------------- host facts

_HOST_MEMORY: List[int] = []
_DEVICE_NAMES: Dict[str, str] = {}
_TICK_NANOS: List[int] = []


def host_memory_bytes() -> int:
    """Total RAM (the reference's ``sysinfo.totalram``), read once per process."""
    if not _HOST_MEMORY:
        _HOST_MEMORY.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return _HOST_MEMORY[0]


def device_name(key: str) -> str:
    """Kernel name of block device ``MAJ:MIN`` (``vda``), from /sys/dev/block; cached."""
    if key not in _DEVICE_NAMES:
        try:
            _DEVICE_NAMES[key] = os.path.basename(os.readlink("/sys/dev/block/" + key))
        except OSError:
            _DEVICE_NAMES[key] = ""
    return _DEVICE_NAMES[key]


def _nanos_per_tick() -> int:
    """v1 ``cpuacct.stat`` counts in USER_HZ ticks (100 per second on Linux)."""
    if not _TICK_NANOS:
        _TICK_NANOS.append(1_000_000_000 // os.sysconf("SC_CLK_TCK"))
    return _TICK_NANOS[0]


def _own_netns_inode() -> int:
    """Inode of this process's network namespace: the host's when the module runs on the host."""
    return os.stat("/proc/self/ns/net").st_ino


# ---------------------------------------------------------------- file access

def _read(path: str, dir_fd: Optional[int] = None) -> Optional[str]:
    """Whole text of a small kernel file, or None when it does not exist.

    One ``read`` normally returns a seq file whole; a full buffer means there may be more.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        chunk = os.read(fd, _READ_SIZE)
        if len(chunk) < _READ_SIZE:
            return chunk.decode("ascii", "replace")
        parts = [chunk]
        while chunk:
            chunk = os.read(fd, _READ_SIZE)
            parts.append(chunk)
        return b"".join(parts).decode("ascii", "replace")
    finally:
        os.close(fd)


def _required(directory: str, name: str) -> str:
    """A file the reference treats as mandatory (memory and pids numbers)."""
    text = _read(directory + "/" + name)
    if text is None:
        raise _CgroupGone(directory + "/" + name)
    return text


class _CgroupGone(Exception):
    """A mandatory cgroup file vanished: the container stopped under us, or its cgroup is not ours."""


# ---------------------------------------------------------------- controller readers

@dataclass
class _Dirs:
    """Where each group of figures is read, and from which cgroup version."""

    cpu: Optional[Tuple[str, str, str]] = None   # (version, cpuacct-or-unified dir, cpu dir)
    memory: Optional[Tuple[str, str]] = None
    pids: Optional[Tuple[str, str]] = None
    io: Optional[Tuple[str, str]] = None


def resolve_dirs(mounts: cgroups.CgroupMounts, mapping: Dict[str, str]) -> _Dirs:
    """Pick, per controller, the v1 hierarchy when the host mounts it there, else the unified one.

    A controller whose cgroup is the root (``/``) is left out: its files are the host's totals,
    not the container's.
    """
    def locate(v1_name: str) -> Optional[Tuple[str, str]]:
        if v1_name in mounts.v1:
            path = cgroups.controller_dir(mounts, mapping, v1_name)
            if path and mapping.get(v1_name, "/") != "/":
                return "v1", path
            return None
        path = cgroups.controller_dir(mounts, mapping, cgroups.UNIFIED)
        if path and mapping.get(cgroups.UNIFIED, "/") != "/":
            return "v2", path
        return None

    dirs = _Dirs(memory=locate("memory"), pids=locate("pids"), io=locate("blkio"))
    cpuacct = locate("cpuacct")
    if cpuacct is not None:
        cpu = locate("cpu") if cpuacct[0] == "v1" else cpuacct
        dirs.cpu = (cpuacct[0], cpuacct[1], cpu[1] if cpu else "")
    return dirs


def _read_cpu(stats: ContainerStats, where: Tuple[str, str, str]) -> None:
    """CPU usage (reference: missing file -> 0), user/system split and CFS throttling."""
    version, usage_dir, cpu_dir = where
    stats.monotonic_ns = time.monotonic_ns()
    if version == "v1":
        usage = _read(usage_dir + "/cpuacct.usage")
        stats.cpu_nano = int(usage) if usage else 0
        split = parse_flat_keyed(_read(usage_dir + "/cpuacct.stat") or "")
        stats.cpu_user_nano = split.get("user", 0) * _nanos_per_tick()
        stats.cpu_system_nano = split.get("system", 0) * _nanos_per_tick()
        throttle = parse_flat_keyed(_read(cpu_dir + "/cpu.stat") or "") if cpu_dir else {}
        stats.cpu_throttled_periods = throttle.get("nr_throttled", 0)
        stats.cpu_throttled_nano = throttle.get("throttled_time", 0)
        return
    counters = parse_flat_keyed(_read(usage_dir + "/cpu.stat") or "")
    stats.cpu_nano = counters.get("usage_usec", 0) * 1000
    stats.cpu_user_nano = counters.get("user_usec", 0) * 1000
    stats.cpu_system_nano = counters.get("system_usec", 0) * 1000
    stats.cpu_throttled_periods = counters.get("nr_throttled", 0)
    stats.cpu_throttled_nano = counters.get("throttled_usec", 0) * 1000


def _read_memory(stats: ContainerStats, where: Tuple[str, str]) -> None:
    """Usage, limit (capped at host RAM), working set, rss/cache and OOM kills."""
    version, directory = where
    v1 = version == "v1"
    stats.mem_usage = parse_value(_required(directory, "memory.usage_in_bytes" if v1 else "memory.current")) or 0
    raw = parse_value(_required(directory, "memory.limit_in_bytes" if v1 else "memory.max"))
    stats.mem_raw_limit = raw if raw is not None and raw < UNLIMITED_FROM else None
    stats.mem_limit = min(MAX_U64 if raw is None else raw, host_memory_bytes())
    stats.mem_perc = stats.mem_usage / stats.mem_limit if stats.mem_limit else 0.0
    memory_stat = _read(directory + "/memory.stat")
    counters = parse_flat_keyed(memory_stat or "")
    prefix = "total_" if v1 else ""
    stats.mem_rss = counters.get("total_rss" if v1 else "anon", 0)
    stats.mem_cache = counters.get("total_cache" if v1 else "file", 0)
    _working_set(stats, counters.get(prefix + "inactive_file"), memory_stat is not None)
    events = _read(directory + ("/memory.oom_control" if v1 else "/memory.events"))
    stats.oom_events = parse_flat_keyed(events or "").get("oom_kill", 0)


def _working_set(stats: ContainerStats, inactive_file: Optional[int], have_stat: bool) -> None:
    """usage - inactive_file when usage is larger; otherwise 0 with a warning (the reference's rule)."""
    if not have_stat or inactive_file is None:
        stats.warnings.append("memory.stat has no inactive_file: working set reported as 0")
        return
    if stats.mem_usage > inactive_file:
        stats.working_set_bytes = stats.mem_usage - inactive_file
    else:
        stats.warnings.append("memory usage {} is not above inactive_file {}: working set reported as 0".format(
            stats.mem_usage, inactive_file))


def _read_pids(stats: ContainerStats, where: Tuple[str, str]) -> None:
    """Tasks (threads included, as the kernel counts them) and the pids limit."""
    stats.pids = parse_value(_required(where[1], "pids.current")) or 0
    stats.pids_limit = parse_value(_read(where[1] + "/pids.max") or "max")


def _read_io(stats: ContainerStats, where: Tuple[str, str]) -> None:
    """Per-device bytes and ops; totals sum only the ``read``/``write`` ops like the reference."""
    version, directory = where
    if version == "v1":
        size = parse_blkio_v1(_read(directory + "/blkio.throttle.io_service_bytes_recursive") or "")
        ops = parse_blkio_v1(_read(directory + "/blkio.throttle.io_serviced_recursive") or "")
        keys = ("read", "write", "read", "write")
    else:
        size = ops = parse_io_stat_v2(_read(directory + "/io.stat") or "")
        keys = ("rbytes", "wbytes", "rios", "wios")
    for device in sorted(set(size) | set(ops)):
        major, _unused, minor = device.partition(":")
        entry = BlockDeviceStats(int(major), int(minor), device_name(device),
                                 size.get(device, {}).get(keys[0], 0), size.get(device, {}).get(keys[1], 0),
                                 ops.get(device, {}).get(keys[2], 0), ops.get(device, {}).get(keys[3], 0))
        stats.block_devices[device] = entry
        stats.block_input += entry.read_bytes
        stats.block_output += entry.write_bytes


def _read_network(stats: ContainerStats, proc_fd: int, host_netns: int) -> None:
    """Every interface of the container's namespace, unless that namespace is the host's."""
    if stats.host_network or os.stat("ns/net", dir_fd=proc_fd).st_ino == host_netns:
        stats.host_network = True
        stats.network_available = False
        return
    if stats.sandbox == "gvisor":
        stats.network_available = False
        stats.warnings.append("runsc: the container's network is gVisor's user-space stack, invisible from "
                              "the host; network figures are not reported")
        return
    stats.networks = parse_net_dev(_read("net/dev", dir_fd=proc_fd) or "")
    for counters in stats.networks.values():
        stats.net_input += counters.rx_bytes
        stats.net_output += counters.tx_bytes


# ---------------------------------------------------------------- collection

def collect(pid: int, start_time: str, *, host_network: bool, mounts: Optional[cgroups.CgroupMounts] = None,
            container_id: str = "", host_netns: Optional[int] = None) -> ContainerStats:
    """One sample of the container whose init process is (``pid``, ``start_time``).

    Raises ``NotFoundError`` when that exact process no longer runs (exited, zombie, or the pid
    was recycled) and ``OciError`` when it runs but its cgroup cannot be read. ``host_network``
    is what the caller knows; a namespace identical to ours is flagged as host network anyway.
    """
    proc_fd = _open_proc(pid)
    try:
        ProcessIdentity(pid, start_time).verify()  # after the open: proc_fd is this process or a dead one
        return _sample(proc_fd, pid, container_id, host_network, mounts or cgroups.host_mounts(),
                       _own_netns_inode() if host_netns is None else host_netns)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NotFoundError("container process not found: pid {} exited while being read ({})".format(
            pid, exc)) from exc
    finally:
        os.close(proc_fd)


def _open_proc(pid: int) -> int:
    """A descriptor on /proc/PID; reads through it fail once that process is gone, even if the pid is reused."""
    if pid <= 0:
        raise NotInitializedError()
    try:
        return os.open("/proc/{}".format(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFoundError("container process not found: pid {} does not exist".format(pid)) from exc


def _sample(proc_fd: int, pid: int, container_id: str, host_network: bool,
            mounts: cgroups.CgroupMounts, host_netns: int) -> ContainerStats:
    """Read every figure once; the cgroup comes from the process's own /proc/PID/cgroup."""
    stats = ContainerStats(container=container_id, system_nano=time.time_ns(), host_network=host_network)
    own = _read("cgroup", dir_fd=proc_fd)
    if own is None:
        raise NotFoundError("container process not found: pid {} exited while being read".format(pid))
    mapping = cgroups.parse_proc_cgroup(own)
    dirs = resolve_dirs(mounts, mapping)
    _note_sandbox(stats, proc_fd)
    _note_layout(stats, dirs, pid)
    try:
        if dirs.cpu:
            _read_cpu(stats, dirs.cpu)
        if dirs.memory:
            _read_memory(stats, dirs.memory)
        if dirs.pids:
            _read_pids(stats, dirs.pids)
        if dirs.io:
            _read_io(stats, dirs.io)
    except _CgroupGone as exc:
        if _read("stat", dir_fd=proc_fd) is None:  # the process went away: its cgroup went with it
            raise NotFoundError("container process not found: pid {} exited while being read".format(pid)) from exc
        raise OciError("unable to obtain cgroup stats of pid {}: {} is missing".format(pid, exc)) from exc
    _read_network(stats, proc_fd, host_netns)
    return stats


def _note_sandbox(stats: ContainerStats, proc_fd: int) -> None:
    """Recognise a runsc sandbox (its host process runs the runsc binary)."""
    try:
        exe = os.readlink("exe", dir_fd=proc_fd)
    except PermissionError:
        return
    if os.path.basename(exe).startswith(_GVISOR_EXE):
        stats.sandbox = "gvisor"
        stats.warnings.append("runsc: cgroup figures cover the whole sandbox (Sentry, gofer, stubs); "
                              "pids counts the sandbox's host tasks, not the container's processes")


def _note_layout(stats: ContainerStats, dirs: _Dirs, pid: int) -> None:
    """Record which cgroup version served the figures, and say which could not be found."""
    found = {"cpu": dirs.cpu, "memory": dirs.memory, "pids": dirs.pids, "block_io": dirs.io}
    versions = sorted({where[0] for where in found.values() if where})
    stats.cgroup_version = versions[0] if len(versions) == 1 else ("hybrid" if versions else "")
    stats.cgroup_paths = {name: where[1] for name, where in found.items() if where}
    missing = sorted(name for name, where in found.items() if not where)
    if missing:
        stats.warnings.append("pid {} has no own cgroup for {}: figures reported as 0".format(pid, ", ".join(missing)))


def collect_many(targets: Sequence[StatsTarget], interval: float = 0.0, *,
                 mounts: Optional[cgroups.CgroupMounts] = None) -> List[ContainerStats]:
    """Sample every target; with ``interval`` > 0, sample again after ONE sleep and fill ``cpu``.

    The result keeps the order of ``targets``. A container that is gone (or goes between the
    samples) is ``ContainerStats.stopped``; other errors propagate.
    """
    mounts = mounts or cgroups.host_mounts()
    host_netns = _own_netns_inode()
    first = [_collect_or_stopped(target, mounts, host_netns) for target in targets]
    if interval <= 0:
        return first
    time.sleep(interval)
    second = [_collect_or_stopped(target, mounts, host_netns) if before.running else before
              for target, before in zip(targets, first)]
    for before, after in zip(first, second):
        set_cpu_percent(before, after)
    return second


def _collect_or_stopped(target: StatsTarget, mounts: cgroups.CgroupMounts, host_netns: int) -> ContainerStats:
    try:
        return collect(target.pid, target.start_time, host_network=target.host_network, mounts=mounts,
                       container_id=target.container_id, host_netns=host_netns)
    except (NotFoundError, NotInitializedError):
        return ContainerStats.stopped(target.container_id)


def set_cpu_percent(before: ContainerStats, after: ContainerStats) -> None:
    """``after.cpu`` = delta CPU ns / delta wall ns x 100 (percent of one core), when both samples ran."""
    if not (before.running and after.running):
        return
    wall = after.monotonic_ns - before.monotonic_ns
    used = after.cpu_nano - before.cpu_nano
    if wall > 0 and used >= 0:
        after.cpu = used / wall * 100.0


def collect_for_container(container: Any, interval: float = 0.0) -> ContainerStats:
    """Stats for one library ``Container`` (the reference's ``ContainerStats(c, cgroupParent)``)."""
    return collect_containers([container], interval)[0]


def collect_containers(containers: Sequence[Any], interval: float = 0.0, *,
                       mounts: Optional[cgroups.CgroupMounts] = None) -> List[ContainerStats]:
    """Stats for library ``Container`` objects, in their order: what ``oci_stats`` maps to its result.

    A spoofed container, or one without a recorded init pid, answers with its id and time only
    (``running`` False), like the reference; so does one whose init process is gone. A created
    but not yet started container has a live init process and a cgroup, so it gets figures.
    """
    targets = [_target_of(container) for container in containers]
    live = [target for target in targets if target is not None]
    sampled = iter(collect_many(live, interval, mounts=mounts) if live else [])
    return [next(sampled) if target is not None else ContainerStats.stopped(container.id)
            for container, target in zip(containers, targets)]


def _target_of(container: Any) -> Optional[StatsTarget]:
    """The (pid, start time) pair recorded at create, or None when there is nothing to read."""
    state = container.state
    if container.is_spoofed or state.init_pid <= 0 or not state.init_start_time:
        return None
    return StatsTarget(state.init_pid, state.init_start_time, container.id)
