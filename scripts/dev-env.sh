#!/usr/bin/env bash
# Makes the collection importable as ansible_collections.daemonless.oci from this checkout, without copying:
# a symlink tree under /tmp/dloci-colls. Print the PYTHONPATH to use.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tree=${DLOCI_COLLS:-/tmp/dloci-colls}
mkdir -p "$tree/ansible_collections/daemonless"
ln -sfn "$repo" "$tree/ansible_collections/daemonless/oci"
echo "$tree"
