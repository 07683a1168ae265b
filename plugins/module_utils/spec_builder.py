"""Typed, normalised options -> an OCI runtime spec, on top of ``oci_spec.default_spec``.

Input is the output of ``fields.normalise`` (never raw module parameters), so the spec is a pure
function of the values that are stored and compared: what decides "changed" and what is run
cannot drift apart. The only reads are of the container's own root filesystem (``/etc/passwd``
and ``/etc/group`` for user names, never followed outside the root), of host device nodes
(``stat`` for major/minor), and of a seccomp profile file. Files the container needs
(``resolv.conf``, ``hosts``) are returned as content for the executor to write.
"""
from __future__ import annotations

import copy
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import DEFAULT_PATH_ENV, default_spec

CPU_PERIOD_DEFAULT = 100000
# Every capability of Linux 6.x, for privileged containers and for "ALL".
ALL_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]
# Our default seccomp profile is a deny list of our own: everything is allowed except the calls that
# reach the host kernel's global state (modules, kexec, clocks, swap, accounting, keyrings, bpf, ...),
# which then fail with EPERM. It is smaller than an allow list and cannot break ordinary programs.
DENIED_SYSCALLS = [
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp", "kexec_file_load",
    "kexec_load", "keyctl", "lookup_dcookie", "mbind", "move_pages", "name_to_handle_at", "nfsservctl",
    "open_by_handle_at", "perf_event_open", "personality", "pivot_root", "process_vm_readv", "process_vm_writev",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "settimeofday", "stime", "swapoff",
    "swapon", "_sysctl", "syslog", "umount", "umount2", "uselib", "userfaultfd", "ustat", "vm86", "vm86old",
    "adjtimex", "fanotify_init", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
]
EPERM = 1


@dataclass
class BuiltSpec:
    """The spec plus what the executor must provide for it."""

    spec: Dict[str, Any]
    files: Dict[str, str] = field(default_factory=dict)   # container path -> content (bind-mounted read-only)
    cgroup_parent: str = ""


def build(values: Dict[str, Any], root: str, files_dir: str, lookup_root: Optional[str] = None) -> BuiltSpec:
    """The spec for normalised ``values``, with ``root`` as root.path; ``files_dir`` holds generated files.

    ``lookup_root`` is where user and group names are resolved: the read-only source directory,
    since ``root`` may be an overlay mount point that does not exist until the executor mounts it.
    """
    args = (values.get("entrypoint") or []) + (values.get("command") or [])
    if not args:
        raise ValidationError("command (or entrypoint) is required: neither the task nor an image configuration "
                              "gives one")
    spec = default_spec(root, args, hostname=values.get("hostname") or "", readonly_root=values["read_only"],
                        cwd=values["workdir"], terminal=values["tty"])
    process = spec["process"]
    process["env"] = _env(values["env"], values["tty"])
    process["user"] = resolve_user(lookup_root or root, values.get("user"), values["groups"])
    process["noNewPrivileges"] = values["no_new_privileges"]
    _security(spec, values)
    _namespaces(spec, values)
    _mounts(spec, values["mounts"], values.get("shm_size"))
    built = BuiltSpec(spec, cgroup_parent=values.get("cgroup_parent") or "")
    _dns_files(built, values, files_dir)
    _limits(spec, values)
    spec["linux"]["resources"].update(resources(values))
    return built


def apply_to_bundle(bundle_spec: Dict[str, Any], values: Dict[str, Any]) -> BuiltSpec:
    """A bundle's spec is used as given; only resource options (if set) are laid over it."""
    spec = copy.deepcopy(bundle_spec)
    wanted = resources(values)
    if wanted:
        spec.setdefault("linux", {}).setdefault("resources", {}).update(wanted)
    return BuiltSpec(spec, cgroup_parent=values.get("cgroup_parent") or "")


def _env(env: Dict[str, str], tty: bool) -> List[str]:
    merged = {"PATH": DEFAULT_PATH_ENV.split("=", 1)[1]}
    if tty:
        merged["TERM"] = "xterm"
    merged.update(env)
    return ["{}={}".format(key, merged[key]) for key in sorted(merged)]


# ---------------------------------------------------------------- users and groups

def _read_in_root(root: str, relative: str) -> List[List[str]]:
    """Colon-separated records of a file inside ``root``; a path escaping the root is refused."""
    path = os.path.join(root, relative)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not real.startswith(real_root + os.sep):
        raise ValidationError("{} in the root filesystem points outside it ({}): refusing to read it".format(
            relative, real))
    try:
        with open(real, "r", encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n").split(":") for line in handle if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _lookup(root: str, relative: str, name: str, column: int) -> Optional[Tuple[int, int]]:
    for record in _read_in_root(root, relative):
        if record[0] == name and len(record) > column:
            gid = int(record[3]) if relative == "etc/passwd" and len(record) > 3 else int(record[2])
            return int(record[2]), gid
    return None


def resolve_user(root: str, user: Optional[str], groups: List[str]) -> Dict[str, Any]:
    """``uid[:gid]`` or ``name[:group]`` -> OCI user; names are looked up in the rootfs, not on the host."""
    uid, gid = 0, 0
    if user:
        name, _sep, group = user.partition(":")
        if name.isdigit():
            uid = int(name)
            found = _lookup_uid(root, uid)
            gid = found if found is not None else 0
        else:
            entry = _lookup(root, "etc/passwd", name, 3)
            if entry is None:
                raise ValidationError("user {!r} is not in the root filesystem's /etc/passwd".format(name))
            uid, gid = entry
        if group:
            gid = _group_id(root, group)
    result: Dict[str, Any] = {"uid": uid, "gid": gid}
    extra = sorted({_group_id(root, item) for item in groups})
    if extra:
        result["additionalGids"] = extra
    return result


def _lookup_uid(root: str, uid: int) -> Optional[int]:
    for record in _read_in_root(root, "etc/passwd"):
        if len(record) > 3 and record[2] == str(uid):
            return int(record[3])
    return None


def _group_id(root: str, group: str) -> int:
    if group.isdigit():
        return int(group)
    entry = _lookup(root, "etc/group", group, 2)
    if entry is None:
        raise ValidationError("group {!r} is not in the root filesystem's /etc/group".format(group))
    return entry[0]


# ---------------------------------------------------------------- security

def _capabilities(values: Dict[str, Any]) -> List[str]:
    if values["privileged"]:
        return list(ALL_CAPABILITIES)
    caps = set(spec_default_caps())
    added = values["capabilities"]
    caps |= set(ALL_CAPABILITIES) if "ALL" in added else set(added)
    dropped = values["cap_drop"]
    caps = set() if "ALL" in dropped else caps - set(dropped)
    unknown = (set(added) | set(dropped)) - set(ALL_CAPABILITIES) - {"ALL"}
    if unknown:
        raise ValidationError("unknown capabilities: {}".format(", ".join(sorted(unknown))))
    return sorted(caps)


def spec_default_caps() -> List[str]:
    return list(default_spec("/", ["true"])["process"]["capabilities"]["bounding"])


def _security(spec: Dict[str, Any], values: Dict[str, Any]) -> None:
    process, linux = spec["process"], spec["linux"]
    caps = _capabilities(values)
    process["capabilities"] = {key: list(caps) for key in ("bounding", "effective", "permitted")}
    if values.get("apparmor_profile"):
        process["apparmorProfile"] = values["apparmor_profile"]
    if values.get("selinux_label"):
        process["selinuxLabel"] = values["selinux_label"]
    if values.get("sysctls"):
        linux["sysctl"] = dict(values["sysctls"])
    if values["privileged"]:
        linux.pop("maskedPaths", None)
        linux.pop("readonlyPaths", None)
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
        return
    seccomp = seccomp_profile(values["seccomp_profile"])
    if seccomp is not None:
        linux["seccomp"] = seccomp


def seccomp_profile(choice: str) -> Optional[Dict[str, Any]]:
    """``default`` (our deny list), ``unconfined`` (none) or a JSON profile file."""
    if choice == "unconfined":
        return None
    if choice == "default":
        return {"defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64",
                                  "SCMP_ARCH_ARM"],
                "syscalls": [{"names": sorted(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}]}
    try:
        with open(choice, "r", encoding="utf-8") as handle:
            profile = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValidationError("seccomp_profile {}: cannot read a JSON profile: {}".format(choice, exc)) from exc
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise ValidationError("seccomp_profile {}: not an OCI seccomp profile (no defaultAction)".format(choice))
    return profile


def _namespaces(spec: Dict[str, Any], values: Dict[str, Any]) -> None:
    modes = dict(values["namespaces"])
    network = values["network"]
    result = []
    for entry in spec["linux"]["namespaces"]:
        kind = entry["type"]
        if kind == "network":
            if network == "host":
                continue
            if network != "none":
                entry = {"type": "network", "path": network}
        elif modes.get(kind) == "host":
            continue
        result.append(entry)
    spec["linux"]["namespaces"] = result
    if network == "host" or modes.get("uts") == "host":
        spec["hostname"] = "" if modes.get("uts") == "host" else spec["hostname"]


# ---------------------------------------------------------------- mounts and files

def _mounts(spec: Dict[str, Any], mounts: List[Dict[str, Any]], shm_size: Optional[int]) -> None:
    if shm_size is not None:
        for mount in spec["mounts"]:
            if mount["destination"] == "/dev/shm":
                mount["options"] = [opt for opt in mount["options"] if not opt.startswith("size=")] + [
                    "size={}".format(shm_size)]
    for mount in mounts:
        spec["mounts"].append(oci_mount(mount))


def oci_mount(mount: Dict[str, Any]) -> Dict[str, Any]:
    options = list(mount["options"])
    if mount["type"] == "tmpfs":
        base = ["nosuid", "nodev"] + (["ro"] if mount["read_only"] else [])
        return {"destination": mount["destination"], "type": "tmpfs", "source": "tmpfs",
                "options": base + [opt for opt in options if opt not in base]}
    base = ["rbind", mount["propagation"] or "rprivate"] + (["ro"] if mount["read_only"] else [])
    return {"destination": mount["destination"], "type": "bind", "source": mount["source"],
            "options": base + [opt for opt in options if opt not in base]}


def _dns_files(built: BuiltSpec, values: Dict[str, Any], files_dir: str) -> None:
    """resolv.conf and hosts, generated from the options and bind-mounted read-only."""
    lines = ["nameserver {}".format(server) for server in values["dns_servers"]]
    if values["dns_search"]:
        lines.append("search " + " ".join(values["dns_search"]))
    if values["dns_options"]:
        lines.append("options " + " ".join(values["dns_options"]))
    if lines:
        built.files["/etc/resolv.conf"] = "\n".join(lines) + "\n"
    if values["etc_hosts"] or lines:
        hostname = values.get("hostname") or ""
        hosts = ["127.0.0.1\tlocalhost" + ("\t" + hostname if hostname else ""), "::1\tlocalhost ip6-localhost"]
        hosts += ["{}\t{}".format(address, host) for host, address in sorted(values["etc_hosts"].items())]
        built.files["/etc/hosts"] = "\n".join(hosts) + "\n"
    for destination in sorted(built.files):
        source = os.path.join(files_dir, os.path.basename(destination))
        built.spec["mounts"].append({"destination": destination, "type": "bind", "source": source,
                                     "options": ["rbind", "rprivate", "ro"]})


# ---------------------------------------------------------------- resources

def resources(values: Dict[str, Any]) -> Dict[str, Any]:
    """The OCI ``linux.resources`` of the in-place-updatable fields that are set."""
    result: Dict[str, Any] = {}
    pairs = (("limit", "memory"), ("swap", "memory_swap"), ("reservation", "memory_reservation"))
    memory = {key: values.get(name) for key, name in pairs}
    memory = {key: value for key, value in memory.items() if value is not None}
    if memory:
        result["memory"] = memory
    cpu: Dict[str, Any] = {}
    if values.get("cpu_shares") is not None:
        cpu["shares"] = values["cpu_shares"]
    period = values.get("cpu_period")
    if values.get("cpus") is not None:
        period = period or CPU_PERIOD_DEFAULT
        cpu["quota"] = int(round(values["cpus"] * period))
    elif values.get("cpu_quota") is not None:
        cpu["quota"] = values["cpu_quota"]
    if period is not None:
        cpu["period"] = period
    if values.get("cpuset_cpus"):
        cpu["cpus"] = values["cpuset_cpus"]
    if values.get("cpuset_mems"):
        cpu["mems"] = values["cpuset_mems"]
    if cpu:
        result["cpu"] = cpu
    if values.get("pids_limit") is not None:
        result["pids"] = {"limit": values["pids_limit"]}
    return result


def update_payload(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    """Resources for ``runtime update``: the desired values, with removed limits set back to unlimited."""
    payload = resources(after)
    old = resources(before)
    for key, unlimited in (("limit", -1), ("swap", -1), ("reservation", 0)):
        if key in old.get("memory", {}) and key not in payload.get("memory", {}):
            payload.setdefault("memory", {})[key] = unlimited
    if "quota" in old.get("cpu", {}) and "quota" not in payload.get("cpu", {}):
        payload.setdefault("cpu", {})["quota"] = -1
    if "pids" in old and "pids" not in payload:
        payload["pids"] = {"limit": -1}
    return payload


def _limits(spec: Dict[str, Any], values: Dict[str, Any]) -> None:
    process, linux = spec["process"], spec["linux"]
    if values["ulimits"]:
        wanted = {"RLIMIT_" + item["name"]: item for item in values["ulimits"]}
        kept = [limit for limit in process.get("rlimits", []) if limit["type"] not in wanted]
        process["rlimits"] = kept + [{"type": key, "soft": item["soft"], "hard": item["hard"]}
                                     for key, item in sorted(wanted.items())]
    if values.get("oom_score_adj") is not None:
        process["oomScoreAdj"] = values["oom_score_adj"]
    for device in values["devices"]:
        node = _device_node(device)
        linux.setdefault("devices", []).append(node)
        linux["resources"]["devices"].append({"allow": True, "type": node["type"], "major": node["major"],
                                              "minor": node["minor"], "access": device["permissions"]})


def _device_node(device: Dict[str, str]) -> Dict[str, Any]:
    try:
        info = os.stat(device["path"])
    except OSError as exc:
        raise ValidationError("device {}: {}".format(device["path"], exc.strerror)) from exc
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise ValidationError("device {} is not a character or block device".format(device["path"]))
    return {"path": device["container_path"], "type": kind, "major": os.major(info.st_rdev),
            "minor": os.minor(info.st_rdev), "fileMode": stat.S_IMODE(info.st_mode), "uid": 0, "gid": 0}
