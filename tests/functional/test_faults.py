"""Bad input and faults: clear errors, and nothing half-made, orphaned or signalled by mistake."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    CONTAINER_STATE_RUNNING,
    CONTAINER_STATE_STOPPED,
)
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ConfigError,
    ContainerExistsError,
    OciError,
    ValidationError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.manager import CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import start_time


SLEEP = ["sleep", "1000"]


def leftovers(manager):
    """Everything a container could leave: state dirs, names, bundles, conmon processes."""
    found = []
    for sub in ("containers", "names"):
        path = os.path.join(manager.paths.persist_root, sub)
        if os.path.isdir(path):
            found += [os.path.join(sub, name) for name in os.listdir(path)]
    path = os.path.join(manager.paths.run_root, "containers")
    if os.path.isdir(path):
        found += ["run/" + name for name in os.listdir(path)]
    conmons = subprocess.run(["pgrep", "-f", "conmon.*" + manager.paths.run_root], capture_output=True, text=True, check=False)
    found += ["conmon " + pid for pid in conmons.stdout.split()]
    return found


@pytest.mark.parametrize("name", ["", "a/b", "..", "a..b", "-rf", ".hidden", "x" * 129, "nul\x00byte", "sp ace",
                                  "semi;colon"])
def test_bad_names_are_rejected_before_anything_is_touched(manager, busybox_rootfs, name):
    with pytest.raises(ValidationError):
        manager.create(CreateRequest(name=name, spec=default_spec(busybox_rootfs, SLEEP), handler="runc"))
    assert leftovers(manager) == []


@pytest.mark.parametrize("kwargs,error,text", [
    ({"handler": "nosuch"}, ConfigError, "failed to find runtime handler nosuch"),
    ({"stop_signal": "SIGNOPE"}, ValidationError, "unknown signal"),
    ({"stop_signal": 64}, ValidationError, "between 1 and 31"),
    ({"stop_timeout": -1}, ValidationError, "stop_timeout"),
    ({"annotations": {"io.kubernetes.cri-o.Devices": "x"}}, ConfigError, "does not allow"),
])
def test_bad_parameters_leave_nothing(manager, busybox_rootfs, kwargs, error, text):
    kwargs.setdefault("handler", "runc")
    with pytest.raises(error, match=text):
        manager.create(CreateRequest(name="bad", spec=default_spec(busybox_rootfs, SLEEP), **kwargs))
    assert leftovers(manager) == []


def _config_with(tmp_path, handler_settings, **top):
    path = tmp_path / "rt.json"
    path.write_text(json.dumps(dict(runtimes={"h": handler_settings}, default_runtime="h", **top)))
    return str(path)


def test_missing_runtime_binary_is_a_clear_error(tmp_path, manager_for, busybox_rootfs):
    manager = manager_for(_config_with(tmp_path, {"runtime_path": "/nonexistent/runc"}))
    with pytest.raises(ConfigError, match="/nonexistent/runc is missing"):
        manager.create(CreateRequest(name="x", spec=default_spec(busybox_rootfs, SLEEP)))
    assert leftovers(manager) == []


def test_missing_conmon_is_a_clear_error(tmp_path, manager_for, busybox_rootfs):
    config = _config_with(tmp_path, {"runtime_path": "/usr/sbin/runc"}, conmon="/nonexistent/conmon")
    manager = manager_for(config)
    with pytest.raises(ConfigError, match="conmon /nonexistent/conmon is missing"):
        manager.create(CreateRequest(name="x", spec=default_spec(busybox_rootfs, SLEEP)))
    assert leftovers(manager) == []


def test_runtime_refusing_the_spec_leaves_nothing(manager, busybox_rootfs):
    spec = default_spec(busybox_rootfs, ["/no/such/binary"])
    spec["process"]["cwd"] = "relative/is/invalid"
    with pytest.raises(OciError, match="container create failed"):
        manager.create(CreateRequest(name="refused", spec=spec, handler="runc"))
    time.sleep(0.2)
    assert leftovers(manager) == []
    runc_list = subprocess.run(["runc", "--root", manager.paths.runtime_root("runc"), "list", "-q"],
                               capture_output=True, text=True, check=False)
    assert runc_list.stdout.strip() == ""


# A runtime wrapper for fault injection: runc itself never fails a delete it has carried out, but gVisor
# does when its sandbox died ("stopping container: context deadline exceeded", seen on Debian unstable).
FAKE_RUNTIME_FAILING_DELETE = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = delete ]; then
    {really_delete}
    echo "destroying container: stopping container: context deadline exceeded" >&2
    exit 128
  fi
done
exec /usr/sbin/runc "$@"
"""


@pytest.mark.parametrize("really_delete", [True, False], ids=["deleted-anyway", "not-deleted"])
def test_failed_runtime_delete_counts_only_when_the_runtime_still_knows_the_container(
        tmp_path, manager_for, busybox_rootfs, really_delete):
    wrapper = tmp_path / "fake-runc"
    wrapper.write_text(FAKE_RUNTIME_FAILING_DELETE.format(
        really_delete='/usr/sbin/runc "$@" >/dev/null 2>&1' if really_delete else ":"))
    wrapper.chmod(0o755)
    manager = manager_for(_config_with(tmp_path, {"runtime_path": str(wrapper)}))
    container = manager.create(CreateRequest(name="undeletable", spec=default_spec(busybox_rootfs, SLEEP)))
    manager.start(container)
    manager.stop(container)
    if really_delete:
        manager.remove(container)
        assert leftovers(manager) == []
        return
    with pytest.raises(OciError, match="context deadline exceeded"):
        manager.remove(container)
    assert manager.find("undeletable") is not None          # still known, so a later run can retry
    subprocess.run(["runc", "--root", manager.paths.runtime_root("h"), "delete", "--force", container.id],
                   check=True)
    manager.remove(manager.get("undeletable"))
    assert leftovers(manager) == []


def test_duplicate_name_is_refused(manager, busybox_rootfs):
    manager.create(CreateRequest(name="dup", spec=default_spec(busybox_rootfs, SLEEP), handler="runc"))
    with pytest.raises(ContainerExistsError, match="already in use"):
        manager.create(CreateRequest(name="dup", spec=default_spec(busybox_rootfs, SLEEP), handler="runc"))
    assert len(manager.list()) == 1


def test_unknown_signal_is_refused(manager, busybox_rootfs):
    container = manager.create(CreateRequest(name="sig", spec=default_spec(busybox_rootfs, SLEEP), handler="runc"))
    manager.start(container)
    for bad in ("SIGBOGUS", 0, 32, "RTMIN+1"):
        with pytest.raises(ValidationError):
            manager.signal(container, bad)
    with pytest.raises(ValidationError):
        manager.stop(container, timeout=-1)
    assert manager.inspect(container).state.status == CONTAINER_STATE_RUNNING


def test_reused_pid_is_never_signalled(manager, busybox_rootfs):
    """A state file whose pid now belongs to another process: the process is left alone."""
    container = manager.create(CreateRequest(name="reuse", spec=default_spec(busybox_rootfs, SLEEP), handler="runc"))
    manager.start(container)
    manager.stop(container, timeout=0)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        state_path = manager.paths.state_file(container.id)
        state = json.load(open(state_path))
        state.update(status="running", initPid=stranger.pid, initStartTime=str(int(start_time(stranger.pid)) - 1),
                     pid=stranger.pid)
        state.pop("exitCode", None)
        open(state_path, "w").write(json.dumps(state))
        reloaded = manager.get("reuse")
        assert not reloaded.is_alive()
        manager.stop(reloaded, timeout=0)
        manager.remove(reloaded, timeout=0)
        assert stranger.poll() is None, "a process that merely reused the pid was signalled"
    finally:
        stranger.kill()
        stranger.wait()


def _in_subprocess(runtime_config, state_root, body):
    tree = os.environ["ANSIBLE_COLLECTIONS_PATH"].split(":")[0]
    code = ("import sys; sys.path.insert(0, {tree!r})\n"
            "from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest\n"
            "from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec\n"
            "m = ContainerManager.from_config({cfg!r}, overrides={{'run_root': {run!r}, 'persist_root': {lib!r}}})\n"
            ).format(tree=tree, cfg=runtime_config, run=os.path.join(state_root, "run"),
                     lib=os.path.join(state_root, "lib")) + body
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_racing_processes_are_serialised(manager, busybox_rootfs, runtime_config, state_root):
    """Two module-like processes creating one name, then stopping and starting one container at once."""
    body = ("try:\n"
            "    m.create(CreateRequest(name='race', spec=default_spec({rootfs!r}, ['sleep', '1000']), handler='runc'))\n"
            "    print('created')\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__)\n").format(rootfs=busybox_rootfs)
    racers = [_in_subprocess(runtime_config, state_root, body) for _unused in range(2)]
    outcomes = sorted(proc.communicate()[0].strip() for proc in racers)
    assert outcomes == ["ContainerExistsError", "created"], outcomes
    container = manager.get("race")
    manager.start(container)
    body = "c = m.get('race')\nfor attempt in range(3):\n    m.stop(c, timeout=0)\n    m.start(c)\nprint(c.state.status)\n"
    racers = [_in_subprocess(runtime_config, state_root, body) for _unused in range(2)]
    results = [proc.communicate() for proc in racers]
    assert [out.strip() for out, _err in results] == ["running", "running"], results
    final = manager.inspect(manager.get("race"))
    assert final.state.status == CONTAINER_STATE_RUNNING and final.is_alive()
    conmons = subprocess.run(["pgrep", "-f", "conmon.*" + final.id], capture_output=True, text=True, check=False).stdout.split()
    assert len(conmons) == 1, "exactly one supervisor must remain"


def test_stopped_state_survives_and_is_final(manager, busybox_rootfs):
    container = manager.create(CreateRequest(name="fin", spec=default_spec(busybox_rootfs, ["true"]), handler="runc"))
    manager.start(container)
    manager.runtime.wait_container_state_stopped(container, timeout=10)
    assert container.state.status == CONTAINER_STATE_STOPPED and container.state.exit_code == 0
    again = manager.inspect(manager.get("fin"))
    assert again.state.to_json() == container.state.to_json()
