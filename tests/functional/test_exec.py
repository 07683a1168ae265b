"""Exec-sync, streaming exec and the oci_exec module against real containers on runc, crun and runsc.

Run as root under the subreaper (conmon double-forks; see tests/tools/subreaper.py):
    python3 tests/tools/subreaper.py /tmp/probe-venv/bin/python -m pytest tests/functional/test_exec.py
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import List

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.container import Container
from ansible_collections.daemonless.oci.plugins.module_utils.errors import (
    ContainerUnknownError,
    ExecSyncError,
    InvalidStateError,
    ValidationError,
)
from ansible_collections.daemonless.oci.plugins.module_utils.manager import ContainerManager, CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec

from ansible_collections.daemonless.oci.tests.functional.conftest import HANDLERS, make_manager, remove_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLEEPER = ["sleep", "1000000"]


@dataclass
class Box:
    """One running container per handler, shared by the tests of this file."""

    manager: ContainerManager
    container: Container
    handler: str
    config: str
    root: str

    def run(self, argv: List[str], timeout: float = 30.0, **options):
        return self.manager.exec_sync(self.container, argv, timeout, **options)

    def live(self, marker: str) -> List[str]:
        """Processes in the container whose command line has ``marker`` and that are not zombies."""
        listing = self.run(["ps", "-o", "stat,args"]).stdout.decode()
        return [line for line in listing.splitlines()
                if marker in line and not line.strip().startswith("Z") and "ps -o" not in line]


@pytest.fixture(scope="module", params=HANDLERS)
def box(request, runtime_config, busybox_rootfs, work_root):
    with open(runtime_config) as handle:
        if request.param not in json.load(handle)["runtimes"]:
            pytest.skip("{} is not installed".format(request.param))
    root = tempfile.mkdtemp(prefix="x", dir=work_root)
    manager = make_manager(runtime_config, root)
    spec = default_spec(busybox_rootfs, SLEEPER, readonly_root=True, env=["PATH=/bin", "HOME=/root"])
    container = manager.create(CreateRequest(name="exec-" + request.param, spec=spec, handler=request.param))
    manager.start(container)
    yield Box(manager, container, request.param, runtime_config, root)
    assert remove_all(manager) == []


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(box, code):
    response = box.run(["sh", "-c", "exit {}".format(code)])
    assert (response.exit_code, response.timed_out, response.truncated) == (code, False, False)


def test_stdout_and_stderr_are_separate_and_exact(box):
    response = box.run(["sh", "-c", "echo out; echo err >&2; printf 'no newline'"])
    assert response.stdout == b"out\nno newline"
    assert response.stderr == b"err\n"


@pytest.mark.parametrize("signal_name, code", [("KILL", 137), ("TERM", 143), ("SEGV", 139)])
def test_signal_deaths_are_128_plus_n(box, signal_name, code):
    assert box.run(["sh", "-c", "kill -{} $$".format(signal_name)]).exit_code == code


def test_missing_binary_is_127_with_the_runtime_message(box):
    response = box.run(["/no/such/binary"])
    assert response.exit_code == 127
    assert b"/no/such/binary" in response.stderr


def test_not_executable_is_126(box):
    response = box.run(["/etc/passwd"])
    assert response.exit_code == 126
    assert response.stderr


def test_stdin_binary_round_trip(box):
    data = bytes(range(256)) * 64 + b"\0\r\n\xff"
    response = box.run(["cat"], stdin=data)
    assert (response.exit_code, response.stdout) == (0, data)


def test_stdin_ten_mib_round_trip(box):
    data = os.urandom(10 * 1024 * 1024)
    response = box.run(["cat"], timeout=60, stdin=data)
    assert response.exit_code == 0 and not response.truncated
    assert hashlib.sha256(response.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    digest = box.run(["sha256sum"], timeout=60, stdin=data).stdout.split()[0].decode()
    assert digest == hashlib.sha256(data).hexdigest()


def test_empty_stdin_is_eof(box):
    assert box.run(["sh", "-c", "cat; echo end"], stdin=b"").stdout == b"end\n"


def test_timeout_kills_the_command_and_its_children_within_a_second(box):
    started = time.monotonic()
    response = box.run(["sh", "-c", "sleep 4241 & sleep 4242 & echo begun; sleep 4240"], timeout=1.0)
    elapsed = time.monotonic() - started
    assert response.timed_out and response.exit_code == -1
    assert response.stderr.endswith(b"command timed out")
    assert 1.0 <= elapsed < 2.0, elapsed
    assert box.live("424") == []


def test_timeout_with_stdin_takes_the_direct_path_and_kills_too(box):
    started = time.monotonic()
    response = box.run(["sh", "-c", "cat >/dev/null; sleep 4245 & sleep 4246"], timeout=1.0, stdin=b"x" * 1000)
    assert response.timed_out and time.monotonic() - started < 2.0
    assert box.live("424") == []


def test_fork_bomb_under_timeout_leaves_nothing(box):
    started = time.monotonic()
    response = box.run(["sh", "-c", "while :; do sleep 4243 & sh -c 'sleep 4244' & done"], timeout=1.0)
    elapsed = time.monotonic() - started
    assert response.timed_out
    assert box.live("4243") == [] and box.live("4244") == []
    if box.handler != "runsc":  # runsc signals each sandboxed process with its own `runsc kill`
        assert elapsed < 3.0, elapsed  # stop-rescan-kill of hundreds of processes, on a loaded 2-core box


def test_process_that_left_with_setsid_is_a_daemon_and_survives(box):
    if box.handler == "runsc":
        pytest.skip("runsc: the kill follows parent links, so a setsid child that keeps its parent dies too")
    response = box.run(["sh", "-c", "setsid sleep 4247 & sleep 4248"], timeout=1.0)
    assert response.timed_out
    assert box.live("4248") == []
    assert len(box.live("sleep 4247")) == 1
    box.run(["pkill", "-f", "sleep 4247"])


def test_output_over_the_cap_is_truncated_and_flagged(box):
    command = ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a; echo tail >&2"]
    response = box.run(command, output_limit=1 << 20)
    assert response.truncated and response.exit_code == 0
    assert len(response.stdout) + len(response.stderr) == 1 << 20
    assert set(response.stdout) == {ord("a")}
    whole = box.run(command, output_limit=4 << 20)
    assert not whole.truncated
    assert (len(whole.stdout), whole.stderr) == (3000000, b"tail\n")


def test_endless_output_is_bounded_by_cap_and_timeout(box):
    response = box.run(["yes", "0123456789abcdef"], timeout=2.0, output_limit=1 << 20)
    assert response.timed_out and response.truncated
    assert len(response.stdout) <= 1 << 20


def test_background_child_holds_only_the_direct_path_open(box):
    """The documented rule: conmon returns at the main process's exit; the direct path waits for EOF."""
    if box.handler != "runsc":
        started = time.monotonic()
        response = box.run(["sh", "-c", "sleep 4249 & echo done"])
        assert response.stdout == b"done\n" and time.monotonic() - started < 1.0
        box.run(["pkill", "-f", "sleep 4249"])
    started = time.monotonic()
    response = box.run(["sh", "-c", "(sleep 1; echo late) & echo done"], stdin=b"")
    assert response.stdout == b"done\nlate\n" and time.monotonic() - started >= 1.0
    response = box.run(["sh", "-c", "sleep 4251 & echo done"], stdin=b"", timeout=1.0)
    assert response.timed_out and response.stdout == b"done\n"
    if box.handler == "runsc":
        # inside the sandbox the orphan is a child of init, and its pipe holders are not visible
        # from the host: it survives (documented limitation); the container goes at teardown
        assert len(box.live("sleep 4251")) == 1
    else:
        assert box.live("4251") == []


def test_env_value_with_newlines_and_equals(box):
    value = "a=b\nsecond line = x\n=\n"
    response = box.run(["sh", "-c", 'printf %s "$WEIRD"'], env={"WEIRD": value, "OTHER": "1"})
    assert response.stdout.decode() == value
    assert box.run(["sh", "-c", "echo $HOME"], env=["HOME=/elsewhere"]).stdout == b"/elsewhere\n"


@pytest.mark.parametrize("user, expected", [("app", b"1000 1000\n"), ("1000", b"1000 1000\n"),
                                            ("nobody", b"65534 65534\n"), ("4321:7", b"4321 7\n"),
                                            ("app:root", b"1000 0\n")])
def test_user_by_name_and_by_uid(box, user, expected):
    assert box.run(["sh", "-c", "echo $(id -u) $(id -g)"], user=user).stdout == expected


def test_unknown_user_is_a_clear_error(box):
    with pytest.raises(ValidationError, match="not in the container's /etc/passwd"):
        box.run(["true"], user="nosuchuser")


def test_workdir(box):
    assert box.run(["pwd"], workdir="/tmp").stdout == b"/tmp\n"


def test_tty_merges_streams(box):
    if box.handler == "runsc":
        with pytest.raises(ValidationError):
            box.run(["true"], tty=True)
        return
    response = box.run(["sh", "-c", "echo out; echo err >&2; tty"], tty=True)
    assert response.stdout.startswith(b"out\r\nerr\r\n/dev/pts/")
    assert response.stderr == b""


def test_temporary_files_are_removed(box):
    box.run(["true"])
    box.run(["cat"], stdin=b"x")
    box.run(["sleep", "5"], timeout=0.3)
    with pytest.raises(ExecSyncError):
        box.manager.runtime.exec_container(box.container, ["/no/such"], None, None, None, False)
    assert os.listdir(box.manager.paths.exec_dir(box.container.id)) == []


def test_full_disk_leaves_no_temporary_files(box):
    """Fault injection with a real full file system: a 16 KiB tmpfs over the exec directory."""
    if box.handler == "crun":
        pytest.skip("the crun test wrapper runs crun in a mount namespace made at setup, which does not see "
                    "a mount made later (tests/tools/crun-private-ns.sh); runc covers the conmon path")
    exec_dir = box.manager.paths.exec_dir(box.container.id)
    os.makedirs(exec_dir, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", exec_dir], check=True)
    try:
        with pytest.raises(ExecSyncError, match="No space left"):
            box.run(["true"], env={"BIG": "x" * 65536})
        assert os.listdir(exec_dir) == []
        with pytest.raises(ExecSyncError, match="No space left"):
            box.run(["cat"], env={"BIG": "x" * 65536}, stdin=b"x")
        assert os.listdir(exec_dir) == []
        response = box.run(["sh", "-c", "head -c 200000 /dev/zero"])
        assert response.exit_code == 0
        if box.handler == "runsc":
            assert len(response.stdout) == 200000  # the direct path reads pipes: no log file at all
        else:
            assert 0 < len(response.stdout) < 200000  # conmon could write only part of its log
        assert os.listdir(exec_dir) == []
    finally:
        subprocess.run(["umount", exec_dir], check=True)
    assert box.run(["echo", "ok"]).stdout == b"ok\n"


def test_streaming_exec_pipes(box):
    read_end, write_end = os.pipe()
    os.write(write_end, b"line one\nline two\n")
    os.close(write_end)
    out, err = io.BytesIO(), io.BytesIO()
    with os.fdopen(read_end, "rb", buffering=0) as stdin:
        code = box.manager.runtime.exec_container(box.container, ["sh", "-c", "cat; echo e >&2; exit 3"],
                                                  stdin, out, err, False)
    assert (code, out.getvalue(), err.getvalue()) == (3, b"line one\nline two\n", b"e\n")


def test_streaming_exec_tty_with_resize(box):
    read_end, write_end = os.pipe()
    out = bytearray()
    sizes = [(37, 111)]

    def type_when_prompted() -> None:
        deadline = time.monotonic() + 10
        while b"# " not in out and time.monotonic() < deadline:
            time.sleep(0.02)
        sizes.append((41, 123))
        time.sleep(1.0)  # the relay applies it within its 0.1 s poll; the runtime then gets SIGWINCH
        os.write(write_end, b"stty size; exit 5\n")
        os.close(write_end)

    typist = threading.Thread(target=type_when_prompted)
    typist.start()
    with os.fdopen(read_end, "rb", buffering=0) as stdin:
        code = box.manager.runtime.exec_container(box.container, ["sh"], stdin, out.extend, None, True,
                                                  lambda: sizes[-1])
    typist.join()
    assert code == 5
    assert b"41 123" in out, bytes(out)  # the resize after start reached the container's console


def test_streaming_exec_tty_starts_with_the_first_size(box):
    out = bytearray()
    # crun ignores consoleSize: the size arrives right after it hands over the console (see exec_stream)
    script = "sleep 0.5; stty size; exit 3" if box.handler == "crun" else "stty size; exit 3"
    code = box.manager.runtime.exec_container(box.container, ["sh", "-c", script], None, out.extend,
                                              None, True, lambda: (29, 97))
    assert code == 3
    assert out.startswith(b"29 97"), bytes(out)


def _container(manager, rootfs, name, handler):
    spec = default_spec(rootfs, SLEEPER, readonly_root=True)
    container = manager.create(CreateRequest(name=name, spec=spec, handler=handler))
    manager.start(container)
    return container


def test_exec_into_stopped_paused_or_missing_container_is_a_clear_error(manager, busybox_rootfs, handler):
    stopped = _container(manager, busybox_rootfs, "stopped", handler)
    manager.stop(stopped, timeout=0)
    with pytest.raises(InvalidStateError, match="stopped: exec needs a running container"):
        manager.exec_sync(stopped, ["true"], 5)
    paused = _container(manager, busybox_rootfs, "paused", handler)
    manager.pause(paused)
    with pytest.raises(InvalidStateError, match="paused: exec needs a running container"):
        manager.exec_sync(paused, ["true"], 5)
    with pytest.raises(ContainerUnknownError, match="no such container: ghost"):
        manager.get("ghost")


# the module, through ansible-playbook
PLAYBOOK = textwrap.dedent("""\
    - hosts: localhost
      connection: local
      gather_facts: false
      module_defaults:
        group/daemonless.oci.oci:
          config_file: "{config}"
          run_root: "{run_root}"
          persist_root: "{persist_root}"
      tasks:
        - name: argv, both streams
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: [sh, -c, "echo out; echo err >&2"]
          register: plain
        - assert:
            that:
              - plain is changed
              - plain.rc == 0
              - plain.stdout == "out"
              - plain.stderr == "err"
              - plain.stdout_lines == ["out"]
              - plain.timed_out is false

        - name: command string is split, not run by a shell
          daemonless.oci.oci_exec:
            name: "{name}"
            command: printf '%s|' a 'b c' '$HOME'
          register: split
        - assert:
            that: split.stdout == "a|b c|$HOME|"

        - name: non-zero rc fails unless failed_when says otherwise, and rc/stdout are there
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: [sh, -c, "echo partial; exit 3"]
          register: three
          failed_when: three.rc != 3
        - assert:
            that:
              - three.rc == 3
              - three.stdout == "partial"

        - name: non-zero rc fails by default
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: ["false"]
          register: failing
          ignore_errors: true
        - assert:
            that:
              - failing is failed
              - failing.rc == 1
              - failing.msg == "non-zero return code"

        - name: stdin with the added newline
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: [wc, -c]
            stdin: "hi"
          register: fed
        - assert:
            that: fed.stdout | trim == "3"

        - name: timeout kills and fails with timed_out
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: [sleep, "4250"]
            timeout: 1
          register: slow
          ignore_errors: true
        - assert:
            that:
              - slow is failed
              - slow.timed_out
              - slow.rc == -1
              - slow.duration < 2

        - name: check mode does not run the command
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: [touch, /dev/shm/check-mode-marker]
          check_mode: true
          register: checked
        - assert:
            that:
              - checked is skipped
              - "'would run touch /dev/shm/check-mode-marker' in checked.msg"
        - name: the marker does not exist
          daemonless.oci.oci_exec:
            name: "{name}"
            argv: [test, -e, /dev/shm/check-mode-marker]
          register: marker
          failed_when: marker.rc != 1

        - name: a missing container fails clearly
          daemonless.oci.oci_exec:
            name: no-such-container
            argv: ["true"]
          register: missing
          ignore_errors: true
        - assert:
            that: "'no such container: no-such-container' in missing.msg"
    """)


def test_oci_exec_playbook(box):
    if box.handler != "runc":
        pytest.skip("the module is handler-independent; one playbook run (runc) is enough")
    playbook_bin = shutil.which("ansible-playbook") or "/tmp/probe-venv/bin/ansible-playbook"
    if not os.path.exists(playbook_bin):
        pytest.skip("ansible-playbook is not installed (ansible-core)")
    directory = tempfile.mkdtemp(prefix="play", dir=box.root)
    path = os.path.join(directory, "exec.yml")
    with open(path, "w") as handle:
        handle.write(PLAYBOOK.format(config=box.config, run_root=box.manager.paths.run_root,
                                     persist_root=box.manager.paths.persist_root, name=box.container.name))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.environ.get("DLOCI_COLLS", "/tmp/dloci-colls"), ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3",
               ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0")
    result = subprocess.run([playbook_bin, "-i", "localhost,", path], env=env, cwd=directory,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output
    assert "failed=0" in output
    adhoc = subprocess.run(
        [os.path.join(os.path.dirname(playbook_bin), "ansible"), "localhost", "-m", "daemonless.oci.oci_exec", "-a",
         "name={} argv=[cat,/etc/passwd] config_file={} run_root={} persist_root={}".format(
             box.container.name, box.config, box.manager.paths.run_root, box.manager.paths.persist_root)],
        env=env, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    adhoc_output = adhoc.stdout.decode("utf-8", "replace")
    assert adhoc.returncode == 0, adhoc_output
    assert "localhost | CHANGED" in adhoc_output and "root:x:0:0:root:/root:/bin/sh" in adhoc_output
