#!/usr/bin/env bash
# crun 1.8.1 refuses a hybrid cgroup layout whose cgroup2 mount lists controllers (this machine
# kind lists hugetlb). This makes a private mount namespace in which that one file reads empty,
# pins it to DIR/mnt, and writes DIR/crun, a wrapper that runs crun inside it. Host mounts seen by
# other processes are unchanged apart from the private bind mount of DIR itself.
#   crun-private-ns.sh setup DIR     -> prints the wrapper's path
#   crun-private-ns.sh teardown DIR
set -euo pipefail
action=$1 dir=$2
controllers=/sys/fs/cgroup/unified/cgroup.controllers
case $action in
setup)
  mkdir -p "$dir"
  if ! mountpoint -q "$dir"; then mount --bind "$dir" "$dir"; mount --make-private "$dir"; fi
  : > "$dir/empty"; touch "$dir/mnt"
  if [ -e "$controllers" ]; then
    unshare --mount="$dir/mnt" --propagation slave mount --bind "$dir/empty" "$controllers"
  else
    unshare --mount="$dir/mnt" --propagation slave true
  fi
  crun=$(command -v crun)
  printf '#!/bin/sh\nexec nsenter --mount=%s/mnt -- %s "$@"\n' "$dir" "$crun" > "$dir/crun"
  chmod 755 "$dir/crun"
  echo "$dir/crun"
  ;;
teardown)
  umount "$dir/mnt" 2>/dev/null || true
  umount "$dir" 2>/dev/null || true
  ;;
esac
