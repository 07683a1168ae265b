"""oci_stats through real playbooks: figures of running containers, stopped ones, filters, missing names."""
from __future__ import annotations

C = "daemonless.oci.oci_container"
S = "daemonless.oci.oci_stats"


def test_stats_of_running_stopped_and_filtered_containers(env):
    burner = ["sh", "-c", "while :; do :; done"]
    results = env.play([
        {C: {"name": "burn", "rootfs": env.rootfs, "command": burner, "labels": {"app": "a"}, "pids_limit": 50}},
        {C: {"name": "idle", "rootfs": env.rootfs, "command": ["sleep", "3600"], "labels": {"app": "b"}}},
        {C: {"name": "done", "rootfs": env.rootfs, "command": ["true"], "state": "started"}},
    ])
    assert all(not result.get("failed") for result in results), results
    before = env.call_count()
    stats, filtered, missing, tolerated = env.play([
        {S: {"interval": 0.5}},
        {S: {"filters": {"labels": {"app": "b"}}}},
        {S: {"name": ["idle", "nosuch"]}},
        {S: {"name": ["idle", "nosuch"], "ignore_missing": True}},
    ], check=True, expect_failure=True)
    assert env.call_count() == before or all("state" in line for line in env.calls_since(before)), \
        "stats of running containers must not start runtime processes"
    figures = stats["stats"]
    assert stats["changed"] is False and sorted(figures) == ["burn", "done", "idle"]
    burn = figures["burn"]
    assert burn["status"] == "running"
    assert 40 <= burn["cpu"]["percent"] <= 210, burn["cpu"]  # a busy loop: about one core
    assert burn["pids"]["current"] >= 1 and burn["pids"]["limit"] == 50
    assert burn["memory"]["usage_bytes"] > 0 and burn["memory"]["limit_bytes"] > 0
    assert figures["idle"]["cpu"]["percent"] < 20
    assert figures["done"]["status"] == "stopped" and "cpu" not in figures["done"]
    assert filtered["names"] == ["idle"]
    assert missing["failed"] and "nosuch" in missing["msg"]
    assert tolerated["names"] == ["idle"] and tolerated["missing"] == ["nosuch"]


def test_bad_interval_is_refused(env):
    result = env.play([{S: {"interval": -1}}], expect_failure=True)[0]
    assert result["failed"] and "interval" in result["msg"]
