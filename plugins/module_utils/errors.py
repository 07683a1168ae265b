"""Every error the runtime library raises.

The reference (CRI-O's internal/oci) tests sentinel errors through the wrap chain
("is this, or does it wrap, ErrNotFound"). In Python the chain is ``__cause__``; ``caused_by``
walks it so callers can ask the same question. Each message names the object and the cause so a
playbook author can act on it without reading code.
"""
from __future__ import annotations

from typing import Optional, Sequence, Type


class OciError(Exception):
    """Base class: anything the library reports as a failure a caller may handle."""


class ValidationError(OciError, ValueError):
    """Bad input (an id, a name, a path, a signal, a timeout) rejected before anything was touched."""


class ConfigError(OciError):
    """The runtime configuration is unusable (missing binary, unknown handler, bad value)."""


class HandlerNotFoundError(ConfigError):
    """A runtime handler name that the configuration does not define."""


class MissingDependencyError(OciError):
    """An optional Python package or a host program that this feature needs is not installed."""


class ContainerStoppedError(OciError):
    """The container is already stopped (the reference's ErrContainerStopped); callers treat it as success."""

    def __init__(self, message: str = "container is already stopped") -> None:
        super().__init__(message)


class NotFoundError(OciError):
    """The container's init process is gone or its pid was reused (the reference's ErrNotFound)."""

    def __init__(self, message: str = "container process not found") -> None:
        super().__init__(message)


class NotInitializedError(OciError):
    """No init pid has been recorded yet (the reference's ErrNotInitialized)."""

    def __init__(self, message: str = "container PID not initialized") -> None:
        super().__init__(message)


class ContainerUnknownError(OciError):
    """No container with this id or name exists in the store."""


class ContainerExistsError(OciError):
    """A container with this name or id already exists."""


class InvalidStateError(OciError):
    """The operation is not allowed in the container's current status (for example stop while paused)."""


class LockTimeoutError(OciError):
    """Another process holds the container's lock for longer than we are willing to wait."""


class CommandError(OciError):
    """A runtime or helper command failed: carries the command line, its output and its exit status."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: bytes = b"", stderr: bytes = b"",
                 message: Optional[str] = None) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        text = message or "`{}` failed: {} {} (exit status {})".format(
            " ".join(self.argv), _text(stderr), _text(stdout), returncode)
        super().__init__(text.strip())


class CommandTimeoutError(CommandError):
    """A command ran past its deadline and was killed."""


class CreateTimeoutError(OciError):
    """The runtime did not report the container's pid within the create timeout."""


class ConmonError(OciError):
    """conmon failed, died, or sent a message we cannot understand."""


class ExecSyncError(OciError):
    """An exec failed before the command could report an exit code (the reference's ExecSyncError).

    ``stdout``/``stderr`` are conmon's own diagnostics, not the command's output.
    """

    def __init__(self, message: str, stdout: bytes = b"", stderr: bytes = b"", exit_code: int = -1) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.exit_code = exit_code
        super().__init__("command error: {}, stdout: {}, stderr: {}, exit code {}".format(
            message, _text(stdout), _text(stderr), exit_code))


class UnsupportedHostError(OciError):
    """The host cannot run this runtime as configured (for example crun on a hybrid cgroup layout)."""


def caused_by(error: BaseException, kind: Type[BaseException]) -> bool:
    """Tell whether ``error`` is, or was caused by, an error of type ``kind`` (Go's errors.Is)."""
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _text(data: bytes) -> str:
    """Decode command output for a message without ever failing on bad bytes."""
    if isinstance(data, str):
        return data.strip()
    return data.decode("utf-8", "replace").strip()
