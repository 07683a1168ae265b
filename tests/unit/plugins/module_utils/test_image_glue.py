"""image_glue and image_module logic on a real store built from small hand-made layers (no root, no mounts)."""
from __future__ import annotations

import os

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError
from ansible_collections.daemonless.oci.plugins.module_utils.image_glue import (
    image_identity,
    merged_settings,
    recorded_digest,
    resolve_image,
    store_for,
)
from ansible_collections.daemonless.oci.plugins.module_utils.image_module import predict_digest, predict_gc
from ansible_collections.daemonless.oci.tests.tools.ocilayout import LayoutBuilder, TarBuilder, tar_directory


def _layout(path: str, message: bytes, **config) -> LayoutBuilder:
    layout = LayoutBuilder(path)
    base = TarBuilder().dir("etc").file("etc/passwd", b"root:x:0:0::/:/bin/sh\n").bytes()
    top = TarBuilder().dir("srv").file("srv/message", message).bytes()
    layout.image([base, top], **config)
    return layout


@pytest.fixture
def roots(tmp_path):
    persist = str(tmp_path / "persist")
    one = _layout(str(tmp_path / "one"), b"one\n")
    two = _layout(str(tmp_path / "two"), b"two\n")
    return {"persist": persist, "one": "oci:" + one.path, "two": "oci:" + two.path, "tmp": tmp_path}


def test_resolve_missing_pulls_once_then_reuses(roots):
    record = resolve_image(roots["persist"], roots["one"], pull="missing")
    assert record.changed and record.names == [roots["one"]]
    again = resolve_image(roots["persist"], roots["one"], pull="missing")
    assert again.manifest_digest == record.manifest_digest and not again.changed


def test_resolve_by_digest_and_never(roots):
    record = resolve_image(roots["persist"], roots["one"], pull="missing")
    assert resolve_image(roots["persist"], record.manifest_digest, pull="never").names == [roots["one"]]
    with pytest.raises(ValidationError, match="not in the image store"):
        resolve_image(roots["persist"], roots["two"], pull="never")
    with pytest.raises(ValidationError, match="import it with"):
        resolve_image(roots["persist"], "unknown:tag", pull="always")
    with pytest.raises(ValidationError, match="pull must be"):
        resolve_image(roots["persist"], roots["one"], pull="sometimes")


def test_resolve_check_mode_writes_nothing(roots):
    assert resolve_image(roots["persist"], roots["one"], pull="always", check_mode=True) is None
    assert not os.path.exists(os.path.join(roots["persist"], "images"))


def test_always_follows_a_new_digest_under_the_same_name(roots, tmp_path):
    source = roots["one"]
    first = resolve_image(roots["persist"], source, pull="always")
    layout_dir = source[len("oci:"):]
    _layout(layout_dir + "-new", b"changed\n")
    os.rename(layout_dir, layout_dir + "-old")
    os.rename(layout_dir + "-new", layout_dir)
    second = resolve_image(roots["persist"], source, pull="always")
    assert second.changed and second.manifest_digest != first.manifest_digest
    assert image_identity(second, source) == {"ref": source, "manifest_digest": second.manifest_digest}
    assert image_identity(first)["manifest_digest"] == first.manifest_digest


def test_predict_digest_matches_import_for_layout_and_archive(roots, tmp_path):
    archive = tar_directory(roots["two"][len("oci:"):], str(tmp_path / "two.tar"))
    predicted = [predict_digest(roots["two"]), predict_digest("oci-archive:" + archive)]
    assert not os.path.exists(os.path.join(roots["persist"], "images"))
    imported = store_for(roots["persist"]).import_image("oci-archive:" + archive)
    assert predicted == [imported.manifest_digest] * 2


def test_merged_settings_playbook_wins(roots):
    record = resolve_image(roots["persist"], roots["one"], pull="missing")
    image_only = merged_settings({}, record)
    assert image_only["argv"] == ["/bin/sh", "-c", "echo hello"]
    assert image_only["env"] == {"PATH": "/bin:/usr/bin", "A": "1"} and image_only["workdir"] == "/tmp"
    assert image_only["stop_signal"] == "SIGQUIT"
    mine = merged_settings({"command": ["echo bye"], "env": {"A": "2"}, "workdir": "/srv"}, record)
    assert mine["argv"] == ["/bin/sh", "-c", "echo bye"] and mine["env"]["A"] == "2" and mine["workdir"] == "/srv"
    assert merged_settings({"entrypoint": ["/bin/true"]}, record)["argv"] == ["/bin/true"]


def test_recorded_digest_reads_both_places():
    assert recorded_digest({"image": {"ref": "a", "manifest_digest": "sha256:1"}}) == "sha256:1"
    assert recorded_digest({"dloci": {"identity": {"image": "a", "manifest_digest": "sha256:2"}}}) == "sha256:2"
    assert recorded_digest({"dloci": {"identity": {"rootfs": "/x"}}}) == ""
    assert recorded_digest({}) == ""


def test_predict_gc_agrees_with_gc(roots):
    store = store_for(roots["persist"])
    one = store.import_image(roots["one"], name="one")
    two = store.import_image(roots["two"], name="two")
    store.remove("one")
    store.remove("two", force=True, in_use_by=["c1"])
    predicted = predict_gc(store, {two.manifest_digest})
    done = store.gc({two.manifest_digest})
    # "one" went with its last name (remove collects at once); "two" is kept while in use
    assert predicted["records"] == done.records == [] and predicted["layers"] == done.layers == []
    assert not os.path.isdir(store.layer_root(one.layers[-1].diff_id))
    predicted = predict_gc(store, set())
    done = store.gc(set())
    assert predicted["records"] == done.records == [two.manifest_digest]
    assert sorted(predicted["layers"]) == sorted(done.layers) and len(done.layers) >= 1
    assert sorted(predicted["blobs"]) == sorted(done.blobs)
