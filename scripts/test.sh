#!/usr/bin/env bash
# Installs what is needed (scripts/setup.sh) and runs the tests, as root, on a fresh Debian 12 machine.
#
#   scripts/test.sh             everything CI runs: sanity, lint, unit + functional + integration tests (real
#                               conmon, runc, crun, runsc, containerd shim) and the testbed's own tests, then
#                               the molecule scenarios default (this host), distros (Debian 12, 13, unstable in
#                               containers) and vm-bookworm (one real VM, Debian 12 under qemu)
#   scripts/test.sh --fast      the everyday subset: the pytest stage only (a few minutes)
#   scripts/test.sh --vm-matrix the whole matrix: also the Debian 13 VM (vm-trixie)
#   scripts/test.sh --no-vm     everything but the VMs
# Each stage's outcome is collected; the last line is "stages: N passed, N failed".
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# A copy of this collection that an earlier molecule prerun installed would shadow the checkout.
rm -rf "${HOME:-/root}/.ansible/collections/ansible_collections/daemonless"
mode=ci
for arg in "$@"; do
  case $arg in
    --fast) mode=fast ;;
    --vm-matrix) mode=matrix ;;
    --no-vm) mode=novm ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root: the tests drive real container runtimes" >&2; exit 2; }

venv=$(bash "$repo/scripts/setup.sh" | tail -n 1) || { echo "setup failed" >&2; exit 1; }
export PATH="$venv/bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH
# the symlink tree that makes this checkout the collection; DLOCI_COLLS lets two checkouts test side by side
export DLOCI_COLLS=${DLOCI_COLLS:-/tmp/dloci-colls}
# plus containers.podman (setup.sh), which molecule's podman driver looks for in this process's own path
ANSIBLE_COLLECTIONS_PATH="$(bash "$repo/scripts/dev-env.sh"):/var/cache/daemonless-oci/collections"
export ANSIBLE_NOCOLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0
logdir=${TEST_LOG_DIR:-/tmp/dloci-test-logs}
mkdir -p "$logdir"

declare -a names results times
run_stage() {  # run_stage NAME COMMAND...
  local name=$1; shift
  local started=$SECONDS
  echo "=== stage $name: $*"
  if "$@"; then results+=(passed); else results+=(failed); fi
  names+=("$name"); times+=($((SECONDS - started)))
  echo "=== stage $name ${results[-1]} in ${times[-1]} s"
}

collection_copy() {  # ansible-test and ansible-lint want .../ansible_collections/daemonless/oci as a real path
  local target=/tmp/dloci-ci/ansible_collections/daemonless/oci
  mkdir -p "$target"
  rsync -a --delete --exclude .git --exclude .helpers --exclude '__pycache__' --exclude tests/output \
    "$repo/" "$target/"
  echo "$target"
}

stage_sanity() {
  local copy; copy=$(collection_copy)
  (cd "$copy" && ansible-test sanity --python 3.11 --color no --skip-test shellcheck)
}

stage_lint() {
  local copy; copy=$(collection_copy)
  local targets=()
  for path in roles examples molecule; do [ -d "$copy/$path" ] && targets+=("$path"); done
  [ ${#targets[@]} -gt 0 ] || { echo "nothing to lint yet"; return 0; }
  (cd "$copy" && ansible-lint --profile production --offline "${targets[@]}")
}

stage_pytest() {
  local paths=()
  for path in tests/unit tests/functional tests/integration testbed/tests; do [ -d "$repo/$path" ] && paths+=("$path"); done
  (cd "$repo" && python3 tests/tools/subreaper.py "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs \
     --durations=15 "${paths[@]}")
}

stage_molecule() {  # stage_molecule SCENARIO...: one run-matrix, which prints a table of what ran and proved
  echo "molecule scenarios run by this stage: $*"
  (cd "$repo" && python3 testbed/run-matrix --echo --run-dir "$logdir/molecule" "$@")
}

run_stage pytest stage_pytest
if [ "$mode" != fast ]; then
  run_stage sanity stage_sanity
  run_stage lint stage_lint
  case $mode in
    ci) scenarios=(default distros vm-bookworm) ;;
    matrix) scenarios=(default distros vm-bookworm vm-trixie) ;;
    *) scenarios=(default distros) ;;
  esac
  run_stage molecule stage_molecule "${scenarios[@]}"
fi

passed=0 failed=0
echo
echo "| stage | result | seconds |"
echo "| --- | --- | --- |"
for i in "${!names[@]}"; do
  echo "| ${names[$i]} | ${results[$i]} | ${times[$i]} |"
  if [ "${results[$i]}" = passed ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
