"""``oci_container``'s run: read, decide, act. Every side effect of the module happens in ``Executor``.

``converge`` reads (our stored state, the source directory, the rootfs's passwd file, the unit
file), normalises, builds the spec, asks ``planner.plan`` what to do, and hands the plan to the
``Executor``. In check mode the executor does nothing at all, so a check run reports exactly the
actions and diff a real run would perform, and changes nothing on disk or in the process table.

The no-op run (nothing changed, container running) is: load the manager's configuration (file
reads and PATH lookups), read ``container.json`` and ``state.json``, verify the init pid and its
start time in ``/proc``, compare dictionaries. No subprocess.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils import fields as F
from ansible_collections.daemonless.oci.plugins.module_utils import planner, sources
from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError, ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.facts import RECORD_KEY, container_facts, record
from ansible_collections.daemonless.oci.plugins.module_utils.ids import validate_name
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import digest
from ansible_collections.daemonless.oci.plugins.module_utils.state import atomic_write, make_private_dir

LOG_TAIL_LINES = 20
# Options that shape the spec; a bundle's config.json is used as given, so they cannot apply to it.
_SPEC_SHAPING = [name for name in F.names(F.OCI_CONFIG)
                 if name not in F.SOURCE_FIELDS + ("runtime", "annotations", "log_path", "log_max_size",
                                                   "cgroup_parent")]


class WaitForError(OciError):
    """The readiness command never succeeded; carries what the module returns with the failure."""

    def __init__(self, message: str, details: Dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


@dataclass
class Request:
    """Everything decided before acting."""

    name: str
    state: str
    values: Dict[str, Any] = field(default_factory=dict)
    source: Optional[sources.Source] = None
    built: Any = None                     # spec_builder.BuiltSpec, only when a create is planned
    force_kill: bool = False
    wait_for: Optional[Dict[str, Any]] = None
    oneshot_timeout: float = 600.0
    unit: Any = None                      # systemd_unit.UnitPlan when the unit must change
    library: Dict[str, bytes] = field(default_factory=dict)

    def record(self) -> Dict[str, Any]:
        """What is stored with the container and compared on the next run."""
        if self.source is None or self.built is None:
            raise OciError("internal error: the container's record asked for before its spec was built")
        return {"values": self.values, "identity": self.source.identity, "source": self.source.to_json(),
                "spec_digest": digest(self.built.spec)}


def files_dir(manager: ContainerManager, name: str) -> str:
    return os.path.join(manager.paths.persist_root, "files", validate_name(name))


def make_manager(params: Dict[str, Any]) -> ContainerManager:
    overrides: Dict[str, Any] = {"run_root": params.get("run_root"), "persist_root": params.get("persist_root")}
    log_size = F.parse_size(params.get("log_max_size"), "log_max_size")
    if log_size:
        overrides["log_size_max"] = log_size
    return ContainerManager.from_config(params.get("config_file"), overrides=overrides)


def converge(params: Dict[str, Any], check_mode: bool) -> Dict[str, Any]:
    """The module's whole run; returns the result dictionary (raises OciError on failure)."""
    name = validate_name(params["name"])
    manager = make_manager(params)
    container = manager.find(name)
    if container is not None:
        # check mode must not even record a status change it notices: read-only refresh there
        (manager.inspect if check_mode else manager.refresh)(container)
    observed = _observed(container)
    request = Request(name=name, state=params["state"], force_kill=bool(params.get("force_kill")),
                      wait_for=params.get("wait_for"), oneshot_timeout=params.get("oneshot_timeout") or 600.0)
    warnings: List[str] = []
    if request.state == "absent":
        desired = planner.Desired("absent", {}, {})
    else:
        desired = _desired(params, manager, request)
    plan = planner.plan(desired, observed)
    if any(item.action in ("create", "recreate") for item in plan.actions):
        _build(params, manager, request)
    _plan_unit(params, manager, request, plan, warnings)
    result_container = Executor(manager, check_mode).run(plan, request, container)
    return {"changed": plan.changed, "actions": [item.to_json() for item in plan.actions],
            "diff": {"before": plan.before, "after": plan.after},
            "container": _facts(result_container, request, plan, check_mode),
            "warnings": warnings}


def _observed(container: Optional[Container]) -> planner.Observed:
    if container is None:
        return planner.Observed()
    stored = record(container)
    return planner.Observed(True, container.state.status, dict(stored.get("values") or {}),
                            dict(stored.get("identity") or {}), container.state.exit_code)


def _desired(params: Dict[str, Any], manager: ContainerManager, request: Request) -> planner.Desired:
    """Normalise, validate against the configuration, resolve the source: no side effect, no process."""
    values = F.normalise(params)
    values["runtime"] = values["runtime"] or manager.runtime.config.default_runtime
    manager.runtime.validate_runtime_handler(values["runtime"])
    manager.runtime.check_annotations(values["runtime"], values["annotations"])
    kind = next(key for key in F.SOURCE_FIELDS if params.get(key))
    source = sources.resolve(kind, values[kind], request.name, manager.paths, values["read_only"])
    if kind == "bundle":
        _refuse_spec_options(params)
    request.values, request.source = values, source
    return planner.Desired(request.state, values, source.identity, recreate=bool(params.get("recreate")),
                           restart=bool(params.get("restart")), wait_for=bool(params.get("wait_for")),
                           oneshot=bool(params.get("oneshot")), can_update=_can_update(manager, values["runtime"]))


# Runtimes whose CLI has no ``update`` subcommand (gVisor's runsc): a resource change must recreate.
NO_UPDATE_RUNTIMES = ("runsc",)


def _can_update(manager: ContainerManager, handler: str) -> bool:
    """Whether the handler's runtime can change resources of a live container (by its binary's name)."""
    runtime = manager.runtime.config.runtimes.get(handler)
    return runtime is None or os.path.basename(runtime.runtime_path) not in NO_UPDATE_RUNTIMES


def _build(params: Dict[str, Any], manager: ContainerManager, request: Request) -> None:
    """The OCI spec, built (and so validated: users, devices, seccomp file) only when a create is planned.

    A run that changes nothing compares stored values and never needs the spec, nor the import of
    the code that builds it (compiled afresh from the AnsiballZ zip on every run).
    """
    from ansible_collections.daemonless.oci.plugins.module_utils import spec_builder
    source, values = request.source, request.values
    if source.kind == "bundle":
        request.built = spec_builder.apply_to_bundle(source.bundle_spec or {}, values)
        return
    spec_values = _with_image_defaults(values, params, source) if source.kind == "image" else values
    request.built = spec_builder.build(spec_values, source.root, files_dir(manager, request.name), source.lookup_root)


def _with_image_defaults(values: Dict[str, Any], params: Dict[str, Any], source: sources.Source) -> Dict[str, Any]:
    """What the spec is built from: the playbook's values, with the image's config filling what is unset.

    Only the playbook's own values are stored and compared (plus the manifest digest), so an
    image default never shows up as a change the playbook made.
    """
    from ansible_collections.daemonless.oci.plugins.module_utils.image import apply_image_defaults
    settings = {"entrypoint": values["entrypoint"], "command": values["command"], "env": values["env"],
                "workdir": params.get("workdir"), "user": values["user"]}
    effective = apply_image_defaults(settings, source.image_defaults)
    return dict(values, entrypoint=effective["argv"], command=[], env=effective["env"],
                workdir=F.norm_abs_path(effective["workdir"], "workdir") or "/", user=effective["user"] or None)


def _refuse_spec_options(params: Dict[str, Any]) -> None:
    given = [name for name in _SPEC_SHAPING
             if params.get(name) not in (None, [], {}) and params.get(name) != F.BY_NAME[name].spec.get("default")]
    if given:
        raise ValidationError("bundle is used as given: its config.json decides {}; remove them or use rootfs".format(
            ", ".join(given)))


def _plan_unit(params: Dict[str, Any], manager: ContainerManager, request: Request, plan: planner.Plan,
               warnings: List[str]) -> None:
    """Add the systemd unit (and the library it runs) to the plan when they differ from what is on disk.

    The unit code is imported here, not at the top: a container without a restart policy (and the
    no-op run) should not pay for compiling it out of the AnsiballZ zip.
    """
    from ansible_collections.daemonless.oci.plugins.module_utils import selfinstall, systemd_unit
    policy = request.values.get("restart_policy", "no") if request.state != "absent" else "no"
    unit_dir = params.get("systemd_unit_dir")
    text = None
    if policy != "no":
        if unit_dir is None and not systemd_unit.systemd_running():
            warnings.append("restart_policy {} is stored with the container but nothing enforces it: this host does "
                            "not run systemd (set systemd_unit_dir to write the unit anyway)".format(policy))
            return
        settings = systemd_unit.UnitSettings(
            request.name, policy, request.values.get("restart_retries"), _python(),
            selfinstall.library_root(manager.paths.persist_root), manager.paths.run_root,
            manager.paths.persist_root, params.get("config_file"), request.values.get("stop_timeout", 10.0))
        text = systemd_unit.render(settings)
        request.library = selfinstall.collect_sources()
        if selfinstall.needs_install(manager.paths.persist_root, request.library):
            plan.add("install_library", "the boot unit runs module_utils from {}, which is missing or older".format(
                selfinstall.library_root(manager.paths.persist_root)))
        else:
            request.library = {}
    unit = systemd_unit.plan_unit(unit_dir, request.name, text)
    if unit.action:
        request.unit = unit
        reason = "restart_policy is {}: the unit {} is missing or differs".format(policy, unit.path) \
            if unit.action == "write" else "no restart policy: the unit {} is no longer wanted".format(unit.path)
        plan.add("unit", reason)
        plan.before["systemd_unit"], plan.after["systemd_unit"] = unit.before, unit.after


def _python() -> str:
    import sys
    return sys.executable or "/usr/bin/python3"


def _facts(container: Optional[Container], request: Request, plan: planner.Plan, check_mode: bool) -> Dict[str, Any]:
    if container is not None and not (check_mode and "recreate" in plan.names()):
        facts = container_facts(container)
        if check_mode and plan.final_status:
            facts["state"] = plan.final_status
        if check_mode and request.state == "absent":
            facts["state"] = "absent"
        return facts
    if request.state == "absent" or request.built is None:
        return {"name": request.name, "state": "absent"}
    return {"name": request.name, "id": None, "state": plan.final_status or "created",
            "spec_digest": digest(request.built.spec), "labels": request.values.get("labels", {}),
            "annotations": request.values.get("annotations", {}), "runtime_handler": request.values.get("runtime"),
            "source": request.source.to_json() if request.source else {},
            "resources": _resources(request.values)}


def _resources(values: Dict[str, Any]) -> Dict[str, Any]:
    from ansible_collections.daemonless.oci.plugins.module_utils import spec_builder
    return spec_builder.resources(values)


def _need(container: Optional[Container]) -> Container:
    """The plan only orders actions on a container that exists; anything else is a bug worth a clear message."""
    if container is None:
        raise OciError("internal error: an action was planned on a container that does not exist")
    return container


class Executor:
    """Performs a plan. Inert in check mode: nothing below ``run`` is reached."""

    def __init__(self, manager: ContainerManager, check_mode: bool) -> None:
        self.manager = manager
        self.check_mode = check_mode

    def run(self, plan: planner.Plan, request: Request, container: Optional[Container]) -> Optional[Container]:
        if self.check_mode:
            return container
        steps = {"create": self.create, "recreate": self.recreate, "remove": self.remove, "start": self.start,
                 "stop": self.stop, "restart": self.restart, "pause": self.pause, "unpause": self.unpause,
                 "update": self.update, "metadata": self.metadata, "wait_for": self.wait_for, "wait_exit": self.wait_exit,
                 "unit": self.unit, "install_library": self.install_library}
        for action in plan.actions:
            container = steps[action.action](request, container)
        if container is not None and request.state != "absent":
            self.manager.refresh(container)
        return container

    # lifecycle
    def create(self, request: Request, _container: Optional[Container]) -> Container:
        if request.source is None or request.built is None:
            raise OciError("internal error: create planned without a built spec")
        values, source = request.values, request.source
        if source.layered:
            sources.release_layer(source.layer)  # a new container starts from a clean layer
            sources.mount_layer(source.lowers, source.layer, source.lower_base)
        directory = files_dir(self.manager, request.name)
        try:
            self._write_files(directory, request.built.files)
            return self.manager.create(CreateRequest(
                name=request.name, spec=request.built.spec, handler=values["runtime"], labels=values["labels"],
                annotations=values["annotations"], log_path=values.get("log_path") or "",
                stop_signal=values.get("stop_signal"), stop_timeout=values["stop_timeout"],
                cgroup_parent=request.built.cgroup_parent, extras={RECORD_KEY: request.record()}))
        except BaseException as failure:
            try:
                sources.release_layer(source.layer)
            except (OSError, OciError) as cleanup:
                raise OciError("{} (and removing the writable layer failed too: {})".format(failure, cleanup)) \
                    from failure
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            raise

    def _write_files(self, directory: str, files: Dict[str, str]) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        if files:
            make_private_dir(directory)
            os.chmod(directory, 0o755)
        for destination, content in files.items():
            atomic_write(os.path.join(directory, os.path.basename(destination)), content.encode("utf-8"), mode=0o644)

    def remove(self, request: Request, container: Optional[Container]) -> None:
        from ansible_collections.daemonless.oci.plugins.module_utils import cli
        container = _need(container)
        cli.mark_stop_requested(container.dir, True)
        self.manager.remove(container, timeout=self._stop_timeout(request))
        sources.release_layer((record(container).get("source") or {}).get("layer") or {})
        shutil.rmtree(files_dir(self.manager, container.name), ignore_errors=True)
        return None

    def recreate(self, request: Request, container: Optional[Container]) -> Container:
        self.remove(request, container)
        return self.create(request, None)

    def start(self, _request: Request, container: Optional[Container]) -> Container:
        from ansible_collections.daemonless.oci.plugins.module_utils import cli, systemd_unit
        container = _need(container)
        sources.ensure_root(record(container).get("source") or {})
        cli.mark_stop_requested(container.dir, False)
        self.manager.start(container)
        systemd_unit.attach_supervision(container.name)
        return container

    def stop(self, request: Request, container: Optional[Container]) -> Container:
        from ansible_collections.daemonless.oci.plugins.module_utils import cli
        container = _need(container)
        cli.mark_stop_requested(container.dir, True)  # a supervising unit must not restart it
        self.manager.stop(container, timeout=self._stop_timeout(request))
        return container

    def restart(self, request: Request, container: Optional[Container]) -> Container:
        return self.start(request, self.stop(request, container))

    def pause(self, _request: Request, container: Optional[Container]) -> Container:
        container = _need(container)
        self.manager.pause(container)
        return container

    def unpause(self, _request: Request, container: Optional[Container]) -> Container:
        container = _need(container)
        self.manager.unpause(container)
        return container

    def _stop_timeout(self, request: Request) -> Optional[float]:
        if request.force_kill:
            return 0.0
        return request.values.get("stop_timeout") if request.values else None

    # in-place changes
    def update(self, request: Request, container: Optional[Container]) -> Container:
        container = _need(container)
        before = record(container).get("values") or {}
        from ansible_collections.daemonless.oci.plugins.module_utils import spec_builder
        self.manager.update_resources(container, spec_builder.update_payload(before, request.values))
        self._store_values(request, container)
        return container

    def metadata(self, request: Request, container: Optional[Container]) -> Container:
        container = _need(container)
        values = request.values
        self.manager.update_metadata(container, labels=values["labels"], stop_signal=values.get("stop_signal") or "",
                                     stop_timeout=values["stop_timeout"])
        self._store_values(request, container)
        return container

    def _store_values(self, request: Request, container: Container) -> None:
        stored = dict(record(container))
        stored["values"] = dict(request.values)
        self.manager.update_metadata(container, extras={RECORD_KEY: stored})

    # readiness, unit, library
    def wait_for(self, request: Request, container: Optional[Container]) -> Container:
        container = _need(container)
        spec = request.wait_for or {}
        last: Dict[str, Any] = {}
        for attempt in range(1, spec["retries"] + 1):
            self.manager.refresh(container)
            if container.state.status != planner.RUNNING:
                last = {"exit_code": None, "error": "the container is {} (exit code {})".format(
                    container.state.status, container.state.exit_code)}
                break
            try:
                response = self.manager.exec_sync(container, list(spec["command"]), spec["timeout"])
            except ImportError as exc:
                raise OciError("wait_for needs exec support (plugins/module_utils/exec_sync.py), which this "
                               "installation lacks: {}".format(exc)) from exc
            last = {"exit_code": response.exit_code, "timed_out": response.timed_out,
                    "stdout": response.stdout.decode("utf-8", "replace")[-2000:],
                    "stderr": response.stderr.decode("utf-8", "replace")[-2000:], "attempts": attempt}
            if response.exit_code == 0 and not response.timed_out:
                return container
            time.sleep(spec["interval"])
        from ansible_collections.daemonless.oci.plugins.module_utils import logs
        log_tail = logs.tail_text(container.log_path, LOG_TAIL_LINES)
        raise WaitForError("wait_for {} did not succeed: {}; last lines of the log:\n{}".format(
            spec["command"], last.get("error") or "exit code {}".format(last.get("exit_code")), log_tail),
            dict(last, log_tail=log_tail.splitlines()))

    def wait_exit(self, request: Request, container: Optional[Container]) -> Container:
        """A oneshot job: wait (pidfd) for its init process to exit; a non-zero exit code fails the task."""
        container = _need(container)
        try:
            finished = container.state.init_process().wait_gone(request.oneshot_timeout)
        except OciError:
            finished = True
        if not finished:
            raise OciError("oneshot job {} still runs after {:.0f} s (oneshot_timeout); it was left running".format(
                container.name, request.oneshot_timeout))
        self.manager.refresh(container)
        code = container.state.exit_code
        if code != 0:
            from ansible_collections.daemonless.oci.plugins.module_utils import logs
            log_tail = logs.tail_text(container.log_path, LOG_TAIL_LINES)
            raise WaitForError("oneshot job {} exited with {}; last lines of the log:\n{}".format(
                container.name, code, log_tail), {"exit_code": code, "log_tail": log_tail.splitlines()})
        return container

    def unit(self, request: Request, container: Optional[Container]) -> Optional[Container]:
        from ansible_collections.daemonless.oci.plugins.module_utils import systemd_unit
        if request.unit is not None:
            systemd_unit.apply(request.unit, enable=True)
        return container

    def install_library(self, _request: Request, container: Optional[Container]) -> Optional[Container]:
        from ansible_collections.daemonless.oci.plugins.module_utils import selfinstall
        selfinstall.install(self.manager.paths.persist_root, _request.library)
        return container
