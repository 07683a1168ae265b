"""CRI log parsing and tailing from the end of the file."""
from __future__ import annotations

from ansible_collections.daemonless.oci.plugins.module_utils import logs


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_partial_records_are_joined_per_stream(tmp_path):
    path = write(tmp_path / "log", [
        "2026-01-01T00:00:00.1Z stdout P hel",
        "2026-01-01T00:00:00.2Z stderr F oops",
        "2026-01-01T00:00:00.3Z stdout F lo",
        "not a cri line",
        "2026-01-01T00:00:00.4Z stdout F ",
    ])
    lines = logs.tail(path, 10)
    assert [(line.stream, line.text) for line in lines] == [("stderr", "oops"), ("stdout", "hello"), ("stdout", "")]
    assert [line.text for line in logs.tail(path, 10, stream="stdout")] == ["hello", ""]


def test_tail_reads_only_the_end_of_a_big_file(tmp_path):
    count = 50000
    path = write(tmp_path / "log", ["2026-01-01T00:00:00Z stdout F line {}".format(i) for i in range(count)])
    assert [line.text for line in logs.tail(path, 3)] == ["line 49997", "line 49998", "line 49999"]
    assert len(logs.tail(path, 1000)) == 1000
    assert logs.tail(path, 0) == []


def test_tail_widens_when_partial_records_make_long_lines(tmp_path):
    records = ["2026-01-01T00:00:00Z stdout P x"] * 500 + ["2026-01-01T00:00:00Z stdout F end"]
    path = write(tmp_path / "log", ["2026-01-01T00:00:00Z stdout F first"] + records)
    lines = logs.tail(path, 2)
    assert [line.text for line in lines] == ["first", "x" * 500 + "end"]


def test_missing_log_is_empty(tmp_path):
    assert logs.tail(str(tmp_path / "none"), 5) == []
    assert logs.tail_text(str(tmp_path / "none"), 5) == ""
