"""oci_containers (the list form) through real playbooks: one task for many containers."""
from __future__ import annotations

L = "daemonless.oci.oci_containers"


def test_list_form_is_idempotent_validates_first_and_removes(env):
    items = [{"name": "w0"}, {"name": "w1", "memory": "32M"}, {"name": "w2", "labels": {"tier": "b"}}]
    defaults = {"rootfs": env.rootfs, "command": ["sleep", "3600"]}
    check, = env.play([{L: {"containers": items, "defaults": defaults}}], check=True, diff=True)
    assert check["changed"] and len(check["results"]) == 3 and env.manager().list() == []
    created, = env.play([{L: {"containers": items, "defaults": defaults}}])
    assert created["changed"] and [r["container"]["state"] for r in created["results"]] == ["running"] * 3
    assert created["results"][1]["container"]["resources"]["memory"]["limit"] == 32 * 1024 ** 2
    before = env.call_count()
    again, = env.play([{L: {"containers": items, "defaults": defaults}}])
    assert not again["changed"] and env.calls_since(before) == [], "an unchanged list must start no process"
    bad, = env.play([{L: {"containers": [{"name": "w3"}, {"name": "bad/name"}], "defaults": defaults}}],
                    expect_failure=True)
    assert bad["failed"] and "containers[1]" in bad["msg"]
    assert sorted(c.name for c in env.manager().list()) == ["w0", "w1", "w2"], "a bad item must change nothing"
    removed, = env.play([{L: {"containers": items, "defaults": dict(defaults, state="absent")}}])
    assert removed["changed"] and env.manager().list() == []
