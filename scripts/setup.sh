#!/usr/bin/env bash
# Installs everything the main job and the tests need on a fresh Debian 12 machine (run as root).
# Idempotent and quick when everything is already there.
#   - Debian packages: conmon, runc, crun, runsc, containerd (shim v2), busybox-static, podman and
#     skopeo (comparisons, images), debootstrap + qemu (test VMs), docker-registry (image tests).
#   - A venv with the pinned Python packages of tests/requirements.txt, kept under
#     /var/cache/daemonless-oci and keyed by the requirements' hash.
#   - containers.podman (molecule's podman driver), from the hash-pinned community package.
#   - ansible-test's pip bootstrap, provided from the installed pip (its usual download host is
#     not reachable from the project's machines).
# Prints the venv's path on its last line.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
packages=(conmon runc crun runsc containerd busybox-static podman skopeo debootstrap qemu-system-x86 qemu-utils
          docker-registry openssh-client iproute2 util-linux procps python3-venv python3-pip python-is-python3 git rsync)

log() { echo "setup: $*" >&2; }

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# podman defaults that work on this machine kind (crun 1.8 refuses its hybrid cgroups; no CAP_SYS_RESOURCE for
# high rlimits). Written only if absent, so a host's own choice wins.
if [ ! -e /etc/containers/containers.conf.d/50-daemonless-oci-tests.conf ]; then
  mkdir -p /etc/containers/containers.conf.d
  cat > /etc/containers/containers.conf.d/50-daemonless-oci-tests.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
fi

python=/usr/bin/python3
hash=$(cat "$repo/tests/requirements.txt" | sha256sum | cut -c1-12)
venv=/var/cache/daemonless-oci/venv-$hash
if [ ! -x "$venv/bin/ansible-playbook" ]; then
  log "creating venv $venv"
  rm -rf "$venv.tmp"
  mkdir -p /var/cache/daemonless-oci
  "$python" -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install -q --disable-pip-version-check -r "$repo/tests/requirements.txt" >&2
  # a venv's scripts name their interpreter by path: create in place, then rename, then rewrite shebangs
  mv "$venv.tmp" "$venv"
  grep -rl "$venv.tmp" "$venv/bin" | xargs -r sed -i "s|$venv.tmp|$venv|g"
fi

# containers.podman for molecule's podman driver (molecule/distros) and the podman column of bench/playbook:
# extracted from the hash-pinned community package, since the collection index is not reachable here.
colls=/var/cache/daemonless-oci/collections
if [ ! -f "$colls/ansible_collections/containers/podman/MANIFEST.json" ]; then
  log "installing containers.podman into $colls"
  wheels=$(mktemp -d)
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
    -r "$repo/tests/collections-requirements.txt" -d "$wheels" >&2
  rm -rf "$colls.tmp"
  "$python" - "$wheels"/ansible-*.whl "$colls.tmp" <<'PY'
import sys, zipfile
prefix = "ansible_collections/containers/podman/"
with zipfile.ZipFile(sys.argv[1]) as wheel:   # extract() keeps every member inside the target directory
    for member in wheel.namelist():
        if member.startswith(prefix):
            wheel.extract(member, sys.argv[2])
PY
  rm -rf "$wheels" "$colls"
  mv "$colls.tmp" "$colls"
fi

# ansible-test sanity bootstraps pip in its own venvs from a host we cannot reach; hand it a stand-in
# that bootstraps with ensurepip and installs the pinned packages from the package index instead.
pipv=$("$venv/bin/python" - <<'PY'
import pathlib, re, ansible_test
src = (pathlib.Path(ansible_test.__file__).parent / "_internal/python_requirements.py").read_text()
print(re.search(r"pip='([0-9.]+)'", src).group(1).replace(".", "_"))
PY
)
mkdir -p ~/.ansible/test/cache
cat > ~/.ansible/test/cache/get_pip_$pipv.py <<'PY'
# Stand-in for get-pip.py (written by daemonless.oci's scripts/setup.sh): bootstrap pip with ensurepip, then
# install what ansible-test asked for. Subprocesses on purpose: ensurepip.bootstrap() in-process sets
# PIP_CONFIG_FILE=/dev/null, which would drop this machine's pip configuration.
import subprocess, sys
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"])
subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)
PY
echo "$venv"
