"""Verifier of the vm-* scenarios (testinfra), run after converge, idempotence and a reboot of the VM.

What only a real machine shows: the VM's own kernel, a pure cgroup v2 hierarchy, systemd as pid 1,
and the containers started again by their boot units after the reboot (side_effect.yml). Then what
molecule/default checks on the CI host: the runtime configuration written by roles/runtimes, conmon
(or, for a vm handler, the containerd shim and its monitor) and each container's processes,
root-only state and log files, an exec in a container of every handler, the httpd on its loopback
port, the one-shot job. Which distribution, kernel and handlers to expect comes from the scenario's
inventory (host.ansible.get_variables()), so one file serves every vm-* scenario.

Cost under qemu's software emulation: a plain command goes over testinfra's SSH backend (about a
second); an Ansible module (oci_container_info, oci_exec, the probe script) costs several seconds,
so the host's files and processes are read by one run of molecule/default's probe.py.
"""
from __future__ import annotations

import base64
import datetime
import json
import os

import pytest

PERSIST_ROOT = "/var/lib/daemonless-oci"
RUN_ROOT = "/run/daemonless-oci"
CONFIG = "/etc/daemonless-oci/runtimes.json"
UNIT_DIR = "/etc/systemd/system"
CRUN_WRAPPER_DIR = "/usr/local/libexec/daemonless-oci"
PAGE = "daemonless-oci molecule"
PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "default", "tests", "probe.py")
# The runtime columns of testbed/run-matrix's support table: a case id names one of them.
COLUMNS = ["runc", "crun", "runsc", "vm-shim"]


def call(host, module, args):
    """Run a module on the host for real (testinfra defaults to check mode)."""
    return host.ansible(module, json.dumps(args), check=False)


def unit_path(name):
    return "{}/daemonless-oci-{}.service".format(UNIT_DIR, name)


def unit_name(name):
    return "daemonless-oci-{}.service".format(name)


@pytest.fixture(scope="module")
def scenario(host):
    """The inventory variables: mol_* (what converge declared) and tb_* (the platform's distribution)."""
    return host.ansible.get_variables()


@pytest.fixture(scope="module")
def handlers_by_column(scenario):
    """Support-table column -> the container converge declared for it (runc's is mol-web)."""
    found = {"runc": "mol-web"}
    for runtime in scenario["mol_runtimes"]:
        if runtime != "runc":
            found[runtime] = "mol-sleep-" + runtime
    for handler in scenario["mol_vm_handlers"]:
        found["vm-shim"] = "mol-sleep-" + handler
    return found


@pytest.fixture(scope="module")
def long_running(handlers_by_column):
    return sorted(set(handlers_by_column.values()))


@pytest.fixture(scope="module")
def containers(host, scenario):
    """name -> facts of the scenario's containers, with log tails."""
    result = call(host, "daemonless.oci.oci_container_info",
                  {"filters": {"labels": {"daemonless.oci.group": scenario["mol_group"]}}, "logs": True,
                   "logs_tail": 20})
    assert "containers" in result, result
    return {facts["name"]: facts for facts in result["containers"]}


def state_files(facts):
    directory = "{}/containers/{}".format(PERSIST_ROOT, facts["id"])
    return [directory + "/state.json", directory + "/container.json", facts["log_path"]]


@pytest.fixture(scope="module")
def probe(host, containers):
    """Stats, unit files, the process table and each unit's `status` run, read on the VM at once."""
    paths = [PERSIST_ROOT, RUN_ROOT, CONFIG, CRUN_WRAPPER_DIR, unit_path("mol-job")]
    for facts in containers.values():
        paths += state_files(facts) + [unit_path(facts["name"])]
    units = [unit_path(name) for name in containers if name != "mol-job"]
    request = base64.b64encode(json.dumps({"paths": paths, "read": units, "units": units,
                                           "config": CONFIG}).encode()).decode()
    result = call(host, "ansible.builtin.script", {"cmd": "{} {}".format(PROBE, request), "executable": "python3"})
    assert result.get("rc") == 0, result
    return json.loads(result["stdout"])


# --- the machine itself ------------------------------------------------------------------------

def test_distribution_and_own_kernel(host, scenario):
    """The guest is the distribution asked for, on its own kernel, in a virtual machine."""
    assert host.system_info.distribution == "debian"
    assert host.system_info.codename == scenario["tb_distro"]
    assert host.file("/etc/debian_version").content_string.startswith(scenario["tb_debian_major"])
    assert host.sysctl("kernel.osrelease").startswith(scenario["tb_expected_kernel"])
    assert host.run("systemd-detect-virt --vm").stdout.strip() in ("qemu", "kvm")


def test_cgroup_v2_unified(host):
    """Only a cgroup2 mount: no v1 controllers, unlike the hybrid CI host."""
    cgroup_mounts = [m for m in host.mount_point.get_mountpoints() if m.filesystem in ("cgroup", "cgroup2")]
    assert [(m.path, m.filesystem) for m in cgroup_mounts] == [("/sys/fs/cgroup", "cgroup2")]
    controllers = host.file("/sys/fs/cgroup/cgroup.controllers").content_string.split()
    assert {"cpu", "memory", "pids"} <= set(controllers)


def test_systemd_is_pid1_and_running(host):
    """systemd finished booting without failed units (the boot units of the containers included)."""
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"
    state = host.run("systemctl is-system-running --wait")
    assert state.stdout.strip() == "running", host.run("systemctl --failed --no-legend").stdout


def test_sshd_has_only_the_injected_key(host):
    """The cached image carries no key: the one in authorized_keys came through fw_cfg."""
    keys = host.file("/root/.ssh/authorized_keys")
    assert keys.mode == 0o600
    lines = [ln for ln in keys.content_string.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ssh-ed25519 ")


def test_the_vm_was_rebooted(host, scenario):
    """side_effect.yml kept the boot id of the boot in which converge ran; this is a later boot."""
    before = host.file(scenario["mol_boot_before_file"]).content_string.strip()
    now = host.file("/proc/sys/kernel/random/boot_id").content_string.strip()
    assert before and now and before != now


# --- what the roles configured ------------------------------------------------------------------

def test_runtime_configuration_names_only_runnable_handlers(scenario, probe):
    config = probe["config"]
    assert probe["stat"][CONFIG]["uid"] == 0
    assert sorted(config["runtimes"]) == sorted(scenario["mol_runtimes"] + list(scenario["mol_vm_handlers"]))
    assert config["default_runtime"] == "runc"
    for name, handler in config["runtimes"].items():
        binary = probe["stat"][handler["runtime_path"]]
        assert binary and binary["executable"], "handler {}: {} cannot run".format(name, handler["runtime_path"])
    assert probe["stat"][config["conmon"]]["executable"]
    for name, wanted in scenario["mol_vm_handlers"].items():
        handler = config["runtimes"][name]
        assert handler["runtime_type"] == "vm"
        assert os.path.basename(handler["runtime_path"]) == wanted["shim"]
    assert "kata" not in config["runtimes"]


def test_crun_runs_directly_on_pure_cgroup_v2(scenario, probe):
    """No hybrid layout here, so the role configures crun itself and removes the wrapper."""
    if "crun" not in scenario["mol_runtimes"]:
        pytest.skip("crun is not among this platform's runtimes")
    assert os.path.basename(probe["config"]["runtimes"]["crun"]["runtime_path"]) == "crun"
    assert not probe["config"]["runtimes"]["crun"]["runtime_path"].startswith(CRUN_WRAPPER_DIR)
    assert probe["stat"][CRUN_WRAPPER_DIR] is None


def test_state_directories_are_root_only(probe):
    for path in (PERSIST_ROOT, RUN_ROOT):
        info = probe["stat"][path]
        assert info["kind"] == "dir" and info["uid"] == 0 and info["gid"] == 0, path
        assert info["mode"] == 0o700, "{} has mode {:o}".format(path, info["mode"])


def test_kata_is_reported_not_installed_or_configured(host, scenario, probe):
    """Kata needs a package source that offers it and a KVM that boots a guest; say which is missing."""
    offered = host.run("apt-cache show --no-all-versions kata-containers").rc == 0
    # a /dev/kvm node can exist without a usable KVM (udev makes it statically); the CPU flag tells
    kvm = host.run("grep -qwE 'vmx|svm' /proc/cpuinfo").rc == 0
    if offered and "kata" in probe["config"]["runtimes"]:
        assert probe["config"]["runtimes"]["kata"]["runtime_type"] == "vm"
        return
    assert not offered, "a package source offers kata-containers, but no kata handler is configured"
    pytest.skip("Kata was not installed on {}: no configured package source offers kata-containers, and {}; the "
                "vm runtime type ran through containerd-shim-runc-v2 instead".format(
                    scenario["tb_distro"], "the guest CPU has vmx/svm" if kvm else
                    "the guest CPU has no vmx/svm flag (qemu's software emulation), so no KVM could boot Kata's guest"))


# --- the containers -----------------------------------------------------------------------------

def test_every_container_is_there_with_its_handler(scenario, containers, long_running):
    assert sorted(containers) == sorted(long_running + ["mol-job"])
    for name in long_running:
        assert containers[name]["state"] == "running", containers[name]
    for runtime in scenario["mol_runtimes"]:
        if runtime != "runc":
            assert containers["mol-sleep-" + runtime]["runtime_handler"] == runtime
    for handler in scenario["mol_vm_handlers"]:
        facts = containers["mol-sleep-" + handler]
        assert (facts["runtime_handler"], facts["runtime_type"]) == (handler, "vm")
    for facts in containers.values():
        assert facts["labels"]["daemonless.oci.managed-by"] == "daemonless.oci.containers"


def test_monitor_and_container_processes_are_there(host, probe, containers, long_running):
    """conmon watches each OCI container, the containerd shim and our monitor each vm one."""
    by_pid = {process["pid"]: process for process in probe["processes"]}
    for name in long_running:
        facts = containers[name]
        if facts["runtime_type"] == "vm":
            shims = [p for p in probe["processes"] if p["comm"].startswith("containerd-shim")
                     and facts["id"] in p["args"]]
            monitors = [p for p in probe["processes"] if any("vm_monitor" in arg for arg in p["args"])]
            assert shims, "no containerd shim for " + name
            assert monitors, "no vm monitor for " + name
        else:
            conmons = [p for p in probe["processes"] if p["comm"] == "conmon" and facts["id"] in p["args"]]
            assert conmons, "no conmon for " + name
        init = by_pid.get(facts["pid"])
        assert init is not None, "init pid {} of {} is gone".format(facts["pid"], name)
        assert init["start_time"] == str(facts["pid_start_time"]), "pid {} was reused".format(facts["pid"])
        cgroup = host.file("/proc/{}/cgroup".format(facts["pid"])).content_string.splitlines()
        assert len(cgroup) == 1 and cgroup[0].startswith("0::/"), "{} is not in a v2 leaf: {}".format(name, cgroup)
    assert "httpd" in by_pid[containers["mol-web"]["pid"]]["args"]


def test_state_and_log_files_exist_root_only(probe, containers):
    for name, facts in containers.items():
        for path in state_files(facts):
            info = probe["stat"][path]
            assert info and info["kind"] == "file", "{}: {} is missing".format(name, path)
            assert info["uid"] == 0, path
            assert not info["mode"] & 0o077, "{} is open to others ({:o})".format(path, info["mode"])


@pytest.mark.parametrize("column", COLUMNS)
def test_exec_answers_in_a_container_of_each_handler(host, handlers_by_column, column):
    if column not in handlers_by_column:
        pytest.skip("{} is not among this platform's handlers".format(column))
    result = call(host, "daemonless.oci.oci_exec",
                  {"name": handlers_by_column[column], "argv": ["cat", "/www/index.html"], "timeout": 60})
    assert result.get("rc") == 0, {key: result.get(key) for key in ("rc", "msg", "stdout", "stderr", "timed_out")}
    assert result["stdout"] == PAGE


def test_service_answers_on_its_loopback_port(host, scenario):
    url = "http://127.0.0.1:{}/".format(scenario["mol_port"])
    result = host.run("python3 -c %s %s", "import sys, urllib.request as u; "
                      "sys.stdout.write(u.urlopen(sys.argv[1], timeout=20).read().decode())", url)
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == PAGE


def test_job_ran_once_to_completion(containers):
    """Before the reboot, and not again after it: a one-shot job has no boot unit."""
    job = containers["mol-job"]
    assert job["state"] == "stopped"
    assert job["exit_code"] == 0
    assert [line["text"] for line in job["logs"]] == ["job done"]


# --- after the reboot ---------------------------------------------------------------------------

def boot_time(host):
    """The VM's boot time (UTC) from /proc/stat's btime."""
    for line in host.file("/proc/stat").content_string.splitlines():
        if line.startswith("btime "):
            return datetime.datetime.fromtimestamp(int(line.split()[1]), datetime.timezone.utc)
    raise AssertionError("no btime in /proc/stat")


def started_at(facts):
    """A container's started_at (RFC 3339 with nanoseconds, UTC) as a datetime."""
    text = facts["started_at"].rstrip("Z")
    stamp, _dot, fraction = text.partition(".")
    parsed = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return parsed + datetime.timedelta(microseconds=int((fraction + "000000")[:6]))


def test_systemd_restarted_the_containers_after_the_reboot(host, probe, containers, long_running):
    """Each long-running container's unit is enabled and active, and started it in this boot."""
    booted = boot_time(host)
    for name in long_running:
        service = host.service(unit_name(name))
        assert service.is_enabled, unit_name(name)
        assert service.is_running, host.run("systemctl status --no-pager %s", unit_name(name)).stdout
        assert "Restart=always" in probe["content"][unit_path(name)]
        assert started_at(containers[name]) >= booted, "{} started at {}, before the boot at {}".format(
            name, containers[name]["started_at"], booted)
        status = probe["units"][unit_path(name)]
        assert status["rc"] == 0, "the unit of {} cannot run its command: {}".format(name, status["stderr"])
        assert json.loads(status["stdout"])["state"] == "running"
    assert probe["stat"][unit_path("mol-job")] is None
