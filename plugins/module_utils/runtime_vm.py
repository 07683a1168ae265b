"""The ``vm`` implementation: a containerd shim v2 (Kata's way of running a container in a VM).

Follows section 3 of the behaviour spec (``runtime_vm.go``) with its deviations: the configured
shim path is executed (never a ``$PATH`` lookup), the address comes from stdout only in any of
its three forms, a stop whose Kill meets an already gone task counts as stopped, a timed-out
exec-sync answers ``exit_code=-1`` like the ``oci`` path, both cgroup metrics versions are
decoded, and log reopening works.

A module is a short-lived process, so nothing lives in memory between calls (the reference's
per-container object does, and is lost on restart, 3.8). Per container, under its run dir:

* ``vm/shim.json``: the shim's ``ShimHandle.record()``; every call dials the shim from it;
* ``vm/io-*/``: the container's stdout/stderr (and stdin) FIFOs; ``vm/ctl``: the monitor's
  control FIFO; ``vm/monitor.json``: the monitor's own identity; ``vm/shim.log``: the shim's log;
* the monitor's identity also in ``state.conmon_pid``/``conmon_start_time`` and the exit code in
  the persist dir's ``exit`` file, where the ``oci`` path keeps conmon's, so status code,
  ``Manager.refresh`` and dead-supervisor detection are shared.

Shim processes run in the containerd namespace ``daemonless-oci``: the runc shim keeps its runc
state under ``/run/containerd/runc/daemonless-oci`` and its socket under ``/run/containerd/s``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils import logs, vm_monitor
from ansible_collections.daemonless.oci.plugins.module_utils.config import SAFE_PATH, RuntimeConfig
from ansible_collections.daemonless.oci.plugins.module_utils.conmon import read_exit_file
from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    CONTAINER_STATE_CREATED,
    CONTAINER_STATE_PAUSED,
    CONTAINER_STATE_RUNNING,
    CONTAINER_STATE_STOPPED,
    Container,
    now,
)
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ExecSyncError,
    NotFoundError,
    NotInitializedError,
    OciError,
    ValidationError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.exec_sync import (
    ExecOptions,
    check_command,
    exec_process,
    failure_response,
    kill_exec_tree,
    timed_out_response,
)
from ansible_collections.daemonless.oci.plugins.module_utils.impl import ExecSyncResponse, RuntimeImpl, RuntimeSnapshot
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity
from ansible_collections.daemonless.oci.plugins.module_utils.shim import (
    ProcessIO,
    ShimError,
    ShimHandle,
    TaskClient,
    shutdown_and_cleanup,
    start_shim,
)
from ansible_collections.daemonless.oci.plugins.module_utils.signals import parse_signal
from ansible_collections.daemonless.oci.plugins.module_utils.state import StatePaths, atomic_write_json, \
    make_private_dir
from ansible_collections.daemonless.oci.plugins.module_utils.streams import writer_for
from ansible_collections.daemonless.oci.plugins.module_utils.ttrpc import (
    TtrpcClosedError,
    TtrpcDeadlineExceededError,
    TtrpcDialError,
    TtrpcError,
    TtrpcNotFoundError,
)

NAMESPACE = "daemonless-oci"
RUNC_SHIM_STATE_ROOT = "/run/containerd/runc"
KILL_WAIT_SECONDS = 120.0       # after SIGKILL, as the reference
SHIM_START_TIMEOUT = 60.0
DIAL_TIMEOUT = 5.0
EXEC_DRAIN_SECONDS = 2.0        # after an exec exited, how long its output FIFOs may take to reach EOF
MONITOR_EXIT_SECONDS = 5.0
STDIN_DRAIN_SECONDS = 5.0
LOST_EXIT_CODE = 255
STATUS_MAP = {"created": CONTAINER_STATE_CREATED, "running": CONTAINER_STATE_RUNNING,
              "stopped": CONTAINER_STATE_STOPPED, "paused": CONTAINER_STATE_PAUSED}


class ShimGoneError(OciError):
    """The container's shim cannot be reached (it died, or the host rebooted)."""


def map_status(shim_status: str, previous: str) -> str:
    """Shim status -> container status; ``unknown`` and ``pausing`` keep the previous one (spec 3.6)."""
    return STATUS_MAP.get(shim_status, previous)


class VmPaths:
    """The files of one vm container, all under ``StatePaths.run_dir`` of a validated id."""

    def __init__(self, paths: StatePaths, container_id: str) -> None:
        self.directory = os.path.join(paths.run_dir(container_id), "vm")
        self.shim_record = os.path.join(self.directory, "shim.json")
        self.control = os.path.join(self.directory, "ctl")
        self.identity = os.path.join(self.directory, "monitor.json")
        self.shim_log = os.path.join(self.directory, "shim.log")
        self.exec_dir = os.path.join(self.directory, "exec")


class VmRuntime(RuntimeImpl):
    """A containerd shim v2 per container, plus a detached monitor (``vm_monitor``)."""

    def __init__(self, snapshot: RuntimeSnapshot, config: RuntimeConfig, paths: StatePaths) -> None:
        self.snapshot = snapshot
        self.config = config
        self.paths = paths

    # connecting
    def _files(self, container: Container) -> VmPaths:
        return VmPaths(self.paths, container.id)

    def _record(self, container: Container) -> Optional[Dict[str, Any]]:
        try:
            with open(self._files(container).shim_record, "r", encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def _handle(self, container: Container, connect: bool = True) -> ShimHandle:
        """The container's shim, dialed; ``ShimGoneError`` when it is not there any more."""
        record = self._record(container)
        if record is None:
            raise ShimGoneError("container {} has no shim (it was deleted, or the host rebooted)".format(container.id))
        handle = ShimHandle.from_record(record, connect=False)
        identity = handle.identity
        if identity is not None and not identity.is_alive():
            raise ShimGoneError("the shim of container {} (pid {}) is gone".format(container.id, handle.pid))
        if connect:
            try:
                handle.task = TaskClient.dial(handle.address, handle.namespace, dial_timeout=DIAL_TIMEOUT,
                                              call_timeout=self.config.runtime_command_timeout)
            except TtrpcError as exc:
                raise ShimGoneError("the shim of container {} does not answer at {}: {}".format(
                    container.id, handle.address, exc)) from exc
        return handle

    def _task(self, container: Container) -> TaskClient:
        task = self._handle(container).task
        if task is None:
            raise ShimGoneError("no connection to the shim of container {}".format(container.id))
        return task

    def _shim_env(self) -> Dict[str, str]:
        """The shim finds runc (or Kata its hypervisor) through PATH: a fixed, safe one."""
        env = {"PATH": SAFE_PATH}
        if os.environ.get("XDG_RUNTIME_DIR"):
            env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
        return env

    # create
    def create_container(self, container: Container, cgroup_parent: str) -> None:
        """Start the shim, ``Create`` the task with FIFOs we read, then hand them to the monitor.

        The monitor's interpreter is started first, so its start-up overlaps the shim's.
        """
        if container.is_spoofed:
            return
        files = self._files(container)
        make_private_dir(files.directory)
        pending = vm_monitor.prespawn(vm_monitor.library_root(self.paths.persist_root))
        io: Optional[ProcessIO] = None
        handle: Optional[ShimHandle] = None
        try:
            io = ProcessIO.create(files.directory, "io-", stdin=container.stdin, stdout=True, stderr=True)
            handle = start_shim(self.snapshot.runtime_path, container.bundle_path, container.id, NAMESPACE,
                                timeout=min(self.config.create_timeout, SHIM_START_TIMEOUT), env=self._shim_env(),
                                call_timeout=self.config.runtime_command_timeout, fresh_bundle=True)
            atomic_write_json(files.shim_record, handle.record())
            pid = handle.task.create(container.id, container.bundle_path, stdin=io.stdin_path,
                                     stdout=io.stdout_path, stderr=io.stderr_path, terminal=container.terminal,
                                     timeout=self.config.create_timeout)
            container.state.set_init_pid(pid)
            self._start_monitor(container, files, handle, io, pending)
        except BaseException:
            pending.cancel()
            self._clean_failed_create(container, handle, io)
            raise
        finally:
            if handle is not None and handle.task is not None:
                handle.task.close()

    def _start_monitor(self, container: Container, files: VmPaths, handle: ShimHandle, io: ProcessIO,
                       pending: vm_monitor.PendingMonitor) -> None:
        os.mkfifo(files.control, 0o600)
        fds = io.detach_fds()
        log_fd = handle.log.detach() if handle.log is not None else -1
        handle.log = None
        config = vm_monitor.MonitorConfig(
            container_id=container.id, namespace=NAMESPACE, address=handle.address, log_path=container.log_path,
            log_size_max=self.config.log_size_max, exit_file=self.paths.persist_exit_file(container.id),
            control_fifo=files.control, shim_log_file=files.shim_log, identity_file=files.identity,
            stdout_fd=fds.get("stdout", -1), stderr_fd=-1 if container.terminal else fds.get("stderr", -1),
            stdin_fd=fds.get("stdin", -1), shim_log_fd=log_fd)
        try:
            identity = pending.start(config)
        finally:
            for fd in list(fds.values()) + ([log_fd] if log_fd >= 0 else []):
                os.close(fd)
        container.state.conmon_pid = identity.pid
        container.state.conmon_start_time = identity.start_time

    def _clean_failed_create(self, container: Container, handle: Optional[ShimHandle],
                             io: Optional[ProcessIO]) -> None:
        """Remove what a failed create made: the task, the shim, the monitor, the FIFOs (errors ignored)."""
        if handle is not None:
            if handle.task is not None:
                try:
                    handle.task.delete(container.id, timeout=10.0)
                except TtrpcError:
                    pass
            try:
                shutdown_and_cleanup(handle, timeout=5.0, force=True)
            except (ShimError, OSError):
                pass
        self._stop_monitor(container)
        if io is not None:
            io.close()
        shutil.rmtree(self._files(container).directory, ignore_errors=True)
        _remove_namespace_dir_if_empty()

    # start, signals, stop
    def start_container(self, container: Container) -> None:
        if container.is_spoofed:
            return
        started = now()
        task = self._task(container)
        try:
            task.start(container.id)
        except TtrpcError as exc:
            raise OciError("starting container {} through its shim failed: {}".format(container.id, exc)) from exc
        finally:
            task.close()
        container.state.started = started

    def signal_container(self, container: Container, signum: int) -> None:
        """``Kill{all=true}``: every process of the container, as the reference does for signals."""
        if container.is_spoofed:
            return
        number = parse_signal(signum)
        task = self._task(container)
        try:
            task.kill(container.id, number, all_processes=True)
        except TtrpcError as exc:
            raise OciError("signalling container {} failed: {}".format(container.id, exc)) from exc
        finally:
            task.close()

    def stop_container(self, container: Container, timeout: float) -> None:
        """Stop signal, bounded ``Wait``, then SIGKILL and wait up to 2 min; a gone task is stopped."""
        container.should_be_stopped()
        if container.is_spoofed:
            container.state.status = CONTAINER_STATE_STOPPED
            container.state.finished = now()
            return
        try:
            task = self._task(container)
        except ShimGoneError:
            self._stop_without_shim(container, timeout)
            return
        try:
            if timeout > 0:
                if self._kill_and_wait(task, container, container.stop_signal(), timeout):
                    return
            if self._kill_and_wait(task, container, signal.SIGKILL, KILL_WAIT_SECONDS):
                return
            raise OciError("container {} did not exit within {:.0f} s of SIGKILL".format(
                container.id, KILL_WAIT_SECONDS))
        finally:
            task.close()

    def _kill_and_wait(self, task: TaskClient, container: Container, signum: int, timeout: float) -> bool:
        """True once the task exited (or is gone); False if it still runs after ``timeout``."""
        try:
            task.kill(container.id, int(signum))
        except (TtrpcNotFoundError, TtrpcClosedError):
            return True
        except TtrpcError as exc:
            raise OciError("stopping container {}: Kill({}) failed: {}".format(container.id, int(signum), exc)) from exc
        try:
            task.wait(container.id, timeout=timeout)
        except TtrpcDeadlineExceededError:
            return False
        except (TtrpcNotFoundError, TtrpcClosedError):
            return True
        return True

    def _stop_without_shim(self, container: Container, timeout: float) -> None:
        """The shim died: signal the verified init pid ourselves (host pids only; Kata's VM dies with its shim)."""
        try:
            init = container.state.init_process()
            init.verify()
        except (NotFoundError, NotInitializedError):
            container.state.finished = now()
            return
        if timeout > 0 and init.signal(container.stop_signal()) and init.wait_gone(timeout):
            return
        if init.signal(signal.SIGKILL):
            init.wait_gone(KILL_WAIT_SECONDS)
        container.state.finished = now()

    # delete
    def delete_container(self, container: Container) -> None:
        """``Delete`` + ``Shutdown``; then the monitor exits and no FIFO, socket or shim process is left."""
        if container.is_spoofed:
            return
        try:
            handle: Optional[ShimHandle] = self._handle(container)
        except ShimGoneError:
            handle = None
            record = self._record(container)
            if record is not None:
                self._force_cleanup(ShimHandle.from_record(record, connect=False))
        if handle is not None:
            self._delete_task(container, handle)
        self._stop_monitor(container)
        shutil.rmtree(self._files(container).directory, ignore_errors=True)
        _remove_namespace_dir_if_empty()

    def _delete_task(self, container: Container, handle: ShimHandle) -> None:
        if handle.task is None:
            self._force_cleanup(handle)
            return
        try:
            self._delete_with_retry(container, handle.task)
        except TtrpcError:
            self._force_cleanup(handle)
            return
        try:
            shutdown_and_cleanup(handle, timeout=10.0)
        except ShimError:
            self._force_cleanup(handle)

    def _delete_with_retry(self, container: Container, task: TaskClient) -> None:
        """Delete the task; one that still runs is killed first (the manager normally stops before)."""
        try:
            self._record_delete(container, task.delete(container.id))
            return
        except TtrpcNotFoundError:
            return
        except (TtrpcClosedError, TtrpcDialError, TtrpcDeadlineExceededError):
            raise
        except TtrpcError:
            pass  # a running init: the runc shim refuses with code 2
        try:
            task.kill(container.id, signal.SIGKILL, all_processes=True)
            task.wait(container.id, timeout=30.0)
        except TtrpcNotFoundError:
            return
        try:
            self._record_delete(container, task.delete(container.id))
        except TtrpcNotFoundError:
            return

    def _record_delete(self, container: Container, reply: Any) -> None:
        """A task deleted before the monitor recorded its exit (never started): record it ourselves."""
        path = self.paths.persist_exit_file(container.id)
        if not os.path.exists(path) and os.path.isdir(os.path.dirname(path)):
            vm_monitor.write_exit_file(path, reply.exit_status)

    def _force_cleanup(self, handle: ShimHandle) -> None:
        """A dead or unresponsive shim: kill it, run its own ``delete`` action, remove socket and files."""
        if handle.task is not None:
            handle.task.close()
            handle.task = None
        try:
            shutdown_and_cleanup(handle, timeout=2.0, force=True)
        except ShimError as exc:
            raise OciError("cleaning up after the shim of container {} failed: {}".format(
                handle.container_id, exc)) from exc

    def _monitor_identity(self, container: Container) -> Optional[ProcessIdentity]:
        return container.state.conmon_process() or vm_monitor.read_identity(self._files(container).identity)

    def _stop_monitor(self, container: Container) -> None:
        """Ask the monitor to quit (it also quits once the shim is gone); kill it if it does not."""
        identity = self._monitor_identity(container)
        vm_monitor.send(self._files(container).control, "quit")
        if identity is not None and not identity.wait_gone(MONITOR_EXIT_SECONDS):
            identity.signal(signal.SIGKILL)
            identity.wait_gone(MONITOR_EXIT_SECONDS)

    # status
    def update_container_status(self, container: Container) -> None:
        """Status from the shim's ``State`` (spec 3.6); exit code and time also from the monitor's exit file."""
        if container.is_spoofed:
            return
        state = container.state
        if state.status == CONTAINER_STATE_STOPPED and state.exit_code is not None and state.finished is not None:
            return
        try:
            task = self._task(container)
        except ShimGoneError as exc:
            self._mark_shim_gone(container, str(exc))
            return
        try:
            reply = task.state(container.id)
        except TtrpcNotFoundError:
            self._mark_stopped(container, "the shim no longer knows the task")
            return
        except (TtrpcClosedError, TtrpcDialError) as exc:
            self._mark_shim_gone(container, "the shim of container {} went away: {}".format(container.id, exc))
            return
        except TtrpcError as exc:
            raise OciError("failed to get the status of container {} from its shim: {}".format(
                container.id, exc)) from exc
        finally:
            task.close()
        self._apply_state(container, reply)

    def _apply_state(self, container: Container, reply: Any) -> None:
        decoded = container.state.copy()
        decoded.status = map_status(reply.status, decoded.status)
        decoded.pid = reply.pid
        if decoded.status == CONTAINER_STATE_STOPPED:
            decoded.pid = 0
            recorded = read_exit_file(self.paths.persist_exit_file(container.id), not_before=decoded.started)
            decoded.exit_code = reply.exit_status
            decoded.finished = reply.exited_at or (recorded[1] if recorded else now())
        else:
            monitor = self._monitor_identity(container)
            if monitor is not None and not monitor.is_alive():
                decoded.error = ("the vm monitor (pid {}) is gone: the container runs unsupervised; its output is no "
                                 "longer logged and its exit code cannot be recorded".format(monitor.pid))
        container.state = decoded

    def _mark_stopped(self, container: Container, why: str) -> None:
        """No task: stopped, with the monitor's exit file if it wrote one, else the reference's 255."""
        state = container.state
        state.status = CONTAINER_STATE_STOPPED
        state.pid = 0
        recorded = read_exit_file(self.paths.persist_exit_file(container.id), not_before=state.started)
        if recorded is not None:
            state.exit_code, finished = recorded
            state.finished = state.finished or finished
            return
        state.exit_code = LOST_EXIT_CODE
        state.finished = state.finished or now()
        state.error = state.error or "{} and no exit code was recorded".format(why)

    def _mark_shim_gone(self, container: Container, why: str) -> None:
        """The shim is unreachable: the exit file if any; else a live init keeps its status, with the error."""
        if os.path.exists(self.paths.persist_exit_file(container.id)) or not container.is_alive():
            self._mark_stopped(container, why)
            return
        container.state.error = "{}; the container still runs without its shim: stop or remove it".format(why)

    # pause, update, log
    def pause_container(self, container: Container) -> None:
        if not container.is_spoofed:
            self._simple_call(container, "pause", lambda task: task.pause(container.id))

    def unpause_container(self, container: Container) -> None:
        if not container.is_spoofed:
            self._simple_call(container, "resume", lambda task: task.resume(container.id))

    def update_container(self, container: Container, resources: Dict[str, Any]) -> None:
        if not container.is_spoofed:
            self._simple_call(container, "update resources of",
                              lambda task: task.update(container.id, resources))

    def _simple_call(self, container: Container, what: str, call: Callable[[TaskClient], Any]) -> Any:
        task = self._task(container)
        try:
            return call(task)
        except TtrpcError as exc:
            raise OciError("failed to {} container {}: {}".format(what, container.id, exc)) from exc
        finally:
            task.close()

    def reopen_container_log(self, container: Container) -> None:
        """Ask the monitor to reopen (truncate) the log, and wait, bounded, until it has."""
        if container.is_spoofed:
            return
        control = self._files(container).control

        def ask_monitor() -> None:
            if not vm_monitor.send(control, "reopen"):
                raise OciError("container {} has no running vm monitor to reopen its log".format(container.id))
        logs.reopen_and_wait(container.log_path, ask_monitor, "the vm monitor")

    # stats
    def container_stats(self, container: Container, cgroup_parent: str) -> Any:
        """The shim's ``Stats`` (cgroup v1 or v2 metrics) as the ``ContainerStats`` the oci path returns."""
        from ansible_collections.daemonless.oci.plugins.module_utils import stats as statslib
        if container.is_spoofed or container.state.init_pid <= 0 or not container.is_alive():
            return statslib.ContainerStats.stopped(container.id)
        try:
            decoded = self._simple_call(container, "read stats of", lambda task: task.stats(container.id))
        except ShimGoneError:
            return statslib.ContainerStats.stopped(container.id)
        return metrics_to_stats(container.id, decoded)

    # exec
    def exec_sync_container(self, container: Container, command: List[str], timeout: float,
                            **options: Any) -> ExecSyncResponse:
        """``Exec`` + ``Start`` + ``Wait`` with a hard timeout; on timeout SIGKILL the exec and its tree."""
        command = check_command(command)
        parsed = ExecOptions.parse(options)
        if container.is_spoofed:
            return ExecSyncResponse()
        terminal = bool(parsed.tty)
        if terminal and parsed.stdin is not None:
            raise ValidationError("an exec-sync with a tty cannot take stdin (closing it hangs up the terminal); "
                                  "use the streaming exec")
        task = self._task(container)
        io = self._exec_io(container, parsed.stdin is not None, terminal, limit=parsed.output_limit)
        exec_id = secrets.token_hex(16)
        try:
            process = exec_process(container, command, parsed, terminal)
            started = self._exec_start(task, container, exec_id, process, io, terminal)
            if isinstance(started, ExecSyncResponse):
                return started
            if parsed.stdin is not None:
                _feed_stdin(task, container.id, exec_id, io, bytes(parsed.stdin))
            return self._exec_wait(task, container, exec_id, started, io, float(timeout or 0))
        finally:
            io.close()
            task.close()

    def _exec_io(self, container: Container, stdin: bool, terminal: bool, limit: int = 16 << 20,
                 sinks: Optional[Dict[str, Callable[[bytes], None]]] = None) -> ProcessIO:
        exec_dir = self._files(container).exec_dir
        make_private_dir(exec_dir)
        return ProcessIO.create(exec_dir, "x-", stdin=stdin, stdout=True, stderr=not terminal, limit=limit,
                                sinks=sinks)

    def _exec_start(self, task: TaskClient, container: Container, exec_id: str, process: Dict[str, Any],
                    io: ProcessIO, terminal: bool) -> Any:
        """Register and start the exec; its pid, or the 126/127 response when the command cannot run."""
        try:
            task.exec(container.id, exec_id, process, stdin=io.stdin_path, stdout=io.stdout_path,
                      stderr=io.stderr_path, terminal=terminal)
        except TtrpcError as exc:
            raise ExecSyncError("the shim refused the exec: {}".format(exc)) from exc
        try:
            return task.start(container.id, exec_id)
        except TtrpcError as exc:
            _quiet_delete(task, container.id, exec_id)
            return failure_response(exc.status_message)

    def _exec_wait(self, task: TaskClient, container: Container, exec_id: str, pid: int, io: ProcessIO,
                   timeout: float) -> ExecSyncResponse:
        try:
            exited = task.wait(container.id, exec_id, timeout=timeout if timeout > 0 else None)
        except TtrpcDeadlineExceededError:
            self._kill_exec(task, container, exec_id, pid)
            io.wait_eof(EXEC_DRAIN_SECONDS)
            stdout, stderr = io.output()
            _quiet_delete(task, container.id, exec_id)
            return timed_out_response(stdout, stderr, io.truncated)
        except TtrpcError as exc:
            self._kill_exec(task, container, exec_id, pid)
            _quiet_delete(task, container.id, exec_id)
            raise ExecSyncError("waiting for the exec failed: {}".format(exc)) from exc
        io.wait_eof(EXEC_DRAIN_SECONDS)
        stdout, stderr = io.output()
        _quiet_delete(task, container.id, exec_id)
        return ExecSyncResponse(stdout=stdout, stderr=stderr, exit_code=exited.exit_status, truncated=io.truncated)

    def _kill_exec(self, task: TaskClient, container: Container, exec_id: str, pid: int) -> None:
        """SIGKILL the exec through the shim, then what it forked (host-visible pids: the runc shim)."""
        try:
            task.kill(container.id, signal.SIGKILL, exec_id=exec_id)
        except TtrpcError:
            pass
        kill_exec_tree(container, pid)
        try:
            task.wait(container.id, exec_id, timeout=10.0)
        except TtrpcError:
            pass

    def exec_container(self, container: Container, command: List[str], stdin: Optional[Any], stdout: Any,
                       stderr: Any, tty: bool, resize: Optional[Callable[[], Optional[tuple]]] = None,
                       **options: Any) -> int:
        """Streaming exec: ``Exec`` with FIFOs whose output goes straight to ``stdout``/``stderr``."""
        command = check_command(command)
        parsed = ExecOptions.parse(options)
        if container.is_spoofed:
            return 0
        task = self._task(container)
        sinks = {"stdout": writer_for(stdout), "stderr": writer_for(stderr)}
        io = self._exec_io(container, stdin is not None, tty, sinks=sinks)
        exec_id = secrets.token_hex(16)
        try:
            started = self._exec_start(task, container, exec_id, exec_process(container, command, parsed, tty),
                                       io, tty)
            if isinstance(started, ExecSyncResponse):
                raise ExecSyncError(started.stderr.decode("utf-8", "replace"), exit_code=started.exit_code)
            if tty and resize is not None:
                _resize(task, container.id, exec_id, resize())
            if stdin is not None:
                _start_stdin_copy(task, container.id, exec_id, io, stdin, close_at_eof=not tty)
            exited = task.wait(container.id, exec_id)
            io.wait_eof(EXEC_DRAIN_SECONDS)
            _quiet_delete(task, container.id, exec_id)
            return exited.exit_status
        except TtrpcError as exc:
            raise ExecSyncError("exec through the shim failed: {}".format(exc)) from exc
        finally:
            io.close()
            task.close()

    # not available on this path yet
    def attach_container(self, container: Container, stdin: Optional[Any], stdout: Any, stderr: Any, tty: bool,
                         resize: Optional[Callable[[], Optional[tuple]]] = None) -> None:
        raise OciError("attach is not supported for vm handlers yet (container {})".format(container.id))

    def port_forward_container(self, container: Container, netns_path: str, port: int, stream: Any) -> None:
        raise OciError("port forwarding is not supported for vm handlers yet (container {})".format(container.id))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def metrics_to_stats(container_id: str, decoded: Dict[str, Any]) -> Any:
    """``shim.decode_metrics`` output -> ``stats.ContainerStats`` (same meanings as the cgroup reader)."""
    from ansible_collections.daemonless.oci.plugins.module_utils import stats as statslib
    result = statslib.ContainerStats(container=container_id, system_nano=time.time_ns())
    result.monotonic_ns = time.monotonic_ns()
    cpu, memory, pids = decoded["cpu"], decoded["memory"], decoded["pids"]
    result.cpu_nano, result.cpu_user_nano, result.cpu_system_nano = cpu["usage_ns"], cpu["user_ns"], cpu["system_ns"]
    result.mem_usage = memory["usage"]
    raw_limit = memory["limit"]
    result.mem_raw_limit = raw_limit if 0 < raw_limit < statslib.UNLIMITED_FROM else None
    result.mem_limit = min(result.mem_raw_limit or statslib.MAX_U64, statslib.host_memory_bytes())
    result.mem_perc = result.mem_usage / result.mem_limit if result.mem_limit else 0.0
    result.working_set_bytes = memory["working_set"]
    result.mem_rss, result.mem_cache, result.oom_events = memory["rss"], memory["cache"], memory["oom_kill"]
    result.pids = pids["current"]
    result.pids_limit = pids["limit"] or None
    for entry in decoded["io"]:
        key = "{}:{}".format(entry["major"], entry["minor"])
        device = statslib.BlockDeviceStats(entry["major"], entry["minor"], statslib.device_name(key),
                                           entry["read_bytes"], entry["write_bytes"], entry["read_ios"],
                                           entry["write_ios"])
        result.block_devices[key] = device
        result.block_input += device.read_bytes
        result.block_output += device.write_bytes
    _network(result, decoded["network"], statslib)
    result.cgroup_version = "v{}".format(decoded["cgroup_version"])
    result.warnings.append("figures from the shim's Stats call ({})".format(decoded["type_url"]))
    return result


def _network(result: Any, entries: List[Dict[str, Any]], statslib: Any) -> None:
    if not entries:
        result.network_available = False
        result.warnings.append("the shim reports no network counters")
        return
    for entry in entries:
        counters = statslib.InterfaceStats(entry["rx_bytes"], entry["rx_packets"], entry["rx_errors"],
                                           entry["rx_dropped"], entry["tx_bytes"], entry["tx_packets"],
                                           entry["tx_errors"], entry["tx_dropped"])
        result.networks[entry["name"]] = counters
        result.net_input += counters.rx_bytes
        result.net_output += counters.tx_bytes


def _resize(task: TaskClient, container_id: str, exec_id: str, size: Optional[tuple]) -> None:
    """Apply (height, width) to the exec's pty; a process that already exited has none (ignored)."""
    if not size:
        return
    try:
        task.resize_pty(container_id, width=int(size[1]), height=int(size[0]), exec_id=exec_id)
    except TtrpcError:
        pass


def _quiet_delete(task: TaskClient, container_id: str, exec_id: str) -> None:
    try:
        task.delete(container_id, exec_id)
    except TtrpcError:
        pass


def _feed_stdin(task: TaskClient, container_id: str, exec_id: str, io: ProcessIO, data: bytes) -> None:
    """Write stdin in a thread (a process that does not read must not block us past the timeout), then EOF."""
    def feed() -> None:
        try:
            io.write_stdin(data)
        except OSError:
            pass
        _close_stdin(task, container_id, exec_id, io)
    threading.Thread(target=feed, name="exec-stdin", daemon=True).start()


def _start_stdin_copy(task: TaskClient, container_id: str, exec_id: str, io: ProcessIO, source: Any,
                      close_at_eof: bool = True) -> None:
    """Copy ``source`` to the exec's stdin in a thread. With a terminal, closing stdin makes the
    shim hang up the console (SIGHUP to the process), so then EOF only ends the copy."""
    def copy() -> None:
        try:
            while True:
                data = source.read(65536)
                if not data:
                    break
                io.write_stdin(data)
        except (OSError, ValueError):
            pass
        if close_at_eof:
            _close_stdin(task, container_id, exec_id, io)
    threading.Thread(target=copy, name="exec-stdin", daemon=True).start()


def _close_stdin(task: TaskClient, container_id: str, exec_id: str, io: ProcessIO) -> None:
    """EOF on stdin: wait (bounded) until the shim read what we wrote, close our end, then ``CloseIO``.

    The runc shim's CloseIO closes its FIFO reader at once and drops unread bytes; closing our
    (only) writer alone already gives the process EOF there, CloseIO is for shims that need it.
    """
    deadline = time.monotonic() + STDIN_DRAIN_SECONDS
    try:
        while io.stdin_pending() and time.monotonic() < deadline:
            time.sleep(0.005)
    except OSError:
        pass
    io.close_stdin()
    try:
        task.close_io(container_id, exec_id)
    except TtrpcError:
        pass


def _remove_namespace_dir_if_empty() -> None:
    """The runc shim's state root for our namespace; removed when no container is left in it."""
    try:
        os.rmdir(os.path.join(RUNC_SHIM_STATE_ROOT, NAMESPACE))
    except OSError:
        pass
