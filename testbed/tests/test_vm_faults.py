"""Faults around real VMs: each ends in a clear error within a bounded time, with nothing left.

These boot real qemu guests from the cached testbed image (built on first use, ~100 s), so they
need root, qemu and debootstrap; CI runs them in the pytest stage. Each VM gets a name of its own
(`tbf-*`) so a VM of a molecule scenario is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import pytest

TESTBED = Path(__file__).resolve().parent.parent
REPO = TESTBED.parent
BOGUS_PACKAGE = "daemonless-oci-no-such-package"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("qemu-system-x86_64") or not shutil.which("debootstrap"),
    reason="needs root, qemu-system-x86_64 and debootstrap (the testbed boots real VMs)")


def vm(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TESTBED / "vm")] + list(args), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def state_root() -> Path:
    return Path(os.environ.get("TB_STATE", "/var/tmp/daemonless-oci-testbed")) / "vms"


def qemu_pids(name: str) -> List[int]:
    """qemu processes started for VM `name` (qemu runs as `-name tb-NAME`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"qemu-system-x86_64") and b"tb-" + name.encode() in argv:
                pids.append(int(entry.name))
    return pids


def assert_nothing_left(name: str) -> None:
    assert not (state_root() / name).exists(), "run directory of %s left behind" % name
    assert qemu_pids(name) == [], "qemu of %s still running" % name


@pytest.fixture(scope="module", autouse=True)
def cached_image() -> None:
    """Build (or reuse) the bookworm image once, so boot tests do not pay for it in their timeouts."""
    out = subprocess.run([sys.executable, str(TESTBED / "build-image"), "bookworm"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]


def test_vm_that_never_comes_up_is_torn_down():
    """`--timeout 5` is far shorter than any boot here: the error says so, with the serial log."""
    started = time.monotonic()
    out = vm("up", "tbf-never", "--distro", "bookworm", "--timeout", "5", timeout=120)
    assert out.returncode == 1
    assert "VM tbf-never did not come up: SSH did not come up within 5 s" in out.stderr
    assert "--- tail of" in out.stderr
    assert time.monotonic() - started < 90   # 5 s of waiting plus teardown, never a 600 s default
    assert_nothing_left("tbf-never")


def test_taken_ssh_port_is_refused_before_qemu_starts():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = vm("up", "tbf-port", "--distro", "bookworm", "--ssh-port", str(port), timeout=120)
    assert out.returncode == 1
    assert "port %d on 127.0.0.1 is already in use" % port in out.stderr
    assert_nothing_left("tbf-port")


@pytest.fixture()
def booted_vm() -> Iterator[dict]:
    out = vm("up", "tbf-apt", "--distro", "bookworm", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    try:
        yield json.loads(out.stdout)
    finally:
        down = vm("down", "tbf-apt", timeout=120)
        assert down.returncode == 0, down.stderr
        assert_nothing_left("tbf-apt")


def test_package_that_fails_to_install_is_a_clear_error(booted_vm, tmp_path):
    """The runtimes role against a real guest, with conmon's package renamed to one no archive has:
    the play fails in the install task and names the package. The image's package lists are empty
    and dated 1970; a cache validity longer than that keeps the role from refreshing them, which
    keeps this test to a few TCG tasks (the refresh itself is exercised by the vm-* scenarios)."""
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": {"tbf-apt": {
        "ansible_host": booted_vm["address"], "ansible_port": booted_vm["port"], "ansible_user": "root",
        "ansible_ssh_private_key_file": booted_vm["identity_file"],
        "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    playbook = tmp_path / "play.yml"
    playbook.write_text("- hosts: all\n  gather_facts: false\n  roles:\n    - daemonless.oci.runtimes\n")
    extra = {"runtimes_oci": [], "runtimes_kata": "never", "runtimes_apt_cache_valid_time": 2000000000,
             "runtimes_packages": {"conmon": [BOGUS_PACKAGE]}}
    colls = subprocess.run(["bash", str(REPO / "scripts" / "dev-env.sh")], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=colls, ANSIBLE_NOCOLOR="1", ANSIBLE_HOST_KEY_CHECKING="False")
    started = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory),
                          "-e", json.dumps(extra), str(playbook)], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, env=env, timeout=900, check=False)
    elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stdout[-3000:]
    failed = [line for line in out.stdout.splitlines() if line.startswith("fatal:")]
    assert len(failed) == 1 and BOGUS_PACKAGE in failed[0], out.stdout[-3000:]
    assert "TASK [daemonless.oci.runtimes : Install conmon and the chosen runtimes]" in out.stdout
    print("package failure reported after %.0f s: %s" % (elapsed, failed[0][:300]))
