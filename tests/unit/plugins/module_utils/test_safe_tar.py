"""safe_tar: layers unpack faithfully, and every hostile archive is refused without touching the host.

Archives are built member by member in the tests (tests/tools/ocilayout.py). Extraction creates
devices and sets owners, so these tests run as root (they skip otherwise).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.safe_tar import (
    OVERLAY_OPAQUE_XATTR,
    BoundedReader,
    Limits,
    UnsafeArchiveError,
    check_symlink_target,
    extract_layer,
    split_member_path,
)
from ansible_collections.daemonless.oci.tests.tools.ocilayout import FIXED_MTIME, TarBuilder

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: extraction sets owners and makes whiteout devices")


def extract(data: bytes, target: str, **kwargs: object):
    os.makedirs(target, exist_ok=True)
    return extract_layer(io.BytesIO(data), target, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def layer_dir(tmp_path):
    return str(tmp_path / "layer")


@pytest.fixture
def outside(tmp_path):
    """A directory next to the layer that no archive may touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_text("original\n")
    return path


# --- faithful unpacking -----------------------------------------------------------------------

def test_files_dirs_links_owners_modes_and_times(layer_dir):
    data = (TarBuilder().dir("./").dir("etc", 0o750, uid=7, gid=8).file("etc/conf", b"x" * 5000, 0o640, uid=1000, gid=1001)
            .file("usr/bin/su", b"#!", 0o4755).symlink("etc/link", "conf").symlink("abs", "/etc/conf")
            .hardlink("etc/hard", "etc/conf").fifo("run.fifo").bytes())
    stats = extract(data, layer_dir)
    conf = os.stat(os.path.join(layer_dir, "etc/conf"))
    assert (conf.st_uid, conf.st_gid, stat.S_IMODE(conf.st_mode), conf.st_size) == (1000, 1001, 0o640, 5000)
    assert conf.st_mtime == FIXED_MTIME
    etc = os.stat(os.path.join(layer_dir, "etc"))
    assert (etc.st_uid, etc.st_gid, stat.S_IMODE(etc.st_mode), etc.st_mtime) == (7, 8, 0o750, FIXED_MTIME)
    assert stat.S_IMODE(os.stat(os.path.join(layer_dir, "usr/bin/su")).st_mode) == 0o4755
    assert os.readlink(os.path.join(layer_dir, "etc/link")) == "conf"
    assert os.readlink(os.path.join(layer_dir, "abs")) == "/etc/conf"
    assert os.stat(os.path.join(layer_dir, "etc/hard")).st_ino == conf.st_ino
    assert stat.S_ISFIFO(os.lstat(os.path.join(layer_dir, "run.fifo")).st_mode)
    assert (stats.entries, stats.files, stats.bytes) == (8, 2, 5002)


def test_hasher_sees_the_whole_stream(layer_dir):
    data = TarBuilder().file("a", b"hello").bytes()
    hasher = hashlib.sha256()
    stats = extract(data, layer_dir, hasher=hasher)
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert stats.stream_bytes == len(data)


def test_whiteout_becomes_overlay_char_device(layer_dir):
    stats = extract(TarBuilder().dir("etc").file("etc/.wh.passwd").bytes(), layer_dir)
    info = os.lstat(os.path.join(layer_dir, "etc/passwd"))
    assert stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(0, 0)
    assert not os.path.exists(os.path.join(layer_dir, "etc/.wh.passwd"))
    assert stats.whiteouts == 1 and stats.devices == 0


def test_opaque_marker_becomes_xattr(layer_dir):
    stats = extract(TarBuilder().dir("var").file("var/.wh..wh..opq").file("var/kept", b"k").bytes(), layer_dir)
    assert os.getxattr(os.path.join(layer_dir, "var"), OVERLAY_OPAQUE_XATTR) == b"y"
    assert os.listdir(os.path.join(layer_dir, "var")) == ["kept"]
    assert stats.opaque_dirs == 1


def test_whiteout_does_not_hide_same_layer_file(layer_dir):
    extract(TarBuilder().file("a", b"mine").file(".wh.a").file(".wh.b").file("b", b"later").bytes(), layer_dir)
    with open(os.path.join(layer_dir, "a")) as handle:
        assert handle.read() == "mine"
    with open(os.path.join(layer_dir, "b")) as handle:
        assert handle.read() == "later"


def test_whiteout_and_directory_in_one_layer_make_it_opaque(layer_dir):
    extract(TarBuilder().file(".wh.a").dir("a").file("a/new").dir("b").file("b/new").file(".wh.b").bytes(), layer_dir)
    for name in ("a", "b"):
        assert os.getxattr(os.path.join(layer_dir, name), OVERLAY_OPAQUE_XATTR) == b"y"
        assert os.listdir(os.path.join(layer_dir, name)) == ["new"]


def test_later_member_replaces_earlier_file(layer_dir):
    extract(TarBuilder().file("a", b"one").symlink("a", "target").bytes(), layer_dir)
    assert os.readlink(os.path.join(layer_dir, "a")) == "target"


def test_capability_xattr_kept_trusted_xattr_dropped(layer_dir):
    capability = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    pax = {"SCHILY.xattr.security.capability": capability, "SCHILY.xattr.trusted.overlay.redirect": "/etc"}
    data = TarBuilder().file("ping", b"p", 0o755, pax=pax).bytes()
    extract(data, layer_dir)
    path = os.path.join(layer_dir, "ping")
    assert "security.capability" in os.listxattr(path)
    assert "trusted.overlay.redirect" not in os.listxattr(path)


def test_devices_only_when_allowed(layer_dir):
    data = TarBuilder().device("dev/null", tarfile.CHRTYPE, 1, 3).bytes()
    with pytest.raises(UnsafeArchiveError, match="device node 'dev/null'"):
        extract(data, layer_dir)
    stats = extract(data, layer_dir + "2", allow_devices=True)
    assert os.lstat(os.path.join(layer_dir + "2", "dev/null")).st_rdev == os.makedev(1, 3)
    assert stats.devices_list == ["dev/null"]


# --- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("builder, message", [
    (lambda t, o: t.file(str(o / "victim"), b"pwned"), "absolute path"),
    (lambda t, o: t.file("../outside/victim", b"pwned"), "contains '..'"),
    (lambda t, o: t.file("a/../../outside/victim", b"pwned"), "contains '..'"),
    (lambda t, o: t.symlink("escape", "../outside"), "points outside the layer"),
    (lambda t, o: t.dir("d").symlink("d/escape", "../../outside/victim"), "points outside the layer"),
    (lambda t, o: t.symlink("evil", str(o)).file("evil/victim", b"pwned"), "goes through a symlink"),
    (lambda t, o: t.symlink("evil", "."). file("evil/x", b"x"), "goes through a symlink"),
    (lambda t, o: t.hardlink("hard", "../outside/victim"), "contains '..'"),
    (lambda t, o: t.hardlink("hard", str(o / "victim")), "absolute path"),
    (lambda t, o: t.symlink("s", str(o)).hardlink("hard", "s/victim"), "goes through a symlink"),
    (lambda t, o: t.hardlink("hard", "never-seen"), "does not name an earlier file"),
    (lambda t, o: t.device("sda", tarfile.BLKTYPE, 8, 0), "device node"),
    (lambda t, o: t.dir("d").file("d/f").file("d", b"x"), "would replace a directory"),
    (lambda t, o: t.dir("d").hardlink("h", "d"), "does not name an earlier file"),
    (lambda t, o: t.file(".."), "contains '..'"),
    (lambda t, o: t.file(".wh."), "invalid whiteout"),
])
def test_hostile_member_refused_and_host_untouched(tmp_path, layer_dir, outside, builder, message):
    data = builder(TarBuilder(), outside).bytes()
    with pytest.raises(UnsafeArchiveError, match=message):
        extract(data, layer_dir)
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "original\n"
    assert os.stat(outside / "victim").st_nlink == 1


def test_huge_declared_size_refused_before_reading(layer_dir):
    info = tarfile.TarInfo("big")
    info.size = 100 << 30  # 100 GiB declared, nothing follows
    data = TarBuilder().raw_header(info).bytes()
    with pytest.raises(UnsafeArchiveError, match="declares 107374182400 bytes"):
        extract(data, layer_dir, limits=Limits(max_bytes=1 << 30))
    assert os.listdir(layer_dir) == []


def test_entry_count_limit(layer_dir):
    builder = TarBuilder()
    for number in range(101):
        builder.file("f{}".format(number))
    with pytest.raises(UnsafeArchiveError, match="more than 100 entries"):
        extract(builder.bytes(), layer_dir, limits=Limits(max_entries=100))


def test_decompressed_byte_limit_stops_a_bomb(layer_dir):
    data = TarBuilder().file("zeros", b"\0" * (4 << 20)).bytes()
    with pytest.raises(UnsafeArchiveError, match="over the 1048576 byte limit|more than 1048576 bytes"):
        extract(data, layer_dir, limits=Limits(max_bytes=1 << 20))


def test_endless_stream_is_cut(layer_dir):
    class Endless:
        """A stream of tar-looking zero blocks that never ends (what a crafted gzip bomb produces)."""

        def read(self, size=-1):
            return b"\0" * (size if size and size > 0 else 65536)

    reader = BoundedReader(Endless(), 1 << 20)
    with pytest.raises(UnsafeArchiveError, match="more than 1048576 bytes"):
        reader.drain()


def test_oversized_pax_header_refused_before_it_is_read(layer_dir):
    data = TarBuilder().file("f", b"x", pax={"comment": "c" * 300000}).bytes()
    with pytest.raises(UnsafeArchiveError, match="metadata header declares"):
        extract(data, layer_dir, limits=Limits(max_header_bytes=65536))


def test_long_path_refused(layer_dir):
    with pytest.raises(UnsafeArchiveError, match="longer than 100 bytes"):
        extract(TarBuilder().file("d/" * 60 + "f").bytes(), layer_dir, limits=Limits(max_path_length=100))


def test_truncated_and_garbage_streams(layer_dir):
    data = TarBuilder().file("a", b"x" * 10000).bytes()
    with pytest.raises(UnsafeArchiveError, match="truncated|damaged"):
        extract(data[:3000], layer_dir)
    with pytest.raises(UnsafeArchiveError, match="not a tar archive|damaged"):
        extract(b"\x01" * 2048, layer_dir + "2")


# --- pure helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, parts", [
    ("./", []), (".", []), ("a/b/", ["a", "b"]), ("./a//./b", ["a", "b"]), ("..a/b..", ["..a", "b.."]),
])
def test_split_member_path(name, parts):
    assert split_member_path(name, Limits()) == parts


def test_nul_in_name_refused():
    # tarfile itself cuts names at NUL when parsing, so this guard is for the direct callers
    with pytest.raises(UnsafeArchiveError, match="NUL"):
        split_member_path("a\x00b", Limits())


@pytest.mark.parametrize("parts, target, ok", [
    (["a"], "b", True), (["a"], "/anything/../at/all", True), (["d", "l"], "../x", True),
    (["l"], "../x", False), (["d", "l"], "../../x", False), (["d", "l"], "./.././../x", False),
    (["d", "l"], "y/../../x", True), (["d", "l"], "", False),
])
def test_check_symlink_target(parts, target, ok):
    if ok:
        check_symlink_target(parts, target)
    else:
        with pytest.raises(UnsafeArchiveError):
            check_symlink_target(parts, target)
