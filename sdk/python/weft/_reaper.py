"""The reaper beside a Python worker: kills the worker's exec tasks if the
worker dies without doing it itself (SIGKILL, the OOM killer), instead of
leaving them running while the coordinator gives the same tasks to other
nodes. The same protocol as ``weft-node``'s reaper.

The worker starts it once (``python -I -S _reaper.py``, standard library
only, so it starts fast) in a session of its own, with a pipe on its stdin,
and writes ``+PGID`` when an exec task's process group starts and ``-PGID``
when it is gone. At EOF (the worker closed the pipe, or died and the kernel
closed it) the reaper SIGKILLs every group still registered and exits.
"""

import os
import signal
import sys


def watch(lines) -> set:
    """The groups registered and not gone when ``lines`` ends (counted, so a
    ``-`` for an old group whose id a new one reuses leaves the new one)."""
    groups = {}
    for raw in lines:
        line = raw.strip()
        sign, number = line[:1], line[1:]
        try:
            pgid = int(number)
        except ValueError:
            continue
        if pgid <= 1:
            continue  # never "every process" or init's group
        if sign == b"+":
            groups[pgid] = groups.get(pgid, 0) + 1
        elif sign == b"-" and pgid in groups:
            groups[pgid] -= 1
            if not groups[pgid]:
                del groups[pgid]
    return set(groups)


def main() -> None:
    # Only EOF ends it: a stray signal (`pkill -f weft`) must not leave the
    # worker without its reaper.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    for pgid in watch(sys.stdin.buffer):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass  # already gone


if __name__ == "__main__":
    main()
