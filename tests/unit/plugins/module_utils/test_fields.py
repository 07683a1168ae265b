"""The field registry: every option of oci_container has exactly one class, and normalisers make
equal meanings equal (so a second run never sees a difference that is only spelling)."""
from __future__ import annotations

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import fields as F
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError


def module_argument_spec():
    """The argument_spec the module really builds (AnsibleModule is not run: its constructor is captured)."""
    from ansible_collections.daemonless.oci.plugins.modules import oci_container
    captured = {}

    class Capture(Exception):
        pass

    def fake_module(**kwargs):  # fake: stops the module at construction time to read its spec
        captured.update(kwargs)
        raise Capture()

    original = oci_container.AnsibleModule
    oci_container.AnsibleModule = fake_module
    try:
        with pytest.raises(Capture):
            oci_container.build_module()
    finally:
        oci_container.AnsibleModule = original
    return captured


def test_every_module_option_has_a_class():
    spec = module_argument_spec()["argument_spec"]
    unclassified = [name for name in spec if name not in F.BY_NAME or F.BY_NAME[name].klass not in F.CLASSES]
    assert unclassified == []
    assert set(spec) == set(F.BY_NAME)


def test_each_field_is_registered_once():
    names = [item.name for item in F.FIELDS]
    assert len(names) == len(set(names))


def test_resource_class_is_exactly_the_updatable_limits():
    assert set(F.names(F.RESOURCE)) == {"memory", "memory_swap", "memory_reservation", "cpus", "cpu_shares",
                                        "cpu_quota", "cpu_period", "cpuset_cpus", "cpuset_mems", "pids_limit"}
    assert {"stop_signal", "stop_timeout", "restart_policy", "restart_retries", "labels"} <= set(
        F.names(F.METADATA))
    assert {"state", "recreate", "restart", "wait_for", "force_kill"} <= set(F.names(F.ACTION))


def test_documentation_matches_registry_choices_and_defaults():
    """Every option the module documents is in the registry with the same type (doc and spec cannot drift)."""
    import yaml
    from ansible_collections.daemonless.oci.plugins.modules import oci_container
    documented = yaml.safe_load(oci_container.DOCUMENTATION)["options"]
    shared = {"config_file", "run_root", "persist_root"}  # from the doc fragment
    assert set(documented) | shared == set(F.BY_NAME)
    for name, doc in documented.items():
        assert doc["type"] == F.BY_NAME[name].spec["type"], name
        assert doc.get("default") == F.BY_NAME[name].spec.get("default"), name


@pytest.mark.parametrize("name,a,b", [
    ("memory", "512M", 536870912),
    ("memory", "0.5g", "512m"),
    ("memory_swap", "-1", -1),
    ("command", "sh -c 'echo a b'", ["sh", "-c", "echo a b"]),
    ("workdir", "/srv//app/", "/srv/app"),
    ("workdir", None, "/"),
    ("capabilities", ["net_admin", "CAP_SYS_TIME"], ["CAP_NET_ADMIN", "sys_time"]),
    ("groups", ["b", "a", "a"], ["a", "b"]),
    ("stop_signal", "TERM", 15),
    ("stop_signal", "SIGKILL", "9"),
    ("stop_timeout", None, 10),
    ("network", None, "none"),
    ("seccomp_profile", None, "default"),
    ("privileged", None, False),
    ("no_new_privileges", None, True),
    ("namespaces", {}, {"pid": "private"}),
    ("cpuset_cpus", "0-1, 3", "0-1,3"),
    ("restart_policy", None, "no"),
])
def test_equal_meanings_normalise_equal(name, a, b):
    field = F.BY_NAME[name]
    assert field.normalise(a) == field.normalise(b)


def test_mounts_are_filled_and_normalised():
    mounts = F.norm_mounts([{"source": "/srv//data/", "destination": "/data/"},
                            {"type": "tmpfs", "destination": "/run"}])
    assert mounts[0] == {"type": "bind", "source": "/srv/data", "destination": "/data", "options": [],
                         "read_only": False, "propagation": "rprivate"}
    assert mounts[1]["source"] is None and mounts[1]["propagation"] is None


@pytest.mark.parametrize("name,value,message", [
    ("env", {"DEBUG": True}, "must be a string"),
    ("env", {"A=B": "x"}, "must not contain '='"),
    ("memory", "12 parsecs", "not a size"),
    ("memory", True, "not a boolean"),
    ("workdir", "relative/dir", "absolute"),
    ("stop_signal", "SIGNOPE", "unknown signal"),
    ("stop_timeout", -1, "zero or positive"),
    ("cpuset_cpus", "all", "must look like"),
    ("namespaces", {"net": "host"}, "pid, ipc and uts"),
    ("mounts", [{"destination": "/a"}], "needs a source"),
    ("mounts", [{"type": "tmpfs", "source": "/x", "destination": "/a"}], "takes no source"),
    ("mounts", [{"source": "/a", "destination": "/d"}, {"source": "/b", "destination": "/d/"}], "share"),
    ("ulimits", [{"name": "nofile", "soft": 10, "hard": 5}], "soft <= hard"),
    ("cpus", 0, "positive"),
])
def test_bad_values_are_refused_with_the_option_named(name, value, message):
    with pytest.raises(ValidationError) as info:
        F.normalise({name: value})
    assert message in str(info.value)
    assert name in str(info.value)


def test_cpus_and_cpu_quota_conflict():
    with pytest.raises(ValidationError, match="mutually exclusive"):
        F.normalise({"cpus": 1.5, "cpu_quota": 50000})


def test_normalise_covers_every_compared_class():
    values = F.normalise({})
    assert set(values) == set(F.names(F.OCI_CONFIG) + F.names(F.RESOURCE) + F.names(F.METADATA))
    assert set(F.split(values)) == {F.OCI_CONFIG, F.RESOURCE, F.METADATA}
