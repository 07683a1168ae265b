#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: oci_image
short_description: Import, pull and remove images in the daemonless image store, and collect unused layers
version_added: 0.1.0
description:
  - Manages the image store under O(persist_root) (C(images/)) that M(daemonless.oci.oci_container) uses
    for its O(daemonless.oci.oci_container#module:image) source. No daemon is involved.
  - O(state=present) imports an OCI image layout, an C(oci-archive) or C(docker-archive) tar, or pulls a
    C(docker://) reference through skopeo. Every blob is verified against its digest, a manifest list is
    resolved for this host's platform, and each layer is unpacked once, keyed by its digest.
  - Idempotent by manifest digest, a run reports a change only when a digest the store did not have
    arrives or when O(name) moves to another digest.
  - O(state=absent) removes a name, or every name of an image given by digest. It is refused while a stored
    container was made from the image, unless O(force=true).
  - O(gc=true) removes what nothing references any more, after the state's action; O(state=absent) with
    O(gc=true) and no O(name) only collects garbage.
  - M(daemonless.oci.oci_image_info) lists the images with their digests, sizes and the containers using each.
author:
  - daemonless.oci engineers (@daemonless)
extends_documentation_fragment:
  - daemonless.oci.common
attributes:
  check_mode:
    support: full
    description:
      - Nothing is written. For local sources the manifest digest is read from the source; for C(docker://)
        sources only C(skopeo inspect --raw) is run, no layer is downloaded.
  diff_mode:
    support: full
    description: The image's manifest digest and names before and after.
  idempotent:
    support: full
    description: A second run with an unchanged source changes nothing.
options:
  state:
    description:
      - V(present) imports or pulls O(source); V(absent) removes O(name).
    type: str
    choices: [present, absent]
    default: present
  name:
    description:
      - The name the image is stored under (any string, for example C(busybox:latest)).
      - With O(state=present), defaults to O(source).
      - With O(state=absent), a name removes only that name; a manifest digest or image id (C(sha256:...))
        removes every name of the image. Required with O(state=absent) unless O(gc=true).
    type: str
  source:
    description:
      - Where the image comes from, for O(state=present).
      - C(oci:/PATH[:TAG]) an OCI image layout directory; C(oci-archive:/FILE[:TAG]) a tar of one;
        C(docker-archive:/FILE[:REPO:TAG]) a C(docker save) tar; C(docker://REFERENCE) a registry (needs skopeo).
      - Paths must be absolute.
    type: str
  pull:
    description:
      - V(always) reads the source on every run (cheap when nothing changed, nothing is written).
      - V(missing) leaves an image already stored under O(name) alone without reading the source.
    type: str
    choices: [always, missing]
    default: always
  force:
    description:
      - With O(state=absent), remove the names even while containers use the image. The layers stay until a
        garbage collection finds no container using them, so those containers keep working.
    type: bool
    default: false
  gc:
    description:
      - After the state's action, remove images that have no name and no container, then layers and
        blobs no image references, then abandoned work directories.
    type: bool
    default: false
  allow_devices:
    description:
      - Accept layers holding device nodes. Only images for privileged containers need this; without it such
        a layer is refused.
    type: bool
    default: false
  tls_verify:
    description: Verify the registry's TLS certificate (C(docker://) sources only).
    type: bool
    default: true
  authfile:
    description: A registry credentials file in the containers-auth.json format (C(docker://) sources only).
    type: path
notes:
  - Layers are unpacked by an extractor that refuses absolute paths, C(..), links that leave the layer, device
    nodes (unless O(allow_devices=true)) and oversized archives; a refused layer leaves nothing in the store.
  - A container uses an image when its stored record carries the image's manifest digest, whatever the
    image's names are now.
requirements:
  - skopeo, for C(docker://) sources only.
seealso:
  - module: daemonless.oci.oci_container
  - module: daemonless.oci.oci_image_info
"""

EXAMPLES = r"""
- name: Import an OCI layout built by a CI job
  daemonless.oci.oci_image:
    name: app:1.4
    source: oci:/srv/images/app:1.4

- name: Pull from a registry (skopeo must be installed)
  daemonless.oci.oci_image:
    name: busybox:stable
    source: docker://registry.example/library/busybox:stable

- name: Run a container from it
  daemonless.oci.oci_container:
    name: web
    image: app:1.4

- name: Collect garbage only (unnamed images no container uses, then unreferenced layers)
  daemonless.oci.oci_image:
    state: absent
    gc: true

- name: Drop an old name and collect layers nothing references
  daemonless.oci.oci_image:
    name: app:1.3
    state: absent
    gc: true
"""

RETURN = r"""
image:
  description: The image after the run (O(state=present)); in check mode, the predicted manifest digest and names.
  returned: when state is present
  type: dict
  contains:
    names:
      description: Every name of the image in the store.
      type: list
      elements: str
    id:
      description: The image id (config digest), as Docker and podman show it.
      type: str
    manifest_digest:
      description: The digest of the image manifest; a container's identity.
      type: str
    config_digest:
      description: The digest of the image configuration.
      type: str
    platform:
      description: C(os/architecture[/variant]).
      type: str
    size:
      description: Bytes of the layer blobs as distributed.
      type: int
    unpacked_size:
      description: Bytes of regular files in the unpacked layers.
      type: int
    layers:
      description: The layers' diff ids, bottom first.
      type: list
      elements: str
  sample:
    names: [app:1.4]
    manifest_digest: sha256:3b1a0c2f9e5d4c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b
    size: 1187328
removed:
  description: The names removed (O(state=absent)).
  returned: when state is absent
  type: list
  elements: str
used_by:
  description: Containers made from the removed image (non-empty only with O(force=true)).
  returned: when state is absent and the image existed
  type: list
  elements: str
gc:
  description: What the garbage collection removed (in check mode, would remove).
  returned: when gc is true
  type: dict
  contains:
    records:
      description: Manifest digests of images dropped (no name, no container).
      type: list
      elements: str
    layers:
      description: Diff ids of layers deleted.
      type: list
      elements: str
    blobs:
      description: Digests of manifests and configs deleted.
      type: list
      elements: str
    tmp:
      description: Abandoned work directories deleted.
      type: list
      elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.fields import common_options
from ansible_collections.daemonless.oci.plugins.module_utils.image_module import run


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "name": {"type": "str"},
            "source": {"type": "str"},
            "pull": {"type": "str", "choices": ["always", "missing"], "default": "always"},
            "force": {"type": "bool", "default": False},
            "gc": {"type": "bool", "default": False},
            "allow_devices": {"type": "bool", "default": False},
            "tls_verify": {"type": "bool", "default": True},
            "authfile": {"type": "path"},
            **common_options(),
        },
        required_if=[("state", "present", ["source"]), ("state", "absent", ["name", "gc"], True)],
        supports_check_mode=True,
    )
    try:
        result = run(module.params, module.check_mode)
    except OciError as exc:
        module.fail_json(msg=str(exc))
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
