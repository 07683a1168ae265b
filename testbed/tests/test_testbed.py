"""Tests of the testbed scripts' own logic (no VM boots here; molecule vm-* does that).

Run: python3 -m pytest testbed/tests (as root for nothing; plain user is fine).
The scripts have no .py suffix, so they are loaded with SourceFileLoader.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path

import pytest

TESTBED = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTBED))

import tblib  # noqa: E402


def load_script(name: str):
    loader = SourceFileLoader(name.replace("-", "_"), str(TESTBED / name))
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


build_image = load_script("build-image")
vm = load_script("vm")
run_matrix = load_script("run-matrix")


# --- build-image -------------------------------------------------------------------------------

@pytest.mark.parametrize("distro", ["bookworm", "trixie", "sid"])
def test_shipped_recipes_load_and_name_known_steps(distro):
    recipe = build_image.load_recipe(distro, None)
    assert recipe["distro"] == distro
    assert "openssh-server" in recipe["packages"] and "linux-image-amd64" in recipe["packages"]
    # The collection's roles install these in the VM: the image must not have them already.
    assert not {"runc", "crun", "conmon", "runsc", "containerd"} & set(recipe["packages"])


def test_recipe_key_follows_the_recipe_only():
    recipe = build_image.load_recipe("bookworm", None)
    key = build_image.recipe_key(recipe)
    assert key == build_image.recipe_key(json.loads(json.dumps(recipe)))
    changed = dict(recipe, packages=recipe["packages"] + ["less"])
    assert build_image.recipe_key(changed) != key
    assert build_image.recipe_key(build_image.load_recipe("trixie", None)) != key


def test_unknown_step_is_rejected(tmp_path):
    recipe = build_image.load_recipe("bookworm", None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(recipe, steps=["base_files", "no_such_step"])))
    with pytest.raises(tblib.TestbedError, match="no_such_step"):
        build_image.load_recipe("bookworm", str(bad))


def test_apt_sources_derive_security_from_debootstraps_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv("TB_MIRROR", raising=False)
    monkeypatch.delenv("TB_SECURITY_MIRROR", raising=False)
    root = tmp_path / "root"
    (root / "etc/apt").mkdir(parents=True)
    (root / "etc/apt/sources.list").write_text("deb http://mirror.invalid/debian trixie main\n")
    build_image.step_apt_sources(root, build_image.load_recipe("trixie", None), None)
    text = (root / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "URIs: http://mirror.invalid/debian\nSuites: trixie trixie-updates\n" in text
    assert "URIs: http://mirror.invalid/debian-security\nSuites: trixie-security\n" in text
    assert not (root / "etc/apt/sources.list").exists()


def test_sid_has_no_security_source(tmp_path, monkeypatch):
    monkeypatch.delenv("TB_MIRROR", raising=False)
    root = tmp_path / "root"
    (root / "etc/apt").mkdir(parents=True)
    (root / "etc/apt/sources.list").write_text("deb http://mirror.invalid/debian sid main\n")
    build_image.step_apt_sources(root, build_image.load_recipe("sid", None), None)
    assert "security" not in (root / "etc/apt/sources.list.d/debian.sources").read_text()


def test_quiet_units_mask_apt_timers(tmp_path):
    build_image.step_quiet_units(tmp_path, {}, None)
    link = tmp_path / "etc/systemd/system/apt-daily.timer"
    assert link.is_symlink() and os.readlink(link) == "/dev/null"


# --- vm ----------------------------------------------------------------------------------------

def test_vm_names_are_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_STATE", str(tmp_path))
    assert vm.vm_dir("tb-vm-bookworm") == tmp_path / "vms" / "tb-vm-bookworm"
    for bad in ("../etc", "A", "", "x/y", "-x"):
        with pytest.raises(tblib.TestbedError):
            vm.vm_dir(bad)


def test_taken_port_gives_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(tblib.TestbedError, match="port %d on 127.0.0.1 is already in use" % port):
            vm.check_port(port)
    vm.check_port(vm.free_port())


def test_qemu_line_is_loopback_only_and_never_cpu_host(tmp_path):
    args = vm.parse_args(["up", "t1", "--distro", "bookworm"])
    image = {"kernel": "/k", "initrd": "/i"}
    argv = vm.qemu_argv(tmp_path, image, vm.TCG, 40022, args)
    joined = " ".join(argv)
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in joined
    assert "-cpu" not in argv
    assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "1536"
    assert "name=opt/daemonless-oci/authorized_keys,file=%s/id_ed25519.pub" % tmp_path in joined


def test_accel_override_and_cached_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_CACHE", str(tmp_path))
    monkeypatch.setenv("TB_QEMU_ACCEL", "kvm")
    assert vm.choose_accel("/nonexistent") == "kvm"
    monkeypatch.delenv("TB_QEMU_ACCEL")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert vm.choose_accel("/nonexistent") == vm.TCG
        return
    # A verdict from this boot is reused without probing (the kernel path does not exist).
    (tmp_path / "accel-probe.json").write_text(json.dumps({"boot_id": vm.boot_id(), "accel": "sentinel"}))
    assert vm.choose_accel("/nonexistent") == "sentinel"


def test_down_of_an_unknown_vm_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("TB_STATE", str(tmp_path))
    assert vm.cmd_down(vm.parse_args(["down", "never-started"])) == 0


# --- run-matrix --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["INFO     vm-x \u279c {step}: {what}", "INFO     [vm-x > {step}] {what}"])
def test_step_clock_reads_both_molecule_formats(fmt):
    clock = run_matrix.StepClock()
    for step, outcome in (("create", "Successful"), ("converge", "Failed")):
        clock.feed(fmt.format(step=step, what="Executing"))
        clock.feed("  | some ansible output")
        clock.feed(fmt.format(step=step, what="Executed: " + outcome))
    clock.feed(fmt.format(step="destroy", what="Executing"))
    assert [(s["step"], s["outcome"]) for s in clock.steps] == [("create", "Successful"), ("converge", "Failed")]
    assert clock.unfinished() == "destroy"


def test_verify_banner_is_not_a_step_start():
    clock = run_matrix.StepClock()
    clock.feed("INFO     [vm-x > verify] Executing Testinfra tests found in /x/tests/...")
    assert clock.unfinished() is None


def test_scenario_meta_reads_the_real_scenarios():
    bookworm = run_matrix.scenario_meta("vm-bookworm")
    assert (bookworm["distro"], bookworm["platforms"]) == ("bookworm", {"tb-vm-bookworm": "bookworm"})
    assert run_matrix.scenario_meta("vm-trixie")["platforms"] == {"tb-vm-trixie": "trixie"}
    distros = run_matrix.scenario_meta("distros")
    assert sorted(distros["platforms"].values()) == ["bookworm", "sid", "trixie"]
    default = run_matrix.scenario_meta("default")
    assert default["platforms"] == {"localhost": run_matrix.HOST_LABEL}
    assert default["runtime"] == "runc, crun, runsc"
    with pytest.raises(tblib.TestbedError, match="no scenario"):
        run_matrix.scenario_meta("vm-nope")


def _record(**overrides):
    record = {"scenario": "vm-bookworm", "distro": "bookworm", "runtime": "runc", "seconds": 151.4,
              "result": "fail", "failed_step": "converge", "log": "x", "verify": [],
              "steps": [{"step": "create", "seconds": 30.2, "outcome": "Successful"},
                        {"step": "converge", "seconds": 12.0, "outcome": "Failed"}]}
    record.update(overrides)
    return record


def test_summary_files(tmp_path):
    table = run_matrix.write_summary(tmp_path, [_record()], "2026-01-01T00:00:00Z")
    row = table.splitlines()[2]
    assert row.startswith("| vm-bookworm | bookworm | runc | create 30s, converge 12s (1/2 ok); failed in converge")
    assert row.endswith("| 2m31s | FAIL |")
    assert json.loads((tmp_path / "summary.json").read_text())["scenarios"][0]["result"] == "fail"
    summary = (tmp_path / "summary.md").read_text()
    assert table.split("\n\n")[0] in summary
    assert "| vm-bookworm | bookworm | not verified (fail) |" in summary


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="6">
 <testcase classname="test_vm" name="test_kernel[ansible://tb-vm-bookworm]"/>
 <testcase classname="test_vm" name="test_exec[ansible://tb-vm-bookworm-runc]"/>
 <testcase classname="test_vm" name="test_exec[ansible://tb-vm-bookworm-crun]"><failure message="rc 1">x</failure></testcase>
 <testcase classname="test_vm" name="test_web[ansible://tb-vm-bookworm-runc]"/>
 <testcase classname="test_vm" name="test_kata[ansible://tb-vm-bookworm-kata]">
  <skipped type="pytest.skip" message="no package source offers kata-containers">s</skipped></testcase>
 <testcase classname="test_vm" name="test_vm_handler[ansible://tb-vm-bookworm-vm-shim]"/>
</testsuite></testsuites>
"""


def test_support_table_reads_testinfra_junit(tmp_path):
    junit = tmp_path / "vm-bookworm.verify.xml"
    junit.write_text(JUNIT)
    cases = run_matrix.verify_results(junit, {"tb-vm-bookworm": "bookworm"})
    assert [(c["distro"], c["runtime"], c["outcome"]) for c in cases] == [
        ("bookworm", "", "passed"), ("bookworm", "runc", "passed"), ("bookworm", "crun", "failed"),
        ("bookworm", "runc", "passed"), ("bookworm", "kata", "skipped"), ("bookworm", "vm-shim", "passed")]
    table = run_matrix.support_table([_record(verify=cases, result="pass")])
    assert table.splitlines()[2] == ("| vm-bookworm | bookworm | 2/2 passed | 1/1 FAILED | - | 1/1 passed | "
                                     "skipped: no package source offers kata-containers | 1/1 passed |")


def test_case_labels_tell_platforms_apart():
    platforms = {"dloci-tb-bookworm": "bookworm", "dloci-tb-sid": "sid"}
    assert run_matrix.case_labels("test_x[podman://dloci-tb-sid-runsc]", platforms) == ("sid", "runsc")
    assert run_matrix.case_labels("test_x[podman://dloci-tb-bookworm]", platforms) == ("bookworm", None)
    assert run_matrix.case_labels("test_x[ansible://localhost-crun]", {"localhost": "this host"}) == (
        "this host", "crun")
    assert run_matrix.case_labels("test_kata_is_reported[ansible://localhost]", {"localhost": "h"}) == ("h", "kata")
    assert run_matrix.case_labels("test_crun_runs[ansible://localhost-runc]", {"localhost": "h"}) == ("h", "runc")


def test_missing_or_broken_junit_gives_no_cases(tmp_path):
    assert run_matrix.verify_results(tmp_path / "absent.xml", {}) == []
    (tmp_path / "bad.xml").write_text("<testsuites><testcase")
    assert run_matrix.verify_results(tmp_path / "bad.xml", {}) == []


def test_update_readme_replaces_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("before\n%s\nold table\n%s\nafter\n" % (run_matrix.README_BEGIN, run_matrix.README_END))
    run_matrix.update_readme(readme, [_record(result="pass")], "2026-01-02T03:04:05Z")
    text = readme.read_text()
    assert text.startswith("before\n" + run_matrix.README_BEGIN + "\n")
    assert text.endswith(run_matrix.README_END + "\nafter\n")
    assert "old table" not in text and "_Last run: 2026-01-02T03:04:05Z, scenarios vm-bookworm pass._" in text
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(tblib.TestbedError, match="no support-table markers"):
        run_matrix.update_readme(tmp_path / "plain.md", [], "x")
    assert (tmp_path / "plain.md").read_text() == "no markers\n"


def test_jobs_must_be_auto_or_positive():
    assert run_matrix.choose_jobs("3", ["vm-bookworm"]) == 3
    assert run_matrix.choose_jobs("auto", ["default"]) == 1
    for bad in ("0", "-1", "many"):
        with pytest.raises(tblib.TestbedError, match="--jobs"):
            run_matrix.choose_jobs(bad, ["vm-bookworm"])


# A stand-in for molecule: a real `molecule test` costs minutes per scenario, and CI runs the real
# one through run-matrix anyway. This one prints molecule's step lines, sleeps, writes a JUnit
# file where PYTEST_ADDOPTS says, and fails for scenario "bad".
FAKE_MOLECULE = r"""#!/bin/sh
s=$3
echo "INFO     [$s > converge] Executing"
echo "start $s" >> "$FAKE_TRACE"
sleep 0.5
echo "end $s" >> "$FAKE_TRACE"
junit=${PYTEST_ADDOPTS#*--junitxml=}
echo '<testsuites><testcase name="test_a[ansible://p-runc]"/></testsuites>' > "$junit"
if [ "$s" = bad ]; then echo "INFO     [$s > converge] Executed: Failed"; exit 2; fi
echo "INFO     [$s > converge] Executed: Successful"
"""


@pytest.fixture()
def fake_molecule(tmp_path, monkeypatch):
    script = tmp_path / "fake-molecule"
    script.write_text(FAKE_MOLECULE)
    script.chmod(0o755)
    monkeypatch.setenv("TB_MOLECULE", str(script))
    monkeypatch.setenv("FAKE_TRACE", str(tmp_path / "trace"))
    monkeypatch.setattr(run_matrix, "scenario_meta",
                        lambda s: {"distro": s, "runtime": "runc", "platforms": {"p": s}})
    return tmp_path


def test_run_all_runs_jobs_side_by_side_and_keeps_order(fake_molecule, capsys):
    run_dir = fake_molecule / "run"
    run_dir.mkdir()
    runs = run_matrix.run_all(["a", "bad", "c"], run_dir, 3, False, "t0", echo=True)
    assert [(r.scenario, r.result) for r in runs] == [("a", "pass"), ("bad", "fail"), ("c", "pass")]
    records = [r.record() for r in runs]
    assert records[1]["failed_step"] == "converge"
    assert records[0]["verify"][0]["runtime"] == "runc"
    trace = (fake_molecule / "trace").read_text().splitlines()
    assert sorted(trace[:3]) == ["start a", "start bad", "start c"]   # all three ran side by side
    assert json.loads((run_dir / "summary.json").read_text())["scenarios"][2]["result"] == "pass"
    assert "[bad] INFO     [bad > converge] Executed: Failed" in capsys.readouterr().out


def test_run_all_stops_after_a_failure_when_asked(fake_molecule):
    run_dir = fake_molecule / "run"
    run_dir.mkdir()
    runs = run_matrix.run_all(["bad", "a"], run_dir, 1, True, "t0")
    assert [r.scenario for r in runs] == ["bad"]
    assert (fake_molecule / "trace").read_text().splitlines() == ["start bad", "end bad"]


# --- tblib -------------------------------------------------------------------------------------

def test_kill_process_checks_the_start_time():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        real = tblib.proc_start_time(proc.pid)
        tblib.kill_process(proc.pid, real + 1)       # a recycled pid must not be signalled
        assert proc.poll() is None
        tblib.kill_process(proc.pid, real)
        # kill_process waited on the pidfd; the zombie is ours to reap.
        assert proc.wait() == -15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_wait_pidfd_wakes_on_exit_and_times_out():
    proc = subprocess.Popen(["sleep", "0.2"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        started = time.monotonic()
        assert tblib.wait_pidfd(pidfd, 10) is True
        assert time.monotonic() - started < 5
    finally:
        os.close(pidfd)
        proc.wait()
    proc = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        assert tblib.wait_pidfd(pidfd, 0.1) is False
    finally:
        os.close(pidfd)
        proc.kill()
        proc.wait()


def test_tail_strips_terminal_escapes(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"one\r\n\x1b[0;32m  OK  \x1b[0m] Started x\r\n" + b"line\n" * 100)
    assert tblib.tail(log, 2) == "line\nline"
    assert "\x1b" not in tblib.tail(log, 200) and "  OK  ] Started x" in tblib.tail(log, 200)


def test_run_reports_the_failing_command():
    with pytest.raises(tblib.TestbedError, match="exit 3: sh -c echo boom; exit 3:\nboom"):
        tblib.run(["sh", "-c", "echo boom; exit 3"], capture=True)


def test_remove_tree(tmp_path):
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/f").write_text("x")
    tblib.remove_tree(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    tblib.remove_tree(tmp_path / "missing")


SLOW_FAKE_MOLECULE = r"""#!/bin/sh
echo "$1 $3 $$" >> "$FAKE_TRACE"
[ "$1" = destroy ] && exit 0
echo "INFO     [$3 > create] Executing"
exec sleep 60
"""


def test_interrupted_matrix_stops_every_scenario_and_destroys_it(tmp_path):
    """SIGTERM to run-matrix: each running molecule's group is killed, `molecule destroy` runs for
    each, the summary says interrupted, and the exit status is 130. molecule is a stand-in that
    sleeps (the real one is exercised by CI's molecule stage)."""
    script = tmp_path / "fake-molecule"
    script.write_text(SLOW_FAKE_MOLECULE)
    script.chmod(0o755)
    trace = tmp_path / "trace"
    env = dict(os.environ, TB_MOLECULE=str(script), FAKE_TRACE=str(trace), TB_STATE=str(tmp_path / "state"))
    proc = subprocess.Popen([sys.executable, str(TESTBED / "run-matrix"), "vm-bookworm", "vm-trixie", "--jobs", "2",
                             "--run-dir", str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not trace.exists() or len(trace.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(15)
    try:
        output, _unused = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    lines = [line.split() for line in trace.read_text().splitlines()]
    assert sorted((verb, scen) for verb, scen, _pid in lines) == [
        ("destroy", "vm-bookworm"), ("destroy", "vm-trixie"), ("test", "vm-bookworm"), ("test", "vm-trixie")]
    for verb, _scen, pid in lines:
        if verb == "test":
            assert not Path("/proc/%s" % pid).exists() or "zombie" in Path("/proc/%s/status" % pid).read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(s["scenario"], s["result"], s["failed_step"]) for s in summary["scenarios"]] == [
        ("vm-bookworm", "interrupted", "create"), ("vm-trixie", "interrupted", "create")]


def test_readme_from_an_earlier_summary(tmp_path, capsys):
    run_matrix.write_summary(tmp_path, [_record(result="pass")], "2026-01-02T03:04:05Z")
    readme = tmp_path / "README.md"
    readme.write_text("%s\n%s\n" % (run_matrix.README_BEGIN, run_matrix.README_END))
    assert run_matrix.readme_from_summary(tmp_path / "summary.json", str(readme)) == 0
    assert "| vm-bookworm | bookworm | not verified (pass) |" in capsys.readouterr().out
    assert "_Last run: 2026-01-02T03:04:05Z, scenarios vm-bookworm pass._" in readme.read_text()
    assert run_matrix.readme_from_summary(tmp_path / "missing.json", None) == 1
