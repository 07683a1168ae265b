"""Unpacking an image layer (a tar stream) so that nothing in it can reach outside its directory.

An image is data from someone else. Python's own ``tarfile.extractall`` follows symlinks it just
created, writes through ``..`` and absolute names, and its protective filters only exist from
3.12 (3.9 is our floor), so this module uses ``tarfile`` only to *parse* headers and read member
data, and does every filesystem operation itself:

* Every path is split into components; absolute names, ``..`` and NUL are refused before
  anything is touched.
* Each parent directory is reached with ``openat(..., O_NOFOLLOW | O_DIRECTORY)`` from the layer
  root, one component at a time, so a symlink made by an earlier member (or a race) can never
  redirect a later write: the walk fails instead of following it.
* Hard links must name an earlier member of the same layer, reached by the same walk; symlinks
  whose *relative* target climbs above the layer root are refused. Absolute symlink targets are
  kept: they are resolved inside the container's root at run time, and this module never
  follows a link itself.
* Character and block devices are refused unless the caller allows them (privileged use);
  FIFOs are harmless and kept.
* Limits on total bytes, entry count, path length and metadata-header size stop oversized and
  endless archives; the declared size of a member is checked before any of its data is read.
* OCI whiteouts are translated to the overlayfs form so that a stack of unpacked layers works
  as overlay lower directories: ``.wh.NAME`` becomes a 0/0 character device ``NAME`` and
  ``.wh..wh..opq`` becomes the ``trusted.overlay.opaque=y`` xattr on its directory.
* Owners are kept as the numeric ids in the header (user and group *names* are ignored: the
  host's name database is not the image's), and modes are kept with setuid/setgid bits, which
  images legitimately use (``su``, ``ping``).

The caller unpacks into a fresh temporary directory and renames it into place only when
``extract_layer`` returned, so a refused archive never leaves a partial layer behind.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO, Dict, List, Optional, Tuple

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
KEPT_XATTRS = ("security.capability",)  # file capabilities; trusted.* could forge overlay metadata
COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class UnsafeArchiveError(OciError):
    """An archive member would escape its layer, or the archive breaks a size or count limit."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one layer. The defaults are far above real images and far below a full disk."""

    max_bytes: int = 16 << 30          # decompressed tar stream, headers included
    max_entries: int = 1_000_000
    max_path_length: int = 4096
    max_header_bytes: int = 1 << 20    # one pax / GNU long-name header


@dataclass
class ExtractStats:
    """What an extraction produced; stored with the layer for `info` and for the reports."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    devices: int = 0
    stream_bytes: int = 0
    devices_list: List[str] = field(default_factory=list)


class _LimitedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an oversized pax or GNU long-name header *before* tarfile reads it.

    Without this, a header declaring gigabytes of extended attributes is read into memory in
    one piece by tarfile itself, long before any member reaches our checks.
    """

    max_header_bytes = Limits.max_header_bytes

    def _proc_member(self, tarfile):  # type: ignore[no-untyped-def]  # same name as the base class's parameter
        if self.type in _META_TYPES and self.size > self.max_header_bytes:
            raise UnsafeArchiveError("archive refused: a metadata header declares {} bytes (limit {})"
                                     .format(self.size, self.max_header_bytes))
        return super()._proc_member(tarfile)


class BoundedReader:
    """A read-only stream that counts what passes through and refuses to go past ``limit`` bytes.

    It sits between the decompressor and tarfile, so a decompression bomb or an endless stream is
    stopped after ``limit`` bytes, whatever the headers claim. ``hasher`` (optional) sees every byte,
    which is how the uncompressed digest (the diff id) is checked in the same single pass.
    """

    def __init__(self, inner: IO[bytes], limit: int, hasher: Optional["hashlib._Hash"] = None,
                 what: str = "layer") -> None:
        self.inner = inner
        self.limit = limit
        self.hasher = hasher
        self.what = what
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        remaining = self.limit - self.count
        want = remaining + 1 if size is None or size < 0 else min(size, remaining + 1)
        data = self.inner.read(want)
        self.count += len(data)
        if self.count > self.limit:
            raise UnsafeArchiveError("{} refused: more than {} bytes once decompressed".format(self.what, self.limit))
        if self.hasher is not None and data:
            self.hasher.update(data)
        return data

    def drain(self) -> None:
        """Read to the end (still bounded), so the digest covers trailing bytes tarfile skipped."""
        while self.read(COPY_CHUNK):
            pass


def split_member_path(name: str, limits: Limits) -> List[str]:
    """The components of a member name, or ``UnsafeArchiveError`` for anything that could escape.

    ``./a//b/`` is ``["a", "b"]``; the archive root (``.`` or ``./``) is ``[]``.
    """
    if "\x00" in name:
        raise UnsafeArchiveError("archive refused: member name {!r} contains NUL".format(name))
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_length:
        raise UnsafeArchiveError("archive refused: member name longer than {} bytes".format(limits.max_path_length))
    if name.startswith("/"):
        raise UnsafeArchiveError("archive refused: member {!r} has an absolute path".format(name))
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError("archive refused: member {!r} contains '..'".format(name))
    return parts


def check_symlink_target(parts: List[str], target: str) -> None:
    """Refuse a relative symlink target that climbs above the layer root from the link's directory.

    Absolute targets are left alone: they name a path inside the container's root, and nothing
    here ever follows a link.
    """
    if "\x00" in target or target == "":
        raise UnsafeArchiveError("archive refused: symlink {!r} has an empty or NUL target".format("/".join(parts)))
    if target.startswith("/"):
        return
    depth = len(parts) - 1
    for component in target.split("/"):
        if component == "..":
            depth -= 1
            if depth < 0:
                raise UnsafeArchiveError("archive refused: symlink {!r} -> {!r} points outside the layer"
                                         .format("/".join(parts), target))
        elif component not in ("", "."):
            depth += 1


class _Extractor:
    """One extraction: the root fd, a one-entry cache of the last parent directory, and stats."""

    def __init__(self, root: str, limits: Limits, allow_devices: bool) -> None:
        self.root = root
        self.limits = limits
        self.allow_devices = allow_devices
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.stats = ExtractStats()
        self.dir_times: Dict[Tuple[str, ...], Tuple[int, int, int, float]] = {}
        self._cached: Optional[Tuple[Tuple[str, ...], int]] = None

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root_fd)

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def parent_fd(self, parents: List[str]) -> int:
        """An fd on the directory ``parents`` (created 0755 as needed), never through a symlink."""
        key = tuple(parents)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        self._drop_cache()
        fd = os.dup(self.root_fd)
        for index, component in enumerate(parents):
            fd = self._step(fd, component, parents[:index + 1])  # closes the fd it was given, even on error
        self._cached = (key, fd)
        return fd

    def _step(self, fd: int, component: str, so_far: List[str]) -> int:
        """Open (creating if missing) one directory below ``fd``; closes ``fd``."""
        try:
            try:
                child = os.open(component, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(component, 0o755, dir_fd=fd)
                child = os.open(component, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeArchiveError("archive refused: path {!r} goes through a symlink or a non-directory"
                                         .format("/".join(so_far))) from exc
            raise
        finally:
            os.close(fd)
        return child

    def existing(self, fd: int, name: str) -> Optional[os.stat_result]:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def clear_for(self, fd: int, name: str, parts: List[str], is_dir: bool) -> bool:
        """Make room for a new member at ``name``. Returns True if a directory is already there (keep it).

        A later member replaces an earlier non-directory (tar semantics); replacing a directory
        with something else is refused rather than deleting a tree on an archive's say-so.
        """
        current = self.existing(fd, name)
        if current is None:
            return False
        if stat.S_ISDIR(current.st_mode):
            if is_dir:
                return True
            raise UnsafeArchiveError("archive refused: member {!r} would replace a directory".format("/".join(parts)))
        os.unlink(name, dir_fd=fd)
        return False


def extract_layer(stream: IO[bytes], target: str, limits: Limits = Limits(), allow_devices: bool = False,
                  hasher: Optional["hashlib._Hash"] = None) -> ExtractStats:
    """Unpack the uncompressed tar ``stream`` into the empty directory ``target``.

    ``hasher`` receives every byte of the stream, trailing padding included, so the caller can
    compare it with the layer's diff id. Raises ``UnsafeArchiveError`` for anything refused; the
    caller then discards ``target`` whole.
    """
    reader = BoundedReader(stream, limits.max_bytes, hasher)
    extractor = _Extractor(target, limits, allow_devices)
    tarinfo_class = type("LimitedTarInfo", (_LimitedTarInfo,), {"max_header_bytes": limits.max_header_bytes})
    try:
        try:
            archive = tarfile.open(fileobj=reader, mode="r|", tarinfo=tarinfo_class)  # type: ignore[call-overload]
        except tarfile.ReadError as exc:
            raise UnsafeArchiveError("layer is not a tar archive: {}".format(exc)) from exc
        with archive:
            try:
                for member in archive:
                    _extract_member(extractor, archive, member)
            except tarfile.TarError as exc:
                raise UnsafeArchiveError("layer is a damaged tar archive: {}".format(exc)) from exc
        reader.drain()
        extractor.stats.stream_bytes = reader.count
        _apply_dir_times(extractor)
    except EOFError as exc:
        raise UnsafeArchiveError("layer is truncated: {}".format(exc)) from exc
    finally:
        extractor.close()
    return extractor.stats


def _extract_member(ex: _Extractor, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """Check one member against the limits and the path rules, then create it."""
    ex.stats.entries += 1
    if ex.stats.entries > ex.limits.max_entries:
        raise UnsafeArchiveError("archive refused: more than {} entries".format(ex.limits.max_entries))
    if member.isreg() and ex.stats.bytes + member.size > ex.limits.max_bytes:
        raise UnsafeArchiveError("archive refused: member {!r} declares {} bytes, over the {} byte limit"
                                 .format(member.name, member.size, ex.limits.max_bytes))
    parts = split_member_path(member.name, ex.limits)
    if not parts:
        if member.isdir():
            ex.dir_times[()] = (member.uid, member.gid, member.mode, float(member.mtime))
            return
        raise UnsafeArchiveError("archive refused: a non-directory member names the layer root")
    base = parts[-1]
    if base == OPAQUE_MARKER:
        _make_opaque(ex, parts[:-1])
    elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return  # other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs): meaningless here
    elif base.startswith(WHITEOUT_PREFIX):
        _make_whiteout(ex, parts[:-1] + [base[len(WHITEOUT_PREFIX):]])
    else:
        _create(ex, archive, member, parts)


def _create(ex: _Extractor, archive: tarfile.TarFile, member: tarfile.TarInfo, parts: List[str]) -> None:
    """Create one ordinary member (file, directory, link, FIFO or permitted device)."""
    fd = ex.parent_fd(parts[:-1])
    name = parts[-1]
    if member.isdir():
        replaces_whiteout = _is_whiteout(ex.existing(fd, name))
        if not ex.clear_for(fd, name, parts, True):
            os.mkdir(name, 0o700, dir_fd=fd)
        if replaces_whiteout:
            _make_opaque(ex, parts)  # deleted then recreated in this layer: nothing below may show through
            fd = ex.parent_fd(parts[:-1])
        ex.dir_times[tuple(parts)] = (member.uid, member.gid, member.mode, float(member.mtime))
        return
    if member.isdev() and not member.isfifo() and not ex.allow_devices:
        raise UnsafeArchiveError("archive refused: device node {!r} (allowed only for privileged containers)"
                                 .format("/".join(parts)))
    if member.islnk():
        _hard_link(ex, member, parts, fd)
        return
    if not (member.isreg() or member.issym() or member.isdev()):
        raise UnsafeArchiveError("archive refused: member {!r} has unsupported type {!r}".format(member.name, member.type))
    ex.clear_for(fd, name, parts, False)
    if member.isreg():
        _write_file(ex, archive, member, fd, name)
        return
    if member.issym():
        check_symlink_target(parts, member.linkname)
        os.symlink(member.linkname, name, dir_fd=fd)
    elif member.isfifo():
        os.mkfifo(name, 0o600, dir_fd=fd)
    else:
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=fd)
        ex.stats.devices += 1
        ex.stats.devices_list.append("/".join(parts))
    _set_owner_mode_time(fd, name, member)


def _write_file(ex: _Extractor, archive: tarfile.TarFile, member: tarfile.TarInfo, fd: int, name: str) -> None:
    """Copy a regular file's data into a file created with O_EXCL|O_NOFOLLOW, then set its metadata."""
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
    try:
        source = archive.extractfile(member)
        written = 0
        while source is not None:
            chunk = source.read(COPY_CHUNK)
            if not chunk:
                break
            os.write(out, chunk)
            written += len(chunk)
        if written != member.size:
            raise UnsafeArchiveError("layer is truncated in {!r}".format(member.name))
        ex.stats.files += 1
        ex.stats.bytes += written
        os.fchown(out, member.uid, member.gid)
        os.fchmod(out, member.mode & 0o7777)
        _set_xattrs_fd(out, member)
        os.utime(out, (float(member.mtime), float(member.mtime)))
    finally:
        os.close(out)


def _hard_link(ex: _Extractor, member: tarfile.TarInfo, parts: List[str], fd: int) -> None:
    """Link to an earlier member of this layer, reached without following any symlink."""
    target_parts = split_member_path(member.linkname, ex.limits)
    if not target_parts:
        raise UnsafeArchiveError("archive refused: hard link {!r} targets the layer root".format(member.name))
    name = parts[-1]
    ex.clear_for(fd, name, parts, False)
    source_fd = os.open(".", _DIR_FLAGS, dir_fd=ex.parent_fd(target_parts[:-1]))
    try:
        found = ex.existing(source_fd, target_parts[-1])
        if found is None or stat.S_ISDIR(found.st_mode):
            raise UnsafeArchiveError("archive refused: hard link {!r} -> {!r} does not name an earlier file in the layer"
                                     .format(member.name, member.linkname))
        destination_fd = ex.parent_fd(parts[:-1])
        os.link(target_parts[-1], name, src_dir_fd=source_fd, dst_dir_fd=destination_fd, follow_symlinks=False)
    finally:
        os.close(source_fd)


def _make_whiteout(ex: _Extractor, parts: List[str]) -> None:
    """``.wh.NAME`` -> a 0/0 character device, overlayfs's whiteout.

    The OCI spec says a whiteout hides only lower layers: if this layer already holds NAME, the
    whiteout is dropped; if NAME comes later, it replaces the whiteout (tar order).
    """
    if parts[-1] in ("", ".", "..") or parts[-1].startswith(WHITEOUT_PREFIX):
        raise UnsafeArchiveError("archive refused: invalid whiteout for {!r}".format("/".join(parts)))
    fd = ex.parent_fd(parts[:-1])
    current = ex.existing(fd, parts[-1])
    if current is not None:
        if stat.S_ISDIR(current.st_mode):
            _make_opaque(ex, parts)  # this layer's directory stays, the lower one's contents go
        return
    os.mknod(parts[-1], stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=fd)
    ex.stats.whiteouts += 1


def _is_whiteout(info: Optional[os.stat_result]) -> bool:
    return info is not None and stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(0, 0)


def _make_opaque(ex: _Extractor, parts: List[str]) -> None:
    """``DIR/.wh..wh..opq`` -> ``trusted.overlay.opaque=y`` on DIR: lower layers' DIR contents are hidden."""
    fd = ex.parent_fd(parts)
    os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
    ex.stats.opaque_dirs += 1


def _set_owner_mode_time(fd: int, name: str, member: tarfile.TarInfo) -> None:
    """Numeric owner, mode (after chown, which clears setuid) and mtime, never following a symlink."""
    os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
    if not member.issym():
        os.chmod(name, member.mode & 0o7777, dir_fd=fd)
    os.utime(name, (float(member.mtime), float(member.mtime)), dir_fd=fd, follow_symlinks=False)


def _set_xattrs_fd(out: int, member: tarfile.TarInfo) -> None:
    """Apply the pax ``SCHILY.xattr.*`` records we trust (file capabilities) to an open file."""
    for key, value in (member.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr.") and key[len("SCHILY.xattr."):] in KEPT_XATTRS:
            raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            os.setxattr(out, key[len("SCHILY.xattr."):], raw)


def _apply_dir_times(ex: _Extractor) -> None:
    """Directory owner, mode and mtime last, deepest first: creating children changes a parent's mtime."""
    ex._drop_cache()
    for parts in sorted(ex.dir_times, key=len, reverse=True):
        uid, gid, mode, mtime = ex.dir_times[parts]
        if parts:
            dir_fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=ex.parent_fd(list(parts[:-1])))
        else:
            dir_fd = os.dup(ex.root_fd)
        try:
            os.fchown(dir_fd, uid, gid)
            os.fchmod(dir_fd, mode & 0o7777)
            os.utime(dir_fd, (mtime, mtime))
        finally:
            os.close(dir_fd)
