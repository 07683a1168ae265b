#!/usr/bin/env bash
# The main job: install what is needed, then declare a small service on this host with the collection
# (examples/main.yml: a busybox httpd on a loopback port, a one-shot job, a container with resource limits),
# show it with oci_container_info, and run the playbook a second time to show that nothing changes.
# Run as root on Debian 12. Remove what it made with: scripts/main.sh --cleanup
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }
venv=$(bash "$repo/scripts/setup.sh" | tail -n 1)
export PATH="$venv/bin:$PATH" ANSIBLE_NOCOLOR=1
export ANSIBLE_COLLECTIONS_PATH
ANSIBLE_COLLECTIONS_PATH=$(bash "$repo/scripts/dev-env.sh")
cd "$repo/examples"
if [ "${1:-}" = "--cleanup" ]; then
  exec ansible-playbook -i localhost, -c local main.yml -e example_state=absent
fi
echo "### first run: creates and starts the containers"
ansible-playbook -i localhost, -c local main.yml
echo "### second run: must report no change"
out=$(ansible-playbook -i localhost, -c local main.yml | tee /dev/stderr)
echo "$out" | grep -Eq 'changed=0 +unreachable=0 +failed=0' || { echo "second run changed something" >&2; exit 1; }
echo "### idempotent: the second run changed nothing"
