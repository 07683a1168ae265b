"""Verifier of molecule/default and molecule/distros (testinfra, through the Ansible inventory).

Checks what converge.yml declared, on the host it ran against: the runtime configuration written by
roles/runtimes, conmon and each container's processes, root-only state and log files, an exec in a
container of every runtime, the httpd on its loopback port, the one-shot job, and the boot units
(whose own command line is run). Host facts come from one run of probe.py, so a host reached through
Ansible's podman connection costs a handful of Ansible calls, not one per file.
"""
import base64
import json
import os

import pytest

PERSIST_ROOT = "/var/lib/daemonless-oci"
RUN_ROOT = "/run/daemonless-oci"
CONFIG = "/etc/daemonless-oci/runtimes.json"
UNIT_DIR = "/etc/systemd/system"
PAGE = "daemonless-oci molecule"
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py")


def call(host, module, args):
    """Run a module on the host for real (testinfra defaults to check mode)."""
    return host.ansible(module, json.dumps(args), check=False)


@pytest.fixture(scope="module")
def scenario(host):
    """The scenario's inventory variables (mol_runtimes, mol_runtimes_left_out, mol_port, mol_rootfs, mol_group)."""
    return host.ansible.get_variables()


@pytest.fixture(scope="module")
def long_running(scenario):
    return ["mol-web"] + ["mol-sleep-" + runtime for runtime in scenario["mol_runtimes"]]


@pytest.fixture(scope="module")
def containers(host, scenario):
    """name -> facts of the scenario's containers, with log tails."""
    result = call(host, "daemonless.oci.oci_container_info",
                  {"filters": {"labels": {"daemonless.oci.group": scenario["mol_group"]}}, "logs": True,
                   "logs_tail": 20})
    return {facts["name"]: facts for facts in result["containers"]}


def state_files(facts):
    directory = "{}/containers/{}".format(PERSIST_ROOT, facts["id"])
    return [directory + "/state.json", directory + "/container.json", facts["log_path"]]


def unit_path(name):
    return "{}/daemonless-oci-{}.service".format(UNIT_DIR, name)


@pytest.fixture(scope="module")
def probe(host, containers):
    """Stats, file contents, the process table and each unit's status run, read on the host at once."""
    paths = [PERSIST_ROOT, RUN_ROOT, CONFIG, unit_path("mol-job")]
    for facts in containers.values():
        paths += state_files(facts) + [unit_path(facts["name"])]
    units = [unit_path(name) for name in containers if name != "mol-job"]
    request = base64.b64encode(json.dumps({"paths": paths, "read": units, "units": units, "config": CONFIG}).encode()).decode()
    result = call(host, "ansible.builtin.script", {"cmd": "{} {}".format(PROBE, request), "executable": "python3"})
    assert result.get("rc") == 0, result
    return json.loads(result["stdout"])


def test_runtime_configuration_names_only_runnable_handlers(scenario, probe):
    config = probe["config"]
    assert probe["stat"][CONFIG]["uid"] == 0
    assert sorted(config["runtimes"]) == sorted(scenario["mol_runtimes"])
    assert config["default_runtime"] == "runc"
    for name, handler in config["runtimes"].items():
        binary = probe["stat"][handler["runtime_path"]]
        assert binary and binary["executable"], "handler {}: {} cannot run".format(name, handler["runtime_path"])
    assert probe["stat"][config["conmon"]]["executable"]
    if "runsc" in config["runtimes"]:
        assert config["runtimes"]["runsc"]["runtime_args"] == ["--platform=ptrace", "--network=none"]


def test_state_directories_are_root_only(probe):
    for path in (PERSIST_ROOT, RUN_ROOT):
        info = probe["stat"][path]
        assert info["kind"] == "dir" and info["uid"] == 0 and info["gid"] == 0, path
        assert info["mode"] == 0o700, "{} has mode {:o}".format(path, info["mode"])


def test_every_container_is_there_with_its_runtime(scenario, containers, long_running):
    assert sorted(containers) == sorted(long_running + ["mol-job"])
    for name in long_running:
        assert containers[name]["state"] == "running", containers[name]
    for runtime in scenario["mol_runtimes"]:
        assert containers["mol-sleep-" + runtime]["runtime_handler"] == runtime
    for facts in containers.values():
        assert facts["labels"]["daemonless.oci.managed-by"] == "daemonless.oci.containers"


def test_conmon_and_container_processes_are_there(probe, containers, long_running):
    by_pid = {process["pid"]: process for process in probe["processes"]}
    conmons = [process for process in probe["processes"] if process["comm"] == "conmon"]
    for name in long_running:
        facts = containers[name]
        assert any(facts["id"] in process["args"] for process in conmons), "no conmon for " + name
        init = by_pid.get(facts["pid"])
        assert init is not None, "init pid {} of {} is gone".format(facts["pid"], name)
        assert init["start_time"] == str(facts["pid_start_time"]), "pid {} was reused".format(facts["pid"])
    assert "httpd" in by_pid[containers["mol-web"]["pid"]]["args"]


def test_state_and_log_files_exist_root_only(probe, containers):
    for name, facts in containers.items():
        for path in state_files(facts):
            info = probe["stat"][path]
            assert info and info["kind"] == "file", "{}: {} is missing".format(name, path)
            assert info["uid"] == 0, path
            assert not info["mode"] & 0o077, "{} is open to others ({:o})".format(path, info["mode"])


@pytest.mark.parametrize("runtime", ["runc", "crun", "runsc"])
def test_exec_answers_in_a_container_of_each_runtime(host, scenario, runtime):
    if runtime not in scenario["mol_runtimes"]:
        reason = scenario.get("mol_runtimes_left_out", {}).get(runtime, "not among this platform's runtimes")
        pytest.skip("{}: {}".format(runtime, reason))
    result = call(host, "daemonless.oci.oci_exec",
                  {"name": "mol-sleep-" + runtime, "argv": ["cat", "/www/index.html"], "timeout": 30})
    assert result.get("rc") == 0, {key: result.get(key) for key in ("rc", "msg", "stdout", "stderr", "timed_out")}
    assert result["stdout"] == PAGE


def test_service_answers_on_its_loopback_port(host, scenario):
    url = "http://127.0.0.1:{}/".format(scenario["mol_port"])
    result = call(host, "ansible.builtin.uri", {"url": url, "return_content": True, "timeout": 10})
    assert result.get("status") == 200, result
    assert result["content"].strip() == PAGE


def test_job_ran_once_to_completion(containers):
    job = containers["mol-job"]
    assert job["state"] == "stopped"
    assert job["exit_code"] == 0
    assert [line["text"] for line in job["logs"]] == ["job done"]


def test_boot_units_run_the_stored_container(probe, long_running):
    """Each long-running container has a unit, and the unit's own command line works without Ansible."""
    for name in long_running:
        path = unit_path(name)
        info = probe["stat"][path]
        assert info and info["uid"] == 0 and info["mode"] == 0o644, path
        assert "Restart=always" in probe["content"][path]
        status = probe["units"][path]
        assert status["rc"] == 0, "the unit of {} cannot run its command: {}".format(name, status["stderr"])
        facts = json.loads(status["stdout"])
        assert facts["state"] == "running", {key: facts.get(key) for key in ("pid", "exit_code", "error")}
    assert probe["stat"][unit_path("mol-job")] is None
