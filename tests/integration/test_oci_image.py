"""oci_image through real ansible-playbook runs: import, idempotence, check mode, info, removal, gc.

Images are built by hand from the busybox binary (tests/tools/ocilayout.py); nothing is downloaded.
A container "uses" an image the way the library records it: ``extras["image"]`` carries the image
identity (image_glue.image_identity) and its root is the image's overlay (image_glue.image_rootfs).
"""
from __future__ import annotations

import os

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.image_glue import (
    IDENTITY_KEY,
    image_identity,
    image_rootfs,
    merged_settings,
    store_for,
)
from ansible_collections.daemonless.oci.plugins.module_utils.manager import CreateRequest
from ansible_collections.daemonless.oci.plugins.module_utils.oci_spec import default_spec
from ansible_collections.daemonless.oci.tests.tools.ocilayout import LayoutBuilder, busybox_layers, busybox_path

MODULE = "daemonless.oci.oci_image"
INFO = "daemonless.oci.oci_image_info"


@pytest.fixture
def layouts(env):
    busybox = busybox_path()
    if not busybox:
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    if "overlay" not in open("/proc/filesystems").read():
        pytest.skip("the kernel has no overlay filesystem (modprobe overlay)")
    base, top = busybox_layers(busybox)
    one = LayoutBuilder(os.path.join(env.root, "layout-one"))
    one.image([base, top])
    two = LayoutBuilder(os.path.join(env.root, "layout-two"))
    two.image([base, top], config={"Cmd": ["echo two"]})
    return {"one": "oci:" + one.path, "two": "oci:" + two.path}


def _task(env, module=MODULE, **params):
    """The module's task with the test's private roots (the image modules are not in the action group yet)."""
    params.update(env.defaults)
    return {module: params}


def _store_files(env):
    found = set()
    for directory, dirs, names in os.walk(os.path.join(env.persist_root, "images")):
        found.update(os.path.join(directory, name) for name in names + dirs if name != "lock")
    return found


def test_import_idempotence_check_mode_and_info(env, layouts):
    first, again = env.play([_task(env, name="bb", source=layouts["one"])] * 2)
    assert first["changed"] is True and again["changed"] is False, (first, again)
    digest = first["image"]["manifest_digest"]
    assert again["image"]["manifest_digest"] == digest and first["image"]["names"] == ["bb"]
    assert len(first["image"]["layers"]) == 2 and first["image"]["unpacked_size"] > 500000
    before = _store_files(env)
    same, moved = env.play([_task(env, name="bb", source=layouts["one"]),
                            _task(env, name="bb", source=layouts["two"])], check=True, diff=True)
    assert same["changed"] is False and moved["changed"] is True, (same, moved)
    assert moved["diff"]["before"]["manifest_digest"] == digest
    assert moved["diff"]["after"]["manifest_digest"] != digest
    assert _store_files(env) == before, "check mode wrote to the store"
    listing = env.play([_task(env, INFO)])[0]
    assert listing["changed"] is False
    assert [(i["names"], i["manifest_digest"], i["containers"]) for i in listing["images"]] == [(["bb"], digest, [])]
    assert listing["images"][0]["size"] > 0


def _use(env, name, ref):
    """A stopped-but-created container made from the image through the library, as the lead's source will."""
    store = store_for(env.persist_root)
    record = store.get(ref)
    container_dir = os.path.join(env.root, "ctr", name)
    os.makedirs(container_dir)
    rootfs = image_rootfs(record, container_dir, env.persist_root)
    settings = merged_settings({"command": ["sleep 30"]}, record)
    spec = default_spec(rootfs, settings["argv"], cwd=settings["workdir"],
                        env=["{}={}".format(k, v) for k, v in settings["env"].items()])
    return env.manager().create(CreateRequest(name=name, spec=spec, handler="runc",
                                              extras={IDENTITY_KEY: image_identity(record, ref)}))


def test_absent_refused_while_used_then_forced_then_gc(env, layouts):
    imported = env.play([_task(env, name="bb", source=layouts["one"]),
                         _task(env, name="other", source=layouts["two"])])
    digest = imported[0]["image"]["manifest_digest"]
    container = _use(env, "user1", "bb")
    listing = env.play([_task(env, INFO, name="bb")])[0]
    assert listing["images"][0]["containers"] == ["user1"]
    refused = env.play([_task(env, name="bb", state="absent")], expect_failure=True)[0]
    assert refused.get("failed") and "user1" in refused["msg"], refused
    checked = env.play([_task(env, name="bb", state="absent")], check=True, expect_failure=True)[0]
    assert checked.get("failed") and "user1" in checked["msg"], checked
    assert store_for(env.persist_root).find("bb") is not None
    forced = env.play([_task(env, name="bb", state="absent", force=True, gc=True)])[0]
    assert forced["changed"] and forced["removed"] == ["bb"] and forced["used_by"] == ["user1"], forced
    assert forced["gc"]["records"] == [], "an image in use lost its record"
    store = store_for(env.persist_root)
    record = store.get(digest)  # still there by digest, unnamed, layers intact for the container
    assert record.names == [] and all(os.path.isdir(path) for path in record.layer_dirs)
    manager = env.manager()
    manager.remove(container, timeout=0)
    predicted = env.play([_task(env, state="absent", gc=True)], check=True)[0]
    assert predicted["changed"] and predicted["gc"]["records"] == [digest], predicted
    assert store.find(digest) is not None, "check mode gc removed the record"
    collected, idle, listing = env.play([_task(env, state="absent", gc=True)] * 2 + [_task(env, INFO)])
    assert collected["gc"]["records"] == [digest] and collected["changed"] is True
    assert idle["changed"] is False and idle["gc"]["records"] == [] and idle["gc"]["layers"] == []
    assert [i["names"] for i in listing["images"]] == [["other"]]
    # the other image shares the base layer: it survived, its own top layer too
    other = store.get("other")
    assert all(os.path.isdir(path) for path in other.layer_dirs)


def test_absent_unknown_is_no_change_and_bad_source_fails(env, layouts):
    gone, bad, empty = env.play([_task(env, name="nothing", state="absent"),
                                 _task(env, name="x", source="oci:relative/path"),
                                 _task(env, INFO, name="nothing")], expect_failure=True)
    assert gone["changed"] is False and gone["removed"] == [] and empty["images"] == []
    assert bad.get("failed") and "absolute" in bad["msg"], bad


def test_container_module_record_counts_as_use(env, layouts):
    """A container made by oci_container's ``image:`` source is found through its own record (extras["dloci"])."""
    imported = env.play([_task(env, name="bb", source=layouts["one"])])[0]
    container_task = {"name": "web", "image": "bb", "command": ["sleep", "30"], "state": "created"}
    made = env.play([{"daemonless.oci.oci_container": container_task}])[0]
    if made.get("failed"):
        pytest.fail("oci_container with image: failed: {}".format(made.get("msg")))
    listing, refused = env.play([_task(env, INFO, name="bb"), _task(env, name="bb", state="absent")],
                                expect_failure=True)
    assert listing["images"][0]["containers"] == ["web"]
    assert listing["images"][0]["manifest_digest"] == imported["image"]["manifest_digest"]
    assert refused.get("failed") and "web" in refused["msg"], refused
