"""State on disk: the directory layout, atomic writes, file locks and the name index.

A module run is a short-lived process, so everything a later run needs is on disk. Runtime
state (bundles, conmon's files, locks) lives under the *run root* (``/run/daemonless-oci``,
gone after a reboot); configuration and history under the *persist root*
(``/var/lib/daemonless-oci``). Every path comes from ``StatePaths`` and every id passes
``ids.validate_id`` on the way in, so no caller can make a path out of an unchecked string.
Everything is created root-only (directories 0700, files 0600).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.container import Container, ContainerState
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ContainerExistsError,
    ContainerUnknownError,
    LockTimeoutError,
    OciError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.ids import GENERATED_ID_BYTES, validate_id, validate_name

DEFAULT_RUN_ROOT = "/run/daemonless-oci"
DEFAULT_PERSIST_ROOT = "/var/lib/daemonless-oci"
DEFAULT_LOCK_TIMEOUT = 600.0  # a concurrent run may be stopping a container with a long grace period
UNIX_SOCKET_PATH_MAX = 107


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix.

    A temporary file in the same directory is written, flushed to disk and renamed over the
    target; on any error it is removed.
    """
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def atomic_write_json(path: str, document: Any) -> None:
    """``atomic_write`` of a JSON document (sorted keys, so equal documents are equal bytes)."""
    atomic_write(path, json.dumps(document, sort_keys=True, indent=1).encode("utf-8") + b"\n")


def make_private_dir(path: str) -> None:
    """mkdir -p with mode 0700 for every directory it creates (os.makedirs applies it to the leaf only)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue


class FileLock:
    """An ``flock`` on a lock file: exclusive for writers, shared for readers, across processes.

    Waiting polls ``LOCK_NB`` with short sleeps up to ``timeout``: a lock is not a child
    process, so there is no pidfd to wait on, and the sleeps are short compared to the
    operations that hold it.
    """

    def __init__(self, path: str, exclusive: bool = True, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
        self.path = path
        self.exclusive = exclusive
        self.timeout = timeout
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        make_private_dir(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        operation = (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, operation)
                self._fd = fd
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockTimeoutError("timed out after {:.0f} s waiting for lock {} held by another run"
                                       .format(self.timeout, self.path))
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class StatePaths:
    """The one place that turns a container id into paths."""

    def __init__(self, run_root: str = DEFAULT_RUN_ROOT, persist_root: str = DEFAULT_PERSIST_ROOT) -> None:
        for label, root in (("run root", run_root), ("persist root", persist_root)):
            if not os.path.isabs(root):
                raise OciError("the {} must be an absolute path, got {!r}".format(label, root))
        self.run_root = os.path.normpath(run_root)
        self.persist_root = os.path.normpath(persist_root)

    # persistent side
    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.persist_root, "containers", validate_id(container_id))

    def container_config_file(self, container_id: str) -> str:
        return os.path.join(self.container_dir(container_id), "container.json")

    def state_file(self, container_id: str) -> str:
        return os.path.join(self.container_dir(container_id), "state.json")

    def persist_exit_file(self, container_id: str) -> str:
        return os.path.join(self.container_dir(container_id), "exit")

    def default_log_path(self, container_id: str) -> str:
        return os.path.join(self.container_dir(container_id), "container.log")

    def name_file(self, name: str) -> str:
        return os.path.join(self.persist_root, "names", validate_name(name))

    # run-time side
    def run_dir(self, container_id: str) -> str:
        return os.path.join(self.run_root, "containers", validate_id(container_id))

    def bundle_dir(self, container_id: str) -> str:
        return os.path.join(self.run_dir(container_id), "bundle")

    @property
    def exits_dir(self) -> str:
        return os.path.join(self.run_root, "exits")

    def exits_file(self, container_id: str) -> str:
        return os.path.join(self.exits_dir, validate_id(container_id))

    @property
    def attach_dir(self) -> str:
        return os.path.join(self.run_root, "attach")

    def attach_socket(self, container_id: str) -> str:
        return os.path.join(self.attach_dir, validate_id(container_id), "attach")

    def lock_file(self, container_id: str) -> str:
        return os.path.join(self.run_root, "locks", validate_id(container_id) + ".lock")

    @property
    def store_lock_file(self) -> str:
        return os.path.join(self.run_root, "locks", "store.lock")

    def runtime_root(self, handler: str) -> str:
        return os.path.join(self.run_root, "runtimes", validate_name(handler))

    def exec_dir(self, container_id: str) -> str:
        return os.path.join(self.run_dir(container_id), "exec")

    def ensure_roots(self) -> None:
        """Create both roots and their fixed subdirectories, root-only."""
        longest = self.attach_socket("0" * 2 * GENERATED_ID_BYTES)
        if len(longest) > UNIX_SOCKET_PATH_MAX:
            raise OciError("run root {} is too long: conmon's attach socket path {} would exceed the {}-byte "
                           "limit of unix socket paths".format(self.run_root, longest, UNIX_SOCKET_PATH_MAX))
        for path in (os.path.join(self.persist_root, "containers"), os.path.join(self.persist_root, "names"),
                     os.path.join(self.run_root, "containers"), self.exits_dir, self.attach_dir,
                     os.path.join(self.run_root, "locks")):
            make_private_dir(path)
        for root in (self.run_root, self.persist_root):
            os.chmod(root, 0o700)  # state and logs are for root only, whoever made the directory


class ContainerFiles:
    """Reading and writing one container's files, and the name index."""

    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths

    def container_lock(self, container_id: str, exclusive: bool = True,
                       timeout: float = DEFAULT_LOCK_TIMEOUT) -> FileLock:
        return FileLock(self.paths.lock_file(container_id), exclusive, timeout)

    def store_lock(self, timeout: float = DEFAULT_LOCK_TIMEOUT) -> FileLock:
        return FileLock(self.paths.store_lock_file, True, timeout)

    def ids(self) -> List[str]:
        """Ids of every stored container (directories that hold a container.json)."""
        root = os.path.join(self.paths.persist_root, "containers")
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return []
        return sorted(name for name in names
                      if os.path.exists(os.path.join(root, name, "container.json")))

    def save_config(self, container: Container) -> None:
        make_private_dir(self.paths.container_dir(container.id))
        atomic_write_json(self.paths.container_config_file(container.id), container.to_json())

    def save_state(self, container: Container) -> None:
        atomic_write_json(self.paths.state_file(container.id), container.state.to_json())

    def load(self, container_id: str) -> Container:
        """Load a container and its state; ``ContainerUnknownError`` when it does not exist."""
        path = self.paths.container_config_file(container_id)
        try:
            with open(path, "r", encoding="utf-8") as handle:
                container = Container.from_json(json.load(handle))
        except FileNotFoundError:
            raise ContainerUnknownError("no container with id {}".format(container_id)) from None
        except ValueError as exc:
            raise OciError("container file {} is corrupt: {}".format(path, exc)) from exc
        try:
            container.from_disk()
        except FileNotFoundError:
            container.state = ContainerState(id=container.id, created=container.created_at)
        return container

    def iter_containers(self) -> Iterator[Container]:
        """Every stored container; ones that vanish while listing are skipped."""
        for container_id in self.ids():
            try:
                yield self.load(container_id)
            except ContainerUnknownError:
                continue

    def lookup_name(self, name: str) -> Optional[str]:
        """The id owning ``name``, or None (a stale entry whose container is gone reads as None)."""
        try:
            with open(self.paths.name_file(name), "r", encoding="ascii") as handle:
                container_id = handle.read().strip()
        except FileNotFoundError:
            return None
        if not os.path.exists(self.paths.container_config_file(container_id)):
            return None
        return container_id

    def reserve_name(self, name: str, container_id: str) -> None:
        """Claim ``name`` for ``container_id``; the caller holds the store lock."""
        owner = self.lookup_name(name)
        if owner is not None and owner != container_id:
            raise ContainerExistsError("the name {!r} is already in use by container {}".format(name, owner))
        make_private_dir(os.path.dirname(self.paths.name_file(name)))
        atomic_write(self.paths.name_file(name), container_id.encode("ascii"))

    def release_name(self, name: str, container_id: str) -> None:
        """Drop the name entry if it still points at ``container_id``."""
        path = self.paths.name_file(name)
        try:
            with open(path, "r", encoding="ascii") as handle:
                if handle.read().strip() != container_id:
                    return
            os.unlink(path)
        except FileNotFoundError:
            return

    def remove_files(self, container_id: str) -> None:
        """Remove every file of a container, persistent and run-time (the lock file stays)."""
        for path in (self.paths.run_dir(container_id), self.paths.container_dir(container_id)):
            shutil.rmtree(path, ignore_errors=True)
        # conmon's exit record for watchers, and its attach symlink (left behind when conmon was killed)
        for path in (self.paths.exits_file(container_id), os.path.join(self.paths.attach_dir, container_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def read_json(self, path: str) -> Optional[Dict[str, Any]]:
        try:
            with open(path, "r", encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
