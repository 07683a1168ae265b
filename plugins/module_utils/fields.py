"""The field registry of ``oci_container``: every option, its Ansible type, its class, its normaliser.

The two mature collections decide "changed" by comparing the playbook with what another program
reports back, and options nobody wrote a comparison for are silently ignored. Here each option is
declared once, with the class that says what a change to it means:

* ``oci-config``: it goes into the OCI ``config.json`` (or picks the root filesystem, the handler,
  conmon's log): a change recreates the container.
* ``resource``: a cgroup limit the runtime can change on a live container: a change is applied in
  place (``runtime update``), never a recreate.
* ``metadata``: stored with the container, read at stop time or by the systemd unit: a change is
  stored and nothing is restarted.
* ``action``: what to do now (state, recreate, restart, readiness): never stored or compared.
* ``context``: where things live (name, state roots, configuration file): never compared.

The module's ``argument_spec`` is generated from this table, and a unit test checks that every
option the module accepts has a class. Normalisers are pure: equal meaning gives equal values
(``512M`` and ``536870912``, ``/a//b/`` and ``/a/b``, ``net_admin`` and ``CAP_NET_ADMIN``), and the
normalised values are what is stored at create time and compared on every later run.
"""
from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.signals import parse_signal

OCI_CONFIG = "oci-config"
RESOURCE = "resource"
METADATA = "metadata"
ACTION = "action"
CONTEXT = "context"
CLASSES = (OCI_CONFIG, RESOURCE, METADATA, ACTION, CONTEXT)

STATES = ("present", "created", "started", "stopped", "paused", "absent")
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
PROPAGATIONS = ("private", "rprivate", "shared", "rshared", "slave", "rslave")
NAMESPACE_MODES = ("private", "host")
DEFAULT_STOP_TIMEOUT = 10.0

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
               "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
               "tb": 1024 ** 4, "tib": 1024 ** 4}
_SIZE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*\Z")
_CPUSET = re.compile(r"\A\d+(-\d+)?(,\d+(-\d+)?)*\Z")


# ---------------------------------------------------------------- normalisers (pure, total)

def norm_identity(value: Any) -> Any:
    return value


def norm_bool(default: bool) -> Callable[[Any], bool]:
    """An unset boolean means its default, so "unset" and "explicit default" compare equal."""
    return lambda value: default if value is None else bool(value)


def norm_str(value: Any) -> Optional[str]:
    return None if value in (None, "") else str(value)


def norm_abs_path(value: Any, what: str = "path") -> Optional[str]:
    """An absolute path without ``.``, ``..``, double or trailing slashes (podman #77/#162)."""
    if value in (None, ""):
        return None
    text = str(value)
    if not text.startswith("/"):
        raise ValidationError("{} must be an absolute path, got {!r}".format(what, text))
    normal = posixpath.normpath(text)
    return "/" + normal.lstrip("/")


def norm_argv(value: Any) -> Optional[List[str]]:
    """A list stays a list of strings; a string is split like a shell would (no shell runs it)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValidationError("cannot split command string {!r}: {}".format(value, exc)) from exc
    if isinstance(value, (list, tuple)):
        return [_scalar_text(item, "command element") for item in value]
    raise ValidationError("a command must be a list of strings or a string, got {}".format(type(value).__name__))


def _scalar_text(value: Any, what: str) -> str:
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise ValidationError("{} must be a string, got {!r}".format(what, value))
    return str(value)


def norm_string_dict(what: str) -> Callable[[Any], Dict[str, str]]:
    """Mappings of strings only: YAML turns ``yes`` into a boolean, which must not pass silently."""
    def normalise(value: Any) -> Dict[str, str]:
        result: Dict[str, str] = {}
        for key, item in (value or {}).items():
            if not isinstance(item, str):
                raise ValidationError("{} value of {!r} must be a string, got {} {!r}: quote it in YAML".format(
                    what, key, type(item).__name__, item))
            result[str(key)] = item
        return result
    return normalise


def norm_env(value: Any) -> Dict[str, str]:
    env = norm_string_dict("env")(value)
    for key in env:
        if not key or "=" in key:
            raise ValidationError("env name {!r} must be non-empty and must not contain '='".format(key))
    return env


def norm_str_list(value: Any) -> List[str]:
    return [str(item) for item in (value or [])]


def norm_str_set(value: Any) -> List[str]:
    """Order carries no meaning: sorted, without duplicates."""
    return sorted(set(norm_str_list(value)))


def parse_size(value: Any, what: str) -> Optional[int]:
    """Human sizes to bytes: ``512M``, ``1.5g``, ``64KiB``, ``1048576``; ``-1`` stays (unlimited)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValidationError("{} must be a size such as 512M, not a boolean".format(what))
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if str(value).strip() == "-1":
        return -1
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValidationError("{} {!r} is not a size: use a number of bytes or a suffix k, m, g, t".format(
            what, value))
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def norm_size(what: str) -> Callable[[Any], Optional[int]]:
    return lambda value: parse_size(value, what)


def norm_cpuset(value: Any) -> Optional[str]:
    if value in (None, ""):
        return None
    text = str(value).replace(" ", "")
    if not _CPUSET.match(text):
        raise ValidationError("cpuset {!r} must look like 0-2,4".format(value))
    return text


def norm_caps(value: Any) -> List[str]:
    caps = set()
    for item in value or []:
        name = str(item).strip().upper()
        caps.add(name if name == "ALL" or name.startswith("CAP_") else "CAP_" + name)
    return sorted(caps)


def norm_signal(value: Any) -> Optional[int]:
    return None if value in (None, "") else parse_signal(value)


def norm_stop_timeout(value: Any) -> float:
    if value is None:
        return DEFAULT_STOP_TIMEOUT
    if value < 0:
        raise ValidationError("stop_timeout must be zero or positive, got {}".format(value))
    return float(value)


def norm_network(value: Any) -> str:
    if value in (None, "", "none"):
        return "none"
    if value == "host":
        return "host"
    path = norm_abs_path(value, "network")
    return path or "none"


def norm_mounts(value: Any) -> List[Dict[str, Any]]:
    """Each mount with every key filled in, paths normalised; order is kept (nested mounts)."""
    result = []
    for item in value or []:
        kind = item.get("type") or "bind"
        destination = norm_abs_path(item.get("destination"), "mount destination")
        if destination is None:
            raise ValidationError("every mount needs a destination")
        source = item.get("source")
        if kind == "bind":
            source = norm_abs_path(source, "bind mount source")
            if source is None:
                raise ValidationError("bind mount {} needs a source".format(destination))
        elif source:
            raise ValidationError("tmpfs mount {} takes no source".format(destination))
        result.append({"type": kind, "source": source, "destination": destination,
                       "options": norm_str_list(item.get("options")), "read_only": bool(item.get("read_only")),
                       "propagation": item.get("propagation") or ("rprivate" if kind == "bind" else None)})
    destinations = [mount["destination"] for mount in result]
    if len(set(destinations)) != len(destinations):
        raise ValidationError("two mounts share a destination: {}".format(destinations))
    return result


def norm_devices(value: Any) -> List[Dict[str, str]]:
    result = []
    for item in value or []:
        path = norm_abs_path(item.get("path"), "device path")
        permissions = item.get("permissions") or "rwm"
        if not set(permissions) <= set("rwm"):
            raise ValidationError("device permissions {!r} may only hold r, w and m".format(permissions))
        result.append({"path": path, "container_path": norm_abs_path(item.get("container_path"), "device container_path")
                       or path, "permissions": "".join(ch for ch in "rwm" if ch in permissions)})
    return sorted(result, key=lambda device: device["container_path"])


def norm_ulimits(value: Any) -> List[Dict[str, Any]]:
    result = {}
    for item in value or []:
        name = str(item.get("name", "")).upper()
        name = name[len("RLIMIT_"):] if name.startswith("RLIMIT_") else name
        soft = item.get("soft")
        hard = item.get("hard", soft)
        hard = soft if hard is None else hard
        if soft is None or soft < 0 or hard < soft:
            raise ValidationError("ulimit {}: soft must be set and 0 <= soft <= hard".format(name))
        result[name] = {"name": name, "soft": soft, "hard": hard}
    return [result[name] for name in sorted(result)]


def norm_namespaces(value: Any) -> Dict[str, str]:
    result = {"pid": "private", "ipc": "private", "uts": "private"}
    for key, mode in (value or {}).items():
        if key not in result:
            raise ValidationError("namespaces accepts pid, ipc and uts, not {!r}".format(key))
        if mode not in NAMESPACE_MODES:
            raise ValidationError("namespace {} must be private or host, got {!r}".format(key, mode))
        result[key] = mode
    return result


def norm_etc_hosts(value: Any) -> Dict[str, str]:
    return norm_string_dict("etc_hosts")(value)


def norm_seccomp(value: Any) -> str:
    if value in (None, "", "default"):
        return "default"
    if value == "unconfined":
        return "unconfined"
    return norm_abs_path(value, "seccomp_profile") or "default"


def norm_positive_int(what: str) -> Callable[[Any], Optional[int]]:
    def normalise(value: Any) -> Optional[int]:
        if value is None:
            return None
        if value <= 0 and not (what == "pids_limit" and value == -1):
            raise ValidationError("{} must be positive, got {}".format(what, value))
        return int(value)
    return normalise


def norm_cpus(value: Any) -> Optional[float]:
    if value is None:
        return None
    if value <= 0:
        raise ValidationError("cpus must be positive, got {}".format(value))
    return round(float(value), 3)


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Field:
    """One option: its Ansible argument spec and the class that decides what a change means."""

    name: str
    klass: str
    spec: Dict[str, Any]
    normalise: Callable[[Any], Any] = norm_identity
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def argument_spec(self) -> Dict[str, Any]:
        spec = dict(self.spec)
        if self.options:
            spec["options"] = {key: dict(value) for key, value in self.options.items()}
        return spec


_MOUNT_OPTIONS = {
    "type": {"type": "str", "choices": ["bind", "tmpfs"], "default": "bind"},
    "source": {"type": "str"},
    "destination": {"type": "str", "required": True, "aliases": ["target"]},
    "options": {"type": "list", "elements": "str", "default": []},
    "read_only": {"type": "bool", "default": False},
    "propagation": {"type": "str", "choices": list(PROPAGATIONS)},
}
_DEVICE_OPTIONS = {
    "path": {"type": "str", "required": True},
    "container_path": {"type": "str"},
    "permissions": {"type": "str", "default": "rwm"},
}
_ULIMIT_OPTIONS = {
    "name": {"type": "str", "required": True},
    "soft": {"type": "int", "required": True},
    "hard": {"type": "int"},
}
_WAIT_FOR_OPTIONS = {
    "command": {"type": "list", "elements": "str", "required": True},
    "interval": {"type": "float", "default": 1.0},
    "retries": {"type": "int", "default": 30},
    "timeout": {"type": "float", "default": 5.0},
}


# The options of the doc fragment daemonless.oci.common, which every module takes: where the runtime
# configuration and the state live. Defined once, so that no module's spec can drift from the fragment.
COMMON_OPTIONS: Dict[str, Dict[str, Any]] = {
    "config_file": {"type": "path"},
    "run_root": {"type": "path"},
    "persist_root": {"type": "path"},
}


def common_options() -> Dict[str, Dict[str, Any]]:
    """A fresh copy of COMMON_OPTIONS for one module's argument_spec (AnsibleModule may annotate it)."""
    return {name: dict(spec) for name, spec in COMMON_OPTIONS.items()}


def _f(name: str, klass: str, spec: Dict[str, Any], normalise: Callable[[Any], Any] = norm_identity,
       options: Optional[Dict[str, Dict[str, Any]]] = None) -> Field:
    return Field(name, klass, spec, normalise, dict(options or {}))


FIELDS: List[Field] = [
    # context: never compared
    _f("name", CONTEXT, {"type": "str", "required": True}),
    *[_f(name, CONTEXT, spec) for name, spec in common_options().items()],
    _f("systemd_unit_dir", CONTEXT, {"type": "path"}),
    # actions: what to do now
    _f("state", ACTION, {"type": "str", "default": "started", "choices": list(STATES)}),
    _f("recreate", ACTION, {"type": "bool", "default": False}),
    _f("restart", ACTION, {"type": "bool", "default": False}),
    _f("force_kill", ACTION, {"type": "bool", "default": False}),
    _f("wait_for", ACTION, {"type": "dict"}, options=_WAIT_FOR_OPTIONS),
    _f("oneshot", ACTION, {"type": "bool", "default": False}),
    _f("oneshot_timeout", ACTION, {"type": "float", "default": 600.0}),
    # the source of the root filesystem
    _f("rootfs", OCI_CONFIG, {"type": "path"}, lambda v: norm_abs_path(v, "rootfs")),
    _f("bundle", OCI_CONFIG, {"type": "path"}, lambda v: norm_abs_path(v, "bundle")),
    _f("image", OCI_CONFIG, {"type": "str"}, norm_str),
    # the process
    _f("command", OCI_CONFIG, {"type": "raw"}, norm_argv),
    _f("entrypoint", OCI_CONFIG, {"type": "raw"}, norm_argv),
    _f("env", OCI_CONFIG, {"type": "dict", "default": {}}, norm_env),
    _f("user", OCI_CONFIG, {"type": "str"}, norm_str),
    _f("groups", OCI_CONFIG, {"type": "list", "elements": "str", "default": []}, norm_str_set),
    _f("workdir", OCI_CONFIG, {"type": "str"}, lambda v: norm_abs_path(v, "workdir") or "/"),
    _f("hostname", OCI_CONFIG, {"type": "str"}, norm_str),
    _f("tty", OCI_CONFIG, {"type": "bool", "default": False}, norm_bool(False)),
    _f("mounts", OCI_CONFIG, {"type": "list", "elements": "dict", "default": []}, norm_mounts,
       options=_MOUNT_OPTIONS),
    # network
    _f("network", OCI_CONFIG, {"type": "str", "default": "none"}, norm_network),
    _f("dns_servers", OCI_CONFIG, {"type": "list", "elements": "str", "default": []}, norm_str_list),
    _f("dns_search", OCI_CONFIG, {"type": "list", "elements": "str", "default": []}, norm_str_list),
    _f("dns_options", OCI_CONFIG, {"type": "list", "elements": "str", "default": []}, norm_str_list),
    _f("etc_hosts", OCI_CONFIG, {"type": "dict", "default": {}}, norm_etc_hosts),
    # resources the runtime updates in place
    _f("memory", RESOURCE, {"type": "raw"}, norm_size("memory")),
    _f("memory_swap", RESOURCE, {"type": "raw"}, norm_size("memory_swap")),
    _f("memory_reservation", RESOURCE, {"type": "raw"}, norm_size("memory_reservation")),
    _f("cpus", RESOURCE, {"type": "float"}, norm_cpus),
    _f("cpu_shares", RESOURCE, {"type": "int"}, norm_positive_int("cpu_shares")),
    _f("cpu_quota", RESOURCE, {"type": "int"}, norm_positive_int("cpu_quota")),
    _f("cpu_period", RESOURCE, {"type": "int"}, norm_positive_int("cpu_period")),
    _f("cpuset_cpus", RESOURCE, {"type": "str"}, norm_cpuset),
    _f("cpuset_mems", RESOURCE, {"type": "str"}, norm_cpuset),
    _f("pids_limit", RESOURCE, {"type": "int"}, norm_positive_int("pids_limit")),
    # resources fixed at create time
    _f("devices", OCI_CONFIG, {"type": "list", "elements": "dict", "default": []}, norm_devices,
       options=_DEVICE_OPTIONS),
    _f("ulimits", OCI_CONFIG, {"type": "list", "elements": "dict", "default": []}, norm_ulimits,
       options=_ULIMIT_OPTIONS),
    _f("oom_score_adj", OCI_CONFIG, {"type": "int"}),
    _f("shm_size", OCI_CONFIG, {"type": "raw"}, norm_size("shm_size")),
    _f("cgroup_parent", OCI_CONFIG, {"type": "str"}, lambda v: norm_abs_path(v, "cgroup_parent")),
    # security
    _f("capabilities", OCI_CONFIG, {"type": "list", "elements": "str", "default": []}, norm_caps),
    _f("cap_drop", OCI_CONFIG, {"type": "list", "elements": "str", "default": []}, norm_caps),
    _f("privileged", OCI_CONFIG, {"type": "bool", "default": False}, norm_bool(False)),
    _f("read_only", OCI_CONFIG, {"type": "bool", "default": False}, norm_bool(False)),
    _f("no_new_privileges", OCI_CONFIG, {"type": "bool", "default": True}, norm_bool(True)),
    _f("seccomp_profile", OCI_CONFIG, {"type": "str", "default": "default"}, norm_seccomp),
    _f("apparmor_profile", OCI_CONFIG, {"type": "str"}, norm_str),
    _f("selinux_label", OCI_CONFIG, {"type": "str"}, norm_str),
    _f("sysctls", OCI_CONFIG, {"type": "dict", "default": {}}, norm_string_dict("sysctls")),
    _f("namespaces", OCI_CONFIG, {"type": "dict", "default": {}}, norm_namespaces),
    # identity and runtime
    _f("annotations", OCI_CONFIG, {"type": "dict", "default": {}}, norm_string_dict("annotations")),
    _f("runtime", OCI_CONFIG, {"type": "str"}, norm_str),
    _f("log_path", OCI_CONFIG, {"type": "path"}, lambda v: norm_abs_path(v, "log_path")),
    _f("log_max_size", OCI_CONFIG, {"type": "raw"}, norm_size("log_max_size")),
    # metadata: stored, nothing restarted
    _f("labels", METADATA, {"type": "dict", "default": {}}, norm_string_dict("labels")),
    _f("stop_signal", METADATA, {"type": "raw"}, norm_signal),
    _f("stop_timeout", METADATA, {"type": "float"}, norm_stop_timeout),
    _f("restart_policy", METADATA, {"type": "str", "choices": list(RESTART_POLICIES)},
       lambda v: v or "no"),
    _f("restart_retries", METADATA, {"type": "int"}, norm_positive_int("restart_retries")),
]

BY_NAME: Dict[str, Field] = {item.name: item for item in FIELDS}
SOURCE_FIELDS = ("rootfs", "bundle", "image")


def names(klass: str) -> List[str]:
    """The options of one class, in registry order."""
    return [item.name for item in FIELDS if item.klass == klass]


STATES_NEEDING_SOURCE = ("present", "created", "started", "stopped", "paused")


def constraints() -> Dict[str, Any]:
    """The cross-option rules of ``oci_container``, shared by its single and list forms."""
    return {
        "mutually_exclusive": [list(SOURCE_FIELDS), ["cpus", "cpu_quota"]],
        "required_if": [("state", state, list(SOURCE_FIELDS), True) for state in STATES_NEEDING_SOURCE],
        "required_by": {"restart_retries": "restart_policy"},
    }


def argument_spec() -> Dict[str, Dict[str, Any]]:
    """The module's argument_spec, generated so that no option can exist without a class."""
    return {item.name: item.argument_spec() for item in FIELDS}


def normalise(params: Dict[str, Any], klasses: tuple = (OCI_CONFIG, RESOURCE, METADATA)) -> Dict[str, Any]:
    """Normalised values of every option in ``klasses``; ``ValidationError`` names the bad option."""
    result = {}
    for item in FIELDS:
        if item.klass not in klasses:
            continue
        try:
            result[item.name] = item.normalise(params.get(item.name))
        except ValidationError as exc:
            message = str(exc)
            if item.name not in message:
                message = "{}: {}".format(item.name, message)
            raise ValidationError(message) from exc
        except (TypeError, AttributeError) as exc:
            raise ValidationError("{}: invalid value {!r}: {}".format(item.name, params.get(item.name), exc)) from exc
    if result.get("cpus") is not None and result.get("cpu_quota") is not None:
        raise ValidationError("cpus and cpu_quota are mutually exclusive: cpus is turned into a quota")
    return result


def split(values: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Normalised values grouped by class."""
    grouped: Dict[str, Dict[str, Any]] = {}
    for key, value in values.items():
        grouped.setdefault(BY_NAME[key].klass, {})[key] = value
    return grouped
