"""The restart-policy unit: deterministic text, idempotent plan, write/remove without systemctl."""
from __future__ import annotations

import os
import sys
import zipfile

from ansible_collections.daemonless.oci.plugins.module_utils import selfinstall, systemd_unit as U


def settings(**changes):
    base = dict(name="web", policy="on-failure", retries=3, python="/usr/bin/python3", library="/var/lib/x/lib",
                run_root="/run/x", persist_root="/var/lib/x", config_file=None, stop_timeout=10.0)
    base.update(changes)
    return U.UnitSettings(**base)


def test_render_is_deterministic_and_carries_the_policy():
    text = U.render(settings())
    assert text == U.render(settings())
    assert "Restart=on-failure" in text and "StartLimitBurst=3" in text
    assert "-m ansible_collections.daemonless.oci.plugins.module_utils.cli run web" in text
    assert "Restart=always" in U.render(settings(policy="unless-stopped", retries=None))
    assert "StartLimitBurst" not in U.render(settings(retries=None))


def test_plan_write_noop_remove(tmp_path):
    directory = str(tmp_path)
    text = U.render(settings())
    first = U.plan_unit(directory, "web", text)
    assert first.action == "write" and first.before == "" and not first.manage_systemd
    assert U.apply(first, enable=True) == []
    assert U.plan_unit(directory, "web", text).action == ""
    changed = U.plan_unit(directory, "web", U.render(settings(policy="always")))
    assert changed.action == "write" and changed.before == text
    gone = U.plan_unit(directory, "web", None)
    assert gone.action == "remove"
    U.apply(gone, enable=False)
    assert not os.path.exists(gone.path)
    assert U.plan_unit(directory, "web", None).action == ""


def test_selfinstall_copies_loaded_sources_once(tmp_path):
    sources = selfinstall.collect_sources()
    assert "systemd_unit.py" in sources and "selfinstall.py" in sources
    root = str(tmp_path)
    assert selfinstall.needs_install(root, sources)
    selfinstall.install(root, sources)
    assert not selfinstall.needs_install(root, sources)
    target = selfinstall.target_dir(root)
    with open(os.path.join(target, "systemd_unit.py"), "rb") as handle:
        assert handle.read() == sources["systemd_unit.py"]
    changed = dict(sources, **{"systemd_unit.py": b"# changed\n"})
    assert selfinstall.needs_install(root, changed)


def test_selfinstall_reads_sources_from_a_zip_import(tmp_path):
    """AnsiballZ runs modules from a zip: the loader's get_source must be what is copied."""
    archive = tmp_path / "payload.zip"
    package = "zz_probe_pkg/module_utils/"
    with zipfile.ZipFile(str(archive), "w") as handle:
        handle.writestr("zz_probe_pkg/__init__.py", "")
        handle.writestr(package + "__init__.py", "")
        handle.writestr(package + "probe_mod.py", "VALUE = 42\n")
    sys.path.insert(0, str(archive))
    try:
        import importlib
        module = importlib.import_module("zz_probe_pkg.module_utils.probe_mod")
        assert module.VALUE == 42
        assert ".zip" in module.__loader__.archive
        assert selfinstall._module_source(module.__name__, module) == b"VALUE = 42\n"
    finally:
        sys.path.remove(str(archive))
        for name in [n for n in sys.modules if n.startswith("zz_probe_pkg")]:
            del sys.modules[name]
