"""A small command line for the boot unit: ``python3 -m ...module_utils.cli start|stop|status|run NAME``.

``run`` is what the systemd unit executes: start the container from its stored state (remount its
writable layer, recreate the runtime's container after a reboot), then wait for its init process
to exit and exit with its exit code, so ``Restart=on-failure`` sees a failure. SIGTERM (``systemctl
stop``) stops the container with its own stop signal and timeout, and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
from typing import Any, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError
from ansible_collections.daemonless.oci.plugins.module_utils.facts import container_facts, record
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager
from ansible_collections.daemonless.oci.plugins.module_utils import sources
from ansible_collections.daemonless.oci.plugins.module_utils.state import atomic_write

# ``run`` exits with this when the container was stopped on purpose (a playbook's state stopped or
# absent, or ``cli stop``): the unit treats it as success and never restarts on it, whatever Restart= says.
STOPPED_ON_REQUEST_STATUS = 64
STOP_REQUEST_FILE = "stop-requested"


def stop_request_path(container_dir: str) -> str:
    """The marker a deliberate stop leaves in the container's directory."""
    return os.path.join(container_dir, STOP_REQUEST_FILE)


def mark_stop_requested(container_dir: str, requested: bool) -> None:
    """Record (or clear) that the next exit of the container is wanted, so the unit does not restart it."""
    path = stop_request_path(container_dir)
    if requested:
        atomic_write(path, b"", mode=0o600)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _manager(args: argparse.Namespace, log_size_max: Optional[int] = None) -> ContainerManager:
    overrides: dict = {"run_root": args.run_root, "persist_root": args.persist_root}
    if log_size_max:
        overrides["log_size_max"] = log_size_max
    return ContainerManager.from_config(args.config, overrides=overrides)


def start(manager: ContainerManager, name: str) -> Any:
    """Start from stored state; the writable layer is remounted first when a reboot took it."""
    container = manager.get(name)
    sources.ensure_root(record(container).get("source") or {})
    mark_stop_requested(container.dir, False)
    manager.start(container)
    return container


def wait_exit(manager: ContainerManager, container: Any) -> int:
    """Block until the init process exits (pidfd: it is not our child), then report its exit code."""
    try:
        pidfd = os.pidfd_open(container.state.init_pid)
    except (ProcessLookupError, OSError):
        pidfd = -1
    if pidfd >= 0:
        try:
            if container.is_alive():
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                while not poller.poll(None):
                    pass
        finally:
            os.close(pidfd)
    container = manager.find(container.name)
    if container is None or os.path.exists(stop_request_path(container.dir)):
        return STOPPED_ON_REQUEST_STATUS
    manager.refresh(container)
    code = container.state.exit_code
    return 0 if code is None else int(code)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="daemonless-oci", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "run"])
    parser.add_argument("name")
    parser.add_argument("--run-root", default="/run/daemonless-oci")
    parser.add_argument("--persist-root", default="/var/lib/daemonless-oci")
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    try:
        manager = _manager(args)
        container = manager.get(args.name)
        log_size = (record(container).get("values") or {}).get("log_max_size")
        if log_size:
            manager = _manager(args, log_size)
        if args.command == "status":
            manager.refresh(container)
            sys.stdout.write(json.dumps(container_facts(container), sort_keys=True) + "\n")
            return 0
        if args.command == "stop":
            mark_stop_requested(container.dir, True)
            manager.stop(container)
            return 0
        container = start(manager, args.name)
        if args.command == "start":
            return 0
        signal.signal(signal.SIGTERM, lambda *_: _stop_and_exit(manager, args.name))
        return wait_exit(manager, container)
    except OciError as exc:
        sys.stderr.write("daemonless-oci {} {}: {}\n".format(args.command, args.name, exc))
        return 1


def _stop_and_exit(manager: ContainerManager, name: str) -> None:
    """SIGTERM from systemctl stop: stop the container with its own signal and timeout, then exit."""
    try:
        manager.stop(manager.get(name))
    finally:
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
