#!/usr/bin/env python
"""bench/stats: container stats for N running containers, four ways, interleaved in one run.

* lib-inproc  : ``stats.collect_many`` in this process (one sample, every figure incl. network)
* lib-process : a fresh ``python3`` that imports the library, collects N containers and prints
                JSON (the floor of an ``oci_stats`` module process, Ansible's own cost aside)
* python-floor: ``python3 -c pass``: interpreter start-up alone, so lib-process minus this is
                what the library adds to a module process
* runc-events : ``runc events --stats ID``, once per container, one after another
* podman      : ``podman stats --no-stream --format json NAME...``, one call for N of podman's
                own containers (same busybox rootfs, ``--network none``)

Each round runs the four in a freshly shuffled order, after warm-up rounds. Reported: median,
p90, per-container ms, and the MEDIAN OF PER-ROUND PAIRED RATIOS to podman and to runc-events.
Child waits are pidfd waits (procutil), never ``subprocess`` timeouts. Run as root, under the
subreaper (see README.md). Everything it starts is removed at the end, also on Ctrl-C.
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
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TREE = os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls")


sys.path.insert(0, os.path.join(REPO, "tests", "tools"))
import testkit  # noqa: E402

testkit.collection_on_path()
from ansible_collections.daemonless.oci.plugins.module_utils import procutil, stats  # noqa: E402


CGROUP_PARENT = "dloci-bench-stats"
IMAGE = "localhost/dloci-bench-stats:latest"
METHODS = ("lib-inproc", "lib-process", "python-floor", "runc-events", "podman")
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.daemonless.oci.plugins.module_utils import stats
targets = [stats.StatsTarget(int(p), s, i) for i, p, s in (t.split(",") for t in sys.argv[2:])]
print(json.dumps([r.to_dict() for r in stats.collect_many(targets)]))
"""


def run(argv: List[str], timeout: float = 120) -> bytes:
    return procutil.run_command(argv, timeout=timeout).stdout


def start_runc(work: str, rootfs: str, name: str) -> Any:
    """One ``sleep 3600`` under raw runc with an absolute cgroupsPath; stdio never a pipe we read."""
    bundle = os.path.join(work, "bundles", name)
    os.makedirs(bundle)
    run(["runc", "spec", "--bundle", bundle])
    path = os.path.join(bundle, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config["root"] = {"path": rootfs, "readonly": True}
    config["process"].update(terminal=False, args=["sleep", "3600"])
    config["linux"]["cgroupsPath"] = "/{}/{}".format(CGROUP_PARENT, name)
    with open(path, "w") as handle:
        json.dump(config, handle)
    pid_file = os.path.join(bundle, "pid")
    proc = subprocess.Popen(["runc", "--root", os.path.join(work, "runc"), "run", "--detach", "--bundle", bundle,
                             "--pid-file", pid_file, name], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if procutil.wait_child(proc, 60) != 0:
        raise RuntimeError("runc run {} failed".format(name))
    pid = procutil.read_pid_file(pid_file)
    return stats.StatsTarget(pid, procutil.start_time(pid), name)


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def make_methods(work: str, targets: List[Any], podman_names: List[str], mounts: Any) -> Dict[str, Callable[[], Any]]:
    root = os.path.join(work, "runc")
    child_args = ["{},{},{}".format(t.container_id, t.pid, t.start_time) for t in targets]

    def runc_events() -> None:
        for target in targets:
            json.loads(run(["runc", "--root", root, "events", "--stats", target.container_id]))

    return {
        "lib-inproc": lambda: stats.collect_many(targets, mounts=mounts),
        "lib-process": lambda: json.loads(run([sys.executable, "-c", CHILD, TREE] + child_args)),
        "python-floor": lambda: run([sys.executable, "-c", "pass"]),
        "runc-events": runc_events,
        "podman": lambda: json.loads(run(["podman", "stats", "--no-stream", "--format", "json"] + podman_names)),
    }


def check_once(targets: List[Any], mounts: Any) -> Dict[str, Any]:
    """Untimed: prove one library pass spawns no process and count the files it opens per container."""
    opened: List[str] = []
    real_open, real_popen, real_fork = os.open, subprocess.Popen, os.fork

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        directory = kwargs.get("dir_fd")
        prefix = os.readlink("/proc/self/fd/{}".format(directory)) + "/" if directory is not None else ""
        opened.append(prefix + str(path))
        return real_open(path, *args, **kwargs)

    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the library started a process")

    os.open, subprocess.Popen, os.fork = counting_open, forbidden, forbidden  # type: ignore[assignment]
    try:
        results = stats.collect_many(targets, mounts=mounts)
    finally:
        os.open, subprocess.Popen, os.fork = real_open, real_popen, real_fork  # type: ignore[assignment]
    return {"containers": len(targets), "running": sum(r.running for r in results),
            "files_opened_per_container": len(opened) / max(1, len(targets)),
            "distinct_files": len(set(opened)) == len(opened), "processes_started": 0}


def bench_n(n: int, rounds: int, warmup: int, work: str, targets: List[Any], podman_names: List[str],
            mounts: Any) -> Dict[str, Any]:
    methods = make_methods(work, targets[:n], podman_names[:n], mounts)
    samples: Dict[str, List[float]] = {name: [] for name in METHODS}
    for round_index in range(warmup + rounds):
        order = list(METHODS)
        random.shuffle(order)
        times = {name: timed(methods[name]) for name in order}
        if round_index >= warmup:
            for name in METHODS:
                samples[name].append(times[name])
    return {"n": n, "rounds": rounds, "check": check_once(targets[:n], mounts), "samples": samples}


def p90(values: List[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def paired(samples: Dict[str, List[float]], name: str, anchor: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[name], samples[anchor]))


def report(result: Dict[str, Any]) -> List[str]:
    n, samples = result["n"], result["samples"]
    lines = []
    for name in METHODS:
        median = statistics.median(samples[name])
        lines.append("| {} | {} | {:.2f} | {:.2f} | {:.3f} | {:.3f} | {:.3f} |".format(
            n, name, median, p90(samples[name]), median / n, paired(samples, name, "runc-events"),
            paired(samples, name, "podman")))
    return lines


def psi() -> str:
    try:
        with open("/proc/pressure/cpu") as handle:
            return handle.readline().strip()
    except OSError:
        return "n/a"


def setup(work: str, rootfs: str, count: int) -> Any:
    targets = [start_runc(work, rootfs, "bs{}".format(index)) for index in range(count)]
    testkit.podman_import(rootfs, IMAGE)
    names = []
    for index in range(count):
        name = "dloci-bench-stats-{}".format(index)
        run(["podman", "run", "-d", "--name", name, "--network", "none", "--pull", "never", IMAGE, "sleep", "3600"])
        names.append(name)
    return targets, names


def teardown(work: str, targets: List[Any], names: List[str]) -> None:
    for target in targets:
        subprocess.run(["runc", "--root", os.path.join(work, "runc"), "delete", "--force", target.container_id],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if names:
        subprocess.run(["podman", "rm", "-f", "-t", "0"] + names, stdout=subprocess.DEVNULL, check=False)
    subprocess.run(["podman", "rmi", "-f", IMAGE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    from ansible_collections.daemonless.oci.plugins.module_utils import cgroups
    mounts = cgroups.host_mounts()
    roots = [root for root in mounts.hierarchy_roots() + [mounts.unified or ""] if root]
    dirs = [os.path.join(root, CGROUP_PARENT, t.container_id) for root in roots for t in targets]
    dirs += [os.path.join(root, CGROUP_PARENT) for root in roots]
    for _unused in range(30):
        cgroups.remove_dirs(dirs)
        if not any(os.path.isdir(path) for path in dirs):
            break
        time.sleep(0.1)
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,20,100")
    parser.add_argument("--rounds", type=int, default=15, help="rounds for N < 100")
    parser.add_argument("--rounds-large", type=int, default=7, help="rounds for N >= 100")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write every sample to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    counts = [int(value) for value in args.counts.split(",")]
    work = tempfile.mkdtemp(prefix="dloci-bench-stats-", dir="/tmp")
    targets: List[Any] = []
    names: List[str] = []
    try:
        rootfs = testkit.build_busybox_rootfs(os.path.join(work, "rootfs"))
        targets, names = setup(work, rootfs, max(counts))
        mounts = stats.cgroups.host_mounts()
        psi_before = psi()
        results = [bench_n(n, args.rounds_large if n >= 100 else args.rounds, args.warmup, work, targets, names,
                           mounts) for n in counts]
        print_results(results, psi_before, psi())
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"psi": [psi_before, psi()], "results": results}, handle, indent=1)
    finally:
        teardown(work, targets, names)
    return 0


def print_results(results: List[Dict[str, Any]], psi_before: str, psi_after: str) -> None:
    print("cpu pressure before: {}\ncpu pressure after:  {}".format(psi_before, psi_after))
    print("| N | method | median ms | p90 ms | per container ms | x runc-events (paired) | x podman (paired) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        print("\n".join(report(result)))
    print()
    for result in results:
        check = result["check"]
        print("N={n}: files opened per container {f:.1f} (+ /proc/PID/stat by procutil), each once: {d}, "
              "processes started by the library: 0".format(
                  n=result["n"], f=check["files_opened_per_container"], d=check["distinct_files"]))
    for result in results:
        print_targets(result)
    inproc = {r["n"]: statistics.median(r["samples"]["lib-inproc"]) for r in results}
    if len(inproc) > 1:
        low, high = min(inproc), max(inproc)
        slope = (inproc[high] - inproc[low]) / (high - low)
        print("lib-inproc marginal cost: {:.3f} ms per container (N={}..{})".format(slope, low, high))


def print_targets(result: Dict[str, Any]) -> None:
    """The issue's targets, as paired ratios from this run.

    The module process is estimated as Ansible's payload floor plus what the library adds to a
    bare interpreter (lib-process minus python-floor, paired per round); against podman stats
    plus the same floor, that reduces to "library extra < podman stats".
    """
    samples, n = result["samples"], result["n"]
    speedup = 1 / paired(samples, "lib-inproc", "podman")
    extra = [a - b for a, b in zip(samples["lib-process"], samples["python-floor"])]
    podman = statistics.median(samples["podman"])
    print("N={}: podman / lib-inproc = {:.1f}x (target >= 3); lib-inproc {:.3f} ms per container (target <= 0.5); "
          "library extra in a process {:.1f} ms vs podman stats {:.1f} ms -> module {} podman + Ansible floor".format(
              n, speedup, statistics.median(samples["lib-inproc"]) / n, statistics.median(extra), podman,
              "faster than" if statistics.median(extra) < podman else "NOT faster than"))


if __name__ == "__main__":
    sys.exit(main())
