"""Tests of the ttrpc client: framing, stream ids, pipelining, status mapping, connection loss.

The server side here is a ``socket.socketpair`` end driven by the test itself (``Peer``): it is
the protocol's other end written from the ttrpc wire description, not a fake of a real program.
The real peer (containerd-shim-runc-v2) is exercised in tests/functional/test_shim_runc_v2.py.
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import ttrpc
from ansible_collections.daemonless.oci.plugins.module_utils.protowire import INT32, Field, Message
from ansible_collections.daemonless.oci.plugins.module_utils.ttrpc import (
    MAX_MESSAGE_SIZE,
    TtrpcClient,
    TtrpcClosedError,
    TtrpcDeadlineExceededError,
    TtrpcDialError,
    TtrpcResourceExhaustedError,
)

NUMBER = Message("Number", [Field(1, "n", INT32)])


class Peer:
    """The server end of a socketpair, speaking ttrpc frames by hand (10-byte big-endian header)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def recv_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("client closed")
            data += chunk
        return data

    def read_request(self) -> Tuple[int, Dict[str, Any]]:
        length, stream_id, kind, flags = struct.unpack(">IIBB", self.recv_exact(10))
        assert kind == 1 and flags == 0
        return stream_id, ttrpc.REQUEST.decode(self.recv_exact(length))

    def respond(self, stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> None:
        status = {"code": code, "message": message} if code else None
        body = ttrpc.RESPONSE.encode({"status": status, "payload": payload})
        self.send_raw(stream_id, body)

    def send_raw(self, stream_id: int, body: bytes, kind: int = 2) -> None:
        self.sock.sendall(struct.pack(">IIBB", len(body), stream_id, kind, 0) + body)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = TtrpcClient(ours, namespace="dloci-test")
    peer = Peer(theirs)
    yield client, peer
    client.close()
    theirs.close()


class Call(threading.Thread):
    """Run one client call in a thread and keep its result or exception."""

    def __init__(self, client: TtrpcClient, method: str, payload: bytes = b"", **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.client, self.method, self.payload, self.kwargs = client, method, payload, kwargs
        self.result: Any = None
        self.error: Any = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.client.call("svc", self.method, self.payload, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def outcome(self) -> Any:
        self.join(10)
        assert not self.is_alive(), "call did not finish"
        return self.error if self.error is not None else self.result


def test_frame_header_bytes() -> None:
    frame = ttrpc.encode_frame(1, ttrpc.MESSAGE_TYPE_REQUEST, b"abc")
    assert frame.hex() == "00000003" + "00000001" + "01" + "00" + "616263"
    assert ttrpc.decode_header(bytes.fromhex("0000000500000007020a")) == (5, 7, 2, 10)
    with pytest.raises(ttrpc.TtrpcProtocolError):
        ttrpc.decode_header(b"\x00" * 9)


def test_request_envelope_bytes() -> None:
    body = ttrpc.encode_request("s", "m", b"\x01", 0, [("k", "v")])
    # service(1)="s", method(2)="m", payload(3)=01, metadata(5)=KeyValue{key="k", value="v"}
    assert body.hex() == "0a0173" + "12016d" + "1a0101" + "2a06" + "0a016b" + "120176"
    with_deadline = ttrpc.encode_request("s", "m", b"", 1000000000)
    assert with_deadline.hex() == "0a0173" + "12016d" + "20" + "8094ebdc03"


def test_oversize_request_is_refused_before_sending() -> None:
    with pytest.raises(TtrpcResourceExhaustedError):
        ttrpc.encode_frame(1, 1, b"x" * (MAX_MESSAGE_SIZE + 1))
    assert len(ttrpc.encode_frame(1, 1, b"x" * MAX_MESSAGE_SIZE)) == MAX_MESSAGE_SIZE + 10


def test_stream_ids_are_odd_and_increase_and_metadata_carries_the_namespace(pair) -> None:
    client, peer = pair
    seen: List[int] = []
    for expected in (1, 3, 5):
        call = Call(client, "M", NUMBER.encode({"n": expected}))
        stream_id, request = peer.read_request()
        seen.append(stream_id)
        assert request["service"] == "svc" and request["method"] == "M"
        assert NUMBER.decode(request["payload"]) == {"n": expected}
        assert request["metadata"] == [{"key": "containerd-namespace-ttrpc", "value": "dloci-test"}]
        assert request["timeout_nano"] == 0
        peer.respond(stream_id, b"ok")
        assert call.outcome() == b"ok"
    assert seen == [1, 3, 5]


def test_timeout_is_sent_as_timeout_nano(pair) -> None:
    client, peer = pair
    call = Call(client, "M", timeout=2.5)
    stream_id, request = peer.read_request()
    assert request["timeout_nano"] == 2_500_000_000
    peer.respond(stream_id)
    assert call.outcome() == b""


def test_out_of_order_responses_reach_their_callers(pair) -> None:
    client, peer = pair
    calls = []
    ids = []
    for index in range(3):
        calls.append(Call(client, "M{}".format(index)))
        stream_id, request = peer.read_request()
        ids.append((stream_id, request["method"]))
    for stream_id, method in reversed(ids):
        peer.respond(stream_id, method.encode())
    assert [call.outcome() for call in calls] == [b"M0", b"M1", b"M2"]


def test_a_blocking_call_does_not_hold_up_others(pair) -> None:
    client, peer = pair
    wait_call = Call(client, "Wait")
    wait_id, _unused = peer.read_request()
    for _unused in range(3):
        state = Call(client, "State")
        state_id, _unused = peer.read_request()
        peer.respond(state_id, b"running")
        assert state.outcome() == b"running"
    assert wait_call.is_alive()
    peer.respond(wait_id, b"exited")
    assert wait_call.outcome() == b"exited"


@pytest.mark.parametrize("code, cls", [
    (3, ttrpc.TtrpcInvalidArgumentError), (4, ttrpc.TtrpcDeadlineExceededError), (5, ttrpc.TtrpcNotFoundError),
    (6, ttrpc.TtrpcAlreadyExistsError), (8, ttrpc.TtrpcResourceExhaustedError),
    (9, ttrpc.TtrpcFailedPreconditionError), (12, ttrpc.TtrpcUnimplementedError),
    (14, ttrpc.TtrpcUnavailableError), (2, ttrpc.TtrpcUnknownError), (13, ttrpc.TtrpcUnknownError),
])
def test_status_codes_map_to_exception_classes(pair, code: int, cls: type) -> None:
    client, peer = pair
    call = Call(client, "M")
    stream_id, _unused = peer.read_request()
    peer.respond(stream_id, code=code, message="container x: the reason")
    error = call.outcome()
    assert error.__class__ is cls  # exactly this class, not a subclass
    assert error.code == code
    assert str(error) == "container x: the reason"
    assert isinstance(error, ttrpc.TtrpcError)


def test_connection_loss_fails_every_pending_call_and_later_ones(pair) -> None:
    client, peer = pair
    calls = [Call(client, "M{}".format(index)) for index in range(3)]
    for _unused in calls:
        peer.read_request()
    peer.sock.shutdown(socket.SHUT_RDWR)
    for call in calls:
        assert isinstance(call.outcome(), TtrpcClosedError)
    assert client.closed
    with pytest.raises(TtrpcClosedError, match="ttrpc: closed"):
        client.call("svc", "After")


def test_a_frame_cut_in_the_middle_is_a_closed_connection(pair) -> None:
    client, peer = pair
    call = Call(client, "M")
    stream_id, _unused = peer.read_request()
    peer.sock.sendall(struct.pack(">IIBB", 100, stream_id, 2, 0) + b"\x00" * 10)
    peer.sock.close()
    assert isinstance(call.outcome(), TtrpcClosedError)


def test_close_fails_pending_calls(pair) -> None:
    client, peer = pair
    call = Call(client, "Wait")
    peer.read_request()
    client.close()
    assert isinstance(call.outcome(), TtrpcClosedError)
    client.close()  # twice is fine


def test_oversize_response_is_discarded_and_the_connection_goes_on(pair) -> None:
    client, peer = pair
    big = Call(client, "Big")
    big_id, _unused = peer.read_request()
    small = Call(client, "Small")
    small_id, _unused = peer.read_request()
    sender = threading.Thread(target=peer.send_raw, args=(big_id, b"\x00" * (MAX_MESSAGE_SIZE + 1)), daemon=True)
    sender.start()
    error = big.outcome()
    sender.join(10)
    assert isinstance(error, TtrpcResourceExhaustedError)
    peer.respond(small_id, b"fine")
    assert small.outcome() == b"fine"


def test_oversize_request_raises_and_does_not_use_a_stream_id(pair) -> None:
    client, peer = pair
    with pytest.raises(TtrpcResourceExhaustedError):
        client.call("svc", "Big", b"x" * MAX_MESSAGE_SIZE)  # the envelope pushes it past 4 MiB
    call = Call(client, "Small")
    stream_id, request = peer.read_request()
    assert (stream_id, request["method"]) == (1, "Small")
    peer.respond(stream_id)
    assert call.outcome() == b""


def test_per_call_timeout_and_late_reply_is_dropped(pair) -> None:
    client, peer = pair
    started = time.monotonic()
    late = Call(client, "Slow", timeout=0.2)
    late_id, _unused = peer.read_request()
    assert isinstance(late.outcome(), TtrpcDeadlineExceededError)
    assert time.monotonic() - started < 5
    peer.respond(late_id, b"too late")  # nobody waits for it any more
    call = Call(client, "Next")
    next_id, _unused = peer.read_request()
    assert next_id == late_id + 2
    peer.respond(next_id, b"next")
    assert call.outcome() == b"next"


def test_undecodable_response_fails_only_that_call(pair) -> None:
    client, peer = pair
    call = Call(client, "M")
    stream_id, _unused = peer.read_request()
    peer.send_raw(stream_id, b"\x0a\x05ab")  # status field claims 5 bytes, has 2
    assert isinstance(call.outcome(), ttrpc.TtrpcProtocolError)
    assert not client.closed


def test_responses_for_unknown_ids_and_data_frames_are_ignored(pair) -> None:
    client, peer = pair
    call = Call(client, "M")
    stream_id, _unused = peer.read_request()
    peer.respond(99, b"stray")
    peer.send_raw(stream_id, b"data frame", kind=3)
    peer.respond(stream_id, b"mine")
    assert call.outcome() == b"mine"


def test_resolve_address_forms() -> None:
    assert ttrpc.resolve_address("unix:///run/containerd/s/abc") == ("/run/containerd/s/abc", "/run/containerd/s/abc")
    assert ttrpc.resolve_address("/containerd-shim/ns/id/shim.sock") == (
        "@/containerd-shim/ns/id/shim.sock", "\0/containerd-shim/ns/id/shim.sock")
    document = '{"version":2,"address":"unix:///run/x.sock","protocol":"ttrpc"}'
    assert ttrpc.resolve_address(document) == ("/run/x.sock", "/run/x.sock")
    assert ttrpc.resolve_address('{"address":"abstract-name"}') == ("@abstract-name", "\0abstract-name")


@pytest.mark.parametrize("address, match", [
    ("", "empty"), ("unix://", "no path"), ("not an address", "not a socket address"),
    ("{broken", "not valid JSON"), ('{"addr": 1}', "no string 'address'"),
    ('{"address":"unix:///x","protocol":"grpc"}', "not ttrpc"),
])
def test_bad_addresses_are_refused(address: str, match: str) -> None:
    with pytest.raises(TtrpcDialError, match=match):
        ttrpc.resolve_address(address)


def _serve_once(listener: socket.socket) -> threading.Thread:
    """Accept one client and answer one request with b'pong' (the protocol's other end)."""
    def run() -> None:
        conn, _unused = listener.accept()
        peer = Peer(conn)
        stream_id, request = peer.read_request()
        peer.respond(stream_id, b"pong:" + request["method"].encode())
        conn.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_dial_filesystem_and_abstract_sockets() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        server = _serve_once(listener)
        with TtrpcClient.connect("unix://" + path, namespace="ns") as client:
            assert client.call("svc", "Ping", timeout=5) == b"pong:Ping"
        server.join(5)
        listener.close()
    name = "dloci-test-ttrpc-{}".format(os.getpid())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    server = _serve_once(listener)
    with TtrpcClient.connect('{"address": "%s", "protocol": "ttrpc"}' % name) as client:
        assert client.call("svc", "Ping", timeout=5) == b"pong:Ping"
    server.join(5)
    listener.close()


def test_dial_where_nobody_listens() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        missing = os.path.join(tmp, "missing.sock")
        with pytest.raises(TtrpcDialError, match="No such file"):
            ttrpc.dial("unix://" + missing)
        stale = os.path.join(tmp, "stale.sock")
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(stale)  # a socket file nobody listens on (what a killed shim leaves)
        bound.close()
        with pytest.raises(TtrpcDialError, match="refused"):
            ttrpc.dial("unix://" + stale)
    with pytest.raises(TtrpcDialError, match="refused"):
        ttrpc.dial("dloci-test-nobody-{}".format(os.getpid()))
