"""Where cgroups are, read from the kernel rather than guessed.

Measured on the project's machines: runc resolves a relative ``cgroupsPath`` against the
*caller's* cgroup, separately per controller (the memory controller lands under a nested path),
so the library never computes a container's cgroup from its id. It writes an absolute
``cgroupsPath`` at create time and, to read a cgroup back, follows ``/proc/PID/cgroup`` of the
container's init process. The layout (v1, hybrid, unified) comes from ``/proc/self/mountinfo``.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

UNIFIED = ""  # key of the cgroup v2 entry in a /proc/PID/cgroup mapping
# Super-block options of a v1 cgroup mount that are flags, not controller names.
_MOUNT_FLAGS = frozenset(("rw", "ro", "clone_children", "noprefix", "xattr", "cpuset_v2_mode"))


@dataclass
class CgroupMounts:
    """The cgroup filesystems mounted on this host."""

    v1: Dict[str, str] = field(default_factory=dict)  # controller name -> mount point
    unified: Optional[str] = None                     # cgroup2 mount point, if any

    @property
    def mode(self) -> str:
        """``v1`` (legacy only), ``hybrid`` (v1 plus a cgroup2 mount) or ``v2`` (unified only)."""
        if self.v1 and self.unified:
            return "hybrid"
        return "v1" if self.v1 else "v2"

    def controller_root(self, controller: str) -> Optional[str]:
        """Mount point that holds ``controller`` (``""`` for the unified hierarchy)."""
        if controller == UNIFIED:
            return self.unified
        return self.v1.get(controller)

    def hierarchy_roots(self) -> List[str]:
        """Every distinct mount point, v1 hierarchies first (co-mounted controllers appear once)."""
        roots = sorted(set(self.v1.values()))
        if self.unified and not self.v1:
            roots.append(self.unified)
        return roots


def parse_mountinfo(text: str) -> CgroupMounts:
    """Find cgroup v1 and v2 mount points in the text of ``/proc/self/mountinfo``."""
    mounts = CgroupMounts()
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, _source, *rest = right.split(" ")
        mount_point = _unescape(left.split(" ")[4])
        if fstype == "cgroup2":
            mounts.unified = mounts.unified or mount_point
        elif fstype == "cgroup":
            options = rest[0].split(",") if rest else []
            for option in options:
                if option in _MOUNT_FLAGS or ("=" in option and not option.startswith("name=")):
                    continue
                mounts.v1.setdefault(option, mount_point)
    return mounts


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def host_mounts() -> CgroupMounts:
    """The cgroup mounts seen by this process."""
    with open("/proc/self/mountinfo", "r", encoding="utf-8") as handle:
        return parse_mountinfo(handle.read())


def parse_proc_cgroup(text: str) -> Dict[str, str]:
    """Map controller -> cgroup path from ``/proc/PID/cgroup`` (``""`` for the v2 entry).

    Co-mounted controllers (``cpu,cpuacct``) each get the entry; named hierarchies keep their
    ``name=`` prefix.
    """
    result: Dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hierarchy, controllers, path = parts
        if not controllers:
            result[UNIFIED] = path
            continue
        for controller in controllers.split(","):
            result[controller] = path
    return result


def process_cgroups(pid: int) -> Dict[str, str]:
    """The cgroups of a live process (``FileNotFoundError`` when it is gone)."""
    with open("/proc/{}/cgroup".format(pid), "r", encoding="utf-8") as handle:
        return parse_proc_cgroup(handle.read())


def controller_dir(mounts: CgroupMounts, cgroups: Dict[str, str], controller: str) -> Optional[str]:
    """Absolute directory of a process's cgroup for ``controller`` (v2: pass ``UNIFIED``)."""
    root = mounts.controller_root(controller)
    if controller == UNIFIED and not mounts.v1:
        root = mounts.unified
    relative = cgroups.get(controller)
    if root is None or relative is None:
        return None
    return os.path.join(root, relative.lstrip("/"))


def hybrid_unified_controllers(mounts: CgroupMounts) -> List[str]:
    """Controllers listed by the cgroup2 mount of a hybrid host (crun 1.8 refuses any)."""
    if mounts.mode != "hybrid" or not mounts.unified:
        return []
    try:
        with open(os.path.join(mounts.unified, "cgroup.controllers"), "r", encoding="ascii") as handle:
            return handle.read().split()
    except OSError:
        return []


def place_process(mounts: CgroupMounts, relative: str, pid: int) -> List[str]:
    """Create cgroup ``relative`` in every hierarchy and move ``pid`` into it.

    Returns the directories created, for ``remove_dirs``. As in the reference, failing to create
    is tolerated (the hierarchy may be read-only) but failing to move the pid is an error.
    """
    created: List[str] = []
    for root in mounts.hierarchy_roots():
        path = os.path.join(root, relative.strip("/"))
        _make_cgroup(path, root, created)
        procs = os.path.join(path, "cgroup.procs")
        if not os.path.exists(procs):
            continue
        with open(procs, "w", encoding="ascii") as handle:
            handle.write(str(pid))
    return created


def _make_cgroup(path: str, root: str, created: List[str]) -> None:
    """mkdir -p for a cgroup; cpuset children need cpus and mems copied before tasks may join."""
    missing = []
    current = path
    while current != root and not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                return
        created.append(directory)
        for name in ("cpuset.cpus", "cpuset.mems"):
            _inherit_cpuset(directory, name)


def _inherit_cpuset(directory: str, name: str) -> None:
    """Copy a v1 cpuset value from the parent when the child's is empty.

    Only cgroup v1 needs this: a v1 cpuset child starts with no cpus and refuses tasks. On v2 an empty
    value means "the parent's effective set", and the root has no cpuset.cpus to copy from at all
    (a v2 directory is recognised by its cgroup.controllers file).
    """
    target = os.path.join(directory, name)
    if not os.path.exists(target) or os.path.exists(os.path.join(directory, "cgroup.controllers")):
        return
    with open(target, "r", encoding="ascii") as handle:
        if handle.read().strip():
            return
    with open(os.path.join(os.path.dirname(directory), name), "r", encoding="ascii") as handle:
        value = handle.read().strip()
    with open(target, "w", encoding="ascii") as handle:
        handle.write(value)


def remove_dirs(directories: List[str]) -> None:
    """Remove cgroup directories, deepest first; busy or missing ones are left alone."""
    for directory in sorted(directories, key=len, reverse=True):
        try:
            os.rmdir(directory)
        except OSError:
            continue


def cgroup_dirs_for(mounts: CgroupMounts, relative: str) -> List[str]:
    """The directories cgroup ``relative`` would occupy in every hierarchy (for clean-up)."""
    return [os.path.join(root, relative.strip("/")) for root in mounts.hierarchy_roots()]
