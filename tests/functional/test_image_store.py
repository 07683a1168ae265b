"""The image store with real overlay mounts: merged layers, private writes, shared lower layers, limits.

Images are built here from /bin/busybox (two layers; the top one has a whiteout and an opaque
directory). Programs run inside the mounted roots with chroot and with runc, so what is checked
is what a container process sees. Figures (unpack time, mount time, disk used by 20 roots) are
printed; run with ``-s`` to see them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Iterator, List

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils import overlay
from ansible_collections.daemonless.oci.plugins.module_utils.image import ImageStore
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command
from ansible_collections.daemonless.oci.tests.tools.ocilayout import (
    LayoutBuilder,
    TarBuilder,
    busybox_layers,
    busybox_path,
    sha256,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")


@pytest.fixture(scope="module")
def image_env(tmp_path_factory) -> Iterator[dict]:
    busybox = busybox_path()
    if not busybox:
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    if "overlay" not in open("/proc/filesystems").read():
        pytest.skip("the kernel has no overlay filesystem (modprobe overlay)")
    base = str(tmp_path_factory.mktemp("imgstore"))
    layout = LayoutBuilder(os.path.join(base, "layout"))
    layout.image(list(busybox_layers(busybox)))
    store = ImageStore(os.path.join(base, "persist", "images"))
    started = time.monotonic()
    record = store.import_image("oci:" + layout.path, name="bb")
    elapsed = time.monotonic() - started
    infos = [store.layer_info(layer.diff_id) for layer in record.layers]
    print("\n[figures] busybox image import: {:.3f} s total; layer unpack {} s; entries {}; unpacked bytes {}".format(
        elapsed, [info["unpack_seconds"] for info in infos], [info["entries"] for info in infos], record.unpacked_size))
    env = {"base": base, "store": store, "record": record, "containers": os.path.join(base, "persist", "containers")}
    yield env
    for name in os.listdir(env["containers"]) if os.path.isdir(env["containers"]) else []:
        overlay.remove_rootfs(os.path.join(env["containers"], name))


@pytest.fixture
def containers(image_env) -> Iterator[List[str]]:
    """Container directories made by a test; their roots are unmounted and removed afterwards."""
    made: List[str] = []
    yield made
    for path in made:
        overlay.remove_rootfs(path)


def new_container(image_env, made: List[str], name: str) -> str:
    path = os.path.join(image_env["containers"], name)
    made.append(path)
    return overlay.mount_rootfs(image_env["record"], path)


def in_root(root: str, script: str) -> str:
    return run_command(["chroot", root, "/bin/sh", "-c", script], timeout=30).stdout.decode()


def test_merged_view_applies_whiteouts_and_opaque_dirs(image_env, containers):
    root = new_container(image_env, containers, "merged")
    script = ("cat /etc/motd; test -e /etc/doomed && echo doomed-visible; ls /opaque; ls /keep; "
              "stat -c '%a %u %g' /usr/bin/suid /usr/bin/owned")
    out = in_root(root, script)
    assert out.split("\n") == ["new", "new", "old-a", "old-b", "4755 0 0", "640 1234 5678", ""]


def test_root_is_usable_by_a_non_root_user(image_env, containers):
    root = new_container(image_env, containers, "nonroot")
    assert oct(os.stat(root).st_mode & 0o7777) == oct(os.stat(image_env["record"].layer_dirs[-1]).st_mode & 0o7777)
    result = run_command(["chroot", "--userspec=65534:65534", root, "/bin/sh", "-c", "id -u; cat /etc/motd; ls /keep"],
                         timeout=30)
    assert result.stdout.decode() == "65534\nnew\nold-a\nold-b\n"


def test_two_containers_do_not_see_each_others_writes(image_env, containers):
    first = new_container(image_env, containers, "one")
    second = new_container(image_env, containers, "two")
    in_root(first, "echo mine > /tmp/note; rm /etc/passwd; echo changed > /etc/motd")
    assert in_root(first, "cat /tmp/note /etc/motd; test -e /etc/passwd || echo no-passwd") == "mine\nchanged\nno-passwd\n"
    assert in_root(second, "test -e /tmp/note || echo no-note; cat /etc/motd; head -1 /etc/passwd") == \
        "no-note\nnew\nroot:x:0:0:root:/root:/bin/sh\n"
    lower = image_env["record"].layer_dirs
    assert os.path.isfile(os.path.join(lower[0], "etc", "passwd"))
    with open(os.path.join(lower[1], "etc", "motd")) as handle:
        assert handle.read() == "new\n"
    upper = overlay.rootfs_paths(containers[0])["upper"]
    assert os.stat(os.path.join(upper, "etc", "passwd")).st_rdev == os.makedev(0, 0)  # the delete is a whiteout


def test_twenty_roots_copy_nothing(image_env, containers):
    record = image_env["record"]
    layer_inodes = [os.stat(os.path.join(record.layer_dirs[0], "bin", "busybox")).st_ino]
    started = time.monotonic()
    roots = [new_container(image_env, containers, "many{}".format(n)) for n in range(20)]
    mount_seconds = time.monotonic() - started
    for root in roots:
        assert os.stat(os.path.join(root, "bin", "busybox")).st_size == os.stat(
            os.path.join(record.layer_dirs[0], "bin", "busybox")).st_size
    used = sum(int(line.split()[0]) for line in subprocess.check_output(["du", "-sxk"] + containers).decode().splitlines())
    layers_kb = int(subprocess.check_output(["du", "-sk", os.path.dirname(os.path.dirname(record.layer_dirs[0]))])
                    .decode().split()[0])
    print("\n[figures] 20 overlay roots: mounted in {:.3f} s ({:.1f} ms each); disk used by their directories "
          "{} KiB in total (the image's unpacked layers: {} KiB, shared)".format(
              mount_seconds, mount_seconds * 50, used, layers_kb))
    # each root is six empty directories (container, overlay, upper, work, work/work, rootfs): 4 KiB blocks
    assert used <= 20 * 6 * 4, "each root should cost a few empty directories, not a copy"
    assert used < layers_kb / 4
    assert os.stat(os.path.join(record.layer_dirs[0], "bin", "busybox")).st_ino == layer_inodes[0]


def test_mount_and_unmount_are_idempotent(image_env, containers):
    root = new_container(image_env, containers, "idem")
    assert overlay.mount_rootfs(image_env["record"], containers[0]) == root
    with open("/proc/self/mountinfo") as handle:
        assert sum(1 for line in handle if " {} ".format(root) in line) == 1
    assert overlay.unmount_rootfs(containers[0]) is True
    assert overlay.unmount_rootfs(containers[0]) is False
    assert not overlay.is_mountpoint(root)
    assert new_container(image_env, containers, "idem") == root  # remount keeps the writable layer
    overlay.remove_rootfs(containers[0])
    overlay.remove_rootfs(containers[0])
    assert not os.path.exists(os.path.join(containers[0], "overlay"))


def test_busy_root_is_detached(image_env, containers):
    root = new_container(image_env, containers, "busy")
    holder = subprocess.Popen(["chroot", root, "/bin/sh", "-c", "read x"], stdin=subprocess.PIPE)
    try:
        time.sleep(0.2)  # let the shell settle inside the root (it holds the mount busy)
        assert overlay.unmount_rootfs(containers[0]) is True
        assert not overlay.is_mountpoint(root)
    finally:
        holder.stdin.close()
        holder.wait()


def test_layer_count_limit_of_one_mount(image_env, containers, tmp_path):
    paths = overlay.rootfs_paths(os.path.join(image_env["containers"], "lim-ok"))
    fits = overlay.max_layers(paths["upper"], paths["work"])
    builder = LayoutBuilder(str(tmp_path / "deep"))
    base = TarBuilder().dir("bin").file("bin/busybox", open(busybox_path(), "rb").read(), 0o755).bytes()
    layers = [base] + [TarBuilder().file("l{:03d}".format(n), str(n).encode()).bytes() for n in range(fits)]
    builder.image(layers[:fits], compress=False, tag="fits")
    builder.image(layers[:fits + 1], compress=False, tag="over")
    store = image_env["store"]
    ok = store.import_image("oci:{}:fits".format(builder.path))
    over = store.import_image("oci:{}:over".format(builder.path))
    containers.extend([os.path.join(image_env["containers"], "lim-ok"), os.path.join(image_env["containers"], "lim-over")])
    root = overlay.mount_rootfs(ok, containers[0])
    assert len([name for name in os.listdir(root) if name.startswith("l")]) == fits - 1
    with pytest.raises(overlay.OverlayError, match="{} layers.*over the kernel's {} byte limit \\(about {} layers fit\\)"
                       .format(fits + 1, os.sysconf("SC_PAGE_SIZE"), fits)):
        overlay.mount_rootfs(over, containers[1])
    print("\n[figures] one overlay mount takes at most {} store layers here (page {} bytes)".format(
        fits, os.sysconf("SC_PAGE_SIZE")))


def test_repeated_layer_mounts_once(image_env, containers, tmp_path):
    builder = LayoutBuilder(str(tmp_path / "repeat"))
    bb = TarBuilder().dir("bin").file("bin/busybox", open(busybox_path(), "rb").read(), 0o755).bytes()
    a = TarBuilder().file("f", b"from a\n").bytes()
    b = TarBuilder().file("f", b"from b\n").file("g", b"only b\n").bytes()
    builder.image([bb, a, b, a])
    record = image_env["store"].import_image("oci:" + builder.path)
    containers.append(os.path.join(image_env["containers"], "repeat"))
    root = overlay.mount_rootfs(record, containers[0])
    result = run_command(["chroot", root, "/bin/busybox", "cat", "/f", "/g"], timeout=30)
    assert result.stdout.decode() == "from a\nonly b\n"


def test_runc_runs_a_container_on_the_overlay_root(image_env, containers, tmp_path):
    runc = shutil.which("runc")
    if not runc:
        pytest.skip("runc is not installed")
    root = new_container(image_env, containers, "runc")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    run_command([runc, "spec", "--bundle", str(bundle)], timeout=30)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": root, "readonly": False}
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/sh", "-c", "cat /etc/motd; ls /opaque; echo ok > /tmp/from-runc"]
    (bundle / "config.json").write_text(json.dumps(spec))
    state_root = tmp_path / "runc-root"
    container_id = "img-test-{}".format(os.getpid())
    try:
        result = run_command([runc, "--root", str(state_root), "run", "--bundle", str(bundle), container_id],
                             timeout=60)
    finally:
        run_command([runc, "--root", str(state_root), "delete", "--force", container_id], timeout=30, check=False)
    assert result.stdout.decode() == "new\nnew\n"
    assert open(os.path.join(overlay.rootfs_paths(containers[0])["upper"], "tmp", "from-runc")).read() == "ok\n"


IMPORTER = ("import sys; from ansible_collections.daemonless.oci.plugins.module_utils.image import ImageStore; "
            "print(ImageStore(sys.argv[1]).import_image(sys.argv[2]).manifest_digest)")


def importer(root: str, source: str) -> "subprocess.Popen[bytes]":
    """A separate process running one import, as a concurrent playbook run would."""
    env = dict(os.environ, PYTHONPATH=os.environ["ANSIBLE_COLLECTIONS_PATH"])
    return subprocess.Popen(["/usr/bin/python3", "-c", IMPORTER, root, source], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_concurrent_imports_of_one_image(tmp_path):
    layout = LayoutBuilder(str(tmp_path / "layout"))
    descriptor = layout.image(list(busybox_layers(busybox_path())))
    root = str(tmp_path / "store")
    procs = [importer(root, "oci:" + layout.path) for _unused in range(3)]
    outputs = [proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], [err for _unused, err in outputs]
    assert {out.decode().strip() for out, _unused in outputs} == {descriptor["digest"]}
    assert len(os.listdir(os.path.join(root, "layers", "sha256"))) == 2
    assert os.listdir(os.path.join(root, "tmp")) == []


def unpacking_started(root: str, layer: bytes) -> bool:
    work = os.path.join(root, "tmp")
    partial = os.path.join(sha256(layer).split(":")[1], "diff", "bin", "busybox")
    return os.path.isdir(work) and any(os.path.exists(os.path.join(work, entry, partial)) for entry in os.listdir(work))


def test_killed_import_leaves_no_partial_layer(tmp_path):
    """The layer blob is a FIFO: the importer reads half a layer, blocks, and is killed right there."""
    layout = LayoutBuilder(str(tmp_path / "layout"))
    base, top = busybox_layers(busybox_path())
    descriptor = layout.image([base, top], compress=False)
    manifest = json.load(open(layout.blob_path(descriptor["digest"])))
    blob = layout.blob_path(manifest["layers"][0]["digest"])
    os.unlink(blob)
    os.mkfifo(blob)
    root = str(tmp_path / "store")
    proc = importer(root, "oci:" + layout.path)
    with open(blob, "wb") as fifo:
        fifo.write(base[:len(base) // 2])
        fifo.flush()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not unpacking_started(root, base):
            time.sleep(0.02)  # until the importer has written part of the layer into its work dir
        assert unpacking_started(root, base)
        proc.kill()
        proc.communicate()
    assert os.listdir(os.path.join(root, "layers", "sha256")) == []
    leftovers = os.listdir(os.path.join(root, "tmp"))
    assert len(leftovers) == 1  # the dead import's work dir, with half a layer in it
    store = ImageStore(root)
    old = time.time() - 3600
    os.utime(os.path.join(root, "tmp", leftovers[0]), (old, old))
    assert store.gc().tmp == leftovers
    assert os.listdir(os.path.join(root, "tmp")) == [] and store.list() == []
