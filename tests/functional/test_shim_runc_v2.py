"""The shim v2 client against the real Debian ``containerd-shim-runc-v2`` and real runc (spec 3.7).

Needs root, /usr/bin/containerd-shim-runc-v2, runc and busybox-static. Each test builds an OCI
bundle whose rootfs is a static busybox with applet symlinks and whose config.json comes from
``runc spec`` (only args and terminal changed). The shim keeps its socket in /run/containerd/s
and runc's state in /run/containerd/runc/<namespace>; the tests use the namespace ``dloci-test``
and remove what they created there.

Fault injection uses real programs where one exists (/bin/false exits at once). Two faults no
real program produces on demand are scripts named ``fake_*``: a "shim" printing garbage, and one
printing the address of a socket that accepts connections but never answers.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Iterator, List

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import shim as shimlib
from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity
from ansible_collections.daemonless.oci.plugins.module_utils.shim import (
    ProcessIO,
    ShimError,
    ShimHandle,
    ShimStartError,
    TaskClient,
    find_shim_pids,
    shutdown_and_cleanup,
    start_shim,
)
from ansible_collections.daemonless.oci.plugins.module_utils.ttrpc import (
    TtrpcClosedError,
    TtrpcDialError,
    TtrpcError,
    TtrpcNotFoundError,
)

SHIM = "/usr/bin/containerd-shim-runc-v2"
RUNC = shutil.which("runc") or "/usr/bin/runc"
BUSYBOX = "/bin/busybox"
NAMESPACE = "dloci-test"
RUNC_ROOT = "/run/containerd/runc/" + NAMESPACE
APPLETS = ("sh", "echo", "sleep", "cat", "true", "ls", "stty")


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root (the shim refuses peers of another uid and runc needs privileges)"
    for path, what in ((SHIM, "containerd-shim-runc-v2 (package containerd)"), (RUNC, "runc"),
                       (BUSYBOX, "a static /bin/busybox (package busybox-static)")):
        if not os.access(path, os.X_OK):
            return "{} is missing: {}".format(what, path)
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

def _make_bundle(directory: str, args: List[str]) -> str:
    rootfs = os.path.join(directory, "rootfs", "bin")
    os.makedirs(rootfs)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(rootfs, applet))
    subprocess.run([RUNC, "spec"], cwd=directory, check=True)  # noqa: S603
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["process"]["args"] = args
    config["process"]["terminal"] = False
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return directory


class Box:
    """One test's bundle, container id and whatever must be cleaned afterwards."""

    def __init__(self, directory: str) -> None:
        self.id = "dloci-shim-" + secrets.token_hex(4)
        self.bundle = _make_bundle(os.path.join(directory, "bundle"), ["sh", "-c", "echo started; exec sleep 1000"])
        self.io_dir = os.path.join(directory, "io")
        os.makedirs(self.io_dir)
        self.handles: List[ShimHandle] = []
        self.ios: List[ProcessIO] = []

    def config_process(self) -> dict:
        with open(os.path.join(self.bundle, "config.json"), encoding="utf-8") as handle:
            return json.load(handle)["process"]

    def io(self, **kwargs) -> ProcessIO:
        created = ProcessIO.create(self.io_dir, "p-", **kwargs)
        self.ios.append(created)
        return created

    def start(self, **kwargs) -> ShimHandle:
        handle = start_shim(SHIM, self.bundle, self.id, NAMESPACE, timeout=20, **kwargs)
        self.handles.append(handle)
        return handle

    def teardown(self) -> None:
        """Leave nothing behind even when a test failed half-way."""
        for handle in self.handles:
            if handle.task is not None:
                handle.task.close()
        for pid in find_shim_pids(self.bundle, self.id, NAMESPACE):
            try:
                ProcessIdentity.of(pid).signal(signal.SIGKILL)
            except OciError:
                pass  # gone meanwhile
        subprocess.run([RUNC, "--root", RUNC_ROOT, "delete", "--force", self.id],  # noqa: S603
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        for handle in self.handles:
            socket_path = handle.socket_path if handle.address else None
            if socket_path and os.path.exists(socket_path):
                os.unlink(socket_path)
            if handle.log is not None:
                handle.log.close()
        for created in self.ios:
            created.close()
        try:
            os.rmdir(RUNC_ROOT)
        except OSError:
            pass


@pytest.fixture
def box(tmp_path) -> Iterator[Box]:
    created = Box(str(tmp_path))
    yield created
    created.teardown()


def _exec(task: TaskClient, box: Box, exec_id: str, args: List[str], stdin: bytes = None):
    """Run one exec through the shim with FIFO IO; returns (exit status, stdout, stderr)."""
    process = dict(box.config_process(), args=args, terminal=False)
    io = box.io(stdin=stdin is not None)
    task.exec(box.id, exec_id, process, stdin=io.stdin_path, stdout=io.stdout_path, stderr=io.stderr_path)
    task.start(box.id, exec_id)
    if stdin is not None:
        io.write_stdin(stdin)
        io.close_stdin()
        task.close_io(box.id, exec_id)
    exited = task.wait(box.id, exec_id, timeout=20)
    assert io.wait_eof(10), "exec output FIFOs never reached EOF"
    deleted = task.delete(box.id, exec_id)
    assert deleted.exit_status == exited.exit_status
    out, err = io.output()
    io.close()
    return exited.exit_status, out, err


def _pids_max(pid: int) -> str:
    """pids.max of the process's pids cgroup (cgroup v1 hierarchy or the v2 unified one)."""
    with open("/proc/{}/cgroup".format(pid), encoding="utf-8") as handle:
        lines = [line.rstrip("\n").split(":", 2) for line in handle]
    for _unused, controllers, path in lines:
        if "pids" in controllers.split(","):
            with open("/sys/fs/cgroup/pids{}/pids.max".format(path), encoding="utf-8") as handle:
                return handle.read().strip()
    for hierarchy, controllers, path in lines:
        if hierarchy == "0" and not controllers:
            with open("/sys/fs/cgroup{}/pids.max".format(path), encoding="utf-8") as handle:
                return handle.read().strip()
    raise AssertionError("no pids cgroup for pid {}".format(pid))


def _gone(path: str) -> bool:
    return not os.path.lexists(path)


# ---------------------------------------------------------------------------------------------
# The life of one container
# ---------------------------------------------------------------------------------------------

def test_full_lifecycle_against_the_runc_shim(box: Box) -> None:
    handle = box.start()
    task = handle.task
    assert handle.address.startswith("unix:///run/containerd/s/")
    assert handle.spawned and handle.pid > 0 and handle.identity.is_alive()
    assert stat.S_ISFIFO(os.lstat(os.path.join(box.bundle, "log")).st_mode)
    socket_path = handle.socket_path
    assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)

    with pytest.raises(TtrpcNotFoundError):
        task.state(box.id)  # nothing created yet

    init_io = box.io()
    pid = task.create(box.id, box.bundle, stdout=init_io.stdout_path, stderr=init_io.stderr_path)
    created = task.state(box.id)
    assert (created.status, created.pid, created.exited_at) == ("created", pid, None)
    assert created.stdout == init_io.stdout_path and created.bundle == box.bundle

    assert task.start(box.id) == pid
    running = task.state(box.id)
    assert running.status == "running" and running.pid == pid and running.exit_status == 0
    assert running.exited_at is None  # the runc shim sends Go's zero time here
    assert os.path.exists("/proc/{}".format(pid))
    connected = task.connect(box.id)
    assert (connected.shim_pid, connected.task_pid) == (handle.pid, pid)

    assert _exec(task, box, "echo1", ["echo", "hi"]) == (0, b"hi\n", b"")
    assert _exec(task, box, "exit42", ["sh", "-c", "echo oops >&2; exit 42"]) == (42, b"", b"oops\n")
    assert _exec(task, box, "cat1", ["cat"], stdin=b"through stdin\n") == (0, b"through stdin\n", b"")

    # a terminal exec: the shim owns the pty; ResizePty must reach it before `stty size` runs
    tty_io = box.io(stdin=True, stderr=False)
    tty_process = dict(box.config_process(), args=["sh", "-c", "read line; stty size"], terminal=True)
    task.exec(box.id, "tty1", tty_process, terminal=True, stdin=tty_io.stdin_path, stdout=tty_io.stdout_path)
    task.start(box.id, "tty1")
    task.resize_pty(box.id, width=123, height=45, exec_id="tty1")
    tty_io.write_stdin(b"go\n")
    assert task.wait(box.id, "tty1", timeout=20).exit_status == 0
    assert tty_io.wait_eof(10)
    assert b"45 123" in tty_io.output()[0]
    task.delete(box.id, "tty1")

    with pytest.raises(TtrpcError) as refused:
        task.delete(box.id)  # a running init cannot be deleted
    print("delete of a running init:", type(refused.value).__name__, refused.value.code, refused.value)

    task.pause(box.id)
    assert task.state(box.id).status == "paused"
    task.resume(box.id)
    assert task.state(box.id).status == "running"

    task.update(box.id, {"pids": {"limit": 100}})
    assert _pids_max(pid) == "100"

    stats = task.stats(box.id)
    print("stats:", {key: value for key, value in stats.items() if key != "raw"})
    assert stats["cgroup_version"] in (1, 2)
    assert stats["cpu"]["usage_ns"] > 0
    assert stats["pids"]["current"] >= 1 and stats["pids"]["limit"] == 100
    assert stats["memory"]["usage"] > 0

    long_exec = box.io()
    task.exec(box.id, "sleeper", dict(box.config_process(), args=["sleep", "1000"]),
              stdout=long_exec.stdout_path, stderr=long_exec.stderr_path)
    exec_pid = task.start(box.id, "sleeper")
    listed = {info.pid: info.exec_id for info in task.pids(box.id)}
    assert listed.get(pid) == "" and listed.get(exec_pid) == "sleeper"
    task.kill(box.id, signal.SIGKILL, exec_id="sleeper")
    assert task.wait(box.id, "sleeper", timeout=20).exit_status == 137
    task.delete(box.id, "sleeper")

    # a blocking Wait runs while other calls go over the same connection
    waiter_result = {}
    waiter = threading.Thread(target=lambda: waiter_result.update(exit=task.wait(box.id)), daemon=True)
    waiter.start()
    for _unused in range(5):
        assert task.state(box.id).status == "running"
    assert waiter.is_alive()
    task.kill(box.id, signal.SIGKILL)
    waiter.join(20)
    exited = waiter_result["exit"]
    print("exit status after SIGKILL:", exited.exit_status)
    assert exited.exit_status == 137  # the runc shim reports 128 + signal
    assert exited.exited_at is not None
    stopped = task.state(box.id)
    assert stopped.status == "stopped" and stopped.exit_status == 137 and stopped.exited_at == exited.exited_at

    assert init_io.wait_eof(10)
    assert init_io.output() == (b"started\n", b"")

    deleted = task.delete(box.id)
    assert (deleted.pid, deleted.exit_status) == (pid, 137)
    with pytest.raises(TtrpcNotFoundError):
        task.state(box.id)

    shim_identity = handle.identity
    assert shutdown_and_cleanup(handle, timeout=10) is True
    assert not shim_identity.is_alive()
    assert find_shim_pids(box.bundle, box.id, NAMESPACE) == []
    assert _gone(socket_path)
    for name in ("log", "address", "shim.pid"):
        assert _gone(os.path.join(box.bundle, name)), name
    assert not os.path.exists(os.path.join(RUNC_ROOT, box.id))


def test_shim_death_fails_pending_wait_with_closed_and_force_cleanup_removes_the_task(box: Box) -> None:
    handle = box.start()
    task = handle.task
    init_io = box.io()
    task.create(box.id, box.bundle, stdout=init_io.stdout_path, stderr=init_io.stderr_path)
    container_pid = task.start(box.id)
    container = ProcessIdentity.of(container_pid)
    result = {}

    def wait() -> None:
        try:
            task.wait(box.id)
        except TtrpcClosedError as exc:
            result["error"] = exc

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    assert task.state(box.id).status == "running"
    handle.identity.signal(signal.SIGKILL)
    waiter.join(20)
    assert isinstance(result.get("error"), TtrpcClosedError)
    with pytest.raises(TtrpcClosedError):
        task.state(box.id)

    assert shutdown_and_cleanup(handle, timeout=2, force=True) is True  # it was gone already, not killed by us
    assert container.wait_gone(10), "the shim's delete action should have removed the container"
    assert not os.path.exists(os.path.join(RUNC_ROOT, box.id))
    assert _gone(handle.socket_path) and _gone(os.path.join(box.bundle, "log"))


def test_shutdown_refuses_while_a_task_is_left_unless_forced(box: Box) -> None:
    handle = box.start()
    init_io = box.io()
    handle.task.create(box.id, box.bundle, stdout=init_io.stdout_path, stderr=init_io.stderr_path)
    handle.task.start(box.id)
    with pytest.raises(ShimError, match="still running after Shutdown"):
        shutdown_and_cleanup(handle, timeout=1)
    assert handle.identity.is_alive()
    handle = ShimHandle.from_record(handle.record())  # reconnect as a later module run would
    assert handle.task.state(box.id).status == "running"
    assert shutdown_and_cleanup(handle, timeout=1, force=True) is False
    assert find_shim_pids(box.bundle, box.id, NAMESPACE) == []
    assert not os.path.exists(os.path.join(RUNC_ROOT, box.id))
    again = shimlib.run_shim_delete(handle)  # nothing left: the delete action is still harmless
    print("shim delete action on a clean bundle:", again)


_STARTER = """
import json, sys
from ansible_collections.daemonless.oci.plugins.module_utils.shim import start_shim
handle = start_shim(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], timeout=20, debug=True)
print(json.dumps(handle.record()))
"""


def test_shim_outlives_the_process_that_started_it(box: Box) -> None:
    """The module-process pattern: one short process starts the shim (and its log reader dies with
    it); later processes reconnect from the stored record. -debug makes the shim log on every call."""
    done = subprocess.run([sys.executable, "-c", _STARTER, SHIM, box.bundle, box.id, NAMESPACE],  # noqa: S603
                          capture_output=True, check=True,
                          env=dict(os.environ, PYTHONPATH=os.environ["ANSIBLE_COLLECTIONS_PATH"].split(":")[0]))
    record = json.loads(done.stdout)
    handle = ShimHandle.from_record(record)
    box.handles.append(handle)
    assert handle.identity.is_alive()
    init_io = box.io()
    pid = handle.task.create(box.id, box.bundle, stdout=init_io.stdout_path, stderr=init_io.stderr_path)
    assert handle.task.start(box.id) == pid
    assert _exec(handle.task, box, "late-exec", ["echo", "still here"]) == (0, b"still here\n", b"")
    # init is pid 1 of its pid namespace and ignores SIGTERM without a handler: SIGKILL to all processes
    handle.task.kill(box.id, signal.SIGKILL, all_processes=True)
    assert handle.task.wait(box.id, timeout=20).exit_status == 137
    handle.task.delete(box.id)
    assert shutdown_and_cleanup(handle, timeout=10) is True
    assert find_shim_pids(box.bundle, box.id, NAMESPACE) == [] and _gone(os.path.join(box.bundle, "log"))
    assert _gone(handle.socket_path)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

def _leftovers(box: Box) -> List[str]:
    return sorted(name for name in os.listdir(box.bundle) if name in ("log", "address", "shim.pid"))


def test_missing_shim_binary(box: Box) -> None:
    with pytest.raises(ShimStartError, match="does not exist"):
        start_shim("/usr/bin/containerd-shim-dloci-nonexistent-v2", box.bundle, box.id, NAMESPACE)
    with pytest.raises(ShimStartError, match="must be absolute"):
        start_shim("containerd-shim-runc-v2", box.bundle, box.id, NAMESPACE)
    assert _leftovers(box) == []


def test_shim_that_exits_at_once(box: Box) -> None:
    with pytest.raises(ShimStartError, match="exited with status 1") as caught:
        start_shim("/bin/false", box.bundle, box.id, NAMESPACE, timeout=10)
    assert caught.value.returncode == 1 and caught.value.argv[0] == "/bin/false"
    assert _leftovers(box) == []


def _fake_script(box: Box, name: str, body: str) -> str:
    path = os.path.join(os.path.dirname(box.bundle), name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


def test_shim_that_prints_garbage(box: Box) -> None:
    # fake_garbage_shim: exits 0 but prints words instead of an address, and chatter on stderr
    fake = _fake_script(box, "fake_garbage_shim", "echo 'hello, this is not an address'\necho chatter >&2\n")
    with pytest.raises(ShimStartError, match="not an address") as caught:
        start_shim(fake, box.bundle, box.id, NAMESPACE, timeout=10)
    assert "chatter" in str(caught.value)  # stderr kept for the message, never parsed as the address
    assert _leftovers(box) == []


def test_shim_whose_socket_never_answers(box: Box) -> None:
    # fake_mute_shim: prints the address of a socket that accepts connections but never replies
    mute = os.path.join(os.path.dirname(box.bundle), "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(mute)
    listener.listen(4)
    try:
        fake = _fake_script(box, "fake_mute_shim", 'echo "unix://$FAKE_SOCKET"\n')
        env = dict(os.environ, FAKE_SOCKET=mute)
        started = time.monotonic()
        with pytest.raises(ShimError, match="does not answer"):
            start_shim(fake, box.bundle, box.id, NAMESPACE, timeout=2, env=env)
        assert time.monotonic() - started < 10
        assert _leftovers(box) == []
        assert os.path.exists(mute)  # a socket somebody still listens on is not ours to remove
    finally:
        listener.close()


def test_dial_an_address_nobody_listens_on() -> None:
    with pytest.raises(TtrpcDialError, match="No such file"):
        TaskClient.dial("unix:///run/containerd/s/dloci-test-nobody-" + secrets.token_hex(8), NAMESPACE)
    with pytest.raises(TtrpcDialError, match="refused"):
        TaskClient.dial("dloci-test-nobody-" + secrets.token_hex(8), NAMESPACE)  # abstract
    with pytest.raises(ShimError):
        shimlib.parse_shim_address(b"line one\nline two\n")
