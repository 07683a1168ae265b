"""``RuntimeImpl``: the interface between ``Runtime`` and an implementation (``oci`` or ``vm``).

The reference keeps one implementation object per container in memory. A module is a
short-lived process, so here an implementation is rebuilt from the handler snapshot stored in
the container's configuration at create time (``Container.extras['runtime']``): the same binary
and root are used for the container's whole life even if the configuration file changes.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.container import Container


@dataclass
class ExecSyncResponse:
    """What an exec-sync returns: the command's output and exit code (-1 on timeout)."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    timed_out: bool = False
    truncated: bool = False


@dataclass
class RuntimeSnapshot:
    """The handler settings a container was created with."""

    handler: str
    runtime_type: str
    runtime_path: str
    runtime_root: str
    runtime_args: List[str] = field(default_factory=list)
    conmon: str = ""
    conmon_env: List[str] = field(default_factory=list)
    conmon_cgroup: str = ""

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "RuntimeSnapshot":
        return cls(**data)


class RuntimeImpl(abc.ABC):
    """Everything ``Runtime`` delegates for one container; method names follow the reference."""

    @abc.abstractmethod
    def create_container(self, container: Container, cgroup_parent: str) -> None:
        """Create the container and record its init pid (status stays empty until a status update)."""

    @abc.abstractmethod
    def start_container(self, container: Container) -> None:
        """Start a created container's user process."""

    @abc.abstractmethod
    def exec_sync_container(self, container: Container, command: List[str], timeout: float,
                            **options: Any) -> ExecSyncResponse:
        """Run a command in the container and wait for it, with a hard timeout."""

    @abc.abstractmethod
    def exec_container(self, container: Container, command: List[str], stdin: Optional[Any], stdout: Any,
                       stderr: Any, tty: bool, resize: Optional[Callable[[], Optional[tuple]]] = None,
                       **options: Any) -> int:
        """Run a command with streamed stdin/stdout/stderr (optionally on a tty); returns its exit code."""

    @abc.abstractmethod
    def update_container(self, container: Container, resources: Dict[str, Any]) -> None:
        """Apply OCI ``LinuxResources`` to the running container."""

    @abc.abstractmethod
    def stop_container(self, container: Container, timeout: float) -> None:
        """Stop with the stop signal, escalate to SIGKILL after ``timeout`` seconds."""

    @abc.abstractmethod
    def delete_container(self, container: Container) -> None:
        """Remove the container from the runtime."""

    @abc.abstractmethod
    def update_container_status(self, container: Container) -> None:
        """Refresh status, exit code, finished time and OOM from the runtime."""

    @abc.abstractmethod
    def pause_container(self, container: Container) -> None:
        """Freeze every process of the container."""

    @abc.abstractmethod
    def unpause_container(self, container: Container) -> None:
        """Thaw a paused container."""

    @abc.abstractmethod
    def container_stats(self, container: Container, cgroup_parent: str) -> Any:
        """Resource usage of the container."""

    @abc.abstractmethod
    def signal_container(self, container: Container, signum: int) -> None:
        """Send a signal (1-31) to the container's init process."""

    @abc.abstractmethod
    def reopen_container_log(self, container: Container) -> None:
        """Make the supervisor reopen (truncate) the container's log file."""

    @abc.abstractmethod
    def attach_container(self, container: Container, stdin: Optional[Any], stdout: Any, stderr: Any,
                         tty: bool, resize: Optional[Callable[[], Optional[tuple]]] = None) -> None:
        """Connect streams to a running container's standard streams."""

    @abc.abstractmethod
    def port_forward_container(self, container: Container, netns_path: str, port: int, stream: Any) -> None:
        """Relay ``stream`` to ``localhost:port`` inside the container's network namespace."""

    def wait_container_state_stopped(self, container: Container) -> None:
        """The implementations' own version is a no-op, as in the reference (``Runtime`` polls)."""
        return None
