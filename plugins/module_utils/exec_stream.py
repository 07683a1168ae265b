"""Streaming exec (the reference's ``ExecContainer``): ``runtime exec`` with the caller's streams.

No conmon and no timeout: the caller streams and decides when to stop. Without a tty, the
runtime's stdin is a pipe fed from the caller's stdin (closed at its EOF, so the command sees
the end of input), and the output pipes are copied to the caller until EOF: background children
that hold them keep the call open, as in the reference.

With a tty the command needs a console whose size the caller controls:

* runc and runsc run in the foreground on a new pseudo-terminal whose slave side is their
  stdio (they are session leaders with it as controlling terminal). They create the inner
  console themselves and resize it when ``TIOCSWINSZ`` on our master side sends them SIGWINCH.
  Our side is set raw, so the container's console alone does the line discipline.
* crun in the foreground does not forward SIGWINCH, but accepts ``--console-socket`` without
  detaching: it hands us the inner console's master fd over a unix socket, and we resize that
  console directly.

Either way the first size is also written into the process spec (``consoleSize``): runc and
runsc size the console with it before the command starts. crun 1.8 ignores it, and the console
is 0x0 until we resize it right after receiving its fd, so a command's very first look at
its terminal may see no size there.
"""
from __future__ import annotations

import array
import errno
import fcntl
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import tty as tty_module
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ExecSyncError
from ansible_collections.daemonless.oci.plugins.module_utils.exec_sync import (
    ExecOptions,
    ExecWorkspace,
    check_command,
    exec_argv,
    exec_process,
    is_sandboxed,
)
from ansible_collections.daemonless.oci.plugins.module_utils.streams import Writer, fileno_or_none, writer_for

STDIN_CHUNK = 65536
CONSOLE_WAIT_SECONDS = 60.0   # how long the runtime may take to send the console's master fd
RESIZE_POLL_MS = 100
TRANSCRIPT_BYTES = 4096       # what we keep of the output to explain a runtime failure

ResizeSource = Optional[Callable[[], Optional[Tuple[int, int]]]]


def runtime_exec(rt: Any, container: Container, command: List[str], stdin: Optional[BinaryIO], stdout: Any,
                 stderr: Any, tty: bool, resize: ResizeSource = None, **options: Any) -> int:
    """Run ``command`` with streamed stdio; returns its exit code (128+N for signal N).

    ``stdin`` is a binary file object or None; ``stdout``/``stderr`` are binary file objects or
    callables taking bytes. ``resize`` is polled for ``(height, width)``. A runtime that cannot
    start the command raises ``ExecSyncError`` with its message.
    """
    command = check_command(command)
    parsed = ExecOptions.parse(options)
    if container.is_spoofed:
        return 0
    first_size = resize() if (tty and resize is not None) else None
    with ExecWorkspace(rt.paths.exec_dir(container.id)) as workspace:
        process_file = workspace.write_process(exec_process(container, command, parsed, tty, first_size))
        sandbox_file = workspace.file("sandbox-pid") if is_sandboxed(rt) else ""
        base = (rt, container, process_file, workspace.file("pid"), sandbox_file)
        if not tty:
            code, errors = _stream_pipes(rt, exec_argv(*base), stdin, stdout, stderr)
        elif _needs_console_socket(rt):
            code, errors = _stream_console_socket(rt, base, workspace, stdin, stdout, resize)
        else:
            code, errors = _stream_pty(rt, exec_argv(*base), stdin, stdout, resize)  # terminal: the process file
        if not os.path.exists(sandbox_file or workspace.file("pid")):
            raise ExecSyncError(errors.decode("utf-8", "replace").strip() or "runtime exec failed", exit_code=code)
        return 128 - code if code < 0 else code


def _needs_console_socket(rt: Any) -> bool:
    return os.path.basename(rt.snapshot.runtime_path) == "crun"


def _kill_session(process: "subprocess.Popen[bytes]") -> None:
    """Our child leads its own session: kill it all and reap it."""
    try:
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    process.wait()


class _Transcript:
    """Passes output on and keeps its first bytes (a failing runtime prints its reason there)."""

    def __init__(self, target: Any) -> None:
        self.kept = bytearray()
        self.write = writer_for(target)

    def __call__(self, data: bytes) -> None:
        if len(self.kept) < TRANSCRIPT_BYTES:
            self.kept.extend(data[:TRANSCRIPT_BYTES - len(self.kept)])
        self.write(data)


# no tty
def _stream_pipes(rt: Any, argv: List[str], stdin: Optional[BinaryIO], stdout: Any,
                  stderr: Any) -> Tuple[int, bytes]:
    process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
        argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=rt.runtime_env(), start_new_session=True)
    errors = _Transcript(stderr)
    sinks = {process.stdout.fileno(): writer_for(stdout), process.stderr.fileno(): errors}
    try:
        _relay_pipes(stdin, process.stdin, sinks)
        process.wait()
    except BaseException:
        _kill_session(process)
        raise
    finally:
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass
    return process.returncode, bytes(errors.kept)


def _relay_pipes(source: Optional[BinaryIO], sink: Optional[BinaryIO], outputs: Dict[int, Writer]) -> None:
    """Copy ``source`` -> ``sink`` and each output fd -> its writer until the outputs reach EOF."""
    poller = select.poll()
    for fd in outputs:
        poller.register(fd, select.POLLIN)
    source_fd = fileno_or_none(source)
    if source_fd is not None and sink is not None:
        poller.register(source_fd, select.POLLIN)
    elif sink is not None:
        _copy_unpollable(source, sink)
    open_outputs = set(outputs)
    while open_outputs:
        for fd, _unused in poller.poll():
            if fd == source_fd:
                if not _forward(source_fd, sink):
                    poller.unregister(source_fd)
                    source_fd = None
                continue
            data = os.read(fd, 65536)
            if data:
                outputs[fd](data)
            else:
                poller.unregister(fd)
                open_outputs.discard(fd)


def _forward(source_fd: int, sink: BinaryIO) -> bool:
    """One read from the caller's stdin into the runtime's; False (and the sink closed) at EOF."""
    data = os.read(source_fd, STDIN_CHUNK)
    if data:
        try:
            sink.write(data)
            sink.flush()
            return True
        except BrokenPipeError:
            pass
    try:
        sink.close()
    except BrokenPipeError:
        pass
    return False


def _copy_unpollable(source: Any, sink: BinaryIO) -> None:
    """A stdin without a file descriptor (BytesIO): write it all, then EOF."""
    try:
        while True:
            data = source.read(STDIN_CHUNK)
            if not data:
                break
            sink.write(data)
        sink.close()
    except BrokenPipeError:
        pass


# tty on our pty (runc, runsc)
def _stream_pty(rt: Any, argv: List[str], stdin: Optional[BinaryIO], stdout: Any,
                resize: ResizeSource) -> Tuple[int, bytes]:
    master, slave = pty.openpty()
    tty_module.setraw(slave)  # the container's console does the line discipline; ours only carries bytes
    try:
        process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            argv, stdin=slave, stdout=slave, stderr=slave, env=rt.runtime_env(), start_new_session=True,
            preexec_fn=_take_controlling_tty)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    transcript = _Transcript(stdout)
    try:
        relay_console(master, stdin, transcript, resize)
        process.wait()
    except BaseException:
        _kill_session(process)
        raise
    finally:
        os.close(master)
    return process.returncode, bytes(transcript.kept)


def _take_controlling_tty() -> None:
    """In the child, after setsid: make stdin (the pty slave) the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# tty through --console-socket (crun)
def _stream_console_socket(rt: Any, base: Tuple[Any, ...], workspace: ExecWorkspace, stdin: Optional[BinaryIO],
                           stdout: Any, resize: ResizeSource) -> Tuple[int, bytes]:
    dir_fd = os.open(workspace.exec_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # through our fd on the directory, the path stays far below the 108-byte limit
        path = "/proc/{}/fd/{}/{}".format(os.getpid(), dir_fd, os.path.basename(workspace.file("console")))
        server.bind(path)
        server.listen(1)
        argv = exec_argv(*base, extra=["--tty", "--console-socket", path])
        process = subprocess.Popen(  # noqa: S603 - argv list, never a shell
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=rt.runtime_env(), start_new_session=True)
        try:
            return _run_with_console(process, server, stdin, stdout, resize)
        except BaseException:
            _kill_session(process)
            raise
    finally:
        server.close()
        os.close(dir_fd)


def _run_with_console(process: "subprocess.Popen[bytes]", server: socket.socket, stdin: Optional[BinaryIO],
                      stdout: Any, resize: ResizeSource) -> Tuple[int, bytes]:
    master = receive_console(server, process)
    if master is None:  # the runtime failed before it made a console: its message is on stdout
        message = process.stdout.read(TRANSCRIPT_BYTES)
        process.stdout.close()
        process.wait()
        return process.returncode, message
    transcript = _Transcript(stdout)
    try:
        relay_console(master, stdin, transcript, resize)
    finally:
        os.close(master)
    process.stdout.close()
    process.wait()
    return process.returncode, bytes(transcript.kept)


def receive_console(server: socket.socket, process: "subprocess.Popen[bytes]") -> Optional[int]:
    """The master fd the runtime sends (SCM_RIGHTS); None when the runtime exits first."""
    pidfd = os.pidfd_open(process.pid)
    try:
        poller = select.poll()
        poller.register(server.fileno(), select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        for fd, _unused in poller.poll(int(CONSOLE_WAIT_SECONDS * 1000)):
            if fd == server.fileno():
                return _accept_fd(server)
        return None
    finally:
        os.close(pidfd)


def _accept_fd(server: socket.socket) -> int:
    connection, _unused = server.accept()
    with connection:
        _unused, ancillary, _unused, _unused = connection.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("i")))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for extra in fds[1:]:
                os.close(extra)
            os.set_inheritable(fds[0], False)
            return fds[0]
    raise ExecSyncError("the runtime connected to the console socket but sent no file descriptor")


# the console relay, shared
def set_window_size(fd: int, height: int, width: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(height), int(width), 0, 0))


def relay_console(master: int, stdin: Optional[BinaryIO], on_output: Writer, resize: ResizeSource) -> None:
    """Copy stdin -> master and master -> output until every holder of the slave side closed it."""
    last_size: Optional[Tuple[int, int]] = None
    poller = select.poll()
    poller.register(master, select.POLLIN)
    source_fd = fileno_or_none(stdin)
    if source_fd is not None:
        poller.register(source_fd, select.POLLIN)
    while True:
        last_size = _apply_resize(master, resize, last_size)
        for fd, _unused in poller.poll(RESIZE_POLL_MS if resize is not None else None):
            if fd == master:
                if not _console_output(master, on_output):
                    return
            elif fd == source_fd:
                data = os.read(source_fd, STDIN_CHUNK)
                if data:
                    os.write(master, data)
                else:
                    poller.unregister(source_fd)
                    source_fd = None
                    os.write(master, b"\x04")  # end of input on a terminal is ^D


def _console_output(master: int, on_output: Writer) -> bool:
    try:
        data = os.read(master, 65536)
    except OSError as exc:
        if exc.errno == errno.EIO:  # the slave side is closed by everyone: the command is done
            return False
        raise
    if not data:
        return False
    on_output(data)
    return True


def _apply_resize(master: int, resize: ResizeSource, last: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if resize is None:
        return last
    size = resize()
    if size is not None and tuple(size) != last:
        set_window_size(master, size[0], size[1])
        return tuple(size)
    return last
