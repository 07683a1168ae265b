"""Where a container's root filesystem comes from: a ``rootfs`` directory, a ``bundle``, an ``image``.

* ``rootfs``: a directory shared by any number of containers and never written to. Each
  container gets its own writable layer (overlayfs: the directory is the read-only lower, an
  ``upper`` and ``work`` directory per container under ``<persist root>/layers/<name>``), mounted under the run
  root, so two containers never write into each other's root and a restart keeps what the
  container wrote. With ``read_only: true`` no layer is needed: the directory is used directly
  and the runtime mounts it read-only inside the container.
* ``bundle``: a directory with ``config.json`` (and usually ``rootfs/``), used as given. Its
  identity is its path plus the sha256 of ``config.json``: editing the file recreates.
* ``image``: an image already in the image store (``image.py``, ``<persist root>/images``): its
  unpacked layers are the overlay's lower directories, its manifest digest is its identity (a
  re-tagged name that now points at another digest recreates), and its configuration supplies
  the defaults of the process (``image.apply_image_defaults``). Importing images is the image
  module's job; an unknown image fails before anything is touched.

Planning only computes paths (pure); ``mount_layer``/``release_layer`` are the side effects and
are called by ``executor.py`` only. The mount itself is ``overlay.py``'s (the one the image
sources use): mount(2) through ctypes, no subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.ids import validate_name
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import rootfs_path
from ansible_collections.daemonless.oci.plugins.module_utils.state import StatePaths, make_private_dir

_OVERLAY_UNSAFE = (":", ",", "\n")  # overlayfs option syntax cannot quote these


@dataclass
class Source:
    """A resolved source: what decides identity, and where the container's root will be."""

    kind: str                       # rootfs | bundle | image
    path: str                       # the directory the user named
    identity: Dict[str, Any]        # compared on every run; a change recreates
    root: str = ""                  # root.path for the spec (the overlay mount point when layered)
    layered: bool = False           # a per-container overlay layer is used
    bundle_spec: Optional[Dict[str, Any]] = None
    layer: Dict[str, str] = field(default_factory=dict)
    lowers: List[str] = field(default_factory=list)     # overlay lower directories, bottom to top
    lower_base: Optional[str] = None                    # image store layer base (short mount options)
    image_defaults: Dict[str, Any] = field(default_factory=dict)
    lookup_root: str = ""                               # where user and group names are read

    def to_json(self) -> Dict[str, Any]:
        """What the container stores, so later runs (and the boot unit) can remount the layer."""
        return {"kind": self.kind, "path": self.path, "identity": self.identity, "root": self.root,
                "layered": self.layered, "layer": dict(self.layer), "lowers": list(self.lowers),
                "lower_base": self.lower_base}


def layer_dirs(paths: StatePaths, name: str) -> Dict[str, str]:
    """The per-container overlay directories (keyed by name: a recreate starts a fresh layer)."""
    validate_name(name)
    return {"dir": os.path.join(paths.persist_root, "layers", name),
            "merged": os.path.join(paths.run_root, "rootfs", name)}


def resolve(kind: str, path: str, name: str, paths: StatePaths, read_only: bool) -> Source:
    """Check the source exists and compute its identity and root path, touching nothing."""
    if kind == "image":
        return _image(path, name, paths)
    if not os.path.isdir(path):
        raise ValidationError("{} {} is not a directory".format(kind, path))
    if kind == "bundle":
        return _bundle(path)
    if any(mark in path for mark in _OVERLAY_UNSAFE):
        raise ValidationError("rootfs path {!r} cannot be used as an overlay lower directory: it contains "
                              "one of ':' ',' or a newline".format(path))
    identity = {"rootfs": path, "layered": not read_only}
    if read_only:
        return Source("rootfs", path, identity, root=path, lookup_root=path)
    layer = layer_dirs(paths, name)
    return Source("rootfs", path, identity, root=layer["merged"], layered=True, layer=layer, lowers=[path],
                  lookup_root=path)


def image_store(paths: StatePaths) -> Any:
    """The image store shared with the image module: ``<persist root>/images``.

    Imported here, not at the top: the image code (tar, compression, registry helpers) costs tens of
    milliseconds to import, which a rootfs or bundle container never needs.
    """
    from ansible_collections.daemonless.oci.plugins.module_utils.image import ImageStore
    return ImageStore(os.path.join(paths.persist_root, "images"))


def _image(ref: str, name: str, paths: StatePaths) -> Source:
    """An image already in the store: its layers are the lowers, its manifest digest the identity."""
    store = image_store(paths)
    record = store.find(ref)
    if record is None:
        raise ValidationError("image {!r} is not in the image store {}: import it first (for example with "
                              "daemonless.oci.oci_image)".format(ref, store.root))
    identity = {"image": ref, "manifest_digest": record.manifest_digest}
    layer = layer_dirs(paths, name)
    lookup = next((top for top in reversed(record.layer_dirs)
                   if os.path.exists(os.path.join(top, "etc", "passwd"))), layer["merged"])
    return Source("image", ref, identity, root=layer["merged"], layered=True, layer=layer,
                  lowers=list(record.layer_dirs), lower_base=store.layers_base(),
                  image_defaults=_image_defaults(record), lookup_root=lookup)


def _image_defaults(record: Any) -> Dict[str, Any]:
    from ansible_collections.daemonless.oci.plugins.module_utils.image import image_defaults
    return image_defaults(record)


def _bundle(path: str) -> Source:
    config = os.path.join(path, "config.json")
    try:
        with open(config, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ValidationError("bundle {} has no config.json".format(path)) from None
    try:
        spec = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise ValidationError("bundle {}: config.json is not valid JSON: {}".format(path, exc)) from exc
    if not isinstance(spec, dict) or not (spec.get("root") or {}).get("path"):
        raise ValidationError("bundle {}: config.json has no root.path".format(path))
    # runtimes refuse a root that is a symlink: resolve it (the identity stays the bundle's path + digest)
    spec["root"]["path"] = os.path.realpath(rootfs_path(spec, path))
    if not os.path.isdir(spec["root"]["path"]):
        raise ValidationError("bundle {}: root.path {} is not a directory".format(path, spec["root"]["path"]))
    identity = {"bundle": path, "config_sha256": hashlib.sha256(data).hexdigest()}
    return Source("bundle", path, identity, root=spec["root"]["path"], bundle_spec=spec,
                  lookup_root=spec["root"]["path"])


# ---------------------------------------------------------------- side effects (executor only)

def mount_layer(lowers: List[str], layer: Dict[str, str], base: Optional[str] = None) -> None:
    """Mount the overlay through ``overlay.py`` (idempotent: an existing mount is left alone)."""
    from ansible_collections.daemonless.oci.plugins.module_utils import overlay  # only runs that mount pay for it
    make_private_dir(layer["dir"])
    upper = overlay.rootfs_paths(layer["dir"])["upper"]
    if not os.path.isdir(upper):
        # The upper directory's own mode and owner become those of the container's "/": copy the
        # top lower root's, or a non-root user in the container could not even traverse "/".
        info = os.stat(lowers[-1])
        make_private_dir(upper)
        os.chmod(upper, info.st_mode & 0o7777)
        os.chown(upper, info.st_uid, info.st_gid)
    overlay.mount_overlay(lowers, layer["dir"], base, layer["merged"])


def release_layer(layer: Dict[str, str]) -> None:
    """Unmount and delete a container's writable layer (the container is gone or being recreated)."""
    if not layer:
        return
    from ansible_collections.daemonless.oci.plugins.module_utils import overlay
    overlay.unmount_rootfs(layer["dir"], layer["merged"])
    # Not rmdir: a runtime that could not see the mount (another mount namespace) may have created
    # mount points in the bare directory underneath; it is ours and goes entirely.
    if os.path.isdir(layer["merged"]) and not overlay.is_mountpoint(layer["merged"]):
        shutil.rmtree(layer["merged"], ignore_errors=True)
    shutil.rmtree(layer["dir"], ignore_errors=True)


def ensure_root(stored: Dict[str, Any]) -> None:
    """Before a start: remount the layer a reboot (or an unmount) took away."""
    if stored.get("layered") and stored.get("layer"):
        mount_layer(stored.get("lowers") or [stored["path"]], stored["layer"], stored.get("lower_base"))
