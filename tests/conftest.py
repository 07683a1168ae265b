"""Make the checkout importable as ``ansible_collections.daemonless.oci`` for plain pytest runs.

ansible-test lays the collection out itself; for ``pytest tests/...`` a symlink tree under
/tmp (or $DLOCI_COLLS) is created once and put on sys.path.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collection_tree() -> str:
    parts = REPO.split(os.sep)
    if parts[-3:-1] == ["ansible_collections", "daemonless"] or parts[-3:] == ["ansible_collections", "daemonless", "oci"]:
        return os.sep.join(parts[:-3])
    tree = os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls")
    link = os.path.join(tree, "ansible_collections", "daemonless", "oci")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.realpath(link) != REPO:
        if os.path.islink(link):
            os.unlink(link)
        os.symlink(REPO, link)
    return tree


COLLECTIONS_TREE = _collection_tree()
if COLLECTIONS_TREE not in sys.path:
    sys.path.insert(0, COLLECTIONS_TREE)
os.environ.setdefault("ANSIBLE_COLLECTIONS_PATH", COLLECTIONS_TREE)
