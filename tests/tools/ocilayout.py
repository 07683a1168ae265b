"""Build OCI image layouts, archives and hostile layers by hand, for the image tests (no download).

Written from the OCI image-layout and image-manifest specifications: ``oci-layout``,
``index.json``, ``blobs/sha256/<hex>``; a manifest names a config and layer blobs; the config's
``rootfs.diff_ids`` are the digests of the uncompressed layer tars.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = LAYER_TAR + "+gzip"
FIXED_MTIME = 1700000000


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class TarBuilder:
    """An uncompressed tar in memory, member by member, with full control over the headers."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = FIXED_MTIME
        return info

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> "TarBuilder":
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid, gid))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
             pax: Optional[Dict[str, str]] = None) -> "TarBuilder":
        info = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        if pax:
            info.pax_headers = dict(pax)
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> "TarBuilder":
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def hardlink(self, name: str, target: str) -> "TarBuilder":
        info = self._info(name, tarfile.LNKTYPE, 0o644)
        info.linkname = target
        self.tar.addfile(info)
        return self

    def device(self, name: str, kind: bytes = tarfile.CHRTYPE, major: int = 1, minor: int = 3) -> "TarBuilder":
        info = self._info(name, kind, 0o666)
        info.devmajor, info.devminor = major, minor
        self.tar.addfile(info)
        return self

    def fifo(self, name: str) -> "TarBuilder":
        self.tar.addfile(self._info(name, tarfile.FIFOTYPE, 0o644))
        return self

    def raw_header(self, info: tarfile.TarInfo) -> "TarBuilder":
        """A header written as is, with no data after it (for lying sizes)."""
        self.tar.fileobj.write(info.tobuf(tarfile.GNU_FORMAT))
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buffer.getvalue()


def busybox_layers(busybox: str) -> Tuple[bytes, bytes]:
    """Two layers from /bin/busybox: a base, and a top layer with a whiteout and an opaque directory.

    Base: bin/busybox + every applet as a symlink, etc/passwd, etc/group, tmp, etc/doomed,
    keep/old-a, keep/old-b, opaque/old. Top: removes etc/doomed (whiteout), makes opaque/ opaque
    (hides opaque/old) and adds opaque/new, replaces etc/motd, adds a setuid file.
    """
    with open(busybox, "rb") as handle:
        binary = handle.read()
    applets = subprocess.check_output([busybox, "--list"]).decode().split()
    base = TarBuilder().dir("bin").file("bin/busybox", binary, 0o755)
    for applet in applets:
        if applet != "busybox":
            base.symlink("bin/" + applet, "busybox")
    base.dir("etc").file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    base.file("etc/group", b"root:x:0:\n").file("etc/doomed", b"gone in layer 2\n").file("etc/motd", b"old\n")
    base.dir("tmp", 0o1777).dir("root", 0o700).dir("proc").dir("sys").dir("dev")
    base.dir("keep").file("keep/old-a", b"a\n").file("keep/old-b", b"b\n")
    base.dir("opaque").file("opaque/old", b"hidden by the opaque marker\n")
    top = TarBuilder().dir("etc").file("etc/.wh.doomed").file("etc/motd", b"new\n")
    top.dir("opaque").file("opaque/.wh..wh..opq").file("opaque/new", b"visible\n")
    top.dir("usr").dir("usr/bin").file("usr/bin/suid", b"#!/bin/sh\n", 0o4755, uid=0, gid=0)
    top.file("usr/bin/owned", b"x", 0o640, uid=1234, gid=5678)
    return base.bytes(), top.bytes()


def image_config(diff_ids: Sequence[str], **overrides: Any) -> Dict[str, Any]:
    config = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hello"], "Env": ["PATH=/bin:/usr/bin", "A=1"],
              "WorkingDir": "/tmp", "User": "0:0", "StopSignal": "SIGQUIT",
              "Labels": {"org.example.role": "test"}}
    config.update(overrides.pop("config", {}))
    document = {"architecture": overrides.pop("architecture", "amd64"), "os": overrides.pop("os", "linux"),
                "created": "2026-11-28T00:00:00Z", "config": config,
                "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    document.update(overrides)
    return document


class LayoutBuilder:
    """An OCI image layout directory built blob by blob."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.manifests: List[Dict[str, Any]] = []
        os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as handle:
            json.dump({"imageLayoutVersion": "1.0.0"}, handle)

    def blob(self, data: bytes, media_type: str) -> Dict[str, Any]:
        digest = sha256(data)
        with open(os.path.join(self.path, "blobs", "sha256", digest.split(":")[1]), "wb") as handle:
            handle.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(self, layers: Sequence[bytes], compress: bool = True, tag: Optional[str] = "latest",
              platform: Optional[Dict[str, str]] = None, add_to_index: bool = True,
              **config_overrides: Any) -> Dict[str, Any]:
        """Write layers, config and manifest; returns the manifest descriptor (also listed in index.json)."""
        descriptors = []
        for layer in layers:
            if compress:
                descriptors.append(self.blob(gzip.compress(layer, mtime=0), LAYER_GZIP))
            else:
                descriptors.append(self.blob(layer, LAYER_TAR))
        config = image_config([sha256(layer) for layer in layers], **config_overrides)
        config_desc = self.blob(json.dumps(config).encode(), OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": descriptors}
        descriptor = self.blob(json.dumps(manifest).encode(), OCI_MANIFEST)
        if tag:
            descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
        if platform:
            descriptor["platform"] = platform
        if add_to_index:
            self.manifests.append(descriptor)
            self.write_index()
        return descriptor

    def nested_index(self, entries: Sequence[Dict[str, Any]], tag: str) -> Dict[str, Any]:
        """An image index blob listing ``entries``, itself listed in index.json under ``tag``."""
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)}
        descriptor = self.blob(json.dumps(index).encode(), OCI_INDEX)
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.manifests.append(descriptor)
        self.write_index()
        return descriptor

    def write_index(self) -> None:
        with open(os.path.join(self.path, "index.json"), "w") as handle:
            json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.manifests}, handle)

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.path, "blobs", "sha256", digest.split(":")[1])


def tar_directory(source: str, target: str) -> str:
    """Pack a layout directory into an oci-archive tar (members relative to the layout root)."""
    with tarfile.open(target, "w") as archive:
        for entry in sorted(os.listdir(source)):
            archive.add(os.path.join(source, entry), arcname=entry)
    return target


def docker_archive(layers: Sequence[bytes], target: str, repo_tag: str = "bb:latest", **config_overrides: Any) -> str:
    """A ``docker save``-style archive: manifest.json, <id>.json config, <n>/layer.tar."""
    config = json.dumps(image_config([sha256(layer) for layer in layers], **config_overrides)).encode()
    with tarfile.open(target, "w") as archive:
        names: List[str] = []
        first_copy: Dict[str, str] = {}
        for number, layer in enumerate(layers):
            names.append("{}/layer.tar".format(number))
            if sha256(layer) in first_copy:  # docker save links a repeated layer to its first copy
                link = tarfile.TarInfo(names[-1])
                link.type = tarfile.SYMTYPE
                link.linkname = "../" + first_copy[sha256(layer)]
                archive.addfile(link)
                continue
            first_copy[sha256(layer)] = names[-1]
            _add_bytes(archive, names[-1], layer)
        config_name = sha256(config).split(":")[1] + ".json"
        _add_bytes(archive, config_name, config)
        manifest = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}]
        _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
    return target


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = FIXED_MTIME
    archive.addfile(info, io.BytesIO(data))


def busybox_path() -> Optional[str]:
    return shutil.which("busybox")
