"""docker:// pulls through skopeo from a real local registry (Debian's docker-registry).

The registry listens on 127.0.0.1 only, on a free port, with its storage in a temporary
directory and a configuration file written here; it is started and stopped by the module
fixture. Images are built here from /bin/busybox and pushed with skopeo; nothing is downloaded.
The registry's request log is read to prove what a pull did or did not fetch.
"""
from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import time
from typing import Iterator

import pytest

from ansible_collections.daemonless.oci.plugins.module_utils.image import ImageStore
from ansible_collections.daemonless.oci.plugins.module_utils.image_source import ImageError, host_platform
from ansible_collections.daemonless.oci.plugins.module_utils.procutil import run_command, wait_child
from ansible_collections.daemonless.oci.tests.tools.ocilayout import LayoutBuilder, busybox_layers, busybox_path, sha256

REGISTRY_CONFIG = """version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_log(path: str, needle: str, proc: "subprocess.Popen[bytes]", timeout: float) -> None:
    """Wait until the registry logs ``needle`` (it logs 'listening on' once the socket is bound).

    The log is a file, so there is no pipe to poll; the wait re-reads it every 20 ms and gives up
    early if the registry died.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, errors="replace") as handle:
            if needle in handle.read():
                return
        if proc.poll() is not None:
            break
        select.select([], [], [], 0.02)
    with open(path, errors="replace") as handle:
        pytest.fail("docker-registry did not start: {}".format(handle.read()[-2000:]))


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[dict]:
    if os.geteuid() != 0:
        pytest.skip("needs root: unpacking layers sets owners and makes whiteout devices")
    binary = shutil.which("docker-registry")
    if not binary:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    if not busybox_path():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    base = str(tmp_path_factory.mktemp("registry"))
    port = free_port()
    config = os.path.join(base, "config.yml")
    with open(config, "w") as handle:
        handle.write(REGISTRY_CONFIG.format(storage=os.path.join(base, "storage"), port=port))
    log_path = os.path.join(base, "registry.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen([binary, "serve", config], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_log(log_path, "listening on", proc, 30)
        yield {"host": "127.0.0.1:{}".format(port), "base": base, "log": log_path}
    finally:
        proc.terminate()
        if wait_child(proc, 10) is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def pushed(registry) -> dict:
    """The busybox image pushed as bb:1, and a two-platform index pushed as bb:multi."""
    layout = LayoutBuilder(os.path.join(registry["base"], "layout"))
    layers = busybox_layers(busybox_path())
    single = layout.image(list(layers), tag="latest")
    host = host_platform()
    mine = layout.image(list(layers), tag=None, add_to_index=False, config={"Cmd": ["mine"]},
                        platform={"os": "linux", "architecture": host.architecture})
    other = layout.image([layers[0]], tag=None, add_to_index=False, architecture="s390x", config={"Cmd": ["s390x"]},
                         platform={"os": "linux", "architecture": "s390x"})
    layout.nested_index([other, mine], tag="multi")
    push = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    run_command(push + ["oci:{}:latest".format(layout.path), "docker://{}/bb:1".format(registry["host"])], timeout=120)
    run_command(push + ["--all", "oci:{}:multi".format(layout.path), "docker://{}/bb:multi".format(registry["host"])],
                timeout=120)
    return {"single": single, "mine": mine, "layers": layers, "layout": layout.path}


def remote_digest(registry, reference: str) -> str:
    raw = run_command(["skopeo", "inspect", "--raw", "--tls-verify=false",
                       "docker://{}/{}".format(registry["host"], reference)], timeout=60).stdout
    return sha256(raw)


def blob_gets(registry) -> int:
    with open(registry["log"], errors="replace") as handle:
        return sum(1 for line in handle if '"GET /v2/bb/blobs/' in line)


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "images"))


def test_pull_verifies_and_keeps_the_registry_digest(registry, pushed, store):
    reference = "docker://{}/bb:1".format(registry["host"])
    record = store.import_image(reference, tls_verify=False)
    assert record.changed and record.names == [reference]
    assert record.manifest_digest == remote_digest(registry, "bb:1")
    assert [layer.diff_id for layer in record.layers] == [sha256(layer) for layer in pushed["layers"]]
    assert os.path.isfile(os.path.join(record.layer_dirs[0], "bin", "busybox"))
    assert os.listdir(os.path.join(store.root, "tmp")) == []  # skopeo's copy is gone


def test_second_pull_downloads_nothing(registry, pushed, store):
    reference = "docker://{}/bb:1".format(registry["host"])
    start = blob_gets(registry)
    first = store.import_image(reference, tls_verify=False)
    before = blob_gets(registry)
    assert before >= start + 3  # config + two layers: the log does show downloads
    again = store.import_image(reference, tls_verify=False)
    assert not again.changed and again.manifest_digest == first.manifest_digest
    assert blob_gets(registry) == before


def test_pull_shares_layers_with_a_local_import(registry, pushed, store):
    local = store.import_image("oci:{}:latest".format(pushed["layout"]))
    inodes = [os.stat(path).st_ino for path in local.layer_dirs]
    pulled = store.import_image("docker://{}/bb:1".format(registry["host"]), tls_verify=False)
    assert [os.stat(path).st_ino for path in pulled.layer_dirs] == inodes


def test_manifest_list_resolves_to_this_platform(registry, pushed, store):
    record = store.import_image("docker://{}/bb:multi".format(registry["host"]), tls_verify=False)
    assert record.config.cmd == ["mine"]
    assert record.platform == "linux/" + host_platform().architecture


def test_unknown_tag_is_a_clear_error(registry, pushed, store):
    with pytest.raises(ImageError, match="cannot inspect docker://.*/bb:nope: skopeo says: .*manifest unknown"):
        store.import_image("docker://{}/bb:nope".format(registry["host"]), tls_verify=False)


def test_tls_verification_is_on_by_default(registry, pushed, store):
    with pytest.raises(ImageError, match="skopeo says: .*(http response to HTTPS|https)"):
        store.import_image("docker://{}/bb:1".format(registry["host"]))
