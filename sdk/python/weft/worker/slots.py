"""Slot accounting for the Python worker: how many slots running attempts
hold, how many are free, and whether the worker is draining.

Plain state (the counterpart of ``node/src/slots.rs``): no asyncio, no
messages. It only counts; deciding what to grant and when is the outbox's
and the session's business (``outbox.py``, ``session.py``), and starting or
stopping attempts is ``attempt.py``'s.
"""

from __future__ import annotations


class Slots:
    """The worker's slots: ``total`` (``Worker.slots``), ``used`` by running
    attempts, and ``draining`` (once set, no new work is taken and no credits
    are granted)."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.draining = False

    @property
    def free(self) -> int:
        """Slots not held by an attempt (negative when assigned beyond the credits)."""
        return self.total - self.used

    def take(self, n: int) -> bool:
        """Counts ``n`` slots as used; answers whether they were free (the
        attempt runs either way: the coordinator decided)."""
        within = self.used + n <= self.total
        self.used += n
        return within

    def give_back(self, n: int) -> None:
        """Counts ``n`` slots as free again (an attempt released them)."""
        self.used -= n

    def drain(self) -> bool:
        """Marks the worker draining; answers ``False`` if it already was."""
        if self.draining:
            return False
        self.draining = True
        return True
