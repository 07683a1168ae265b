"""Restart policy without a daemon: one systemd unit per container.

Nothing of ours runs between playbook runs, so nothing could restart a container that exits or
start it after a reboot. A unit does: ``ExecStart`` runs ``cli.py run NAME``, which starts the
container from its stored state (remounting its layer and recreating the runtime's container
after a reboot) and then waits for it to exit, exiting with its exit code; ``Restart=`` carries
the policy and ``StartLimitBurst=`` the retries. SIGTERM from ``systemctl stop`` makes it stop
the container with the container's own stop signal and timeout. A stop the playbook asks for
(``state: stopped``/``absent``) leaves a marker, so ``run`` then exits with a status the unit
never restarts on; a start by the module clears it and (when systemd runs) starts the unit again
so supervision resumes.

The unit text is a pure function of the container's settings, so deciding whether to write it
is a string comparison (check and diff mode for free). ``systemctl`` is only called when the
file changed, and only when systemd runs the host (``/run/systemd/system`` exists).

Hosts without systemd: no unit is written (unless ``systemd_unit_dir`` names a directory, which
is then written for another supervisor or a later boot), the policy is stored with the
container and reported, and the module warns that nothing enforces it.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils import cli
from ansible_collections.daemonless.oci.plugins.module_utils.ids import validate_name
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command
from ansible_collections.daemonless.oci.plugins.module_utils.state import atomic_write

SYSTEM_UNIT_DIR = "/etc/systemd/system"
SYSTEMD_RUNNING_MARKER = "/run/systemd/system"
# Imported (not only named) so that AnsiballZ packs cli.py and selfinstall copies it for the unit.
CLI_MODULE = cli.__name__
_RESTART = {"on-failure": "on-failure", "always": "always", "unless-stopped": "always"}


@dataclass
class UnitSettings:
    name: str
    policy: str
    retries: Optional[int]
    python: str
    library: str
    run_root: str
    persist_root: str
    config_file: Optional[str]
    stop_timeout: float


@dataclass
class UnitPlan:
    path: str
    action: str            # "" | "write" | "remove"
    before: str
    after: str
    manage_systemd: bool   # call systemctl after writing


def unit_name(name: str) -> str:
    return "daemonless-oci-{}.service".format(validate_name(name))


def systemd_running() -> bool:
    return os.path.isdir(SYSTEMD_RUNNING_MARKER)


def render(settings: UnitSettings) -> str:
    """The unit file's text (deterministic: equal settings give equal bytes)."""
    argv = [settings.python, "-m", CLI_MODULE, "run", settings.name, "--run-root", settings.run_root,
            "--persist-root", settings.persist_root]
    if settings.config_file:
        argv += ["--config", settings.config_file]
    lines = ["# Written by daemonless.oci.oci_container; changes are overwritten.",
             "[Unit]", "Description=daemonless.oci container {}".format(settings.name),
             "After=local-fs.target network-online.target", "Wants=network-online.target"]
    if settings.retries:
        lines += ["StartLimitIntervalSec={}".format(max(60, 10 * settings.retries)),
                  "StartLimitBurst={}".format(settings.retries)]
    lines += ["", "[Service]", "Type=simple", "Environment=PYTHONPATH={}".format(settings.library),
              "ExecStart={}".format(" ".join(shlex.quote(part) for part in argv)),
              "Restart={}".format(_RESTART.get(settings.policy, "no")), "RestartSec=1",
              "SuccessExitStatus={}".format(cli.STOPPED_ON_REQUEST_STATUS),
              "RestartPreventExitStatus={}".format(cli.STOPPED_ON_REQUEST_STATUS),
              "KillMode=mixed", "TimeoutStopSec={}".format(int(settings.stop_timeout) + 30),
              "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def plan_unit(unit_dir: Optional[str], name: str, text: Optional[str]) -> UnitPlan:
    """Compare the wanted unit (``None``: no unit) with the file on disk: one read, no process."""
    manage = unit_dir is None
    directory = unit_dir or SYSTEM_UNIT_DIR
    path = os.path.join(directory, unit_name(name))
    if manage and text is not None and not systemd_running():
        return UnitPlan(path, "", "", "", False)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            before = handle.read()
    except FileNotFoundError:
        before = ""
    manage = manage and systemd_running()
    if text is None:
        return UnitPlan(path, "remove" if before else "", before, "", manage)
    return UnitPlan(path, "write" if before != text else "", before, text, manage)


def attach_supervision(name: str) -> None:
    """After a start by the module, let systemd supervise it again (``cli run`` adopts a running container)."""
    path = os.path.join(SYSTEM_UNIT_DIR, unit_name(name))
    if systemd_running() and os.path.exists(path):
        run_command(["systemctl", "start", "--no-block", unit_name(name)], timeout=60.0, check=True)


def apply(unit: UnitPlan, enable: bool) -> List[str]:
    """Write or remove the unit; tell systemd when it runs the host. Returns the commands run."""
    commands: List[List[str]] = []
    unit_file = os.path.basename(unit.path)
    if unit.action == "write":
        os.makedirs(os.path.dirname(unit.path), exist_ok=True)
        atomic_write(unit.path, unit.after.encode("utf-8"), mode=0o644)
        if unit.manage_systemd:
            commands = [["systemctl", "daemon-reload"], ["systemctl", "enable" if enable else "disable", unit_file]]
    elif unit.action == "remove":
        if unit.manage_systemd:
            commands.append(["systemctl", "disable", unit_file])
        os.unlink(unit.path)
        if unit.manage_systemd:
            commands.append(["systemctl", "daemon-reload"])
    for argv in commands:
        run_command(argv, timeout=60.0, check=True)
    return [" ".join(argv) for argv in commands]
