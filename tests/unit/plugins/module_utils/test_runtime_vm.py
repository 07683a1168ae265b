"""Pure parts of the ``vm`` runtime type: the monitor's CRI log and exit file, its event loop on
real pipes (with a fake task in place of a shim), status mapping, metrics -> ContainerStats,
the per-container paths, and where the detached monitor imports the library from."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import runtime_vm, shim, vm_monitor
from ansible_collections.daemonless.oci.plugins.module_utils.conmon import read_exit_file
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.exec_sync import parse_log
from ansible_collections.daemonless.oci.plugins.module_utils.logs import parse
from ansible_collections.daemonless.oci.plugins.module_utils.state import StatePaths
from ansible_collections.daemonless.oci.plugins.module_utils.stats import ContainerStats

# 2021-01-02T03:04:05.123456789 UTC
SAMPLE_NS = 1609556645 * 1_000_000_000 + 123456789


# ---------------------------------------------------------------- the CRI log format

def test_timestamp_has_nine_digits_and_a_numeric_offset():
    assert vm_monitor.cri_timestamp(SAMPLE_NS, gmtoff=0) == "2021-01-02T03:04:05.123456789+00:00"
    assert vm_monitor.cri_timestamp(SAMPLE_NS, gmtoff=3600) == "2021-01-02T04:04:05.123456789+01:00"
    assert vm_monitor.cri_timestamp(SAMPLE_NS, gmtoff=-(5 * 3600 + 1800)) == "2021-01-01T21:34:05.123456789-05:30"
    assert vm_monitor.cri_timestamp(1609556645 * 1_000_000_000, gmtoff=0).endswith(".000000000+00:00")
    local = vm_monitor.cri_timestamp(SAMPLE_NS)  # this host's zone: never "Z"
    assert not local.endswith("Z") and local[-6] in "+-" and local[-3] == ":"


def test_records_split_at_newlines_and_mark_the_rest_partial():
    ts = "T"
    assert vm_monitor.cri_records("stdout", b"a\nbb\n", ts) == b"T stdout F a\nT stdout F bb\n"
    assert vm_monitor.cri_records("stderr", b"a\npart", ts) == b"T stderr F a\nT stderr P part\n"
    assert vm_monitor.cri_records("stdout", b"\n", ts) == b"T stdout F \n"
    assert vm_monitor.cri_records("stdout", b"", ts) == b""


@pytest.mark.parametrize("chunks", [[b"one\ntwo"], [b"x" * 10, b"y\n", b"\n\nz"], [b"\xff\x00bin\n"]])
def test_records_round_trip_through_the_exec_sync_parser(chunks):
    data = b"".join(vm_monitor.cri_records("stdout", chunk, "2021-01-02T03:04:05.000000001+00:00")
                    for chunk in chunks)
    assert parse_log(data)[0] == b"".join(chunks)


def test_log_file_appends_truncates_at_the_size_limit_and_reopens(tmp_path):
    path = str(tmp_path / "c.log")
    log = vm_monitor.CriLog(path, size_max=200)
    log.write("stdout", b"hello\n", SAMPLE_NS)
    log.write("stderr", b"oops\n", SAMPLE_NS)
    lines = parse(open(path).read().splitlines())
    assert [(line.stream, line.text) for line in lines] == [("stdout", "hello"), ("stderr", "oops")]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    inode = os.stat(path).st_ino
    log.write("stdout", b"x" * 150 + b"\n", SAMPLE_NS)  # would pass 200 bytes: the file starts over
    assert os.stat(path).st_ino != inode
    assert open(path, "rb").read().count(b"\n") == 1
    inode = os.stat(path).st_ino
    log.reopen()
    assert os.stat(path).st_ino != inode and os.path.getsize(path) == 0
    log.write("stdout", b"after\n", SAMPLE_NS)
    assert b"stdout F after\n" in open(path, "rb").read()
    log.close()


def test_control_lines_are_parsed_and_bounded():
    assert vm_monitor.parse_control(b"reopen\nquit\npar") == (["reopen", "quit"], b"par")
    assert vm_monitor.parse_control(b"\n\n") == ([], b"")
    assert vm_monitor.parse_control(b"x" * 1000) == ([], b"")


def test_exit_file_is_what_conmons_reader_expects(tmp_path):
    path = str(tmp_path / "exit")
    before = time.time()
    vm_monitor.write_exit_file(path, 137)
    assert open(path).read() == "137"
    code, finished = read_exit_file(path)
    assert code == 137 and abs(finished.timestamp() - before) < 5
    vm_monitor.write_exit_file(path, 0)
    assert read_exit_file(path)[0] == 0
    assert sorted(os.listdir(str(tmp_path))) == ["exit"]  # no temporary left


def test_monitor_config_round_trips_and_sends_fds_as_indexes():
    config = vm_monitor.MonitorConfig("abc", "ns", "unix:///x", "/l", -1, "/e", "/c", "/s", "/i", stdout_fd=5,
                                      shim_log_fd=9)
    assert vm_monitor.MonitorConfig.from_json(config.to_json()) == config
    data, fds = config.as_message()
    assert fds == [5, 9]
    received = vm_monitor.MonitorConfig.from_message(data, [15, 19])
    assert (received.stdout_fd, received.stderr_fd, received.stdin_fd, received.shim_log_fd) == (15, -1, -1, 19)
    assert received.container_id == "abc"


def test_a_cancelled_prespawned_monitor_leaves_no_process():
    pending = vm_monitor.prespawn(vm_monitor.library_root("/nonexistent-unused"))
    pending.cancel()
    assert pending.process.returncode == 0
    deadline = time.monotonic() + 5
    while _session_members(pending.process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _session_members(pending.process.pid) == []  # the daemon (same session) saw EOF and left


def _session_members(session: int):
    """Live pids whose session id is ``session`` (the monitor daemon keeps its first process's session)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/{}/stat".format(entry), "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def test_a_prespawned_monitor_reports_why_it_cannot_start(tmp_path):
    pending = vm_monitor.prespawn(vm_monitor.library_root(str(tmp_path)))
    control = str(tmp_path / "ctl")
    config = vm_monitor.MonitorConfig("cid", "ns", "unix://" + str(tmp_path / "no.sock"), str(tmp_path / "log"),
                                      -1, str(tmp_path / "exit"), control, str(tmp_path / "s"), str(tmp_path / "i"))
    with pytest.raises(vm_monitor.MonitorError, match="cannot connect"):
        pending.start(config, timeout=20)


# ---------------------------------------------------------------- the monitor's loop on real pipes

class FakeTask:
    """fake_task: stands in for a shim's Task client; ``wait`` returns when the test says the task exited."""

    def __init__(self) -> None:
        self.exited = threading.Event()
        self.status = 0

    def wait(self, container_id: str) -> shim.ExitResponse:
        self.exited.wait(30)
        return shim.ExitResponse(exit_status=self.status, exited_at=None, exited_at_ns=None)


def _monitor(tmp_path, task):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    log_r, log_w = os.pipe()
    control = str(tmp_path / "ctl")
    os.mkfifo(control, 0o600)
    config = vm_monitor.MonitorConfig(
        "cid", "ns", "unix:///none", str(tmp_path / "c.log"), -1, str(tmp_path / "exit"), control,
        str(tmp_path / "shim.log"), str(tmp_path / "monitor.json"), stdout_fd=out_r, stderr_fd=err_r,
        shim_log_fd=log_r)
    monitor = vm_monitor.Monitor(config, task)
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    return monitor, thread, out_w, err_w, log_w


def test_monitor_logs_drains_then_writes_the_exit_file_and_leaves_with_the_shim(tmp_path):
    task = FakeTask()
    monitor, thread, out_w, err_w, log_w = _monitor(tmp_path, task)
    os.write(out_w, b"line one\n")
    os.write(err_w, b"warn\n")
    os.write(log_w, b"shim says hi\n")
    task.status = 3
    task.exited.set()
    time.sleep(0.2)
    assert not os.path.exists(str(tmp_path / "exit"))  # output still open: draining first
    os.write(out_w, b"last")
    os.close(out_w)
    os.close(err_w)
    deadline = time.monotonic() + 5
    while not os.path.exists(str(tmp_path / "exit")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open(str(tmp_path / "exit")).read() == "3"
    text = open(str(tmp_path / "c.log"), "rb").read()
    assert b" stdout F line one\n" in text and b" stderr F warn\n" in text and b" stdout P last\n" in text
    assert thread.is_alive()  # the shim still runs: the monitor stays
    os.close(log_w)
    thread.join(5)
    assert not thread.is_alive()
    assert open(str(tmp_path / "shim.log"), "rb").read() == b"shim says hi\n"


def test_monitor_writes_the_exit_file_after_the_drain_bound_and_obeys_control(tmp_path, monkeypatch):
    monkeypatch.setattr(vm_monitor, "DRAIN_SECONDS", 0.3)
    task = FakeTask()
    monitor, thread, out_w, err_w, log_w = _monitor(tmp_path, task)
    os.write(out_w, b"before\n")
    time.sleep(0.1)
    inode = os.stat(str(tmp_path / "c.log")).st_ino
    assert vm_monitor.send(str(tmp_path / "ctl"), "reopen")
    deadline = time.monotonic() + 5
    while os.stat(str(tmp_path / "c.log")).st_ino == inode and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.stat(str(tmp_path / "c.log")).st_ino != inode
    task.status = 137
    task.exited.set()  # a background child keeps stdout open: the bound applies
    deadline = time.monotonic() + 5
    while not os.path.exists(str(tmp_path / "exit")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open(str(tmp_path / "exit")).read() == "137"
    assert vm_monitor.send(str(tmp_path / "ctl"), "quit")
    thread.join(5)
    assert not thread.is_alive()
    for fd in (out_w, err_w, log_w):
        os.close(fd)


def test_send_without_a_reader_is_false(tmp_path):
    control = str(tmp_path / "ctl")
    assert vm_monitor.send(control, "quit") is False
    os.mkfifo(control)
    assert vm_monitor.send(control, "quit") is False


# ---------------------------------------------------------------- status, stats, paths

def test_status_mapping_keeps_the_previous_status_for_unknown_and_pausing():
    assert runtime_vm.map_status("running", "created") == "running"
    assert runtime_vm.map_status("stopped", "running") == "stopped"
    assert runtime_vm.map_status("paused", "running") == "paused"
    assert runtime_vm.map_status("created", "") == "created"
    assert runtime_vm.map_status("pausing", "running") == "running"
    assert runtime_vm.map_status("unknown", "paused") == "paused"


def test_v2_metrics_become_container_stats():
    value = shim.METRICS_V2.encode({
        "pids": {"current": 4, "limit": 100},
        "cpu": {"usage_usec": 1500, "user_usec": 1000, "system_usec": 500},
        "memory": {"usage": 10 << 20, "usage_limit": 64 << 20, "inactive_file": 2 << 20, "anon": 6 << 20,
                   "file": 3 << 20},
        "io": {"usage": [{"major": 8, "minor": 0, "rbytes": 4096, "wbytes": 8192, "rios": 1, "wios": 2}]},
        "memory_events": {"oom_kill": 1}})
    stats = runtime_vm.metrics_to_stats("cid", shim.decode_metrics("type/" + shim.METRICS_V2_TYPE, value))
    assert isinstance(stats, ContainerStats) and stats.running
    assert (stats.pids, stats.pids_limit) == (4, 100)
    assert (stats.cpu_nano, stats.cpu_user_nano, stats.cpu_system_nano) == (1_500_000, 1_000_000, 500_000)
    assert (stats.mem_usage, stats.mem_raw_limit, stats.working_set_bytes) == (10 << 20, 64 << 20, 8 << 20)
    assert stats.mem_perc == pytest.approx((10 << 20) / min(64 << 20, stats.mem_limit))
    assert (stats.mem_rss, stats.mem_cache, stats.oom_events) == (6 << 20, 3 << 20, 1)
    assert (stats.block_input, stats.block_output) == (4096, 8192)
    assert stats.block_devices["8:0"].write_ops == 2
    assert stats.cgroup_version == "v2" and not stats.network_available
    assert stats.to_dict()["pids"] == {"current": 4, "limit": 100}


def test_v1_metrics_without_limits_and_with_network():
    value = shim.METRICS_V1.encode({
        "pids": {"current": 2, "limit": 0},
        "cpu": {"usage": {"total": 999, "kernel": 300, "user": 600, "per_cpu": [500, 499]}},
        "memory": {"usage": {"usage": 5000, "limit": 9223372036854771712}, "total_inactive_file": 1000},
        "network": [{"name": "eth0", "rx_bytes": 10, "tx_bytes": 20}]})
    stats = runtime_vm.metrics_to_stats("cid", shim.decode_metrics(shim.METRICS_V1_TYPE, value))
    assert stats.pids_limit is None and stats.mem_raw_limit is None
    assert stats.cpu_nano == 999 and stats.working_set_bytes == 4000
    assert (stats.net_input, stats.net_output) == (10, 20) and stats.networks["eth0"].tx_bytes == 20
    assert stats.cgroup_version == "v1"


def test_vm_paths_live_under_the_run_dir_of_a_valid_id(tmp_path):
    paths = StatePaths(str(tmp_path / "run"), str(tmp_path / "lib"))
    files = runtime_vm.VmPaths(paths, "abc123")
    assert files.directory == os.path.join(paths.run_dir("abc123"), "vm")
    for path in (files.shim_record, files.control, files.identity, files.shim_log, files.exec_dir):
        assert os.path.dirname(path) == files.directory
    for bad in ("../x", "a/b", "", "-x"):
        with pytest.raises(ValidationError):
            runtime_vm.VmPaths(paths, bad)


# ---------------------------------------------------------------- where the monitor imports from

def _import_from(root: str) -> str:
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c",  # noqa: S603
                           "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from ansible_collections.daemonless.oci.plugins.module_utils import vm_monitor; "
                           "print(vm_monitor.__file__)", root], capture_output=True, check=True)
    return done.stdout.decode().strip()


def test_library_root_is_the_checkout_when_imported_from_a_directory(tmp_path):
    root = vm_monitor.library_root(str(tmp_path))
    assert os.path.isdir(os.path.join(root, "ansible_collections"))
    assert not os.path.exists(str(tmp_path / "lib"))  # nothing copied
    assert _import_from(root).startswith(root)


def test_library_root_installs_a_copy_when_not_importable_from_disk(tmp_path):
    """The module-zip case: the sources are copied under the persist root, and the copy imports alone."""
    root = vm_monitor.library_root(str(tmp_path), use_checkout=False)
    assert root == str(tmp_path / "lib")
    assert _import_from(root) == os.path.join(root, "ansible_collections", "daemonless", "oci", "plugins",
                                              "module_utils", "vm_monitor.py")
    assert vm_monitor.library_root(str(tmp_path), use_checkout=False) == root  # unchanged: no rewrite
