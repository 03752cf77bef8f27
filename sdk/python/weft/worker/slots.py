"""Slot and credit accounting for the Python worker: which attempts hold
its slots, which wait for one (prefetch), how many credits the session may
grant, and whether the worker is draining.

Plain state (the counterpart of ``node/src/slots.rs``): no asyncio, no
messages, no clock (run times come in as arguments). It only counts and
orders; sending the grants is the session's business (``session.py``
asks :meth:`Slots.take_grant` after each batch it sends), and starting or
stopping attempts is ``attempt.py``'s.

Prefetch: the worker grants up to ``total + prefetch`` credits, so the
coordinator may assign more than the free slots. An assignment that finds
no free slot waits in a FIFO (assigned, not started) and starts as soon as
a slot frees, so the next task is already here when one ends. How much it
holds adapts to the work: enough queued attempts per slot to cover
:data:`REFILL_TIME` at the average run time seen so far, never more than
the configured prefetch (none before the first attempt ends), so short
tasks stream while long ones stay spread over the nodes. Never more than
``total`` slots run at once.

Two counts, because a slot frees locally before the coordinator knows:

- ``used``: slots of the attempts running here (at most ``total``); freed
  when an attempt's work is over, so a queued one starts at once;
- ``held``: slots of the attempts the coordinator counts as assigned here
  (running, queued, or ended with their ``Finished`` not yet handed to a
  stream); freed when the stream took the ``Finished`` and the work is
  over. Credits follow it: ``held + window <= total + prefetch``, where
  ``window`` is what this session granted and the coordinator has not
  used yet.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Optional

#: How long the coordinator takes to refill a freed credit (the worker's
#: ``Finished`` and ``Credits``, a commit, the next ``Assign``), with margin:
#: the worker keeps enough queued work to cover it. Longer than
#: ``weft-node``'s 10 ms: a Python worker takes longer to read a batch.
REFILL_TIME = 0.02

#: Default prefetch per slot (as ``weft-node``'s ``DEFAULT_PREFETCH_PER_SLOT``;
#: ``weft-node`` also holds at least 1,024 for tasks of microseconds, a floor
#: this worker does not take: it was measured on ``weft-node`` only).
DEFAULT_PREFETCH_PER_SLOT = 256


def default_prefetch(slots: int) -> int:
    """The default prefetch of a worker with ``slots`` slots."""
    return max(1, slots) * DEFAULT_PREFETCH_PER_SLOT


class Slots:
    """The worker's slots: ``total`` (``Worker.slots``), ``used`` by running
    attempts, the FIFO of ``queued`` attempts (assigned, waiting for a
    slot), ``held`` as the coordinator counts them, the credit ``window``,
    and ``draining`` (once set, no new work is taken and no credits are
    granted)."""

    def __init__(self, total: int, prefetch: int = 0):
        self.total = total
        #: The most prefetch allowed (configured; 0: never more than ``total``).
        self.prefetch = prefetch
        #: Average run time of the attempts that ended (EWMA), if any did.
        self.run_time: Optional[float] = None
        self.used = 0
        self.held = 0
        self.window = 0
        self.queued_slots = 0
        #: Assigned, not started: FIFO of (attempt, slots), started as slots free.
        self.queued: Deque[Any] = collections.deque()
        #: Slots of the queued attempts handed down ahead to the handler
        #: threads (taken off the head of ``queued``; still not started).
        self.ahead_slots = 0
        self.draining = False

    @property
    def free(self) -> int:
        """Slots not held by a running attempt."""
        return self.total - self.used

    def prefetch_now(self) -> int:
        """Prefetch in use now: enough to cover :data:`REFILL_TIME` at the
        average run time, per slot, within the configured prefetch; none
        before an attempt has ended."""
        if self.run_time is None or self.prefetch <= 0:
            return 0
        return min(self.per_slot_now() * self.total, self.prefetch)

    def per_slot_now(self) -> int:
        """Queued attempts per slot that cover :data:`REFILL_TIME` at the
        average run time (1 before an attempt has ended, or for attempts
        that run longer): how deep a pool process's line of calls handed
        down ahead may be without holding one back longer than that."""
        if self.run_time is None:
            return 1
        return int(REFILL_TIME / max(self.run_time, 1e-9)) + 1

    def record_run_time(self, took: float) -> None:
        """Folds one attempt's run time (seconds) into the average prefetch follows."""
        self.run_time = took if self.run_time is None else (self.run_time * 7 + took) / 8

    # -- credits -------------------------------------------------------------

    def reset_window(self) -> None:
        """A new session starts with an empty credit window."""
        self.window = 0

    def take_grant(self) -> int:
        """Credits to grant now so that ``held + window == total +
        prefetch_now``; 0 when nothing is free or the worker drains.

        With prefetch in use it waits until a quarter of the capacity (at
        most the prefetch) is free, so one ``Credits`` answers many
        releases while the coordinator still has three quarters to assign;
        without prefetch every freed slot is granted at once."""
        if self.draining:
            return 0
        prefetch = self.prefetch_now()
        capacity = self.total + prefetch
        grant = capacity - self.held - self.window
        if grant <= 0 or grant < min(capacity // 4, prefetch):
            return 0
        self.window += grant
        return grant

    def assigned(self, n: int) -> None:
        """An assignment used ``n`` of the window and is held until its
        ``Finished`` is sent (counted even when refused at once)."""
        self.window = max(0, self.window - n)
        self.held += n

    def reported(self, n: int) -> None:
        """An attempt's ``Finished`` went to a stream and its work is over:
        the coordinator no longer counts its ``n`` slots."""
        self.held -= n

    # -- running and queueing ------------------------------------------------

    def fits(self, n: int) -> bool:
        """Whether an attempt of ``n`` slots may be taken (run or queued):
        at most ``total`` for one attempt, ``total + prefetch`` in all."""
        return n <= self.total and self.used + self.queued_slots + self.ahead_slots + n <= self.total + self.prefetch

    def can_start(self, n: int) -> bool:
        """Whether an attempt of ``n`` slots can start now (free slots, and
        nothing queued ahead of it)."""
        return not self.queued and not self.ahead_slots and self.used + n <= self.total

    def take(self, n: int) -> bool:
        """Counts ``n`` slots as used by a starting attempt; answers whether
        they were free."""
        within = self.used + n <= self.total
        self.used += n
        return within

    def give_back(self, n: int) -> None:
        """Counts ``n`` slots as free again (an attempt's work is over)."""
        self.used -= n

    def enqueue(self, item: Any, n: int) -> None:
        """Queues an attempt of ``n`` slots until they are free."""
        self.queued.append((item, n))
        self.queued_slots += n

    def next_ready(self) -> Any:
        """Takes the queue's head attempt if its slots are free now (and
        counts them used); None otherwise."""
        if not self.queued:
            return None
        item, n = self.queued[0]
        if self.used + n > self.total:
            return None
        self.queued.popleft()
        self.queued_slots -= n
        self.used += n
        return item

    def take_head(self) -> Any:
        """Takes the queue's head attempt to hand it down ahead (still not
        started: its slots count as queued until :meth:`ahead_began`)."""
        item, n = self.queued.popleft()
        self.queued_slots -= n
        self.ahead_slots += n
        return item

    def ahead_began(self, n: int) -> None:
        """An attempt handed down ahead began: it holds ``n`` slots now."""
        self.ahead_slots -= n
        self.used += n

    def ahead_back(self, n: int) -> None:
        """An attempt handed down ahead was taken back without running."""
        self.ahead_slots -= n

    def dequeue(self, item: Any) -> bool:
        """Takes ``item`` off the queue (it never ran); answers whether it was there."""
        for i, (queued, n) in enumerate(self.queued):
            if queued is item:
                del self.queued[i]
                self.queued_slots -= n
                return True
        return False

    def take_queued(self) -> list:
        """Empties the queue; answers its attempts (they never ran)."""
        items = [item for item, _ in self.queued]
        self.queued.clear()
        self.queued_slots = 0
        return items

    def drain(self) -> bool:
        """Marks the worker draining; answers ``False`` if it already was."""
        if self.draining:
            return False
        self.draining = True
        return True
