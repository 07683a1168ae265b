"""Where an image comes from: OCI layouts, OCI and Docker archives, and registry pulls through skopeo.

A source gives three things: the manifest (chosen for this host's platform when the source holds
a list), the config, and a stream per layer blob. Nothing read here is trusted: every manifest,
config and blob is checked against the digest *and* size of the descriptor that named it
(``VerifyingReader``), and small documents are read with a hard size cap before JSON parsing.

Source strings:

* ``oci:/path[:tag]``: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).
* ``oci-archive:/file.tar[:tag]``: the same layout inside a tar (read in place, never unpacked).
* ``docker-archive:/file.tar[:repo:tag]``: ``docker save`` output (``manifest.json``); a
  ``docker save`` that also carries an OCI layout (Docker 25+) is read as that layout.
* ``docker://host/repo[:tag|@digest]``: copied by skopeo into a ``dir:`` directory under the
  store's tmp (the ``dir:`` transport keeps the registry's manifest bytes, so the digest we record
  is the registry's digest), then read like a layout.
"""
from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import platform
import re
import shutil
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    CommandError,
    MissingDependencyError,
    OciError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import CompletedCommand, run_command

MAX_DOCUMENT_BYTES = 4 << 20  # a manifest, index or config larger than this is not an image
MAX_INDEX_DEPTH = 4
SKOPEO_TIMEOUT = 3600.0
DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_MACHINE_TO_PLATFORM = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", ""), "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
}


class ImageError(OciError):
    """An image source is unusable: unreadable, malformed, for another platform, or fails verification."""


class DigestMismatchError(ImageError):
    """A blob's content does not match the digest or size its descriptor promised."""


@dataclass(frozen=True)
class Platform:
    """An OCI platform (os, architecture, variant)."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def matches(self, other: Dict[str, Any]) -> bool:
        """True if a descriptor's ``platform`` dict names this platform (a missing variant matches)."""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        variant = other.get("variant", "")
        return not variant or not self.variant or variant == self.variant or (
            self.architecture == "arm64" and variant == "v8")


def host_platform() -> Platform:
    """This host as an OCI platform, from ``platform.machine()`` (linux only: images are Linux images)."""
    machine = platform.machine()
    architecture, variant = _MACHINE_TO_PLATFORM.get(machine, (machine, ""))
    return Platform("linux", architecture, variant)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its exact size."""

    media_type: str
    digest: str
    size: int
    annotations: Tuple[Tuple[str, str], ...] = ()
    platform: Optional[Tuple[Tuple[str, str], ...]] = None

    @classmethod
    def parse(cls, data: Any, where: str) -> "Descriptor":
        """Validate a descriptor dict: digest syntax and a non-negative integer size."""
        if not isinstance(data, dict):
            raise ImageError("{}: a descriptor is not an object".format(where))
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise ImageError("{}: invalid digest {!r}".format(where, digest))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError("{}: invalid size {!r} for {}".format(where, size, digest))
        annotations = data.get("annotations") or {}
        plat = data.get("platform")
        return cls(str(data.get("mediaType", "")), digest, size,
                   tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
                   tuple(sorted((str(k), str(v)) for k, v in plat.items() if isinstance(v, str)))
                   if isinstance(plat, dict) else None)

    def annotation(self, key: str) -> Optional[str]:
        return dict(self.annotations).get(key)


def new_hasher(digest: str) -> "hashlib._Hash":
    """A hash object for the algorithm a digest names."""
    return hashlib.new(digest.split(":", 1)[0])


class VerifyingReader:
    """Reads exactly ``descriptor.size`` bytes and checks the digest when the stream ends.

    More bytes than declared, fewer, or a different digest all raise ``DigestMismatchError``;
    ``finish()`` drains and checks, and must be called before the content is trusted.
    """

    def __init__(self, inner: IO[bytes], descriptor: Descriptor) -> None:
        self.inner = inner
        self.descriptor = descriptor
        self.hasher = new_hasher(descriptor.digest)
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        remaining = self.descriptor.size - self.count
        want = remaining + 1 if size is None or size < 0 else min(size, remaining + 1)
        data = self.inner.read(want) if want > 0 else b""
        self.count += len(data)
        if self.count > self.descriptor.size:
            raise DigestMismatchError("blob {} is larger than its declared {} bytes"
                                      .format(self.descriptor.digest, self.descriptor.size))
        self.hasher.update(data)
        return data

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
        if self.inner.read(1):
            raise DigestMismatchError("blob {} is larger than its declared {} bytes"
                                      .format(self.descriptor.digest, self.descriptor.size))
        if self.count != self.descriptor.size:
            raise DigestMismatchError("blob {} is {} bytes, its descriptor says {}"
                                      .format(self.descriptor.digest, self.count, self.descriptor.size))
        actual = "{}:{}".format(self.hasher.name, self.hasher.hexdigest())
        if actual != self.descriptor.digest:
            raise DigestMismatchError("blob {} does not match its digest (content hashes to {})"
                                      .format(self.descriptor.digest, actual))


def parse_json_document(data: bytes, what: str) -> Dict[str, Any]:
    """JSON object or ``ImageError`` naming the document."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImageError("{} is not valid JSON: {}".format(what, exc)) from exc
    if not isinstance(document, dict):
        raise ImageError("{} is not a JSON object".format(what))
    return document


class BlobSource(abc.ABC):
    """Base for a place that holds blobs by digest plus a top-level index."""

    description = "image source"

    @abc.abstractmethod
    def open_blob(self, digest: str) -> IO[bytes]:
        """An open binary file of the blob with this digest (not yet verified)."""

    @abc.abstractmethod
    def top_index(self) -> Dict[str, Any]:
        """The OCI index that lists the images this source holds."""

    def close(self) -> None:
        """Release open files and temporary copies."""

    def read_document(self, descriptor: Descriptor, what: str) -> Tuple[bytes, Dict[str, Any]]:
        """A verified small blob (manifest, index, config), as bytes and parsed JSON."""
        if descriptor.size > MAX_DOCUMENT_BYTES:
            raise ImageError("{} {} declares {} bytes (limit {})".format(
                what, descriptor.digest, descriptor.size, MAX_DOCUMENT_BYTES))
        handle = self.open_blob(descriptor.digest)
        try:
            reader = VerifyingReader(handle, descriptor)
            data = reader.read(descriptor.size)
            reader.finish()
        finally:
            handle.close()
        return data, parse_json_document(data, "{} {}".format(what, descriptor.digest))


def _blob_relpath(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise ImageError("invalid digest {!r}".format(digest))
    algorithm, hexpart = digest.split(":", 1)
    return "blobs/{}/{}".format(algorithm, hexpart)


def _read_capped(handle: IO[bytes], what: str) -> bytes:
    data = handle.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ImageError("{} is larger than {} bytes".format(what, MAX_DOCUMENT_BYTES))
    return data


class LayoutSource(BlobSource):
    """An OCI image layout directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = "OCI layout {}".format(path)
        layout_file = os.path.join(path, "oci-layout")
        if not os.path.isfile(layout_file):
            raise ImageError("{} is not an OCI image layout: no oci-layout file".format(path))

    def open_blob(self, digest: str) -> IO[bytes]:
        try:
            return open(os.path.join(self.path, _blob_relpath(digest)), "rb")
        except OSError as exc:
            raise ImageError("{}: blob {} is missing: {}".format(self.description, digest, exc.strerror)) from exc

    def top_index(self) -> Dict[str, Any]:
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as handle:
                data = _read_capped(handle, "index.json")
        except OSError as exc:
            raise ImageError("{}: cannot read index.json: {}".format(self.description, exc.strerror)) from exc
        return parse_json_document(data, "{} index.json".format(self.description))


class ArchiveSource(BlobSource):
    """An OCI layout or ``docker save`` output inside a tar file, read in place (never unpacked)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = "archive {}".format(path)
        try:
            self.tar = tarfile.open(path, "r:*")
            # symlinks too: `docker save` links a repeated layer's tar to its first copy; tarfile
            # resolves such links to another member of the same archive, never to a host path
            self.members = {_normal(m.name): m for m in self.tar.getmembers() if m.isfile() or m.islnk() or m.issym()}
        except (OSError, tarfile.TarError) as exc:
            raise ImageError("cannot read {}: {}".format(self.description, exc)) from exc

    def close(self) -> None:
        self.tar.close()

    def has(self, name: str) -> bool:
        return name in self.members

    def open_member(self, name: str) -> IO[bytes]:
        member = self.members.get(_normal(name))
        try:
            handle = self.tar.extractfile(member) if member is not None else None
        except KeyError:  # a link whose target is not in the archive
            handle = None
        if handle is None:
            raise ImageError("{}: {} is missing".format(self.description, name))
        return handle

    def read_member(self, name: str) -> bytes:
        with self.open_member(name) as handle:
            return _read_capped(handle, "{} in {}".format(name, self.description))

    def open_blob(self, digest: str) -> IO[bytes]:
        return self.open_member(_blob_relpath(digest))

    def top_index(self) -> Dict[str, Any]:
        if not self.has("oci-layout"):
            raise ImageError("{} holds no OCI image layout (no oci-layout file)".format(self.description))
        return parse_json_document(self.read_member("index.json"), "{} index.json".format(self.description))


def _normal(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


class DirSource(BlobSource):
    """skopeo's ``dir:`` output: ``manifest.json`` as the registry served it, blobs named by hex."""

    def __init__(self, path: str, cleanup: bool = True) -> None:
        self.path = path
        self.cleanup = cleanup
        self.description = "registry copy {}".format(path)
        self.manifest_digest = ""

    def open_blob(self, digest: str) -> IO[bytes]:
        _blob_relpath(digest)
        name = "manifest.json" if digest == self.manifest_digest else digest.split(":", 1)[1]
        try:
            return open(os.path.join(self.path, name), "rb")
        except OSError as exc:
            raise ImageError("{}: blob {} is missing: {}".format(self.description, digest, exc.strerror)) from exc

    def top_index(self) -> Dict[str, Any]:
        """A one-entry index for the manifest skopeo wrote (already resolved to this platform)."""
        with open(os.path.join(self.path, "manifest.json"), "rb") as handle:
            data = _read_capped(handle, "manifest.json")
        document = parse_json_document(data, "{} manifest.json".format(self.description))
        self.manifest_digest = "sha256:" + hashlib.sha256(data).hexdigest()
        media_type = str(document.get("mediaType") or MANIFEST_TYPES[0])
        return {"schemaVersion": 2, "manifests": [{"mediaType": media_type, "digest": self.manifest_digest,
                                                   "size": len(data)}]}

    def close(self) -> None:
        if self.cleanup:
            shutil.rmtree(self.path, ignore_errors=True)


class DockerArchiveSource(ArchiveSource):
    """``docker save`` output without an OCI layout: ``manifest.json`` naming a config and layer tars.

    There is no manifest blob, so one is synthesised (OCI media types, layers described by the
    digest of the file as stored): it is canonical JSON, so the same archive always gives the
    same manifest digest, and the config digest is the image id Docker shows.
    """

    def __init__(self, path: str, tag: str) -> None:
        super().__init__(path)
        self.tag = tag
        try:
            self.description = "docker archive {}".format(path)
            self._by_digest: Dict[str, str] = {}
            self._manifest = self._synthesise(tag)
        except BaseException:
            self.close()
            raise

    def _synthesise(self, tag: str) -> bytes:
        entries = json.loads(self.read_member("manifest.json").decode("utf-8")) if self.has("manifest.json") else None
        if not isinstance(entries, list) or not entries:
            raise ImageError("{} has no manifest.json listing images".format(self.description))
        entry = self._pick(entries, tag)
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageError("{}: manifest.json entry lacks Config or Layers".format(self.description))
        config = self.read_member(config_name)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self._by_digest[config_digest] = config_name
        layers = [self._layer_descriptor(str(name)) for name in layer_names]
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPES[0],
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": config_digest, "size": len(config)},
                    "layers": layers}
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode("utf-8")
        self.manifest_digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return data

    def _pick(self, entries: List[Any], tag: str) -> Dict[str, Any]:
        if tag:
            chosen = [e for e in entries if isinstance(e, dict) and tag in (e.get("RepoTags") or [])]
            if not chosen:
                raise ImageError("{}: no image tagged {!r}".format(self.description, tag))
            return chosen[0]
        if len(entries) != 1 or not isinstance(entries[0], dict):
            raise ImageError("{} holds {} images; name one with :REPO:TAG".format(self.description, len(entries)))
        return entries[0]

    def _layer_descriptor(self, name: str) -> Dict[str, Any]:
        """Digest of the layer file as stored (one hashing pass), its size and its compression."""
        member = self.members.get(_normal(name))
        if member is None:
            raise ImageError("{}: layer {} is missing".format(self.description, name))
        hasher = hashlib.sha256()
        with self.open_member(name) as handle:
            head = handle.read(4)
            hasher.update(head)
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
        digest = "sha256:" + hasher.hexdigest()
        self._by_digest[digest] = name
        media_type = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if head[:2] == b"\x1f\x8b" else "")
        return {"mediaType": media_type, "digest": digest, "size": member.size}

    def open_blob(self, digest: str) -> IO[bytes]:
        if digest == self.manifest_digest:
            return io.BytesIO(self._manifest)
        name = self._by_digest.get(digest)
        if name is None:
            raise ImageError("{}: no blob {}".format(self.description, digest))
        return self.open_member(name)

    def top_index(self) -> Dict[str, Any]:
        """A one-entry index for the synthesised manifest (already chosen by tag)."""
        entry: Dict[str, Any] = {"mediaType": MANIFEST_TYPES[0], "digest": self.manifest_digest,
                                 "size": len(self._manifest)}
        if self.tag:
            entry["annotations"] = {REF_NAME_ANNOTATION: self.tag}
        return {"schemaVersion": 2, "manifests": [entry]}


@dataclass
class SourceSpec:
    """A parsed source string."""

    transport: str   # oci, oci-archive, docker-archive, docker
    path: str        # directory, file, or registry reference
    tag: str = ""

    def __str__(self) -> str:
        if self.transport == "docker":
            return "docker://" + self.path
        return "{}:{}{}".format(self.transport, self.path, ":" + self.tag if self.tag else "")


def parse_source(source: str) -> SourceSpec:
    """Split ``transport:path[:tag]``; paths must be absolute so a source means the same thing everywhere."""
    if source.startswith("docker://"):
        reference = source[len("docker://"):]
        if not reference or any(ch.isspace() for ch in reference):
            raise ImageError("invalid registry reference {!r}".format(source))
        return SourceSpec("docker", reference)
    transport, sep, rest = source.partition(":")
    if not sep or transport not in ("oci", "oci-archive", "docker-archive"):
        raise ImageError("unknown image source {!r}: use oci:PATH[:TAG], oci-archive:FILE[:TAG], "
                         "docker-archive:FILE[:REPO:TAG] or docker://REFERENCE".format(source))
    path, tag = _split_path_tag(rest, transport)
    if not path.startswith("/"):
        raise ImageError("image source {!r}: the path must be absolute".format(source))
    return SourceSpec(transport, os.path.normpath(path), tag)


def _split_path_tag(rest: str, transport: str) -> Tuple[str, str]:
    """The path ends at the first ':' (paths with ':' are not supported, as in skopeo)."""
    path, sep, tag = rest.partition(":")
    if sep and not tag:
        raise ImageError("image source {}:{} has an empty tag".format(transport, rest))
    return path, tag


def open_source(spec: SourceSpec, work_dir: str, tls_verify: bool = True, authfile: Optional[str] = None
                ) -> BlobSource:
    """A ``BlobSource`` for a parsed source; registry sources are first copied into ``work_dir``."""
    if spec.transport == "oci":
        return LayoutSource(spec.path)
    if spec.transport == "oci-archive":
        return ArchiveSource(spec.path)
    if spec.transport == "docker-archive":
        archive = ArchiveSource(spec.path)
        if archive.has("oci-layout") and archive.has("index.json") and not spec.tag:
            return archive
        archive.close()
        return DockerArchiveSource(spec.path, spec.tag)
    return skopeo_copy(spec.path, work_dir, tls_verify, authfile)


def skopeo_binary() -> str:
    """The skopeo path, or an error that says how to get it."""
    binary = shutil.which("skopeo")
    if not binary:
        raise MissingDependencyError("pulling docker:// images needs skopeo, which is not installed "
                                     "(apt-get install skopeo / dnf install skopeo)")
    return binary


def skopeo_args(tls_verify: bool, authfile: Optional[str], prefix: str) -> List[str]:
    args = ["--{}tls-verify={}".format(prefix, "true" if tls_verify else "false")]
    if authfile:
        args.append("--{}authfile={}".format(prefix, authfile))
    return args


def skopeo_copy(reference: str, work_dir: str, tls_verify: bool, authfile: Optional[str]) -> DirSource:
    """``skopeo copy docker://REF dir:WORK_DIR/pull``: the manifest bytes stay the registry's own."""
    target = os.path.join(work_dir, "pull")
    argv = [skopeo_binary(), "copy", "--quiet"] + skopeo_args(tls_verify, authfile, "src-") + [
        "docker://" + reference, "dir:" + target]
    _skopeo(argv, "pull docker://" + reference)
    return DirSource(target)


def _skopeo(argv: List[str], what: str) -> CompletedCommand:
    """Run skopeo; its failure becomes an ``ImageError`` carrying skopeo's own explanation."""
    try:
        return run_command(argv, timeout=SKOPEO_TIMEOUT)
    except CommandError as exc:
        detail = exc.stderr.decode("utf-8", "replace").strip() or str(exc)
        raise ImageError("cannot {}: skopeo says: {}".format(what, detail[-2000:])) from exc


def skopeo_remote_digest(reference: str, tls_verify: bool, authfile: Optional[str]) -> str:
    """The manifest digest a pull would give on this host, from ``skopeo inspect --raw`` (no layer download)."""
    argv = [skopeo_binary(), "inspect", "--raw"] + skopeo_args(tls_verify, authfile, "") + ["docker://" + reference]
    raw = _skopeo(argv, "inspect docker://" + reference).stdout
    document = parse_json_document(raw, "manifest of docker://" + reference)
    if "manifests" not in document:
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return choose_manifest(document, "", "docker://" + reference).digest


def choose_manifest(index: Dict[str, Any], tag: str, where: str) -> Descriptor:
    """Pick one entry of an index: by tag (ref.name annotation) if given, then by host platform."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise ImageError("{}: the index lists no images".format(where))
    descriptors = [Descriptor.parse(entry, where) for entry in entries]
    if tag:
        descriptors = [d for d in descriptors if d.annotation(REF_NAME_ANNOTATION) == tag]
        if not descriptors:
            raise ImageError("{}: no image tagged {!r}".format(where, tag))
    if len(descriptors) == 1:
        return descriptors[0]
    host = host_platform()
    matching = [d for d in descriptors if d.platform is not None and host.matches(dict(d.platform))]
    if len(matching) == 1:
        return matching[0]
    if not matching and all(d.platform is None for d in descriptors):
        raise ImageError("{}: {} images and none says its platform; name one with a tag".format(where, len(descriptors)))
    if not matching:
        offered = sorted({_platform_text(d) for d in descriptors})
        raise ImageError("{}: no image for this host's platform {} (offered: {})"
                         .format(where, host, ", ".join(offered)))
    raise ImageError("{}: {} images match platform {}; name one with a tag".format(where, len(matching), host))


def _platform_text(descriptor: Descriptor) -> str:
    if descriptor.platform is None:
        return "unspecified"
    plat = dict(descriptor.platform)
    return str(Platform(plat.get("os", "?"), plat.get("architecture", "?"), plat.get("variant", "")))
