"""The runtime configuration: handlers and the settings conmon and the runtimes need.

The file is JSON (``/etc/daemonless-oci/runtimes.json`` unless ``DAEMONLESS_OCI_CONFIG`` or the
caller names another) because the managed node may only have Python 3.9's standard library,
which cannot read TOML. Without a file the defaults work out of the box: one ``oci`` handler for
each of runc, crun and runsc whose binary is installed, and a ``vm`` handler named ``kata`` when
``containerd-shim-kata-v2`` is. The keys follow the reference's ``[crio.runtime]`` table.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ConfigError
from ansible_collections.daemonless.oci.plugins.module_utils.ids import validate_name

DEFAULT_CONFIG_FILE = "/etc/daemonless-oci/runtimes.json"
CONFIG_ENV = "DAEMONLESS_OCI_CONFIG"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIME_TYPE_OCI = "oci"
RUNTIME_TYPE_VM = "vm"
RUNTIME_TYPES = ("", RUNTIME_TYPE_OCI, RUNTIME_TYPE_VM)
MIN_CONMON_VERSION = (2, 0, 21)  # older conmons could kill(-1) every process on an exec timeout
MIN_STOP_WAIT = 30

# Global flags each known runtime needs on a host like ours, merged under the configured ones.
# runsc refuses to start a networked sandbox from the root network namespace and its default
# platform needs hardware support the test machines lack; ptrace works everywhere.
_RUNTIME_DEFAULT_ARGS = {"runsc": ["--platform=ptrace", "--network=none"]}
_AUTODETECTED_OCI = ("runc", "crun", "runsc")
_KATA_SHIM = "containerd-shim-kata-v2"


@dataclass
class RuntimeHandler:
    """One ``[crio.runtime.runtimes.NAME]`` entry."""

    name: str
    runtime_path: str
    runtime_type: str = RUNTIME_TYPE_OCI
    runtime_root: str = ""
    runtime_args: List[str] = field(default_factory=list)
    allowed_annotations: List[str] = field(default_factory=list)
    privileged_without_host_devices: bool = False
    conmon: str = ""
    conmon_env: List[str] = field(default_factory=list)
    conmon_cgroup: str = ""

    @property
    def is_vm(self) -> bool:
        return self.runtime_type == RUNTIME_TYPE_VM


@dataclass
class RuntimeConfig:
    """The whole configuration, with defaults that need no file."""

    default_runtime: str = "runc"
    runtimes: Dict[str, RuntimeHandler] = field(default_factory=dict)
    conmon: str = ""
    conmon_env: List[str] = field(default_factory=lambda: ["PATH=" + SAFE_PATH])
    conmon_cgroup: str = "/daemonless-oci"
    cgroup_manager: str = "cgroupfs"
    cgroup_parent: str = "/daemonless-oci"
    log_level: str = "error"
    log_size_max: int = -1
    ctr_stop_timeout: int = MIN_STOP_WAIT
    create_timeout: float = 240.0
    runtime_command_timeout: float = 120.0
    run_root: str = "/run/daemonless-oci"
    persist_root: str = "/var/lib/daemonless-oci"
    source: str = "defaults"

    def handler_conmon(self, handler: RuntimeHandler) -> str:
        return handler.conmon or self.conmon

    def handler_conmon_env(self, handler: RuntimeHandler) -> List[str]:
        return handler.conmon_env or self.conmon_env

    def handler_conmon_cgroup(self, handler: RuntimeHandler) -> str:
        return handler.conmon_cgroup or self.conmon_cgroup


def find_executable(name: str) -> Optional[str]:
    """Look ``name`` up in a fixed, safe PATH (a module's own PATH may be minimal)."""
    return shutil.which(name, path=SAFE_PATH + ":" + os.environ.get("PATH", ""))


def detected_handlers() -> Dict[str, RuntimeHandler]:
    """Handlers for the runtimes installed on this host."""
    handlers: Dict[str, RuntimeHandler] = {}
    for name in _AUTODETECTED_OCI:
        path = find_executable(name)
        if path:
            handlers[name] = RuntimeHandler(name=name, runtime_path=path,
                                            runtime_args=list(_RUNTIME_DEFAULT_ARGS.get(name, [])))
    kata = find_executable(_KATA_SHIM)
    if kata:
        handlers["kata"] = RuntimeHandler(name="kata", runtime_path=kata, runtime_type=RUNTIME_TYPE_VM)
    return handlers


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> RuntimeConfig:
    """Read the configuration file (if any), apply ``overrides`` (module parameters), validate.

    An explicitly named file that does not exist is an error; the default file is optional.
    """
    explicit = path or os.environ.get(CONFIG_ENV)
    document: Dict[str, Any] = {}
    source = "defaults"
    candidate = explicit or DEFAULT_CONFIG_FILE
    try:
        with open(candidate, "r", encoding="utf-8") as handle:
            document = json.load(handle)
        source = candidate
    except FileNotFoundError:
        if explicit:
            raise ConfigError("runtime configuration file {} does not exist".format(candidate)) from None
    except ValueError as exc:
        raise ConfigError("runtime configuration file {} is not valid JSON: {}".format(candidate, exc)) from exc
    if not isinstance(document, dict):
        raise ConfigError("runtime configuration file {} must hold a JSON object".format(candidate))
    document = dict(document)
    document.update({key: value for key, value in (overrides or {}).items() if value is not None})
    config = _from_document(document)
    config.source = source
    return config


_SCALAR_KEYS = {"default_runtime": str, "conmon": str, "conmon_cgroup": str, "cgroup_manager": str,
                "cgroup_parent": str, "log_level": str, "log_size_max": int, "ctr_stop_timeout": int,
                "create_timeout": float, "runtime_command_timeout": float, "run_root": str, "persist_root": str}
_HANDLER_KEYS = {"runtime_path", "runtime_type", "runtime_root", "runtime_args", "allowed_annotations",
                 "privileged_without_host_devices", "conmon", "conmon_env", "conmon_cgroup"}


def _from_document(document: Dict[str, Any]) -> RuntimeConfig:
    """Build and validate a RuntimeConfig from a decoded JSON object."""
    unknown = set(document) - set(_SCALAR_KEYS) - {"runtimes", "conmon_env"}
    if unknown:
        raise ConfigError("unknown runtime configuration keys: {}".format(", ".join(sorted(unknown))))
    config = RuntimeConfig()
    for key, kind in _SCALAR_KEYS.items():
        if key in document:
            try:
                setattr(config, key, kind(document[key]))
            except (TypeError, ValueError) as exc:
                raise ConfigError("runtime configuration key {} must be a {}: {}".format(
                    key, kind.__name__, exc)) from exc
    if "conmon_env" in document:
        config.conmon_env = [str(item) for item in document["conmon_env"]]
    config.runtimes = detected_handlers() if "runtimes" not in document else _handlers(document["runtimes"])
    if "default_runtime" not in document and config.runtimes and config.default_runtime not in config.runtimes:
        config.default_runtime = next(iter(config.runtimes))
    config.conmon = config.conmon or find_executable("conmon") or ""
    config.ctr_stop_timeout = max(config.ctr_stop_timeout, MIN_STOP_WAIT)
    _validate(config)
    return config


def _handlers(entries: Any) -> Dict[str, RuntimeHandler]:
    if not isinstance(entries, dict):
        raise ConfigError("runtime configuration key runtimes must map handler names to settings")
    handlers = {}
    for name, settings in entries.items():
        validate_name(name)
        settings = dict(settings or {})
        unknown = set(settings) - _HANDLER_KEYS
        if unknown:
            raise ConfigError("unknown keys for runtime handler {}: {}".format(name, ", ".join(sorted(unknown))))
        path = settings.pop("runtime_path", "") or find_executable(name) or ""
        handler = RuntimeHandler(name=name, runtime_path=path, **settings)
        if not handler.runtime_args and os.path.basename(path) in _RUNTIME_DEFAULT_ARGS:
            handler.runtime_args = list(_RUNTIME_DEFAULT_ARGS[os.path.basename(path)])
        handlers[name] = handler
    return handlers


def _validate(config: RuntimeConfig) -> None:
    for handler in config.runtimes.values():
        if handler.runtime_type not in RUNTIME_TYPES:
            raise ConfigError("runtime handler {} has runtime_type {!r}; allowed: oci, vm".format(
                handler.name, handler.runtime_type))
        handler.runtime_type = handler.runtime_type or RUNTIME_TYPE_OCI
    if config.cgroup_manager not in ("cgroupfs", "systemd"):
        raise ConfigError("cgroup_manager must be cgroupfs or systemd, got {!r}".format(config.cgroup_manager))
    if config.log_size_max >= 0 and config.log_size_max < 8192:
        raise ConfigError("log_size_max must be negative (no limit) or at least 8192, got {}".format(
            config.log_size_max))
    for key in ("create_timeout", "runtime_command_timeout"):
        if getattr(config, key) <= 0:
            raise ConfigError("{} must be positive".format(key))
