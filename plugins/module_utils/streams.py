# -*- coding: utf-8 -*-
# Copyright: daemonless.oci engineers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the streaming calls (exec, attach, the vm type's IO) send and take their bytes.

Callers hand us whatever they have: a callable, a binary file object, or nothing. Turning that
into one shape here keeps the pumps of exec_stream, attach and runtime_vm free of type checks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

Writer = Callable[[bytes], Any]


def writer_for(target: Any) -> Writer:
    """A callable taking bytes, from a callable, a binary file object, or None (discard).

    A file object is flushed after each chunk: the reader on the other side (a terminal, a
    pipe to Ansible) should see output as the container produces it, not when a buffer fills.
    """
    if target is None:
        return lambda data: None
    if callable(target):
        return target

    def write(data: bytes) -> None:
        target.write(data)
        if hasattr(target, "flush"):
            target.flush()
    return write


def fileno_or_none(stream: Any) -> Optional[int]:
    """The stream's file descriptor, or None when it has none (BytesIO, a closed file, None):
    the pumps poll a real descriptor and read anything else in one go."""
    try:
        return stream.fileno() if stream is not None else None
    except (AttributeError, OSError, ValueError):
        return None
