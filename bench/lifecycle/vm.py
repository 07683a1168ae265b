"""The ``vm`` handler's lifecycle cost beside the ``oci`` runc one, through ``ContainerManager``.

Runs the same cycle on both handlers, alternating them so load drifts hit both alike:
create -> start -> exec-sync (``true``) -> stop (graceful, SIGTERM trapped) -> remove, on a
static-busybox rootfs. The ``vm`` handler is Debian's ``containerd-shim-runc-v2`` configured as
a ``vm``-type handler (the shim v2 path Kata uses, minus the VM boot), so the ratio is the cost
of shim + ttrpc + the detached monitor against conmon + runc CLI calls.

Standalone:  python3 tests/tools/subreaper.py python3 bench/lifecycle/vm.py [--iterations N] [--json]
Importable:  ``measure(iterations) -> dict`` (phase medians in ms per handler, and the ratios).
Needs root, runc, conmon, containerd-shim-runc-v2 and busybox-static.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PHASES = ("create", "start", "exec", "stop", "remove")
SHIM = "/usr/bin/containerd-shim-runc-v2"
TRAPPED = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]  # SIGTERM ends it at once


def _import_tree() -> None:
    """Make the checkout importable as ``ansible_collections.daemonless.oci`` (the tests' symlink tree)."""
    tree = os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls")
    link = os.path.join(tree, "ansible_collections", "daemonless", "oci")
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(REPO, link)
    if tree not in sys.path:
        sys.path.insert(0, tree)


def _rootfs(target: str) -> str:
    busybox = shutil.which("busybox") or "/bin/busybox"
    os.makedirs(os.path.join(target, "bin"))
    shutil.copy(busybox, os.path.join(target, "bin", "busybox"))
    for applet in ("sh", "sleep", "true", "echo"):
        os.symlink("busybox", os.path.join(target, "bin", applet))
    for directory in ("proc", "sys", "dev", "tmp", "etc"):
        os.makedirs(os.path.join(target, directory), exist_ok=True)
    return target


def _config(work: str) -> str:
    path = os.path.join(work, "runtimes.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"default_runtime": "runc", "runtimes": {
            "runc": {"runtime_path": shutil.which("runc") or "/usr/sbin/runc"},
            "vm-runc-shim": {"runtime_path": SHIM, "runtime_type": "vm"}}}, handle)
    return path


def _cycle(manager: Any, rootfs: str, handler: str, index: int) -> Dict[str, float]:
    from ansible_collections.daemonless.oci.plugins.module_utils.manager import CreateRequest
    from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
    times: Dict[str, float] = {}
    started = time.perf_counter()
    container = manager.create(CreateRequest(name="bench-{}-{}".format(handler, index), handler=handler,
                                             spec=default_spec(rootfs, TRAPPED, readonly_root=True), stop_timeout=10))
    times["create"] = time.perf_counter() - started
    started = time.perf_counter()
    manager.start(container)
    times["start"] = time.perf_counter() - started
    started = time.perf_counter()
    result = manager.exec_sync(container, ["true"], timeout=10)
    times["exec"] = time.perf_counter() - started
    if result.exit_code != 0:
        raise RuntimeError("exec failed on {}: {}".format(handler, result))
    started = time.perf_counter()
    manager.stop(container)
    times["stop"] = time.perf_counter() - started
    started = time.perf_counter()
    manager.remove(container)
    times["remove"] = time.perf_counter() - started
    times["cycle"] = sum(times[phase] for phase in PHASES)
    return times


def measure(iterations: int = 10) -> Dict[str, Any]:
    """Median milliseconds per phase for ``runc`` (oci) and ``vm-runc-shim`` (vm), and vm/oci ratios."""
    _import_tree()
    from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager
    work = tempfile.mkdtemp(prefix="dloci-bench-vm-", dir="/tmp")
    try:
        rootfs = _rootfs(os.path.join(work, "rootfs"))
        manager = ContainerManager.from_config(_config(work), overrides={
            "run_root": os.path.join(work, "run"), "persist_root": os.path.join(work, "lib")})
        samples: Dict[str, List[Dict[str, float]]] = {"runc": [], "vm-runc-shim": []}
        for index in range(iterations + 1):  # the first round warms caches and is dropped
            for handler in samples:
                result = _cycle(manager, rootfs, handler, index)
                if index:
                    samples[handler].append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {handler: {phase: round(statistics.median(run[phase] for run in runs) * 1000, 1)
                         for phase in PHASES + ("cycle",)} for handler, runs in samples.items()}
    ratios = {phase: round(medians["vm-runc-shim"][phase] / medians["runc"][phase], 2)
              for phase in PHASES + ("cycle",) if medians["runc"][phase]}
    return {"iterations": iterations, "median_ms": medians, "vm_over_oci": ratios}


def _table(report: Dict[str, Any]) -> str:
    rows = ["{:<14}".format("phase (ms)") + "".join("{:>10}".format(p) for p in PHASES + ("cycle",))]
    for handler, values in report["median_ms"].items():
        rows.append("{:<14}".format(handler) + "".join("{:>10}".format(values[p]) for p in PHASES + ("cycle",)))
    rows.append("{:<14}".format("vm / oci") + "".join("{:>10}".format(report["vm_over_oci"].get(p, "-"))
                                                      for p in PHASES + ("cycle",)))
    return "\n".join(rows)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    missing = [path for path in (SHIM, shutil.which("runc"), shutil.which("conmon"), shutil.which("busybox"))
               if not path or not os.access(path, os.X_OK)]
    if os.geteuid() != 0 or missing:
        print("needs root, runc, conmon, busybox and {}".format(SHIM), file=sys.stderr)
        return 2
    report = measure(args.iterations)
    print(json.dumps(report, indent=1) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
