"""Validation of container ids and names before either becomes part of a path.

Both end up as path components (state directories, lock files, the runtime's own state dir,
conmon's attach symlink) and as arguments to runtime CLIs, so they are checked once, here, with
a conservative alphabet: letters, digits, ``_``, ``.``, ``-``; they must start with a letter or a
digit (so never ``.``, ``..`` or an option-looking ``-x``), and ``..`` is refused anywhere.
"""
from __future__ import annotations

import re
import secrets

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError

ID_MAX_LENGTH = 64
NAME_MAX_LENGTH = 128
GENERATED_ID_BYTES = 16  # 32 hex digits: unique enough, and short enough for unix socket paths

_SAFE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def _check(kind: str, value: object, max_length: int) -> str:
    """Apply the shared rules and return the value, or raise ValidationError naming the fault."""
    if not isinstance(value, str):
        raise ValidationError("container {} must be a string, got {}".format(kind, type(value).__name__))
    if not value:
        raise ValidationError("container {} must not be empty".format(kind))
    if len(value) > max_length:
        raise ValidationError("container {} {!r}... is {} characters long; the limit is {}".format(
            kind, value[:20], len(value), max_length))
    if "\x00" in value:
        raise ValidationError("container {} must not contain a NUL byte".format(kind))
    if "/" in value:
        raise ValidationError("container {} {!r} must not contain '/'".format(kind, value))
    if ".." in value:
        raise ValidationError("container {} {!r} must not contain '..'".format(kind, value))
    if not _SAFE.match(value):
        raise ValidationError(
            "container {} {!r} may only hold letters, digits, '_', '.' and '-', and must start with a "
            "letter or a digit".format(kind, value))
    return value


def validate_id(container_id: object) -> str:
    """Return ``container_id`` if it is safe to use as a path component and a runtime argument."""
    return _check("id", container_id, ID_MAX_LENGTH)


def validate_name(name: object) -> str:
    """Return ``name`` if it is safe to use as a path component (names are indexed on disk)."""
    return _check("name", name, NAME_MAX_LENGTH)


def new_id() -> str:
    """A fresh random container id (hex, so it always passes ``validate_id``)."""
    return secrets.token_hex(GENERATED_ID_BYTES)
