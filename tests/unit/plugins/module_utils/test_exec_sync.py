"""Pure logic of exec_sync: the k8s-file log split, the output cap, the process spec edits."""
from __future__ import annotations

import os

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import exec_sync
from ansible_collections.daemonless.oci.plugins.module_utils.errors import ExecSyncError, ValidationError

TS = b"2026-11-28T15:06:50.547169426+00:00"


def record(stream: bytes, tag: bytes, content: bytes) -> bytes:
    return TS + b" " + stream + b" " + tag + b" " + content + b"\n"


def test_parse_log_splits_streams_and_drops_the_newline_conmon_adds_to_partial_records():
    log = (record(b"stdout", b"F", b"hi") + record(b"stdout", b"P", b"partial")
           + record(b"stderr", b"F", b"err") + record(b"stdout", b"F", b" spaced  out "))
    assert exec_sync.parse_log(log) == (b"hi\npartial spaced  out \n", b"err\n")


def test_parse_log_round_trips_a_byte_stream_cut_into_8192_byte_chunks():
    original = bytes(range(256)).replace(b"\n", b"") * 100 + b"\nend\n\nlast"
    log = b""
    for start in range(0, len(original), 8192):
        chunk = original[start:start + 8192]
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            log += record(b"stdout", b"F", piece)
        if pieces[-1]:
            log += record(b"stdout", b"P", pieces[-1])
    assert exec_sync.parse_log(log) == (original, b"")


def test_parse_log_skips_short_and_unknown_records():
    log = b"garbage\n" + record(b"weird", b"F", b"x") + record(b"stderr", b"F", b"kept")
    splitter = exec_sync.LogSplitter()
    splitter.feed(log)
    splitter.close()
    assert splitter.result() == (b"", b"kept\n")
    assert splitter.skipped == 2


def test_splitter_accepts_records_split_across_feeds():
    log = record(b"stdout", b"F", b"one") + record(b"stderr", b"P", b"two")
    splitter = exec_sync.LogSplitter()
    for index in range(len(log)):
        splitter.feed(log[index:index + 1])
    splitter.close()
    assert splitter.result() == (b"one\n", b"two")


def test_splitter_caps_stdout_and_stderr_together_and_flags_truncation():
    splitter = exec_sync.LogSplitter(limit=10)
    splitter.feed(record(b"stdout", b"F", b"123456") + record(b"stderr", b"F", b"abcdef") + record(b"stdout", b"F", b"z"))
    splitter.close()
    stdout, stderr = splitter.result()
    assert len(stdout) + len(stderr) == 10
    assert (stdout, stderr) == (b"123456\n", b"abc")
    assert splitter.truncated


def test_splitter_at_exactly_the_limit_is_not_truncated():
    splitter = exec_sync.LogSplitter(limit=4)
    splitter.feed(record(b"stdout", b"F", b"abc"))
    splitter.close()
    assert splitter.result() == (b"abc\n", b"")
    assert not splitter.truncated


def test_read_log_fd_reads_a_file_in_chunks(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(record(b"stdout", b"F", b"x" * 3000000) + record(b"stderr", b"P", b"tail"))
    fd = os.open(str(path), os.O_RDONLY)
    try:
        splitter = exec_sync.read_log_fd(fd, exec_sync.DEFAULT_OUTPUT_LIMIT)
    finally:
        os.close(fd)
    assert splitter.result() == (b"x" * 3000000 + b"\n", b"tail")


def test_capped_output_for_the_direct_path():
    output = exec_sync.CappedOutput(5)
    output.add("stdout", b"abc")
    output.add("stderr", b"defg")
    output.add("stdout", b"more")
    assert (output.get("stdout"), output.get("stderr"), output.truncated) == (b"abc", b"de", True)


def test_merge_env_replaces_by_name_keeps_order_and_exact_values():
    merged = exec_sync.merge_env(["PATH=/bin", "A=1", "B=x=y"], {"A": "line1\nline2=3", "NEW": ""})
    assert merged == ["PATH=/bin", "A=line1\nline2=3", "B=x=y", "NEW="]
    assert exec_sync.merge_env(["A=1"], ["A=2", "C=a=b"]) == ["A=2", "C=a=b"]
    with pytest.raises(ValidationError):
        exec_sync.merge_env([], {"BAD=NAME": "x"})


@pytest.fixture
def rootfs(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/tmp:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\nstaff:x:50:\n")
    return str(tmp_path)


@pytest.mark.parametrize("user, expected", [
    ("app", {"uid": 1000, "gid": 1001}),
    ("1000", {"uid": 1000, "gid": 1001}),
    (1000, {"uid": 1000, "gid": 1001}),
    ("4242", {"uid": 4242, "gid": 0}),
    ("app:staff", {"uid": 1000, "gid": 50}),
    ("4242:77", {"uid": 4242, "gid": 77}),
])
def test_resolve_user_reads_the_containers_own_databases(rootfs, user, expected):
    assert exec_sync.resolve_user(rootfs, user) == expected


@pytest.mark.parametrize("user", ["nobody", "app:nogroup", ":0"])
def test_resolve_user_rejects_unknown_names(rootfs, user):
    with pytest.raises(ValidationError):
        exec_sync.resolve_user(rootfs, user)


@pytest.mark.parametrize("message, code", [
    ('exec: "/nonexist": stat /nonexist: no such file or directory', 127),
    ("executable file `foo` not found in $PATH: No such file or directory", 127),
    ('executing command "/x" in sandbox: failed to load /x: no such file or directory', 127),
    ('exec: "/bin": permission denied', 126),
    ("open executable: Operation not permitted", 126),
])
def test_failure_response_maps_runtime_messages_to_shell_style_codes(message, code):
    response = exec_sync.failure_response(message)
    assert response.exit_code == code
    assert response.stderr == message.encode()


def test_failure_response_raises_for_other_runtime_errors():
    with pytest.raises(ExecSyncError) as info:
        exec_sync.failure_response("container not running")
    assert "container not running" in str(info.value)


def test_timed_out_response_is_a_result_not_an_error():
    response = exec_sync.timed_out_response(b"out", b"partial err")
    assert (response.exit_code, response.timed_out, response.stdout) == (-1, True, b"out")
    assert response.stderr == b"partial err\ncommand timed out"


def test_descendants_follow_parent_links_from_the_roots():
    table = {1: 0, 4: 0, 5: 4, 6: 5, 8: 1, 10: 0, 11: 10}
    assert exec_sync._descendants(table, {4}) == {4, 5, 6}
    assert exec_sync._descendants(table, {99}) == set()


def test_check_command_rejects_empty_and_nul():
    for bad in ([], [""][:0], ["a\0b"], [1]):
        with pytest.raises(ValidationError):
            exec_sync.check_command(bad)
    assert exec_sync.check_command(("true",)) == ["true"]


def test_options_reject_unknown_keys_and_bad_limits():
    with pytest.raises(ValidationError):
        exec_sync.ExecOptions.parse({"stdinn": b""})
    with pytest.raises(ValidationError):
        exec_sync.ExecOptions.parse({"output_limit": 0})
    with pytest.raises(ValidationError):
        exec_sync.ExecOptions.parse({"workdir": "relative"})
    assert exec_sync.ExecOptions.parse({"output_limit": None}).output_limit == exec_sync.DEFAULT_OUTPUT_LIMIT


def test_log_size_max_leaves_room_for_record_headers():
    assert exec_sync.log_size_max_for(16 << 20) > 2 * (16 << 20)
    assert exec_sync.log_size_max_for(1) >= 65536
