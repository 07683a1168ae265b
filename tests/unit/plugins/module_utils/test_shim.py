"""Pure-logic tests of shim.py: metrics decoding, reply mapping, request encoding, address and argv rules.

Metrics bytes are assembled record by record from the field numbers in containerd/cgroups'
``stats/v1/metrics.proto`` and ``cgroup2/stats/metrics.proto`` (numbers written out below), not
with the module's own schemas, so a wrong field number in shim.py makes these tests fail. The
request-encoding tests use a socketpair end as the ttrpc server (the protocol's other end).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import struct
import threading
from typing import Any, Dict, Tuple

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import shim
from ansible_collections.daemonless.oci.plugins.module_utils import ttrpc
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.protowire import encode_tag, encode_varint


def varint(number: int, value: int) -> bytes:
    return encode_tag(number, 0) + encode_varint(value)


def nested(number: int, *records: bytes) -> bytes:
    body = b"".join(records)
    return encode_tag(number, 2) + encode_varint(len(body)) + body


def text(number: int, value: str) -> bytes:
    return nested(number, value.encode())


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def v2_metrics() -> bytes:
    return b"".join([
        nested(1, varint(1, 7), varint(2, 100)),  # pids{current, limit}
        nested(2, varint(1, 1500), varint(2, 1000), varint(3, 500)),  # cpu{usage_usec, user_usec, system_usec}
        nested(4, varint(1, 4096), varint(2, 8192), varint(13, 1000), varint(32, 50000), varint(33, 1 << 30),
               varint(34, 12), varint(36, 60000)),  # memory{anon, file, inactive_file, usage, usage_limit, ...}
        nested(6, nested(1, varint(1, 8), varint(2, 0), varint(3, 11), varint(4, 22), varint(5, 3), varint(6, 4)),
               nested(1, varint(1, 7), varint(2, 1), varint(3, 5))),  # io{usage[]}
        nested(8, varint(4, 1), varint(5, 2)),  # memory_events{oom, oom_kill}
        varint(99, 1),  # a field from a newer containerd: skipped
    ])


def test_decode_cgroup_v2_metrics() -> None:
    got = shim.decode_metrics("io.containerd.cgroups.v2.Metrics", v2_metrics())
    assert got["cgroup_version"] == 2
    assert got["pids"] == {"current": 7, "limit": 100}
    assert got["cpu"] == {"usage_ns": 1_500_000, "user_ns": 1_000_000, "system_ns": 500_000, "per_cpu_ns": []}
    assert got["memory"] == {"usage": 50000, "limit": 1 << 30, "max_usage": 60000, "inactive_file": 1000,
                             "working_set": 49000, "rss": 4096, "cache": 8192, "swap_usage": 12, "oom_kill": 2}
    assert got["io"] == [
        {"major": 7, "minor": 1, "read_bytes": 5, "write_bytes": 0, "read_ios": 0, "write_ios": 0},
        {"major": 8, "minor": 0, "read_bytes": 11, "write_bytes": 22, "read_ios": 3, "write_ios": 4},
    ]
    assert got["network"] == []
    assert got["raw"]["memory"]["pgfault"] == 0


def v1_metrics() -> bytes:
    def blk(op: str, major: int, minor: int, value: int) -> bytes:
        return b"".join([text(1, op), text(2, "sda"), varint(3, major), varint(4, minor), varint(5, value)])
    return b"".join([
        nested(2, varint(1, 3), varint(2, 50)),  # pids
        nested(3, nested(1, varint(1, 900), varint(2, 300), varint(3, 600),
                         nested(4, encode_varint(400), encode_varint(500)))),  # cpu.usage{total, kernel, user, per_cpu}
        nested(4, varint(18, 111), varint(19, 222), varint(30, 2000),  # total_cache, total_rss, total_inactive_file
               nested(33, varint(1, 1 << 20), varint(2, 5000), varint(3, 7000)),  # usage{limit, usage, max}
               nested(34, varint(2, 6000))),  # swap{usage}
        nested(5, nested(1, blk("Read", 8, 0, 100)), nested(1, blk("Write", 8, 0, 200)),
               nested(1, blk("Total", 8, 0, 300)), nested(2, blk("Read", 8, 0, 4)), nested(2, blk("Write", 8, 0, 5))),
        nested(7, text(1, "eth0"), varint(2, 10), varint(3, 1), varint(6, 20), varint(7, 2)),
        nested(9, varint(3, 1)),  # memory_oom_control{oom_kill}
    ])


def test_decode_cgroup_v1_metrics() -> None:
    got = shim.decode_metrics("type.googleapis.com/io.containerd.cgroups.v1.Metrics", v1_metrics())
    assert got["cgroup_version"] == 1
    assert got["pids"] == {"current": 3, "limit": 50}
    assert got["cpu"] == {"usage_ns": 900, "user_ns": 600, "system_ns": 300, "per_cpu_ns": [400, 500]}
    memory = got["memory"]
    assert (memory["usage"], memory["limit"], memory["max_usage"]) == (5000, 1 << 20, 7000)
    assert (memory["inactive_file"], memory["working_set"]) == (2000, 3000)
    assert (memory["rss"], memory["cache"], memory["swap_usage"], memory["oom_kill"]) == (222, 111, 6000, 1)
    assert got["io"] == [{"major": 8, "minor": 0, "read_bytes": 100, "write_bytes": 200, "read_ios": 4,
                          "write_ios": 5}]
    assert got["network"] == [{"name": "eth0", "rx_bytes": 10, "rx_packets": 1, "rx_errors": 0, "rx_dropped": 0,
                               "tx_bytes": 20, "tx_packets": 2, "tx_errors": 0, "tx_dropped": 0}]


def test_working_set_is_floored_at_zero_and_empty_metrics_decode() -> None:
    data = nested(4, varint(13, 9000), varint(32, 5000))
    assert shim.decode_metrics(shim.METRICS_V2_TYPE, data)["memory"]["working_set"] == 0
    empty = shim.decode_metrics(shim.METRICS_V1_TYPE, b"")
    assert empty["cpu"]["usage_ns"] == 0 and empty["pids"] == {"current": 0, "limit": 0} and empty["io"] == []


def test_unknown_or_broken_stats_are_errors() -> None:
    with pytest.raises(shim.ShimError, match="unknown stats type"):
        shim.decode_metrics("io.example.Metrics", b"")
    with pytest.raises(shim.ShimError, match="cannot decode"):
        shim.decode_metrics(shim.METRICS_V2_TYPE, b"\x0a\x05")


# ---------------------------------------------------------------------------------------------
# Requests and replies through a TaskClient (socketpair server end)
# ---------------------------------------------------------------------------------------------

class Server(threading.Thread):
    """Answer each request with a canned payload per method, and remember what was asked."""

    def __init__(self, sock: socket.socket, replies: Dict[str, bytes]) -> None:
        super().__init__(daemon=True)
        self.sock, self.replies = sock, replies
        self.requests: Dict[str, Dict[str, Any]] = {}
        self.start()

    def recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def run(self) -> None:
        try:
            while True:
                length, stream_id, _unused, _unused = struct.unpack(">IIBB", self.recv(10))
                request = ttrpc.REQUEST.decode(self.recv(length))
                self.requests[request["method"]] = request
                body = ttrpc.RESPONSE.encode({"payload": self.replies.get(request["method"], b"")})
                self.sock.sendall(struct.pack(">IIBB", len(body), stream_id, 2, 0) + body)
        except (EOFError, OSError):
            pass


@pytest.fixture
def served():
    def make(replies: Dict[str, bytes]) -> Tuple[shim.TaskClient, Server]:
        ours, theirs = socket.socketpair()
        made.append((ours, theirs))
        return shim.TaskClient(ttrpc.TtrpcClient(ours, namespace="dloci-test")), Server(theirs, replies)
    made: list = []
    yield make
    for ours, theirs in made:
        theirs.close()


GO_ZERO = nested(10, varint(1, (-62135596800) & ((1 << 64) - 1)))  # exited_at = Go's zero time


def test_state_reply_mapping(served) -> None:
    reply = b"".join([text(1, "c1"), text(2, "/b"), varint(3, 42), varint(4, 2), text(6, "/io/out"),
                      varint(8, 1), GO_ZERO, text(11, "")])
    task, server = served({"State": reply})
    state = task.state("c1")
    assert state == shim.StateResponse(id="c1", bundle="/b", pid=42, status="running", stdin="", stdout="/io/out",
                                       stderr="", terminal=True, exit_status=0, exited_at=None, exited_at_ns=None,
                                       exec_id="")
    assert shim.PROCESS_REQUEST.decode(server.requests["State"]["payload"]) == {"id": "c1", "exec_id": ""}
    assert server.requests["State"]["service"] == "containerd.task.v2.Task"
    assert server.requests["State"]["timeout_nano"] == int(shim.DEFAULT_CALL_TIMEOUT * 1e9)


def test_state_reply_of_an_exited_process(served) -> None:
    reply = varint(3, 42) + varint(4, 3) + varint(9, 137) + nested(10, varint(1, 1700000000), varint(2, 9))
    task, _unused = served({"State": reply})
    state = task.state("c1")
    assert (state.status, state.exit_status, state.exited_at_ns) == ("stopped", 137, 1700000000000000009)
    assert state.exited_at == datetime.datetime(2023, 11, 14, 22, 13, 20, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("code, name", [(0, "unknown"), (1, "created"), (3, "stopped"), (4, "paused"),
                                        (5, "pausing"), (77, "unknown")])
def test_status_names(served, code: int, name: str) -> None:
    task, _unused = served({"State": varint(4, code)})
    assert task.state("c1").status == name


def test_wait_and_delete_replies(served) -> None:
    exited = nested(2, varint(1, 1700000000), varint(2, 5000))
    task, server = served({"Wait": varint(1, 137) + exited,
                           "Delete": varint(1, 42) + varint(2, 137) + nested(3, varint(1, 1700000000))})
    waited = task.wait("c1", "e1")
    assert waited.exit_status == 137 and waited.exited_at_ns == 1700000000000005000
    assert waited.exited_at == datetime.datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=datetime.timezone.utc)
    assert server.requests["Wait"]["timeout_nano"] == 0  # Wait has no deadline unless asked
    deleted = task.delete("c1")
    assert (deleted.pid, deleted.exit_status) == (42, 137)


def test_exec_and_update_send_json_anys(served) -> None:
    task, server = served({})
    process = {"args": ["echo", "hi"], "cwd": "/", "terminal": False}
    task.exec("c1", "e1", process, stdout="/io/out", stderr="/io/err")
    request = shim.EXEC_PROCESS_REQUEST.decode(server.requests["Exec"]["payload"])
    assert (request["id"], request["exec_id"], request["stdout"], request["terminal"]) == ("c1", "e1", "/io/out",
                                                                                           False)
    assert request["spec"]["type_url"] == "types.containerd.io/opencontainers/runtime-spec/1/Process"
    assert json.loads(request["spec"]["value"]) == process
    task.update("c1", {"pids": {"limit": 10}}, annotations={"b": "2", "a": "1"})
    update = shim.UPDATE_TASK_REQUEST.decode(server.requests["Update"]["payload"])
    assert update["resources"]["type_url"] == "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    assert json.loads(update["resources"]["value"]) == {"pids": {"limit": 10}}
    assert update["annotations"] == [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]


def test_kill_create_and_other_requests(served) -> None:
    task, server = served({"Create": varint(1, 99), "Connect": varint(1, 5) + varint(2, 99) + text(3, "v"),
                           "Pids": nested(1, varint(1, 99)) + nested(1, varint(1, 100), nested(
                               2, text(1, "containerd.runc.v1.ProcessDetails"), nested(2, text(1, "e1"))))})
    assert task.create("c1", "/b", stdout="/o", terminal=True) == 99
    create = shim.CREATE_TASK_REQUEST.decode(server.requests["Create"]["payload"])
    assert (create["bundle"], create["stdout"], create["terminal"], create["options"]) == ("/b", "/o", True, None)
    task.kill("c1", 9, exec_id="e1", all_processes=True)
    assert shim.KILL_REQUEST.decode(server.requests["Kill"]["payload"]) == {"id": "c1", "exec_id": "e1",
                                                                            "signal": 9, "all": True}
    assert task.connect("c1") == shim.ConnectResponse(shim_pid=5, task_pid=99, version="v")
    assert task.pids("c1") == [shim.ProcessInfo(99, "", ""),
                               shim.ProcessInfo(100, "containerd.runc.v1.ProcessDetails", "e1")]
    task.close_io("c1", "e1")
    assert shim.CLOSE_IO_REQUEST.decode(server.requests["CloseIO"]["payload"])["stdin"] is True
    task.resize_pty("c1", 80, 24)
    assert shim.RESIZE_PTY_REQUEST.decode(server.requests["ResizePty"]["payload"])["width"] == 80
    task.shutdown("c1", now=True)
    assert shim.SHUTDOWN_REQUEST.decode(server.requests["Shutdown"]["payload"]) == {"id": "c1", "now": True}


def test_shutdown_treats_a_lost_reply_as_success() -> None:
    ours, theirs = socket.socketpair()
    task = shim.TaskClient(ttrpc.TtrpcClient(ours))

    def hang_up() -> None:
        theirs.recv(65536)
        theirs.close()  # the shim exits while answering Shutdown

    peer = threading.Thread(target=hang_up, daemon=True)
    peer.start()
    task.shutdown("c1")
    peer.join(5)
    with pytest.raises(ttrpc.TtrpcClosedError):
        task.state("c1")


# ---------------------------------------------------------------------------------------------
# Addresses, argv, names, FIFOs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, expected", [
    (b"unix:///run/containerd/s/abc\n", "unix:///run/containerd/s/abc"),
    (b"/containerd-shim/ns/id/shim.sock", "/containerd-shim/ns/id/shim.sock"),
    (b'{"version":3,"address":"unix:///run/x","protocol":"ttrpc"}\n',
     '{"version":3,"address":"unix:///run/x","protocol":"ttrpc"}'),
])
def test_parse_shim_address_accepts_the_three_forms(output: bytes, expected: str) -> None:
    assert shim.parse_shim_address(output) == expected


@pytest.mark.parametrize("output", [b"", b"  \n", b"hello world", b"a\nb", b"\xff\xfe", b"{not json",
                                    b'{"address":"unix:///x","protocol":"grpc"}'])
def test_parse_shim_address_refuses_garbage(output: bytes) -> None:
    with pytest.raises(shim.ShimError):
        shim.parse_shim_address(output)


def test_start_argv() -> None:
    assert shim.shim_start_argv("/opt/kata/bin/containerd-shim-kata-qemu-v2", "c1", "k8s.io") == [
        "/opt/kata/bin/containerd-shim-kata-qemu-v2", "-namespace", "k8s.io", "-address", "", "-publish-binary",
        "/bin/true", "-id", "c1", "start"]
    assert shim.shim_start_argv("/s", "c1", "ns", debug=True)[-2:] == ["-debug", "start"]


def test_shim_daemon_argv_recognition() -> None:
    daemon = ["/usr/bin/containerd-shim-runc-v2", "-namespace", "ns", "-id", "c1", "-address", ""]
    assert shim._is_shim_daemon_argv(daemon, "c1", "ns")
    assert not shim._is_shim_daemon_argv(daemon + ["start"], "c1", "ns")
    assert not shim._is_shim_daemon_argv(daemon, "c2", "ns")
    assert not shim._is_shim_daemon_argv(daemon, "c1", "other")
    assert not shim._is_shim_daemon_argv([], "c1", "ns")


@pytest.mark.parametrize("namespace", ["default", "k8s.io", "dloci-test", "a_b"])
def test_valid_namespaces(namespace: str) -> None:
    assert shim.validate_namespace(namespace) == namespace


@pytest.mark.parametrize("namespace", ["", "-x", "a..b", "a/b", "a b", "x" * 77])
def test_invalid_namespaces(namespace: str) -> None:
    with pytest.raises(ValidationError):
        shim.validate_namespace(namespace)


def test_process_io_collects_until_every_writer_closed(tmp_path) -> None:
    io = shim.ProcessIO.create(str(tmp_path), stdin=True)
    try:
        assert not io.wait_eof(0.1)  # no writer has come yet: that is not EOF
        out = os.open(io.stdout_path, os.O_WRONLY)
        err = os.open(io.stderr_path, os.O_WRONLY)
        os.write(out, b"one ")
        os.write(err, b"e")
        os.write(out, b"two")
        os.close(out)
        os.close(err)
        assert io.wait_eof(5)
        assert io.output() == (b"one two", b"e")
        reader = os.open(io.stdin_path, os.O_RDONLY | os.O_NONBLOCK)
        io.write_stdin(b"in")
        assert os.read(reader, 10) == b"in"
        os.close(reader)
    finally:
        io.close()
    assert not os.path.exists(io.directory)


def test_process_io_caps_output(tmp_path) -> None:
    io = shim.ProcessIO.create(str(tmp_path), stderr=False, limit=10)
    try:
        out = os.open(io.stdout_path, os.O_WRONLY)
        os.write(out, b"0123456789abcdef")
        os.close(out)
        assert io.wait_eof(5)
        assert io.output() == (b"0123456789", b"") and io.truncated
    finally:
        io.close()


def test_process_io_detach_hands_over_working_fds(tmp_path) -> None:
    io = shim.ProcessIO.create(str(tmp_path), stdin=True)
    fds = io.detach_fds()
    try:
        assert sorted(fds) == ["stderr", "stdin", "stdout"]
        writer = os.open(io.stdout_path, os.O_WRONLY)
        os.write(writer, b"for the helper")
        os.close(writer)
        assert os.read(fds["stdout"], 100) == b"for the helper"  # our pump no longer competes for it
        assert io.output() == (b"", b"")
    finally:
        for fd in fds.values():
            os.close(fd)
        io.close()
    assert not os.path.exists(io.directory)


def test_shim_log_fifo_open_tail_and_close(tmp_path) -> None:
    log = shim.ShimLog.open(str(tmp_path))
    assert log.created
    log.start_pump()
    writer = os.open(log.path, os.O_WRONLY)
    os.write(writer, b"time=now level=info msg=started\n")
    os.close(writer)
    assert log.wait_eof(5)
    assert log.tail() == b"time=now level=info msg=started\n"
    fd = log.detach()
    os.close(fd)
    log.close()
    assert not os.path.exists(log.path)
    (tmp_path / "log").write_text("not a fifo")
    with pytest.raises(shim.ShimError, match="not a FIFO"):
        shim.ShimLog.open(str(tmp_path))
