"""bench/image: N containers from one image vs N from a plain rootfs directory vs ``podman run``.

* ``image``   : ImageStore (busybox layout in two layers, imported once) + overlay mount of the
                image's layers with a fresh writable layer (image_glue.image_rootfs) + ContainerManager
                create + start (``sleep``). What oci_container's ``image:`` source does.
* ``rootfs``  : the same busybox tree as one plain directory, an overlay with one lower + writable
                layer + the same create + start. What the ``rootfs:`` source does.
* ``podman``  : the same image (oci-archive of the layout) pulled into a private podman store
                (``--root``/``--runroot`` under the work dir), then ``podman run -d --network none``.

Rounds interleave the three in a shuffled order. Reported: per-container create+start time
(median, p90), total, and disk growth of each tool's own state directory (``du -sx``: one
filesystem, so the overlay mounts themselves are not counted twice). Run as root:

    python3 tests/tools/subreaper.py python3 bench/image/run.py --count 20
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "tools"))
import testkit  # noqa: E402

testkit.collection_on_path()

from ansible_collections.daemonless.oci.plugins.module_utils import overlay  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.image_glue import (  # noqa: E402
    IDENTITY_KEY,
    image_identity,
    image_rootfs,
    store_for,
)
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec  # noqa: E402
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command  # noqa: E402
from ansible_collections.daemonless.oci.tests.tools.ocilayout import (  # noqa: E402
    LayoutBuilder,
    busybox_layers,
    busybox_path,
    tar_directory,
)

ARGS = ["/bin/sleep", "3600"]


def disk_bytes(path: str) -> int:
    """Blocks actually used under ``path`` on its own filesystem (mounts below are skipped)."""
    if not os.path.exists(path):
        return 0
    out = run_command(["du", "-sx", "--block-size=1", path]).stdout
    return int(out.split()[0])


class Bench:
    def __init__(self, work: str) -> None:
        self.work = work
        busybox = busybox_path()
        if not busybox:
            raise SystemExit("busybox-static is not installed (apt-get install busybox-static)")
        layout = LayoutBuilder(os.path.join(work, "layout"))
        layout.image(list(busybox_layers(busybox)))
        self.archive = tar_directory(layout.path, os.path.join(work, "image.tar"))
        self.rootfs = testkit.build_busybox_rootfs(os.path.join(work, "rootfs"))
        self.persist = {"image": os.path.join(work, "lib-image"), "rootfs": os.path.join(work, "lib-rootfs")}
        self.managers = {kind: ContainerManager.from_config(None, overrides={
            "run_root": os.path.join(work, "run-" + kind), "persist_root": root}) for kind, root in self.persist.items()}
        started = time.monotonic()
        self.record = store_for(self.persist["image"]).import_image("oci:" + layout.path, name="bb")
        self.import_seconds = time.monotonic() - started
        self.podman = [shutil.which("podman") or "podman", "--root", os.path.join(work, "podman-root"),
                       "--runroot", os.path.join(work, "podman-run"), "--storage-driver", "overlay",
                       "--events-backend", "file"]
        self.podman_image = ""
        self.counter = 0

    def baseline(self) -> Dict[str, int]:
        return {"image": disk_bytes(self.persist["image"]), "rootfs": disk_bytes(self.persist["rootfs"]),
                "podman": disk_bytes(os.path.join(self.work, "podman-root"))}

    def load_podman(self) -> None:
        out = run_command(self.podman + ["pull", "oci-archive:" + self.archive]).stdout.decode().split()
        self.podman_image = out[-1]

    def _create(self, kind: str, rootfs: str, extras: Dict) -> None:
        manager = self.managers[kind]
        container = manager.create(CreateRequest(name="{}-{}".format(kind, self.counter), handler="runc",
                                                 spec=default_spec(rootfs, ARGS), extras=extras))
        manager.start(container)

    def image(self) -> None:
        self.counter += 1
        container_dir = os.path.join(self.persist["image"], "layers", "c{}".format(self.counter))
        os.makedirs(container_dir)
        rootfs = image_rootfs(self.record, container_dir, self.persist["image"])
        self._create("image", rootfs, {IDENTITY_KEY: image_identity(self.record, "bb")})

    def plain(self) -> None:
        self.counter += 1
        container_dir = os.path.join(self.persist["rootfs"], "layers", "c{}".format(self.counter))
        os.makedirs(container_dir)
        rootfs = overlay.mount_overlay([self.rootfs], container_dir)
        self._create("rootfs", rootfs, {})

    def run_podman(self) -> None:
        self.counter += 1
        run_command(self.podman + ["run", "-d", "--network", "none", "--pull", "never",
                                   "--name", "p{}".format(self.counter), self.podman_image] + ARGS)

    def cleanup(self) -> None:
        for manager in self.managers.values():
            for container in manager.list():
                manager.remove(container, timeout=0)
        for kind in self.persist:
            base = os.path.join(self.persist[kind], "layers")
            for entry in os.listdir(base) if os.path.isdir(base) else []:
                overlay.remove_rootfs(os.path.join(base, entry))
        if self.podman_image:
            run_command(self.podman + ["rm", "-a", "-f", "-t", "0"])
            run_command(self.podman + ["system", "reset", "-f"])


def summary(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 1),
            "p90_ms": round(testkit.p90(ordered) * 1000, 1), "total_s": round(sum(ordered), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--no-podman", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    options = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: overlay mounts and runc")
    work = tempfile.mkdtemp(prefix="dloci-bench-image-")
    bench = Bench(work)
    tools: Dict[str, Callable[[], None]] = {"image": bench.image, "rootfs": bench.plain}
    try:
        if not options.no_podman and shutil.which("podman"):
            bench.load_podman()
            tools["podman"] = bench.run_podman
        before = bench.baseline()
        samples: Dict[str, List[float]] = {name: [] for name in tools}
        for _round in range(options.count):
            order = list(tools)
            random.shuffle(order)
            for name in order:
                started = time.monotonic()
                tools[name]()
                samples[name].append(time.monotonic() - started)
        after = bench.baseline()
        figures = {name: dict(summary(values), disk_growth_bytes=after[name] - before[name],
                              disk_per_container_bytes=(after[name] - before[name]) // options.count,
                              disk_before_bytes=before[name]) for name, values in samples.items()}
        ratio = statistics.median(a / b for a, b in zip(samples["image"], samples["rootfs"]))
        report = {"count": options.count, "image_import_s": round(bench.import_seconds, 3),
                  "image_unpacked_bytes": bench.record.unpacked_size, "tools": figures,
                  "image_vs_rootfs_paired_median_ratio": round(ratio, 3)}
        print(json.dumps(report, indent=2))
        if options.json:
            with open(options.json, "w") as handle:
                json.dump(report, handle, indent=2)
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
