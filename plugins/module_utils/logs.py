"""The CRI log format conmon writes: parse lines, split by stream, tail from the end of the file.

Each line is ``<RFC 3339 time> <stdout|stderr> <P|F> <text>``: ``P`` marks a partial line (the
text continues in the next record of the same stream), ``F`` a full one. A tail reads blocks
backwards from the end of the file until it has enough full lines, so a large log costs what the
tail costs, not what the file costs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError

BLOCK = 64 * 1024
REOPEN_WAIT_SECONDS = 5.0
STREAMS = ("stdout", "stderr")


@dataclass
class LogLine:
    time: str
    stream: str
    text: str

    def to_json(self) -> Dict[str, str]:
        return {"time": self.time, "stream": self.stream, "text": self.text}


def parse_line(raw: str) -> Optional[tuple]:
    """(time, stream, tag, text) of one record, or None for a line that is not CRI-formatted."""
    parts = raw.split(" ", 3)
    if len(parts) < 3 or parts[1] not in STREAMS:
        return None
    tag = parts[2]
    if tag not in ("P", "F") and not tag.startswith(("P:", "F:")):
        return None
    return parts[0], parts[1], tag[0], parts[3] if len(parts) > 3 else ""


def parse(lines: List[str]) -> List[LogLine]:
    """Join partial records per stream into whole lines, in order of completion."""
    pending: Dict[str, List[str]] = {}
    result: List[LogLine] = []
    for raw in lines:
        record = parse_line(raw.rstrip("\n"))
        if record is None:
            continue
        time, stream, tag, text = record
        pending.setdefault(stream, []).append(text)
        if tag == "F":
            result.append(LogLine(time, stream, "".join(pending.pop(stream))))
    for stream, parts in pending.items():
        result.append(LogLine("", stream, "".join(parts)))
    return result


def _read_tail_lines(path: str, records: int) -> List[str]:
    """The last ``records`` raw lines of the file (plus one to spare), reading backwards."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= records:
            step = min(BLOCK, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    lines = data.decode("utf-8", "replace").splitlines()
    if position > 0 and lines:
        lines = lines[1:]  # the first line may be cut
    return lines


def tail(path: str, count: int, stream: Optional[str] = None) -> List[LogLine]:
    """The last ``count`` whole lines (of one stream if given); an absent log is empty.

    Partial records make whole lines longer than one record, so the read widens until enough
    whole lines are found or the file is exhausted.
    """
    if count <= 0:
        return []
    want = count
    while True:
        try:
            raw = _read_tail_lines(path, want)
        except FileNotFoundError:
            return []
        lines = [line for line in parse(raw) if stream is None or line.stream == stream]
        if len(lines) >= count or len(raw) < want:
            return lines[-count:]
        want *= 4


def tail_text(path: str, count: int) -> str:
    """The tail as plain text, for error messages."""
    return "\n".join("{} {}".format(line.stream, line.text) for line in tail(path, count))


def _inode(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def create_private(log_path: str) -> None:
    """Make the (empty) log file root-only before its writer opens it.

    conmon opens the log with O_APPEND and, since 2.1.10 or so, creates it mode 0640 (Debian 13 and
    unstable ship such versions); a file that already exists keeps the mode we give it here.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def reopen_and_wait(log_path: str, ask_writer: Callable[[], None], writer_name: str) -> None:
    """Ask the log's writer (conmon, or our vm monitor) to reopen the log, and wait until it has.

    The writer answers asynchronously through its own event loop, so the only proof is a new file
    at log_path (a new inode); the wait is bounded so that a wedged writer is an error, not a hang.
    """
    before = _inode(log_path)
    ask_writer()
    deadline = time.monotonic() + REOPEN_WAIT_SECONDS
    while _inode(log_path) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    if _inode(log_path) == before:
        raise OciError("{} did not reopen the log {} within {:.0f} s".format(writer_name, log_path, REOPEN_WAIT_SECONDS))
    os.chmod(log_path, 0o600)   # the writer made the new file; see create_private
