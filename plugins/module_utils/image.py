"""The image store: verified images, each layer unpacked once, shared by every container through overlayfs.

Layout under the store root (the caller passes ``<persist root>/images``)::

    lock                              flock: held by writers for the short commit step only
    refs.json                         {name: manifest digest}; the only place names live
    blobs/sha256/<hex>                manifests and configs (small, verified, kept for re-checks)
    images/sha256/<hex>.json          one ImageRecord per manifest digest
    layers/sha256/<diff id hex>/diff  an unpacked layer: an overlay lower directory
    layers/sha256/<diff id hex>/layer.json
    tmp/<random>/                     work in progress, renamed into place when complete

Layers are keyed by their *diff id* (the digest of the uncompressed tar, which the image config
lists and which we verify while unpacking), not by the compressed blob digest: the same layer
pulled gzip-compressed from a registry and read uncompressed from a ``docker save`` archive is
unpacked once. Compressed layer blobs are streamed straight into the extractor and not kept:
keeping them would double the disk cost for nothing a container needs.

Every layer is unpacked into ``tmp/`` and renamed into ``layers/`` only after both digests
matched and the extractor accepted every member, so a refused or interrupted import leaves no
partial layer. Unpacking happens outside the lock (two concurrent imports of one layer both
unpack, the second rename loses and is discarded); the commit (renames, records, names) and
garbage collection run under the lock, so gc never sees a layer between its rename and the
record that references it. Deletions rename into ``tmp/`` first, so a crash mid-delete never
leaves a half-deleted layer in ``layers/``.
"""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.image_source import (
    INDEX_TYPES,
    MAX_INDEX_DEPTH,
    BlobSource,
    Descriptor,
    DigestMismatchError,
    ImageError,
    VerifyingReader,
    choose_manifest,
    host_platform,
    new_hasher,
    open_source,
    parse_source,
    skopeo_remote_digest,
)
from ansible_collections.daemonless.oci.plugins.module_utils.safe_tar import (
    Limits,
    UnsafeArchiveError,
    extract_layer,
)
from ansible_collections.daemonless.oci.plugins.module_utils.state import FileLock, atomic_write, atomic_write_json

STALE_TMP_SECONDS = 60.0
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ImageUnknownError(ImageError):
    """No image with this name or digest is in the store."""


class ImageInUseError(ImageError):
    """The image is used by containers and removal was not forced."""


@dataclass
class ImageConfig:
    """The parts of an image config that become a container's defaults."""

    entrypoint: List[str] = field(default_factory=list)
    cmd: List[str] = field(default_factory=list)
    env: List[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    stop_signal: str = ""
    labels: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_document(cls, config: Dict[str, Any]) -> "ImageConfig":
        """Read ``config.config`` of an OCI/Docker image config, tolerating nulls."""
        inner = config.get("config") or {}
        return cls(entrypoint=_strings(inner.get("Entrypoint")), cmd=_strings(inner.get("Cmd")),
                   env=_strings(inner.get("Env")), workdir=str(inner.get("WorkingDir") or ""),
                   user=str(inner.get("User") or ""), stop_signal=str(inner.get("StopSignal") or ""),
                   labels={str(k): str(v) for k, v in (inner.get("Labels") or {}).items()})


def _strings(value: Any) -> List[str]:
    return [str(item) for item in value] if isinstance(value, list) else []


@dataclass
class LayerRef:
    """One layer of an image: its diff id (store key), blob digest, media type and blob size."""

    diff_id: str
    digest: str
    media_type: str
    size: int


@dataclass
class ImageRecord:
    """An image in the store. ``layer_dirs`` are overlay lower directories, bottom to top."""

    manifest_digest: str
    config_digest: str
    platform: str
    layers: List[LayerRef]
    config: ImageConfig
    size: int                 # sum of the layer blobs as distributed
    unpacked_size: int = 0    # sum of regular-file bytes in the unpacked layers
    created: str = ""
    imported_at: float = 0.0
    source: str = ""
    has_devices: bool = False
    names: List[str] = field(default_factory=list)
    layer_dirs: List[str] = field(default_factory=list)
    changed: bool = False     # set by import_image: True when anything was written

    @property
    def id(self) -> str:
        """The image id as Docker and podman show it: the config digest."""
        return self.config_digest

    def to_info(self, used_by: Sequence[str] = ()) -> Dict[str, Any]:
        """The facts an ``info`` result shows: names, digests, sizes, platform, and who uses the image."""
        return {"names": list(self.names), "id": self.id, "manifest_digest": self.manifest_digest,
                "config_digest": self.config_digest, "platform": self.platform, "size": self.size,
                "unpacked_size": self.unpacked_size, "created": self.created, "imported_at": self.imported_at,
                "source": self.source, "has_devices": self.has_devices,
                "layers": [layer.diff_id for layer in self.layers], "containers": sorted(used_by)}

    def to_document(self) -> Dict[str, Any]:
        """What is stored: everything except names, directories and the transient flag."""
        return {"manifest_digest": self.manifest_digest, "config_digest": self.config_digest,
                "platform": self.platform, "size": self.size, "unpacked_size": self.unpacked_size,
                "created": self.created, "imported_at": self.imported_at, "source": self.source,
                "has_devices": self.has_devices, "config": self.config.__dict__,
                "layers": [layer.__dict__ for layer in self.layers]}

    @classmethod
    def from_document(cls, document: Dict[str, Any]) -> "ImageRecord":
        return cls(manifest_digest=document["manifest_digest"], config_digest=document["config_digest"],
                   platform=document.get("platform", ""), size=int(document.get("size", 0)),
                   unpacked_size=int(document.get("unpacked_size", 0)), created=document.get("created", ""),
                   imported_at=float(document.get("imported_at", 0)), source=document.get("source", ""),
                   has_devices=bool(document.get("has_devices", False)),
                   config=ImageConfig(**document.get("config", {})),
                   layers=[LayerRef(**layer) for layer in document.get("layers", [])])


def image_defaults(record: ImageRecord) -> Dict[str, Any]:
    """The image's defaults under the option names the container module uses."""
    config = record.config
    return {"entrypoint": list(config.entrypoint), "command": list(config.cmd), "env": env_to_dict(config.env),
            "workdir": config.workdir, "user": config.user, "stop_signal": config.stop_signal,
            "labels": dict(config.labels)}


def env_to_dict(env: Iterable[str]) -> Dict[str, str]:
    """``["K=V", ...]`` -> ``{K: V}`` in order; a later duplicate wins, an entry without '=' is ``K=""``."""
    result: Dict[str, str] = {}
    for item in env:
        key, _unused, value = item.partition("=")
        if key:
            result[key] = value
    return result


def apply_image_defaults(settings: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The effective process settings: what the playbook set wins, the image fills the rest.

    Arguments follow the rule the reference's callers (CRI-O's server, Docker) apply: an
    ``entrypoint`` given by the playbook replaces the image's entrypoint *and* drops the image's
    command; otherwise the image's entrypoint stays and the playbook's ``command`` (if any)
    replaces the image's command. ``None`` means "not set"; an explicit empty list is a setting
    (``entrypoint: []`` removes the image's entrypoint). Environment and labels merge by key,
    playbook on top. Only the
    result goes into the OCI config; the recreate decision compares the playbook's own settings
    plus the manifest digest, so an image default never shows up as a playbook change.
    """
    entrypoint = settings.get("entrypoint")
    command = settings.get("command")
    if entrypoint is not None:
        argv = list(entrypoint) + list(command or [])
    else:
        image_command = defaults.get("command") or []
        argv = list(defaults.get("entrypoint") or []) + list(command if command is not None else image_command)
    env = dict(defaults.get("env") or {})
    env.update(settings.get("env") or {})
    labels = dict(defaults.get("labels") or {})
    labels.update(settings.get("labels") or {})
    return {"argv": argv, "env": env, "labels": labels,
            "workdir": settings.get("workdir") or defaults.get("workdir") or "/",
            "user": settings.get("user") or defaults.get("user") or "",
            "stop_signal": settings.get("stop_signal") or defaults.get("stop_signal") or "SIGTERM"}


@dataclass
class GcReport:
    """What a garbage collection removed."""

    records: List[str] = field(default_factory=list)
    layers: List[str] = field(default_factory=list)
    blobs: List[str] = field(default_factory=list)
    tmp: List[str] = field(default_factory=list)


class ImageStore:
    """Images and their unpacked layers under one root directory. See the module docstring."""

    def __init__(self, root: str, limits: Limits = Limits()) -> None:
        self.root = os.path.abspath(root)
        self.limits = limits

    # ----- paths -------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def layer_root(self, diff_id: str) -> str:
        """``layers/<alg>/<hex>``: the directory renamed into place as one unit."""
        algorithm, hexpart = _split_digest(diff_id)
        return self._path("layers", algorithm, hexpart)

    def layer_dir(self, diff_id: str) -> str:
        """The unpacked layer, usable as an overlay lower directory."""
        return os.path.join(self.layer_root(diff_id), "diff")

    def layers_base(self) -> str:
        """Directory from which ``<hex>/diff`` names a layer: overlay mounts use it to keep options short."""
        return self._path("layers", "sha256")

    def _record_path(self, manifest_digest: str) -> str:
        algorithm, hexpart = _split_digest(manifest_digest)
        return self._path("images", algorithm, hexpart + ".json")

    def _blob_path(self, digest: str) -> str:
        algorithm, hexpart = _split_digest(digest)
        return self._path("blobs", algorithm, hexpart)

    def _ensure_dirs(self) -> None:
        for sub in ("blobs/sha256", "images/sha256", "layers/sha256", "tmp"):
            os.makedirs(self._path(sub), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)

    def lock(self) -> FileLock:
        return FileLock(self._path("lock"))

    # ----- reading ---------------------------------------------------------------------------
    def _refs(self) -> Dict[str, str]:
        try:
            with open(self._path("refs.json"), "r", encoding="utf-8") as handle:
                refs = json.load(handle)
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in refs.items()}

    def _load(self, manifest_digest: str, refs: Dict[str, str]) -> Optional[ImageRecord]:
        try:
            with open(self._record_path(manifest_digest), "r", encoding="utf-8") as handle:
                record = ImageRecord.from_document(json.load(handle))
        except FileNotFoundError:
            return None
        record.names = sorted(name for name, digest in refs.items() if digest == manifest_digest)
        record.layer_dirs = [self.layer_dir(layer.diff_id) for layer in record.layers]
        return record

    def list(self) -> List[ImageRecord]:
        """Every image, names attached, sorted by import time."""
        refs = self._refs()
        records = []
        base = self._path("images", "sha256")
        for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if entry.endswith(".json") and not entry.startswith("."):
                record = self._load("sha256:" + entry[:-5], refs)
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda r: r.imported_at)

    def find(self, ref: str) -> Optional[ImageRecord]:
        """An image by name, manifest digest, or image id (config digest); None if unknown."""
        refs = self._refs()
        if ref in refs:
            return self._load(refs[ref], refs)
        if ref.startswith("sha256:") and len(ref) == 71:
            record = self._load(ref, refs)
            if record is not None:
                return record
            for candidate in self.list():
                if candidate.config_digest == ref:
                    return candidate
        return None

    def get(self, ref: str) -> ImageRecord:
        """Like ``find`` but an unknown image is ``ImageUnknownError``."""
        record = self.find(ref)
        if record is None:
            raise ImageUnknownError("no image {!r} in the store {}".format(ref, self.root))
        return record

    def layer_info(self, diff_id: str) -> Dict[str, Any]:
        """``layer.json`` of an unpacked layer (entries, bytes, whiteouts, devices, unpack time)."""
        with open(os.path.join(self.layer_root(diff_id), "layer.json"), "r", encoding="utf-8") as handle:
            return json.load(handle)

    # ----- importing ---------------------------------------------------------------------------
    def import_image(self, source: str, name: Optional[str] = None, allow_devices: bool = False,
                     tls_verify: bool = True, authfile: Optional[str] = None) -> ImageRecord:
        """Import (or pull) ``source`` and name it ``name`` (default: the source string).

        Idempotent by digest: when the resolved manifest is already stored with all its layers,
        nothing is unpacked and the returned record has ``changed`` False unless the name moved.
        For ``docker://`` sources the remote digest is asked first (``skopeo inspect --raw``), so a
        stored image is not downloaded again.
        """
        spec = parse_source(source)
        name = name or str(spec)
        if spec.transport == "docker":
            digest = skopeo_remote_digest(spec.path, tls_verify, authfile)
            known = self.find(digest)
            if known is not None and self._complete(known, allow_devices):
                return self._name_existing(known, name)
        self._ensure_dirs()
        with self._work_dir() as work:
            blob_source = open_source(spec, work, tls_verify, authfile)
            try:
                return self._import_from(blob_source, spec, name, allow_devices, work)
            finally:
                blob_source.close()

    def _import_from(self, source: BlobSource, spec: Any, name: str, allow_devices: bool, work: str) -> ImageRecord:
        manifest_desc, manifest_bytes, manifest = resolve_manifest(source, spec.tag)
        config_desc = Descriptor.parse(manifest.get("config"), "manifest {}".format(manifest_desc.digest))
        config_bytes, config = source.read_document(config_desc, "config")
        record = _new_record(manifest_desc, manifest, config_desc, config, str(spec))
        known = self.find(record.manifest_digest)
        if known is not None and self._complete(known, allow_devices):
            return self._name_existing(known, name)
        prepared: Dict[str, str] = {}
        for layer, descriptor in zip(record.layers, _layer_descriptors(manifest)):
            if layer.diff_id in prepared:
                continue  # the same layer twice in one image (empty layers often are)
            if not os.path.isdir(self.layer_root(layer.diff_id)):
                prepared[layer.diff_id] = self._unpack(source, descriptor, layer.diff_id, allow_devices, work)[1]
            else:
                self._check_devices(layer.diff_id, allow_devices)
        return self._commit(record, name, sorted(prepared.items()), manifest_bytes, config_bytes)

    def _complete(self, record: ImageRecord, allow_devices: bool) -> bool:
        if not all(os.path.isdir(path) for path in record.layer_dirs):
            return False
        for layer in record.layers:
            self._check_devices(layer.diff_id, allow_devices)
        return True

    def _check_devices(self, diff_id: str, allow_devices: bool) -> None:
        """A layer unpacked for a privileged user holds device nodes: refuse it to anyone else."""
        if not allow_devices and self.layer_info(diff_id).get("devices"):
            raise UnsafeArchiveError("layer {} holds device nodes, allowed only for privileged containers"
                                     .format(diff_id))

    def _name_existing(self, record: ImageRecord, name: str) -> ImageRecord:
        with self.lock():
            refs = self._refs()
            if refs.get(name) != record.manifest_digest:
                refs[name] = record.manifest_digest
                atomic_write_json(self._path("refs.json"), refs)
                record.changed = True
        record.names = sorted(set(record.names) | {name})
        return record

    def _unpack(self, source: BlobSource, descriptor: Descriptor, diff_id: str, allow_devices: bool,
                work: str) -> Tuple[str, str]:
        """Unpack one layer into ``work/<hex>`` verifying both digests in one pass; (diff id, directory)."""
        _check_layer_media_type(descriptor)
        target = os.path.join(work, _split_digest(diff_id)[1])
        os.makedirs(os.path.join(target, "diff"), mode=0o700)
        os.chmod(os.path.join(target, "diff"), 0o755)  # the layer's own "./" entry, if any, replaces this
        started = time.monotonic()
        what = "unknown compression"
        diff_hasher = new_hasher(diff_id)
        handle = source.open_blob(descriptor.digest)
        blob = VerifyingReader(handle, descriptor)
        try:
            tar_stream, what = _decompressed(blob, descriptor)
            stats = extract_layer(tar_stream, os.path.join(target, "diff"), self.limits, allow_devices, diff_hasher)
            blob.finish()
        except (OSError, EOFError, zlib.error, OciError) as exc:
            _blame_the_blob(blob, exc)
            if isinstance(exc, OciError):
                raise
            raise ImageError("layer {} ({}) cannot be read: {}".format(descriptor.digest, what, exc)) from exc
        finally:
            handle.close()
        actual = "{}:{}".format(diff_hasher.name, diff_hasher.hexdigest())
        if actual != diff_id:
            raise DigestMismatchError("layer {} unpacks to {}, but the image config says {}"
                                      .format(descriptor.digest, actual, diff_id))
        info = {"diff_id": diff_id, "digest": descriptor.digest, "media_type": descriptor.media_type,
                "compression": what, "blob_size": descriptor.size, "tar_size": stats.stream_bytes,
                "entries": stats.entries, "files": stats.files, "bytes": stats.bytes,
                "whiteouts": stats.whiteouts, "opaque_dirs": stats.opaque_dirs, "devices": stats.devices_list,
                "unpack_seconds": round(time.monotonic() - started, 4)}
        atomic_write_json(os.path.join(target, "layer.json"), info)
        return diff_id, target

    def _commit(self, record: ImageRecord, name: str, prepared: Sequence[Tuple[str, str]],
                manifest_bytes: bytes, config_bytes: bytes) -> ImageRecord:
        """Under the lock: rename layers into place, write blobs, the record and the name."""
        with self.lock():
            vanished = [layer.diff_id for layer in record.layers
                        if layer.diff_id not in dict(prepared) and not os.path.isdir(self.layer_root(layer.diff_id))]
            if vanished:
                raise ImageError("layer(s) {} were garbage-collected while this import ran; run it again"
                                 .format(", ".join(vanished)))
            for diff_id, directory in prepared:
                try:
                    os.rename(directory, self.layer_root(diff_id))
                except OSError:
                    if not os.path.isdir(self.layer_root(diff_id)):
                        raise  # anything but "another import got there first"
            for digest, data in ((record.manifest_digest, manifest_bytes), (record.config_digest, config_bytes)):
                if not os.path.exists(self._blob_path(digest)):
                    atomic_write(self._blob_path(digest), data, 0o600)
            infos = [self.layer_info(layer.diff_id) for layer in record.layers]
            record.unpacked_size = sum(int(info.get("bytes", 0)) for info in infos)
            record.has_devices = any(info.get("devices") for info in infos)
            record.imported_at = time.time()
            atomic_write_json(self._record_path(record.manifest_digest), record.to_document())
            refs = self._refs()
            refs[name] = record.manifest_digest
            atomic_write_json(self._path("refs.json"), refs)
        loaded = self._load(record.manifest_digest, refs)
        if loaded is None:
            raise ImageError("image {} vanished from the store while it was being recorded".format(
                record.manifest_digest))
        loaded.changed = True
        return loaded

    class _WorkDir:
        """A private directory in ``tmp/`` held by an flock while in use, removed on exit.

        gc removes a tmp entry only if it can take that flock, i.e. its owner is gone.
        """

        def __init__(self, store: "ImageStore") -> None:
            self.path = tempfile.mkdtemp(prefix="work-", dir=store._path("tmp"))
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def __enter__(self) -> str:
            return self.path

        def __exit__(self, *exc_info: Any) -> None:
            try:
                shutil.rmtree(self.path, ignore_errors=True)
            finally:
                os.close(self.fd)

    def _work_dir(self) -> "ImageStore._WorkDir":
        return ImageStore._WorkDir(self)

    # ----- removal and garbage collection --------------------------------------------------------
    def remove(self, ref: str, force: bool = False, in_use_by: Sequence[str] = ()) -> List[str]:
        """Remove an image name (or, given a digest, every name of that image); returns the names dropped.

        ``in_use_by`` lists the containers that use the image (the caller knows them). In use and
        not forced: ``ImageInUseError``. Forced while in use: the names go but the record and
        layers stay until a ``gc`` that no longer lists the image as in use.
        """
        with self.lock():
            refs = self._refs()
            record = self._load(refs[ref], refs) if ref in refs else self.find(ref)
            if record is None:
                raise ImageUnknownError("no image {!r} in the store {}".format(ref, self.root))
            if in_use_by and not force:
                raise ImageInUseError("image {} ({}) is used by container(s) {}; remove them first or force"
                                      .format(ref, record.manifest_digest, ", ".join(sorted(in_use_by))))
            dropped = [ref] if ref in refs else list(record.names)
            for item in dropped:
                refs.pop(item, None)
            atomic_write_json(self._path("refs.json"), refs)
            remaining = [n for n, d in refs.items() if d == record.manifest_digest]
            if not remaining and not in_use_by:
                os.unlink(self._record_path(record.manifest_digest))
            still_used = {record.manifest_digest} if in_use_by else set()
            self._gc_locked(still_used, GcReport())
        return dropped

    def gc(self, in_use: Iterable[str] = ()) -> GcReport:
        """Drop unnamed images not in ``in_use`` (manifest digests), then unreferenced layers and blobs, then stale tmp."""
        if not os.path.isdir(self.root):
            return GcReport()
        self._ensure_dirs()
        report = GcReport()
        with self.lock():
            self._gc_locked(set(in_use), report)
        return report

    def _gc_locked(self, in_use: set, report: GcReport) -> None:
        refs = self._refs()
        named = set(refs.values())
        live_layers, live_blobs = set(), set()
        for record in self.list():
            if record.manifest_digest not in named and record.manifest_digest not in in_use:
                os.unlink(self._record_path(record.manifest_digest))
                report.records.append(record.manifest_digest)
                continue
            live_blobs.update((record.manifest_digest, record.config_digest))
            live_layers.update(layer.diff_id for layer in record.layers)
        for entry in os.listdir(self._path("layers", "sha256")):
            if "sha256:" + entry not in live_layers:
                self._discard(self._path("layers", "sha256", entry))
                report.layers.append("sha256:" + entry)
        for entry in os.listdir(self._path("blobs", "sha256")):
            if "sha256:" + entry not in live_blobs:
                os.unlink(self._path("blobs", "sha256", entry))
                report.blobs.append("sha256:" + entry)
        report.tmp.extend(self._clean_tmp())

    def _discard(self, path: str) -> None:
        """Rename into tmp (atomic) then delete: a crash never leaves half a layer in ``layers/``."""
        trash = tempfile.mkdtemp(prefix="trash-", dir=self._path("tmp"))
        os.rename(path, os.path.join(trash, "x"))
        shutil.rmtree(trash)

    def _clean_tmp(self) -> List[str]:
        """Remove work dirs whose owner died (their flock is free, and they are over a minute old) and old trash."""
        removed = []
        base = self._path("tmp")
        for entry in os.listdir(base):
            path = os.path.join(base, entry)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a live import owns it
            try:
                # the age check covers the instant between a work dir's mkdtemp and its flock
                if time.time() - os.fstat(fd).st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(entry)
            finally:
                os.close(fd)
        return removed


def _blame_the_blob(blob: VerifyingReader, failure: BaseException) -> None:
    """After a failed unpack, raise ``DigestMismatchError`` instead if the blob itself was corrupt.

    A damaged blob usually shows up first as a gzip or tar error; reading the rest of it (bounded
    by its declared size) tells the user the real cause: the content is not what was published.
    """
    if isinstance(failure, DigestMismatchError):
        return
    try:
        blob.finish()
    except DigestMismatchError as mismatch:
        raise mismatch from failure
    except (OSError, OciError):
        return


def _split_digest(digest: str) -> Tuple[str, str]:
    algorithm, sep, hexpart = digest.partition(":")
    if not sep or algorithm not in ("sha256", "sha512") or not hexpart or not all(
            c in "0123456789abcdef" for c in hexpart):
        raise ImageError("invalid digest {!r}".format(digest))
    return algorithm, hexpart


def resolve_manifest(source: BlobSource, tag: str) -> Tuple[Descriptor, bytes, Dict[str, Any]]:
    """From the source's index down to one image manifest for this host (nested indexes allowed)."""
    document: Dict[str, Any] = source.top_index()
    where = source.description
    for depth in range(MAX_INDEX_DEPTH):
        descriptor = choose_manifest(document, tag if depth == 0 else "", where)
        data, document = source.read_document(descriptor, "manifest")
        where = "index {}".format(descriptor.digest)
        if "manifests" in document or descriptor.media_type in INDEX_TYPES:
            continue
        if document.get("schemaVersion") != 2 or "layers" not in document or "config" not in document:
            raise ImageError("manifest {} is not an OCI or Docker schema 2 image manifest".format(descriptor.digest))
        return descriptor, data, document
    raise ImageError("{}: indexes nested deeper than {}".format(source.description, MAX_INDEX_DEPTH))


def _layer_descriptors(manifest: Dict[str, Any]) -> List[Descriptor]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError("manifest has no layer list")
    return [Descriptor.parse(layer, "manifest layer") for layer in layers]


def _new_record(manifest_desc: Descriptor, manifest: Dict[str, Any], config_desc: Descriptor,
                config: Dict[str, Any], source: str) -> ImageRecord:
    """Cross-check manifest and config (layer count, platform) and build the record."""
    descriptors = _layer_descriptors(manifest)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(descriptors):
        raise ImageError("image {}: the config lists {} diff ids for {} layers".format(
            manifest_desc.digest, len(diff_ids) if isinstance(diff_ids, list) else 0, len(descriptors)))
    for diff_id in diff_ids:
        _split_digest(str(diff_id))
    host = host_platform()
    image_platform = {"os": config.get("os", ""), "architecture": config.get("architecture", "")}
    if config.get("variant"):
        image_platform["variant"] = config["variant"]
    if not host.matches(image_platform):
        raise ImageError("image {} is for {}/{}; this host is {}".format(
            manifest_desc.digest, image_platform["os"], image_platform["architecture"], host))
    layers = [LayerRef(str(d), desc.digest, desc.media_type, desc.size) for d, desc in zip(diff_ids, descriptors)]
    return ImageRecord(manifest_digest=manifest_desc.digest, config_digest=config_desc.digest,
                       platform="/".join(v for v in image_platform.values() if v), layers=layers,
                       config=ImageConfig.from_document(config), size=sum(desc.size for desc in descriptors),
                       created=str(config.get("created") or ""), source=source)


def _check_layer_media_type(descriptor: Descriptor) -> None:
    """Refuse layer kinds we cannot unpack, with the reason, before reading a byte."""
    media_type = descriptor.media_type
    if "zstd" in media_type:
        raise ImageError("layer {} is zstd-compressed ({}); the Python standard library cannot decompress zstd: "
                         "re-push the image with gzip layers (skopeo copy --dest-compress-format gzip)"
                         .format(descriptor.digest, media_type))
    if "encrypted" in media_type or "foreign" in media_type:
        raise ImageError("layer {} has unsupported media type {}".format(descriptor.digest, media_type))


class _Prefixed:
    """A stream with a few already-read bytes put back in front (for sniffing compression)."""

    def __init__(self, head: bytes, inner: Any) -> None:
        self.head = head
        self.inner = inner

    def read(self, size: int = -1) -> bytes:
        if self.head:
            if size is None or size < 0:
                data, self.head = self.head + self.inner.read(), b""
                return data
            data, self.head = self.head[:size], self.head[size:]
            return data if len(data) == size else data + self.inner.read(size - len(data))
        return self.inner.read(size)


def _decompressed(blob: VerifyingReader, descriptor: Descriptor) -> Tuple[IO[bytes], str]:
    """Sniff the magic bytes (the media type is not trusted, and docker archives have none)."""
    head = blob.read(4)
    stream = _Prefixed(head, blob)
    if head[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=stream, mode="rb"), "gzip"  # type: ignore[arg-type]
    if head == _ZSTD_MAGIC:
        raise ImageError("layer {} is zstd-compressed; the Python standard library cannot decompress zstd: re-push "
                         "the image with gzip layers (skopeo copy --dest-compress-format gzip)".format(descriptor.digest))
    return stream, "none"  # type: ignore[return-value]
