"""spec_builder: typed options -> OCI spec. Pure except for reading the rootfs's passwd/group."""
from __future__ import annotations

import json
import os

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import fields as F
from ansible_collections.daemonless.oci.plugins.module_utils import spec_builder as S
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import digest


@pytest.fixture
def rootfs(tmp_path):
    etc = tmp_path / "rootfs" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\napp:x:1001:\nwheel:x:10:app\n")
    return str(tmp_path / "rootfs")


def build(rootfs, **params):
    params.setdefault("command", ["sleep", "1"])
    return S.build(F.normalise(params), rootfs, "/files")


def mount(spec, destination):
    return next(item for item in spec["mounts"] if item["destination"] == destination)


def test_command_entrypoint_env_workdir_hostname(rootfs):
    spec = build(rootfs, entrypoint=["/bin/sh", "-c"], command="echo hi", env={"B": "2", "A": "1"},
                 workdir="/srv/", hostname="web", tty=True).spec
    assert spec["process"]["args"] == ["/bin/sh", "-c", "echo", "hi"]
    assert spec["process"]["env"][:2] == ["A=1", "B=2"]
    assert "TERM=xterm" in spec["process"]["env"] and any(e.startswith("PATH=") for e in spec["process"]["env"])
    assert spec["process"]["cwd"] == "/srv" and spec["hostname"] == "web" and spec["process"]["terminal"]


def test_missing_command_is_refused(rootfs):
    with pytest.raises(ValidationError, match="command"):
        S.build(F.normalise({}), rootfs, "/files")


@pytest.mark.parametrize("user,groups,expected", [
    (None, [], {"uid": 0, "gid": 0}),
    ("app", [], {"uid": 1000, "gid": 1001}),
    ("app:wheel", [], {"uid": 1000, "gid": 10}),
    ("1000", [], {"uid": 1000, "gid": 1001}),
    ("4242:4343", [], {"uid": 4242, "gid": 4343}),
    ("app", ["wheel", "5"], {"uid": 1000, "gid": 1001, "additionalGids": [5, 10]}),
])
def test_users_are_resolved_in_the_rootfs(rootfs, user, groups, expected):
    assert build(rootfs, user=user, groups=groups).spec["process"]["user"] == expected


def test_unknown_user_and_escaping_passwd_are_refused(rootfs, tmp_path):
    with pytest.raises(ValidationError, match="not in the root filesystem"):
        build(rootfs, user="nobody")
    os.unlink(os.path.join(rootfs, "etc", "passwd"))
    (tmp_path / "host-passwd").write_text("evil:x:0:0::/:/bin/sh\n")
    os.symlink(str(tmp_path / "host-passwd"), os.path.join(rootfs, "etc", "passwd"))
    with pytest.raises(ValidationError, match="outside"):
        build(rootfs, user="evil")


def test_mounts_bind_tmpfs_and_shm(rootfs):
    spec = build(rootfs, mounts=[{"source": "/srv/data/", "destination": "/data", "read_only": True},
                                 {"type": "tmpfs", "destination": "/run", "options": ["size=1m"]}],
                 shm_size="128M").spec
    assert mount(spec, "/data") == {"destination": "/data", "type": "bind", "source": "/srv/data",
                                    "options": ["rbind", "rprivate", "ro"]}
    assert mount(spec, "/run")["options"] == ["nosuid", "nodev", "size=1m"]
    assert "size=134217728" in mount(spec, "/dev/shm")["options"]


def kinds(spec):
    return [ns.get("type") for ns in spec["linux"]["namespaces"]]


def test_network_modes(rootfs):
    assert "network" in kinds(build(rootfs).spec)
    assert "network" not in kinds(build(rootfs, network="host").spec)
    joined = build(rootfs, network="/run/netns/blue").spec["linux"]["namespaces"]
    assert {"type": "network", "path": "/run/netns/blue"} in joined
    assert "pid" not in kinds(build(rootfs, namespaces={"pid": "host"}).spec)


def test_dns_and_hosts_files_are_generated_and_mounted_read_only(rootfs):
    built = build(rootfs, dns_servers=["192.0.2.53"], dns_search=["example.org"], dns_options=["ndots:2"],
                  etc_hosts={"db": "192.0.2.10"}, hostname="web")
    assert built.files["/etc/resolv.conf"] == "nameserver 192.0.2.53\nsearch example.org\noptions ndots:2\n"
    assert "192.0.2.10\tdb" in built.files["/etc/hosts"] and "localhost\tweb" in built.files["/etc/hosts"]
    assert mount(built.spec, "/etc/resolv.conf")["options"][-1] == "ro"
    assert mount(built.spec, "/etc/hosts")["source"] == "/files/hosts"
    assert build(rootfs).files == {}


def test_resources_from_human_sizes_and_cpus(rootfs):
    resources = build(rootfs, memory="64M", memory_swap="128m", cpus=1.5, cpu_shares=512, cpuset_cpus="0",
                      pids_limit=32).spec["linux"]["resources"]
    assert resources["memory"] == {"limit": 64 * 1024 ** 2, "swap": 128 * 1024 ** 2}
    assert resources["cpu"] == {"shares": 512, "quota": 150000, "period": 100000, "cpus": "0"}
    assert resources["pids"] == {"limit": 32}
    assert resources["devices"][0] == {"allow": False, "access": "rwm"}


def test_update_payload_resets_removed_limits_to_unlimited():
    before = F.normalise({"memory": "64M", "pids_limit": 10, "cpus": 1})
    after = F.normalise({"memory": "128M"})
    assert S.update_payload(before, after) == {"memory": {"limit": 128 * 1024 ** 2}, "cpu": {"quota": -1},
                                               "pids": {"limit": -1}}


def test_capabilities_privileged_and_security(rootfs):
    caps = build(rootfs, capabilities=["net_admin"], cap_drop=["CHOWN"]).spec["process"]["capabilities"]
    assert "CAP_NET_ADMIN" in caps["bounding"] and "CAP_CHOWN" not in caps["effective"]
    assert build(rootfs, cap_drop=["ALL"]).spec["process"]["capabilities"]["bounding"] == []
    with pytest.raises(ValidationError, match="unknown capabilities"):
        build(rootfs, capabilities=["CAP_FLY"])
    spec = build(rootfs, privileged=True).spec
    assert len(spec["process"]["capabilities"]["bounding"]) == len(S.ALL_CAPABILITIES)
    assert "seccomp" not in spec["linux"] and "maskedPaths" not in spec["linux"]
    spec = build(rootfs, read_only=True, no_new_privileges=False, apparmor_profile="p", selinux_label="l",
                 sysctls={"net.ipv4.ip_forward": "1"}, oom_score_adj=100,
                 ulimits=[{"name": "nofile", "soft": 100, "hard": 200}]).spec
    assert spec["root"]["readonly"] and not spec["process"]["noNewPrivileges"]
    assert spec["process"]["apparmorProfile"] == "p" and spec["process"]["selinuxLabel"] == "l"
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"} and spec["process"]["oomScoreAdj"] == 100
    assert {"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200} in spec["process"]["rlimits"]


def test_seccomp_default_unconfined_and_file(rootfs, tmp_path):
    assert "kexec_load" in build(rootfs).spec["linux"]["seccomp"]["syscalls"][0]["names"]
    assert "seccomp" not in build(rootfs, seccomp_profile="unconfined").spec["linux"]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO"}))
    assert build(rootfs, seccomp_profile=str(profile)).spec["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_ERRNO"}
    profile.write_text("[]")
    with pytest.raises(ValidationError, match="not an OCI seccomp profile"):
        build(rootfs, seccomp_profile=str(profile))


def test_devices_are_created_and_allowed(rootfs):
    spec = build(rootfs, devices=[{"path": "/dev/null", "container_path": "/dev/mynull", "permissions": "rw"}]).spec
    node = spec["linux"]["devices"][0]
    assert node["path"] == "/dev/mynull" and node["type"] == "c" and (node["major"], node["minor"]) == (1, 3)
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in spec["linux"]["resources"]["devices"]
    with pytest.raises(ValidationError, match="not a character or block device"):
        build(rootfs, devices=[{"path": "/etc/hostname"}])


def test_same_values_give_the_same_digest(rootfs):
    one = build(rootfs, memory="1g", env={"A": "1"}, capabilities=["net_raw"])
    two = build(rootfs, memory=1024 ** 3, env={"A": "1"}, capabilities=["CAP_NET_RAW"])
    assert digest(one.spec) == digest(two.spec)


def test_bundle_spec_gets_only_resources_laid_over():
    bundle = {"root": {"path": "/b/rootfs"}, "process": {"args": ["x"]}, "linux": {"resources": {"cpu": {"shares": 2}}}}
    built = S.apply_to_bundle(bundle, F.normalise({"memory": "1M"}))
    assert built.spec["linux"]["resources"] == {"cpu": {"shares": 2}, "memory": {"limit": 1024 ** 2}}
    assert bundle["linux"]["resources"] == {"cpu": {"shares": 2}}
