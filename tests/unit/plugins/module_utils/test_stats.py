"""Stats parsers and readers on canned cgroup v1 and v2 file contents (no container needed).

The canned texts are shaped like what a 6.x kernel prints (taken from this machine's v1
hierarchy and from the cgroup v2 documentation's file formats); the directory tests lay them out
as a cgroup directory so the readers run exactly as they do on /sys/fs/cgroup.
"""
from __future__ import annotations

import os
from typing import Dict

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import cgroups, stats
from ansible_collections.daemonless.oci.plugins.module_utils.errors import NotFoundError, OciError

GIB = 1024 ** 3
V1_UNLIMITED = "9223372036854771712\n"

V1_MEMORY_STAT = """cache 8192
rss 53248
inactive_file 4096
active_file 0
hierarchical_memory_limit 9223372036854771712
total_cache 10493952
total_rss 67371008
total_rss_huge 0
total_inactive_anon 67100672
total_inactive_file 10485760
total_active_file 8192
"""

V1_BLKIO_BYTES = """254:0 Read 4096
254:0 Write 10485760
254:0 Sync 10485760
254:0 Async 4096
254:0 Discard 0
254:0 Total 10489856
8:16 Read 512
8:16 Write 0
8:16 Total 512
Total 10490368
"""

V1_BLKIO_OPS = """254:0 Read 1
254:0 Write 10
254:0 Sync 10
254:0 Async 1
254:0 Discard 0
254:0 Total 11
Total 11
"""

V2_CPU_STAT = """usage_usec 1500000
user_usec 1200000
system_usec 300000
core_sched.force_idle_usec 0
nr_periods 40
nr_throttled 7
throttled_usec 250000
nr_bursts 0
burst_usec 0
"""

V2_MEMORY_STAT = """anon 67108864
file 10485760
kernel 1048576
inactive_anon 67000000
active_anon 108864
inactive_file 4194304
active_file 6291456
"""

V2_IO_STAT = """254:0 rbytes=4096 wbytes=10485760 rios=1 wios=10 dbytes=0 dios=0
8:16 rbytes=512 wbytes=0 rios=1 wios=0 dbytes=0 dios=0
"""

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1048576     731    0    0    0     0          0         0  1048576     731    0    0    0     0       0          0
  eth0: 5000000000  4000    1    2    0     0          0         0     7000      60    3    4    0     0       0          0
"""


def _write_dir(path: str, files: Dict[str, str]) -> str:
    os.makedirs(path, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as handle:
            handle.write(text)
    return path


def v1_tree(root: str) -> Dict[str, str]:
    """A container's cgroup in five v1 hierarchies, as runc lays it out."""
    return {
        "cpuacct": _write_dir(os.path.join(root, "cpuacct", "c1"), {
            "cpuacct.usage": "1500000000\n",
            "cpuacct.stat": "user {}\nsystem {}\n".format(
                120 * os.sysconf("SC_CLK_TCK") // 100, 30 * os.sysconf("SC_CLK_TCK") // 100)}),
        "cpu": _write_dir(os.path.join(root, "cpu", "c1"), {
            "cpu.stat": "nr_periods 40\nnr_throttled 7\nthrottled_time 250000000\nnr_bursts 0\nburst_time 0\n"}),
        "memory": _write_dir(os.path.join(root, "memory", "nested", "c1"), {
            "memory.usage_in_bytes": "83886080\n", "memory.limit_in_bytes": V1_UNLIMITED,
            "memory.stat": V1_MEMORY_STAT, "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"}),
        "pids": _write_dir(os.path.join(root, "pids", "c1"), {"pids.current": "21\n", "pids.max": "max\n"}),
        "blkio": _write_dir(os.path.join(root, "blkio", "c1"), {
            "blkio.throttle.io_service_bytes_recursive": V1_BLKIO_BYTES,
            "blkio.throttle.io_serviced_recursive": V1_BLKIO_OPS}),
    }


def v2_tree(root: str) -> str:
    return _write_dir(os.path.join(root, "unified", "c1"), {
        "cpu.stat": V2_CPU_STAT, "memory.current": "83886080\n", "memory.max": str(GIB) + "\n",
        "memory.stat": V2_MEMORY_STAT, "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "pids.current": "21\n", "pids.max": "100\n", "io.stat": V2_IO_STAT})


# ------------------------------------------------------------------ pure parsers

def test_parse_value_reads_numbers_and_max() -> None:
    assert stats.parse_value("83886080\n") == 83886080
    assert stats.parse_value("max\n") is None
    with pytest.raises(ValueError):
        stats.parse_value("")


def test_parse_flat_keyed_skips_malformed_lines() -> None:
    parsed = stats.parse_flat_keyed("a 1\nbroken\nb x\nc 3 4\nd 5\n")
    assert parsed == {"a": 1, "d": 5}


def test_blkio_v1_keeps_devices_and_drops_total() -> None:
    parsed = stats.parse_blkio_v1(V1_BLKIO_BYTES)
    assert set(parsed) == {"254:0", "8:16"}
    assert parsed["254:0"]["write"] == 10485760 and parsed["254:0"]["total"] == 10489856


def test_io_stat_v2() -> None:
    parsed = stats.parse_io_stat_v2(V2_IO_STAT + "\n253:0\n")
    assert parsed["254:0"] == {"rbytes": 4096, "wbytes": 10485760, "rios": 1, "wios": 10, "dbytes": 0, "dios": 0}
    assert parsed["253:0"] == {}


def test_net_dev_reads_every_interface() -> None:
    parsed = stats.parse_net_dev(NET_DEV)
    assert sorted(parsed) == ["eth0", "lo"]
    assert parsed["eth0"] == stats.InterfaceStats(5000000000, 4000, 1, 2, 7000, 60, 3, 4)
    assert parsed["lo"].rx_bytes == parsed["lo"].tx_bytes == 1048576


# ------------------------------------------------------------------ layout resolution

def test_resolve_v1_follows_the_nested_memory_path(tmp_path) -> None:
    root = str(tmp_path)
    mounts = cgroups.CgroupMounts(v1={name: os.path.join(root, name) for name in
                                      ("cpu", "cpuacct", "memory", "pids", "blkio")},
                                  unified=os.path.join(root, "unified"))
    mapping = cgroups.parse_proc_cgroup("8:pids:/c1\n7:blkio:/c1\n4:memory:/nested/c1\n2:cpuacct:/c1\n"
                                        "1:cpu:/c1\n0::/c1\n")
    dirs = stats.resolve_dirs(mounts, mapping)
    assert dirs.memory == ("v1", os.path.join(root, "memory", "nested", "c1"))
    assert dirs.cpu == ("v1", os.path.join(root, "cpuacct", "c1"), os.path.join(root, "cpu", "c1"))
    assert dirs.io == ("v1", os.path.join(root, "blkio", "c1"))


def test_resolve_v2_uses_the_unified_entry(tmp_path) -> None:
    unified = str(tmp_path)
    mounts = cgroups.CgroupMounts(v1={}, unified=unified)
    dirs = stats.resolve_dirs(mounts, cgroups.parse_proc_cgroup("0::/system.slice/crio-x.scope\n"))
    expected = os.path.join(unified, "system.slice", "crio-x.scope")
    assert dirs.memory == dirs.pids == dirs.io == ("v2", expected)
    assert dirs.cpu == ("v2", expected, expected)


def test_resolve_v1_systemd_scope(tmp_path) -> None:
    """The systemd cgroup manager's slice/scope path is taken as the kernel reports it."""
    root = str(tmp_path)
    mounts = cgroups.CgroupMounts(v1={name: os.path.join(root, name) for name in ("cpu", "cpuacct", "memory")})
    mapping = cgroups.parse_proc_cgroup("4:memory:/system.slice/crio-abc.scope\n"
                                        "2:cpu,cpuacct:/system.slice/crio-abc.scope\n")
    dirs = stats.resolve_dirs(mounts, mapping)
    assert dirs.memory == ("v1", os.path.join(root, "memory", "system.slice", "crio-abc.scope"))
    assert dirs.pids is None and dirs.io is None  # not mounted: reported missing, never guessed


def test_root_cgroup_is_never_read_as_the_container(tmp_path) -> None:
    """A process in the root cgroup would otherwise report the whole host's figures."""
    mounts = cgroups.CgroupMounts(v1={"memory": str(tmp_path)}, unified=str(tmp_path))
    dirs = stats.resolve_dirs(mounts, cgroups.parse_proc_cgroup("4:memory:/\n0::/\n"))
    assert dirs.memory is None and dirs.cpu is None and dirs.pids is None


# ------------------------------------------------------------------ readers on canned directories

def test_v1_readers(tmp_path) -> None:
    tree = v1_tree(str(tmp_path))
    result = stats.ContainerStats()
    stats._read_cpu(result, ("v1", tree["cpuacct"], tree["cpu"]))
    stats._read_memory(result, ("v1", tree["memory"]))
    stats._read_pids(result, ("v1", tree["pids"]))
    stats._read_io(result, ("v1", tree["blkio"]))
    assert (result.cpu_nano, result.cpu_user_nano, result.cpu_system_nano) == (1500000000, 1200000000, 300000000)
    assert (result.cpu_throttled_periods, result.cpu_throttled_nano) == (7, 250000000)
    assert result.mem_usage == 83886080
    assert result.mem_raw_limit is None and result.mem_limit == stats.host_memory_bytes()
    assert result.working_set_bytes == 83886080 - 10485760  # usage - total_inactive_file
    assert (result.mem_rss, result.mem_cache, result.oom_events) == (67371008, 10493952, 2)
    assert result.mem_perc == pytest.approx(83886080 / stats.host_memory_bytes())
    assert (result.pids, result.pids_limit) == (21, None)
    vda = result.block_devices["254:0"]
    assert (vda.read_bytes, vda.write_bytes, vda.read_ops, vda.write_ops) == (4096, 10485760, 1, 10)
    assert (result.block_input, result.block_output) == (4096 + 512, 10485760)


def test_v2_readers(tmp_path) -> None:
    directory = v2_tree(str(tmp_path))
    result = stats.ContainerStats()
    stats._read_cpu(result, ("v2", directory, directory))
    stats._read_memory(result, ("v2", directory))
    stats._read_pids(result, ("v2", directory))
    stats._read_io(result, ("v2", directory))
    assert (result.cpu_nano, result.cpu_user_nano, result.cpu_system_nano) == (1500000000, 1200000000, 300000000)
    assert (result.cpu_throttled_periods, result.cpu_throttled_nano) == (7, 250000000)
    assert result.mem_raw_limit == GIB and result.mem_limit == min(GIB, stats.host_memory_bytes())
    assert result.mem_perc == pytest.approx(83886080 / result.mem_limit)
    assert result.working_set_bytes == 83886080 - 4194304
    assert (result.mem_rss, result.mem_cache, result.oom_events) == (67108864, 10485760, 1)
    assert (result.pids, result.pids_limit) == (21, 100)
    assert result.block_devices["8:16"].read_ops == 1
    assert (result.block_input, result.block_output) == (4096 + 512, 10485760)


def test_v2_memory_max_means_host_memory(tmp_path) -> None:
    directory = v2_tree(str(tmp_path))
    with open(os.path.join(directory, "memory.max"), "w") as handle:
        handle.write("max\n")
    result = stats.ContainerStats()
    stats._read_memory(result, ("v2", directory))
    assert result.mem_raw_limit is None and result.mem_limit == stats.host_memory_bytes()


def test_cpu_file_missing_reads_zero_like_the_reference(tmp_path) -> None:
    directory = _write_dir(str(tmp_path / "empty"), {})
    result = stats.ContainerStats()
    stats._read_cpu(result, ("v2", directory, directory))
    stats._read_io(result, ("v2", directory))
    assert result.cpu_nano == 0 and result.block_devices == {}


def test_memory_file_missing_is_an_error(tmp_path) -> None:
    directory = _write_dir(str(tmp_path / "m"), {"memory.current": "1\n"})
    with pytest.raises(stats._CgroupGone):
        stats._read_memory(stats.ContainerStats(), ("v2", directory))


def test_working_set_zero_with_warning_when_inactive_file_is_larger(tmp_path) -> None:
    directory = v2_tree(str(tmp_path))
    with open(os.path.join(directory, "memory.current"), "w") as handle:
        handle.write("4096\n")
    result = stats.ContainerStats()
    stats._read_memory(result, ("v2", directory))
    assert result.working_set_bytes == 0
    assert any("inactive_file" in warning for warning in result.warnings)


def test_working_set_zero_with_warning_without_memory_stat(tmp_path) -> None:
    directory = v2_tree(str(tmp_path))
    os.unlink(os.path.join(directory, "memory.stat"))
    result = stats.ContainerStats()
    stats._read_memory(result, ("v2", directory))
    assert result.working_set_bytes == 0 and result.warnings


# ------------------------------------------------------------------ derived values and shapes

def test_cpu_percent_is_percent_of_one_core() -> None:
    before = stats.ContainerStats(cpu_nano=1_000_000_000, monotonic_ns=10_000_000_000)
    after = stats.ContainerStats(cpu_nano=1_750_000_000, monotonic_ns=10_500_000_000)
    stats.set_cpu_percent(before, after)
    assert after.cpu == pytest.approx(150.0)  # 0.75 s of CPU in 0.5 s: one and a half cores


def test_cpu_percent_left_unset_when_a_sample_is_missing() -> None:
    after = stats.ContainerStats(cpu_nano=5, monotonic_ns=5)
    stats.set_cpu_percent(stats.ContainerStats.stopped("x"), after)
    assert after.cpu is None


def test_to_dict_shape_for_running_and_stopped() -> None:
    running = stats.ContainerStats(container="c", system_nano=1_700_000_000_123_456_789, mem_usage=50,
                                   mem_limit=200, mem_perc=0.25, cpu=12.3456,
                                   networks={"lo": stats.InterfaceStats(rx_bytes=1)})
    shaped = running.to_dict()
    assert shaped["status"] == "running" and shaped["timestamp"] == "2023-11-14T22:13:20.123456Z"
    assert shaped["memory"]["percent"] == 25.0 and shaped["cpu"]["percent"] == 12.35
    assert shaped["network"]["lo"]["rx_bytes"] == 1 and shaped["host_network"] is False
    assert set(shaped) >= {"cpu", "memory", "pids", "network", "block_io", "timestamp"}
    hosted = stats.ContainerStats(container="h", host_network=True, network_available=False).to_dict()
    assert hosted["network"] is None and hosted["host_network"] is True
    stopped = stats.ContainerStats.stopped("s").to_dict()
    assert stopped["status"] == "stopped" and "cpu" not in stopped and "memory" not in stopped


def test_collect_refuses_a_recycled_pid() -> None:
    """Our own pid with a start time that is not its own reads as a different process."""
    with pytest.raises(NotFoundError):
        stats.collect(os.getpid(), "1", host_network=False)


def test_collect_many_reports_a_gone_pid_as_stopped() -> None:
    target = stats.StatsTarget(pid=os.getpid(), start_time="1", container_id="gone")
    (result,) = stats.collect_many([target])
    assert result.running is False and result.container == "gone"


def test_collect_own_process_flags_host_network_and_missing_cgroups() -> None:
    """This test process shares the host's netns: it must say so rather than report host counters."""
    from ansible_collections.daemonless.oci.plugins.module_utils.procutil import start_time
    result = stats.collect(os.getpid(), start_time(os.getpid()), host_network=False)
    assert result.host_network is True and result.networks == {} and result.net_input == 0
    assert result.running


def test_collect_without_pid_is_not_initialized() -> None:
    with pytest.raises(OciError):
        stats.collect(0, "", host_network=False)


class fake_Container:  # fake: only the attributes collect_containers reads, for the no-pid branches
    def __init__(self, container_id: str, pid: int, start: str, spoofed: bool = False) -> None:
        self.id, self.is_spoofed = container_id, spoofed
        self.state = type("State", (), {"init_pid": pid, "init_start_time": start})()


def test_collect_containers_keeps_order_and_marks_unreadable_ones_stopped() -> None:
    from ansible_collections.daemonless.oci.plugins.module_utils.procutil import start_time
    me = fake_Container("me", os.getpid(), start_time(os.getpid()))
    results = stats.collect_containers([fake_Container("spoofed", 0, "", spoofed=True), me,
                                        fake_Container("never-started", 0, ""),
                                        fake_Container("gone", os.getpid(), "1")])
    assert [r.container for r in results] == ["spoofed", "me", "never-started", "gone"]
    assert [r.running for r in results] == [False, True, False, False]
