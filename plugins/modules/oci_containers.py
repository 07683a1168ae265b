#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: oci_containers
short_description: Declare many containers in one task (the list form of oci_container)
version_added: 0.1.0
description:
  - Takes a list of containers, each with exactly the options of M(daemonless.oci.oci_container), and
    converges them one after the other in a single module run.
  - Ansible's own cost per task (about 0.4 s of interpreter start, imports and argument handling) is paid once
    for the whole list instead of once per container, so a play that declares many containers is several times
    faster than a loop over M(daemonless.oci.oci_container).
  - Every item is validated and planned (as in check mode) before anything is done, so a bad item fails the task
    with nothing changed.
author:
  - daemonless.oci engineers (@daemonless)
extends_documentation_fragment:
  - daemonless.oci.common
attributes:
  check_mode:
    support: full
    description: Each container is planned exactly as in M(daemonless.oci.oci_container)'s check mode.
  diff_mode:
    support: full
    description: Returns the before/after of the deciding fields of every container that would change.
  idempotent:
    support: full
    description: A second run with the same list changes nothing and starts no process.
options:
  containers:
    description:
      - The containers, each a dictionary of M(daemonless.oci.oci_container) options (C(name) is required).
      - O(config_file), O(run_root) and O(persist_root) given at the top apply to every item that does not set them.
    type: list
    elements: dict
    required: true
  defaults:
    description: Options applied to every item that does not set them itself (for example C(rootfs) or C(runtime)).
    type: dict
    default: {}
notes:
  - Items are converged in list order; the first failure stops the task, and the result says which item failed
    and what was already done.
seealso:
  - module: daemonless.oci.oci_container
"""

EXAMPLES = r"""
- name: Three workers from one root filesystem, in one task
  daemonless.oci.oci_containers:
    defaults:
      rootfs: /srv/rootfs/busybox
      command: [sleep, infinity]
      memory: 32M
    containers:
      - name: worker-0
      - name: worker-1
      - name: worker-2
        memory: 64M

- name: Remove them again
  daemonless.oci.oci_containers:
    defaults:
      state: absent
    containers: [{name: worker-0}, {name: worker-1}, {name: worker-2}]
"""

RETURN = r"""
results:
  description: The result of each item, in list order, as M(daemonless.oci.oci_container) returns it.
  returned: always
  type: list
  elements: dict
  sample: [{changed: true, actions: [{action: create, reason: container does not exist}], container: {name: worker-0}}]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.executor import WaitForError, converge
from ansible_collections.daemonless.oci.plugins.module_utils.fields import argument_spec, common_options, constraints

SHARED = tuple(common_options())


def validated_items(module: AnsibleModule) -> list:
    """Every item with the defaults merged in, validated like oci_container's own parameters."""
    validator = ArgumentSpecValidator(argument_spec(), **constraints())
    items = []
    for index, item in enumerate(module.params["containers"]):
        params = dict(module.params["defaults"])
        params.update(item)
        for key in SHARED:
            if params.get(key) is None:
                params[key] = module.params[key]
        outcome = validator.validate(params)
        if outcome.error_messages:
            module.fail_json(msg="containers[{}] ({}): {}".format(
                index, item.get("name", "no name"), "; ".join(outcome.error_messages)))
        items.append(outcome.validated_parameters)
    return items


def converge_all(module: AnsibleModule, items: list, check_mode: bool) -> list:
    """Converge each item in order; the first failure fails the task, saying what was already done."""
    results = []
    for index, params in enumerate(items):
        try:
            result = converge(params, check_mode)
        except (WaitForError, OciError) as exc:
            details = exc.details if isinstance(exc, WaitForError) else {}
            module.fail_json(msg="containers[{}] ({}): {}".format(index, params["name"], exc),
                             changed=any(done["changed"] for done in results) and not check_mode,
                             results=results, **details)
        results.append(result)
    return results


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "containers": {"type": "list", "elements": "dict", "required": True},
            "defaults": {"type": "dict", "default": {}},
            **common_options(),
        },
        supports_check_mode=True,
    )
    items = validated_items(module)
    # A dry run of every item first: a bad name, size or image in item N fails before item 1 is touched.
    results = converge_all(module, items, check_mode=True)
    if not module.check_mode and any(result["changed"] for result in results):
        results = converge_all(module, items, check_mode=False)
    for params, result in zip(items, results):
        for warning in result.pop("warnings"):
            module.warn("{}: {}".format(params["name"], warning))
    diffs = [result["diff"] for result in results if result.get("changed") and result.get("diff")]
    module.exit_json(changed=any(result["changed"] for result in results), results=results, diff=diffs)


if __name__ == "__main__":
    main()
