"""The ``vm`` runtime type through ``ContainerManager``, against Debian's real ``containerd-shim-runc-v2``.

Kata cannot be installed from the registries this project reaches; the runc shim speaks the same
``containerd.task.v2`` ttrpc service (spec 3.7), so a ``vm``-type handler whose runtime_path is
/usr/bin/containerd-shim-runc-v2 runs the whole lifecycle here with real runc containers. Where
gVisor's ``containerd-shim-runsc-v1`` is installed the suite runs against it as well.

Every test checks that nothing is left behind: no shim process, no monitor, no FIFO, no socket,
no runc state under /run/containerd/runc/daemonless-oci. Faults no real program produces on
demand use scripts named ``fake_*``. Run under ``python3 tests/tools/subreaper.py`` so detached
processes are reaped at once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import List

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import runtime_vm, vm_monitor
from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    CONTAINER_STATE_CREATED,
    CONTAINER_STATE_PAUSED,
    CONTAINER_STATE_RUNNING,
    CONTAINER_STATE_STOPPED,
)
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ConfigError, OciError
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity
from ansible_collections.daemonless.oci.plugins.module_utils.shim import ShimStartError
from ansible_collections.daemonless.oci.plugins.module_utils.stats import ContainerStats

RUNC_SHIM = "/usr/bin/containerd-shim-runc-v2"
RUNSC_SHIM = shutil.which("containerd-shim-runsc-v1") or ""
SHIM_STATE = os.path.join(runtime_vm.RUNC_SHIM_STATE_ROOT, runtime_vm.NAMESPACE)
CRI_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}[+-]\d\d:\d\d (stdout|stderr) (F|P) ")
GRACEFUL = ["sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 1; done"]
STUBBORN = ["sh", "-c", "echo ready; while :; do sleep 1; done"]  # pid 1 without a handler ignores SIGTERM


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (the shim refuses peers of another uid and runc needs privileges)"
    if not os.access(RUNC_SHIM, os.X_OK):
        return "containerd-shim-runc-v2 is missing (apt-get install containerd)"
    if not shutil.which("runc"):
        return "runc is missing (apt-get install runc)"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")
SHIMS = [pytest.param(RUNC_SHIM, id="runc-shim"),
         pytest.param(RUNSC_SHIM, id="runsc-shim", marks=pytest.mark.skipif(
             not RUNSC_SHIM, reason="gVisor's containerd-shim-runsc-v1 is not installed (Debian's runsc package "
                                    "does not ship it)"))]


@pytest.fixture(params=SHIMS)
def shim_path(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def vm_config(tmp_path, shim_path: str) -> str:
    path = os.path.join(str(tmp_path), "runtimes.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"runtimes": {"vm": {"runtime_path": shim_path, "runtime_type": "vm"}},
                   "default_runtime": "vm"}, handle)
    return path


@pytest.fixture
def vm_manager(manager_for, vm_config: str) -> ContainerManager:
    return manager_for(vm_config)


def create(manager: ContainerManager, rootfs: str, name: str, args: List[str], **kwargs):
    spec = default_spec(rootfs, args, readonly_root=True)
    return manager.create(CreateRequest(name=name, spec=spec, handler="vm", **kwargs))


def wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


def log_text(container) -> bytes:
    try:
        with open(container.log_path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return b""


class Traces:
    """What a vm container puts outside its state dirs, captured while it runs, checked after removal."""

    def __init__(self, manager: ContainerManager, container) -> None:
        self.id = container.id
        with open(runtime_vm.VmPaths(manager.paths, container.id).shim_record, encoding="utf-8") as handle:
            record = json.load(handle)
        self.shim = ProcessIdentity(record["pid"], record["start_time"])
        self.socket = record["address"][len("unix://"):] if record["address"].startswith("unix://") else ""
        self.monitor = container.state.conmon_process()
        self.init = container.state.init_process()
        self.manager = manager

    def leftovers(self) -> List[str]:
        found = []
        for what, identity in (("shim", self.shim), ("monitor", self.monitor), ("init", self.init)):
            if identity is not None and identity.is_alive():
                found.append("{} pid {}".format(what, identity.pid))
        found += ["process {}".format(pid) for pid in _pids_mentioning(self.id)]
        if self.socket and os.path.lexists(self.socket):
            found.append("socket " + self.socket)
        if os.path.lexists(os.path.join(SHIM_STATE, self.id)):
            found.append("runc state " + os.path.join(SHIM_STATE, self.id))
        for path in (self.manager.paths.run_dir(self.id), self.manager.paths.container_dir(self.id)):
            if os.path.lexists(path):
                found.append("dir " + path)
        return found


def _pids_mentioning(text: str) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/{}/cmdline".format(entry), "rb") as handle:
                cmdline = handle.read()
            with open("/proc/{}/stat".format(entry), "rb") as handle:
                zombie = handle.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
        except OSError:
            continue
        if text.encode() in cmdline and not zombie:
            found.append(int(entry))
    return found


def _pids_max(pid: int) -> str:
    with open("/proc/{}/cgroup".format(pid), encoding="utf-8") as handle:
        lines = [line.rstrip("\n").split(":", 2) for line in handle]
    for hierarchy, controllers, path in lines:
        if "pids" in controllers.split(","):
            with open("/sys/fs/cgroup/pids{}/pids.max".format(path), encoding="utf-8") as handle:
                return handle.read().strip()
    for hierarchy, controllers, path in lines:
        if hierarchy == "0" and not controllers:
            with open("/sys/fs/cgroup{}/pids.max".format(path), encoding="utf-8") as handle:
                return handle.read().strip()
    raise AssertionError("no pids cgroup for pid {}".format(pid))


def _container_pids(init_pid: int) -> List[int]:
    namespace = os.stat("/proc/{}/ns/pid".format(init_pid)).st_ino
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat("/proc/{}/ns/pid".format(entry)).st_ino == namespace:
                    found.append(int(entry))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------------------------------------
# The whole life of a container
# ---------------------------------------------------------------------------------------------

def test_vm_lifecycle_through_the_manager(vm_manager, busybox_rootfs, shim_path):
    container = create(vm_manager, busybox_rootfs, "vm-life", STUBBORN, stop_timeout=1)
    traces = Traces(vm_manager, container)
    assert container.state.status == CONTAINER_STATE_CREATED
    assert traces.shim.is_alive() and traces.monitor.is_alive() and traces.init.is_alive()

    assert vm_manager.start(container) is True
    assert container.state.status == CONTAINER_STATE_RUNNING and container.state.started is not None
    wait_for(lambda: b"stdout F ready\n" in log_text(container), "ready in the log")
    for line in log_text(container).splitlines(keepends=True):
        assert CRI_LINE.match(line), line

    # exec-sync: output, exit codes, stdin, a missing command, a timeout that kills the whole tree
    result = vm_manager.exec_sync(container, ["sh", "-c", "echo out; echo err >&2; exit 42"], timeout=10)
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (42, b"out\n", b"err\n", False)
    assert vm_manager.exec_sync(container, ["cat"], timeout=10, stdin=b"piped\n").stdout == b"piped\n"
    assert vm_manager.exec_sync(container, ["/no/such/binary"], timeout=10).exit_code in (126, 127)
    assert vm_manager.exec_sync(container, ["tty"], timeout=10, tty=True).stdout.startswith(b"/dev/pts/")
    started = time.monotonic()
    slow = vm_manager.exec_sync(container, ["sh", "-c", "echo going; sleep 300 & sleep 300"], timeout=1)
    assert slow.timed_out and slow.exit_code == -1 and b"command timed out" in slow.stderr
    assert slow.stdout == b"going\n"
    assert time.monotonic() - started < 8
    wait_for(lambda: not any("sleep 300" in _cmdline(pid) for pid in _container_pids(traces.init.pid)),
             "the timed-out exec's processes (and its background child) to be gone", timeout=5)

    assert vm_manager.pause(container) is True
    assert container.state.status == CONTAINER_STATE_PAUSED
    assert vm_manager.unpause(container) is True
    assert container.state.status == CONTAINER_STATE_RUNNING

    vm_manager.runtime.update_container(container, {"pids": {"limit": 77}})
    assert _pids_max(traces.init.pid) == "77"
    stats = vm_manager.runtime.container_stats(container)
    assert isinstance(stats, ContainerStats) and stats.running
    assert stats.pids >= 1 and stats.pids_limit == 77 and stats.cpu_nano > 0 and stats.mem_usage > 0
    print("vm stats:", stats.to_dict())

    # log rotation: the monitor reopens, new output lands in the new file
    old_inode = os.stat(container.log_path).st_ino
    vm_manager.runtime.reopen_container_log(container)
    assert os.stat(container.log_path).st_ino != old_inode
    vm_manager.signal(container, signal.SIGWINCH)  # a harmless signal through Kill{all=true}

    # stop escalates: pid 1 ignores SIGTERM, so SIGKILL after the 1 s grace
    started = time.monotonic()
    assert vm_manager.stop(container) is True
    elapsed = time.monotonic() - started
    assert container.state.status == CONTAINER_STATE_STOPPED
    assert container.state.exit_code == 137 and container.state.finished is not None
    assert 1.0 <= elapsed < 10, elapsed
    wait_for(lambda: os.path.exists(vm_manager.paths.persist_exit_file(container.id)), "the monitor's exit file")
    with open(vm_manager.paths.persist_exit_file(container.id), encoding="ascii") as handle:
        assert handle.read() == "137"
    assert vm_manager.stop(container) is False

    vm_manager.remove(container)
    assert vm_manager.find("vm-life") is None
    wait_for(lambda: not traces.leftovers(), "no leftovers: {}".format(traces.leftovers()), timeout=5)


def _cmdline(pid: int) -> str:
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def test_graceful_stop_restart_and_own_exit(vm_manager, busybox_rootfs):
    container = create(vm_manager, busybox_rootfs, "vm-grace", GRACEFUL, stop_timeout=10)
    vm_manager.start(container)
    wait_for(lambda: b"stdout F ready\n" in log_text(container), "ready in the log")
    started = time.monotonic()
    assert vm_manager.stop(container) is True
    assert time.monotonic() - started < 5
    assert (container.state.status, container.state.exit_code) == (CONTAINER_STATE_STOPPED, 0)
    wait_for(lambda: b"stdout F bye\n" in log_text(container), "the trap's output in the log")

    first = Traces(vm_manager, container)
    assert vm_manager.start(container) is True  # stopped -> created again with a new shim and monitor
    assert container.state.status == CONTAINER_STATE_RUNNING and container.metadata.attempt == 1
    second = Traces(vm_manager, container)
    assert not first.shim.is_alive() and not first.monitor.is_alive()
    assert second.shim.pid != first.shim.pid
    traces = second
    vm_manager.remove(container)
    wait_for(lambda: not traces.leftovers(), "no leftovers", timeout=5)

    quitter = create(vm_manager, busybox_rootfs, "vm-quit", ["sh", "-c", "echo partial | tr -d '\\n'; exit 3"])
    traces = Traces(vm_manager, quitter)
    vm_manager.start(quitter)
    wait_for(lambda: vm_manager.inspect(quitter).state.status == CONTAINER_STATE_STOPPED, "the container to exit")
    assert quitter.state.exit_code == 3
    wait_for(lambda: b"stdout P partial\n" in log_text(quitter), "a P record for output without newline")
    vm_manager.remove(quitter)
    wait_for(lambda: not traces.leftovers(), "no leftovers", timeout=5)


def test_created_container_can_be_removed(vm_manager, busybox_rootfs):
    container = create(vm_manager, busybox_rootfs, "vm-created", GRACEFUL)
    traces = Traces(vm_manager, container)
    assert vm_manager.stop(container) is True
    assert container.state.status == CONTAINER_STATE_STOPPED
    vm_manager.remove(container)
    wait_for(lambda: not traces.leftovers(), "no leftovers", timeout=5)


_SECOND_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
m = ContainerManager.from_config(sys.argv[2], overrides={"run_root": sys.argv[3], "persist_root": sys.argv[4]})
if sys.argv[5] == "create":
    c = m.create(CreateRequest(name="vm-far", spec=default_spec(sys.argv[6], json.loads(sys.argv[7]),
                 readonly_root=True), handler="vm", stop_timeout=1))
    m.start(c)
    print(json.dumps({"id": c.id, "status": c.state.status}))
else:
    c = m.get("vm-far")
    print(json.dumps({"status": m.inspect(c).state.status, "stopped": m.stop(c), "exit": c.state.exit_code}))
"""


def test_another_process_sees_and_stops_the_container(vm_manager, vm_config, busybox_rootfs):
    """Modules are separate processes: one creates and exits, the next ones find, exec, and stop."""
    tree = vm_monitor.library_root(vm_manager.paths.persist_root)  # the tree this checkout is imported from
    roots = [vm_manager.paths.run_root, vm_manager.paths.persist_root]
    ticker = ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
    base = [sys.executable, "-c", _SECOND_PROCESS, tree, vm_config] + roots
    made = json.loads(subprocess.run(base + ["create", busybox_rootfs, json.dumps(ticker)], check=True,
                                     capture_output=True).stdout)
    assert made["status"] == CONTAINER_STATE_RUNNING
    container = vm_manager.get("vm-far")
    traces = Traces(vm_manager, container)
    assert vm_manager.inspect(container).state.status == CONTAINER_STATE_RUNNING
    size = len(log_text(container))
    wait_for(lambda: len(log_text(container)) > size + 40, "the detached monitor to keep logging")
    assert vm_manager.exec_sync(container, ["echo", "from afar"], timeout=10).stdout == b"from afar\n"
    stopped = json.loads(subprocess.run(base + ["stop"], check=True, capture_output=True).stdout)
    assert stopped == {"status": CONTAINER_STATE_RUNNING, "stopped": True, "exit": 137}
    assert vm_manager.inspect(container).state.status == CONTAINER_STATE_STOPPED
    vm_manager.remove(container)
    wait_for(lambda: not traces.leftovers(), "no leftovers", timeout=5)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

def _config(tmp_path, runtime_path: str) -> str:
    path = os.path.join(str(tmp_path), "bad-runtimes.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"runtimes": {"vm": {"runtime_path": runtime_path, "runtime_type": "vm"}},
                   "default_runtime": "vm"}, handle)
    return path


def _fake(tmp_path, name: str, body: str) -> str:
    path = os.path.join(str(tmp_path), name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def _nothing_of(manager: ContainerManager) -> List[str]:
    found = []
    root = os.path.join(manager.paths.run_root, "containers")
    if os.path.isdir(root) and os.listdir(root):
        found.append("run dirs {}".format(os.listdir(root)))
    root = os.path.join(manager.paths.persist_root, "containers")
    if os.path.isdir(root) and os.listdir(root):
        found.append("persist dirs {}".format(os.listdir(root)))
    found += ["process {}".format(pid) for pid in _pids_mentioning(manager.paths.run_root)]
    return found


@pytest.mark.parametrize("kind", ["missing", "exits-at-once", "garbage"])
def test_bad_shim_is_a_clear_error_and_leaves_nothing(tmp_path, manager_for, busybox_rootfs, kind):
    if kind == "missing":
        path, error, match = "/usr/bin/containerd-shim-dloci-missing-v2", ConfigError, "is missing"
    elif kind == "exits-at-once":
        path, error, match = "/bin/false", ShimStartError, "exited with status 1"
    else:
        # fake_garbage_shim: exits 0 but prints words instead of an address
        path = _fake(tmp_path, "fake_garbage_shim", "echo 'I am not an address'\necho chatter >&2\n")
        error, match = ShimStartError, "not an address"
    manager = manager_for(_config(tmp_path, path))
    sockets_before = set(os.listdir("/run/containerd/s")) if os.path.isdir("/run/containerd/s") else set()
    with pytest.raises(error, match=match):
        create(manager, busybox_rootfs, "vm-bad", GRACEFUL)
    assert manager.find("vm-bad") is None
    assert _nothing_of(manager) == []
    sockets_after = set(os.listdir("/run/containerd/s")) if os.path.isdir("/run/containerd/s") else set()
    assert sockets_after <= sockets_before


def test_shim_killed_mid_life_gives_clear_errors_and_remove_cleans(vm_manager, busybox_rootfs):
    container = create(vm_manager, busybox_rootfs, "vm-shimdeath", STUBBORN, stop_timeout=1)
    vm_manager.start(container)
    traces = Traces(vm_manager, container)
    assert traces.shim.signal(signal.SIGKILL)
    assert traces.shim.wait_gone(10)
    with pytest.raises(OciError, match="shim"):
        vm_manager.exec_sync(container, ["true"], timeout=5)
    with pytest.raises(OciError, match="shim"):
        vm_manager.pause(container)
    wait_for(lambda: not traces.monitor.is_alive(), "the monitor to leave with its shim")
    with vm_manager.locked(container):
        vm_manager.refresh(container)
    assert "shim" in container.state.error
    print("status after the shim died:", container.state.status, container.state.error)
    vm_manager.remove(container)
    assert vm_manager.find("vm-shimdeath") is None
    wait_for(lambda: not traces.leftovers(), "no leftovers: {}".format(traces.leftovers()), timeout=10)


def test_killed_monitor_is_detected_and_reported(vm_manager, busybox_rootfs):
    container = create(vm_manager, busybox_rootfs, "vm-nomon", GRACEFUL)
    vm_manager.start(container)
    traces = Traces(vm_manager, container)
    assert traces.monitor.signal(signal.SIGKILL) and traces.monitor.wait_gone(10)
    with vm_manager.locked(container):
        vm_manager.refresh(container)
    assert container.state.status == CONTAINER_STATE_RUNNING
    assert "vm monitor (pid {}) is gone".format(traces.monitor.pid) in container.state.error
    stored = vm_manager.get("vm-nomon").state
    assert "vm monitor" in stored.error  # persisted for the next module run
    assert vm_manager.stop(container) is True and container.state.exit_code == 0
    vm_manager.remove(container)
    wait_for(lambda: not traces.leftovers(), "no leftovers: {}".format(traces.leftovers()), timeout=5)


def test_attach_says_it_is_not_supported(vm_manager, busybox_rootfs):
    container = create(vm_manager, busybox_rootfs, "vm-attach", GRACEFUL)
    with pytest.raises(OciError, match="attach is not supported for vm handlers yet"):
        vm_manager.runtime.attach_container(container, None, None, None, False)


def test_streaming_exec(vm_manager, busybox_rootfs):
    import io
    container = create(vm_manager, busybox_rootfs, "vm-stream", GRACEFUL)
    vm_manager.start(container)
    out: List[bytes] = []
    err: List[bytes] = []
    code = vm_manager.runtime.exec_container(container, ["sh", "-c", "cat; echo e >&2; exit 5"],
                                             io.BytesIO(b"streamed\n"), out.append, err.append, False)
    assert (code, b"".join(out), b"".join(err)) == (5, b"streamed\n", b"e\n")
    out.clear()
    code = vm_manager.runtime.exec_container(container, ["sh", "-c", "read go; stty size; tty"], io.BytesIO(b"go\n"),
                                             out.append, None, True, resize=lambda: (33, 111))
    assert code == 0
    assert b"33 111" in b"".join(out) and b"/dev/pts/" in b"".join(out)


def test_monitor_runs_from_the_self_installed_copy(vm_manager, busybox_rootfs, monkeypatch):
    """The module-zip case: the library is not on disk, so the monitor runs from the copy under the persist root."""
    real = vm_monitor.library_root
    monkeypatch.setattr(vm_monitor, "library_root", lambda persist_root: real(persist_root, use_checkout=False))
    container = create(vm_manager, busybox_rootfs, "vm-copy", GRACEFUL)
    traces = Traces(vm_manager, container)
    with open("/proc/{}/cmdline".format(traces.monitor.pid), "rb") as handle:
        argv = handle.read().split(b"\0")
    assert os.path.join(vm_manager.paths.persist_root, "lib").encode() in argv
    vm_manager.start(container)
    wait_for(lambda: b"stdout F ready\n" in log_text(container), "ready in the log")
    vm_manager.remove(container)
    wait_for(lambda: not traces.leftovers(), "no leftovers", timeout=5)
