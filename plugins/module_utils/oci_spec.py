"""OCI runtime-spec documents (``config.json``): a sound default and the edits the library makes.

``default_spec`` gives what ``runc spec`` gives, adjusted for a supervised service rather than
an interactive shell: no terminal, the capability set container engines grant by default, and
the standard pseudo-filesystems. The option mapping of ``oci_container`` builds on it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The capability set podman and docker grant by default.
DEFAULT_CAPABILITIES = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
                        "CAP_NET_BIND_SERVICE", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
                        "CAP_SYS_CHROOT"]
DEFAULT_NAMESPACES = ["pid", "network", "ipc", "uts", "mount"]
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def default_mounts() -> List[Dict[str, Any]]:
    """The pseudo-filesystems every container gets."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]


def default_spec(rootfs: str, args: List[str], *, hostname: str = "", readonly_root: bool = False,
                 env: Optional[List[str]] = None, cwd: str = "/", terminal: bool = False) -> Dict[str, Any]:
    """A complete spec that runs ``args`` in ``rootfs`` with private namespaces and no network."""
    capabilities = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": list(args),
            "env": list(env) if env is not None else [DEFAULT_PATH_ENV], "cwd": cwd,
            "capabilities": {"bounding": capabilities, "effective": list(capabilities),
                             "permitted": list(capabilities)},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": readonly_root},
        "hostname": hostname,
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": kind} for kind in DEFAULT_NAMESPACES],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def canonical_json(document: Any) -> bytes:
    """Bytes that are equal exactly when the documents are equal (sorted keys, no whitespace)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def digest(document: Any) -> str:
    """sha256 of the canonical JSON of a document."""
    return "sha256:" + hashlib.sha256(canonical_json(document)).hexdigest()


def prepare_for_bundle(spec: Dict[str, Any], cgroups_path: str, annotations: Dict[str, str]) -> Dict[str, Any]:
    """The spec as written into a bundle: absolute root path, our cgroup path, merged annotations.

    A relative ``cgroupsPath`` is resolved by runc against the caller's own cgroup (per
    controller), so it is always made absolute here.
    """
    document = copy.deepcopy(spec)
    root = document.setdefault("root", {})
    if not root.get("path"):
        raise ValueError("the OCI spec has no root.path")
    linux = document.setdefault("linux", {})
    path = linux.get("cgroupsPath") or cgroups_path
    if path and ":" not in path and not path.startswith("/"):
        path = "/" + path
    if path:
        linux["cgroupsPath"] = path
    merged = dict(document.get("annotations") or {})
    merged.update(annotations)
    if merged:
        document["annotations"] = merged
    return document


def process_terminal(spec: Dict[str, Any]) -> bool:
    return bool((spec.get("process") or {}).get("terminal"))


def rootfs_path(spec: Dict[str, Any], bundle: str) -> str:
    """The root filesystem a spec points at, resolved against its bundle when relative."""
    path = (spec.get("root") or {}).get("path", "")
    return path if os.path.isabs(path) else os.path.join(bundle, path)
