#!/usr/bin/env python
"""bench/lifecycle: one container cycle (create + start, then stop + delete), several ways, interleaved.

* ``lib-<handler>``    : this collection's library (ContainerManager: create, start, stop with
                         timeout 0, remove), for each handler: runc, crun, runsc
* ``conmon-runc``      : conmon + runc driven directly, CRI-O style (the floor of this design)
* ``runc``             : the raw runtime CLI: create, start, kill KILL, wait for the pid, delete
* ``podman``           : ``podman run -d --network none`` then ``podman rm -f -t 0``

Every round runs each tool once in a freshly shuffled order, after warm-up rounds. Reported per
tool: median and p90 (ms), and the median of per-round paired ratios against raw runc and against
conmon-runc. Waits use pidfds (never subprocess timeouts). Run as root under the subreaper:

    python3 tests/tools/subreaper.py python3 bench/lifecycle/run.py --rounds 40
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "tools"))
import testkit  # noqa: E402

testkit.collection_on_path()

from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import (  # noqa: E402
    ProcessIdentity,
    read_pid_file,
    run_command,
    wait_child,
)

ARGS = ["sleep", "3600"]
IMAGE = "localhost/dloci-bench-lifecycle:latest"


class Bench:
    """Holds the shared rootfs, the per-tool scratch dirs and a counter for unique names."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.rootfs = testkit.build_busybox_rootfs(os.path.join(work, "rootfs"))
        self.counter = 0
        self.runc_root = os.path.join(work, "runc-root")
        self.config = self._config()
        self.manager = ContainerManager.from_config(self.config, overrides={
            "run_root": os.path.join(work, "run"), "persist_root": os.path.join(work, "lib")})

    def _config(self) -> str:
        handlers = {"runc": {"runtime_path": shutil.which("runc")},
                    "runsc": {"runtime_path": shutil.which("runsc"),
                              "runtime_args": ["--platform=ptrace", "--network=none"]}}
        handlers["crun"] = {"runtime_path": testkit.crun_wrapper(self.work)}
        path = os.path.join(self.work, "runtimes.json")
        with open(path, "w") as handle:
            json.dump({"runtimes": handlers}, handle)
        return path

    def name(self) -> str:
        self.counter += 1
        return "b{}".format(self.counter)

    def bundle(self, name: str) -> str:
        bundle = os.path.join(self.work, "bundles", name)
        os.makedirs(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as handle:
            spec = default_spec(self.rootfs, ARGS, readonly_root=True)
            spec["linux"]["cgroupsPath"] = "/dloci-bench/" + name
            json.dump(spec, handle)
        return bundle

    # the tools
    def library(self, handler: str) -> None:
        container = self.manager.create(CreateRequest(name=self.name(), spec=default_spec(
            self.rootfs, ARGS, readonly_root=True), handler=handler))
        self.manager.start(container)
        self.manager.remove(container, timeout=0)

    def raw_runc(self) -> None:
        name = self.name()
        bundle = self.bundle(name)
        pid_file = os.path.join(bundle, "pid")
        runc = ["runc", "--root", self.runc_root]
        with open(os.devnull, "wb") as null:  # runc create hands its stdio to the container
            proc = subprocess.Popen(runc + ["create", "--bundle", bundle, "--pid-file", pid_file, name],
                                    stdin=subprocess.DEVNULL, stdout=null, stderr=null)
            if wait_child(proc, 60) != 0:
                raise RuntimeError("runc create failed")
        init = ProcessIdentity.of(read_pid_file(pid_file))
        run_command(runc + ["start", name])
        run_command(runc + ["kill", name, "KILL"])
        init.wait_gone(30)
        run_command(runc + ["delete", name])
        shutil.rmtree(bundle)

    def conmon_runc(self) -> None:
        name = self.name()
        bundle = self.bundle(name)
        exits = os.path.join(self.work, "exits")
        os.makedirs(exits, exist_ok=True)
        os.makedirs(os.path.join(self.work, "attach"), exist_ok=True)
        sync_parent, sync_child = socket.socketpair()
        start_parent, start_child = socket.socketpair()
        argv = ["conmon", "-c", name, "-u", name, "-n", name, "-r", shutil.which("runc"), "-b", bundle,
                "-p", os.path.join(bundle, "pidfile"), "-P", os.path.join(bundle, "conmon-pidfile"),
                "-l", "k8s-file:" + os.path.join(bundle, "log"), "--exit-dir", exits, "--runtime-arg",
                "--root=" + self.runc_root, "--socket-dir-path", os.path.join(self.work, "attach"),
                "--log-level", "error"]
        env = {"PATH": os.environ["PATH"], "_OCI_SYNCPIPE": str(sync_child.fileno()),
               "_OCI_STARTPIPE": str(start_child.fileno())}
        proc = subprocess.Popen(argv, env=env, cwd=bundle, pass_fds=(sync_child.fileno(), start_child.fileno()),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sync_child.close()
        start_child.close()
        start_parent.sendall(b"\0")
        start_parent.close()
        wait_child(proc, 60)
        message = json.loads(sync_parent.makefile().readline())
        sync_parent.close()
        init = ProcessIdentity.of(message["pid"])
        supervisor = ProcessIdentity.of(read_pid_file(os.path.join(bundle, "conmon-pidfile")))
        runc = ["runc", "--root", self.runc_root]
        run_command(runc + ["start", name])
        run_command(runc + ["kill", name, "KILL"])
        init.wait_gone(30)
        run_command(runc + ["delete", name])
        supervisor.wait_gone(30)
        shutil.rmtree(bundle)
        os.unlink(os.path.join(exits, name))

    def podman(self) -> None:
        name = "dloci-bench-" + self.name()
        run_command(["podman", "run", "-d", "--network", "none", "--pull", "never", "--name", name, IMAGE] + ARGS)
        run_command(["podman", "rm", "-f", "-t", "0", name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-podman", action="store_true")
    parser.add_argument("--handlers", default="runc,crun,runsc")
    parser.add_argument("--json", help="also write the results here")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dloci-bench-", dir="/tmp")
    bench = Bench(work)
    tools: Dict[str, Callable[[], None]] = {"runc": bench.raw_runc, "conmon-runc": bench.conmon_runc}
    for handler in options.handlers.split(","):
        tools["lib-" + handler] = lambda handler=handler: bench.library(handler)
    if not options.no_podman and shutil.which("podman"):
        testkit.podman_import(bench.rootfs, IMAGE)
        tools["podman"] = bench.podman
    timings: Dict[str, List[float]] = {name: [] for name in tools}
    try:
        for round_number in range(options.warmup + options.rounds):
            order = list(tools)
            random.shuffle(order)
            for name in order:
                started = time.perf_counter()
                tools[name]()
                if round_number >= options.warmup:
                    timings[name].append((time.perf_counter() - started) * 1000)
    finally:
        for container in bench.manager.list():
            bench.manager.remove(container, timeout=0)
        testkit.crun_wrapper_teardown(work)
        shutil.rmtree(work, ignore_errors=True)
    report(timings, options.json)
    return 0


def report(timings: Dict[str, List[float]], json_path: str) -> None:
    rows = []
    for name, values in timings.items():
        row = {"tool": name, "median_ms": statistics.median(values), "p90_ms": testkit.p90(values)}
        for base in ("runc", "conmon-runc"):
            row["x_" + base] = testkit.paired_ratio(timings, name, base)
        rows.append(row)
    print("| tool | median ms | p90 ms | x raw runc (paired) | x conmon+runc (paired) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| {tool} | {median_ms:.1f} | {p90_ms:.1f} | {x_runc:.2f} | {x_conmon-runc:.2f} |".format(**row))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
