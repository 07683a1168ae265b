"""The container model: identity, configuration and the mutable ``ContainerState``.

Mirrors the reference's ``Container`` and ``ContainerState`` (CRI-O internal/oci container.go).
A module run is a short-lived process, so both halves serialise to JSON: the configuration to
``container.json`` (written at create) and the state to ``state.json`` (rewritten on every
change) with the reference's JSON keys, so a reader of either file can cross-check the godoc.
Nothing here touches the runtime; ``state.py`` persists, ``runtime_*.py`` act.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ContainerStoppedError,
    InvalidStateError,
    NotFoundError,
    NotInitializedError,
    OciError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import ProcessIdentity, read_stat
from ansible_collections.daemonless.oci.plugins.module_utils.signals import reference_stop_signal

CONTAINER_STATE_CREATED = "created"
CONTAINER_STATE_RUNNING = "running"
CONTAINER_STATE_PAUSED = "paused"
CONTAINER_STATE_STOPPED = "stopped"
STATUSES = (CONTAINER_STATE_CREATED, CONTAINER_STATE_RUNNING, CONTAINER_STATE_PAUSED, CONTAINER_STATE_STOPPED)

SPOOFED_ANNOTATION = "io.kubernetes.cri-o.Spoofed"
ZERO_TIME_TEXT = "0001-01-01T00:00:00Z"  # how Go writes a zero time; kept so state.json reads like the reference's


def now() -> datetime:
    """The current time, timezone-aware (UTC)."""
    return datetime.now(timezone.utc)


def format_time(value: Optional[datetime]) -> str:
    """RFC 3339 with nanosecond precision; ``None`` is Go's zero time."""
    if value is None:
        return ZERO_TIME_TEXT
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + "{:06d}000Z".format(value.microsecond)


def parse_time(text: Optional[str]) -> Optional[datetime]:
    """Parse RFC 3339 with any fraction length (runtimes print nanoseconds); zero time -> None."""
    if not text or text.startswith("0001-01-01"):
        return None
    main, zone = text, "+00:00"
    if main.endswith("Z"):
        main = main[:-1]
    elif len(main) > 6 and main[-6] in "+-" and main[-3] == ":":
        main, zone = main[:-6], main[-6:]
    if "." in main:
        head, fraction = main.split(".", 1)
        main = head + "." + (fraction + "000000")[:6]
    else:
        main += ".000000"
    return datetime.strptime(main + zone, "%Y-%m-%dT%H:%M:%S.%f%z").astimezone(timezone.utc)


@dataclass
class Metadata:
    """The caller's name for a container and its attempt number (bumped on each re-create)."""

    name: str = ""
    attempt: int = 0

    def to_json(self) -> Dict[str, Any]:
        """JSON form; empty fields are omitted as in the reference."""
        data: Dict[str, Any] = {}
        if self.name:
            data["name"] = self.name
        if self.attempt:
            data["attempt"] = self.attempt
        return data

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]]) -> "Metadata":
        data = data or {}
        return cls(name=data.get("name", ""), attempt=int(data.get("attempt", 0)))


@dataclass
class ContainerVolume:
    """A host path mounted into the container (carried for reporting only)."""

    container_path: str
    host_path: str
    readonly: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"container_path": self.container_path, "host_path": self.host_path, "readonly": self.readonly}


@dataclass
class ContainerState:
    """The OCI state as the runtime prints it plus our own fields (see state.json)."""

    oci_version: str = ""
    id: str = ""
    status: str = ""
    pid: int = 0
    bundle: str = ""
    annotations: Dict[str, str] = field(default_factory=dict)
    created: Optional[datetime] = None
    started: Optional[datetime] = None
    finished: Optional[datetime] = None
    exit_code: Optional[int] = None
    oom_killed: bool = False
    error: str = ""
    init_pid: int = 0
    init_start_time: str = ""
    conmon_pid: int = 0          # ours: the supervisor's pid, so a dead conmon is noticed
    conmon_start_time: str = ""

    def set_init_pid(self, pid: int) -> None:
        """Record the init pid and its start time, once (the pair is write-once).

        Like the reference, the pid is stored before its start time is read, so a failed read
        leaves ``init_pid`` set and the start time empty (and ``pid()`` then refuses it).
        """
        if self.init_pid or self.init_start_time:
            raise OciError("pid and start time already initialized: {} {}".format(self.init_pid, self.init_start_time))
        self.init_pid = pid
        self.init_start_time = read_stat(pid)[1]

    def init_process(self) -> ProcessIdentity:
        """The init process as an identity that can be verified and signalled safely."""
        if self.init_pid <= 0:
            raise NotInitializedError()
        return ProcessIdentity(self.init_pid, self.init_start_time)

    def conmon_process(self) -> Optional[ProcessIdentity]:
        """conmon's identity, if recorded."""
        if self.conmon_pid <= 0 or not self.conmon_start_time:
            return None
        return ProcessIdentity(self.conmon_pid, self.conmon_start_time)

    def to_json(self) -> Dict[str, Any]:
        """The reference's state.json keys (omitempty where the reference omits)."""
        data: Dict[str, Any] = {"ociVersion": self.oci_version, "id": self.id, "status": self.status,
                                "bundle": self.bundle, "created": format_time(self.created),
                                "started": format_time(self.started), "finished": format_time(self.finished)}
        optional = {"pid": self.pid, "annotations": self.annotations, "exitCode": self.exit_code,
                    "oomKilled": self.oom_killed, "error": self.error, "initPid": self.init_pid,
                    "initStartTime": self.init_start_time, "conmonPid": self.conmon_pid,
                    "conmonStartTime": self.conmon_start_time}
        for key, value in optional.items():
            if value or (key == "exitCode" and value is not None):
                data[key] = value
        return data

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ContainerState":
        """Decode state.json (or a runtime's ``state`` output: unknown keys are ignored)."""
        state = cls()
        state.update_from_json(data)
        return state

    def update_from_json(self, data: Dict[str, Any]) -> None:
        """Overlay the keys present in ``data`` (the reference decodes over a copy of the old state)."""
        simple = {"ociVersion": "oci_version", "id": "id", "status": "status", "pid": "pid", "bundle": "bundle",
                  "annotations": "annotations", "oomKilled": "oom_killed", "error": "error",
                  "initPid": "init_pid", "initStartTime": "init_start_time", "conmonPid": "conmon_pid",
                  "conmonStartTime": "conmon_start_time"}
        for key, attribute in simple.items():
            if key in data and data[key] is not None:
                setattr(self, attribute, data[key])
        for key in ("created", "started", "finished"):
            if key in data:
                setattr(self, key, parse_time(data[key]))
        if "exitCode" in data:
            self.exit_code = None if data["exitCode"] is None else int(data["exitCode"])

    def copy(self) -> "ContainerState":
        return copy.deepcopy(self)


class Container:
    """A runtime container: identity and configuration plus its mutable state.

    Configuration is fixed at construction (``to_json``/``from_json`` round-trip it). ``state``
    is the live state object; ``lock`` serialises threads of one process (processes are
    serialised by the file lock in ``state.py``).
    """

    def __init__(self, container_id: str, name: str, bundle_path: str, log_path: str, *,
                 labels: Optional[Dict[str, str]] = None, internal_annotations: Optional[Dict[str, str]] = None,
                 annotations: Optional[Dict[str, str]] = None, image: str = "", image_name: str = "",
                 image_ref: str = "", metadata: Optional[Metadata] = None, sandbox: str = "",
                 terminal: bool = False, stdin: bool = False, stdin_once: bool = False,
                 runtime_handler: str = "", directory: str = "", created: Optional[datetime] = None,
                 stop_signal: str = "", spec: Optional[Dict[str, Any]] = None,
                 extras: Optional[Dict[str, Any]] = None) -> None:
        self._id = container_id
        self._name = name
        self._bundle_path = bundle_path
        self._log_path = log_path
        self._labels = dict(labels or {})
        self._internal_annotations = dict(internal_annotations or {})
        self._annotations = dict(annotations or {})
        self._image, self._image_name, self._image_ref = image, image_name, image_ref
        self._metadata = metadata or Metadata(name=name)
        self._sandbox = sandbox
        self._terminal, self._stdin, self._stdin_once = terminal, stdin, stdin_once
        self._runtime_handler = runtime_handler
        self._dir = directory
        self._stop_signal = stop_signal
        self._spec: Dict[str, Any] = spec or {}
        self._volumes: List[ContainerVolume] = []
        self._mount_point = ""
        self._seccomp_profile_path = ""
        self._id_mappings: Optional[Dict[str, Any]] = None
        self._conmon_cgroupfs_path = ""
        self._created_flag = False
        self._spoofed = False
        self.extras: Dict[str, Any] = dict(extras or {})
        self.state = ContainerState(created=created or now())
        self.lock = threading.RLock()

    @classmethod
    def spoofed(cls, container_id: str, name: str, labels: Dict[str, str], created: datetime,
                directory: str) -> "Container":
        """A placeholder for a container that does not exist in the runtime: every runtime operation is a no-op."""
        container = cls(container_id, name, "", "", labels=labels, directory=directory, created=created,
                        annotations={SPOOFED_ANNOTATION: "true"})
        container.state.started = created
        container._spoofed = True
        return container

    # Plain accessors, as in the reference.
    id = property(lambda self: self._id)
    name = property(lambda self: self._name)
    bundle_path = property(lambda self: self._bundle_path)
    log_path = property(lambda self: self._log_path)
    labels = property(lambda self: self._labels)
    annotations = property(lambda self: self._annotations)
    internal_annotations = property(lambda self: self._internal_annotations)
    image = property(lambda self: self._image)
    image_name = property(lambda self: self._image_name)
    image_ref = property(lambda self: self._image_ref)
    metadata = property(lambda self: self._metadata)
    sandbox = property(lambda self: self._sandbox)
    terminal = property(lambda self: self._terminal)
    stdin = property(lambda self: self._stdin)
    stdin_once = property(lambda self: self._stdin_once)
    runtime_handler = property(lambda self: self._runtime_handler)
    dir = property(lambda self: self._dir)
    volumes = property(lambda self: list(self._volumes))
    is_spoofed = property(lambda self: self._spoofed)
    conmon_cgroupfs_path = property(lambda self: self._conmon_cgroupfs_path)
    created = property(lambda self: self._created_flag, doc="True once fully created and registered.")

    @property
    def created_at(self) -> Optional[datetime]:
        return self.state.created

    @property
    def state_path(self) -> str:
        return os.path.join(self._dir, "state.json")

    def set_created(self) -> None:
        self._created_flag = True

    def add_volume(self, volume: ContainerVolume) -> None:
        self._volumes.append(volume)

    @property
    def mount_point(self) -> str:
        return self._mount_point

    def set_mount_point(self, path: str) -> None:
        self._mount_point = path

    @property
    def seccomp_profile_path(self) -> str:
        return self._seccomp_profile_path

    def set_seccomp_profile_path(self, path: str) -> None:
        self._seccomp_profile_path = path

    @property
    def id_mappings(self) -> Optional[Dict[str, Any]]:
        return self._id_mappings

    def set_id_mappings(self, mappings: Optional[Dict[str, Any]]) -> None:
        self._id_mappings = mappings

    def set_conmon_cgroupfs_path(self, path: str) -> None:
        self._conmon_cgroupfs_path = path

    def spec(self) -> Dict[str, Any]:
        """A deep copy of the OCI spec, so an exec can edit its process without touching ours."""
        return copy.deepcopy(self._spec)

    def set_spec(self, spec: Dict[str, Any]) -> None:
        self._spec = spec

    def description(self) -> str:
        """``namespace/pod/container`` from the Kubernetes labels (empty parts when missing)."""
        return "{}/{}/{}".format(self._labels.get("io.kubernetes.pod.namespace", ""),
                                 self._labels.get("io.kubernetes.pod.name", ""),
                                 self._labels.get("io.kubernetes.container.name", ""))

    def get_stop_signal(self) -> str:
        """The stop signal as a decimal string, with the reference's fallback to 15."""
        return str(self.stop_signal())

    def stop_signal(self) -> int:
        """The configured stop signal: a number as given, else the reference's name rule."""
        configured = self._stop_signal
        if configured.isdigit() and 1 <= int(configured) <= 31:
            return int(configured)  # deviation: the reference ignores numbers; we resolved them on input
        return reference_stop_signal(configured)

    def set_start_failed(self, error: Optional[BaseException]) -> None:
        """Mark a failed start: started = finished = created, and keep the error text."""
        with self.lock:
            self.state.started = self.state.created
            self.state.finished = self.state.created
            if error is not None:
                self.state.error = str(error)

    def should_be_stopped(self) -> None:
        """Raise ContainerStoppedError when stopped, InvalidStateError when paused (the reference's ShouldBeStopped)."""
        if self.state.status == CONTAINER_STATE_STOPPED:
            raise ContainerStoppedError()
        if self.state.status == CONTAINER_STATE_PAUSED:
            raise InvalidStateError("cannot stop paused container {}".format(self._id))

    def pid(self) -> int:
        """The init pid, but only if it is still the process we started (start time checked)."""
        identity = self.state.init_process()
        identity.verify()
        return identity.pid

    def verify_pid(self) -> None:
        """Raise NotFoundError/NotInitializedError unless our init process runs."""
        self.pid()

    def is_alive(self) -> bool:
        """True while the init process we recorded runs (a zombie or a recycled pid is not alive)."""
        try:
            self.verify_pid()
        except (NotFoundError, NotInitializedError):
            return False
        return True

    def from_disk(self) -> None:
        """Replace the in-memory state with state.json; on any failure the old state stays.

        Upgrade path of the reference: a state without init pid but with a runtime pid adopts
        that pid (callers must refresh the status right after, since the pid may be reused).
        """
        with open(self.state_path, "r", encoding="utf-8") as handle:
            decoded = ContainerState.from_json(json.load(handle))
        if decoded.init_pid == 0 and not decoded.init_start_time and decoded.pid != 0:
            decoded.set_init_pid(decoded.pid)
        with self.lock:
            self.state = decoded

    def to_json(self) -> Dict[str, Any]:
        """The configuration half, for container.json."""
        return {"id": self._id, "name": self._name, "bundlePath": self._bundle_path, "logPath": self._log_path,
                "labels": self._labels, "internalAnnotations": self._internal_annotations,
                "annotations": self._annotations, "image": self._image, "imageName": self._image_name,
                "imageRef": self._image_ref, "metadata": self._metadata.to_json(), "sandbox": self._sandbox,
                "terminal": self._terminal, "stdin": self._stdin, "stdinOnce": self._stdin_once,
                "runtimeHandler": self._runtime_handler, "dir": self._dir, "stopSignal": self._stop_signal,
                "volumes": [volume.to_json() for volume in self._volumes], "mountPoint": self._mount_point,
                "seccompProfilePath": self._seccomp_profile_path, "idMappings": self._id_mappings,
                "conmonCgroupfsPath": self._conmon_cgroupfs_path, "spoofed": self._spoofed,
                "createdAt": format_time(self.state.created), "spec": self._spec, "extras": self.extras}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Container":
        """Rebuild a container from container.json (its state is loaded separately)."""
        container = cls(data["id"], data["name"], data.get("bundlePath", ""), data.get("logPath", ""),
                        labels=data.get("labels"), internal_annotations=data.get("internalAnnotations"),
                        annotations=data.get("annotations"), image=data.get("image", ""),
                        image_name=data.get("imageName", ""), image_ref=data.get("imageRef", ""),
                        metadata=Metadata.from_json(data.get("metadata")), sandbox=data.get("sandbox", ""),
                        terminal=bool(data.get("terminal")), stdin=bool(data.get("stdin")),
                        stdin_once=bool(data.get("stdinOnce")), runtime_handler=data.get("runtimeHandler", ""),
                        directory=data.get("dir", ""), created=parse_time(data.get("createdAt")),
                        stop_signal=data.get("stopSignal", ""), spec=data.get("spec"), extras=data.get("extras"))
        for volume in data.get("volumes") or []:
            container.add_volume(ContainerVolume(**volume))
        container._mount_point = data.get("mountPoint", "")
        container._seccomp_profile_path = data.get("seccompProfilePath", "")
        container._id_mappings = data.get("idMappings")
        container._conmon_cgroupfs_path = data.get("conmonCgroupfsPath", "")
        container._spoofed = bool(data.get("spoofed"))
        container._created_flag = True
        return container


def history(containers: Iterable[Container]) -> List[Container]:
    """Containers ordered newest first by creation time (the reference's History)."""
    epoch = datetime.min.replace(tzinfo=timezone.utc)
    return sorted(containers, key=lambda c: c.created_at or epoch, reverse=True)


class ContainerStore:
    """An id -> container map behind a lock (the reference's memory store).

    A module rebuilds it from disk (``state.StatePaths`` lists the ids); long-lived callers such
    as the test harness keep one.
    """

    def __init__(self) -> None:
        self._items: Dict[str, Container] = {}
        self._lock = threading.RLock()

    def add(self, container_id: str, container: Container) -> None:
        with self._lock:
            self._items[container_id] = container

    def get(self, container_id: str) -> Optional[Container]:
        with self._lock:
            return self._items.get(container_id)

    def delete(self, container_id: str) -> None:
        with self._lock:
            self._items.pop(container_id, None)

    def list(self) -> List[Container]:
        """A snapshot, newest first."""
        with self._lock:
            return history(self._items.values())

    def size(self) -> int:
        with self._lock:
            return len(self._items)

    def first(self, predicate: Optional[Callable[[Container], bool]] = None) -> Optional[Container]:
        """Any container matching ``predicate`` (any container when None)."""
        for container in self.list():
            if predicate is None or predicate(container):
                return container
        return None

    def apply_all(self, reducer: Optional[Callable[[Container], None]]) -> None:
        """Run ``reducer`` on every container concurrently and wait for all of them."""
        if reducer is None:
            return
        threads = [threading.Thread(target=reducer, args=(container,)) for container in self.list()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
