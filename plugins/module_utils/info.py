"""``oci_container_info``: find containers by name or filter and report their facts and log tails.

Read-only: state is refreshed under a shared lock through ``ContainerManager.inspect``, which only
asks the runtime about a container whose recorded process is gone, and writes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils import logs
from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.facts import container_facts
from ansible_collections.daemonless.oci.plugins.module_utils.ids import validate_name
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager


def matches(facts: Dict[str, Any], filters: Optional[Dict[str, Any]]) -> bool:
    """Every given filter must match: all labels equal, state in the list, handler in the list."""
    if not filters:
        return True
    labels = filters.get("labels") or {}
    if any(facts["labels"].get(key) != str(value) for key, value in labels.items()):
        return False
    if filters.get("state") and facts["state"] not in filters["state"]:
        return False
    if filters.get("runtime") and facts["runtime_handler"] not in filters["runtime"]:
        return False
    return True


def select(manager: ContainerManager, names: Optional[List[str]]) -> Tuple[List[Container], List[str]]:
    """The containers called ``names`` (every container when None), in name order, and the names not found."""
    if not names:
        return sorted(manager.list(), key=lambda item: item.name), []
    found: List[Container] = []
    missing: List[str] = []
    for name in names:
        container = manager.find(validate_name(name))
        if container is None:
            missing.append(name)
        else:
            found.append(container)
    return sorted(found, key=lambda item: item.name), missing


def gather(params: Dict[str, Any]) -> Dict[str, Any]:
    """The module's result (without ``changed``)."""
    manager = ContainerManager.from_config(params.get("config_file"), overrides={
        "run_root": params.get("run_root"), "persist_root": params.get("persist_root")})
    names: Optional[List[str]] = params.get("name")
    found, missing = select(manager, names)
    containers = []
    for container in found:
        facts = container_facts(manager.inspect(container))
        if not matches(facts, params.get("filters")):
            continue
        if params.get("logs"):
            facts["logs"] = [line.to_json() for line in logs.tail(container.log_path, params.get("logs_tail") or 0)]
        containers.append(facts)
    exists = not missing if names else bool(containers)
    return {"containers": containers, "exists": exists, "missing": missing}
