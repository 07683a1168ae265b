"""oci_container_info through a real playbook: names, filters, exists/missing, log tails, check mode."""
from __future__ import annotations

C = "daemonless.oci.oci_container"
I = "daemonless.oci.oci_container_info"


def test_names_filters_logs_and_check_mode(env):
    talk = ["sh", "-c", "for i in 1 2 3 4 5; do echo line $i; done; echo oops >&2; sleep 3600"]
    setup = env.play([
        {C: {"name": "i-web", "rootfs": env.rootfs, "command": talk, "labels": {"app": "shop", "role": "web"}}},
        {C: {"name": "i-db", "rootfs": env.rootfs, "command": ["sleep", "3600"], "labels": {"app": "shop"},
             "state": "stopped"}},
        {C: {"name": "i-other", "rootfs": env.rootfs, "command": ["sleep", "3600"], "labels": {"app": "blog"},
             "state": "paused"}},
    ])
    assert not any(result.get("failed") for result in setup)
    import time
    time.sleep(0.5)  # let the first container print
    calls = env.call_count()
    snapshot = env.snapshot()
    results = env.play([
        {I: {"name": "i-web", "logs": True, "logs_tail": 2}},
        {I: {"name": ["i-web", "nope"]}},
        {I: {}},
        {I: {"filters": {"labels": {"app": "shop"}}}},
        {I: {"filters": {"state": ["running", "paused"]}}},
        {I: {"filters": {"runtime": ["runsc"]}}},
        {I: {"filters": {"labels": {"app": "shop"}, "state": ["created"]}}},
    ], check=True)
    one, missing, everything, shop, alive, runsc, shop_created = results
    assert not any(result["changed"] for result in results)
    assert one["exists"] and [c["name"] for c in one["containers"]] == ["i-web"]
    assert one["containers"][0]["state"] == "running" and one["containers"][0]["pid"] > 0
    assert [(line["stream"], line["text"]) for line in one["containers"][0]["logs"]] == [
        ("stdout", "line 5"), ("stderr", "oops")]
    assert not missing["exists"] and missing["missing"] == ["nope"]
    assert [c["name"] for c in everything["containers"]] == ["i-db", "i-other", "i-web"]
    assert [c["name"] for c in shop["containers"]] == ["i-db", "i-web"]
    assert [c["name"] for c in alive["containers"]] == ["i-other", "i-web"]
    assert runsc["containers"] == [] and not runsc["exists"]
    assert [c["name"] for c in shop_created["containers"]] == ["i-db"]
    assert env.snapshot() == snapshot and env.calls_since(calls) == []
