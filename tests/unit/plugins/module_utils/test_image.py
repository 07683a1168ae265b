"""image + image_source: reading layouts and archives, platform choice, digest checks, the store, gc.

Every image is built here from /bin/busybox (busybox-static) or from a few bytes; nothing is
downloaded. The store unpacks layers (owners, whiteout devices), so these tests run as root.
"""
from __future__ import annotations

import fcntl
import gzip
import json
import os
import shutil
import tempfile
import time

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.errors import MissingDependencyError
from ansible_collections.daemonless.oci.plugins.module_utils.image import (
    ImageInUseError,
    ImageStore,
    ImageUnknownError,
    apply_image_defaults,
    env_to_dict,
    image_defaults,
)
from ansible_collections.daemonless.oci.plugins.module_utils.image_source import (
    DigestMismatchError,
    ImageError,
    Platform,
    host_platform,
    parse_source,
)
from ansible_collections.daemonless.oci.plugins.module_utils.safe_tar import Limits, UnsafeArchiveError
from ansible_collections.daemonless.oci.tests.tools.ocilayout import (
    LAYER_TAR,
    LayoutBuilder,
    TarBuilder,
    busybox_layers,
    busybox_path,
    docker_archive,
    sha256,
    tar_directory,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: unpacking sets owners and makes whiteout devices")


@pytest.fixture(scope="module")
def bb_layers():
    path = busybox_path()
    if not path:
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    return busybox_layers(path)


@pytest.fixture
def layout(tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "layout"))
    builder.descriptor = builder.image(list(bb_layers), tag="latest")
    return builder


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "store"))


def store_entries(store, *parts):
    path = os.path.join(store.root, *parts)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def assert_nothing_partial(store):
    assert store_entries(store, "layers", "sha256") == []
    assert store_entries(store, "tmp") == []
    assert store_entries(store, "images", "sha256") == []


# --- sources -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, transport, path, tag", [
    ("oci:/srv/img", "oci", "/srv/img", ""),
    ("oci:/srv/img:v1", "oci", "/srv/img", "v1"),
    ("oci-archive:/srv/a.tar:latest", "oci-archive", "/srv/a.tar", "latest"),
    ("docker-archive:/srv/d.tar:bb:latest", "docker-archive", "/srv/d.tar", "bb:latest"),
    ("docker://127.0.0.1:5000/bb:1", "docker", "127.0.0.1:5000/bb:1", ""),
])
def test_parse_source(text, transport, path, tag):
    spec = parse_source(text)
    assert (spec.transport, spec.path, spec.tag) == (transport, path, tag)


@pytest.mark.parametrize("text", ["oci:relative/path", "tarball:/x", "/srv/img", "oci:/x:", "docker://"])
def test_parse_source_refuses(text):
    with pytest.raises(ImageError):
        parse_source(text)


def test_host_platform_matching():
    host = host_platform()
    assert host.os == "linux" and host.architecture
    assert Platform("linux", "arm64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert Platform("linux", "arm", "v7").matches({"os": "linux", "architecture": "arm", "variant": "v7"})
    assert not Platform("linux", "arm", "v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert not Platform("linux", "amd64").matches({"os": "windows", "architecture": "amd64"})


# --- importing ---------------------------------------------------------------------------------

def test_import_layout_verifies_and_records(store, layout, bb_layers):
    record = store.import_image("oci:{}:latest".format(layout.path))
    assert record.changed
    assert record.manifest_digest == layout.descriptor["digest"]
    assert [layer.diff_id for layer in record.layers] == [sha256(layer) for layer in bb_layers]
    assert record.names == ["oci:{}:latest".format(layout.path)]
    assert record.platform == "linux/amd64"
    assert [os.path.basename(os.path.dirname(d)) for d in record.layer_dirs] == [
        sha256(layer).split(":")[1] for layer in bb_layers]
    assert os.path.isfile(os.path.join(record.layer_dirs[0], "bin", "busybox"))
    info = store.layer_info(record.layers[1].diff_id)
    assert (info["whiteouts"], info["opaque_dirs"], info["compression"]) == (1, 1, "gzip")
    assert store.get(record.manifest_digest).manifest_digest == record.manifest_digest
    assert store.get(record.config_digest).manifest_digest == record.manifest_digest
    assert store_entries(store, "tmp") == []


def test_info_facts(store, layout, bb_layers):
    record = store.import_image("oci:" + layout.path, name="bb")
    info = store.list()[0].to_info(used_by=["c2", "c1"])
    assert info["names"] == ["bb"] and info["containers"] == ["c1", "c2"]
    assert info["id"] == record.config_digest and info["manifest_digest"] == layout.descriptor["digest"]
    assert info["layers"] == [sha256(layer) for layer in bb_layers]
    assert info["size"] == sum(layer["size"] for layer in json.load(
        open(layout.blob_path(layout.descriptor["digest"])))["layers"])
    assert info["unpacked_size"] == sum(store.layer_info(d)["bytes"] for d in info["layers"]) > 1000000


def test_import_is_idempotent_by_digest(store, layout):
    first = store.import_image("oci:" + layout.path)
    inode = os.stat(first.layer_dirs[0]).st_ino
    again = store.import_image("oci:" + layout.path)
    assert not again.changed
    assert os.stat(again.layer_dirs[0]).st_ino == inode
    renamed = store.import_image("oci:" + layout.path, name="bb")
    assert renamed.changed and renamed.manifest_digest == first.manifest_digest
    assert sorted(store.get("bb").names) == sorted(["bb", "oci:" + layout.path])


def test_name_moves_to_the_new_image(store, tmp_path, bb_layers):
    one = LayoutBuilder(str(tmp_path / "one"))
    one.image(list(bb_layers))
    two = LayoutBuilder(str(tmp_path / "two"))
    two.image([bb_layers[0]], config={"Cmd": ["other"]})
    first = store.import_image("oci:" + one.path, name="app")
    second = store.import_image("oci:" + two.path, name="app")
    assert store.get("app").manifest_digest == second.manifest_digest != first.manifest_digest
    assert store.get(first.manifest_digest).names == []
    assert second.layer_dirs[0] == first.layer_dirs[0]  # the shared base layer was not unpacked twice


def test_uncompressed_and_compressed_forms_share_layers(store, tmp_path, bb_layers):
    gz = LayoutBuilder(str(tmp_path / "gz"))
    gz.image(list(bb_layers), compress=True)
    raw = LayoutBuilder(str(tmp_path / "raw"))
    raw.image(list(bb_layers), compress=False)
    a = store.import_image("oci:" + gz.path)
    before = os.stat(a.layer_dirs[0]).st_ino
    b = store.import_image("oci:" + raw.path)
    assert a.manifest_digest != b.manifest_digest
    assert b.layer_dirs == a.layer_dirs and os.stat(b.layer_dirs[0]).st_ino == before


def test_oci_archive(store, layout, tmp_path):
    archive = tar_directory(layout.path, str(tmp_path / "bb.tar"))
    record = store.import_image("oci-archive:{}:latest".format(archive))
    assert record.manifest_digest == layout.descriptor["digest"]
    assert os.path.isfile(os.path.join(record.layer_dirs[1], "opaque", "new"))


def test_docker_archive_is_deterministic(store, tmp_path, bb_layers):
    archive = docker_archive(list(bb_layers), str(tmp_path / "d.tar"), "bb:1")
    first = store.import_image("docker-archive:" + archive)
    second = store.import_image("docker-archive:{}:bb:1".format(archive))
    assert first.manifest_digest == second.manifest_digest
    assert second.names == sorted(["docker-archive:" + archive, "docker-archive:{}:bb:1".format(archive)])
    assert [store.layer_info(layer.diff_id)["compression"] for layer in first.layers] == ["none", "none"]
    assert first.config_digest == sha256(open(os.path.join(os.path.dirname(first.layer_dirs[0]), "..", "..", "..",
                                                           "blobs", "sha256", first.config_digest[7:]), "rb").read())
    assert [layer.diff_id for layer in first.layers] == [sha256(layer) for layer in bb_layers]
    with pytest.raises(ImageError, match="no image tagged 'bb:2'"):
        store.import_image("docker-archive:{}:bb:2".format(archive))


def test_docker_archive_with_a_linked_repeated_layer(store, tmp_path, bb_layers):
    extra = TarBuilder().file("extra", b"e").bytes()
    archive = docker_archive([bb_layers[0], extra, bb_layers[0]], str(tmp_path / "rep.tar"))
    record = store.import_image("docker-archive:" + archive)
    assert [layer.diff_id for layer in record.layers] == [sha256(bb_layers[0]), sha256(extra), sha256(bb_layers[0])]
    assert record.layer_dirs[0] == record.layer_dirs[2]
    assert len(store_entries(store, "layers", "sha256")) == 2


def test_index_resolves_host_platform(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "multi"))
    host = host_platform()
    mine = builder.image(list(bb_layers), tag=None, add_to_index=False,
                         platform={"os": "linux", "architecture": host.architecture})
    other = builder.image([bb_layers[0]], tag=None, add_to_index=False, architecture="s390x",
                          platform={"os": "linux", "architecture": "s390x"})
    builder.nested_index([other, mine], tag="multi")
    record = store.import_image("oci:{}:multi".format(builder.path))
    assert record.manifest_digest == mine["digest"]


def test_index_without_host_platform_refused(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "foreign"))
    a = builder.image([bb_layers[0]], tag=None, add_to_index=False, architecture="s390x",
                      platform={"os": "linux", "architecture": "s390x"})
    b = builder.image([bb_layers[0]], tag=None, add_to_index=False, architecture="riscv64",
                      platform={"os": "linux", "architecture": "riscv64"})
    builder.nested_index([a, b], tag="x")
    with pytest.raises(ImageError, match="no image for this host's platform .*linux/riscv64, linux/s390x"):
        store.import_image("oci:{}:x".format(builder.path))
    assert_nothing_partial(store)


def test_config_for_another_architecture_refused(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "arm"))
    builder.image([bb_layers[0]], architecture="arm64" if host_platform().architecture != "arm64" else "amd64")
    with pytest.raises(ImageError, match="this host is linux/"):
        store.import_image("oci:" + builder.path)


def test_tag_selection_and_ambiguity(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "tags"))
    builder.image([bb_layers[0]], tag="a")
    b = builder.image([bb_layers[0]], tag="b", config={"Cmd": ["b"]})
    assert store.import_image("oci:{}:b".format(builder.path)).manifest_digest == b["digest"]
    with pytest.raises(ImageError, match="no image tagged 'c'"):
        store.import_image("oci:{}:c".format(builder.path))
    with pytest.raises(ImageError, match="2 images and none says its platform; name one with a tag"):
        store.import_image("oci:" + builder.path)


# --- verification failures leave nothing behind ------------------------------------------------

def _tamper(path, offset=-100):
    with open(path, "r+b") as handle:
        handle.seek(offset, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_layer_digest_mismatch(store, layout):
    manifest = json.load(open(layout.blob_path(layout.descriptor["digest"])))
    _tamper(layout.blob_path(manifest["layers"][0]["digest"]), offset=-10)  # gzip trailer: content may even unpack
    with pytest.raises(ImageError, match="does not match|cannot be read|unpacks to"):
        store.import_image("oci:" + layout.path)
    assert_nothing_partial(store)


def test_layer_with_wrong_diff_id(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "lie"))
    builder.image([bb_layers[0]], rootfs={"type": "layers", "diff_ids": [sha256(b"something else")]})
    with pytest.raises(DigestMismatchError, match="but the image config says"):
        store.import_image("oci:" + builder.path)
    assert_nothing_partial(store)


def test_declared_size_mismatch(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "size"))
    descriptor = builder.image([bb_layers[1]], compress=False)
    manifest = json.load(open(builder.blob_path(descriptor["digest"])))
    with open(builder.blob_path(manifest["layers"][0]["digest"]), "ab") as handle:
        handle.write(b"\0" * 1024)  # extra bytes after the blob: digest and size both wrong now
    with pytest.raises(DigestMismatchError, match="larger than its declared"):
        store.import_image("oci:" + builder.path)
    assert_nothing_partial(store)


def test_manifest_and_config_are_verified(store, layout):
    manifest_path = layout.blob_path(layout.descriptor["digest"])
    manifest = json.load(open(manifest_path))
    config_path = layout.blob_path(manifest["config"]["digest"])
    original = open(config_path, "rb").read()
    open(config_path, "wb").write(original.replace(b"echo hello", b"echo HELLO"))
    with pytest.raises(DigestMismatchError, match=manifest["config"]["digest"]):
        store.import_image("oci:" + layout.path)
    open(config_path, "wb").write(original)
    _tamper(manifest_path, offset=-3)
    with pytest.raises(DigestMismatchError, match=layout.descriptor["digest"]):
        store.import_image("oci:" + layout.path)
    assert_nothing_partial(store)


def test_zstd_layers_refused_clearly(store, tmp_path, bb_layers):
    builder = LayoutBuilder(str(tmp_path / "zstd"))
    descriptor = builder.image([bb_layers[1]], compress=False)
    manifest_path = builder.blob_path(descriptor["digest"])
    manifest = json.load(open(manifest_path))
    manifest["layers"][0]["mediaType"] = LAYER_TAR + "+zstd"
    builder.manifests = []
    new = builder.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    builder.manifests.append(new)
    builder.write_index()
    with pytest.raises(ImageError, match="zstd.*standard library cannot decompress"):
        store.import_image("oci:" + builder.path)
    assert_nothing_partial(store)


def test_hostile_layer_leaves_no_partial_layer(store, tmp_path, bb_layers):
    hostile = TarBuilder().file("ok", b"fine").symlink("evil", "/etc").file("evil/passwd", b"pwned").bytes()
    builder = LayoutBuilder(str(tmp_path / "hostile"))
    builder.image([bb_layers[0], hostile])
    with pytest.raises(UnsafeArchiveError, match="goes through a symlink"):
        store.import_image("oci:" + builder.path)
    assert_nothing_partial(store)  # the base layer unpacked fine but is not committed without its image


def test_size_limit_applies_to_store(tmp_path, bb_layers):
    store = ImageStore(str(tmp_path / "small"), limits=Limits(max_bytes=1 << 20))
    builder = LayoutBuilder(str(tmp_path / "bb"))
    builder.image(list(bb_layers))
    with pytest.raises(UnsafeArchiveError, match="1048576"):
        store.import_image("oci:" + builder.path)
    assert_nothing_partial(store)


def test_device_layers_need_allow_devices(store, tmp_path, bb_layers):
    devices = TarBuilder().dir("dev").device("dev/null", major=1, minor=3).bytes()
    builder = LayoutBuilder(str(tmp_path / "dev"))
    builder.image([bb_layers[0], devices])
    with pytest.raises(UnsafeArchiveError, match="device node 'dev/null'"):
        store.import_image("oci:" + builder.path)
    record = store.import_image("oci:" + builder.path, allow_devices=True)
    assert record.has_devices
    with pytest.raises(UnsafeArchiveError, match="holds device nodes"):
        store.import_image("oci:" + builder.path)


def test_missing_skopeo_is_a_clear_error(store, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no skopeo on this PATH
    with pytest.raises(MissingDependencyError, match="needs skopeo"):
        store.import_image("docker://127.0.0.1:1/none:latest")


# --- defaults ------------------------------------------------------------------------------

def test_image_defaults_and_merge(store, layout):
    record = store.import_image("oci:" + layout.path)
    defaults = image_defaults(record)
    assert defaults == {"entrypoint": ["/bin/sh", "-c"], "command": ["echo hello"],
                        "env": {"PATH": "/bin:/usr/bin", "A": "1"}, "workdir": "/tmp", "user": "0:0",
                        "stop_signal": "SIGQUIT", "labels": {"org.example.role": "test"}}
    merged = apply_image_defaults({}, defaults)
    assert merged["argv"] == ["/bin/sh", "-c", "echo hello"] and merged["stop_signal"] == "SIGQUIT"
    merged = apply_image_defaults({"command": ["echo bye"], "env": {"A": "2"}, "labels": {"x": "y"}}, defaults)
    assert merged["argv"] == ["/bin/sh", "-c", "echo bye"]
    assert merged["env"] == {"PATH": "/bin:/usr/bin", "A": "2"}
    assert merged["labels"] == {"org.example.role": "test", "x": "y"}
    merged = apply_image_defaults({"entrypoint": ["/bin/true"], "workdir": "/", "user": "1000",
                                   "stop_signal": "SIGINT"}, defaults)
    assert merged["argv"] == ["/bin/true"]  # a playbook entrypoint drops the image's command
    assert (merged["workdir"], merged["user"], merged["stop_signal"]) == ("/", "1000", "SIGINT")
    assert apply_image_defaults({"entrypoint": [], "command": ["/bin/true"]}, defaults)["argv"] == ["/bin/true"]
    assert apply_image_defaults({"command": []}, defaults)["argv"] == ["/bin/sh", "-c"]
    assert apply_image_defaults({}, {})["workdir"] == "/" and apply_image_defaults({}, {})["stop_signal"] == "SIGTERM"


def test_env_to_dict():
    assert env_to_dict(["A=1", "B=x=y", "A=2", "C", "=bad"]) == {"A": "2", "B": "x=y", "C": ""}


# --- removal and gc --------------------------------------------------------------------------

def test_remove_refused_while_in_use_then_forced(store, layout):
    record = store.import_image("oci:" + layout.path, name="bb")
    with pytest.raises(ImageInUseError, match="used by container\\(s\\) c1"):
        store.remove("bb", in_use_by=["c1"])
    assert store.remove("bb", force=True, in_use_by=["c1"]) == ["bb"]
    assert store.find("bb") is None
    kept = store.get(record.manifest_digest)
    assert all(os.path.isdir(path) for path in kept.layer_dirs)  # c1 still mounts these
    report = store.gc(in_use=[record.manifest_digest])
    assert report.layers == [] and os.path.isdir(kept.layer_dirs[0])
    report = store.gc()
    assert report.records == [record.manifest_digest]
    assert sorted(report.layers) == sorted(layer.diff_id for layer in record.layers)
    assert store.list() == [] and store_entries(store, "layers", "sha256") == []
    assert store_entries(store, "blobs", "sha256") == []


def test_remove_keeps_layers_shared_with_another_image(store, tmp_path, bb_layers):
    one = LayoutBuilder(str(tmp_path / "one"))
    one.image(list(bb_layers))
    two = LayoutBuilder(str(tmp_path / "two"))
    two.image([bb_layers[0]], config={"Cmd": ["two"]})
    a = store.import_image("oci:" + one.path, name="a")
    b = store.import_image("oci:" + two.path, name="b")
    store.remove("a")
    assert store.find(a.manifest_digest) is None
    assert not os.path.exists(a.layer_dirs[1]) and os.path.isdir(b.layer_dirs[0])
    with pytest.raises(ImageUnknownError):
        store.remove("a")


def test_gc_removes_abandoned_work_but_not_live_work(store, layout):
    store.import_image("oci:" + layout.path)
    abandoned = tempfile.mkdtemp(prefix="work-", dir=os.path.join(store.root, "tmp"))
    os.makedirs(os.path.join(abandoned, "half-a-layer", "diff"))
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))  # its import died an hour ago
    just_made = tempfile.mkdtemp(prefix="work-", dir=os.path.join(store.root, "tmp"))  # not flocked yet
    live = tempfile.mkdtemp(prefix="work-", dir=os.path.join(store.root, "tmp"))
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running import holds on its work directory
    try:
        report = store.gc()
        assert report.tmp == [os.path.basename(abandoned)]
        assert os.path.isdir(live) and os.path.isdir(just_made) and not os.path.exists(abandoned)
        assert len(store.list()) == 1 and report.layers == []
    finally:
        os.close(fd)
        shutil.rmtree(live)


def test_gc_drops_orphan_layers(store, layout):
    record = store.import_image("oci:" + layout.path)
    orphan = os.path.join(store.root, "layers", "sha256", "ab" * 32)
    os.makedirs(os.path.join(orphan, "diff"))
    assert store.gc().layers == ["sha256:" + "ab" * 32]
    assert all(os.path.isdir(path) for path in record.layer_dirs)


def test_get_unknown(store):
    with pytest.raises(ImageUnknownError, match="no image 'nope'"):
        store.get("nope")
    assert store.list() == [] and store.gc().layers == []


def test_gzip_garbage_is_an_image_error(store, tmp_path):
    builder = LayoutBuilder(str(tmp_path / "bad"))
    bad_gzip = gzip.compress(b"x" * 1000)[:-8] + b"\0" * 8  # a wrong CRC trailer
    descriptor = builder.blob(bad_gzip, LAYER_TAR + "+gzip")
    config = builder.blob(json.dumps({"os": "linux", "architecture": host_platform().architecture,
                                      "rootfs": {"diff_ids": [sha256(b"x" * 1000)]}}).encode(),
                          "application/vnd.oci.image.config.v1+json")
    manifest = builder.blob(json.dumps({"schemaVersion": 2, "config": config, "layers": [descriptor]}).encode(),
                            "application/vnd.oci.image.manifest.v1+json")
    builder.manifests.append(manifest)
    builder.write_index()
    with pytest.raises((ImageError, UnsafeArchiveError)):
        store.import_image("oci:" + builder.path)
    assert_nothing_partial(store)
