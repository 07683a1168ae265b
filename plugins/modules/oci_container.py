#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: oci_container
short_description: Declare an OCI container run by conmon and runc, crun or runsc, with no daemon
version_added: 0.1.0
description:
  - Creates, starts, stops, pauses, updates and removes one container so that it matches the task.
  - Every option has one class. Options that go into the OCI configuration recreate the container when they
    change; resource limits (O(memory), O(memory_swap), O(memory_reservation), O(cpus), O(cpu_shares),
    O(cpu_quota), O(cpu_period), O(cpuset_cpus), O(cpuset_mems), O(pids_limit)) are changed in place by the
    runtime, never by a recreate (except on a runtime that has no update command, such as runsc, where the
    action's reason says so); O(labels), O(stop_signal), O(stop_timeout), O(restart_policy) and
    O(restart_retries) are stored and nothing is restarted.
  - The normalised options are stored when the container is created and compared with the task on every run,
    never with another program's output. A rootfs is identified by its path, a bundle by its path and the
    sha256 of its C(config.json).
  - When nothing changed, the run reads the stored state and checks one pid and its start time; it starts no
    process.
author:
  - daemonless.oci engineers (@daemonless)
extends_documentation_fragment:
  - daemonless.oci.common
attributes:
  check_mode:
    support: full
    description: Every side effect goes through one executor that does nothing in check mode; the actions and
      diff reported are exactly those of a real run.
  diff_mode:
    support: full
    description: The diff holds before and after values of exactly the options that decided the actions, plus
      C(exists), C(status), C(restarted) and C(systemd_unit) where those changed.
  idempotent:
    support: full
    description: A second run with the same options reports no change and performs no action.
options:
  name:
    description:
      - Name of the container. Letters, digits, C(_), C(.) and C(-); it must start with a letter or a digit.
    type: str
    required: true
  systemd_unit_dir:
    description:
      - Write the restart-policy unit into this directory instead of C(/etc/systemd/system), and do not call
        C(systemctl). Meant for tests and for hosts where another tool installs units.
    type: path
  state:
    description:
      - V(present) (alias V(created)) makes sure the container exists; a new one is created but not started,
        an existing one keeps its status (a running container that must be recreated is started again).
      - V(started) makes it run, V(stopped) makes it not run, V(paused) freezes it.
      - V(absent) stops it (stop signal, then SIGKILL after O(stop_timeout)) and removes it with its writable
        layer.
    type: str
    default: started
    choices: [present, created, started, stopped, paused, absent]
  recreate:
    description: Remove and create the container even if nothing changed.
    type: bool
    default: false
  restart:
    description: With O(state=started), stop and start a running container even if nothing changed.
    type: bool
    default: false
  force_kill:
    description: Stop with SIGKILL at once instead of the stop signal and O(stop_timeout).
    type: bool
    default: false
  oneshot:
    description:
      - The container is a job that runs to completion. With O(state=started), a new or changed job is started
        and the module waits for it to exit (up to O(oneshot_timeout)); an exit code other than 0 fails the task
        with the log tail. A job that already exited with 0 counts as done and is not run again; one that
        exited with another code is run again.
    type: bool
    default: false
  oneshot_timeout:
    description: Seconds to wait for a O(oneshot) job to finish; after that the task fails and the job keeps running.
    type: float
    default: 600.0
  wait_for:
    description:
      - A readiness check run in the container (exec) after it was started by this task. The module fails with
        the last exit code and the log tail when the command never succeeds.
      - Not run when nothing was started, so a no-op run stays free of processes.
    type: dict
    suboptions:
      command:
        description: The command and its arguments.
        type: list
        elements: str
        required: true
      interval:
        description: Seconds between attempts.
        type: float
        default: 1.0
      retries:
        description: Number of attempts.
        type: int
        default: 30
      timeout:
        description: Seconds one attempt may run before it is killed.
        type: float
        default: 5.0
  rootfs:
    description:
      - A root filesystem directory. It is never written to; each container gets its own writable overlay layer
        (kept across restarts, dropped on recreate and removal). With O(read_only=true) no layer is used.
      - Exactly one of O(rootfs), O(bundle) and O(image) is required unless O(state=absent).
    type: path
  bundle:
    description:
      - An OCI bundle directory with C(config.json), used as given. Options that shape the OCI configuration
        (process, mounts, network, security) cannot be combined with it; resource limits, labels, annotations,
        stop settings and the restart policy can.
    type: path
  image:
    description:
      - An image already in the image store under O(persist_root) (C(images/)), by name, manifest digest or
        image id. Its layers are shared read-only; each container gets its own writable layer.
      - Its identity is its manifest digest, so a name that now points at another image recreates the container.
      - The image's configuration fills what the task leaves unset (entrypoint and command, environment,
        working directory, user); only the task's own options are stored and compared.
      - Importing images is not this module's job; an image missing from the store fails before anything is changed.
    type: str
  command:
    description:
      - The command to run, after O(entrypoint). A list is used as is; a string is split like a shell would
        split it, but no shell runs it.
      - Required (or O(entrypoint)) with O(rootfs); with O(image), the image's command is the default.
    type: raw
  entrypoint:
    description: The start of the command line (list, or a string split like O(command)).
    type: raw
  env:
    description: Environment variables. Values must be strings (quote V(yes), V(1) and the like in YAML).
    type: dict
    default: {}
  user:
    description:
      - C(uid[:gid]) or C(name[:group]); names are looked up in the root filesystem's C(/etc/passwd) and
        C(/etc/group), not the host's.
    type: str
  groups:
    description: Supplementary groups (names from the root filesystem or numbers).
    type: list
    elements: str
    default: []
  workdir:
    description: Working directory of the process (absolute). Defaults to C(/).
    type: str
  hostname:
    description: Host name inside the container's UTS namespace.
    type: str
  tty:
    description: Give the process a terminal (conmon keeps its output in the log).
    type: bool
    default: false
  mounts:
    description: Bind and tmpfs mounts. Paths are normalised before they are stored and compared.
    type: list
    elements: dict
    default: []
    suboptions:
      type:
        description: Mount type.
        type: str
        choices: [bind, tmpfs]
        default: bind
      source:
        description: Host path for a bind mount.
        type: str
      destination:
        description: Path inside the container.
        type: str
        required: true
        aliases: [target]
      options:
        description: Extra mount options (for example V(size=64m) or V(mode=1777) for tmpfs, V(noexec)).
        type: list
        elements: str
        default: []
      read_only:
        description: Mount read-only.
        type: bool
        default: false
      propagation:
        description: Propagation of a bind mount (default V(rprivate)).
        type: str
        choices: [private, rprivate, shared, rshared, slave, rslave]
  network:
    description:
      - V(none) (a private network namespace with loopback only), V(host) (the host's network), or the path
        of an existing network namespace to join (for example C(/var/run/netns/blue)). Port publishing needs a
        network plugin and is not offered.
    type: str
    default: none
  dns_servers:
    description: Name servers written into the container's C(/etc/resolv.conf) (bind-mounted read-only).
    type: list
    elements: str
    default: []
  dns_search:
    description: Search domains for C(/etc/resolv.conf).
    type: list
    elements: str
    default: []
  dns_options:
    description: Resolver options for C(/etc/resolv.conf).
    type: list
    elements: str
    default: []
  etc_hosts:
    description: Host name to address entries written into the container's C(/etc/hosts) (bind-mounted read-only).
    type: dict
    default: {}
  memory:
    description: Memory limit, in bytes or with a suffix (V(512M), V(1g)). Updated in place.
    type: raw
  memory_swap:
    description: Memory plus swap limit (V(-1) for unlimited). Updated in place.
    type: raw
  memory_reservation:
    description: Memory soft limit. Updated in place.
    type: raw
  cpus:
    description: Number of CPUs (a fraction is allowed), turned into a CFS quota over O(cpu_period). Updated in place.
    type: float
  cpu_shares:
    description: Relative CPU weight. Updated in place.
    type: int
  cpu_quota:
    description: CFS quota in microseconds per period (mutually exclusive with O(cpus)). Updated in place.
    type: int
  cpu_period:
    description: CFS period in microseconds (default 100000 when O(cpus) is set). Updated in place.
    type: int
  cpuset_cpus:
    description: CPUs the container may use (V(0-1,3)). Updated in place.
    type: str
  cpuset_mems:
    description: Memory nodes the container may use. Updated in place.
    type: str
  pids_limit:
    description: Maximum number of processes (V(-1) for unlimited). Updated in place.
    type: int
  devices:
    description: Host devices to create in the container and allow in its device cgroup.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The device on the host.
        type: str
        required: true
      container_path:
        description: Where it appears in the container (defaults to O(devices[].path)).
        type: str
      permissions:
        description: Any of V(r), V(w), V(m).
        type: str
        default: rwm
  ulimits:
    description: Resource limits (rlimits) of the process.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Limit name, with or without C(RLIMIT_) (V(nofile), V(nproc)).
        type: str
        required: true
      soft:
        description: Soft limit.
        type: int
        required: true
      hard:
        description: Hard limit (defaults to the soft limit).
        type: int
  oom_score_adj:
    description: OOM score adjustment of the process.
    type: int
  shm_size:
    description: Size of C(/dev/shm) (V(64M)).
    type: raw
  cgroup_parent:
    description: Parent cgroup of the container (defaults to the configuration's C(cgroup_parent)).
    type: str
  capabilities:
    description: Capabilities to add to the default set (V(NET_ADMIN) or V(CAP_NET_ADMIN), or V(ALL)).
    type: list
    elements: str
    default: []
  cap_drop:
    description: Capabilities to remove from the set (V(ALL) removes every one).
    type: list
    elements: str
    default: []
  privileged:
    description: Every capability, no masked or read-only paths, no seccomp filter, every device allowed.
    type: bool
    default: false
  read_only:
    description: Mount the root filesystem read-only (no writable layer is made for a O(rootfs)).
    type: bool
    default: false
  no_new_privileges:
    description: Set the no_new_privs bit, so set-user-ID programs cannot gain privileges.
    type: bool
    default: true
  seccomp_profile:
    description:
      - V(default) is this collection's own deny list (the kernel's module, kexec, clock, swap, keyring, bpf
        and mount calls fail with EPERM; everything else is allowed); V(unconfined) sets no filter; any other
        value is the path of an OCI seccomp profile (JSON), whose content is read when the task runs.
    type: str
    default: default
  apparmor_profile:
    description: AppArmor profile to run the process under.
    type: str
  selinux_label:
    description: SELinux label of the process.
    type: str
  sysctls:
    description: Namespaced kernel parameters (values are strings).
    type: dict
    default: {}
  namespaces:
    description: V(private) (default) or V(host) for each of C(pid), C(ipc) and C(uts).
    type: dict
    default: {}
  labels:
    description: Labels kept with the container (for O(daemonless.oci.oci_container_info#module:filters)); stored, nothing restarted.
    type: dict
    default: {}
  annotations:
    description: OCI annotations; ones that change runtime behaviour must be allowed by the handler's C(allowed_annotations).
    type: dict
    default: {}
  runtime:
    description: Runtime handler from the configuration (for example V(runc), V(crun), V(runsc)); defaults to its C(default_runtime).
    type: str
  stop_signal:
    description: Signal that asks the process to stop (name such as V(SIGQUIT) or V(QUIT), or a number). Stored, nothing restarted.
    type: raw
  stop_timeout:
    description: Seconds to wait after the stop signal before SIGKILL (default 10). Stored, nothing restarted.
    type: float
  log_path:
    description: Where conmon writes the container's log (CRI format). Defaults to a file in the container's state directory.
    type: path
  log_max_size:
    description: Rotate (truncate) the log beyond this size (at least 8k); the default is the configuration's C(log_size_max).
    type: raw
  restart_policy:
    description:
      - V(no), V(on-failure), V(always) or V(unless-stopped). Without a daemon, a systemd unit per container
        enforces it and starts the container at boot; the module writes it idempotently (check and diff mode)
        and copies its own library under O(persist_root) for the unit to run.
      - On a host without systemd no unit is written (unless O(systemd_unit_dir) is set), the policy is only
        stored and the module warns.
      - Not set means V(no).
    type: str
    choices: ["no", "on-failure", "always", "unless-stopped"]
  restart_retries:
    description: With a restart policy, how many restarts systemd allows within its interval (C(StartLimitBurst)).
    type: int
notes:
  - Requires root, conmon and at least one OCI runtime on the managed node.
  - Port publishing and CNI networks are not supported; use O(network=host) or join a prepared network namespace.
  - A recreate drops the writable layer of a O(rootfs) container, like removing it does.
  - There is no list form taking many containers in one call. A single call with no change costs a few
    milliseconds of Python on the node, so the task overhead of Ansible itself dominates, and one result per
    container keeps C(changed), the diff and failures readable. Use a loop.
seealso:
  - module: daemonless.oci.oci_container_info
"""

EXAMPLES = r"""
- name: A web server on the host network
  daemonless.oci.oci_container:
    name: web
    rootfs: /srv/rootfs/busybox
    command: [httpd, -f, -p, "127.0.0.1:8080", -h, /var/www]
    network: host
    memory: 64M
    pids_limit: 64
    wait_for:
      command: [wget, -q, -O, /dev/null, "http://127.0.0.1:8080/"]
      retries: 20
      interval: 0.5

- name: Raise its memory limit in place (same process, no restart)
  daemonless.oci.oci_container:
    name: web
    rootfs: /srv/rootfs/busybox
    command: [httpd, -f, -p, "127.0.0.1:8080", -h, /var/www]
    network: host
    memory: 128M
    pids_limit: 64

- name: A one-shot job; runs once to completion (a second run reports no change)
  daemonless.oci.oci_container:
    name: job
    rootfs: /srv/rootfs/busybox
    command: [sh, -c, "echo done"]
    read_only: true
    oneshot: true

- name: Remove it
  daemonless.oci.oci_container:
    name: job
    state: absent
"""

RETURN = r"""
actions:
  description: What was done (or, in check mode, would be done), in order, each with its reason. Empty when nothing changed.
  returned: always
  type: list
  elements: dict
  sample: [{action: update, reason: "resources changed, applied in place: memory"}]
  contains:
    action:
      description: One of create, recreate, remove, start, stop, restart, pause, unpause, update, metadata, wait_for,
        wait_exit, unit, install_library.
      type: str
    reason:
      description: Why.
      type: str
diff:
  description: Before and after values of exactly the options that decided the actions (normalised), plus the
    pseudo-keys C(exists), C(status), C(restarted), C(source) and C(systemd_unit) where they changed.
  returned: always
  type: dict
  sample: {before: {memory: 67108864}, after: {memory: 134217728}}
container:
  description: The container's facts after the run (in check mode, its current facts with the predicted state).
  returned: always
  type: dict
  contains:
    id:
      description: Container id (null when it does not exist yet).
      type: str
    name:
      description: Container name.
      type: str
    state:
      description: created, running, paused, stopped or absent.
      type: str
    pid:
      description: Init pid while running or paused.
      type: int
    pid_start_time:
      description: Start time of the init pid (clock ticks since boot), which makes the pid unambiguous.
      type: str
    exit_code:
      description: Exit code once stopped.
      type: int
    oom_killed:
      description: Whether the kernel's OOM killer ended it.
      type: bool
    error:
      description: The last error recorded for it.
      type: str
    created_at:
      description: Creation time (RFC 3339).
      type: str
    started_at:
      description: Start time.
      type: str
    finished_at:
      description: Exit time.
      type: str
    attempt:
      description: How many times the runtime's container was re-created from the stored spec (restarts after exit or reboot).
      type: int
    runtime_handler:
      description: The handler it runs with.
      type: str
    runtime_type:
      description: The handler's type (oci or vm).
      type: str
    source:
      description: The source (kind, path, identity, writable layer directories).
      type: dict
    spec_digest:
      description: sha256 of the canonical JSON of its OCI spec.
      type: str
    bundle_path:
      description: The bundle directory given to the runtime.
      type: str
    log_path:
      description: The CRI log file.
      type: str
    labels:
      description: Labels.
      type: dict
    annotations:
      description: Annotations.
      type: dict
    resources:
      description: The OCI C(linux.resources) now in force (devices left out).
      type: dict
    stop_signal:
      description: Stop signal number.
      type: int
    stop_timeout:
      description: Stop timeout in seconds.
      type: float
    restart_policy:
      description: The stored restart policy.
      type: str
  sample: {id: 1f0c..., name: web, state: running, pid: 4242, pid_start_time: "1234567", exit_code: null}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.executor import WaitForError, converge
from ansible_collections.daemonless.oci.plugins.module_utils.fields import argument_spec, constraints


def build_module() -> AnsibleModule:
    """The module object; its argument_spec and rules come from the field registry."""
    return AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True, **constraints())


def main() -> None:
    module = build_module()
    try:
        result = converge(module.params, module.check_mode)
    except WaitForError as exc:
        module.fail_json(msg=str(exc), **exc.details)
    except OciError as exc:
        module.fail_json(msg=str(exc))
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
