#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: oci_container_info
short_description: Facts about containers managed by daemonless.oci, with their log tails
version_added: 0.1.0
description:
  - Returns the facts of one container, several, or all of them, optionally filtered by labels, state and
    runtime handler, and optionally the last lines of each container's log.
  - Read-only. A running container whose init process is verified in C(/proc) costs no process; the runtime is
    asked only about containers whose recorded process is gone.
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
    description: Reading twice gives the same answer when nothing else changed the containers.
options:
  name:
    description:
      - One container name, a list of names, or nothing for every container.
    type: list
    elements: str
  filters:
    description: Keep only the containers that match every given filter.
    type: dict
    suboptions:
      labels:
        description: Labels the container must have with these values.
        type: dict
      state:
        description: Statuses to keep.
        type: list
        elements: str
        choices: [created, running, paused, stopped]
      runtime:
        description: Runtime handler names to keep.
        type: list
        elements: str
  logs:
    description: Return the last O(logs_tail) lines of each container's log.
    type: bool
    default: false
  logs_tail:
    description: How many log lines to return per container.
    type: int
    default: 50
seealso:
  - module: daemonless.oci.oci_container
"""

EXAMPLES = r"""
- name: Is the web container there, and what is its pid?
  daemonless.oci.oci_container_info:
    name: web
  register: web

- name: Every running container labelled app=shop, with the last 20 log lines
  daemonless.oci.oci_container_info:
    filters:
      labels: {app: shop}
      state: [running]
    logs: true
    logs_tail: 20
"""

RETURN = r"""
exists:
  description: Whether every container named in O(name) exists (with no O(name), whether any container matched).
  returned: always
  type: bool
missing:
  description: Names asked for that do not exist.
  returned: always
  type: list
  elements: str
containers:
  description:
    - Facts of each matching container, in name order; the same keys as the C(container) result of
      M(daemonless.oci.oci_container).
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Container id.
      type: str
    name:
      description: Container name.
      type: str
    state:
      description: created, running, paused or stopped.
      type: str
    pid:
      description: Init pid while running or paused.
      type: int
    exit_code:
      description: Exit code once stopped.
      type: int
    logs:
      description: With O(logs=true), the last lines, each with C(time), C(stream) and C(text).
      type: list
      elements: dict
  sample: [{id: 1f0c..., name: web, state: running, pid: 4242, labels: {app: shop}}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.fields import common_options
from ansible_collections.daemonless.oci.plugins.module_utils.info import gather


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "list", "elements": "str"},
            "filters": {"type": "dict", "options": {
                "labels": {"type": "dict"},
                "state": {"type": "list", "elements": "str", "choices": ["created", "running", "paused", "stopped"]},
                "runtime": {"type": "list", "elements": "str"},
            }},
            "logs": {"type": "bool", "default": False},
            "logs_tail": {"type": "int", "default": 50},
            **common_options(),
        },
        supports_check_mode=True,
    )
    try:
        result = gather(module.params)
    except OciError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
