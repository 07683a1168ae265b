"""Every state transition of the oci implementation, on runc, crun and runsc, with real programs."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    CONTAINER_STATE_CREATED,
    CONTAINER_STATE_PAUSED,
    CONTAINER_STATE_RUNNING,
    CONTAINER_STATE_STOPPED,
)
from ansible_collections.daemonless.oci.plugins.module_utils.manager import CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; echo ready; while :; do sleep 1; done"]


def create(manager, rootfs, name, handler, args=None, **kwargs):
    spec = kwargs.pop("spec", None) or default_spec(rootfs, args or SLEEPER, readonly_root=True)
    return manager.create(CreateRequest(name=name, spec=spec, handler=handler, **kwargs))


def wait_for_log(container, text, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(container.log_path) and text in open(container.log_path).read():
            return
        time.sleep(0.02)
    raise AssertionError("{!r} never appeared in {}".format(text, container.log_path))


def test_full_lifecycle(manager, busybox_rootfs, handler):
    container = create(manager, busybox_rootfs, "life-" + handler, handler, stop_timeout=5)
    assert container.state.status == CONTAINER_STATE_CREATED
    init = container.state.init_process()
    assert init.is_alive()

    assert manager.start(container) is True
    assert container.state.status == CONTAINER_STATE_RUNNING
    assert container.state.started is not None
    wait_for_log(container, "stdout F ready")
    assert manager.start(container) is False  # already running: nothing to do

    assert manager.pause(container) is True
    assert container.state.status == CONTAINER_STATE_PAUSED
    assert manager.pause(container) is False
    assert manager.unpause(container) is True
    assert container.state.status == CONTAINER_STATE_RUNNING

    assert manager.stop(container) is True
    assert container.state.status == CONTAINER_STATE_STOPPED
    assert container.state.exit_code == 0  # the trap exits cleanly on SIGTERM
    assert container.state.finished is not None
    assert not init.is_alive()
    assert manager.stop(container) is False

    assert manager.start(container) is True  # a stopped container is created again and started
    assert container.state.status == CONTAINER_STATE_RUNNING
    assert container.metadata.attempt == 1
    assert container.state.exit_code is None

    assert manager.pause(container) is True
    manager.remove(container)  # paused -> absent: unpause, stop, delete
    assert manager.find(container.name) is None
    assert not os.path.exists(manager.paths.container_dir(container.id))
    assert not os.path.exists(manager.paths.run_dir(container.id))
    assert not container.state.init_process().is_alive()
    assert not container.state.conmon_process().is_alive()


@pytest.mark.parametrize("target", ["stopped", "absent"])
def test_created_container_can_be_stopped_or_removed(manager, busybox_rootfs, handler, target):
    container = create(manager, busybox_rootfs, "cr-" + target, handler)
    if target == "stopped":
        assert manager.stop(container) is True
        assert container.state.status == CONTAINER_STATE_STOPPED
        assert container.state.exit_code == 137
    else:
        manager.remove(container)
        assert manager.find(container.name) is None
    assert not container.state.init_process().is_alive()


def test_paused_container_can_be_stopped(manager, busybox_rootfs, handler):
    container = create(manager, busybox_rootfs, "ps-" + handler, handler)
    manager.start(container)
    manager.pause(container)
    assert manager.stop(container) is True
    assert container.state.status == CONTAINER_STATE_STOPPED


def test_sigterm_ignored_is_killed_after_stop_timeout(manager, busybox_rootfs, handler):
    args = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]
    container = create(manager, busybox_rootfs, "ign-" + handler, handler, args=args, stop_timeout=1.5)
    manager.start(container)
    wait_for_log(container, "ready")
    started = time.monotonic()
    manager.stop(container)
    took = time.monotonic() - started
    assert container.state.exit_code == 137
    assert 1.4 <= took < 10, took


def test_sigkill_reports_137(manager, busybox_rootfs, handler):
    container = create(manager, busybox_rootfs, "kill-" + handler, handler)
    manager.start(container)
    manager.signal(container, "KILL")
    manager.runtime.wait_container_state_stopped(container, timeout=10)
    manager.refresh(container)
    assert container.state.status == CONTAINER_STATE_STOPPED
    assert container.state.exit_code == 137


def test_exit_code_of_a_finished_container(manager, busybox_rootfs, handler):
    container = create(manager, busybox_rootfs, "exit-" + handler, handler, args=["sh", "-c", "exit 42"])
    manager.start(container)
    manager.runtime.wait_container_state_stopped(container, timeout=10)
    assert container.state.exit_code == 42
    assert container.state.finished >= container.state.started


def test_log_is_cri_format_and_root_only(manager, busybox_rootfs, handler):
    args = ["sh", "-c", "echo out; echo err >&2; printf partial; sleep 100"]
    container = create(manager, busybox_rootfs, "log-" + handler, handler, args=args)
    manager.start(container)
    wait_for_log(container, "partial")
    lines = open(container.log_path).read().splitlines()
    streams = {line.split(" ")[1] + ":" + line.split(" ", 3)[3] for line in lines}
    assert "stdout:out" in streams and "stderr:err" in streams
    assert all(line.split(" ")[2] in ("F", "P") for line in lines)
    assert os.stat(container.log_path).st_mode & 0o077 == 0
    assert os.stat(manager.paths.state_file(container.id)).st_mode & 0o077 == 0
    assert os.stat(manager.paths.persist_root).st_mode & 0o077 == 0


def test_log_reopen_moves_new_output_to_a_new_file(manager, busybox_rootfs, handler):
    """Log rotation: conmon is asked to reopen, the file at log_path is a new one, and output written after
    the reopen lands there."""
    args = ["sh", "-c", "n=0; while :; do n=$((n+1)); echo tick$n; sleep 0.1; done"]
    container = create(manager, busybox_rootfs, "reopen-" + handler, handler, args=args)
    manager.start(container)
    wait_for_log(container, "tick2")
    os.rename(container.log_path, container.log_path + ".1")   # what logrotate does before asking to reopen
    manager.runtime.reopen_container_log(container)
    wait_for_log(container, "tick")
    first_new = int(open(container.log_path).read().split("tick")[1].split()[0])
    last_old = int(open(container.log_path + ".1").read().rsplit("tick", 1)[1].split()[0])
    assert first_new > last_old
    assert os.stat(container.log_path).st_mode & 0o777 == 0o600
    manager.stop(container)


@pytest.mark.slow
def test_oom_kill_is_reported(manager, busybox_rootfs, handler):
    if handler == "runsc":
        pytest.skip("runsc (ptrace platform) enforces memory limits inside its sandbox; conmon sees no cgroup OOM")
    spec = default_spec(busybox_rootfs, ["tail", "/dev/zero"], readonly_root=True)
    spec["linux"]["resources"]["memory"] = {"limit": 32 * 1024 * 1024, "swap": 32 * 1024 * 1024}
    container = create(manager, busybox_rootfs, "oom-" + handler, handler, spec=spec)
    manager.start(container)
    manager.runtime.wait_container_state_stopped(container, timeout=60)
    assert container.state.exit_code == 137
    assert container.state.oom_killed is True


def test_conmon_killed_is_detected(manager, busybox_rootfs, handler):
    container = create(manager, busybox_rootfs, "cmk-" + handler, handler)
    manager.start(container)
    supervisor = container.state.conmon_process()
    assert supervisor.signal(signal.SIGKILL)
    assert supervisor.wait_gone(5)
    container.state.status = ""  # force a full refresh, as a later module run would after noticing
    manager.files.save_state(container)
    inspected = manager.inspect(manager.get(container.name))
    assert "conmon" in inspected.state.error and "gone" in inspected.state.error
    started = time.monotonic()
    manager.stop(inspected, timeout=1)
    assert time.monotonic() - started < 15
    assert inspected.state.status == CONTAINER_STATE_STOPPED
    assert inspected.state.exit_code == 255  # nobody recorded it: reported as lost, not hung on
    assert "conmon" in inspected.state.error


def test_second_process_sees_the_same_state(manager, busybox_rootfs, handler, runtime_config, state_root):
    import subprocess
    import sys
    container = create(manager, busybox_rootfs, "seen-" + handler, handler)
    manager.start(container)
    code = ("import json,sys; sys.path.insert(0, {tree!r});"
            "from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager;"
            "m = ContainerManager.from_config({cfg!r}, overrides={{'run_root': {run!r}, 'persist_root': {lib!r}}});"
            "c = m.inspect(m.get({name!r})); print(json.dumps(c.state.to_json()))").format(
        tree=os.environ["ANSIBLE_COLLECTIONS_PATH"].split(":")[0], cfg=runtime_config,
        run=os.path.join(state_root, "run"), lib=os.path.join(state_root, "lib"), name=container.name)
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True).stdout
    assert json.loads(output) == container.state.to_json()


def test_reboot_leaves_container_known_stopped_and_restartable(manager, busybox_rootfs, handler):
    import shutil
    container = create(manager, busybox_rootfs, "boot-" + handler, handler)
    manager.start(container)
    # A reboot: every process dies without notice, and the run root (tmpfs) is gone.
    container.state.conmon_process().signal(signal.SIGKILL)
    init = container.state.init_process()
    init.signal(signal.SIGKILL)
    init.wait_gone(10)
    manager.runtime.impl(container).run_runtime("delete", "--force", container.id, check=False)
    shutil.rmtree(manager.paths.run_root)
    after = manager.inspect(manager.get(container.name))
    assert after.state.status == CONTAINER_STATE_STOPPED
    assert manager.start(after) is True
    assert after.state.status == CONTAINER_STATE_RUNNING
    assert ProcessIdentity(after.state.init_pid, after.state.init_start_time).is_alive()
