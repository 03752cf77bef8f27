"""The worker's main loop: one session after another, reconnecting with
exponential backoff and jitter while the coordinator is away, until the
worker stops or the coordinator refuses it.

The counterpart of ``node/src/reconnect.rs``. With several coordinator
addresses the worker dials the next one at once when a session ends or a
dial fails, and backs off only after a whole round of them failed in a row
(:class:`Rotation`). The backoff starts again from its minimum after a
session that lasted. Running attempts are not touched
here: they carry on across reconnects. One session itself (dial, Register,
the stream) is ``session.py``'s; this module must not read or write the
stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from .session import Fatal, Sessions
from .slots import Slots

log = logging.getLogger("weft.worker")

#: A session that lasted longer than this (seconds) resets the backoff.
SETTLED = 5.0


class Backoff:
    """Exponential reconnect backoff with jitter: each delay is drawn from
    ``[base/2, base]``, and ``base`` doubles from the minimum up to the
    maximum.

    The bounds are read from ``settings`` (``reconnect_min``,
    ``reconnect_max``, the worker's public settings) at each reset and
    draw, so a changed setting applies from the next reconnect."""

    def __init__(self, settings) -> None:
        self._settings = settings
        self.base = settings.reconnect_min

    def reset(self) -> None:
        """Starts again from the minimum."""
        self.base = self._settings.reconnect_min

    def next(self) -> float:
        """The delay before the next reconnect; doubles the base for the one after."""
        delay = self.base * (0.5 + random.random() / 2)
        minimum, maximum = self._settings.reconnect_min, self._settings.reconnect_max
        self.base = min(maximum, max(self.base * 2, minimum))
        return delay


class Rotation:
    """Which of ``count`` coordinator addresses failed in a row since the
    last registration: after a failure the next is dialed at once, unless
    every address failed (then back off). Plain state, no clock."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)
        self.failed = 0

    def registered(self) -> None:
        """A session registered: a round starts anew."""
        self.failed = 0

    def fail(self) -> bool:
        """The current address failed (or its session ended); answers
        whether to back off before dialing the next."""
        self.failed += 1
        return self.failed % self.count == 0


async def run(sessions: Sessions, settings, slots: Slots, stopped: asyncio.Event) -> None:
    """Connects, serves and reconnects with backoff until ``stopped``;
    raises the coordinator's refusal as a typed error. While the worker
    drains, a lost session is not replaced: the drain finishes locally and
    stops the worker."""
    backoff = Backoff(settings)
    rotation = Rotation(len(settings.coordinators))
    while not stopped.is_set():
        started = time.monotonic()
        registrations = sessions.registrations
        try:
            await sessions.run_session()
        except Fatal as e:
            raise e.error from None
        except Exception as e:  # noqa: BLE001 - any session failure reconnects
            log.warning("session ended: %s", e)
        if sessions.registrations != registrations:
            rotation.registered()
        if stopped.is_set():
            break
        if slots.draining:
            # The drain finishes locally and stops the worker.
            await stopped.wait()
            break
        if time.monotonic() - started > SETTLED:
            backoff.reset()
        settings.next_coordinator()
        if not rotation.fail():
            log.info("dialing the next coordinator, %s", settings.coordinator)
            continue
        delay = backoff.next()
        log.info("reconnecting in %.2fs", delay)
        try:
            await asyncio.wait_for(stopped.wait(), delay)
        except asyncio.TimeoutError:
            pass
