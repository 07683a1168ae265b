"""Pure parts of the runtime core: ids, signals, /proc/PID/stat parsing, the container model, times."""
from __future__ import annotations

import os
import subprocess
import threading
from datetime import datetime, timedelta, timezone

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import ids, signals
from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    Container,
    ContainerState,
    ContainerStore,
    ContainerVolume,
    Metadata,
    format_time,
    history,
    parse_time,
)
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ContainerStoppedError,
    InvalidStateError,
    NotFoundError,
    NotInitializedError,
    OciError,
    ValidationError,
    caused_by,
)
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import (
    ProcessIdentity,
    parse_stat,
    start_time_from_file,
)

STAT_TAIL = " S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21"


@pytest.mark.parametrize("comm", ["sleep", "a b", "x) (y", "))", "we(ird"])
def test_start_time_is_field_22_after_the_last_paren(tmp_path, comm):
    stat = tmp_path / "stat"
    stat.write_text("123 ({})".format(comm) + STAT_TAIL)
    assert start_time_from_file(str(stat)) == "424242"
    assert parse_stat("123 ({})".format(comm) + STAT_TAIL) == ("S", "424242")


@pytest.mark.parametrize("text", ["", "123 sleep S 1 2", "123 (sleep) S 1 2 3"])
def test_short_or_garbled_stat_is_not_found(text):
    with pytest.raises(NotFoundError):
        parse_stat(text)


def test_missing_stat_file_is_not_found(tmp_path):
    with pytest.raises(NotFoundError):
        start_time_from_file(str(tmp_path / "nope"))


def test_process_identity_detects_reuse_and_exit():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        identity = ProcessIdentity.of(proc.pid)
        assert identity.is_alive()
        impostor = ProcessIdentity(proc.pid, str(int(identity.start_time) + 1))
        assert not impostor.is_alive()
        assert impostor.signal(9) is False  # never signal a process that is not ours
        assert proc.poll() is None
        assert identity.signal(9) is True
        assert identity.wait_gone(5)
    finally:
        proc.kill()
        proc.wait()
    assert not identity.is_alive()
    with pytest.raises(NotInitializedError):
        ProcessIdentity(0, "").verify()


def test_zombie_counts_as_gone():
    proc = subprocess.Popen(["true"])
    identity = ProcessIdentity.of(proc.pid)
    assert identity.wait_gone(5)  # exited but not reaped yet: a zombie
    assert not identity.is_alive()
    proc.wait()


@pytest.mark.parametrize("value", ["web", "a.b-c_d", "0abc", "x" * 128])
def test_valid_names(value):
    assert ids.validate_name(value) == value


@pytest.mark.parametrize("value", ["", "a/b", "..", "a..b", ".x", "-x", "a b", "a\x00", "x" * 129, "é", None, 5])
def test_invalid_names(value):
    with pytest.raises(ValidationError):
        ids.validate_name(value)


def test_ids_are_limited_to_64_and_generated_ids_validate():
    assert ids.validate_id(ids.new_id())
    with pytest.raises(ValidationError):
        ids.validate_id("a" * 65)


@pytest.mark.parametrize("value,number", [("SIGTERM", 15), ("term", 15), ("KILL", 9), (9, 9), ("9", 9),
                                          ("sigusr1", 10), ("SIGIOT", 6), ("SIGCLD", 17)])
def test_parse_signal(value, number):
    assert signals.parse_signal(value) == number


@pytest.mark.parametrize("value", ["SIGNOPE", "", 0, 32, -1, "RTMIN+3", True])
def test_parse_signal_refuses(value):
    with pytest.raises(ValidationError):
        signals.parse_signal(value)


@pytest.mark.parametrize("configured,number", [("SIGTRAP", 5), ("sigtrap", 5), ("SIGNO", 15), ("TERM", 15),
                                               ("SIGRTMIN+3", 15), ("SIGIOT", 15), ("", 15)])
def test_reference_stop_signal_rule(configured, number):
    assert signals.reference_stop_signal(configured) == number


def test_container_stop_signal_accepts_resolved_numbers():
    assert Container("a", "a", "", "", stop_signal="9").stop_signal() == 9
    assert Container("a", "a", "", "", stop_signal="SIGTRAP").get_stop_signal() == "5"
    assert Container("a", "a", "", "").get_stop_signal() == "15"


def test_times_round_trip_with_nanoseconds():
    parsed = parse_time("2021-01-02T03:04:05.123456789+01:00")
    assert parsed == datetime(2021, 1, 2, 2, 4, 5, 123456, tzinfo=timezone.utc)
    assert parse_time(format_time(parsed)) == parsed
    assert parse_time("0001-01-01T00:00:00Z") is None and format_time(None) == "0001-01-01T00:00:00Z"
    assert parse_time("2026-11-28T15:00:22Z") == datetime(2026, 11, 28, 15, 0, 22, tzinfo=timezone.utc)


def test_state_json_keys_and_round_trip():
    state = ContainerState(id="c", status="stopped", exit_code=0, init_pid=5, init_start_time="77",
                           created=datetime(2020, 1, 1, tzinfo=timezone.utc))
    data = state.to_json()
    assert data["exitCode"] == 0  # zero is a real exit code, unlike an absent one
    assert "oomKilled" not in data and "error" not in data
    assert ContainerState.from_json(data) == state
    assert "exitCode" not in ContainerState(id="c").to_json()


def test_set_init_pid_is_write_once_and_stores_pid_first():
    state = ContainerState()
    with pytest.raises((NotFoundError, NotInitializedError)):
        state.set_init_pid(-1)
    assert state.init_pid == -1 and state.init_start_time == ""
    with pytest.raises(OciError, match="already initialized"):
        state.set_init_pid(os.getpid())
    fresh = ContainerState()
    fresh.set_init_pid(os.getpid())
    assert fresh.init_process().is_alive()


def test_pid_refuses_uninitialised_and_reused():
    container = Container("a", "a", "", "")
    with pytest.raises(NotInitializedError):
        container.pid()
    container.state.init_pid = os.getpid()
    container.state.init_start_time = "1"
    with pytest.raises(NotFoundError, match="PID wrap"):
        container.pid()


def test_container_json_round_trip_keeps_every_field():
    container = Container("id1", "web", "/b", "/l", labels={"a": "b"}, internal_annotations={"i": "j"},
                          annotations={"k": "v"}, image="img", image_name="name", image_ref="ref",
                          metadata=Metadata("web", 3), sandbox="sb", terminal=True, stdin=True, stdin_once=True,
                          runtime_handler="runc", directory="/d", stop_signal="SIGUSR1", spec={"x": 1},
                          extras={"e": 1})
    container.add_volume(ContainerVolume("/c", "/h", True))
    container.set_mount_point("/mnt")
    container.set_seccomp_profile_path("/s.json")
    container.set_id_mappings({"uids": []})
    again = Container.from_json(container.to_json())
    assert again.to_json() == container.to_json()
    assert again.created and again.metadata.attempt == 3 and again.volumes[0].readonly


def test_description_and_spoofed():
    labels = {"io.kubernetes.pod.namespace": "ns", "io.kubernetes.pod.name": "pod",
              "io.kubernetes.container.name": "ctr"}
    spoofed = Container.spoofed("id", "n", labels, datetime.now(timezone.utc), "/d")
    assert spoofed.description() == "ns/pod/ctr"
    assert spoofed.is_spoofed and spoofed.annotations == {"io.kubernetes.cri-o.Spoofed": "true"}
    assert spoofed.state.started == spoofed.state.created
    assert Container("a", "a", "", "").description() == "//"


def test_should_be_stopped_and_start_failed():
    container = Container("a", "a", "", "")
    container.state.status = "stopped"
    with pytest.raises(ContainerStoppedError):
        container.should_be_stopped()
    container.state.status = "paused"
    with pytest.raises(InvalidStateError):
        container.should_be_stopped()
    container.set_start_failed(RuntimeError("boom"))
    assert container.state.error == "boom" and container.state.finished == container.state.created


def test_store_and_history_newest_first():
    store = ContainerStore()
    base = datetime(2020, 1, 1, tzinfo=timezone.utc)
    for number in range(3):
        store.add(str(number), Container(str(number), str(number), "", "", created=base + timedelta(days=number)))
    assert [c.id for c in store.list()] == ["2", "1", "0"]
    assert [c.id for c in history(store.list()[::-1])] == ["2", "1", "0"]
    assert store.size() == 3 and store.get("1").id == "1" and store.get("x") is None
    assert store.first(lambda c: c.id == "0").id == "0" and store.first() is not None
    seen, lock = [], threading.Lock()

    def record(container):
        with lock:
            seen.append(container.id)

    store.apply_all(record)
    store.apply_all(None)
    assert sorted(seen) == ["0", "1", "2"]
    store.delete("1")
    store.delete("nope")
    assert store.size() == 2


def test_caused_by_walks_the_chain():
    try:
        try:
            raise NotFoundError()
        except NotFoundError as exc:
            raise OciError("outer") from exc
    except OciError as outer:
        assert caused_by(outer, NotFoundError)
        assert not caused_by(outer, NotInitializedError)
