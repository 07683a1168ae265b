"""Verify the bookworm testbed VM after converge, through testinfra's SSH backend.

Each check is one SSH command; under TCG that costs about a second, against 7-9 s for an
Ansible module, which is why verify lives here and not in a verify.yml.
"""

from __future__ import annotations

import json

DISTRO = "bookworm"
DEBIAN_MAJOR = "12"
KERNEL_PREFIX = "6.1."

# An OCI bundle whose process prints its own cgroup: on a unified hierarchy that is one
# "0::/<path>" line. busybox-static is the whole rootfs; python3 edits runc's default spec.
RUNC_SMOKE = r"""
set -eu
b=$(mktemp -d /tmp/tb-bundle.XXXXXX)
trap 'runc delete --force tb-smoke >/dev/null 2>&1 || true; rm -rf "$b"' EXIT
mkdir -p "$b/rootfs/bin"
cp /bin/busybox "$b/rootfs/bin/busybox"
cd "$b"
runc spec
python3 - <<'PY'
import json
with open("config.json") as fh:
    spec = json.load(fh)
spec["process"]["terminal"] = False
spec["process"]["args"] = ["/bin/busybox", "cat", "/proc/self/cgroup"]
with open("config.json", "w") as fh:
    json.dump(spec, fh)
PY
runc run --bundle "$b" tb-smoke
"""


def test_distro_and_own_kernel(host):
    """The guest is the distro we asked for, on its own kernel (not the CI host's)."""
    assert host.system_info.distribution == "debian"
    assert host.system_info.codename == DISTRO
    assert host.file("/etc/debian_version").content_string.startswith(DEBIAN_MAJOR)
    assert host.sysctl("kernel.osrelease").startswith(KERNEL_PREFIX)


def test_cgroup_v2_unified(host):
    """Only a cgroup2 mount: no v1 controllers, unlike the hybrid CI host."""
    cgroup_mounts = [m for m in host.mount_point.get_mountpoints() if m.filesystem in ("cgroup", "cgroup2")]
    assert [(m.path, m.filesystem) for m in cgroup_mounts] == [("/sys/fs/cgroup", "cgroup2")]
    controllers = host.file("/sys/fs/cgroup/cgroup.controllers").content_string.split()
    assert {"cpu", "memory", "pids"} <= set(controllers)


def test_systemd_is_pid1_and_running(host):
    """systemd finished booting without failed units (the fw_cfg key unit included)."""
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"
    state = host.run("systemctl is-system-running --wait")
    assert state.stdout.strip() == "running", host.run("systemctl --failed --no-legend").stdout
    assert host.service("testbed-fwcfg").is_running   # a oneshot that stays "active (exited)"


def test_sshd_has_only_the_injected_key(host):
    """The cached image carries no key: the one in authorized_keys came through fw_cfg."""
    keys = host.file("/root/.ssh/authorized_keys")
    assert keys.mode == 0o600
    lines = [ln for ln in keys.content_string.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ssh-ed25519 ")


def test_runtime_packages_installed(host):
    """Installed by converge with apt, through qemu's user network."""
    for name in ("runc", "conmon", "busybox-static"):
        assert host.package(name).is_installed, name
    assert host.run("conmon --version").stdout.startswith("conmon version ")


def test_runc_runs_a_container_in_a_v2_cgroup(host):
    """End to end: runc creates a container whose process lives in a cgroup v2 leaf."""
    result = host.run("sh -c %s", RUNC_SMOKE)
    assert result.rc == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("0::/"), result.stdout


def test_runc_state_is_clean(host):
    """The smoke container was deleted: nothing is left for the next converge."""
    listed = json.loads(host.run("runc list --format json").stdout or "null") or []
    assert [c["id"] for c in listed if c["id"] == "tb-smoke"] == []
