#!/usr/bin/env python
"""Read, in one process on the tested host, what tests/test_default.py checks, and print it as JSON.

The verifier reaches the distribution containers through Ansible's podman connection, where every
testinfra command is a separate Ansible run; one probe keeps the verifier at a few calls per host.
It only reads (and runs each boot unit's command with ``status``, which only reads).

Usage: probe.py BASE64_JSON  with {"paths": [...], "read": [...], "units": [...], "config": PATH}
Output: {"config": the runtime configuration (its binaries are stat'ed too),
         "stat": {path: {mode, uid, gid, kind, executable} | null}, "content": {path: text | null},
         "processes": [{pid, comm, args, start_time}], "units": {path: {rc, stdout, stderr} | null}}
"""
import base64
import json
import os
import shlex
import stat
import subprocess
import sys


def stat_path(path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    kind = "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else "other"
    return {"mode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid, "kind": kind,
            "executable": os.access(path, os.X_OK)}


def read(path):
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def processes():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/cmdline".format(entry), "rb") as handle:
                args = [part.decode("utf-8", "replace") for part in handle.read().split(b"\0") if part]
            with open("/proc/{}/stat".format(entry), "r", encoding="utf-8") as handle:
                raw = handle.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        start_time = raw.rsplit(")", 1)[1].split()[19]
        found.append({"pid": int(entry), "comm": comm, "args": args, "start_time": start_time})
    return found


def unit_status(path):
    """Run the unit's ExecStart, with its Environment, as ``status`` instead of ``run``."""
    text = read(path)
    if text is None:
        return None
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    argv = shlex.split(settings["ExecStart"])
    argv[argv.index("run")] = "status"
    env = dict(os.environ)
    key, value = settings["Environment"].split("=", 1)
    env[key] = value
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    return {"rc": done.returncode, "stdout": done.stdout.decode("utf-8", "replace"),
            "stderr": done.stderr.decode("utf-8", "replace")}


def main():
    request = json.loads(base64.b64decode(sys.argv[1]))
    config = json.loads(read(request["config"]) or "null") if request.get("config") else None
    paths = list(request.get("paths", []))
    if config:
        paths += [handler.get("runtime_path", "") for handler in config.get("runtimes", {}).values()]
        paths.append(config.get("conmon", ""))
    report = {
        "config": config,
        "stat": {path: stat_path(path) for path in paths},
        "content": {path: read(path) for path in request.get("read", [])},
        "processes": processes(),
        "units": {path: unit_status(path) for path in request.get("units", [])},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
