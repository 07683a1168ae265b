"""Stats of real containers doing known work, checked against what the work must cost and
against ``runc events --stats`` for the same container.

Containers are run with the raw runtime CLI (``runc run -d``), each with an ABSOLUTE
``cgroupsPath`` under /dloci-stats-test (a relative path would be resolved against this test's own
cgroup, per controller). Every container, cgroup and temporary directory is removed at teardown.

What runs where: cgroup v1 is this machine's layout (plus a cgroup2 mount that holds only
``hugetlb``). The v2 ``cpu.stat`` reader is checked against the real kernel file of the same
container in that cgroup2 mount; the other v2 readers (memory, pids, io) can only be checked on
canned files here (tests/unit), because every other controller is bound to v1 on this host.

Run as root, under the subreaper so that exited container processes are reaped at once:
    python3 tests/tools/subreaper.py python3 -m pytest tests/functional/test_stats_real.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import cgroups, stats
from ansible_collections.daemonless.oci.plugins.module_utils.errors import NotFoundError
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import (
    ProcessIdentity,
    run_command,
    start_time,
    wait_child,
)

MIB = 1024 * 1024
CGROUP_PARENT = "dloci-stats-test"
HERE = os.path.dirname(os.path.abspath(__file__))
CRUN_NS_TOOL = os.path.join(os.path.dirname(HERE), "tools", "crun-private-ns.sh")
BURN = "while :; do :; done"


class RawContainer:
    """One container run by a runtime CLI directly, with the identity stats needs."""

    def __init__(self, runtime: List[str], root: str, work: str, rootfs: str, name: str, args: List[str],
                 *, mounts: Optional[List[Dict[str, Any]]] = None, resources: Optional[Dict[str, Any]] = None,
                 host_network: bool = False) -> None:
        self.runtime, self.root, self.name = runtime, root, name
        self.bundle = os.path.join(work, name)
        os.makedirs(self.bundle)
        self.cgroups_path = "/{}/{}".format(CGROUP_PARENT, name)
        self._write_config(rootfs, args, mounts or [], resources or {}, host_network)
        self.pid = self._run()
        self.identity = ProcessIdentity(self.pid, start_time(self.pid))

    def _write_config(self, rootfs: str, args: List[str], mounts: List[Dict[str, Any]],
                      resources: Dict[str, Any], host_network: bool) -> None:
        subprocess.run(["runc", "spec", "--bundle", self.bundle], check=True)
        path = os.path.join(self.bundle, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        config["root"] = {"path": rootfs, "readonly": True}
        config["process"]["terminal"] = False
        config["process"]["args"] = args
        config["mounts"].extend(mounts)
        config["linux"]["cgroupsPath"] = self.cgroups_path
        config["linux"].setdefault("resources", {}).update(resources)
        if host_network:
            config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
        with open(path, "w") as handle:
            json.dump(config, handle)

    def _run(self) -> int:
        """``run -d`` hands its stdio to the container: give it /dev/null and a file, never a pipe."""
        pid_file = os.path.join(self.bundle, "pid")
        with open(os.path.join(self.bundle, "run.err"), "wb") as err:
            proc = subprocess.Popen(self.runtime + ["--root", self.root, "run", "--detach", "--bundle", self.bundle,
                                                    "--pid-file", pid_file, self.name],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            code = wait_child(proc, 60)
        if code != 0:
            with open(os.path.join(self.bundle, "run.err")) as handle:
                raise AssertionError("{} run failed ({}): {}".format(self.runtime[-1], code, handle.read()))
        with open(pid_file) as handle:
            return int(handle.read().strip())

    def target(self, host_network: bool = False) -> stats.StatsTarget:
        return stats.StatsTarget(self.pid, self.identity.start_time, self.name, host_network)

    def collect(self) -> stats.ContainerStats:
        return stats.collect(self.pid, self.identity.start_time, host_network=False, container_id=self.name)

    def exec(self, *argv: str) -> bytes:
        return run_command(self.runtime + ["--root", self.root, "exec", self.name] + list(argv), timeout=60).stdout

    def events(self) -> Dict[str, Any]:
        """``runc events --stats``: the runtime's own reading of the same cgroup."""
        out = run_command(self.runtime + ["--root", self.root, "events", "--stats", self.name], timeout=60).stdout
        return json.loads(out)["data"]

    def remove(self) -> None:
        subprocess.run(self.runtime + ["--root", self.root, "delete", "--force", self.name],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        self.identity.wait_gone(10)


def remove_cgroup_dirs(relative: str) -> None:
    """rmdir a test cgroup in every hierarchy, the cgroup2 mount of a hybrid host included."""
    mounts = cgroups.host_mounts()
    dirs = cgroups.cgroup_dirs_for(mounts, relative)
    if mounts.unified:
        dirs.append(os.path.join(mounts.unified, relative.strip("/")))
    for _unused in range(50):
        cgroups.remove_dirs(dirs)
        if not any(os.path.isdir(path) for path in dirs):
            return
        time.sleep(0.1)


@pytest.fixture(scope="module")
def env(busybox_rootfs: str) -> Iterator[Dict[str, str]]:
    if not shutil.which("runc"):
        pytest.skip("runc is not installed")
    work = tempfile.mkdtemp(prefix="dloci-stats-", dir="/tmp")
    yield {"work": work, "rootfs": busybox_rootfs, "root": os.path.join(work, "state")}
    remove_cgroup_dirs(CGROUP_PARENT)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def spawn(env: Dict[str, str]) -> Iterator[Any]:
    """Start containers for one test; all of them, and their cgroups, are removed afterwards."""
    made: List[RawContainer] = []

    def start(args: List[str], runtime: Optional[List[str]] = None, **options: Any) -> RawContainer:
        name = "st{}-{}".format(os.getpid(), len(os.listdir(env["work"])))
        container = RawContainer(runtime or ["runc"], env["root"] if not runtime else env["root"] + "-" +
                                 os.path.basename(runtime[0]), env["work"], env["rootfs"], name, args, **options)
        made.append(container)
        return container

    yield start
    for container in made:
        container.remove()
        remove_cgroup_dirs(container.cgroups_path)


def sample_when(collect: Any, accept: Any) -> Any:
    """A predicate for ``wait_for``: the sample ``collect()`` returns, once ``accept`` takes it."""
    def attempt() -> Any:
        sample = collect()
        return sample if accept(sample) else None
    return attempt


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    """Re-check a condition on a container that is still settling (a shell forking children)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# ------------------------------------------------------------------ CPU

def _proc_cpu_ticks(pid: int) -> int:
    """utime + stime of one process from /proc/PID/stat (fields 14 and 15)."""
    with open("/proc/{}/stat".format(pid)) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def sample_burner(burner: RawContainer, interval: float) -> stats.ContainerStats:
    """Two samples over ``interval`` of a container whose init is a busy loop; percent checked.

    One busy loop is at most one core. On a shared machine it may get much less, so the reference
    is the burner's own utime+stime over the same interval (/proc/PID/stat, USER_HZ ticks).
    """
    ticks_before, wall_before = _proc_cpu_ticks(burner.pid), time.monotonic()
    (sample,) = stats.collect_many([burner.target()], interval=interval)
    ticks_after, wall_after = _proc_cpu_ticks(burner.pid), time.monotonic()
    assert sample.running and sample.cpu is not None
    own = (ticks_after - ticks_before) / os.sysconf("SC_CLK_TCK") / (wall_after - wall_before) * 100
    assert 5.0 <= sample.cpu <= 105.0, sample.cpu
    assert abs(sample.cpu - own) <= 12.0, (sample.cpu, own)
    return sample


def test_cpu_burner_uses_one_core(spawn: Any) -> None:
    burner = spawn(["sh", "-c", BURN])  # the shell is the container's init and burns itself
    sample = sample_burner(burner, 1.0)
    events = burner.events()
    assert events["cpu"]["usage"]["total"] >= sample.cpu_nano  # runc read it later: it can only have grown
    assert events["cpu"]["usage"]["total"] - sample.cpu_nano < 0.5e9
    # the same counters as runc reads them a few ms later (cpuacct.stat, 10 ms ticks)
    assert 0 <= events["cpu"]["usage"]["user"] - sample.cpu_user_nano < 0.15e9
    assert abs(events["cpu"]["usage"]["kernel"] - sample.cpu_system_nano) < 0.15e9
    assert sample.cpu_user_nano + sample.cpu_system_nano == pytest.approx(sample.cpu_nano, abs=0.05e9)


def test_cpu_usage_grows_by_the_burned_second(spawn: Any) -> None:
    """Burn for one wall second inside the container; usage grows by the CPU time the burner itself reports.

    On a shared machine the burner may get less than a full core, so the reference figure is the
    burner's own user+sys time (busybox ``time -p``, 10 ms resolution), not the wall second.
    """
    container = spawn(["sleep", "3600"])
    before = container.collect()
    result = run_command(container.runtime + ["--root", container.root, "exec", container.name, "sh", "-c",
                                              "time -p timeout 1 sh -c '{}'; exit 0".format(BURN)], timeout=60)
    after = container.collect()
    report = dict(line.split() for line in result.stderr.decode().splitlines() if len(line.split()) == 2)
    burned = float(report["user"]) + float(report["sys"])
    grown = (after.cpu_nano - before.cpu_nano) / 1e9
    assert 0.05 <= burned <= 1.1, report
    assert burned - 0.03 <= grown <= burned + 0.15, (grown, burned)


def test_v2_cpu_stat_reader_on_the_real_cgroup2_file(spawn: Any) -> None:
    """On a hybrid host runc also makes the container's cgroup in the cgroup2 mount; its cpu.stat is real v2."""
    mounts = cgroups.host_mounts()
    if not mounts.unified:
        pytest.skip("no cgroup2 mount on this host")
    burner = spawn(["sh", "-c", BURN])
    time.sleep(0.3)
    mapping = cgroups.process_cgroups(burner.pid)
    if mounts.mode == "v2":
        pytest.skip("unified host: the full v2 path is exercised by the other tests")
    unified_dir = cgroups.controller_dir(mounts, mapping, cgroups.UNIFIED)
    if not unified_dir or mapping.get(cgroups.UNIFIED) == "/" or \
            not os.path.exists(os.path.join(unified_dir, "cpu.stat")):
        pytest.skip("the container has no own cgroup in the cgroup2 mount")
    v2 = stats.ContainerStats()
    stats._read_cpu(v2, ("v2", unified_dir, unified_dir))
    v1 = burner.collect()
    assert v2.cpu_nano > 0 and v2.cpu_user_nano + v2.cpu_system_nano > 0
    assert abs(v1.cpu_nano - v2.cpu_nano) < 0.1e9, (v1.cpu_nano, v2.cpu_nano)


# ------------------------------------------------------------------ memory

def test_memory_grows_by_64_mib(spawn: Any) -> None:
    """64 MiB written to a tmpfs inside the container are charged to its memory cgroup (shmem)."""
    tmpfs = {"destination": "/mem", "type": "tmpfs", "source": "tmpfs", "options": ["size=128m", "mode=1777"]}
    container = spawn(["sleep", "3600"], mounts=[tmpfs])
    before = container.collect()
    container.exec("dd", "if=/dev/zero", "of=/mem/blob", "bs=1M", "count=64")
    after = container.collect()
    grown_usage = (after.mem_usage - before.mem_usage) / MIB
    grown_ws = (after.working_set_bytes - before.working_set_bytes) / MIB
    # v1 usage_in_bytes is fuzzy by the per-CPU charge batches, and the exec's own pages come and go
    assert 60 <= grown_usage <= 72, grown_usage
    assert 60 <= grown_ws <= 72, grown_ws
    assert after.mem_limit == stats.host_memory_bytes() and after.mem_raw_limit is None
    assert after.mem_perc == pytest.approx(after.mem_usage / after.mem_limit)
    events = container.events()["memory"]
    assert abs(events["usage"]["usage"] - after.mem_usage) < 2 * MIB
    assert abs(events["cache"] - after.mem_cache) < 2 * MIB


def test_memory_limit_and_percent(spawn: Any) -> None:
    container = spawn(["sleep", "3600"], resources={"memory": {"limit": 256 * MIB}})
    sample = container.collect()
    assert sample.mem_raw_limit == 256 * MIB and sample.mem_limit == 256 * MIB
    assert sample.mem_perc == pytest.approx(sample.mem_usage / (256 * MIB))
    assert sample.to_dict()["memory"]["percent"] == round(sample.mem_perc * 100, 2)


def test_memory_cgroup_is_read_where_the_kernel_put_it(spawn: Any) -> None:
    """The memory path comes from /proc/PID/cgroup (on this host it may differ from the others)."""
    container = spawn(["sleep", "3600"])
    sample = container.collect()
    expected = cgroups.controller_dir(cgroups.host_mounts(), cgroups.process_cgroups(container.pid), "memory")
    if expected is None:
        expected = cgroups.controller_dir(cgroups.host_mounts(), cgroups.process_cgroups(container.pid),
                                          cgroups.UNIFIED)
    assert sample.cgroup_paths["memory"] == expected
    assert sample.cgroup_paths["memory"].endswith(container.cgroups_path)


# ------------------------------------------------------------------ pids

def test_twenty_sleepers_make_21_pids(spawn: Any) -> None:
    container = spawn(["sh", "-c", "for i in $(seq 20); do sleep 3600 & done; wait"],
                      resources={"pids": {"limit": 64}})
    sample = wait_for(sample_when(container.collect, lambda s: s.pids == 21))
    assert sample is not None, "pids never reached 21"
    assert sample.pids_limit == 64
    assert container.events()["pids"]["current"] == 21


# ------------------------------------------------------------------ block I/O

def _block_device_of(path: str) -> Optional[str]:
    """``MAJ:MIN`` of the whole disk under ``path``, or None when it is not on a block device."""
    dev = os.stat(path).st_dev
    key = "{}:{}".format(os.major(dev), os.minor(dev))
    sys_path = "/sys/dev/block/" + key
    if os.major(dev) == 0 or not os.path.exists(sys_path):
        return None
    if os.path.exists(os.path.join(sys_path, "partition")):
        with open(os.path.join(sys_path, "..", "dev")) as handle:
            return handle.read().strip()
    return key


def test_direct_write_of_10_mib(spawn: Any, env: Dict[str, str]) -> None:
    """10 MiB written with O_DIRECT to a bind-mounted directory on a real disk.

    Kernel >= 6.10 counts v1 ``blkio.throttle.*`` only on devices where blk-throttle is active,
    i.e. where some cgroup set a throttle limit. The container therefore carries a write limit of
    1 TiB/s on that disk (never reached), as any container with a blockIO limit would.
    """
    data = os.path.join(env["work"], "data-{}".format(time.monotonic_ns()))
    os.makedirs(data)
    device = _block_device_of(data)
    if device is None:
        pytest.skip("{} is not on a block device (tmpfs or overlay): block I/O would honestly read 0".format(data))
    major, minor = (int(part) for part in device.split(":"))
    limit = {"blockIO": {"throttleWriteBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 40}]}}
    bind = {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}
    container = spawn(["sleep", "3600"], mounts=[bind], resources=limit)
    before = container.collect()
    container.exec("dd", "if=/dev/zero", "of=/data/f", "bs=1M", "count=10", "oflag=direct")
    after = container.collect()
    written = after.block_devices[device].write_bytes - (before.block_devices.get(device) or
                                                         stats.BlockDeviceStats(major, minor)).write_bytes
    assert 10 * MIB <= written <= 11 * MIB, written
    assert after.block_devices[device].write_ops >= 10
    assert after.block_output == sum(entry.write_bytes for entry in after.block_devices.values())
    recorded = [entry for entry in container.events()["blkio"]["ioServiceBytesRecursive"]
                if entry.get("op") == "Write" and "{}:{}".format(entry["major"], entry.get("minor", 0)) == device]
    assert recorded and recorded[0]["value"] == after.block_devices[device].write_bytes


# ------------------------------------------------------------------ network

def test_one_mib_over_loopback_in_own_netns(spawn: Any) -> None:
    container = spawn(["sleep", "3600"])
    before = container.collect()
    # busybox nc closes the connection when its own stdin ends: keep the listener's stdin open
    container.exec("sh", "-c", "(sleep 3 | nc -l -p 9000) >/dev/null 2>&1 & sleep 0.3; "
                               "dd if=/dev/zero bs=1024 count=1024 2>/dev/null | nc 127.0.0.1 9000; sleep 0.2")
    after = container.collect()
    assert after.host_network is False and set(after.networks) == {"lo"}
    rx = after.networks["lo"].rx_bytes - before.networks["lo"].rx_bytes
    tx = after.networks["lo"].tx_bytes - before.networks["lo"].tx_bytes
    assert MIB <= rx <= MIB + 64 * 1024 and MIB <= tx <= MIB + 64 * 1024, (rx, tx)
    inside = stats.parse_net_dev(container.exec("cat", "/proc/net/dev").decode())
    assert inside["lo"].rx_bytes == after.networks["lo"].rx_bytes  # nothing else talks in that netns
    assert after.net_input == after.networks["lo"].rx_bytes


def test_host_network_container_says_so(spawn: Any) -> None:
    container = spawn(["sleep", "3600"], host_network=True)
    sample = container.collect()
    assert sample.host_network is True and sample.networks == {} and sample.net_input == 0
    assert sample.to_dict()["network"] is None


# ------------------------------------------------------------------ lifecycle edges

def test_stopped_container_reads_as_stopped(spawn: Any) -> None:
    container = spawn(["sleep", "3600"])
    target = container.target()
    subprocess.run(["runc", "--root", container.root, "kill", container.name, "KILL"], check=True)
    assert container.identity.wait_gone(10)
    (sample,) = stats.collect_many([target])
    assert sample.running is False and sample.to_dict() == {
        "id": container.name, "status": "stopped", "timestamp": sample.timestamp, "timestamp_ns": sample.system_nano}
    with pytest.raises(NotFoundError):
        container.collect()


def test_many_containers_in_one_call(spawn: Any) -> None:
    containers = [spawn(["sleep", "3600"]) for _unused in range(3)]
    started = time.monotonic()
    samples = stats.collect_many([c.target() for c in containers], interval=0.2)
    assert time.monotonic() - started < 1.0  # one sleep for all, not one per container
    assert [s.container for s in samples] == [c.name for c in containers]
    assert all(s.running and s.cpu is not None and s.pids == 1 for s in samples)


# ------------------------------------------------------------------ other runtimes

@pytest.fixture(scope="module")
def crun_wrapper(env: Dict[str, str]) -> Iterator[List[str]]:
    """crun 1.8 refuses this host's hybrid layout; run it in a private mount namespace (host mounts untouched)."""
    if not shutil.which("crun"):
        pytest.skip("crun is not installed")
    directory = os.path.join(env["work"], "crun-ns")
    wrapper = subprocess.check_output(["bash", CRUN_NS_TOOL, "setup", directory]).decode().strip()
    yield [wrapper]
    subprocess.run(["bash", CRUN_NS_TOOL, "teardown", directory], check=False)


def test_crun_container(spawn: Any, crun_wrapper: List[str]) -> None:
    container = spawn(["sh", "-c", "for i in $(seq 20); do sleep 3600 & done; " + BURN], runtime=crun_wrapper)
    sample = wait_for(sample_when(container.collect, lambda s: s.pids == 21))
    assert sample is not None and sample.cgroup_paths["memory"].endswith(container.cgroups_path)
    burning = sample_burner(container, 0.5)
    assert burning.mem_usage > 0 and burning.sandbox == ""


def test_runsc_sandbox(spawn: Any) -> None:
    """runsc puts the sandbox (its host process is the container's pid) in the cgroupsPath given."""
    if not shutil.which("runsc"):
        pytest.skip("runsc is not installed")
    runsc = [shutil.which("runsc"), "--network=none", "--platform=ptrace"]
    container = spawn(["sh", "-c", BURN], runtime=runsc)
    (sample,) = stats.collect_many([container.target()], interval=0.5)
    assert sample.sandbox == "gvisor"
    assert sample.cgroup_paths["cpu"].endswith(container.cgroups_path)
    # the guest's busy loop runs in the sandbox's cgroup (Sentry threads: may exceed one core)
    assert sample.cpu is not None and 5 < sample.cpu <= 205
    assert sample.mem_usage > 1 * MIB and sample.pids > 1  # the Sentry's host threads, not guest processes
    assert sample.network_available is False and sample.to_dict()["network"] is None
    assert any("gVisor" in warning for warning in sample.warnings)


# ------------------------------------------------------------------ through the container manager

def test_runtime_container_stats_through_the_manager(manager: Any, busybox_rootfs: str, handler: str) -> None:
    """``Runtime.container_stats`` (the reference's ContainerStats) on a managed container, per handler."""
    from ansible_collections.daemonless.oci.plugins.module_utils.manager import CreateRequest
    from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
    spec = default_spec(busybox_rootfs, ["sh", "-c", "for i in $(seq 4); do sleep 3600 & done; wait"],
                        readonly_root=True)
    container = manager.create(CreateRequest(name="stats-" + handler, spec=spec, handler=handler))
    manager.start(container)
    sample = wait_for(sample_when(lambda: manager.runtime.container_stats(container, ""), lambda s: s.pids >= 5))
    assert sample is not None and sample.running and sample.container == container.id
    assert sample.mem_usage > 0 and sample.cpu_nano > 0
    assert sample.cgroup_paths["memory"].rstrip("/").endswith(container.id)
    if handler == "runsc":
        assert sample.sandbox == "gvisor" and sample.network_available is False
    else:
        assert sample.pids == 5 and set(sample.networks) == {"lo"}
    manager.stop(container, timeout=0)
    assert manager.runtime.container_stats(container, "").to_dict()["status"] == "stopped"


# ------------------------------------------------------------------ cgroup v2 on a testbed VM (opt-in)

TESTBED_VM = os.path.join(os.path.dirname(os.path.dirname(HERE)), "testbed", "vm")
VM_NAME = "dloci-stats-v2"
# Runs inside the VM (pure cgroup v2, systemd as pid 1) with the guest's python3 and the
# library copied in: the same known work as above, then one library pass and runc's own view.
GUEST_SCRIPT = r'''
import json, os, shutil, subprocess, sys, time
work = sys.argv[1]
sys.path.insert(0, work + "/colls")
from ansible_collections.daemonless.oci.plugins.module_utils import cgroups, procutil, stats
runc = [work + "/runc", "--root", work + "/state"]
rootfs = work + "/rootfs"
burn = "while :; do :; done"

def start(name, args, mounts=()):
    bundle = work + "/b-" + name
    os.makedirs(bundle)
    subprocess.run([work + "/runc", "spec", "--bundle", bundle], check=True)
    with open(bundle + "/config.json") as handle:
        config = json.load(handle)
    config["root"] = {"path": rootfs, "readonly": True}
    config["process"].update(terminal=False, args=args)
    config["mounts"].extend(mounts)
    config["linux"]["cgroupsPath"] = "/dloci-stats-v2/" + name
    with open(bundle + "/config.json", "w") as handle:
        json.dump(config, handle)
    proc = subprocess.Popen(runc + ["run", "--detach", "--bundle", bundle, "--pid-file", bundle + "/pid", name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(bundle + "/err", "wb"))
    assert procutil.wait_child(proc, 300) == 0, open(bundle + "/err").read()
    pid = procutil.read_pid_file(bundle + "/pid")
    return stats.StatsTarget(pid, procutil.start_time(pid), name)

def run(*argv):
    return subprocess.run(list(argv), check=True, stdout=subprocess.PIPE).stdout

os.makedirs(rootfs + "/bin")
for directory in ("proc", "sys", "dev", "tmp"):
    os.makedirs(rootfs + "/" + directory)
shutil.copy(work + "/busybox", rootfs + "/bin/busybox")
for applet in run(work + "/busybox", "--list").decode().split():
    if applet != "busybox":
        os.symlink("busybox", rootfs + "/bin/" + applet)
os.makedirs("/root/dloci-data", exist_ok=True)
data = os.stat("/root/dloci-data").st_dev
targets = [start("burn", ["sh", "-c", burn]),
           start("mem", ["sleep", "3600"], [{"destination": "/mem", "type": "tmpfs", "source": "tmpfs",
                                             "options": ["size=128m"]}]),
           start("pids", ["sh", "-c", "for i in $(seq 20); do sleep 3600 & done; wait"]),
           start("net", ["sleep", "3600"]),
           start("io", ["sleep", "3600"], [{"destination": "/data", "type": "bind", "source": "/root/dloci-data",
                                            "options": ["rbind", "rw"]}])]
time.sleep(1)
out = {"device": "{}:{}".format(os.major(data), os.minor(data)), "mode": cgroups.host_mounts().mode}
out["before"] = {s.container: s.to_dict() for s in stats.collect_many(targets)}
run(*runc, "exec", "mem", "dd", "if=/dev/zero", "of=/mem/blob", "bs=1M", "count=64")
run(*runc, "exec", "net", "sh", "-c", "(sleep 5 | nc -l -p 9000) >/dev/null 2>&1 & sleep 1; "
    "dd if=/dev/zero bs=1024 count=1024 2>/dev/null | nc 127.0.0.1 9000; sleep 0.5")
run(*runc, "exec", "io", "dd", "if=/dev/zero", "of=/data/f", "bs=1M", "count=10", "oflag=direct")
out["after"] = {s.container: s.to_dict() for s in stats.collect_many(targets, interval=2.0)}
out["events"] = {t.container_id: json.loads(run(*runc, "events", "--stats", t.container_id))["data"] for t in targets}
for target in targets:
    subprocess.run(runc + ["delete", "--force", target.container_id], check=False)
print(json.dumps(out))
'''


def _vm(*argv: str, stdin: Optional[bytes] = None, timeout: float = 900) -> bytes:
    return run_command(["python3", TESTBED_VM] + list(argv), input_data=stdin, timeout=timeout).stdout


def _library_tarball() -> bytes:
    """The four library files the guest needs, laid out as a collection, plus runc and busybox."""
    import io
    import tarfile
    buffer = io.BytesIO()
    repo = os.path.dirname(os.path.dirname(HERE))
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("__init__.py", "cgroups.py", "errors.py", "procutil.py", "stats.py"):
            source = os.path.join(repo, "plugins", "module_utils", name)
            if os.path.exists(source):
                tar.add(source, "colls/ansible_collections/daemonless/oci/plugins/module_utils/" + name)
        tar.add(shutil.which("runc"), "runc")
        tar.add(shutil.which("busybox"), "busybox")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def v2_vm_result() -> Iterator[Dict[str, Any]]:
    if os.environ.get("DLOCI_STATS_V2_VM") != "1":
        pytest.skip("cgroup v2 run needs a testbed VM (TCG, minutes): set DLOCI_STATS_V2_VM=1; this host is v1")
    if not os.path.exists(TESTBED_VM) or not shutil.which("qemu-system-x86_64"):
        pytest.skip("testbed/vm or qemu-system-x86_64 is missing")
    if "running" in _vm("status").decode():
        pytest.skip("another testbed VM is running; two TCG VMs at once would starve a 2-core host")
    _vm("up", VM_NAME, "--distro", "bookworm", "--ssh-port", "auto")
    try:
        # ssh joins its arguments into one remote shell command line
        _vm("ssh", VM_NAME, "--", "rm -rf /root/dl && mkdir -p /root/dl && tar -x -C /root/dl",
            stdin=_library_tarball())
        for package in ("", "/oci", "/oci/plugins"):
            _vm("ssh", VM_NAME, "--", "mkdir", "-p", "/root/dl/colls/ansible_collections/daemonless" + package)
        out = _vm("ssh", VM_NAME, "--", "python3", "-", "/root/dl", stdin=GUEST_SCRIPT.encode())
        yield json.loads(out.decode().strip().splitlines()[-1])
    finally:
        subprocess.run(["python3", TESTBED_VM, "down", VM_NAME], check=False)


def test_cgroup_v2_known_work_on_a_vm(v2_vm_result: Dict[str, Any]) -> None:
    result = v2_vm_result
    before, after, events = result["before"], result["after"], result["events"]
    assert result["mode"] == "v2"
    assert all(entry["cgroup_version"] == "v2" and entry["status"] == "running" for entry in after.values())
    # CPU: one busy loop, percent of one core; the guest is emulated, so it may get less than a core
    assert 30 <= after["burn"]["cpu"]["percent"] <= 105
    # runc read later (a runtime start costs ~1 s in an emulated guest): the burner only grew, the idle ones not
    assert events["burn"]["cpu"]["usage"]["total"] >= after["burn"]["cpu"]["usage_ns"]
    for name in ("mem", "pids", "io"):
        assert abs(events[name]["cpu"]["usage"]["total"] - after[name]["cpu"]["usage_ns"]) < 0.05e9
        expected = after[name]["memory"]["usage_bytes"]
        assert events[name]["memory"]["usage"]["usage"] == pytest.approx(expected, abs=MIB)
    # memory: 64 MiB in a tmpfs
    grown = (after["mem"]["memory"]["usage_bytes"] - before["mem"]["memory"]["usage_bytes"]) / MIB
    grown_ws = (after["mem"]["memory"]["working_set_bytes"] - before["mem"]["memory"]["working_set_bytes"]) / MIB
    assert 60 <= grown <= 72 and 60 <= grown_ws <= 72, (grown, grown_ws)
    assert abs(events["mem"]["memory"]["usage"]["usage"] - after["mem"]["memory"]["usage_bytes"]) < 2 * MIB
    # pids
    assert after["pids"]["pids"]["current"] == 21 == events["pids"]["pids"]["current"]
    # network: 1 MiB over loopback in the container's own namespace
    rx = after["net"]["network"]["lo"]["rx_bytes"] - before["net"]["network"]["lo"]["rx_bytes"]
    assert MIB <= rx <= MIB + 64 * 1024
    # block I/O: v2 io.stat counts without any throttle rule
    device = result["device"]
    written = after["io"]["block_io"][device]["write_bytes"] - \
        before["io"]["block_io"].get(device, {}).get("write_bytes", 0)
    assert 10 * MIB <= written <= 11 * MIB, written
    runc_written = [entry["value"] for entry in events["io"]["blkio"]["ioServiceBytesRecursive"]
                    if entry.get("op") == "Write" and "{}:{}".format(entry["major"], entry.get("minor", 0)) == device]
    assert runc_written == [after["io"]["block_io"][device]["write_bytes"]]
