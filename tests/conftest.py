"""Make the checkout importable as ``ansible_collections.daemonless.oci`` for plain pytest runs."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))

from testkit import collection_on_path  # noqa: E402

COLLECTIONS_TREE = collection_on_path()
