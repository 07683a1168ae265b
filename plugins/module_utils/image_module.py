"""The ``oci_image`` module's logic: present, absent and garbage collection (``oci_image``), info (``oci_image_info``) over the image store.

Kept out of the module file so it can be tested without Ansible. Three decisions shape it:

* Idempotence is by manifest digest: ``present`` reports a change only when a digest the store
  did not have arrives, or when the name moves to another digest. Check mode predicts the digest
  without writing anything: local sources (layouts, archives) are read to their manifest, a
  registry is asked with ``skopeo inspect --raw`` only (no layer is downloaded).
* "Used by a container" means a stored container records the image's manifest digest (see
  ``image_glue.recorded_digest``): names can move, the digest a container was built from cannot.
  Removal of a used image is refused unless ``force``; forced removal drops the names and keeps
  the layers until a gc finds no container using them, so running containers never lose their lowers.
* Garbage collection in check mode lists what would go, computed from the same rules the store applies.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Set

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.image import ImageRecord, ImageStore, resolve_manifest
from ansible_collections.daemonless.oci.plugins.module_utils.image_glue import recorded_digest, store_for
from ansible_collections.daemonless.oci.plugins.module_utils.image_source import (
    open_source,
    parse_source,
    skopeo_remote_digest,
)
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager


def containers_by_digest(params: Dict[str, Any]) -> Dict[str, List[str]]:
    """Manifest digest -> names of the stored containers made from it."""
    manager = ContainerManager.from_config(params.get("config_file"), overrides={
        "run_root": params.get("run_root"), "persist_root": params.get("persist_root")})
    users: Dict[str, List[str]] = {}
    for container in manager.list():
        digest = recorded_digest(container.extras or {})
        if digest:
            users.setdefault(digest, []).append(container.name)
    return users


def _persist_root(params: Dict[str, Any]) -> str:
    """The persist root the container manager would use, so both modules share one store."""
    if params.get("persist_root"):
        return str(params["persist_root"])
    manager = ContainerManager.from_config(params.get("config_file"), overrides={"run_root": params.get("run_root")})
    return manager.paths.persist_root


def predict_digest(source: str, tls_verify: bool = True, authfile: Optional[str] = None) -> str:
    """The manifest digest an import of ``source`` would store, read-only (check mode)."""
    spec = parse_source(source)
    if spec.transport == "docker":
        return skopeo_remote_digest(spec.path, tls_verify, authfile)
    blob_source = open_source(spec, "", tls_verify, authfile)  # local sources never use the work dir
    try:
        descriptor, _data, _manifest = resolve_manifest(blob_source, spec.tag)
    finally:
        blob_source.close()
    return descriptor.digest


def _brief(record: Optional[ImageRecord]) -> Dict[str, Any]:
    """The diff view of an image: its digests and names, or empty when there is none."""
    if record is None:
        return {}
    return {"manifest_digest": record.manifest_digest, "id": record.id, "names": sorted(record.names)}


def present(params: Dict[str, Any], check_mode: bool) -> Dict[str, Any]:
    """Import or pull ``source`` under ``name``; changed only for a new digest or a moved name."""
    source = params["source"]
    name = params.get("name") or str(parse_source(source))
    store = store_for(_persist_root(params))
    before = store.find(name)
    if before is not None and params.get("pull") == "missing":
        return {"changed": False, "image": before.to_info(), "diff": {"before": _brief(before), "after": _brief(before)}}
    if check_mode:
        digest = predict_digest(source, params.get("tls_verify", True), params.get("authfile"))
        stored = store.find(digest)
        changed = stored is None or before is None or before.manifest_digest != digest
        after = {"manifest_digest": digest, "names": sorted(set(stored.names if stored else []) | {name})}
        info = stored.to_info() if stored is not None else {"manifest_digest": digest, "names": [name]}
        return {"changed": changed, "image": info, "diff": {"before": _brief(before), "after": after}}
    record = store.import_image(source, name=name, allow_devices=bool(params.get("allow_devices")),
                                tls_verify=params.get("tls_verify", True), authfile=params.get("authfile"))
    return {"changed": bool(record.changed), "image": record.to_info(),
            "diff": {"before": _brief(before), "after": _brief(record)}}


def absent(params: Dict[str, Any], check_mode: bool) -> Dict[str, Any]:
    """Remove a name (or, given a digest or id, every name of that image); refused while used unless forced."""
    name = params.get("name")
    if not name:
        if params.get("gc"):
            return {"changed": False, "removed": []}  # a garbage collection only
        raise ValidationError("state=absent needs name (an image name, manifest digest or image id) or gc=true")
    store = store_for(_persist_root(params))
    record = store.find(name)
    if record is None:
        return {"changed": False, "removed": [], "diff": {"before": {}, "after": {}}}
    users = containers_by_digest(params).get(record.manifest_digest, [])
    if check_mode:
        if users and not params.get("force"):
            raise ValidationError("image {} ({}) is used by container(s) {}; remove them first or force"
                                  .format(name, record.manifest_digest, ", ".join(sorted(users))))
        removed = [name] if name in record.names else sorted(record.names)
    else:
        removed = store.remove(name, force=bool(params.get("force")), in_use_by=users)
    return {"changed": True, "removed": removed, "used_by": sorted(users),
            "diff": {"before": _brief(record), "after": {}}}


def info(params: Dict[str, Any]) -> Dict[str, Any]:
    """Every image (or the one ``name`` names) with digests, sizes and the containers using it."""
    store = store_for(_persist_root(params))
    users = containers_by_digest(params)
    name = params.get("name")
    if name:
        record = store.find(name)
        records = [record] if record is not None else []
    else:
        records = store.list()
    return {"changed": False, "images": [r.to_info(users.get(r.manifest_digest, [])) for r in records]}


def predict_gc(store: ImageStore, in_use: Set[str]) -> Dict[str, List[str]]:
    """What ``ImageStore.gc(in_use)`` would remove, computed without writing (the store's own rules)."""
    report: Dict[str, List[str]] = {"records": [], "layers": [], "blobs": [], "tmp": []}
    live_layers: Set[str] = set()
    live_blobs: Set[str] = set()
    for record in store.list():
        if not record.names and record.manifest_digest not in in_use:
            report["records"].append(record.manifest_digest)
            continue
        live_blobs.update((record.manifest_digest, record.config_digest))
        live_layers.update(layer.diff_id for layer in record.layers)
    for kind, live, base in (("layers", live_layers, store.layers_base()),
                             ("blobs", live_blobs, os.path.join(store.root, "blobs", "sha256"))):
        for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if "sha256:" + entry not in live:
                report[kind].append("sha256:" + entry)
    return report


def collect(params: Dict[str, Any], check_mode: bool) -> Dict[str, Any]:
    """Garbage collection: unnamed images no container uses, then layers and blobs nothing references."""
    store = store_for(_persist_root(params))
    in_use = set(containers_by_digest(params))
    if check_mode:
        report = predict_gc(store, in_use)
    else:
        done = store.gc(in_use)
        report = {"records": done.records, "layers": done.layers, "blobs": done.blobs, "tmp": done.tmp}
    changed = any(report[key] for key in ("records", "layers", "blobs"))
    return {"changed": changed, "gc": report}


def run(params: Dict[str, Any], check_mode: bool) -> Dict[str, Any]:
    """``oci_image``'s result for one task: the state's action, then the gc when asked (``oci_image_info`` calls ``info``)."""
    state = params.get("state") or "present"
    if state == "absent":
        result = absent(params, check_mode)
    else:
        if not params.get("source"):
            raise ValidationError("state=present needs source")
        result = present(params, check_mode)
    if params.get("gc"):
        collected = collect(params, check_mode)
        result["gc"] = collected["gc"]
        result["changed"] = result["changed"] or collected["changed"]
    return result
