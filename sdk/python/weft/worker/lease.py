"""The worker's lease: how long running attempts may go on without word
from the coordinator.

The coordinator declares a node lost after ``heartbeat_timeout`` of
silence and gives its attempts to other nodes. A worker that hears nothing
from the coordinator must assume the same happened and stop those attempts
itself, or one task runs twice. The lease counts from the last message
heard (any message, heartbeats included) on the monotonic clock, across
reconnects: a worker that cannot reach the coordinator stops its attempts
once the lease has run out, while it keeps dialing.

The counterpart of ``node/src/lease.rs`` (plain state, ``now`` passed in)
and ``node/src/lease_watchdog.rs`` (:func:`watch`, the part that waits and
acts). The session renews it (``session.py``), the attempts ask it before
taking an assignment (``attempt.py``); what stopping takes is passed in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

log = logging.getLogger("weft.worker")

#: How often to check while no lease runs (before the first registration,
#: and after an expiry until the next one).
IDLE_CHECK = 1.0


def expired_message(silence: float) -> str:
    """The error an attempt stopped (or refused) by an expired lease reports."""
    return (f"lease expired: coordinator unreachable for {silence:.1f}s; the coordinator has reassigned this "
            "attempt")


class Lease:
    """The lease of the current (or last) session. ``configured``: its
    length in seconds (``Worker(lease=)``); None or 0 uses the
    coordinator's ``heartbeat_timeout``."""

    def __init__(self, configured: Optional[float]):
        self.configured = configured if configured else None
        self.length: Optional[float] = None  # set by the first Registered
        self.check_every = IDLE_CHECK
        self.last_heard = 0.0
        self.expired = False

    def begin(self, heartbeat_timeout: float, heartbeat_interval: float, now: float) -> None:
        """A session registered at ``now``: a fresh lease."""
        self.length = self.configured or heartbeat_timeout
        self.check_every = max(0.001, heartbeat_interval)
        self.last_heard = now
        self.expired = False

    def heard(self, now: float) -> Optional[float]:
        """A message arrived at ``now``: renews the lease, unless it had
        already run out (answers the silence): that message was sent
        before the coordinator gave up on this worker."""
        if self.length is None:
            return None
        silence = now - self.last_heard
        if self.expired or silence >= self.length:
            return silence
        self.last_heard = max(self.last_heard, now)
        return None

    def overdue(self, now: float) -> Optional[float]:
        """The silence so far if the lease has run out at ``now``; None
        while it holds or before the first registration."""
        if self.length is None:
            return None
        silence = now - self.last_heard
        return silence if self.expired or silence >= self.length else None

    def check(self, now: float) -> Optional[float]:
        """Expires the lease if it has run out at ``now``: answers the
        silence the first time only, so the caller stops attempts once."""
        if self.length is None or self.expired:
            return None
        silence = now - self.last_heard
        if silence < self.length:
            return None
        self.expired = True
        return silence

    def next_check(self, now: float) -> float:
        """Seconds until the next check: at the deadline, and at least every
        heartbeat interval."""
        if self.length is None or self.expired:
            return IDLE_CHECK
        return max(0.0, min(self.last_heard + self.length - now, self.check_every))


async def watch(lease: Lease, stop_all: Callable[[str], int], expired: Callable[[], None]) -> None:
    """Forever: once the lease runs out, stops every attempt
    (``stop_all(detail)``, answering how many) and calls ``expired()`` (the
    session ends: the coordinator has given up on this worker)."""
    while True:
        await asyncio.sleep(lease.next_check(time.monotonic()))
        silence = lease.check(time.monotonic())
        if silence is None:
            continue
        stopped = stop_all(expired_message(silence))
        log.warning("lease expired: coordinator unreachable for %.1fs; stopped %d attempts", silence, stopped)
        expired()
