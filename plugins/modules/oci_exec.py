#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run a command inside a running container, with a hard timeout and an output cap."""
from __future__ import annotations

DOCUMENTATION = r"""
---
module: oci_exec
short_description: Run a command in a running container
version_added: 0.1.0
description:
  - Runs a command inside a running container managed by this collection and waits for it, like
    C(ansible.builtin.command) does on the host.
  - The command never goes through a host shell. O(command) is split like a shell would split
    it, but no shell runs it; use O(argv) to pass arguments exactly.
  - A hard O(timeout) kills the command and everything it started in the container (what stays
    in its session or process group; a process that called C(setsid) itself is a daemon and is
    left alone) and reports RV(timed_out). A hung command does not hang the play.
  - Without O(stdin) the command runs through conmon's exec mode (runc, crun). The task returns
    when the command's main process exits; output written later by background children is not
    collected. With O(stdin), and always with the runsc handler, the runtime's C(exec) runs
    directly and copies the output until every process holding it is done, so a background
    child (C(sleep 300 &)) keeps the task waiting until it exits or O(timeout) kills it.
  - Fails when the return code is not zero, with RV(rc), RV(stdout) and RV(stderr) in the
    result, so C(failed_when) and C(changed_when) work as with C(ansible.builtin.command).
author:
  - daemonless.oci engineers (@daemonless)
extends_documentation_fragment:
  - daemonless.oci.common
attributes:
  check_mode:
    support: full
    description: Can run in check_mode and return changed status prediction without modifying target.
    details: In check mode the command does not run; the result says what would run.
  diff_mode:
    support: none
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
  platform:
    support: full
    description: Target OS/families that can be operated against.
    platforms: posix
options:
  name:
    description: Name or id of the container. It must be running.
    type: str
    required: true
    aliases: [container]
  argv:
    description:
      - The command as a list of arguments, passed as is.
      - For ad hoc use, the string forms C([cat,/etc/hostname]) and C(cat,/etc/hostname) are read as
        that list (a JSON list string works too).
      - Exactly one of O(argv) and O(command) is required.
    type: raw
  command:
    description:
      - The command as one string, split into arguments with shell quoting rules (no host or
        container shell runs it, so no pipes, redirections or variables). Use
        C(argv=[sh, -c, "..."]) when the container has a shell and you need one.
    type: str
  stdin:
    description: Data to feed to the command's standard input.
    type: str
  stdin_add_newline:
    description: Append a newline to O(stdin).
    type: bool
    default: true
  env:
    description:
      - Environment variables to set for the command, on top of the container's own.
      - Values are passed exactly (newlines and C(=) included).
    type: dict
  user:
    description:
      - User to run as, C(name), C(uid), C(name:group) or C(uid:gid). Names are looked up in the
        container's C(/etc/passwd) and C(/etc/group). Defaults to the container's user.
    type: str
  workdir:
    description: Working directory inside the container (absolute). Defaults to the container's.
    type: str
    aliases: [chdir]
  tty:
    description:
      - Run the command on a terminal; stdout and stderr are then merged into RV(stdout) and lines
        end with CR LF. Not available together with O(stdin).
    type: bool
    default: false
  timeout:
    description:
      - Seconds after which the command and its children are killed; the task then fails with
        RV(timed_out) true and RV(rc) C(-1). C(0) means no limit.
    type: float
    default: 0
  output_limit:
    description:
      - Most bytes of stdout and stderr together to keep; anything beyond is dropped and
        RV(truncated) is true. Protects the managed node's memory from a noisy command.
    type: int
    default: 16777216
  strip_empty_ends:
    description: Strip empty lines from the end of RV(stdout) and RV(stderr).
    type: bool
    default: true
notes:
  - Containers are those created by this collection's modules and library, found through
    O(config_file), O(run_root) and O(persist_root).
seealso:
  - module: ansible.builtin.command
"""

EXAMPLES = r"""
- name: Read a file inside the container
  daemonless.oci.oci_exec:
    name: web
    argv: [cat, /etc/hostname]
  register: hostname

- name: Run a shell pipeline inside the container, killed after 30 s
  daemonless.oci.oci_exec:
    name: web
    argv: [sh, -c, "nginx -t 2>&1 | tail -n 1"]
    timeout: 30

- name: Feed data on stdin and accept exit code 1 as "not changed"
  daemonless.oci.oci_exec:
    name: db
    command: psql -U app -f -
    stdin: "{{ lookup('file', 'schema.sql') }}"
    env:
      PGOPTIONS: "-c statement_timeout=5000"
  register: schema
  failed_when: schema.rc not in [0, 1]
  changed_when: schema.rc == 0

# ad hoc: ansible web1 -m daemonless.oci.oci_exec -a 'name=web argv=[cat,/etc/hostname]'
"""

RETURN = r"""
rc:
  description: Exit code of the command; 128+N when killed by signal N; 126 not executable, 127 not found; -1 on timeout.
  returned: when the command ran
  type: int
  sample: 0
stdout:
  description: Standard output (decoded as UTF-8, invalid bytes replaced).
  returned: when the command ran
  type: str
stderr:
  description: Standard error; on a timeout it ends with C(command timed out).
  returned: when the command ran
  type: str
stdout_lines:
  description: RV(stdout) split into lines.
  returned: when the command ran
  type: list
  elements: str
stderr_lines:
  description: RV(stderr) split into lines.
  returned: when the command ran
  type: list
  elements: str
timed_out:
  description: Whether O(timeout) expired and the command was killed.
  returned: when the command ran
  type: bool
truncated:
  description: Whether output beyond O(output_limit) was dropped.
  returned: when the command ran
  type: bool
duration:
  description: Wall-clock seconds the exec took.
  returned: when the command ran
  type: float
argv:
  description: The command that ran (or would run in check mode), as a list.
  returned: always
  type: list
  elements: str
container:
  description: Id of the container the command ran in.
  returned: when the container exists
  type: str
"""

import json
import shlex
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes, to_text

from ansible_collections.daemonless.oci.plugins.module_utils.fields import common_options


def argument_spec():
    spec = dict(
        name=dict(type="str", required=True, aliases=["container"]),
        argv=dict(type="raw"),
        command=dict(type="str"),
        stdin=dict(type="str"),
        stdin_add_newline=dict(type="bool", default=True),
        env=dict(type="dict"),
        user=dict(type="str"),
        workdir=dict(type="str", aliases=["chdir"]),
        tty=dict(type="bool", default=False),
        timeout=dict(type="float", default=0),
        output_limit=dict(type="int", default=16 * 1024 * 1024),
        strip_empty_ends=dict(type="bool", default=True),
    )
    spec.update(common_options())
    return spec


def argv_list(value):
    """``argv`` as a list of strings; ad hoc ``-a 'argv=[cat,/etc/hostname]'`` arrives as one string."""
    if isinstance(value, (list, tuple)):
        if any(isinstance(part, (dict, list, tuple)) or part is None for part in value):
            raise ValueError("argv must be a list of strings")
        return [to_text(part) for part in value]
    text = to_text(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            decoded = json.loads(text)
        except ValueError:
            decoded = [part.strip().strip("'\"") for part in text[1:-1].split(",")]
        return argv_list(decoded)
    return [part.strip() for part in text.split(",")]


def command_argv(params):
    """argv as given, or ``command`` split with shell quoting rules (never run by a shell)."""
    if params["argv"] is not None:
        return argv_list(params["argv"])
    try:
        return shlex.split(params["command"])
    except ValueError as exc:
        raise ValueError("cannot split command {!r}: {}".format(params["command"], exc))


def exec_options(params):
    """Keyword options for the library's exec, from the module parameters."""
    options = dict(tty=params["tty"], output_limit=params["output_limit"])
    if params["env"]:
        options["env"] = dict((to_text(key), to_text(value)) for key, value in params["env"].items())
    if params["user"]:
        options["user"] = params["user"]
    if params["workdir"]:
        options["workdir"] = params["workdir"]
    if params["stdin"] is not None:
        data = params["stdin"] + ("\n" if params["stdin_add_newline"] else "")
        options["stdin"] = to_bytes(data, errors="surrogate_or_strict")
    return options


def output_text(data, strip_empty_ends):
    text = to_text(data, errors="surrogate_or_replace")
    return text.rstrip("\r\n") if strip_empty_ends else text


def make_manager(params):
    from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager
    overrides = dict((key, params[key]) for key in ("run_root", "persist_root") if params[key])
    return ContainerManager.from_config(params["config_file"], overrides)


def response_result(response, duration, strip_empty_ends):
    stdout = output_text(response.stdout, strip_empty_ends)
    stderr = output_text(response.stderr, strip_empty_ends)
    return dict(rc=response.exit_code, stdout=stdout, stderr=stderr, stdout_lines=stdout.splitlines(),
                stderr_lines=stderr.splitlines(), timed_out=response.timed_out, truncated=response.truncated,
                duration=round(duration, 3))


def failure_message(result, timeout):
    if result["timed_out"]:
        return "command timed out after {0:g} s and was killed".format(timeout)
    return "non-zero return code"


def main():
    module = AnsibleModule(argument_spec=argument_spec(), mutually_exclusive=[("argv", "command")],
                           required_one_of=[("argv", "command")], supports_check_mode=True)
    params = module.params
    try:
        argv = command_argv(params)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    if not argv:
        module.fail_json(msg="the command is empty", argv=argv)
    if params["tty"] and params["stdin"] is not None:
        module.fail_json(msg="tty and stdin cannot be used together", argv=argv)
    if params["timeout"] < 0:
        module.fail_json(msg="timeout must be zero (no limit) or positive", argv=argv)

    from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
    try:
        manager = make_manager(params)
        container = manager.find(params["name"])
    except OciError as exc:
        module.fail_json(msg=str(exc), argv=argv)
    if container is None:
        module.fail_json(msg="no such container: {0}".format(params["name"]), argv=argv)
    if module.check_mode:
        module.exit_json(changed=True, skipped=True, argv=argv, container=container.id,
                         msg="would run {0} in container {1}".format(shlex.join(argv), params["name"]))

    started = time.monotonic()
    try:
        response = manager.exec_sync(container, argv, params["timeout"], **exec_options(params))
    except OciError as exc:
        module.fail_json(msg=str(exc), argv=argv, container=container.id)
    result = response_result(response, time.monotonic() - started, params["strip_empty_ends"])
    result.update(changed=True, argv=argv, container=container.id)
    if result["rc"] != 0:
        module.fail_json(msg=failure_message(result, params["timeout"]), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
