"""Pure I/O parts of the runtime core: command running, state files, locks, config, cgroups, conmon."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import cgroups, conmon
from ansible_collections.daemonless.oci.plugins.module_utils.config import RuntimeConfig, RuntimeHandler, load_config
from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    CommandError,
    CommandTimeoutError,
    ConfigError,
    ConmonError,
    ContainerExistsError,
    HandlerNotFoundError,
    LockTimeoutError,
    OciError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command
from ansible_collections.daemonless.oci.plugins.module_utils.runtime import Runtime
from ansible_collections.daemonless.oci.plugins.module_utils.state import (
    ContainerFiles,
    FileLock,
    StatePaths,
    atomic_write,
)


def test_run_command_captures_and_feeds_stdin():
    result = run_command(["sh", "-c", "cat; echo err >&2"], input_data=b"x" * 300000)
    assert result.stdout == b"x" * 300000 and result.stderr == b"err\n" and result.returncode == 0


def test_run_command_failure_names_the_command():
    with pytest.raises(CommandError, match=r"`sh -c echo oops >&2; exit 3` failed: oops"):
        run_command(["sh", "-c", "echo oops >&2; exit 3"])
    assert run_command(["false"], check=False).returncode == 1


def test_run_command_timeout_kills_the_whole_group():
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError):
        run_command(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.3)
    assert time.monotonic() - started < 3


def test_run_command_returns_when_a_grandchild_keeps_the_pipe():
    started = time.monotonic()
    run_command(["sh", "-c", "sleep 5 & echo done"])
    assert time.monotonic() - started < 3


def test_atomic_write_is_private_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f"
    atomic_write(str(target), b"one")
    atomic_write(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert os.listdir(tmp_path) == ["f"]


def test_file_lock_excludes_other_processes(tmp_path):
    lock_path = str(tmp_path / "locks" / "x.lock")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl,os,time,sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True);"
                               "f=open(sys.argv[1],'w'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True);"
                               "time.sleep(30)", lock_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeoutError):
            FileLock(lock_path, timeout=0.2).acquire()
    finally:
        holder.kill()
        holder.wait()
    with FileLock(lock_path, timeout=5):
        pass


def test_state_paths_reject_unsafe_ids_and_long_roots(tmp_path):
    paths = StatePaths(str(tmp_path / "run"), str(tmp_path / "lib"))
    with pytest.raises(OciError):
        paths.container_dir("../etc")
    with pytest.raises(OciError):
        StatePaths("relative", "/x")
    with pytest.raises(OciError, match="too long"):
        StatePaths("/" + "r" * 80, str(tmp_path)).ensure_roots()


def test_name_index_and_files(short_tmp):
    paths = StatePaths(os.path.join(short_tmp, "run"), os.path.join(short_tmp, "lib"))
    paths.ensure_roots()
    files = ContainerFiles(paths)
    container = Container("abc", "web", paths.bundle_dir("abc"), "", directory=paths.container_dir("abc"))
    files.save_config(container)
    files.save_state(container)
    files.reserve_name("web", "abc")
    assert files.lookup_name("web") == "abc"
    with pytest.raises(ContainerExistsError):
        files.reserve_name("web", "other")
    assert [c.id for c in files.iter_containers()] == ["abc"]
    files.release_name("web", "other")
    assert files.lookup_name("web") == "abc"
    files.remove_files("abc")
    assert files.lookup_name("web") is None  # a stale entry whose container is gone
    assert oct(os.stat(paths.persist_root).st_mode & 0o777) == "0o700"


@pytest.fixture
def short_tmp():
    """A short directory: conmon's socket paths under a run root must fit in 107 bytes."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="dloci-u", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_config_defaults_and_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DAEMONLESS_OCI_CONFIG", raising=False)
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"default_runtime": "mine", "ctr_stop_timeout": 5,
                                       "runtimes": {"mine": {"runtime_path": "/bin/true", "runtime_type": "vm",
                                                             "allowed_annotations": ["cpu-quota.crio.io"]}}}))
    config = load_config(str(config_file))
    assert config.ctr_stop_timeout == 30  # raised to the reference's minimum
    assert config.runtimes["mine"].is_vm
    runtime = Runtime(config, StatePaths(str(tmp_path / "r"), str(tmp_path / "l")))
    assert runtime.runtime_type("") == "vm"
    assert runtime.allow_cpu_quota_annotation("mine") and not runtime.allow_userns_annotation("mine")
    with pytest.raises(HandlerNotFoundError, match="failed to find runtime handler x"):
        runtime.allow_devices_annotation("x")
    with pytest.raises(ConfigError, match="empty runtime handler"):
        runtime.validate_runtime_handler("")


@pytest.mark.parametrize("document,text", [
    ({"bogus": 1}, "unknown runtime configuration keys"),
    ({"runtimes": {"a": {"runtime_type": "kvm", "runtime_path": "/bin/true"}}}, "runtime_type"),
    ({"log_size_max": 100}, "log_size_max"),
    ({"cgroup_manager": "magic"}, "cgroup_manager"),
    ({"runtimes": {"a/b": {}}}, "must not contain"),
])
def test_config_rejects_bad_documents(tmp_path, document, text):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(OciError, match=text):
        load_config(str(path))


def test_explicit_missing_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))


def test_empty_runtime_path_is_reported():
    runtime = Runtime(RuntimeConfig(runtimes={"x": RuntimeHandler(name="x", runtime_path="")}, default_runtime="x"))
    with pytest.raises(ConfigError, match="empty runtime path"):
        runtime.validate_runtime_handler("x")


MOUNTINFO = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_mountinfo_and_proc_cgroup():
    mounts = cgroups.parse_mountinfo(MOUNTINFO)
    assert mounts.mode == "hybrid"
    assert mounts.v1["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct" and "xattr" not in mounts.v1
    assert mounts.v1["name=systemd"] == "/sys/fs/cgroup/systemd"
    procs = cgroups.parse_proc_cgroup("4:memory:/process_api/abc/ctr\n2:cpu,cpuacct:/ctr\n0::/ctr\n")
    assert cgroups.controller_dir(mounts, procs, "memory") == "/sys/fs/cgroup/memory/process_api/abc/ctr"
    assert cgroups.controller_dir(mounts, procs, "cpu") == "/sys/fs/cgroup/cpu,cpuacct/ctr"
    unified = cgroups.parse_mountinfo("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    assert unified.mode == "v2"
    assert cgroups.controller_dir(unified, {"": "/a/b"}, "") == "/sys/fs/cgroup/a/b"


def test_conmon_create_argv():
    options = conmon.CreateOptions(conmon="/usr/bin/conmon", container_id="cid", name="web", bundle="/b",
                                   runtime_path="/usr/sbin/runc", runtime_root="/r", runtime_args=["--x"],
                                   exits_dir="/e", persist_dir="/p", socket_dir="/s", log_path="/l",
                                   log_size_max=8192, stdin=True)
    argv = conmon.create_argv(options)
    pairs = dict(zip(argv[1::2], argv[2::2]))
    assert pairs["-c"] == "cid" and pairs["-u"] == "cid" and pairs["-l"] == "k8s-file:/l"
    assert pairs["-P"] == "/b/conmon-pidfile" and pairs["-p"] == "/b/pidfile"
    assert argv.count("--runtime-arg") == 2 and "--root=/r" in argv
    assert argv[-2:] == ["--leave-stdin-open", "-i"] and "--log-size-max" in argv


def test_sync_message_reads_one_line_only():
    parent, child = socket.socketpair()
    child.sendall(b'{"pid": 42}\n{"pid": 43}\n')
    assert conmon.read_sync_message(parent, 1) == {"pid": 42}
    child.close()
    parent2, child2 = socket.socketpair()
    child2.close()
    with pytest.raises(ConmonError, match="EOF"):
        conmon.read_sync_message(parent2, 1)
    parent3, child3 = socket.socketpair()
    child3.sendall(b"not json\n")
    with pytest.raises(ConmonError, match="unreadable"):
        conmon.read_sync_message(parent3, 1)
    parent4, _child4 = socket.socketpair()
    with pytest.raises(TimeoutError):
        conmon.read_sync_message(parent4, 0.05)


def test_exit_file(tmp_path):
    assert conmon.read_exit_file(str(tmp_path / "exit")) is None
    (tmp_path / "exit").write_text("137")
    code, finished = conmon.read_exit_file(str(tmp_path / "exit"))
    assert code == 137 and finished.tzinfo is not None
    (tmp_path / "exit").write_text("x")
    with pytest.raises(ConmonError, match="conversion"):
        conmon.read_exit_file(str(tmp_path / "exit"))


def test_control_fifo_without_reader_is_not_running(tmp_path):
    os.mkfifo(str(tmp_path / "ctl"))
    with pytest.raises(OciError, match="not running"):
        conmon.write_control(str(tmp_path), conmon.REOPEN_LOGS_EVENT)


def test_exit_file_finished_is_never_before_started(tmp_path):
    from datetime import datetime, timedelta, timezone
    (tmp_path / "exit").write_text("0")
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert conmon.read_exit_file(str(tmp_path / "exit"), not_before=later)[1] == later


def _cgroup_tree(root, files):
    """A stand-in cgroup hierarchy made of plain files (a real one cannot be staged in a unit test)."""
    for path, content in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(content)


def test_new_v1_cpuset_child_inherits_the_parents_cpus(tmp_path):
    _cgroup_tree(tmp_path, {"cpuset.cpus": "0-1\n", "cpuset.mems": "0\n", "child/cpuset.cpus": "",
                            "child/cpuset.mems": ""})
    cgroups._inherit_cpuset(str(tmp_path / "child"), "cpuset.cpus")
    assert (tmp_path / "child" / "cpuset.cpus").read_text() == "0-1"


def test_v2_cpuset_child_is_left_empty_under_a_root_without_cpuset_files(tmp_path):
    """cgroup v2 (the Debian 12 and 13 VMs): the root has no cpuset.cpus; the child's empty value means the
    parent's effective set, so there is nothing to copy and nothing to fail on."""
    _cgroup_tree(tmp_path, {"cgroup.controllers": "cpuset cpu memory pids\n", "child/cgroup.controllers": "",
                            "child/cpuset.cpus": ""})
    cgroups._inherit_cpuset(str(tmp_path / "child"), "cpuset.cpus")
    assert (tmp_path / "child" / "cpuset.cpus").read_text() == ""
