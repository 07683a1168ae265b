"""The ``oci`` implementation: conmon supervising an OCI runtime CLI (runc, crun, runsc).

Follows section 1.9 of the behaviour spec, with the deviations it marks: conmon is killed and
reaped on every early failure, the exit file is waited for before a lost container is declared
255, a dead conmon is noticed through its recorded (pid, start time), and no wait ever holds
the container's file lock (the caller, ``manager.py``, owns locking).
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils import cgroups, conmon, logs
from ansible_collections.daemonless.oci.plugins.module_utils.config import SAFE_PATH, RuntimeConfig
from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    CONTAINER_STATE_STOPPED,
    Container,
    now,
)
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    CommandError,
    ConmonError,
    CreateTimeoutError,
    NotFoundError,
    NotInitializedError,
    OciError,
    UnsupportedHostError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.impl import ExecSyncResponse, RuntimeImpl, RuntimeSnapshot
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import (
    CompletedCommand,
    ProcessIdentity,
    read_pid_file,
    run_command,
    wait_child,
)
from ansible_collections.daemonless.oci.plugins.module_utils.signals import parse_signal
from ansible_collections.daemonless.oci.plugins.module_utils.state import StatePaths

KILL_WAIT_SECONDS = 120.0      # how long stop waits after SIGKILL before signalling the pid itself
EXIT_FILE_WAIT_SECONDS = 3.7   # the reference's back-off total for conmon's exit file
LOST_EXIT_CODE = 255
_HYBRID_MARKER = "cgroups in hybrid mode not supported"


class OciRuntime(RuntimeImpl):
    """conmon + an OCI runtime, for one handler snapshot."""

    def __init__(self, snapshot: RuntimeSnapshot, config: RuntimeConfig, paths: StatePaths) -> None:
        self.snapshot = snapshot
        self.config = config
        self.paths = paths

    # running the runtime directly
    def runtime_argv(self, *arguments: str) -> List[str]:
        """``[runtime, --root, R, <global flags>, <subcommand>...]``."""
        return [self.snapshot.runtime_path, "--root", self.snapshot.runtime_root,
                *self.snapshot.runtime_args, *arguments]

    def runtime_env(self) -> Dict[str, str]:
        """A minimal environment for runtime calls: a safe PATH, plus XDG_RUNTIME_DIR when set.

        (The reference passes its whole environment, or only XDG_RUNTIME_DIR when that is set; a
        module's environment is whatever the controller sent, so we pass neither.)
        """
        env = {"PATH": SAFE_PATH}
        if os.environ.get("XDG_RUNTIME_DIR"):
            env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
        return env

    def run_runtime(self, *arguments: str, input_data: Optional[bytes] = None, check: bool = True) -> CompletedCommand:
        return run_command(self.runtime_argv(*arguments), input_data=input_data, env=self.runtime_env(),
                           timeout=self.config.runtime_command_timeout, check=check)

    # create
    def create_container(self, container: Container, cgroup_parent: str) -> None:
        if container.is_spoofed:
            return
        conmon.require_supported_version(self.snapshot.conmon, self.paths.run_root)
        os.makedirs(self.snapshot.runtime_root, mode=0o700, exist_ok=True)
        options = self._create_options(container)
        logs.create_private(container.log_path)
        stderr_path = os.path.join(os.path.dirname(container.bundle_path), "conmon.stderr")
        spawned = conmon.spawn_for_create(conmon.create_argv(options), self.snapshot.conmon_env,
                                          container.bundle_path, stderr_path)
        cgroup_dirs: List[str] = []
        try:
            try:
                cgroup_dirs = self._place_conmon(container, spawned.process.pid)
                spawned.release()
            except BaseException:
                _kill_and_reap(spawned)
                cgroups.remove_dirs(cgroup_dirs)
                raise
            try:
                self._finish_create(container, spawned, options)
            except BaseException:
                self._clean_failed_create(container, options, cgroup_dirs)
                raise
        finally:
            spawned.close()

    def _create_options(self, container: Container) -> conmon.CreateOptions:
        return conmon.CreateOptions(
            conmon=self.snapshot.conmon, container_id=container.id, name=container.name,
            bundle=container.bundle_path, runtime_path=self.snapshot.runtime_path,
            runtime_root=self.snapshot.runtime_root, runtime_args=self.snapshot.runtime_args,
            exits_dir=self.paths.exits_dir, persist_dir=container.dir, socket_dir=self.paths.attach_dir,
            log_path=container.log_path, log_level=self.config.log_level, log_size_max=self.config.log_size_max,
            systemd_cgroup=self.config.cgroup_manager == "systemd", terminal=container.terminal,
            stdin=container.stdin, stdin_once=container.stdin_once)

    def _place_conmon(self, container: Container, pid: int) -> List[str]:
        """Move conmon into its own cgroup while it waits on the start pipe (children inherit it)."""
        if not self.snapshot.conmon_cgroup:
            return []
        relative = os.path.join(self.snapshot.conmon_cgroup, "conmon-" + container.id)
        container.set_conmon_cgroupfs_path(relative)
        return cgroups.place_process(cgroups.host_mounts(), relative, pid)

    def _finish_create(self, container: Container, spawned: conmon.SpawnedConmon,
                       options: conmon.CreateOptions) -> None:
        """Wait for conmon's first process, read the pid message, record init and conmon identities."""
        timeout = self.config.create_timeout
        code = wait_child(spawned.process, timeout)
        if code is None:
            _kill_and_reap(spawned)
            raise CreateTimeoutError("create container timeout: conmon did not daemonize within {:.0f} s"
                                     .format(timeout))
        if code != 0:
            raise ConmonError("conmon exited with status {} before creating the container: {}".format(
                code, spawned.stderr_text() or "(no message)"))
        try:
            message = conmon.read_sync_message(spawned.sync, timeout)
        except TimeoutError as exc:
            raise CreateTimeoutError("create container timeout: no pid from the runtime within {:.0f} s"
                                     .format(timeout)) from exc
        except ConmonError as exc:
            detail = spawned.stderr_text()
            raise ConmonError("{}{}".format(exc, "; conmon said: " + detail if detail else "")) from exc
        pid = message.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise self._create_failure(str(message.get("message") or "").strip())
        container.state.set_init_pid(pid)
        conmon_pid = read_pid_file(options.conmon_pid_file)
        identity = ProcessIdentity.of(conmon_pid)
        container.state.conmon_pid = identity.pid
        container.state.conmon_start_time = identity.start_time

    def _create_failure(self, message: str) -> OciError:
        """Turn the runtime's create error into one that names the cause."""
        if _HYBRID_MARKER in message:
            controllers = cgroups.hybrid_unified_controllers(cgroups.host_mounts())
            return UnsupportedHostError(
                "{} cannot create containers on this host: its cgroup layout is hybrid (cgroup v1 plus a cgroup2 "
                "mount that lists the controllers {}), which this runtime version refuses. Use another handler "
                "(runc), free those controllers from the cgroup2 mount, or boot with a unified hierarchy. "
                "Runtime said: {}".format(self.snapshot.runtime_path, ", ".join(controllers) or "(unknown)", message))
        return OciError("container create failed: {}".format(message or "(the runtime printed nothing)"))

    def _clean_failed_create(self, container: Container, options: conmon.CreateOptions,
                             cgroup_dirs: List[str]) -> None:
        """Remove what a failed create made: the runtime's container, conmon, conmon's cgroup."""
        self.run_runtime("delete", "--force", container.id, check=False)
        try:
            daemon = ProcessIdentity.of(read_pid_file(options.conmon_pid_file))
        except (OSError, ValueError, NotFoundError, NotInitializedError):
            daemon = None
        if daemon is not None and daemon.signal(signal.SIGKILL):
            daemon.wait_gone(10.0)
        cgroups.remove_dirs(cgroup_dirs)

    # start, signals, stop
    def start_container(self, container: Container) -> None:
        if container.is_spoofed:
            return
        started = now()  # before the call: a fast process can exit before the runtime returns
        self.run_runtime("start", container.id)
        container.state.started = started

    def signal_container(self, container: Container, signum: int) -> None:
        if container.is_spoofed:
            return
        number = parse_signal(signum)
        self.run_runtime("kill", container.id, str(number))

    def stop_container(self, container: Container, timeout: float) -> None:
        """Stop signal, wait up to ``timeout`` s, SIGKILL, wait up to 2 min, then SIGKILL the verified pid."""
        container.should_be_stopped()
        if container.is_spoofed:
            container.state.status = CONTAINER_STATE_STOPPED
            container.state.finished = now()
            return
        try:
            init = container.state.init_process()
            init.verify()
        except (NotFoundError, NotInitializedError):
            container.state.finished = now()
            return
        if timeout > 0:
            self._kill_through_runtime(container, init, container.stop_signal())
            if init.wait_gone(timeout):
                return
        self._kill_through_runtime(container, init, signal.SIGKILL)
        if init.wait_gone(KILL_WAIT_SECONDS):
            return
        init.signal(signal.SIGKILL)
        container.state.finished = now()

    def _kill_through_runtime(self, container: Container, init: ProcessIdentity, signum: int) -> None:
        result = self.run_runtime("kill", container.id, str(int(signum)), check=False)
        if result.returncode != 0 and not init.is_alive():
            container.state.finished = now()

    # delete
    def delete_container(self, container: Container) -> None:
        if container.is_spoofed:
            return
        result = self.run_runtime("delete", "--force", container.id, check=False)
        if result.returncode != 0 and not _says_missing(result) and self._runtime_knows(container):
            raise CommandError(result.argv, result.returncode, result.stdout, result.stderr)
        supervisor = container.state.conmon_process()
        if supervisor is not None and not supervisor.wait_gone(10.0):
            supervisor.signal(signal.SIGKILL)
            supervisor.wait_gone(5.0)
        if container.conmon_cgroupfs_path:
            cgroups.remove_dirs(cgroups.cgroup_dirs_for(cgroups.host_mounts(), container.conmon_cgroupfs_path))

    def _runtime_knows(self, container: Container) -> bool:
        """Whether the runtime still has state for the container after a failed delete.

        gVisor's delete of a sandbox that died reports a failure ("stopping container: context deadline
        exceeded") after removing its state; what counts is whether anything is left to delete.
        """
        result = self.run_runtime("state", container.id, check=False)
        return result.returncode == 0 or not _says_missing(result)

    # status
    def update_container_status(self, container: Container) -> None:
        """Status from ``runtime state``; on ``stopped`` the exit code and time from conmon's exit file."""
        if container.is_spoofed:
            return
        state = container.state
        if state.exit_code is not None and state.finished is not None:
            return
        if state.init_pid > 0 and not container.is_alive() and self._stopped_from_exit_file(container):
            return
        result = self.run_runtime("state", container.id, check=False)
        if result.returncode != 0:
            self._mark_lost(container, result)
            return
        try:
            decoded_json = json.loads(result.stdout.decode("utf-8"))
        except ValueError as exc:
            raise OciError("failed to decode container status for {}: {}".format(container.id, exc)) from exc
        decoded = state.copy()
        decoded.update_from_json(decoded_json)
        if decoded.status != CONTAINER_STATE_STOPPED:
            supervisor = decoded.conmon_process()
            if supervisor is not None and not supervisor.is_alive():
                decoded.error = ("conmon (pid {}) is gone: the container runs unsupervised; its output is no longer "
                                 "logged and its exit code cannot be recorded".format(supervisor.pid))
            container.state = decoded
            return
        self._apply_exit(container, decoded)
        container.state = decoded

    def _stopped_from_exit_file(self, container: Container) -> bool:
        """Our verified init process is gone, so the container has stopped: take conmon's record.

        This saves a ``runtime state`` call on every stop; when conmon left no record the caller
        falls back to asking the runtime, as the reference always does.
        """
        self._wait_for_exit_file(container)
        decoded = container.state.copy()
        decoded.status = CONTAINER_STATE_STOPPED
        decoded.pid = 0
        if not self._read_exit(container, decoded):
            return False
        container.state = decoded
        return True

    def _mark_lost(self, container: Container, result: CompletedCommand) -> None:
        """The runtime no longer knows the container (deleted, reboot, crash): it is stopped."""
        state = container.state
        state.status = CONTAINER_STATE_STOPPED
        state.pid = 0
        self._wait_for_exit_file(container)
        if not self._read_exit(container, state):
            state.finished = now()
            state.exit_code = LOST_EXIT_CODE
            state.error = state.error or "the runtime lost the container and conmon recorded no exit code: {}".format(
                (result.stderr or result.stdout).decode("utf-8", "replace").strip())

    def _apply_exit(self, container: Container, state: Any) -> None:
        """Fill exit code, finished time and OOM for a container the runtime reports stopped."""
        self._wait_for_exit_file(container)
        if self._read_exit(container, state):
            return
        supervisor = state.conmon_process()
        if supervisor is None or not supervisor.is_alive():
            state.finished = now()
            state.exit_code = LOST_EXIT_CODE
            state.error = "conmon exited without recording the container's exit code"

    def _read_exit(self, container: Container, state: Any) -> bool:
        exit_info = conmon.read_exit_file(self.paths.persist_exit_file(container.id), not_before=state.started)
        if exit_info is None:
            return False
        state.exit_code, state.finished = exit_info
        for marker in (os.path.join(container.bundle_path, "oom"), os.path.join(container.dir, "oom")):
            if os.path.exists(marker):
                state.oom_killed = True
        return True

    def _wait_for_exit_file(self, container: Container) -> None:
        """conmon writes the exit file and then exits: wait on its pidfd, bounded like the reference."""
        path = self.paths.persist_exit_file(container.id)
        if os.path.exists(path):
            return
        supervisor = container.state.conmon_process()
        if supervisor is not None:
            supervisor.wait_gone(EXIT_FILE_WAIT_SECONDS)
            return
        delay, deadline = 0.05, time.monotonic() + EXIT_FILE_WAIT_SECONDS
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # pause, update, log
    def pause_container(self, container: Container) -> None:
        if not container.is_spoofed:
            self.run_runtime("pause", container.id)

    def unpause_container(self, container: Container) -> None:
        if not container.is_spoofed:
            self.run_runtime("resume", container.id)

    def update_container(self, container: Container, resources: Dict[str, Any]) -> None:
        if container.is_spoofed:
            return
        result = self.run_runtime("update", "--resources", "-", container.id,
                                  input_data=json.dumps(resources).encode("utf-8"), check=False)
        if result.returncode != 0:
            raise OciError("updating resources for container {} failed: {} {} (exit status {})".format(
                container.id, result.stderr.decode("utf-8", "replace").strip(),
                result.stdout.decode("utf-8", "replace").strip(), result.returncode))

    def reopen_container_log(self, container: Container) -> None:
        """Ask conmon to reopen (truncate) the log and wait, bounded, until it has."""
        if container.is_spoofed:
            return
        logs.reopen_and_wait(container.log_path,
                             lambda: conmon.write_control(container.bundle_path, conmon.REOPEN_LOGS_EVENT), "conmon")

    # delegated to the files that own each concept
    def container_stats(self, container: Container, cgroup_parent: str) -> Any:
        from ansible_collections.daemonless.oci.plugins.module_utils import stats
        return stats.collect_for_container(container)

    def exec_sync_container(self, container: Container, command: List[str], timeout: float,
                            **options: Any) -> ExecSyncResponse:
        from ansible_collections.daemonless.oci.plugins.module_utils import exec_sync
        return exec_sync.conmon_exec_sync(self, container, command, timeout, **options)

    def exec_container(self, container: Container, command: List[str], stdin: Optional[Any], stdout: Any,
                       stderr: Any, tty: bool, resize: Optional[Callable[[], Optional[tuple]]] = None,
                       **options: Any) -> int:
        from ansible_collections.daemonless.oci.plugins.module_utils import exec_sync
        return exec_sync.runtime_exec(self, container, command, stdin, stdout, stderr, tty, resize, **options)

    def attach_container(self, container: Container, stdin: Optional[Any], stdout: Any, stderr: Any, tty: bool,
                         resize: Optional[Callable[[], Optional[tuple]]] = None) -> None:
        from ansible_collections.daemonless.oci.plugins.module_utils import attach
        attach.attach(self.paths, container, stdin, stdout, stderr, tty, resize)

    def port_forward_container(self, container: Container, netns_path: str, port: int, stream: Any) -> None:
        from ansible_collections.daemonless.oci.plugins.module_utils import attach
        attach.port_forward(self, container, netns_path, port, stream)


def _kill_and_reap(spawned: conmon.SpawnedConmon) -> None:
    """Kill conmon's whole session (it may have forked) and reap the child we started."""
    try:
        os.killpg(spawned.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    spawned.process.wait()


def _says_missing(result: CompletedCommand) -> bool:
    text = (result.stderr + result.stdout).decode("utf-8", "replace").lower()
    return "does not exist" in text or "not found" in text or "no such" in text
