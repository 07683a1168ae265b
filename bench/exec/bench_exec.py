#!/usr/bin/env python
"""B2: latency of an exec of `true` in a running container, side by side.

Tools, one exec each per round, in a freshly shuffled order every round (after warm-up rounds):

* ``library``        ContainerManager.exec_sync (lock, state check, conmon exec mode), timeout set
* ``library-direct`` the same call with ``stdin=b""``: the library's direct ``runtime exec`` path
* ``conmon``         conmon's exec mode driven directly, flag for flag as the reference: the floor
* ``runtime``        ``<runtime> exec --process F ID``, raw, in the foreground
* ``podman``         ``podman exec ID true`` on a busybox container (``podman run -d --network none``)

Every tool is started from this Python process and waited for on a pidfd, so every tool pays
the same fork+exec. Run as root, under a subreaper (conmon double-forks):

    python3 tests/tools/subreaper.py python3 bench/exec/bench_exec.py --rounds 60 --handlers runc crun
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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

from ansible_collections.daemonless.oci.plugins.module_utils import exec_sync  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command, wait_child  # noqa: E402

PODMAN_IMAGE = "localhost/dloci-bench-exec:latest"
PODMAN_NAME = "dloci-bench-exec"


def write_config(work: str, handlers: List[str]) -> str:
    runtimes: Dict[str, Dict[str, str]] = {}
    for name in handlers:
        path = testkit.crun_wrapper(work) if name == "crun" else shutil.which(name)
        if not path:
            sys.exit("{} is not installed".format(name))
        runtimes[name] = {"runtime_path": path}
    config = os.path.join(work, "runtimes.json")
    with open(config, "w") as handle:
        json.dump({"runtimes": runtimes, "default_runtime": handlers[0]}, handle)
    return config


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000.0


class ConmonFloor:
    """conmon's exec mode exactly as the reference drives it (spec 2.6), nothing else."""

    def __init__(self, manager: ContainerManager, container) -> None:
        self.rt = manager.runtime.impl(container)
        self.container = container
        self.work = tempfile.mkdtemp(prefix="floor-", dir=manager.paths.run_dir(container.id))
        process = container.spec()["process"]
        process["args"] = ["true"]
        self.process_file = os.path.join(self.work, "process.json")
        with open(self.process_file, "w") as handle:
            json.dump(process, handle)

    def __call__(self) -> None:
        snapshot, log, pid = self.rt.snapshot, os.path.join(self.work, "log"), os.path.join(self.work, "pid")
        argv = [snapshot.conmon, "-c", self.container.id, "-n", self.container.name, "-r", snapshot.runtime_path,
                "-p", pid, "-e", "-l", log, "--socket-dir-path", self.rt.paths.attach_dir, "--log-level", "error",
                "--sync", "-T", "10", "--exec-process-spec", self.process_file,
                "--runtime-arg", "--root=" + snapshot.runtime_root]
        read_end, write_end = os.pipe()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "_OCI_SYNCPIPE": str(write_end)}
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env, pass_fds=(write_end,))
        os.close(write_end)
        wait_child(process, 30)
        message = json.loads(os.read(read_end, 65536).decode())
        os.close(read_end)
        with open(log, "rb") as handle:
            exec_sync.parse_log(handle.read())
        for path in (log, pid):
            if os.path.exists(path):
                os.unlink(path)
        assert message.get("exit_code") == 0, message


class RawExec:
    """``<runtime> --root R exec --process F ID`` in the foreground."""

    def __init__(self, floor: ConmonFloor) -> None:
        self.argv = floor.rt.runtime_argv("exec", "--process", floor.process_file, floor.container.id)
        self.env = floor.rt.runtime_env()

    def __call__(self) -> None:
        run_command(self.argv, env=self.env, timeout=30)


class Podman:
    def __init__(self, rootfs: str) -> None:
        testkit.podman_import(rootfs, PODMAN_IMAGE)
        subprocess.run(["podman", "rm", "-f", "-t", "0", PODMAN_NAME], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        subprocess.run(["podman", "run", "-d", "--network", "none", "--pull", "never", "--name", PODMAN_NAME,
                        PODMAN_IMAGE, "sleep", "1000000"], check=True, stdout=subprocess.DEVNULL)

    def __call__(self) -> None:
        run_command(["podman", "exec", PODMAN_NAME, "true"], timeout=60)

    def close(self) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "0", PODMAN_NAME], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["podman", "rmi", PODMAN_IMAGE], check=False, stdout=subprocess.DEVNULL)


def percentile(values: List[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def summarise(samples: Dict[str, List[float]], anchor: str) -> List[Dict[str, float]]:
    rows = []
    for tool, values in samples.items():
        paired = [value / base for value, base in zip(values, samples[anchor])]
        rows.append({"tool": tool, "median": statistics.median(values), "p90": percentile(values, 0.9),
                     "min": min(values), "ratio_medians": statistics.median(values) / statistics.median(samples[anchor]),
                     "ratio_paired": statistics.median(paired)})
    return rows


def run_handler(handler: str, config: str, rootfs: str, work: str, rounds: int, warmup: int,
                podman: Podman) -> Dict[str, List[float]]:
    root = tempfile.mkdtemp(prefix=handler + "-", dir=work)
    manager = ContainerManager.from_config(config, overrides={"run_root": os.path.join(root, "run"),
                                                              "persist_root": os.path.join(root, "lib")})
    container = manager.create(CreateRequest(name="bench-" + handler, handler=handler,
                                             spec=default_spec(rootfs, ["sleep", "1000000"], readonly_root=True)))
    try:
        manager.start(container)
        floor = ConmonFloor(manager, container)
        tools: Dict[str, Callable[[], None]] = {
            "library": lambda: _expect_zero(manager.exec_sync(container, ["true"], 10)),
            "library-direct": lambda: _expect_zero(manager.exec_sync(container, ["true"], 10, stdin=b"")),
            "conmon": floor,
            "runtime": RawExec(floor),
            "podman": podman,
        }
        samples: Dict[str, List[float]] = {name: [] for name in tools}
        for index in range(warmup + rounds):
            order = list(tools)
            random.shuffle(order)
            for name in order:
                elapsed = timed(tools[name])
                if index >= warmup:
                    samples[name].append(elapsed)
        return samples
    finally:
        manager.remove(container, timeout=0)


def _expect_zero(response) -> None:
    assert response.exit_code == 0, response


def markdown(handler: str, rows: List[Dict[str, float]], anchor: str) -> str:
    lines = ["### {} (anchor: {})".format(handler, anchor), "",
             "| tool | median ms | p90 ms | min ms | x anchor, medians | x anchor, paired |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| {tool} | {median:.1f} | {p90:.1f} | {min:.1f} | {ratio_medians:.2f} | {ratio_paired:.2f} |"
                     .format(**row))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--handlers", nargs="+", default=["runc", "crun"])
    parser.add_argument("--out", default="/tmp/dloci-bench-exec.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    work = tempfile.mkdtemp(prefix="dloci-bx-", dir="/tmp")
    rootfs = testkit.build_busybox_rootfs(os.path.join(work, "rootfs"))
    config = write_config(work, args.handlers)
    podman = Podman(rootfs)
    report = {"rounds": args.rounds, "load_start": os.getloadavg(), "handlers": {}}
    try:
        for handler in args.handlers:
            samples = run_handler(handler, config, rootfs, work, args.rounds, args.warmup, podman)
            report["handlers"][handler] = {"samples": samples, "vs_conmon": summarise(samples, "conmon"),
                                           "vs_runtime": summarise(samples, "runtime")}
            print(markdown(handler, report["handlers"][handler]["vs_conmon"], "conmon exec driven directly"))
            lib = next(row for row in report["handlers"][handler]["vs_conmon"] if row["tool"] == "library")
            pod = next(row for row in summarise(samples, "library") if row["tool"] == "podman")
            print("\nlibrary / conmon floor (paired): {:.2f} (target <= 1.20); podman / library (paired): {:.2f} "
                  "(target >= 4)\n".format(lib["ratio_paired"], pod["ratio_paired"]))
    finally:
        podman.close()
        report["load_end"] = os.getloadavg()
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
        if "crun" in args.handlers:
            testkit.crun_wrapper_teardown(work)
        shutil.rmtree(work, ignore_errors=True)
    print("raw samples: " + args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
