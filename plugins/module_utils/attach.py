"""Attach to a running container's standard streams through conmon, and port-forward into it.

**Attach** speaks conmon's attach protocol (spec 2.8): a ``SOCK_SEQPACKET`` socket at
``<run root>/attach/<id>/attach`` (conmon's symlink to the bundle keeps the path under the
108-byte limit). Every packet from conmon is one read of the container's output prefixed with
the stream byte (2 stdout, 3 stderr); what we send is raw stdin, at most 32768 bytes a packet
(conmon discards the rest of a longer one), and a half-close ends the container's input.
Resizes go through the control FIFO (spec 2.9), opened non-blocking so a dead conmon is an
error and not a hang.

**Port-forward** enters the network namespace of the container's *verified* init process
(``/proc/PID/ns/net``, opened and then re-checked against the recorded start time, so a
recycled pid cannot send us elsewhere), in a helper thread that calls ``setns`` (``os.setns``
is Python 3.12+) and dials ``127.0.0.1:PORT`` (IPv4, as the reference). The socket stays in that
namespace after the thread ends. Then both directions are relayed; when one ends, the other
gets ``PEER_GRACE_SECONDS`` to finish. gVisor (runsc) keeps its network stack inside the
sandbox, where no host namespace reaches it; there the relay runs through an exec of
``nc 127.0.0.1 PORT`` inside the container (the image must have ``nc``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils import conmon
from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import InvalidStateError, OciError
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity
from ansible_collections.daemonless.oci.plugins.module_utils.streams import Writer, fileno_or_none, writer_for

STDIN_PACKET_MAX = 32768        # conmon's read buffer on the attach socket
OUTPUT_PACKET_MAX = 8193        # conmon's 8192-byte reads plus the stream byte
STREAM_STDOUT = 2
STREAM_STDERR = 3
DETACH_KEYS = b"\x10\x11"       # ctrl-p ctrl-q, the reference's default
PEER_GRACE_SECONDS = 1.0
RESIZE_POLL_SECONDS = 0.1
CLONE_NEWNET = 0x40000000
DIAL_TIMEOUT_SECONDS = 10.0

ResizeSource = Optional[Callable[[], Optional[Tuple[int, int]]]]


# attach
def connect_attach_socket(path: str) -> socket.socket:
    """Connect to conmon's attach socket; a missing socket means conmon (so the container) is gone."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise InvalidStateError("container is not running: conmon's attach socket {} is gone ({})".format(
            path, exc.strerror)) from exc
    except BaseException:
        sock.close()
        raise
    return sock


class DetachScanner:
    """Finds the detach sequence in stdin, across reads (each key may arrive in its own read)."""

    def __init__(self, keys: bytes = DETACH_KEYS) -> None:
        self.keys = keys
        self.matched = 0

    def feed(self, data: bytes) -> Tuple[bytes, bool]:
        """(bytes to forward, detach requested). A partial match is held back until it resolves."""
        out = bytearray()
        for value in data:
            if value == self.keys[self.matched]:
                self.matched += 1
                if self.matched == len(self.keys):
                    return bytes(out), True
                continue
            out += self.keys[:self.matched]
            self.matched = 0
            if value == self.keys[0]:
                self.matched = 1
            else:
                out.append(value)
        return bytes(out), False


class _Attachment:
    """One attach session: the socket, the caller's streams, and how it ends."""

    def __init__(self, container: Container, sock: socket.socket, stdin: Any, stdout: Any, stderr: Any,
                 tty: bool, resize: ResizeSource) -> None:
        self.container = container
        self.sock = sock
        self.stdin = stdin
        self.writers = {STREAM_STDOUT: writer_for(stdout), STREAM_STDERR: writer_for(stderr)}
        self.tty = tty
        self.resize = resize
        self.last_size: Optional[Tuple[int, int]] = None
        self.detach = DetachScanner() if tty else None
        self.input_done = stdin is None

    def apply_resize(self) -> None:
        if self.resize is None:
            return
        size = self.resize()
        if size is not None and tuple(size) != self.last_size:
            conmon.write_control(self.container.bundle_path, conmon.RESIZE_EVENT, int(size[0]), int(size[1]))
            self.last_size = tuple(size)

    def on_packet(self) -> bool:
        """Deliver one packet; False when conmon closed the socket."""
        packet = self.sock.recv(OUTPUT_PACKET_MAX)
        if not packet:
            return False
        writer = self.writers.get(packet[0])
        if writer is not None and len(packet) > 1:
            writer(packet[1:])
        return True

    def send_input(self, data: bytes) -> bool:
        """Forward stdin; True when the user asked to detach."""
        detach = False
        if self.detach is not None:
            data, detach = self.detach.feed(data)
        view = memoryview(data)
        while view:
            self.sock.sendall(view[:STDIN_PACKET_MAX])
            view = view[STDIN_PACKET_MAX:]
        return detach

    def end_input(self) -> None:
        self.input_done = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def returns_at_input_end(self) -> bool:
        """The reference: a container with stdin (not stdin-once, no tty) is detached when input ends."""
        return self.container.stdin and not self.container.stdin_once and not self.tty


def attach(paths: Any, container: Container, stdin: Optional[Any], stdout: Any, stderr: Any, tty: bool,
           resize: ResizeSource = None, timeout: Optional[float] = None) -> None:
    """Connect the caller's streams to a running container (the reference's ``AttachContainer``).

    ``stdin`` is a binary file object (with a descriptor, or any ``read()``-able object),
    ``stdout``/``stderr`` file objects or callables. Returns when the container's output ends,
    when input ends for a ``stdin`` (not stdin-once, no tty) container, on the detach keys
    (ctrl-p ctrl-q, tty only), or after ``timeout`` seconds (ours: a bound for scripted callers).
    """
    if container.is_spoofed:
        return
    session = _Attachment(container, connect_attach_socket(paths.attach_socket(container.id)),
                          stdin, stdout, stderr, tty, resize)
    try:
        session.apply_resize()
        _attach_loop(session, None if timeout is None else time.monotonic() + timeout)
    finally:
        session.sock.close()


def _attach_loop(session: _Attachment, deadline: Optional[float]) -> None:
    poller = select.poll()
    poller.register(session.sock.fileno(), select.POLLIN)
    source_fd = fileno_or_none(session.stdin)
    if source_fd is not None:
        poller.register(source_fd, select.POLLIN)
    elif session.stdin is not None:
        if _send_unpollable(session):
            return
    while True:
        session.apply_resize()
        wait = _wait_ms(deadline, session.resize is not None)
        if wait == 0 and deadline is not None and time.monotonic() >= deadline:
            return
        for fd, _unused in poller.poll(wait):
            if fd == session.sock.fileno():
                if not session.on_packet():
                    return
            elif fd == source_fd:
                data = os.read(source_fd, STDIN_PACKET_MAX)
                if data and session.send_input(data):
                    return
                if not data:
                    poller.unregister(source_fd)
                    source_fd = None
                    session.end_input()
                    if session.returns_at_input_end():
                        return


def _send_unpollable(session: _Attachment) -> bool:
    """stdin without a descriptor (BytesIO): send it all, half-close; True when attach should return."""
    while True:
        data = session.stdin.read(STDIN_PACKET_MAX)
        if not data:
            break
        if session.send_input(data):
            return True
    session.end_input()
    return session.returns_at_input_end()


def _wait_ms(deadline: Optional[float], polling_resize: bool) -> Optional[int]:
    limits = []
    if deadline is not None:
        limits.append(max(0.0, deadline - time.monotonic()))
    if polling_resize:
        limits.append(RESIZE_POLL_SECONDS)
    if not limits:
        return None
    return int(min(limits) * 1000)


# port-forward
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def open_verified_netns(container: Container, netns_path: str = "") -> int:
    """An fd on the network namespace of the container's init process, checked against its start time.

    The fd is opened first and the process re-verified after: if the pid was recycled in
    between, the check fails and the fd is dropped. A ``netns_path`` given by the caller (the
    reference's sandbox namespace) must name the same namespace.
    """
    try:
        identity = container.state.init_process()
        identity.verify()
    except OciError as exc:
        raise InvalidStateError("container {} is not running: {}".format(container.name, exc)) from exc
    fd = os.open("/proc/{}/ns/net".format(identity.pid), os.O_RDONLY | os.O_CLOEXEC)
    try:
        identity.verify()
        if netns_path:
            _require_same_namespace(fd, netns_path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_same_namespace(fd: int, netns_path: str) -> None:
    mine, given = os.fstat(fd), os.stat(netns_path)
    if (mine.st_dev, mine.st_ino) != (given.st_dev, given.st_ino):
        raise OciError("port forward into network namespace {}: it is not the container's network namespace"
                       .format(netns_path))


def dial_in_namespace(netns_fd: int, port: int, host: str = "127.0.0.1",
                      timeout: float = DIAL_TIMEOUT_SECONDS) -> socket.socket:
    """Connect to ``host:port`` from inside the namespace, on a throw-away thread that does ``setns``."""
    outcome: Dict[str, Any] = {}

    def dial() -> None:
        try:
            if _libc().setns(netns_fd, CLONE_NEWNET) != 0:
                number = ctypes.get_errno()
                raise OSError(number, "setns: " + os.strerror(number))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect((host, port))
                sock.settimeout(None)
            except BaseException:
                sock.close()
                raise
            outcome["socket"] = sock
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=dial, name="netns-dial", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["socket"]


def _is_sandboxed(container: Container) -> bool:
    runtime = container.extras.get("runtime") or {}
    return os.path.basename(str(runtime.get("runtime_path", ""))) == "runsc"


def port_forward(rt: Any, container: Container, netns_path: str, port: int, stream: Any) -> None:
    """Relay ``stream`` to ``127.0.0.1:port`` inside the container (the reference's ``PortForwardContainer``).

    ``rt`` is the container's ``OciRuntime`` (used to exec a relay inside sandboxed runtimes).
    ``stream`` is a connected socket, or a ``(reader, writer)`` pair of binary file objects.
    """
    if container.is_spoofed:
        return
    if not isinstance(port, int) or not 0 < port < 65536:
        raise OciError("port forward: invalid port {!r}".format(port))
    if _is_sandboxed(container):
        _forward_through_exec(rt, container, port, stream)
        return
    fd = open_verified_netns(container, netns_path)
    try:
        target = dial_in_namespace(fd, port)
    except OSError as exc:
        raise OciError("port forward into network namespace {}: dial 127.0.0.1:{}: {}".format(
            netns_path or "/proc/{}/ns/net".format(container.state.init_pid), port, exc)) from exc
    finally:
        os.close(fd)
    try:
        relay(stream, target)
    finally:
        target.close()


class _StreamEnds:
    """The caller's stream as a readable fd and a write function, plus how to signal its EOF."""

    def __init__(self, stream: Any) -> None:
        if isinstance(stream, socket.socket):
            self.read_fd = stream.fileno()
            self.write = stream.sendall
            self.close_write = lambda: _shutdown(stream)
        else:
            reader, writer = stream
            self.read_fd = reader.fileno()
            self.write = writer_for(writer)
            self.close_write = writer.close


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def relay(stream: Any, target: socket.socket) -> None:
    """Copy both ways; when one direction reaches EOF, the other gets ``PEER_GRACE_SECONDS``."""
    ends = _StreamEnds(stream)
    directions = {ends.read_fd: (ends.read_fd, target.sendall, lambda: _shutdown(target)),
                  target.fileno(): (target.fileno(), ends.write, ends.close_write)}
    poller = select.poll()
    for fd in directions:
        poller.register(fd, select.POLLIN)
    deadline: Optional[float] = None
    while directions:
        wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        events = poller.poll(wait)
        if not events and deadline is not None:
            return
        for fd, _unused in events:
            if not _pump_once(directions[fd]):
                poller.unregister(fd)
                del directions[fd]
                deadline = deadline or time.monotonic() + PEER_GRACE_SECONDS


def _pump_once(direction: Tuple[int, Writer, Callable[[], Any]]) -> bool:
    """Move one read; on EOF or a reset, pass the end on and return False."""
    fd, write, close_write = direction
    try:
        data = os.read(fd, 65536)
    except OSError as exc:
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
            raise
        data = b""
    if data:
        try:
            write(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            pass
    close_write()
    return False


def _forward_through_exec(rt: Any, container: Container, port: int, stream: Any) -> None:
    """runsc: relay through ``nc 127.0.0.1 PORT`` run inside the sandbox."""
    from ansible_collections.daemonless.oci.plugins.module_utils import exec_sync
    try:
        ProcessIdentity(container.state.init_pid, container.state.init_start_time).verify()
    except OciError as exc:
        raise InvalidStateError("container {} is not running: {}".format(container.name, exc)) from exc
    ends = _StreamEnds(stream)
    source = os.fdopen(os.dup(ends.read_fd), "rb", buffering=0)
    try:
        code = exec_sync.runtime_exec(rt, container, ["nc", "127.0.0.1", str(port)],
                                      source, ends.write, None, False)
    finally:
        source.close()
        ends.close_write()
    if code != 0:
        raise OciError("port forward to 127.0.0.1:{} inside the sandbox of {}: nc exited with status {}".format(
            port, container.name, code))
