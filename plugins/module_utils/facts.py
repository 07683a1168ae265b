"""A container as the modules return it: plain JSON facts built from our own stored state.

Shared by ``oci_container`` (its ``container`` result) and ``oci_container_info`` so both report
the same keys with the same meaning.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.container import CONTAINER_STATE_RUNNING, Container, \
    CONTAINER_STATE_PAUSED, format_time
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import digest

RECORD_KEY = "dloci"  # our record inside Container.extras: normalised values, source, spec digest


def record(container: Container) -> Dict[str, Any]:
    """What oci_container stored at create (empty for containers made by other means)."""
    value = container.extras.get(RECORD_KEY)
    return value if isinstance(value, dict) else {}


def _time(value: Any) -> Optional[str]:
    return None if value is None else format_time(value)


def container_facts(container: Container) -> Dict[str, Any]:
    """The facts of one container (its state must be fresh: refresh or inspect first)."""
    state = container.state
    alive = state.status in (CONTAINER_STATE_RUNNING, CONTAINER_STATE_PAUSED)
    stored = record(container)
    spec = container.spec()
    resources = dict((spec.get("linux") or {}).get("resources") or {})
    resources.pop("devices", None)
    values = stored.get("values") or {}
    return {
        "id": container.id,
        "name": container.name,
        "state": state.status or "unknown",
        "pid": state.init_pid if alive else None,
        "pid_start_time": state.init_start_time if alive else None,
        "exit_code": state.exit_code,
        "oom_killed": bool(state.oom_killed),
        "error": state.error or None,
        "created_at": _time(state.created),
        "started_at": _time(state.started),
        "finished_at": _time(state.finished),
        "attempt": container.metadata.attempt,
        "runtime_handler": container.runtime_handler,
        "runtime_type": (container.extras.get("runtime") or {}).get("runtime_type"),
        "source": stored.get("source") or {},
        "spec_digest": stored.get("spec_digest") or digest(spec),
        "bundle_path": container.bundle_path,
        "log_path": container.log_path,
        "labels": dict(container.labels),
        "annotations": dict(container.annotations),
        "resources": resources,
        "stop_signal": container.stop_signal(),
        "stop_timeout": container.extras.get("stop_timeout"),
        "restart_policy": values.get("restart_policy", "no"),
    }
