#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: oci_stats
short_description: CPU, memory, pids, network and block I/O figures of containers, read from the kernel
version_added: 0.1.0
description:
  - Reads each container's own cgroup (v1, v2 or hybrid, found from the init process's C(/proc/PID/cgroup))
    and network namespace, with no process started per container.
  - With O(interval) above zero, every container is sampled twice around one sleep, which gives
    the C(cpu.percent) figure of each entry of RV(stats).
  - A stopped container is reported with its status and no figures; a missing one is an error unless
    O(ignore_missing=true).
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
    description: One container name, a list of names, or nothing for every container.
    type: list
    elements: str
  filters:
    description: Keep only the containers that match every given filter.
    type: dict
    suboptions:
      labels:
        description: Labels the container must have with these values.
        type: dict
      runtime:
        description: Runtime handler names to keep.
        type: list
        elements: str
  interval:
    description:
      - Seconds between two samples, for CPU percent. V(0) takes one sample and reports no percent.
    type: float
    default: 0
  ignore_missing:
    description: Leave out named containers that do not exist instead of failing.
    type: bool
    default: false
notes:
  - Host-network containers report C(host_network=true) and no network figures, rather than the host's counters.
  - runsc (gVisor) containers run in a sandbox; figures are those of the sandbox's cgroup, and the C(sandbox)
    field says so.
seealso:
  - module: daemonless.oci.oci_container_info
"""

EXAMPLES = r"""
- name: CPU percent of every container over one second
  daemonless.oci.oci_stats:
    interval: 1
  register: usage

- name: Memory of the web container
  ansible.builtin.debug:
    msg: "{{ usage.stats.web.memory.working_set_bytes | human_readable }}"

- name: Figures for the shop's containers, skipping names that are gone
  daemonless.oci.oci_stats:
    name: [cart, checkout]
    filters:
      labels: {app: shop}
    ignore_missing: true
"""

RETURN = r"""
stats:
  description: Figures per container name.
  returned: always
  type: dict
  contains:
    status:
      description: running, created, paused or stopped (stopped containers carry no figures).
      type: str
    timestamp:
      description: When the (last) sample was taken, RFC 3339 UTC.
      type: str
    cpu:
      description: C(usage_ns), C(user_ns), C(system_ns), C(throttled_periods), C(throttled_ns), C(percent)
        (of one core, over O(interval); null with one sample).
      type: dict
    memory:
      description: C(usage_bytes), C(working_set_bytes) (usage minus inactive file), C(rss_bytes), C(cache_bytes),
        C(limit_bytes) (the cgroup limit, or host memory when unlimited), C(percent), C(oom_events).
      type: dict
    pids:
      description: C(current) and C(limit) (null when unlimited).
      type: dict
    network:
      description: Per interface of the container's own network namespace, C(rx_bytes), C(tx_bytes),
        packets, errors and drops; null for host-network containers.
      type: dict
    block_io:
      description: Per device (C(MAJOR:MINOR)), read and write bytes and operations.
      type: dict
  sample:
    web: {status: running, cpu: {usage_ns: 81234567, percent: 1.5}, memory: {usage_bytes: 1327104}}
names:
  description: The container names reported, sorted.
  returned: always
  type: list
  elements: str
missing:
  description: Names asked for that do not exist (only with O(ignore_missing=true)).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.fields import common_options
from ansible_collections.daemonless.oci.plugins.module_utils.stats_report import gather


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "list", "elements": "str"},
            "filters": {"type": "dict", "options": {
                "labels": {"type": "dict"},
                "runtime": {"type": "list", "elements": "str"},
            }},
            "interval": {"type": "float", "default": 0},
            "ignore_missing": {"type": "bool", "default": False},
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
