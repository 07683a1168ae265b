"""oci_container through real playbooks: the check/apply/apply/check quartet per option group, every state
transition, in-place resource updates, metadata, oneshot jobs, readiness, bad parameters.

Run as root: python3 tests/tools/subreaper.py python3 -m pytest tests/integration
"""
from __future__ import annotations

import os

import pytest

C = "daemonless.oci.oci_container"
INFO = "daemonless.oci.oci_container_info"
SLEEP = ["sleep", "3600"]


def container(name, **options):
    options.setdefault("command", SLEEP)
    return {C: dict(name=name, **options)}


def proc_status(pid):
    with open("/proc/{}/status".format(pid)) as handle:
        return dict(line.split(":\t", 1) for line in handle.read().splitlines() if ":\t" in line)


def proc_environ(pid):
    with open("/proc/{}/environ".format(pid), "rb") as handle:
        return [item.decode() for item in handle.read().split(b"\0") if item]


# Each case: options, and a check on the running container's facts / process that the option is in force.
def check_env(env, facts):
    assert "GREETING=hello world" in proc_environ(facts["pid"])


def check_user(env, facts):
    status = proc_status(facts["pid"])
    assert status["Uid"].split()[0] == "1000" and status["Gid"].split()[0] == "10"
    assert os.readlink("/proc/{}/cwd".format(facts["pid"])) == "/tmp"


def check_mounts(env, facts):
    with open("/proc/{}/root/data/marker".format(facts["pid"])) as handle:
        assert handle.read() == "bind"
    with open("/proc/{}/mounts".format(facts["pid"])) as handle:
        mounts = handle.read()
    assert " /scratch tmpfs " in mounts and " /data " in mounts


def check_network(env, facts):
    assert os.readlink("/proc/{}/ns/net".format(facts["pid"])) == os.readlink("/proc/self/ns/net")
    with open("/proc/{}/root/etc/resolv.conf".format(facts["pid"])) as handle:
        assert handle.read() == "nameserver 192.0.2.53\nsearch example.org\n"
    with open("/proc/{}/root/etc/hosts".format(facts["pid"])) as handle:
        assert "192.0.2.10\tdb" in handle.read()


def check_resources(env, facts):
    assert facts["resources"]["memory"]["limit"] == 64 * 1024 ** 2
    assert facts["resources"]["pids"]["limit"] == 32
    assert facts["resources"]["cpu"]["quota"] == 50000


def check_security(env, facts):
    status = proc_status(facts["pid"])
    assert int(status["CapEff"], 16) & (1 << 0) == 0          # CAP_CHOWN dropped
    assert int(status["CapEff"], 16) & (1 << 12)               # CAP_NET_ADMIN added
    assert status["NoNewPrivs"].strip() == "0"
    assert status["Seccomp"].strip() == "0"                    # unconfined
    with open("/proc/{}/mounts".format(facts["pid"])) as handle:
        root_line = next(line for line in handle if line.split()[1] == "/")
    assert "ro" in root_line.split()[3].split(",")


def check_default_seccomp(env, facts):
    assert proc_status(facts["pid"])["Seccomp"].strip() == "2"


def check_labels(env, facts):
    assert facts["labels"] == {"app": "shop", "tier": "web"}
    assert facts["annotations"] == {"org.example.owner": "team-a"}
    assert facts["stop_signal"] == 3 and facts["stop_timeout"] == 2.0


def check_limits(env, facts):
    with open("/proc/{}/limits".format(facts["pid"])) as handle:
        text = handle.read()
    assert "Max open files            100                  200" in text
    with open("/proc/{}/oom_score_adj".format(facts["pid"])) as handle:
        assert handle.read().strip() == "200"
    assert os.path.exists("/proc/{}/root/dev/mynull".format(facts["pid"]))


CASES = {
    "basic": ({}, None),
    "env": ({"env": {"GREETING": "hello world"}}, check_env),
    "user_workdir": ({"user": "app:wheel", "workdir": "/tmp/", "groups": ["app"]}, check_user),
    "mounts": ({"mounts": [{"source": "BIND", "destination": "/data/", "read_only": True},
                           {"type": "tmpfs", "destination": "/scratch", "options": ["size=1m"]}]}, check_mounts),
    "network_dns": ({"network": "host", "dns_servers": ["192.0.2.53"], "dns_search": ["example.org"],
                     "etc_hosts": {"db": "192.0.2.10"}}, check_network),
    "resources": ({"memory": "64M", "pids_limit": 32, "cpus": 0.5, "cpu_shares": 512}, check_resources),
    "security": ({"capabilities": ["net_admin"], "cap_drop": ["CHOWN"], "read_only": True,
                  "no_new_privileges": False, "seccomp_profile": "unconfined", "sysctls": {"net.ipv4.ping_group_range": "0 0"}},
                 check_security),
    "default_seccomp": ({"hostname": "box", "tty": True}, check_default_seccomp),
    "labels_stop": ({"labels": {"app": "shop", "tier": "web"}, "annotations": {"org.example.owner": "team-a"},
                     "stop_signal": "QUIT", "stop_timeout": 2}, check_labels),
    "limits_devices": ({"ulimits": [{"name": "nofile", "soft": 100, "hard": 200}], "oom_score_adj": 200,
                        "shm_size": "8M", "devices": [{"path": "/dev/null", "container_path": "/dev/mynull"}]},
                       check_limits),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_apply_apply_check(env, case):
    options, verify = CASES[case]
    options = dict(options)
    if "mounts" in options:
        bind = os.path.join(env.root, "bind")
        os.makedirs(bind)
        with open(os.path.join(bind, "marker"), "w") as handle:
            handle.write("bind")
        options["mounts"][0] = dict(options["mounts"][0], source=bind + "//")
    task = container("c-" + case.replace("_", "-"), rootfs=env.rootfs, **options)

    before = env.snapshot()
    calls = env.call_count()
    predicted = env.play([task], check=True, diff=True)[0]
    assert not predicted.get("failed"), predicted
    assert predicted["changed"] and [a["action"] for a in predicted["actions"]] == ["create", "start"]
    assert env.snapshot() == before, "check mode changed the disk or the process table"
    assert env.call_count() == calls, "check mode called the runtime"

    applied = env.play([task])[0]
    assert not applied.get("failed"), applied
    assert applied["changed"] and applied["actions"] == predicted["actions"]
    assert applied["diff"] == predicted["diff"]
    facts = applied["container"]
    assert facts["state"] == "running" and facts["pid"] > 0
    if verify:
        verify(env, facts)

    calls = env.call_count()
    again = env.play([task])[0]
    assert not again["changed"] and again["actions"] == [] and again["diff"] == {"before": {}, "after": {}}
    assert again["container"]["pid"] == facts["pid"]
    assert env.calls_since(calls) == [], "a no-op run called conmon or the runtime"

    snapshot = env.snapshot()
    checked = env.play([task], check=True)[0]
    assert not checked["changed"] and checked["actions"] == []
    assert env.snapshot() == snapshot


STATES = ["absent", "present", "started", "stopped", "paused"]


SETUP_STATUS = {"absent": "absent", "present": "created", "started": "running", "stopped": "stopped",
                "paused": "paused"}


def expected_after(status, state):
    """(status the container ends in, whether the task reports a change)."""
    if state == "absent":
        return "absent", status != "absent"
    if state == "present":
        return ("created", True) if status == "absent" else (status, False)
    if state == "started":
        return "running", status != "running"
    if state == "stopped":
        if status == "absent":
            return "created", True
        return ("stopped", True) if status in ("running", "paused") else (status, False)
    return "paused", status != "paused"


def test_transitions_between_every_pair_of_states(env):
    """25 containers, one per (from, to) pair: set up (a real exited container for "stopped"), move, move again."""
    pairs = [(a, b) for a in STATES for b in STATES]

    def task(index, state):
        return container("p{}".format(index), rootfs=env.rootfs, state=state, stop_timeout=1)

    setup = env.play([task(i, "started" if a == "stopped" else a) for i, (a, _b) in enumerate(pairs)])
    setup += env.play([task(i, "stopped") for i, (a, _b) in enumerate(pairs) if a == "stopped"])
    assert not any(result.get("failed") for result in setup)
    moved = env.play([task(i, b) for i, (_a, b) in enumerate(pairs)], diff=True)
    for (a, b), result in zip(pairs, moved):
        assert not result.get("failed"), (a, b, result)
        status, changed = expected_after(SETUP_STATUS[a], b)
        assert result["container"]["state"] == status, (a, b, result["container"]["state"], result["actions"])
        assert result["changed"] == changed, (a, b, result["actions"])
        if changed and b != "absent":
            assert result["diff"]["after"]["status"] == status
    again = env.play([task(i, b) for i, (_a, b) in enumerate(pairs)])
    for (a, b), result in zip(pairs, again):
        assert not result["changed"], (a, b, result["actions"])


def test_resource_change_updates_in_place(env):
    task = container("res", rootfs=env.rootfs, memory="64M", pids_limit=20)
    first = env.play([task])[0]["container"]
    changed = container("res", rootfs=env.rootfs, memory="128M", pids_limit=40, cpus=0.5)
    snapshot = env.snapshot()
    predicted = env.play([changed], check=True)[0]
    assert [a["action"] for a in predicted["actions"]] == ["update"]
    assert env.snapshot() == snapshot
    calls = env.call_count()
    result = env.play([changed], diff=True)[0]
    assert [a["action"] for a in result["actions"]] == ["update"]
    assert result["diff"] == {"before": {"memory": 64 * 1024 ** 2, "pids_limit": 20, "cpus": None},
                              "after": {"memory": 128 * 1024 ** 2, "pids_limit": 40, "cpus": 0.5}}
    after = result["container"]
    assert (after["pid"], after["pid_start_time"]) == (first["pid"], first["pid_start_time"])
    assert after["resources"]["memory"]["limit"] == 128 * 1024 ** 2
    runtime_calls = [line for line in env.calls_since(calls) if "/runc " in line]
    assert any(" update " in line for line in runtime_calls) and not any(" create " in line for line in runtime_calls)
    assert _memory_limit(after["id"]) == 128 * 1024 ** 2
    assert not env.play([changed])[0]["changed"]
    # removing a limit sets it back to unlimited, still in place
    unlimited = env.play([container("res", rootfs=env.rootfs, pids_limit=40, cpus=0.5)])[0]
    assert [a["action"] for a in unlimited["actions"]] == ["update"]
    assert unlimited["container"]["pid"] == first["pid"]


def _memory_limit(container_id):
    for base in ("/sys/fs/cgroup/memory/daemonless-oci", "/sys/fs/cgroup/daemonless-oci"):
        for name in ("memory.limit_in_bytes", "memory.max"):
            path = os.path.join(base, container_id, name)
            if os.path.exists(path):
                with open(path) as handle:
                    return int(handle.read())
    pytest.skip("no memory cgroup file found for the container")


def test_metadata_change_is_stored_without_restart(env):
    first = env.play([container("meta", rootfs=env.rootfs, stop_timeout=5)])[0]["container"]
    calls = env.call_count()
    result = env.play([container("meta", rootfs=env.rootfs, stop_timeout=1, stop_signal="SIGINT",
                                 labels={"a": "b"})])[0]
    assert [a["action"] for a in result["actions"]] == ["metadata"]
    assert result["container"]["pid"] == first["pid"]
    assert result["container"]["stop_signal"] == 2 and result["container"]["labels"] == {"a": "b"}
    assert env.calls_since(calls) == []


def test_config_change_recreates_with_reason_and_diff(env):
    first = env.play([container("cfg", rootfs=env.rootfs, env={"A": "1"})])[0]["container"]
    result = env.play([container("cfg", rootfs=env.rootfs, env={"A": "2"})], diff=True)[0]
    assert [a["action"] for a in result["actions"]] == ["recreate", "start"]
    assert "env" in result["actions"][0]["reason"]
    assert result["diff"]["before"]["env"] == {"A": "1"} and result["diff"]["after"]["env"] == {"A": "2"}
    assert result["container"]["id"] != first["id"]


def test_writable_layers_are_private_and_rootfs_untouched(env):
    write = ["sh", "-c", "echo $HOSTNAME > /tmp/who; sleep 3600"]
    results = env.play([container("w1", rootfs=env.rootfs, command=write, hostname="one"),
                        container("w2", rootfs=env.rootfs, command=write, hostname="two")])
    import time
    deadline = time.monotonic() + 5
    paths = ["/proc/{}/root/tmp/who".format(r["container"]["pid"]) for r in results]
    while time.monotonic() < deadline and not all(os.path.exists(p) for p in paths):
        time.sleep(0.05)
    assert [open(p).read().strip() for p in paths] == ["one", "two"]
    assert not os.path.exists(os.path.join(env.rootfs, "tmp", "who"))


def test_oneshot_job_runs_once(env):
    job = container("job", rootfs=env.rootfs, command=["sh", "-c", "echo done"], oneshot=True, read_only=True)
    first = env.play([job])[0]
    assert [a["action"] for a in first["actions"]] == ["create", "start", "wait_exit"]
    assert first["container"]["state"] == "stopped" and first["container"]["exit_code"] == 0
    assert not env.play([job])[0]["changed"]
    failing = container("job2", rootfs=env.rootfs, command=["sh", "-c", "echo broken >&2; exit 4"], oneshot=True)
    result = env.play([failing], expect_failure=True)[0]
    assert result["failed"] and result["exit_code"] == 4 and "stderr broken" in result["log_tail"]


def test_wait_for_readiness(env):
    ready = container("ready", rootfs=env.rootfs, command=["sh", "-c", "sleep 0.5; touch /tmp/ok; sleep 3600"],
                      wait_for={"command": ["test", "-e", "/tmp/ok"], "interval": 0.2, "retries": 50})
    result = env.play([ready])[0]
    assert not result.get("failed"), result
    assert [a["action"] for a in result["actions"]] == ["create", "start", "wait_for"]
    never = container("never", rootfs=env.rootfs, command=["sh", "-c", "echo starting; sleep 3600"],
                      wait_for={"command": ["false"], "interval": 0.1, "retries": 3})
    failed = env.play([never], expect_failure=True)[0]
    assert failed["failed"] and failed["exit_code"] == 1 and "stdout starting" in failed["log_tail"]


BAD = [
    ({"rootfs": "ROOTFS", "bundle": "/tmp"}, "mutually exclusive"),
    ({"rootfs": "ROOTFS", "runtime": "nosuch"}, "nosuch"),
    ({"rootfs": "ROOTFS", "memory": "lots"}, "not a size"),
    ({"rootfs": "ROOTFS", "env": {"DEBUG": True}}, "must be a string"),
    ({"rootfs": "ROOTFS", "cpus": "many"}, "cpus"),
    ({"rootfs": "ROOTFS", "name": "a/b"}, "must not contain '/'"),
    ({"rootfs": "ROOTFS", "user": "ghost"}, "ghost"),
    ({"rootfs": "ROOTFS", "annotations": {"io.kubernetes.cri-o.Devices": "x"}}, "does not allow"),
    ({"rootfs": "/nonexistent/rootfs"}, "not a directory"),
    ({}, "any of the following are missing: rootfs, bundle, image"),
    ({"rootfs": "ROOTFS", "restart_retries": 3}, "restart_policy"),
    ({"bundle": "BUNDLE", "env": {"A": "1"}}, "used as given"),
    ({"image": "docker.io/library/busybox"}, "image"),
]


def test_bad_parameters_fail_clearly_and_create_nothing(env):
    bundle = os.path.join(env.root, "bundle")
    os.makedirs(os.path.join(bundle, "rootfs"))
    with open(os.path.join(bundle, "config.json"), "w") as handle:
        handle.write('{"root": {"path": "rootfs"}, "process": {"args": ["true"]}}')
    tasks = []
    for options, _message in BAD:
        options = {key: (env.rootfs if value == "ROOTFS" else bundle if value == "BUNDLE" else value)
                   for key, value in options.items()}
        options.setdefault("name", "bad")
        tasks.append({C: dict(options, command=SLEEP)})
    results = env.play(tasks, expect_failure=True)
    for (options, message), result in zip(BAD, results):
        assert result.get("failed"), (options, result)
        assert message in result["msg"], (message, result["msg"])
    assert env.manager().list() == []
    assert not os.path.exists(os.path.join(env.persist_root, "layers", "bad")) or not os.listdir(
        os.path.join(env.persist_root, "layers"))


def test_bundle_source_identity_is_path_plus_config_digest(env):
    bundle = os.path.join(env.root, "bundle")
    os.makedirs(bundle)
    os.symlink(env.rootfs, os.path.join(bundle, "rootfs"))
    import json
    from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
    spec = default_spec("rootfs", ["sleep", "3600"], readonly_root=True)
    with open(os.path.join(bundle, "config.json"), "w") as handle:
        json.dump(spec, handle)
    task = {C: {"name": "bun", "bundle": bundle, "memory": "32M"}}
    first = env.play([task])[0]
    assert first["container"]["state"] == "running", first
    assert first["container"]["source"]["identity"]["config_sha256"]
    assert not env.play([task])[0]["changed"]
    spec["process"]["args"] = ["sleep", "3601"]
    with open(os.path.join(bundle, "config.json"), "w") as handle:
        json.dump(spec, handle)
    again = env.play([task])[0]
    assert [a["action"] for a in again["actions"]] == ["recreate", "start"] and "source" in again["actions"][0]["reason"]


def installed_hash(env):
    import json
    from ansible_collections.daemonless.oci.plugins.module_utils import selfinstall
    with open(os.path.join(selfinstall.target_dir(env.persist_root), selfinstall.MANIFEST)) as handle:
        return json.load(handle)["sha256"]


def play_unchanged_unless_library_edited(env, task):
    """No change, except a library re-install when module_utils really changed meanwhile (other engineers
    edit the shared checkout while this runs): then the installed manifest hash must have changed too."""
    before = installed_hash(env)
    result = env.play([task])[0]
    if [a["action"] for a in result["actions"]] == ["install_library"]:
        assert installed_hash(env) != before
    else:
        assert not result["changed"], result["actions"]
    return result


def test_restart_policy_unit_and_installed_library(env):
    task = container("svc", rootfs=env.rootfs, restart_policy="on-failure", restart_retries=3,
                     systemd_unit_dir=env.unit_dir)
    snapshot = env.snapshot()
    predicted = env.play([task], check=True, diff=True)[0]
    assert [a["action"] for a in predicted["actions"]] == ["create", "start", "install_library", "unit"]
    assert env.snapshot() == snapshot
    result = env.play([task], diff=True)[0]
    assert result["actions"] == predicted["actions"]
    unit = os.path.join(env.unit_dir, "daemonless-oci-svc.service")
    text = open(unit).read()
    assert "Restart=on-failure" in text and "StartLimitBurst=3" in text
    assert result["diff"]["after"]["systemd_unit"] == text
    play_unchanged_unless_library_edited(env, task)
    # the library the unit runs was copied out of the AnsiballZ payload: run the CLI from it
    import json
    import subprocess
    lib = os.path.join(env.persist_root, "lib")
    out = subprocess.run(["/usr/bin/python3", "-m", "ansible_collections.daemonless.oci.plugins.module_utils.cli",
                          "status", "svc", "--run-root", env.run_root, "--persist-root", env.persist_root,
                          "--config", env.config], env={"PYTHONPATH": lib, "PATH": os.environ["PATH"]},
                         cwd="/", stdout=subprocess.PIPE, check=True)
    assert json.loads(out.stdout)["state"] == "running"
    # stop through the CLI, start again through it (what the unit does at boot), then drop the policy
    subprocess.run(["/usr/bin/python3", "-m", "ansible_collections.daemonless.oci.plugins.module_utils.cli",
                    "stop", "svc", "--run-root", env.run_root, "--persist-root", env.persist_root,
                    "--config", env.config], env={"PYTHONPATH": lib, "PATH": os.environ["PATH"]}, cwd="/", check=True)
    marker = os.path.join(env.manager().get("svc").dir, "stop-requested")
    assert os.path.exists(marker)  # a deliberate stop: `cli run` would exit 64, which the unit never restarts on
    assert "RestartPreventExitStatus=64" in text
    subprocess.run(["/usr/bin/python3", "-m", "ansible_collections.daemonless.oci.plugins.module_utils.cli",
                    "start", "svc", "--run-root", env.run_root, "--persist-root", env.persist_root,
                    "--config", env.config], env={"PYTHONPATH": lib, "PATH": os.environ["PATH"]}, cwd="/", check=True)
    assert not os.path.exists(marker)
    after_cli = play_unchanged_unless_library_edited(env, task)
    assert after_cli["container"]["state"] == "running" and after_cli["container"]["attempt"] == 1
    dropped = env.play([container("svc", rootfs=env.rootfs, systemd_unit_dir=env.unit_dir)])[0]
    assert [a["action"] for a in dropped["actions"]] == ["metadata", "unit"]
    assert not os.path.exists(unit)


def test_restart_policy_without_systemd_warns(env):
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("this host runs systemd")
    result = env.play([container("nosd", rootfs=env.rootfs, restart_policy="always")])[0]
    assert any("nothing enforces it" in warning for warning in result.get("warnings", []))
    assert not env.play([container("nosd", rootfs=env.rootfs, restart_policy="always")])[0]["changed"]


def test_image_source_defaults_identity_and_retag(env):
    """An image imported into the store: its config fills the process; a re-tag to another digest recreates."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import ocilayout
    from ansible_collections.daemonless.oci.plugins.module_utils.sources import image_store
    base, top = ocilayout.busybox_layers(ocilayout.busybox_path())
    layout = ocilayout.LayoutBuilder(os.path.join(env.root, "layout"))
    layout.image([base, top], config={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $A; sleep 3600"],
                                      "Env": ["PATH=/bin", "A=from-image"], "WorkingDir": "/tmp", "User": "",
                                      "StopSignal": "", "Labels": {}})
    store = image_store(env.manager().paths)
    store.import_image("oci:{}:latest".format(layout.path), name="bb:test")
    task = {C: {"name": "img", "image": "bb:test", "env": {"B": "mine"}}}
    first = env.play([task])[0]
    assert not first.get("failed"), first
    facts = first["container"]
    assert facts["state"] == "running" and facts["source"]["identity"]["image"] == "bb:test"
    environ = proc_environ(facts["pid"])
    assert "A=from-image" in environ and "B=mine" in environ
    assert os.readlink("/proc/{}/cwd".format(facts["pid"])) == "/tmp"
    with open("/proc/{}/root/etc/motd".format(facts["pid"])) as handle:
        assert handle.read() == "new\n"                       # the top layer wins
    assert not os.path.exists("/proc/{}/root/etc/doomed".format(facts["pid"]))  # whiteout honoured
    assert not env.play([task])[0]["changed"]
    layout2 = ocilayout.LayoutBuilder(os.path.join(env.root, "layout2"))
    layout2.image([base], config={"Cmd": ["sleep", "3600"]})
    store.import_image("oci:{}:latest".format(layout2.path), name="bb:test")
    moved = env.play([task], diff=True)[0]
    assert [a["action"] for a in moved["actions"]] == ["recreate", "start"]
    assert moved["diff"]["before"]["source"]["manifest_digest"] != moved["diff"]["after"]["source"]["manifest_digest"]


def test_runsc_has_no_update_so_a_resource_change_recreates_with_that_reason(env):
    import json
    with open(env.config) as handle:
        if "runsc" not in json.load(handle)["runtimes"]:
            pytest.skip("runsc (gVisor) is not installed")
    task = container("gv", rootfs=env.rootfs, runtime="runsc", memory="64M")
    first = env.play([task])[0]
    assert not first.get("failed"), first
    assert first["container"]["state"] == "running" and first["container"]["runtime_handler"] == "runsc"
    assert not env.play([task])[0]["changed"]
    changed = env.play([container("gv", rootfs=env.rootfs, runtime="runsc", memory="96M")])[0]
    assert [a["action"] for a in changed["actions"]] == ["recreate", "start"]
    assert "cannot update them in place: memory" in changed["actions"][0]["reason"]
    assert changed["container"]["id"] != first["container"]["id"]
