"""What a container needs from the image store: find or fetch an image, mount it, name its identity.

The container module calls these functions; the store itself (``image.py``) knows nothing about
containers. Three rules live here so that every caller applies them the same way:

* ``pull`` decides when the source is contacted: ``never`` (the image must be in the store),
  ``missing`` (fetch only when the name is unknown), ``always`` (ask the source every run; the
  store makes this cheap because an unchanged manifest digest writes nothing).
* In check mode nothing is written: a missing image is reported as an error only when the source
  cannot tell what it would be (``pull: never``); otherwise the record the store already has is
  returned, or a prediction is impossible and the caller gets ``None`` for "would be pulled".
* The identity a container records (and compares on the next run) is the reference and the
  manifest digest only: the image's configuration is a default, never a playbook setting, so it
  cannot cause a recreate loop, while a new digest under the same name always recreates.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.image import (
    ImageRecord,
    ImageStore,
    apply_image_defaults,
    image_defaults,
)
from ansible_collections.daemonless.oci.plugins.module_utils.image_source import parse_source

PULL_POLICIES = ("missing", "always", "never")
IDENTITY_KEY = "image"  # Container.extras[IDENTITY_KEY] = image_identity(record) for library-made containers


def store_for(persist_root: str) -> ImageStore:
    """The one store every module shares: ``<persist root>/images``."""
    return ImageStore(os.path.join(persist_root, "images"))


def _is_source(image_ref: str) -> bool:
    """A reference the store can fetch from (a transport prefix), as opposed to a stored name or digest."""
    return image_ref.startswith(("oci:", "oci-archive:", "docker-archive:", "docker://"))


def resolve_image(persist_root: str, image_ref: str, pull: str = "missing", check_mode: bool = False,
                  **source_options: Any) -> Optional[ImageRecord]:
    """The stored record for ``image_ref``, fetching it first when ``pull`` says so.

    ``image_ref`` is a stored name, a manifest digest or image id, or a source string (then it is
    also the stored name). Returns ``None`` only in check mode, when the image would be fetched
    and so its record cannot exist yet; the caller reports "would create" for that.
    ``source_options`` go to ``ImageStore.import_image`` (``allow_devices``, ``tls_verify``, ``authfile``).
    """
    if pull not in PULL_POLICIES:
        raise ValidationError("pull must be one of {}, got {!r}".format(", ".join(PULL_POLICIES), pull))
    store = store_for(persist_root)
    known = store.find(image_ref)
    fetchable = _is_source(image_ref)
    if known is not None and (pull != "always" or not fetchable):
        return known
    if pull == "never" or not fetchable:
        hint = "" if fetchable else (": give a source (oci:, oci-archive:, docker-archive:, docker://) "
                                     "or import it with daemonless.oci.oci_image")
        raise ValidationError("image {!r} is not in the image store {}{}".format(image_ref, store.root, hint))
    parse_source(image_ref)  # a malformed source fails the same way in check mode as in a real run
    if check_mode:
        return known  # the stored record if any: a real run could only refresh it
    return store.import_image(image_ref, name=image_ref, **source_options)


def image_identity(record: ImageRecord, ref: str = "") -> Dict[str, str]:
    """What a container stores and compares: the reference it was asked for and the manifest digest."""
    name = ref or (record.names[0] if record.names else record.manifest_digest)
    return {"ref": name, "manifest_digest": record.manifest_digest}


def image_rootfs(record: ImageRecord, container_dir: str, persist_root: Optional[str] = None,
                 target: Optional[str] = None) -> str:
    """Mount the image's layers plus a fresh writable layer for one container; returns the root path.

    ``persist_root`` (when given) names the store the layers live in, so mount options use short
    relative lower paths from the store's layer base (more layers fit in one page of options).
    """
    from ansible_collections.daemonless.oci.plugins.module_utils import overlay  # mount code only when mounting
    base = store_for(persist_root).layers_base() if persist_root else None
    return overlay.mount_rootfs(record, container_dir, base, target)


def merged_settings(playbook_settings: Dict[str, Any], record: ImageRecord) -> Dict[str, Any]:
    """The effective process settings (argv, env, labels, workdir, user, stop signal): playbook wins.

    Only the result goes into the OCI config; the comparison that decides a recreate must use
    ``playbook_settings`` and ``image_identity(record)``, never this result.
    """
    return apply_image_defaults(playbook_settings, image_defaults(record))


def recorded_digest(extras: Dict[str, Any]) -> str:
    """The manifest digest a stored container says it was made from ("" when none).

    Two places are read: ``extras["image"]`` (``IDENTITY_KEY``, written by library callers through
    ``image_identity``) and the container module's own record ``extras["dloci"]["identity"]``
    (``sources.py`` stores ``{"image": ref, "manifest_digest": ...}`` there).
    """
    direct = extras.get(IDENTITY_KEY)
    if isinstance(direct, dict) and direct.get("manifest_digest"):
        return str(direct["manifest_digest"])
    record = extras.get("dloci")
    identity = record.get("identity") if isinstance(record, dict) else None
    if isinstance(identity, dict) and identity.get("manifest_digest"):
        return str(identity["manifest_digest"])
    return ""
