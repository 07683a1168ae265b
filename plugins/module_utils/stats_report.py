"""``oci_stats``: pick containers by name or filter and report their resource figures.

Read-only. Containers are refreshed through ``ContainerManager.inspect`` (no runtime call while
their verified init process runs) and their figures read by ``stats.collect_containers`` in one
pass, with one sleep for all of them when an interval is asked for (CPU percent).
"""
from __future__ import annotations

from typing import Any, Dict, List

from ansible_collections.daemonless.oci.plugins.module_utils import stats
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ContainerUnknownError, ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.facts import container_facts
from ansible_collections.daemonless.oci.plugins.module_utils.info import matches, select
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager


def gather(params: Dict[str, Any]) -> Dict[str, Any]:
    """The module's result (without ``changed``): ``stats`` keyed by container name, and ``missing``."""
    interval = float(params.get("interval") or 0)
    if interval < 0 or interval > 60:
        raise ValidationError("interval must be between 0 and 60 seconds, got {}".format(interval))
    manager = ContainerManager.from_config(params.get("config_file"), overrides={
        "run_root": params.get("run_root"), "persist_root": params.get("persist_root")})
    found, missing = select(manager, params.get("name"))
    if missing and not params.get("ignore_missing"):
        raise ContainerUnknownError("no such container: {}".format(", ".join(missing)))
    chosen = []
    for container in found:
        facts = container_facts(manager.inspect(container))
        if matches(facts, params.get("filters")):
            chosen.append((container, facts))
    figures = stats.collect_containers([container for container, _facts in chosen], interval)
    report: Dict[str, Dict[str, Any]] = {}
    for (container, facts), sample in zip(chosen, figures):
        entry = sample.to_dict()
        entry.update(name=container.name, runtime_handler=facts["runtime_handler"])
        if facts["state"] != "running" and entry["status"] == "running":
            entry["status"] = facts["state"]  # created or paused: figures are real, the status says why
        report[container.name] = entry
    names: List[str] = sorted(report)
    return {"stats": report, "names": names, "missing": missing}
