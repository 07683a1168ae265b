"""Attach (conmon's attach socket and control FIFO) and port-forward, on runc, crun and runsc.

Run as root under the subreaper:
    python3 tests/tools/subreaper.py /tmp/probe-venv/bin/python -m pytest tests/functional/test_attach.py
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import List, Tuple

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.container import CONTAINER_STATE_STOPPED
from ansible_collections.daemonless.oci.plugins.module_utils.errors import InvalidStateError, OciError
from ansible_collections.daemonless.oci.plugins.module_utils.manager import CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec

ECHO_LOOP = ["sh", "-c", "echo started; while read l; do echo got:$l; echo err:$l >&2; done; echo bye"]


def start(manager, rootfs, name, handler, args, **request):
    terminal = request.pop("terminal", False)
    spec = default_spec(rootfs, args, readonly_root=True, terminal=terminal)
    container = manager.create(CreateRequest(name=name, spec=spec, handler=handler, **request))
    manager.start(container)
    return container


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)


class Attached:
    """attach() running on a thread, with its output collected per stream."""

    def __init__(self, manager, container, tty=False, resize=None, timeout=None):
        self.read_end, self.write_end = os.pipe()
        self.packets: List[Tuple[str, bytes]] = []
        self.error = None
        self.stdin = os.fdopen(self.read_end, "rb", buffering=0)

        def run():
            try:
                manager.runtime.attach_container(container, self.stdin, self.collect("out"), self.collect("err"),
                                                 tty, resize) if timeout is None else \
                    _attach_with_timeout(manager, container, self, tty, resize, timeout)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def collect(self, stream):
        return lambda data: self.packets.append((stream, data))

    def text(self, stream):
        return b"".join(data for name, data in self.packets if name == stream)

    def send(self, data: bytes):
        os.write(self.write_end, data)

    def close_input(self):
        os.close(self.write_end)

    def join(self, timeout=10.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "attach did not return"
        self.stdin.close()
        if self.error is not None:
            raise self.error


def _attach_with_timeout(manager, container, attached, tty, resize, timeout):
    from ansible_collections.daemonless.oci.plugins.module_utils import attach
    attach.attach(manager.paths, container, attached.stdin, attached.collect("out"), attached.collect("err"), tty,
                  resize, timeout=timeout)


def test_attach_reads_output_and_sends_input(manager, busybox_rootfs, handler):
    container = start(manager, busybox_rootfs, "att", handler, ECHO_LOOP, stdin=True)
    wait_until(lambda: os.path.exists(container.log_path) and b"started" in open(container.log_path, "rb").read(),
               what="the container to start")
    attached = Attached(manager, container)
    attached.send(b"hello\n")
    wait_until(lambda: b"got:hello\n" in attached.text("out"), what="the first echo")
    attached.send(b"world\n")
    wait_until(lambda: b"err:world\n" in attached.text("err"), what="the second echo on stderr")
    attached.close_input()
    attached.join()  # a stdin (not stdin-once) container: attach returns when input ends
    assert attached.text("out") == b"got:hello\ngot:world\n"
    assert attached.text("err") == b"err:hello\nerr:world\n"
    assert container.is_alive()  # --leave-stdin-open: the container keeps its stdin


def test_stdin_once_half_close_ends_the_containers_input(manager, busybox_rootfs, handler):
    payload = b"x" * 100000 + b"\n"  # more than one 32768-byte packet
    container = start(manager, busybox_rootfs, "once", handler, ["sh", "-c", "sleep 0.5; wc -c; echo bye"],
                      stdin=True, stdin_once=True)
    attached = Attached(manager, container)
    attached.send(payload)
    attached.close_input()
    attached.join(15)  # stdin-once: attach waits for the output side, which ends with the container
    assert attached.text("out").split() == [str(len(payload)).encode(), b"bye"]
    wait_until(lambda: manager.inspect(container).state.status == CONTAINER_STATE_STOPPED,
               what="the container to exit after its stdin closed")


def test_attach_to_a_stopped_container_is_a_clear_error(manager, busybox_rootfs, handler):
    container = start(manager, busybox_rootfs, "gone", handler, ["true"], stdin=True)
    wait_until(lambda: manager.inspect(container).state.status == CONTAINER_STATE_STOPPED, what="exit")
    with pytest.raises(InvalidStateError, match="not running"):
        manager.runtime.attach_container(container, None, None, None, False)


def test_resize_through_the_control_fifo(manager, busybox_rootfs, handler):
    container = start(manager, busybox_rootfs, "tty", handler,
                      ["sh", "-c", "while :; do stty size; sleep 0.1; done"], terminal=True)
    attached = Attached(manager, container, tty=True, resize=lambda: (33, 99), timeout=10)
    wait_until(lambda: b"33 99" in attached.text("out"), what="the new size inside the container")
    os.close(attached.write_end)
    attached.thread.join(12)
    assert not attached.thread.is_alive()


def forward(manager, container, port, payload: bytes) -> bytes:
    """Port-forward one connection: send ``payload``, half-close, return everything received."""
    ours, theirs = socket.socketpair()
    errors = []

    def run():
        try:
            manager.runtime.port_forward_container(container, "", port, theirs)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            theirs.close()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        ours.sendall(payload)
        ours.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):  # the relay already failed and closed its end
        pass
    received = b""
    ours.settimeout(10)
    while True:
        try:
            chunk = ours.recv(65536)
        except ConnectionResetError:  # the relay failed and closed its end with our bytes unread
            break
        if not chunk:
            break
        received += chunk
    thread.join(10)
    ours.close()
    if errors:
        raise errors[0]
    return received


def test_port_forward_reaches_nc_listening_inside(manager, busybox_rootfs, handler):
    container = start(manager, busybox_rootfs, "pf", handler, ["nc", "-ll", "-p", "8080", "-e", "cat"])
    received = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until nc listens
        try:
            received = forward(manager, container, 8080, b"ping\n")
            if received:
                break
        except OciError:
            time.sleep(0.1)
    assert received == b"ping\n"
    big = os.urandom(300000)
    assert forward(manager, container, 8080, big) == big


def test_port_forward_to_a_closed_port_fails_clearly(manager, busybox_rootfs, handler):
    container = start(manager, busybox_rootfs, "closed", handler, ["sleep", "100"])
    with pytest.raises(OciError, match="8081"):
        forward(manager, container, 8081, b"x")
