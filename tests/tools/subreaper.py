"""Run a command as the child of a subreaper that reaps every orphan at once.

conmon double-forks, so the processes it leaves are re-parented when their parent exits. On the
project's test machines pid 1 reaps orphans only every ~2 s (a systemd host reaps at once), which
would make tests wait on reaping instead of on our code. This wrapper sets
PR_SET_CHILD_SUBREAPER, so orphans below it come here, reaps them as they die, and exits with the
command's own status. The library under test does not depend on it.

Usage: python3 tests/tools/subreaper.py COMMAND [ARGS...]
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("subreaper: prctl failed: {}".format(os.strerror(ctypes.get_errno())), file=sys.stderr)
        return 2
    child = os.fork()
    if child == 0:
        os.execvp(argv[0], argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: os.kill(child, number))
    status = 1
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return status
        except InterruptedError:
            continue
        if pid == child:
            status = os.waitstatus_to_exitcode(wait_status)
            if status < 0:
                status = 128 - status
            # keep reaping orphans that are still exiting, but do not wait for long-lived ones
            return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
