"""Put our module_utils on the managed node's disk, so the boot unit can run ``cli.py`` without Ansible.

A module runs from an AnsiballZ zip that is deleted when it returns; the systemd unit needs the
library later, at boot. So every module_utils file the payload carries (AnsiballZ packs each one
the module imports, lazily imported ones included) is copied to
``<persist_root>/lib/ansible_collections/daemonless/oci/plugins/module_utils/``, read from the
package's directory inside the zip (or in a checkout), or through a module's loader
(``get_source``/``get_data``) for any other kind of import. A manifest with the content hash makes the no-change case
one small file read; in check mode ``plan`` only reports what would be written.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import posixpath
import sys
import zipfile
from typing import Dict, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.state import atomic_write, make_private_dir

PACKAGE = "ansible_collections.daemonless.oci.plugins.module_utils"
MANIFEST = ".daemonless-oci-manifest.json"
_PACKAGE_DIRS = ("ansible_collections", "ansible_collections/daemonless", "ansible_collections/daemonless/oci",
                 "ansible_collections/daemonless/oci/plugins",
                 "ansible_collections/daemonless/oci/plugins/module_utils")


def library_root(persist_root: str) -> str:
    """The directory to put on PYTHONPATH."""
    return os.path.join(persist_root, "lib")


def target_dir(persist_root: str) -> str:
    return os.path.join(library_root(persist_root), *PACKAGE.split("."))


def _bundle_entry_points() -> None:  # pragma: no cover - never called
    """Never runs: names the files no module imports, so Ansible's AnsiballZ packs them too.

    AnsiballZ ships only the module_utils a module's code imports (it reads every import
    statement, also inside functions). ``cli.py`` is the entry point of the restart units and is
    imported by nobody, so without this it would be missing from the copy the units run.
    """
    from ansible_collections.daemonless.oci.plugins.module_utils import cli  # noqa: F401  pylint: disable=unused-import


def collect_sources() -> Dict[str, bytes]:
    """file name -> source bytes of every module_utils file of ours that this process can see.

    The package directory is listed (a directory in a checkout, a folder inside the AnsiballZ zip
    on a managed node), so modules the unit needs but this run did not import (the runtime
    implementation is imported lazily) are copied too. Modules loaded through some other
    loader are added through that loader.
    """
    sources: Dict[str, bytes] = {}
    package = importlib.import_module(PACKAGE)
    for entry in list(getattr(package, "__path__", [])):
        sources.update(_list_entry(entry))
    prefix = PACKAGE + "."
    for name, module in sorted(sys.modules.items()):
        short = name[len(prefix):]
        if not name.startswith(prefix) or module is None or "." in short or short + ".py" in sources:
            continue
        data = _module_source(name, module)
        if data is not None:
            sources[short + ".py"] = data
    return sources


def _list_entry(entry: str) -> Dict[str, bytes]:
    """The .py files of one package path entry: a directory, or a directory inside a zip archive."""
    found: Dict[str, bytes] = {}
    if os.path.isdir(entry):
        for name in sorted(os.listdir(entry)):
            if name.endswith(".py"):
                with open(os.path.join(entry, name), "rb") as handle:
                    found[name] = handle.read()
        return found
    marker = entry.find(".zip" + os.sep)
    if marker < 0:
        return found
    archive, inner = entry[:marker + 4], entry[marker + 5:].strip("/")
    with zipfile.ZipFile(archive) as handle:
        for member in handle.namelist():
            if posixpath.dirname(member) == inner and member.endswith(".py"):
                found[posixpath.basename(member)] = handle.read(member)
    return found


def _module_source(name: str, module: object) -> Optional[bytes]:
    loader = getattr(module, "__loader__", None)
    if loader is not None and hasattr(loader, "get_source"):
        try:
            text = loader.get_source(name)
        except (ImportError, OSError):
            text = None
        if text is not None:
            return text.encode("utf-8")
    path = getattr(module, "__file__", None)
    if path and loader is not None and hasattr(loader, "get_data"):
        try:
            return loader.get_data(path)
        except OSError:
            return None
    return None


def content_hash(sources: Dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return digest.hexdigest()


def needs_install(persist_root: str, sources: Dict[str, bytes]) -> bool:
    """True when the copy on disk is missing or differs (one manifest read)."""
    try:
        with open(os.path.join(target_dir(persist_root), MANIFEST), "r", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return True
    return manifest.get("sha256") != content_hash(sources) or not all(
        os.path.exists(os.path.join(target_dir(persist_root), name)) for name in sources)


def install(persist_root: str, sources: Dict[str, bytes]) -> None:
    """Write every source file, package markers, then the manifest (last, so a crash re-installs)."""
    root = library_root(persist_root)
    for relative in _PACKAGE_DIRS:
        make_private_dir(os.path.join(root, relative))
    target = target_dir(persist_root)
    for name, data in sources.items():
        atomic_write(os.path.join(target, name), data, mode=0o644)
    manifest = {"sha256": content_hash(sources), "files": sorted(sources)}
    atomic_write(os.path.join(target, MANIFEST), json.dumps(manifest, sort_keys=True).encode(), mode=0o644)
