"""The planner: a table of (stored, desired) -> actions, with reasons and the deciding diff."""
from __future__ import annotations

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import fields as F
from ansible_collections.daemonless.oci.plugins.module_utils.planner import Desired, Observed, plan

BASE = F.normalise({"command": ["sleep", "100"], "memory": "64M", "runtime": "runc"})
IDENTITY = {"rootfs": "/srv/rootfs", "layered": True}


def observed(status, **changes):
    if status is None:
        return Observed()
    values = dict(BASE, **changes)
    return Observed(True, status, values, dict(IDENTITY), exit_code=0 if status == "stopped" else None)


def desired(state, **kwargs):
    values = dict(BASE, **kwargs.pop("values", {}))
    return Desired(state, values, dict(kwargs.pop("identity", IDENTITY)), **kwargs)


# (status now, desired state) -> actions, final status
TRANSITIONS = [
    (None, "present", ["create"], "created"),
    (None, "created", ["create"], "created"),
    (None, "started", ["create", "start"], "running"),
    (None, "stopped", ["create"], "created"),
    (None, "paused", ["create", "start", "pause"], "paused"),
    (None, "absent", [], ""),
    ("created", "present", [], "created"),
    ("created", "started", ["start"], "running"),
    ("created", "stopped", [], "created"),
    ("created", "paused", ["start", "pause"], "paused"),
    ("created", "absent", ["remove"], ""),
    ("running", "present", [], "running"),
    ("running", "started", [], "running"),
    ("running", "stopped", ["stop"], "stopped"),
    ("running", "paused", ["pause"], "paused"),
    ("running", "absent", ["remove"], ""),
    ("paused", "present", [], "paused"),
    ("paused", "started", ["unpause"], "running"),
    ("paused", "stopped", ["stop"], "stopped"),
    ("paused", "paused", [], "paused"),
    ("paused", "absent", ["remove"], ""),
    ("stopped", "present", [], "stopped"),
    ("stopped", "started", ["start"], "running"),
    ("stopped", "stopped", [], "stopped"),
    ("stopped", "paused", ["start", "pause"], "paused"),
    ("stopped", "absent", ["remove"], ""),
]


@pytest.mark.parametrize("status,state,actions,final", TRANSITIONS)
def test_every_pair_of_states(status, state, actions, final):
    result = plan(desired(state), observed(status))
    assert result.names() == actions
    assert result.final_status == final
    assert result.changed == bool(actions)
    for action in result.actions:
        assert action.reason  # every action says why


def test_unchanged_running_container_is_a_no_op_with_an_empty_diff():
    result = plan(desired("started"), observed("running"))
    assert result.actions == [] and result.before == {} and result.after == {}


def test_config_change_recreates_and_the_diff_holds_only_the_deciding_field():
    result = plan(desired("started", values={"env": {"A": "1"}}), observed("running"))
    assert result.names() == ["recreate", "start"]
    assert "env" in result.actions[0].reason
    assert result.before == {"env": {}}
    assert result.after == {"env": {"A": "1"}}


def test_resource_change_updates_in_place_never_recreates():
    result = plan(desired("started", values={"memory": 128 * 1024 ** 2, "pids_limit": 50}), observed("running"))
    assert result.names() == ["update"]
    assert result.before == {"memory": 64 * 1024 ** 2, "pids_limit": None}
    assert result.after == {"memory": 128 * 1024 ** 2, "pids_limit": 50}


def test_metadata_change_is_stored_without_restart():
    result = plan(desired("started", values={"stop_timeout": 30.0, "labels": {"a": "b"}}), observed("running"))
    assert result.names() == ["metadata"]
    assert set(result.after) == {"stop_timeout", "labels"}


def test_resource_and_config_change_together_recreate_once():
    result = plan(desired("started", values={"memory": 1, "hostname": "x"}), observed("running"))
    assert result.names() == ["recreate", "start"]
    assert result.after == {"hostname": "x"}  # memory goes into the new spec; it did not decide anything


def test_source_change_recreates():
    result = plan(desired("started", identity={"bundle": "/b", "config_sha256": "1"}), observed("running"))
    assert result.names() == ["recreate", "start"]
    assert "source" in result.after


def test_bundle_digest_change_recreates():
    old = Observed(True, "running", dict(BASE), {"bundle": "/b", "config_sha256": "1"})
    result = plan(desired("started", identity={"bundle": "/b", "config_sha256": "2"}), old)
    assert result.names() == ["recreate", "start"]


def test_recreate_flag_forces_a_recreate():
    result = plan(desired("started", recreate=True), observed("running"))
    assert result.names() == ["recreate", "start"]
    assert result.after == {"recreate": True}


def test_restart_flag_restarts_a_running_container_only():
    assert plan(desired("started", restart=True), observed("running")).names() == ["restart"]
    assert plan(desired("started", restart=True), observed("created")).names() == ["start"]
    assert plan(desired("stopped", restart=True), observed("stopped")).names() == []


def test_present_recreate_keeps_a_running_container_running():
    result = plan(desired("present", values={"hostname": "x"}), observed("running"))
    assert result.names() == ["recreate", "start"]
    assert result.final_status == "running"
    assert plan(desired("present", values={"hostname": "x"}), observed("stopped")).final_status == "created"


def test_wait_for_runs_only_after_a_start():
    assert plan(desired("started", wait_for=True), observed(None)).names() == ["create", "start", "wait_for"]
    assert plan(desired("started", wait_for=True), observed("running")).names() == []
    assert plan(desired("paused", wait_for=True), observed(None)).names() == ["create", "start", "pause"]


def test_oneshot_job_runs_once_and_reruns_only_after_a_failure_or_change():
    assert plan(desired("started", oneshot=True), observed(None)).names() == ["create", "start", "wait_exit"]
    assert plan(desired("started", oneshot=True), observed("stopped")).names() == []
    failed = observed("stopped")
    failed.exit_code = 2
    assert plan(desired("started", oneshot=True), failed).names() == ["start", "wait_exit"]
    changed = plan(desired("started", oneshot=True, values={"env": {"A": "1"}}), observed("stopped"))
    assert changed.names() == ["recreate", "start", "wait_exit"]
    assert changed.final_status == "stopped"


def test_container_without_our_record_is_recreated_with_a_reason():
    stranger = Observed(True, "running", {}, {})
    result = plan(desired("started"), stranger)
    assert result.names() == ["recreate", "start"]
    assert "source changed" in result.actions[0].reason


def test_absent_diff_and_status_diffs():
    result = plan(desired("absent"), observed("running"))
    assert result.before == {"exists": True, "status": "running"} and result.after == {"exists": False}
    created = plan(desired("started"), observed(None))
    assert created.before == {"exists": False, "status": None}
    assert created.after == {"exists": True, "status": "running"}


def test_resource_change_recreates_when_the_runtime_cannot_update():
    result = plan(desired("started", values={"memory": 1}, can_update=False), observed("running"))
    assert result.names() == ["recreate", "start"]
    assert "cannot update them in place: memory" in result.actions[0].reason
    assert result.after == {"memory": 1}
    metadata_only = plan(desired("started", values={"stop_timeout": 3.0}, can_update=False), observed("running"))
    assert metadata_only.names() == ["metadata"]
