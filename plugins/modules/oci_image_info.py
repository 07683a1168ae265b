#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: oci_image_info
short_description: List the images of the daemonless image store, with digests, sizes and the containers using each
version_added: 0.1.0
description:
  - Reads the image store under O(persist_root) (C(images/)) and the stored containers; changes nothing.
  - A container uses an image when its stored record carries the image's manifest digest, whatever names the image
    has now (an image whose names were removed with O(daemonless.oci.oci_image#module:force=true) still lists
    its containers, with no names).
author:
  - daemonless.oci engineers (@daemonless)
extends_documentation_fragment:
  - daemonless.oci.common
attributes:
  check_mode:
    support: full
    description: The module only reads; it behaves the same in check mode.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
  idempotent:
    support: full
    description: Nothing is ever changed.
options:
  name:
    description:
      - Only this image (a name, manifest digest or image id). An unknown image gives an empty list.
      - Every image when not given.
    type: str
seealso:
  - module: daemonless.oci.oci_image
"""

EXAMPLES = r"""
- name: Every image
  daemonless.oci.oci_image_info:
  register: store

- name: Images no container uses
  ansible.builtin.debug:
    msg: "{{ store.images | selectattr('containers', 'equalto', []) | map(attribute='names') | list }}"

- name: One image's digest
  daemonless.oci.oci_image_info:
    name: app:1.4
  register: app
"""

RETURN = r"""
images:
  description: The images, oldest import first.
  returned: always
  type: list
  elements: dict
  contains:
    names:
      description: Every name of the image in the store (empty for an image kept only for its containers).
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
    created:
      description: The image's creation time, from its configuration.
      type: str
    imported_at:
      description: When it was imported (seconds since the epoch).
      type: float
    source:
      description: The source it was imported from.
      type: str
    has_devices:
      description: Whether a layer holds device nodes (usable by privileged containers only).
      type: bool
    layers:
      description: The layers' diff ids, bottom first.
      type: list
      elements: str
    containers:
      description: Names of the stored containers made from this image, sorted.
      type: list
      elements: str
  sample:
    - names: [app:1.4]
      manifest_digest: sha256:3b1a0c2f9e5d4c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b
      size: 1187328
      containers: [web]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.fields import common_options
from ansible_collections.daemonless.oci.plugins.module_utils.image_module import info


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str"},
            **common_options(),
        },
        supports_check_mode=True,
    )
    try:
        result = info(module.params)
    except OciError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
