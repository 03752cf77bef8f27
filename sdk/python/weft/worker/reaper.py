"""The reaper: a small process beside a Python worker that kills the
worker's exec tasks if the worker dies without doing it itself (SIGKILL,
the OOM killer), instead of leaving them running while the coordinator
gives the same tasks to other nodes. The same protocol as ``weft-node``'s
reaper (``node/src/reaper.rs``); like it, this file holds both sides.

The worker side (:class:`Reaper`) starts it once as ``python -I -S
reaper.py`` (this very file, run as a script) in a session of its own,
with a pipe on its stdin, and writes ``+PGID`` when an exec task's process
group starts and ``-PGID`` when it is gone. The reaper side
(:func:`main`) keeps those groups; at EOF (the worker closed the pipe, or
died and the kernel closed it) it SIGKILLs every group still registered
and exits.

Because it runs as a script, without the package and without site, this
file must import nothing but the standard library and never import from
``weft``; what only the worker side needs (``logging``, ``subprocess``) is
imported there, so the reaper process starts fast.
"""

from __future__ import annotations

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
    """The reaper process: read ``+PGID``/``-PGID`` until EOF, then kill what is left."""
    # Only EOF ends it: a stray signal (`pkill -f weft`) must not leave the
    # worker without its reaper.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    for pgid in watch(sys.stdin.buffer):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass  # already gone


# -- the worker side ---------------------------------------------------------

#: Write ends of reaper pipes, closed in any child forked without exec (a
#: ``fork`` multiprocessing process in handler code) so the reaper still
#: sees EOF when the worker dies.
_REAPER_FDS: set = set()


def _close_reaper_fds_in_child() -> None:
    for fd in _REAPER_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _REAPER_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_reaper_fds_in_child)


def _log():
    import logging

    return logging.getLogger("weft.worker")


class Reaper:
    """The worker's handle on its reaper process (started on construction)."""

    def __init__(self) -> None:
        import subprocess

        self._proc = None
        script = os.path.abspath(__file__)
        if getattr(sys, "frozen", False) or not os.path.isfile(script) or not sys.executable:
            _log().warning("no reaper in this packaging: exec tasks will outlive a worker that is killed outright")
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for the worker is not for it
            )
        except OSError as e:
            _log().warning("cannot start the reaper (%s): exec tasks will outlive a worker that is killed outright", e)
            self._proc = None
            return
        _REAPER_FDS.add(self._proc.stdin.fileno())

    def watch(self, pgid: int) -> None:
        """Tells the reaper an exec task's process group started."""
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        """Tells the reaper that group is gone (killed and its leader reaped)."""
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (OSError, ValueError):
            _log().warning("the reaper is gone: exec tasks will outlive a worker that is killed outright")
            self._forget_fd()
            self._proc.poll()  # it exited: leave no zombie
            self._proc = None

    def _forget_fd(self) -> None:
        try:
            _REAPER_FDS.discard(self._proc.stdin.fileno())
        except (AttributeError, ValueError):
            pass

    def close(self) -> None:
        """Closes the pipe (the reaper exits at once) and reaps it."""
        import subprocess

        if self._proc is None:
            return
        self._forget_fd()
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
            proc.wait(timeout=1)
        except (OSError, subprocess.TimeoutExpired):
            pass


if __name__ == "__main__":
    main()
