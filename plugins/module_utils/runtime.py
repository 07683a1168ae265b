"""``Runtime``: handler resolution, annotation allow-lists and dispatch to an implementation.

As in the reference, ``Runtime`` never knows how a container runs: it picks the implementation
from the handler's ``runtime_type`` (``vm`` selects the shim implementation, anything else the
conmon one). The reference keeps an id -> implementation map in memory; a module process is
short-lived, so the choice is stored with the container (``extras['runtime']``) at create time
and every later call rebuilds the same implementation from it.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.config import (
    RUNTIME_TYPE_VM,
    RuntimeConfig,
    RuntimeHandler,
)
from ansible_collections.daemonless.oci.plugins.module_utils.container import CONTAINER_STATE_STOPPED, Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ConfigError, HandlerNotFoundError, OciError
from ansible_collections.daemonless.oci.plugins.module_utils.impl import ExecSyncResponse, RuntimeImpl, RuntimeSnapshot
from ansible_collections.daemonless.oci.plugins.module_utils.state import StatePaths

USERNS_ANNOTATION = "io.kubernetes.cri-o.userns-mode"
DEVICES_ANNOTATION = "io.kubernetes.cri-o.Devices"
SHM_SIZE_ANNOTATION = "io.kubernetes.cri-o.ShmSize"
CPU_LOAD_BALANCING_ANNOTATION = "cpu-load-balancing.crio.io"
CPU_QUOTA_ANNOTATION = "cpu-quota.crio.io"
IRQ_LOAD_BALANCING_ANNOTATION = "irq-load-balancing.crio.io"
STATUS_POLL_INTERVAL = 0.1


class Runtime:
    """The configured handlers and the way into their implementations."""

    def __init__(self, config: RuntimeConfig, paths: Optional[StatePaths] = None) -> None:
        self.config = config
        self.paths = paths or StatePaths(config.run_root, config.persist_root)

    # handler resolution
    def runtimes(self) -> Dict[str, RuntimeHandler]:
        return dict(self.config.runtimes)

    def validate_runtime_handler(self, name: str) -> RuntimeHandler:
        """The handler called ``name``, or a ConfigError saying what is wrong with it."""
        if not name:
            raise ConfigError("empty runtime handler")
        handler = self.config.runtimes.get(name)
        if handler is None:
            raise HandlerNotFoundError("failed to find runtime handler {} from runtime list {}".format(
                name, sorted(self.config.runtimes) or "(none configured: install runc, crun or runsc)"))
        if not handler.runtime_path:
            raise ConfigError("empty runtime path for runtime handler {}".format(name))
        return handler

    def _handler(self, name: str) -> RuntimeHandler:
        """Empty name -> the default runtime's handler (the reference's getRuntimeHandler)."""
        return self.validate_runtime_handler(name or self.config.default_runtime)

    def runtime_type(self, name: str) -> str:
        return self._handler(name).runtime_type

    def privileged_without_host_devices(self, name: str) -> bool:
        return self._handler(name).privileged_without_host_devices

    def allow_annotation(self, name: str, annotation: str) -> bool:
        """Exact, case-sensitive membership in the handler's allow-list (no prefixes, no wildcards)."""
        return annotation in self._handler(name).allowed_annotations

    def allow_userns_annotation(self, name: str) -> bool:
        return self.allow_annotation(name, USERNS_ANNOTATION)

    def allow_devices_annotation(self, name: str) -> bool:
        return self.allow_annotation(name, DEVICES_ANNOTATION)

    def allow_shm_size_annotation(self, name: str) -> bool:
        return self.allow_annotation(name, SHM_SIZE_ANNOTATION)

    def allow_cpu_load_balancing_annotation(self, name: str) -> bool:
        return self.allow_annotation(name, CPU_LOAD_BALANCING_ANNOTATION)

    def allow_cpu_quota_annotation(self, name: str) -> bool:
        return self.allow_annotation(name, CPU_QUOTA_ANNOTATION)

    def allow_irq_load_balancing_annotation(self, name: str) -> bool:
        return self.allow_annotation(name, IRQ_LOAD_BALANCING_ANNOTATION)

    GATED_ANNOTATIONS = (USERNS_ANNOTATION, DEVICES_ANNOTATION, SHM_SIZE_ANNOTATION, CPU_LOAD_BALANCING_ANNOTATION,
                         CPU_QUOTA_ANNOTATION, IRQ_LOAD_BALANCING_ANNOTATION)

    def check_annotations(self, name: str, annotations: Dict[str, str]) -> None:
        """Refuse an annotation that changes runtime behaviour unless the handler allows it.

        Annotations outside the gated set are plain metadata and always pass, as in the reference.
        """
        refused = sorted(key for key in annotations
                         if key in self.GATED_ANNOTATIONS and not self.allow_annotation(name, key))
        if refused:
            raise ConfigError("runtime handler {} does not allow the annotation(s) {}; add them to its "
                              "allowed_annotations to use them".format(name, ", ".join(refused)))

    def snapshot(self, name: str) -> RuntimeSnapshot:
        """Freeze the handler's settings for a new container, checking its binaries exist."""
        handler = self._handler(name)
        _require_executable(handler.runtime_path, "runtime binary of handler {}".format(handler.name))
        conmon = self.config.handler_conmon(handler)
        if handler.runtime_type != RUNTIME_TYPE_VM:
            if not conmon:
                raise ConfigError("conmon is not installed (no conmon in PATH and none configured)")
            _require_executable(conmon, "conmon")
        return RuntimeSnapshot(
            handler=handler.name, runtime_type=handler.runtime_type, runtime_path=handler.runtime_path,
            runtime_root=handler.runtime_root or self.paths.runtime_root(handler.name),
            runtime_args=list(handler.runtime_args), conmon=conmon,
            conmon_env=list(self.config.handler_conmon_env(handler)),
            conmon_cgroup=self.config.handler_conmon_cgroup(handler))

    # implementation selection
    def impl(self, container: Container) -> RuntimeImpl:
        """The implementation a container was created with."""
        data = container.extras.get("runtime")
        if not data:
            raise OciError("container {} has no recorded runtime handler".format(container.id))
        snapshot = RuntimeSnapshot.from_json(data)
        if snapshot.runtime_type == RUNTIME_TYPE_VM:
            from ansible_collections.daemonless.oci.plugins.module_utils.runtime_vm import VmRuntime
            return VmRuntime(snapshot, self.config, self.paths)
        from ansible_collections.daemonless.oci.plugins.module_utils.runtime_oci import OciRuntime
        return OciRuntime(snapshot, self.config, self.paths)

    # dispatch
    def create_container(self, container: Container, cgroup_parent: str = "") -> None:
        self.impl(container).create_container(container, cgroup_parent)

    def start_container(self, container: Container) -> None:
        self.impl(container).start_container(container)

    def exec_sync_container(self, container: Container, command: List[str], timeout: float,
                            **options: Any) -> ExecSyncResponse:
        return self.impl(container).exec_sync_container(container, command, timeout, **options)

    def exec_container(self, container: Container, command: List[str], stdin: Optional[Any], stdout: Any,
                       stderr: Any, tty: bool, resize: Optional[Callable[[], Optional[tuple]]] = None,
                       **options: Any) -> int:
        return self.impl(container).exec_container(container, command, stdin, stdout, stderr, tty, resize, **options)

    def update_container(self, container: Container, resources: Dict[str, Any]) -> None:
        self.impl(container).update_container(container, resources)

    def stop_container(self, container: Container, timeout: float) -> None:
        self.impl(container).stop_container(container, timeout)

    def delete_container(self, container: Container) -> None:
        self.impl(container).delete_container(container)

    def update_container_status(self, container: Container) -> None:
        self.impl(container).update_container_status(container)

    def pause_container(self, container: Container) -> None:
        self.impl(container).pause_container(container)

    def unpause_container(self, container: Container) -> None:
        self.impl(container).unpause_container(container)

    def container_stats(self, container: Container, cgroup_parent: str = "") -> Any:
        return self.impl(container).container_stats(container, cgroup_parent)

    def signal_container(self, container: Container, signum: int) -> None:
        self.impl(container).signal_container(container, signum)

    def reopen_container_log(self, container: Container) -> None:
        self.impl(container).reopen_container_log(container)

    def attach_container(self, container: Container, stdin: Optional[Any], stdout: Any, stderr: Any, tty: bool,
                         resize: Optional[Callable[[], Optional[tuple]]] = None) -> None:
        self.impl(container).attach_container(container, stdin, stdout, stderr, tty, resize)

    def port_forward_container(self, container: Container, netns_path: str, port: int, stream: Any) -> None:
        self.impl(container).port_forward_container(container, netns_path, port, stream)

    def wait_container_state_stopped(self, container: Container, timeout: Optional[float] = None) -> None:
        """Poll the status every 100 ms until ``stopped``, for at most ``ctr_stop_timeout`` seconds."""
        impl = self.impl(container)
        limit = max(timeout if timeout is not None else self.config.ctr_stop_timeout, 0.0)
        deadline = time.monotonic() + limit
        while container.state.status != CONTAINER_STATE_STOPPED:
            try:
                impl.update_container_status(container)
            except OciError as exc:
                raise OciError("failed to get container stopped status: {}".format(exc)) from exc
            if container.state.status == CONTAINER_STATE_STOPPED:
                return
            if time.monotonic() >= deadline:
                raise OciError("failed to get container stopped status: {:.0f}s timeout reached".format(limit))
            time.sleep(STATUS_POLL_INTERVAL)


def _require_executable(path: str, what: str) -> None:
    if not os.path.isabs(path):
        raise ConfigError("{} must be an absolute path, got {!r}".format(what, path))
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError("{} {} is missing or not executable".format(what, path))
