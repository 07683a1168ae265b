"""Helpers shared by the tests and the benchmarks (not part of the collection).

* ``collection_on_path``: make this checkout importable as ``ansible_collections.daemonless.oci``
  through a symlink tree (ansible-test lays the collection out itself; plain pytest and the
  benchmarks use this).
* ``build_busybox_rootfs``: a root filesystem from Debian's busybox-static.
* ``crun_wrapper``: the crun handler path that works on this machine kind (see crun-private-ns.sh).
* ``podman_import``, ``median``/``p90``/``paired_ratio``: what every benchmark needs.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from typing import Dict, List, Sequence

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(TOOLS))


class MissingTool(RuntimeError):
    """A host program the tests need is not installed."""


def collection_on_path() -> str:
    """Put the collection on sys.path (and ANSIBLE_COLLECTIONS_PATH); returns the tree's root."""
    parts = REPO.split(os.sep)
    if parts[-3:-1] == ["ansible_collections", "daemonless"]:
        tree = os.sep.join(parts[:-3])
    else:
        tree = os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls")
        link = os.path.join(tree, "ansible_collections", "daemonless", "oci")
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.realpath(link) != REPO:
            if os.path.islink(link):
                os.unlink(link)
            os.symlink(REPO, link)
    if tree not in sys.path:
        sys.path.insert(0, tree)
    os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", tree)
    return tree


def build_busybox_rootfs(target: str) -> str:
    """Static busybox, its applets, users root/nobody/app, and a page for httpd; reused when present."""
    if os.path.exists(os.path.join(target, "bin", "sh")):
        return target
    busybox = shutil.which("busybox")
    if not busybox:
        raise MissingTool("busybox-static is not installed (apt-get install busybox-static)")
    for directory in ("bin", "proc", "sys", "dev", "tmp", "etc", "root", "var/www", "run"):
        os.makedirs(os.path.join(target, directory), exist_ok=True)
    shutil.copy(busybox, os.path.join(target, "bin", "busybox"))
    for applet in subprocess.check_output([busybox, "--list"]).decode().split():
        if applet != "busybox":
            os.symlink("busybox", os.path.join(target, "bin", applet))
    with open(os.path.join(target, "etc", "passwd"), "w") as handle:
        handle.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
                     "app:x:1000:1000:app:/tmp:/bin/sh\n")
    with open(os.path.join(target, "etc", "group"), "w") as handle:
        handle.write("root:x:0:\nnogroup:x:65534:\napp:x:1000:\nwheel:x:10:app\n")
    with open(os.path.join(target, "var", "www", "index.html"), "w") as handle:
        handle.write("hello from daemonless.oci\n")
    os.chmod(os.path.join(target, "tmp"), 0o1777)
    return target


def crun_wrapper(work: str) -> str:
    """A crun that works on this machine kind's hybrid cgroups (tests/tools/crun-private-ns.sh)."""
    script = os.path.join(TOOLS, "crun-private-ns.sh")
    return subprocess.check_output(["bash", script, "setup", os.path.join(work, "crun-ns")]).decode().strip()


def crun_wrapper_teardown(work: str) -> None:
    subprocess.run(["bash", os.path.join(TOOLS, "crun-private-ns.sh"), "teardown", os.path.join(work, "crun-ns")],
                   check=False)


def podman_import(rootfs: str, image: str) -> None:
    """``tar -C rootfs -c . | podman import - IMAGE``, without a shell."""
    tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", image], stdin=tar.stdout, stdout=subprocess.DEVNULL, check=True)
    tar.stdout.close()
    if tar.wait() != 0:
        raise RuntimeError("tar of {} failed".format(rootfs))


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def paired_ratio(samples: Dict[str, List[float]], name: str, anchor: str) -> float:
    """Median of the per-round ratios name/anchor (rounds are interleaved, so pairs share the load)."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[anchor]))
