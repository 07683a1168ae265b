"""Playbook benchmark: 10 containers created, re-run unchanged, removed; daemonless.oci vs containers.podman,
side by side with Ansible's floor (a loop of 10 ``ansible.builtin.command: true`` tasks).

Each round runs, in order: floor, ours (create, unchanged, remove), podman (create, unchanged, remove), so
load changes on a shared machine hit every column alike. Reported: the median wall time of each
``ansible-playbook`` run, its ratio to the floor, and the time above the floor per container.

    python3 tests/tools/subreaper.py python3 bench/playbook/run.py [--rounds 3] [--no-podman]

Needs root, ansible-playbook (the venv next to this Python, or PATH), conmon + runc, busybox-static;
podman and the containers.podman collection (PODMAN_COLLECTIONS, default
/var/cache/daemonless-oci/collections) for the podman column, which is skipped with a reason otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "tools"))
import testkit  # noqa: E402
ROOT = "/tmp/dloci-bench-pb"
IMAGE = "localhost/dloci-bench-pb:latest"
COUNT = 10


def playbook_binary() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    found = candidate if os.path.exists(candidate) else shutil.which("ansible-playbook")
    if not found:
        sys.exit("ansible-playbook not found")
    return found


def podman_ready(rootfs: str) -> Optional[str]:
    """The podman collection path once the image is imported, or None with the reason printed."""
    collections = os.environ.get("PODMAN_COLLECTIONS", "/var/cache/daemonless-oci/collections")
    if not shutil.which("podman"):
        print("podman column skipped: podman is not installed")
        return None
    if not os.path.isdir(os.path.join(collections, "ansible_collections", "containers", "podman")):
        print("podman column skipped: no containers.podman collection under", collections)
        return None
    if subprocess.run(["podman", "image", "exists", IMAGE], check=False).returncode != 0:
        testkit.podman_import(rootfs, IMAGE)
    return collections


def run(playbook: str, extra: Dict[str, str], collections: str) -> float:
    argv = [playbook_binary(), "-i", "localhost,", "-c", "local", os.path.join(HERE, playbook)]
    for key, value in extra.items():
        argv += ["-e", "{}={}".format(key, value)]
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_NOCOLOR="1")
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - started
    text = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        sys.exit("{} failed:\n{}".format(playbook, text[-3000:]))
    recap = re.search(r"changed=(\d+)", text)
    return elapsed, int(recap.group(1)) if recap else -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-podman", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    os.makedirs(ROOT, exist_ok=True)
    rootfs = testkit.build_busybox_rootfs(os.path.join(ROOT, "rootfs"))
    ours = os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls")
    podman = None if args.no_podman else podman_ready(rootfs)
    common = {"rootfs": rootfs, "bench_root": ROOT}
    times: Dict[str, List[float]] = {}
    changed: Dict[str, List[int]] = {}

    def record(key: str, result: tuple) -> None:
        times.setdefault(key, []).append(result[0])
        changed.setdefault(key, []).append(result[1])

    for _round in range(args.rounds):
        record("floor", run("floor.yml", {}, ours))
        for phase, state in (("create", "started"), ("unchanged", "started"), ("remove", "absent")):
            record("oci " + phase, run("oci.yml", dict(common, state=state), ours))
        for phase, state in (("create", "started"), ("unchanged", "started"), ("remove", "absent")):
            record("oci list " + phase, run("oci_list.yml", dict(common, state=state), ours))
        if podman:
            for phase, state in (("create", "started"), ("unchanged", "started"), ("remove", "absent")):
                record("podman " + phase, run("podman.yml", {"podman_image": IMAGE, "state": state},
                                              ours + ":" + podman))
    floor = statistics.median(times["floor"])
    rows = []
    for key in times:
        median = statistics.median(times[key])
        rows.append({"run": key, "median_s": round(median, 2), "x_floor": round(median / floor, 2),
                     "above_floor_per_container_ms": round((median - floor) / COUNT * 1000),
                     "changed": changed[key], "samples_s": [round(t, 2) for t in times[key]]})
    print("| run | median s | x floor | above floor per container | changed per round |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| {run} | {median_s} | {x_floor} | {above_floor_per_container_ms} ms | {changed} |".format(**row))
    with open(os.path.join(ROOT, "results.json"), "w") as handle:
        json.dump({"rounds": args.rounds, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
