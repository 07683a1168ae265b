"""A container's root filesystem: an overlay of its image's layers plus its own writable layer.

The image layers (``ImageStore`` layer directories) are the read-only lower directories, shared
by every container of the image; each container gets ``upper/`` and ``work/`` under its own
persistent directory. Creating a container therefore copies nothing: it makes three empty
directories and one mount.

Why the ``mount(2)`` system call through ctypes rather than ``/bin/mount``: it is one system call
instead of a fork and exec of util-linux (which then re-parses the option string and may consult
``/etc/fstab`` and helpers), its errors come back as an errno we can explain, and it works the same
on hosts whose ``mount`` binary differs. libc is always present where containers run.

The option string is limited to one page (``getconf PAGESIZE``, 4096 bytes here) by the kernel,
and with 64-hex-digit layer names each absolute lower directory costs ~100 bytes. The mount
therefore names lower directories *relative to the store's layer directory* (``<hex>/diff``, 70
bytes each) after a ``chdir`` there, which raises the limit from about 38 to about 55 layers on a
4 KiB page. Beyond that the mount is refused with an error that says so (the kernel's own
stacking limit is 500). A layer listed twice (the same diff id at two depths, as some builders
emit for empty layers) is kept only at its topmost position: overlayfs refuses a repeated lower
directory (ELOOP), and the topmost copy re-applies everything the lower copy did.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from typing import List, Optional, Sequence

from ansible_collections.daemonless.oci.plugins.module_utils.errors import OciError

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
_libc = None


class OverlayError(OciError):
    """The overlay root could not be mounted or unmounted."""


def _c_library() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """``mount(2)``; an ``OSError`` carrying errno on failure."""
    libc = _c_library()
    result = libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                        data.encode() if data else None)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def sys_umount(target: str, flags: int = 0) -> None:
    """``umount2(2)``; an ``OSError`` carrying errno on failure."""
    result = _c_library().umount2(target.encode(), ctypes.c_int(flags))
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def rootfs_paths(container_dir: str) -> dict:
    """Where a container's writable layer and mount point live, under its persistent directory."""
    return {"upper": os.path.join(container_dir, "overlay", "upper"),
            "work": os.path.join(container_dir, "overlay", "work"),
            "rootfs": os.path.join(container_dir, "rootfs")}


def unique_top_first(layer_dirs: Sequence[str]) -> List[str]:
    """Bottom-to-top layer list -> overlay order (top first), keeping only each layer's topmost copy."""
    seen = set()
    ordered = []
    for path in reversed(list(layer_dirs)):
        if path not in seen:
            seen.add(path)
            ordered.append(path)
    return ordered


def overlay_options(lower_top_first: Sequence[str], upper: str, work: str, base: Optional[str]) -> str:
    """The mount data string; lower directories are made relative to ``base`` when they lie under it."""
    lowers = []
    for path in lower_top_first:
        if base and os.path.dirname(os.path.dirname(path)) == base:
            lowers.append(os.path.relpath(path, base))
        else:
            lowers.append(path)
    return "lowerdir={},upperdir={},workdir={}".format(":".join(lowers), upper, work)


def max_layers(upper: str, work: str, hex_len: int = 64) -> int:
    """How many store layers fit in one mount on this host (for reports and early errors)."""
    fixed = len(overlay_options([], upper, work, None))
    per_layer = hex_len + len("/diff") + 1
    return (page_size() - 1 - fixed + 1) // per_layer


def is_mountpoint(path: str) -> bool:
    """True if ``path`` is the target of a mount in this namespace (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", "r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape(fields[4]) == real:
                return True
    return False


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8", "replace") \
        if "\\" in text else text


def mount_overlay(layer_dirs: Sequence[str], container_dir: str, base: Optional[str] = None,
                  target: Optional[str] = None) -> str:
    """Mount the overlay root for ``container_dir`` and return the mount point (idempotent).

    ``layer_dirs`` run bottom to top (``ImageRecord.layer_dirs``); ``base`` is the store's
    ``layers_base()`` so the option string stays short. An already mounted root is returned as is.
    """
    if not layer_dirs:
        raise OverlayError("an overlay root needs at least one image layer")
    paths = rootfs_paths(container_dir)
    mountpoint = target or paths["rootfs"]
    lowers = unique_top_first(layer_dirs)
    os.makedirs(paths["work"], mode=0o700, exist_ok=True)
    if not os.path.isdir(paths["upper"]):
        _make_upper(paths["upper"], lowers[0])
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    if is_mountpoint(mountpoint):
        return mountpoint
    for path in lowers + [paths["upper"], paths["work"]]:
        if any(ch in path for ch in ",:\\"):
            raise OverlayError("overlay directory {!r} contains ',', ':' or '\\', which the mount options "
                               "cannot express".format(path))
    options = overlay_options(lowers, paths["upper"], paths["work"], base)
    if len(options.encode()) >= page_size():
        raise OverlayError("the image has {} layers: the overlay options take {} bytes, over the kernel's {} byte "
                           "limit (about {} layers fit); flatten the image".format(
                               len(lowers), len(options.encode()), page_size(),
                               max_layers(paths["upper"], paths["work"])))
    _mount_from(base, mountpoint, options)
    return mountpoint


def _make_upper(upper: str, top_layer: str) -> None:
    """Create the writable layer with the owner and mode of the image's root directory.

    The merged root directory takes its attributes from the upper directory, so an upper made
    0700 would make the container's ``/`` unreadable to every non-root user in it.
    """
    info = os.stat(top_layer)
    os.makedirs(os.path.dirname(upper), mode=0o700, exist_ok=True)
    os.mkdir(upper, 0o700)
    os.chown(upper, info.st_uid, info.st_gid)
    os.chmod(upper, info.st_mode & 0o7777)


def _mount_from(base: Optional[str], mountpoint: str, options: str) -> None:
    """Mount with the working directory at ``base`` (relative lower dirs resolve from it), then restore it."""
    previous = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if base:
            os.chdir(base)
        try:
            sys_mount("overlay", mountpoint, "overlay", 0, options)
        except OSError as exc:
            raise OverlayError("cannot mount the overlay root at {}: {} (options: {})".format(
                mountpoint, exc.strerror, options[:300])) from exc
    finally:
        os.fchdir(previous)
        os.close(previous)


def unmount_rootfs(container_dir: str, target: Optional[str] = None) -> bool:
    """Unmount the container's root if mounted; True if something was unmounted (idempotent).

    A busy mount (a process still has its cwd inside) is detached lazily instead of failing:
    the caller is removing the container, and the kernel frees the mount when the last user goes.
    """
    mountpoint = target or rootfs_paths(container_dir)["rootfs"]
    if not os.path.isdir(mountpoint) or not is_mountpoint(mountpoint):
        return False
    try:
        sys_umount(mountpoint, UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            sys_umount(mountpoint, MNT_DETACH | UMOUNT_NOFOLLOW)
        elif exc.errno != errno.EINVAL:
            raise OverlayError("cannot unmount {}: {}".format(mountpoint, exc.strerror)) from exc
    return True


def remove_rootfs(container_dir: str, target: Optional[str] = None) -> None:
    """Unmount and delete the writable layer and the mount point: the container's changes are gone."""
    unmount_rootfs(container_dir, target)
    paths = rootfs_paths(container_dir)
    shutil.rmtree(os.path.join(container_dir, "overlay"), ignore_errors=True)
    mountpoint = target or paths["rootfs"]
    if os.path.isdir(mountpoint) and not is_mountpoint(mountpoint):
        os.rmdir(mountpoint)


def mount_rootfs(record: "object", container_dir: str, store_base: Optional[str] = None,
                 target: Optional[str] = None) -> str:
    """Mount an ``ImageRecord``'s layers as the container's root; returns the root path."""
    layer_dirs = getattr(record, "layer_dirs")
    base = store_base
    if base is None and layer_dirs:
        base = os.path.dirname(os.path.dirname(layer_dirs[0]))
    return mount_overlay(layer_dirs, container_dir, base, target)
