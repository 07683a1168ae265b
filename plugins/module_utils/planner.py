"""Desired vs stored -> an ordered list of actions, each with its reason, and the diff that decided them.

Pure functions over plain data: no file, no process, no clock. The executor performs the plan
(or, in check mode, only reports it), so check mode predicts exactly what a real run does, and
the diff is built from the same values that decided each action: it is the reason, not a
re-rendering of it.

Transitions (``present`` is ``created``; a recreate first removes, then creates):

=========  ===========  ==========================  ================  ===================
desired    absent       created                     running           paused / stopped
=========  ===========  ==========================  ================  ===================
present    create       -                           -                 -
started    create,start start                       (restart)         unpause / start
stopped    create       -                           stop              stop / -
paused     create,      start, pause                pause             - / start, pause
           start,pause
absent     -            remove                      remove            remove
=========  ===========  ==========================  ================  ===================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils import fields as F

CREATED, RUNNING, PAUSED, STOPPED = "created", "running", "paused", "stopped"


@dataclass
class Observed:
    """What exists now: read from our own stored state, never from another program's output."""

    exists: bool = False
    status: str = ""
    values: Dict[str, Any] = field(default_factory=dict)     # normalised option values stored at create
    identity: Dict[str, Any] = field(default_factory=dict)   # source identity stored at create
    exit_code: Optional[int] = None


@dataclass
class Desired:
    state: str
    values: Dict[str, Any]
    identity: Dict[str, Any]
    recreate: bool = False
    restart: bool = False
    wait_for: bool = False
    oneshot: bool = False
    can_update: bool = True      # False: the runtime has no in-place update (runsc); resources recreate


@dataclass
class Action:
    action: str
    reason: str
    fields: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, str]:
        return {"action": self.action, "reason": self.reason}


@dataclass
class Plan:
    actions: List[Action] = field(default_factory=list)
    before: Dict[str, Any] = field(default_factory=dict)
    after: Dict[str, Any] = field(default_factory=dict)
    final_status: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.actions)

    def names(self) -> List[str]:
        return [item.action for item in self.actions]

    def add(self, action: str, reason: str, names: Optional[List[str]] = None) -> None:
        self.actions.append(Action(action, reason, list(names or [])))


def differing(desired: Dict[str, Any], stored: Dict[str, Any], klass: str) -> List[str]:
    """Options of ``klass`` whose normalised values differ (an option missing from an old store differs)."""
    return [name for name in F.names(klass) if name in desired and desired[name] != stored.get(name, _MISSING)]


_MISSING = object()


def plan(desired: Desired, observed: Observed) -> Plan:
    """The whole plan for one container."""
    result = Plan()
    state = "present" if desired.state == "created" else desired.state
    if state == "absent":
        if observed.exists:
            result.add("remove", "state is absent and the container exists ({})".format(observed.status or "unknown"))
            _record(result, {"exists": True, "status": observed.status}, {"exists": False})
        return result
    status = _converge_config(result, desired, observed)
    _transition(result, state, status, desired, observed)
    return result


def _converge_config(result: Plan, desired: Desired, observed: Observed) -> str:
    """Create, recreate, update or store metadata; returns the status the container will then have."""
    if not observed.exists:
        result.add("create", "the container does not exist")
        _record(result, {"exists": False}, {"exists": True})
        return ""
    config = differing(desired.values, observed.values, F.OCI_CONFIG)
    source_changed = desired.identity != observed.identity
    if config or source_changed or desired.recreate:
        reasons = []
        if desired.recreate:
            reasons.append("recreate was requested")
        if source_changed:
            reasons.append("the source changed")
        if config:
            reasons.append("options that go into the OCI config changed: " + ", ".join(config))
        result.add("recreate", "; ".join(reasons), config)
        before = {name: observed.values.get(name) for name in config}
        after = {name: desired.values[name] for name in config}
        if source_changed:
            before["source"], after["source"] = observed.identity, desired.identity
        if desired.recreate and not config and not source_changed:
            before["recreate"], after["recreate"] = False, True
        _record(result, before, after)
        return "" if observed.status in (RUNNING, PAUSED) and desired.state == "present" else CREATED
    resources = differing(desired.values, observed.values, F.RESOURCE)
    if resources and not desired.can_update:
        result.add("recreate", "resources changed and the runtime cannot update them in place: " +
                   ", ".join(resources), resources)
        _record(result, {name: observed.values.get(name) for name in resources},
                {name: desired.values[name] for name in resources})
        return "" if observed.status in (RUNNING, PAUSED) and desired.state == "present" else CREATED
    for klass, action, text in ((F.RESOURCE, "update", "resources changed, applied in place: "),
                                (F.METADATA, "metadata", "stored settings changed, nothing restarted: ")):
        names = differing(desired.values, observed.values, klass)
        if names:
            result.add(action, text + ", ".join(names), names)
            _record(result, {name: observed.values.get(name) for name in names},
                    {name: desired.values[name] for name in names})
    return observed.status


def _transition(result: Plan, state: str, status: str, desired: Desired, observed: Observed) -> None:
    """Bring ``status`` ('' = freshly created, still to be started if it was running) to ``state``."""
    was_running = status == "" and observed.exists
    status = CREATED if status == "" else status
    start_reason = "state is {} and the container is {}".format(state, status)
    steps: List[str] = []
    if state == "present":
        if was_running:
            steps = ["start"]
            start_reason = "it was running before the recreate and state present keeps it running"
    elif state == "started":
        steps = {CREATED: ["start"], STOPPED: ["start"], PAUSED: ["unpause"], RUNNING: []}.get(status, ["start"])
        if desired.oneshot and status == STOPPED and observed.exit_code == 0 and not was_recreated(result):
            steps = []
        elif desired.oneshot and status == STOPPED:
            start_reason = "oneshot: the last run exited with {}, run it again".format(observed.exit_code)
        if status == RUNNING and desired.restart:
            steps = ["restart"]
            start_reason = "restart was requested"
    elif state == "stopped":
        steps = ["stop"] if status in (RUNNING, PAUSED) else []
    elif state == "paused":
        steps = {CREATED: ["start", "pause"], STOPPED: ["start", "pause"], RUNNING: ["pause"], PAUSED: []}.get(
            status, ["start", "pause"])
    for step in steps:
        result.add(step, start_reason)
    final = _final_status(state, status, steps)
    if desired.oneshot and state == "started" and any(step in ("start", "restart") for step in steps):
        result.add("wait_exit", "oneshot: wait for the job to finish and check its exit code")
        final = STOPPED
    before_status = observed.status if observed.exists else None
    if final != before_status:
        _record(result, {"status": before_status}, {"status": final})
    if "restart" in steps:
        _record(result, {"restarted": False}, {"restarted": True})
    result.final_status = final
    if desired.wait_for and any(step in ("start", "restart") for step in steps) and final == RUNNING:
        result.add("wait_for", "the container was started: run the readiness command")


def was_recreated(result: Plan) -> bool:
    return any(item.action in ("create", "recreate") for item in result.actions)


def _final_status(state: str, status: str, steps: List[str]) -> str:
    if "pause" in steps:
        return PAUSED
    if "stop" in steps:
        return STOPPED
    if any(step in ("start", "unpause", "restart") for step in steps):
        return RUNNING
    return status


def _record(result: Plan, before: Dict[str, Any], after: Dict[str, Any]) -> None:
    result.before.update(before)
    result.after.update(after)
