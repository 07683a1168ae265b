#!/usr/bin/env python
"""Report what the test containers left behind: processes, mounts, cgroups, files.

Usage: leftovers.py --id ID ... --name NAME ... --path PATH ...
A process counts when its command line names a container id (conmon -c ID, the runtimes' init and
exec processes); a mount when its line in mountinfo names an id or a test container's name; a cgroup
when a directory below /sys/fs/cgroup is named after an id; a file when a given path still exists.
Prints a JSON report and exits 1 when anything is left.
"""
import argparse
import json
import os
import sys


def processes(ids):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/{}/cmdline".format(entry), "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if "leftovers.py" in cmdline:  # this check itself and the shell that started it
            continue
        if any(cid in cmdline for cid in ids):
            found.append("{}: {}".format(entry, cmdline.strip()))
    return found


def mounts(ids, names):
    needles = list(ids) + ["/{}/".format(name) for name in names] + ["/{}".format(name) for name in names]
    with open("/proc/self/mountinfo", "r", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    return [line for line in lines if any(needle in line.split(" - ")[0] for needle in needles)]


def cgroups(ids):
    found = []
    for root, dirs, _files in os.walk("/sys/fs/cgroup"):
        for directory in dirs:
            if any(cid in directory for cid in ids):
                found.append(os.path.join(root, directory))
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", action="append", default=[])
    parser.add_argument("--name", action="append", default=[])
    parser.add_argument("--path", action="append", default=[])
    args = parser.parse_args()
    ids = [cid for cid in args.id if cid]
    report = {
        "processes": processes(ids) if ids else [],
        "mounts": mounts(ids, args.name),
        "cgroups": cgroups(ids) if ids else [],
        "files": [path for path in args.path if os.path.lexists(path)],
    }
    print(json.dumps(report, indent=1, sort_keys=True))
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
