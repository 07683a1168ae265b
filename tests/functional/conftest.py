"""Fixtures for tests that drive real conmon and real runc, crun and runsc (as root).

* ``busybox_rootfs``: a root filesystem made from Debian's busybox-static, once per session.
* ``handler``: parametrises a test over runc, crun and runsc. crun 1.8 refuses this machine
  kind's hybrid cgroup layout, so its handler points at a wrapper that runs crun in a private
  mount namespace where the cgroup2 mount lists no controller (tests/tools/crun-private-ns.sh);
  the host's mounts stay as they are for every other process.
* ``manager``: a ContainerManager on private run/persist roots; every container it made is
  removed at teardown, whatever the test did.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Iterator, List

import pytest
import testkit

from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager

HERE = os.path.dirname(os.path.abspath(__file__))
HANDLERS = ("runc", "crun", "runsc")


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: these tests run real container runtimes")


def build_busybox_rootfs(target: str) -> str:
    """The shared busybox rootfs, or a skip naming what is missing."""
    try:
        return testkit.build_busybox_rootfs(target)
    except testkit.MissingTool as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def work_root() -> Iterator[str]:
    _require_root()
    root = tempfile.mkdtemp(prefix="dloci-ft-", dir="/tmp")
    os.chmod(root, 0o700)
    yield root
    testkit.crun_wrapper_teardown(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_rootfs(work_root: str) -> str:
    return build_busybox_rootfs(os.path.join(work_root, "rootfs"))


@pytest.fixture(scope="session")
def runtime_config(work_root: str) -> str:
    """A configuration with the three handlers this machine can run."""
    handlers: Dict[str, Dict[str, object]] = {}
    if shutil.which("runc"):
        handlers["runc"] = {"runtime_path": shutil.which("runc")}
    if shutil.which("crun"):
        handlers["crun"] = {"runtime_path": testkit.crun_wrapper(work_root)}
    if shutil.which("runsc"):
        handlers["runsc"] = {"runtime_path": shutil.which("runsc"),
                             "runtime_args": ["--platform=ptrace", "--network=none"]}
    path = os.path.join(work_root, "runtimes.json")
    with open(path, "w") as handle:
        json.dump({"runtimes": handlers, "default_runtime": "runc"}, handle)
    return path


@pytest.fixture(params=HANDLERS)
def handler(request: pytest.FixtureRequest, runtime_config: str) -> str:
    with open(runtime_config) as handle:
        if request.param not in json.load(handle)["runtimes"]:
            pytest.skip("{} is not installed".format(request.param))
    return request.param


def make_manager(config_path: str, root: str) -> ContainerManager:
    return ContainerManager.from_config(config_path, overrides={
        "run_root": os.path.join(root, "run"), "persist_root": os.path.join(root, "lib")})


@pytest.fixture
def state_root(work_root: str) -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="t", dir=work_root)
    yield root


@pytest.fixture
def manager(runtime_config: str, state_root: str) -> Iterator[ContainerManager]:
    mgr = make_manager(runtime_config, state_root)
    yield mgr
    remove_all(mgr)


def remove_all(mgr: ContainerManager) -> List[str]:
    """Remove every container a manager knows; returns the errors met (teardown must not hide leaks)."""
    errors = []
    for container in mgr.list():
        try:
            mgr.remove(container, timeout=0)
        except Exception as exc:  # noqa: BLE001 - teardown collects every failure
            errors.append("{}: {}".format(container.name, exc))
    return errors


@pytest.fixture
def manager_for(state_root: str) -> Iterator:
    """Build managers for ad-hoc configurations; their containers are removed at teardown."""
    made: List[ContainerManager] = []

    def build(config_path: str) -> ContainerManager:
        made.append(make_manager(config_path, state_root))
        return made[-1]

    yield build
    for mgr in made:
        remove_all(mgr)
