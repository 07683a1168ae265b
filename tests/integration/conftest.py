"""Integration tests: real ``ansible-playbook`` runs (connection local) against this collection.

Every test gets private run/persist roots under /tmp and a runtime configuration whose runc and
conmon are the real binaries behind a one-line wrapper that appends each call to a file: the
tests read it to prove what a run did *not* do (a no-op run calls neither). Each playbook writes
its registered results to a JSON file, so assertions are on the modules' real return values.
Every container is removed at teardown through the library, whatever the test did.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional

import pytest
import testkit

from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
COLLECTIONS = os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls")


def ansible_playbook() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    found = candidate if os.path.exists(candidate) else shutil.which("ansible-playbook")
    if not found:
        pytest.skip("ansible-playbook is not installed (pip install ansible-core)")
    return found


def build_rootfs(target: str) -> str:
    """The shared busybox rootfs, or a skip naming what is missing."""
    try:
        return testkit.build_busybox_rootfs(target)
    except testkit.MissingTool as exc:
        pytest.skip(str(exc))


def _wrapper(directory: str, name: str, real: str, log: str) -> str:
    """A logging wrapper around a real binary: one line per call, then exec the binary itself."""
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write('#!/bin/sh\necho "$0 $*" >> {}\nexec {} "$@"\n'.format(log, real))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="session")
def session_root() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: these tests run real container runtimes")
    ansible_playbook()
    root = tempfile.mkdtemp(prefix="dloci-it-", dir="/tmp")
    os.chmod(root, 0o711)
    build_rootfs(os.path.join(root, "rootfs"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


class Env:
    """One test's private roots, configuration, call log and playbook runner."""

    def __init__(self, root: str, rootfs: str) -> None:
        self.root = root
        self.rootfs = rootfs
        self.run_root = os.path.join(root, "run")
        self.persist_root = os.path.join(root, "lib")
        self.unit_dir = os.path.join(root, "units")
        self.calls = os.path.join(root, "calls.log")
        bin_dir = os.path.join(root, "bin")
        os.makedirs(bin_dir)
        for tool in ("runc", "conmon"):
            if not shutil.which(tool):
                pytest.skip("{} is not installed".format(tool))
        self.config = os.path.join(root, "runtimes.json")
        runtimes = {"runc": {"runtime_path": _wrapper(bin_dir, "runc", shutil.which("runc"), self.calls)}}
        if shutil.which("runsc"):  # the wrapper keeps the name, so runsc's default flags still apply
            runtimes["runsc"] = {"runtime_path": _wrapper(bin_dir, "runsc", shutil.which("runsc"), self.calls)}
        with open(self.config, "w") as handle:
            json.dump({"default_runtime": "runc",
                       "conmon": _wrapper(bin_dir, "conmon", shutil.which("conmon"), self.calls),
                       "runtimes": runtimes}, handle)
        self.count = 0

    @property
    def defaults(self) -> Dict[str, str]:
        return {"config_file": self.config, "run_root": self.run_root, "persist_root": self.persist_root}

    def manager(self) -> ContainerManager:
        return ContainerManager.from_config(self.config, overrides={"run_root": self.run_root,
                                                                    "persist_root": self.persist_root})

    def call_count(self) -> int:
        try:
            with open(self.calls) as handle:
                return len(handle.readlines())
        except FileNotFoundError:
            return 0

    def calls_since(self, start: int) -> List[str]:
        try:
            with open(self.calls) as handle:
                return [line.strip() for line in handle.readlines()[start:]]
        except FileNotFoundError:
            return []

    def play(self, tasks: List[Dict[str, Any]], check: bool = False, diff: bool = False,
             expect_failure: bool = False, extra_vars: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Run the tasks in one play; returns each task's registered result, in order."""
        self.count += 1
        out = os.path.join(self.root, "results-{}.json".format(self.count))
        registered = []
        body = []
        for index, task in enumerate(tasks):
            task = dict(task)
            task["register"] = "r{}".format(index)
            task.setdefault("ignore_errors", expect_failure)
            registered.append("r{}".format(index))
            body.append(task)
        body.append({"ansible.builtin.copy": {"content": "{{ [" + ", ".join(registered) + "] | to_json }}",
                                              "dest": out}, "check_mode": False, "diff": False})
        play = [{"hosts": "localhost", "gather_facts": False,
                 "vars": {"ansible_python_interpreter": "/usr/bin/python3"},
                 "module_defaults": {"group/daemonless.oci.oci": self.defaults}, "tasks": body}]
        path = os.path.join(self.root, "play-{}.yml".format(self.count))
        with open(path, "w") as handle:
            json.dump(play, handle)
        argv = [ansible_playbook(), "-i", "localhost,", "-c", "local", path]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        for key, value in (extra_vars or {}).items():
            argv += ["-e", "{}={}".format(key, value)]
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
        proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if not os.path.exists(out):
            raise AssertionError("playbook failed before writing results:\n" + proc.stdout.decode(errors="replace"))
        with open(out) as handle:
            return json.load(handle)

    def snapshot(self) -> Dict[str, Any]:
        """Files under both roots (path, size, mtime) and every process that mentions our run root."""
        files = {}
        for base in (self.run_root, self.persist_root, self.unit_dir):
            for directory, _dirs, names in os.walk(base):
                for name in names + _dirs:
                    path = os.path.join(directory, name)
                    if path.endswith(".lock"):
                        continue  # lock files are created by readers too; their content is empty
                    try:
                        info = os.lstat(path)
                    except FileNotFoundError:
                        continue
                    files[path] = (info.st_size, info.st_mtime_ns) if not os.path.isdir(path) else "dir"
        processes = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open("/proc/{}/cmdline".format(pid), "rb") as handle:
                        if self.run_root.encode() in handle.read():
                            processes.append(int(pid))
                except OSError:
                    continue
        return {"files": files, "processes": sorted(processes),
                "mounts": [line for line in open("/proc/self/mounts") if self.root in line]}

    def cleanup(self) -> List[str]:
        errors = []
        manager = self.manager()
        for container in manager.list():
            try:
                manager.remove(container, timeout=0)
            except Exception as exc:  # noqa: BLE001 - teardown collects every failure
                errors.append("{}: {}".format(container.name, exc))
        for line in open("/proc/self/mounts").read().splitlines():
            target = line.split()[1]
            if target.startswith(self.root):
                subprocess.run(["umount", "-l", target], check=False)
        return errors


@pytest.fixture
def env(session_root: str) -> Iterator[Env]:
    root = tempfile.mkdtemp(prefix="t", dir=session_root)
    environment = Env(root, os.path.join(session_root, "rootfs"))
    yield environment
    assert environment.cleanup() == []
