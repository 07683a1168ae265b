"""``ContainerManager``: the caller layer of the runtime (CRI-O's server and internal/lib).

The reference's ``Runtime`` acts but does not persist; its callers look containers up, refuse
what the status does not allow, persist the state, and clean up. This is that layer for
short-lived processes: every operation takes the container's file lock, reloads the state from
disk, acts through ``Runtime``, and writes the state back. Waits for a process to die happen
with the lock released (the reference's "stuck in stopping" bug held it).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.config import RuntimeConfig, load_config
from ansible_collections.daemonless.oci.plugins.module_utils.container import (
    CONTAINER_STATE_CREATED,
    CONTAINER_STATE_PAUSED,
    CONTAINER_STATE_RUNNING,
    CONTAINER_STATE_STOPPED,
    Container,
    ContainerState,
    Metadata,
    now,
)
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ContainerStoppedError,
    ContainerUnknownError,
    InvalidStateError,
    OciError,
    ValidationError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.ids import new_id, validate_id, validate_name
from ansible_collections.daemonless.oci.plugins.module_utils.impl import ExecSyncResponse
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import prepare_for_bundle, process_terminal
from ansible_collections.daemonless.oci.plugins.module_utils.runtime import Runtime
from ansible_collections.daemonless.oci.plugins.module_utils.signals import parse_signal
from ansible_collections.daemonless.oci.plugins.module_utils.state import ContainerFiles, atomic_write_json

DEFAULT_STOP_TIMEOUT = 10.0
START_SETTLE_SECONDS = 2.0  # how long start waits for the runtime to report the container running


@dataclass
class CreateRequest:
    """Everything needed to create a container; validated before anything touches the disk."""

    name: str
    spec: Dict[str, Any]
    handler: str = ""
    labels: Dict[str, str] = field(default_factory=dict)
    annotations: Dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    stop_signal: Any = None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    stdin: bool = False
    stdin_once: bool = False
    image: str = ""
    image_name: str = ""
    image_ref: str = ""
    cgroup_parent: str = ""
    extras: Dict[str, Any] = field(default_factory=dict)


class ContainerManager:
    """Create, start, stop, remove and inspect containers whose state lives on disk."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.paths = runtime.paths
        self.files = ContainerFiles(self.paths)

    @classmethod
    def from_config(cls, config_path: Optional[str] = None,
                    overrides: Optional[Dict[str, Any]] = None) -> "ContainerManager":
        """Build a manager from the configuration file and per-call overrides (for example roots)."""
        config: RuntimeConfig = load_config(config_path, overrides)
        return cls(Runtime(config))

    # lookup
    def find(self, name_or_id: str) -> Optional[Container]:
        """The container with this name (or id), or None."""
        container_id = self.files.lookup_name(validate_name(name_or_id))
        if container_id is None and os.path.exists(self.paths.container_config_file(validate_id(name_or_id))):
            container_id = name_or_id
        if container_id is None:
            return None
        try:
            return self.files.load(container_id)
        except ContainerUnknownError:
            return None

    def get(self, name_or_id: str) -> Container:
        container = self.find(name_or_id)
        if container is None:
            raise ContainerUnknownError("no such container: {}".format(name_or_id))
        return container

    def list(self) -> List[Container]:
        return list(self.files.iter_containers())

    @contextmanager
    def locked(self, container: Container, exclusive: bool = True) -> Iterator[Container]:
        """Hold the container's lock and reload its state, so what we act on is current."""
        with self.files.container_lock(container.id, exclusive):
            try:
                container.from_disk()
            except FileNotFoundError:
                pass
            yield container

    # status
    def refresh(self, container: Container) -> Container:
        """Bring the status up to date, cheaply: a live, verified init pid needs no runtime call."""
        state = container.state
        if state.status in (CONTAINER_STATE_CREATED, CONTAINER_STATE_RUNNING, CONTAINER_STATE_PAUSED):
            supervisor = state.conmon_process()
            if container.is_alive() and (supervisor is None or supervisor.is_alive()):
                return container
        if state.status == CONTAINER_STATE_STOPPED and state.exit_code is not None and state.finished is not None:
            return container
        before = state.to_json()
        self.runtime.update_container_status(container)
        if container.state.to_json() != before:
            self.files.save_state(container)
        return container

    def inspect(self, container: Container) -> Container:
        """Refresh under a shared lock and return the container (read-only callers)."""
        with self.locked(container, exclusive=False):
            return self._refresh_readonly(container)

    def _refresh_readonly(self, container: Container) -> Container:
        state = container.state
        if state.status in (CONTAINER_STATE_CREATED, CONTAINER_STATE_RUNNING, CONTAINER_STATE_PAUSED) \
                and container.is_alive():
            return container
        if state.status == CONTAINER_STATE_STOPPED and state.exit_code is not None:
            return container
        self.runtime.update_container_status(container)
        return container

    # create
    def create(self, request: CreateRequest) -> Container:
        """Create a container (status ``created``); on any failure nothing of it is left."""
        validate_name(request.name)
        snapshot = self.runtime.snapshot(request.handler)
        self.runtime.check_annotations(snapshot.handler, request.annotations)
        stop_signal = "" if request.stop_signal in (None, "") else str(parse_signal(request.stop_signal))
        if request.stop_timeout is None or request.stop_timeout < 0:
            raise ValidationError("stop_timeout must be zero or positive, got {}".format(request.stop_timeout))
        if not isinstance(request.spec, dict) or not (request.spec.get("root") or {}).get("path"):
            raise ValidationError("the OCI spec must be a mapping with root.path set")
        self.paths.ensure_roots()
        container_id = new_id()
        with self.files.store_lock():
            self.files.reserve_name(request.name, container_id)
        try:
            container = self._new_container(container_id, request, snapshot.to_json(), stop_signal)
            with self.files.container_lock(container_id):
                self._create_in_runtime(container, request.cgroup_parent)
            return container
        except BaseException:
            self.files.remove_files(container_id)
            with self.files.store_lock():
                self.files.release_name(request.name, container_id)
            raise

    def _new_container(self, container_id: str, request: CreateRequest, snapshot: Dict[str, Any],
                       stop_signal: str) -> Container:
        extras = dict(request.extras)
        extras["runtime"] = snapshot
        extras["stop_timeout"] = float(request.stop_timeout)
        extras["cgroup_parent"] = request.cgroup_parent or self.runtime.config.cgroup_parent
        container = Container(
            container_id, request.name, self.paths.bundle_dir(container_id),
            request.log_path or self.paths.default_log_path(container_id), labels=request.labels,
            annotations=request.annotations, image=request.image, image_name=request.image_name,
            image_ref=request.image_ref, metadata=Metadata(name=request.name), terminal=process_terminal(request.spec),
            stdin=request.stdin, stdin_once=request.stdin_once, runtime_handler=snapshot["handler"],
            directory=self.paths.container_dir(container_id), stop_signal=stop_signal, spec=request.spec,
            extras=extras)
        os.makedirs(container.dir, mode=0o700, exist_ok=True)
        self.files.save_config(container)
        return container

    def _create_in_runtime(self, container: Container, cgroup_parent: str) -> None:
        """Write a fresh bundle, have the runtime create the container, persist its state."""
        self.paths.ensure_roots()  # the run root is gone after a reboot
        self._write_bundle(container)
        container.state = ContainerState(id=container.id, created=now())
        self.runtime.create_container(container, cgroup_parent)
        self.files.save_config(container)  # create may record conmon's cgroup
        self._settle_status(container, CONTAINER_STATE_CREATED)
        container.set_created()
        self.files.save_state(container)

    def _write_bundle(self, container: Container) -> None:
        """A new bundle directory each time: conmon refuses one that still has ctl/winsz."""
        bundle = container.bundle_path
        shutil.rmtree(os.path.dirname(bundle), ignore_errors=True)
        os.makedirs(bundle, mode=0o700)
        parent = container.extras.get("cgroup_parent") or self.runtime.config.cgroup_parent
        cgroups_path = "/" + "/".join(part for part in (parent.strip("/"), container.id) if part)
        document = prepare_for_bundle(container.spec(), cgroups_path, container.annotations)
        atomic_write_json(os.path.join(bundle, "config.json"), document)
        for stale in (self.paths.persist_exit_file(container.id), os.path.join(container.dir, "oom"),
                      self.paths.exits_file(container.id)):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass

    def _settle_status(self, container: Container, expected: str) -> None:
        """Record the status a successful runtime call implies, without asking the runtime again.

        The runtime just confirmed the transition; if our verified init process still runs, the
        container is in ``expected``. If it is gone (a process that exits at once), the full
        status update finds out how it ended.
        """
        if container.is_alive():
            container.state.status = expected
        else:
            self.runtime.update_container_status(container)

    # start
    def start(self, container: Container) -> bool:
        """Make the container run; returns True when something was done.

        ``created`` starts it; ``paused`` resumes it; ``stopped`` (it exited, was stopped, or the
        host rebooted) creates it again from its stored spec (attempt + 1) and starts it.
        """
        with self.locked(container):
            self.refresh(container)
            status = container.state.status
            if status == CONTAINER_STATE_RUNNING:
                return False
            if status == CONTAINER_STATE_PAUSED:
                self._unpause_locked(container)
                return True
            if status == CONTAINER_STATE_STOPPED:
                self._recreate_locked(container)
            self._start_locked(container)
            return True

    def _start_locked(self, container: Container) -> None:
        if container.state.status != CONTAINER_STATE_CREATED:
            raise InvalidStateError("container {} is {}, not created: cannot start it".format(
                container.name, container.state.status or "unknown"))
        try:
            self.runtime.start_container(container)
        except OciError as exc:
            container.set_start_failed(exc)
            self.files.save_state(container)
            raise
        self._settle_status(container, CONTAINER_STATE_RUNNING)
        self.files.save_state(container)

    def _recreate_locked(self, container: Container) -> None:
        """Replace the runtime's stopped container by a new one from the same stored spec."""
        self.runtime.delete_container(container)
        container.metadata.attempt += 1
        self._create_in_runtime(container, container.extras.get("cgroup_parent", ""))

    # stop
    def stop(self, container: Container, timeout: Optional[float] = None) -> bool:
        """Stop the container (stop signal, then SIGKILL after ``timeout``); True if it was running."""
        grace = self._stop_timeout(container, timeout)
        with self.locked(container):
            self.refresh(container)
            status = container.state.status
            if status == CONTAINER_STATE_STOPPED:
                return False
            if status == CONTAINER_STATE_PAUSED:
                self._unpause_locked(container)
            if status == CONTAINER_STATE_CREATED:
                # Never started: its init waits on the exec FIFO. Deleting it from the runtime is
                # the one way that works on every runtime (runsc keeps its sandbox after a kill).
                self.runtime.delete_container(container)
                self.runtime.wait_container_state_stopped(container)
                self.files.save_state(container)
                return True
            stopping = (container.state.init_pid, container.state.init_start_time)
        try:
            self.runtime.stop_container(container, grace)
        except ContainerStoppedError:
            pass
        with self.locked(container):
            if (container.state.init_pid, container.state.init_start_time) != stopping:
                return True  # another run re-created it meanwhile: the instance we stopped is gone
            self.runtime.wait_container_state_stopped(container)
            self.files.save_state(container)
        return True

    def _stop_timeout(self, container: Container, timeout: Optional[float]) -> float:
        value = container.extras.get("stop_timeout", DEFAULT_STOP_TIMEOUT) if timeout is None else timeout
        if value < 0:
            raise ValidationError("a stop timeout must be zero or positive, got {}".format(value))
        return float(value)

    # remove
    def remove(self, container: Container, timeout: Optional[float] = None) -> None:
        """Stop (if needed), delete from the runtime, and forget the container entirely."""
        self.stop(container, timeout)
        with self.locked(container):
            self.runtime.delete_container(container)
            self.files.remove_files(container.id)
        with self.files.store_lock():
            self.files.release_name(container.name, container.id)

    # pause
    def pause(self, container: Container) -> bool:
        with self.locked(container):
            self.refresh(container)
            status = container.state.status
            if status == CONTAINER_STATE_PAUSED:
                return False
            if status != CONTAINER_STATE_RUNNING:
                raise InvalidStateError("container {} is {}: only a running container can be paused".format(
                    container.name, status))
            self.runtime.pause_container(container)
            self._settle_status(container, CONTAINER_STATE_PAUSED)
            self.files.save_state(container)
            return True

    def unpause(self, container: Container) -> bool:
        with self.locked(container):
            self.refresh(container)
            if container.state.status != CONTAINER_STATE_PAUSED:
                return False
            self._unpause_locked(container)
            return True

    def _unpause_locked(self, container: Container) -> None:
        self.runtime.unpause_container(container)
        self._settle_status(container, CONTAINER_STATE_RUNNING)
        self.files.save_state(container)

    # other operations
    def update_resources(self, container: Container, resources: Dict[str, Any]) -> None:
        """Apply resources in place and store them in the spec, so a later re-create keeps them."""
        with self.locked(container):
            self.refresh(container)
            if container.state.status in (CONTAINER_STATE_RUNNING, CONTAINER_STATE_PAUSED, CONTAINER_STATE_CREATED):
                self.runtime.update_container(container, resources)
            spec = container.spec()
            spec.setdefault("linux", {}).setdefault("resources", {}).update(resources)
            container.set_spec(spec)
            self.files.save_config(container)

    def update_metadata(self, container: Container, *, labels: Optional[Dict[str, str]] = None,
                        stop_signal: Any = None, stop_timeout: Optional[float] = None,
                        extras: Optional[Dict[str, Any]] = None) -> None:
        """Change settings read only at stop time or by callers (labels, stop signal and timeout, extras).

        The running container is not touched: these never go into the OCI config. ``stop_signal``
        ``""`` resets it to the default (SIGTERM); ``None`` leaves any argument as it is.
        """
        if stop_timeout is not None and stop_timeout < 0:
            raise ValidationError("stop_timeout must be zero or positive, got {}".format(stop_timeout))
        signal_text = None if stop_signal is None else ("" if stop_signal == "" else str(parse_signal(stop_signal)))
        with self.locked(container):
            if labels is not None:
                container._labels = dict(labels)
            if signal_text is not None:
                container._stop_signal = signal_text
            if stop_timeout is not None:
                container.extras["stop_timeout"] = float(stop_timeout)
            if extras:
                container.extras.update(extras)
            self.files.save_config(container)

    def signal(self, container: Container, signum: Any) -> None:
        number = parse_signal(signum)
        with self.locked(container):
            self.refresh(container)
            if container.state.status != CONTAINER_STATE_RUNNING:
                raise InvalidStateError("container {} is {}: only a running container can be signalled".format(
                    container.name, container.state.status))
            self.runtime.signal_container(container, number)

    def exec_sync(self, container: Container, command: List[str], timeout: float, **options: Any) -> ExecSyncResponse:
        """Run a command in a running container (no lock held while it runs)."""
        with self.locked(container, exclusive=False):
            self._refresh_readonly(container)
        if container.state.status != CONTAINER_STATE_RUNNING or not container.is_alive():
            raise InvalidStateError("container {} is {}: exec needs a running container".format(
                container.name, container.state.status or "unknown"))
        return self.runtime.exec_sync_container(container, command, timeout, **options)
