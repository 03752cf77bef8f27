"""What a Python worker sends: the outgoing queue, event batching and the
redelivery window.

The counterpart of ``node/src/outbox.rs``. Events (``NodeTaskEvent``) wait
here across reconnects; control messages (heartbeats, draining, renewal)
belong to one session and are dropped when it ends. :meth:`Outbox.take`
turns the queue into the messages the stream sends, batching events, and
keeps each sent ``Finished`` for a window (bounded in count and bytes): a
coordinator that crashed before recording it gets it again after the next
``Register``. Sent output chunks are kept the same way (the last
``SENT_OUTPUT_MAX_BYTES``, oldest dropped first): after the next
``Registered`` those of the listed attempts go out again, in seq order,
ahead of their results; the coordinator drops the ones it has by seq.
Each sent ``Started`` is kept too, until its attempt's ``Finished`` is sent,
and goes out again first of its attempt's events (as weft-node's
``outbox/resend.rs``): one lost with a broken stream would leave the
attempt waiting to start at the coordinator, and taken back from this
worker after the start timeout while it runs. Only a sent one is kept, so
one still queued is never sent twice.

Output and progress waiting to be sent have a bound (``QUEUED_OUTPUT_MAX_*``,
as weft-node bounds its event channel), so a worker cut off from its
coordinator does not buffer without end. Past it: exec tasks' pipes are not
read (their children block writing), thread handlers' ``ctx.output`` waits,
and progress is coalesced (a new one replaces its attempt's progress still
queued, so past the bound each attempt has at most one queued). What cannot
wait is queued past the bound: output of asyncio handlers' ``ctx.output``
and of process handlers (the pool's pipe is read whatever the room), and
an attempt's first progress. ``Started``, ``Finished`` and control messages
never wait.

Plain state plus one ``asyncio.Event`` to wake the sender. It does not own
the stream (``session.py`` pulls from it), the attempts (``attempt.py``
pushes their events) or the slot counts and credits (``slots.py``; the
session grants after each batch it sends).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from .._proto import common_pb2, node_pb2

NodeTaskEvent = node_pb2.NodeTaskEvent

log = logging.getLogger("weft.worker")

#: Largest output chunk sent in one event.
CHUNK_LIMIT = 64 * 1024
#: Most events in one TaskEvents batch.
BATCH_LIMIT = 512
#: Encoded bytes a batch stays within: half the smallest message limit a
#: coordinator may set (1 MiB); one event larger than that goes alone.
BATCH_BYTES = 512 * 1024
#: The limit kept to when Registered does not say (an older coordinator).
LEGACY_MESSAGE_LIMIT = 4 * 1024 * 1024
#: Room kept in a message around one event (``ENVELOPE_RESERVE``).
ENVELOPE_RESERVE = 1024
#: Most bytes of an error or progress text sent (the coordinator stores no
#: more: ``MAX_NODE_TEXT_BYTES``); longer ones end in TRUNCATED_MARKER.
TEXT_LIMIT = 64 * 1024
TRUNCATED_MARKER = "... [truncated]"
#: How long a sent Finished is kept to be sent again after a reconnect (the
#: coordinator may have crashed before recording it).
REDELIVER_WINDOW = 60.0
#: Most sent Finished events kept for redelivery, and most payload bytes.
REDELIVER_MAX = 10_000
REDELIVER_MAX_BYTES = 64 * 1024 * 1024
#: Most output bytes kept to send again after a reconnect (like weft-node).
SENT_OUTPUT_MAX_BYTES = 8 * 1024 * 1024

#: Most bytes of output, and most output and progress events, queued to be
#: sent: producers wait past either (weft-node's ``EVENT_BUFFER`` is 4096).
QUEUED_OUTPUT_MAX_BYTES = 4 * 1024 * 1024
QUEUED_OUTPUT_MAX_EVENTS = 4096
#: The kinds of event that count against that bound (and wait for room).
BOUNDED = ("output", "progress")

#: Queued by a drain after the last event: the stream half-closes there.
CLOSE = object()

#: An attempt's key: (task_id, attempt).
Key = Tuple[str, int]


def sendable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (an undecodable byte of a file name or
    of a process's output, as Python keeps it) becomes U+FFFD, so building the message never
    raises UnicodeEncodeError (a progress message or an error text from any handler)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # the bytes surrogateescape kept, decoded again: valid sequences come back whole
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate no decoder made
        return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def cut_text(text: str) -> str:
    """``text`` within :data:`TEXT_LIMIT` bytes of UTF-8, ending in
    :data:`TRUNCATED_MARKER` when cut."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= TEXT_LIMIT:
        return text
    keep = data[: TEXT_LIMIT - len(TRUNCATED_MARKER)].decode("utf-8", "ignore")
    return keep + TRUNCATED_MARKER


def fit(event: node_pb2.NodeTaskEvent, limit: int) -> node_pb2.NodeTaskEvent:
    """``event`` as a coordinator taking messages of ``limit`` bytes takes
    it: texts cut to :data:`TEXT_LIMIT`, and a ``Finished`` whose output
    would not fit even alone replaced by a failure that says so (a message
    past the limit would break the stream, at every reconnect)."""
    body = event.WhichOneof("body")
    if body == "progress":
        event.progress.message = cut_text(event.progress.message)
    elif body == "finished":
        done = event.finished
        if done.error:
            done.error = cut_text(done.error)
        # The exact size only when it may matter (most results are small).
        if len(done.output) + len(done.error) + ENVELOPE_RESERVE > limit - ENVELOPE_RESERVE and (
            event.ByteSize() > limit - ENVELOPE_RESERVE
        ):
            size = len(done.output)
            done.Clear()
            done.outcome = common_pb2.OUTCOME_FAILED
            done.error = (
                f"the result is {size} bytes; the coordinator takes at most {limit} in one message (--max-message-size)"
            )
    return event


def payload_bytes(event: node_pb2.NodeTaskEvent) -> int:
    """The bytes a kept ``Finished`` counts against ``REDELIVER_MAX_BYTES``."""
    return len(event.finished.output) + len(event.finished.error)


class Outbox:
    """The worker's outgoing messages, across sessions."""

    def __init__(self) -> None:
        self.queue: Deque[Any] = collections.deque()
        # Output and progress in the queue (``QUEUED_OUTPUT_MAX_*``): bytes of output, events.
        self.queued_output_bytes = 0
        self.queued_output_events = 0
        # The last progress queued (not yet taken) per attempt: past the bound a new one
        # replaces it instead of queueing another.
        self.queued_progress: Dict[Key, node_pb2.NodeTaskEvent] = {}
        #: Set while there is room for more output (thread handlers wait on it).
        self.room_open = threading.Event()
        self.room_open.set()
        self._room: Optional[asyncio.Event] = None  # the same, for the loop
        # Sent Finished events within the redelivery window: key -> (sent at, event), oldest first.
        self.redeliver: "collections.OrderedDict[Key, Tuple[float, node_pb2.NodeTaskEvent]]" = collections.OrderedDict()
        self.redeliver_bytes = 0
        # Sent output chunks per attempt, in seq order, to send again after a
        # reconnect; ``sent_order`` has one (key, seq) per chunk, oldest first.
        self.sent_output: Dict[Key, Deque[node_pb2.NodeTaskEvent]] = {}
        self.sent_order: Deque[Tuple[Key, int]] = collections.deque()
        self.sent_output_bytes = 0
        self.sent_output_count = 0
        # Sent Started events of attempts whose Finished is not sent yet (never dropped for room).
        self.sent_started: Dict[Key, node_pb2.NodeTaskEvent] = {}
        # Attempts whose Finished was sent, with when: their output goes with the window.
        self.sent_finished: Deque[Tuple[float, Key]] = collections.deque()
        self.truncated: Set[Key] = set()
        self.ready: Optional[asyncio.Event] = None
        #: A session is current: control messages are queued (else dropped).
        self.attached = False
        #: The current session has registered: the sender grants credits.
        self.credits_open = False
        #: Results and output sent again after Registered and not yet taken:
        #: no credits until they are out (their attempts hold slots until then).
        self.resending = 0
        #: The largest message the coordinator takes (its Registered says).
        self.message_limit = LEGACY_MESSAGE_LIMIT

    def start(self) -> None:
        """Creates the wake-up event on the running loop (``Worker.serve``)."""
        self.ready = asyncio.Event()
        self._room = asyncio.Event()
        if self.has_room():
            self._room.set()

    def wake(self) -> None:
        """Wakes the session's sender (cheap when it is awake already)."""
        ready = self.ready
        if ready is not None and not ready.is_set():
            ready.set()

    # -- what goes in --------------------------------------------------------

    def control(self, message: node_pb2.NodeMessage) -> None:
        """Queues a control message for the current session (none: dropped)."""
        if not self.attached:
            return
        self.queue.append(message)
        self.wake()

    def event(self, task_id: str, attempt: int, **body) -> None:
        """Queues an event about (task_id, attempt); it waits for a session.
        Output is queued even past the bound (producers that can wait ask
        :meth:`room` or :meth:`wait_room` first); progress past it replaces
        the attempt's progress still queued, if it has one."""
        progress = body.get("progress")
        if progress is not None:
            key = (task_id, attempt)
            queued = self.queued_progress.get(key)
            if queued is not None and not self.has_room():
                queued.progress.CopyFrom(progress)
                return
        event = node_pb2.NodeTaskEvent(task_id=task_id, attempt=attempt, **body)
        self.queue.append(event)
        if progress is not None:
            self.queued_progress[key] = event
            self._count(event, 1)
        elif "output" in body:
            self._count(event, 1)
        self.wake()

    def push(self, event: node_pb2.NodeTaskEvent) -> None:
        """Queues a built event; it waits for a session."""
        self.queue.append(event)
        if event.WhichOneof("body") in BOUNDED:
            self._count(event, 1)
        self.wake()

    # -- the bound on queued output ------------------------------------------

    def has_room(self) -> bool:
        """Whether queued output and progress are within their bound."""
        return (self.queued_output_bytes < QUEUED_OUTPUT_MAX_BYTES
                and self.queued_output_events < QUEUED_OUTPUT_MAX_EVENTS)

    async def room(self) -> None:
        """Waits (on the loop) until there is room for more output."""
        while not self.has_room() and self._room is not None:
            await self._room.wait()

    def wait_room(self, give_up: threading.Event) -> None:
        """Waits (on another thread) until there is room for more output,
        or ``give_up`` is set (the attempt was stopped: looked at first, so a stopped
        attempt never waits)."""
        while not give_up.is_set() and not self.room_open.wait(0.05):
            pass

    def _count(self, event: node_pb2.NodeTaskEvent, sign: int) -> None:
        if event.WhichOneof("body") == "output":
            self.queued_output_bytes += sign * len(event.output.data)
        self.queued_output_events += sign
        self._update_room()

    def _update_room(self) -> None:
        has_room = self.has_room()
        if has_room == self.room_open.is_set():
            return
        if has_room:
            self.room_open.set()
            if self._room is not None:
                self._room.set()
        else:
            self.room_open.clear()
            if self._room is not None:
                self._room.clear()

    def close(self) -> None:
        """Queues the end of the stream after what is queued (a drain)."""
        self.queue.append(CLOSE)
        self.wake()

    @property
    def closing(self) -> bool:
        """Whether the end of the stream is queued and not yet reached."""
        return CLOSE in self.queue

    # -- sessions ------------------------------------------------------------

    def begin_session(self) -> Tuple[List[node_pb2.NodeTaskEvent], Set[Key]]:
        """Prepares the queue for a new session. Answers the results to send
        again right after Registered (sent ones within the redelivery
        window), and the keys to list as running in Register besides the
        attempts that have not sent their Finished: those whose Finished
        is queued or kept."""
        # Control messages of a dead session are meaningless; events are kept.
        self.queue = collections.deque(item for item in self.queue if isinstance(item, node_pb2.NodeTaskEvent))
        # A restarted coordinator may not have recorded results sent within
        # the window: they are listed and sent again, before any credits.
        self.prune(time.monotonic())
        redeliver = [event for _, event in self.redeliver.values()]
        # A redelivered result the last stream did not take is sent once.
        self.queue = collections.deque(
            e for e in self.queue if not (e.WhichOneof("body") == "finished" and (e.task_id, e.attempt) in self.redeliver)
        )
        keys = {
            (e.task_id, e.attempt)
            for e in self.queue
            if isinstance(e, node_pb2.NodeTaskEvent) and e.WhichOneof("body") == "finished"
        }
        keys.update((e.task_id, e.attempt) for e in redeliver)
        return redeliver, keys

    def resendable(self, listed: Set[Key]) -> List[node_pb2.NodeTaskEvent]:
        """The Started events and output chunks to send again after
        Registered: those kept of the attempts ``listed`` in Register (the
        others are forgotten), each attempt's Started first, then its chunks
        in seq order. Call after :meth:`begin_session`."""
        for key in [k for k in self.sent_output if k not in listed]:
            self._forget_output(key)
        for key in [k for k in self.sent_started if k not in listed]:
            del self.sent_started[key]
        resend = []
        for key in sorted(set(self.sent_output) | set(self.sent_started)):
            started = self.sent_started.get(key)
            if started is not None:
                resend.append(started)
            resend.extend(self.sent_output.get(key, ()))
        return resend

    def resend_first(self, events: List[node_pb2.NodeTaskEvent]) -> None:
        """Puts ``events`` (from :meth:`begin_session`) at the head of the
        queue; credits wait until they are taken."""
        self.queue.extendleft(reversed(events))
        self.resending = len(events)
        for event in events:
            if event.WhichOneof("body") in BOUNDED:
                self._count(event, 1)

    def control_first(self, message: node_pb2.NodeMessage) -> None:
        """Puts a control message at the head of the queue."""
        self.queue.appendleft(message)

    # -- what goes out -------------------------------------------------------

    def take(self, finished_sent: Callable[[Key], None]) -> Any:
        """The next message to send, or :data:`CLOSE`; the queue must not be
        empty. Events go out in batches; each ``Finished`` in one is kept for
        redelivery and reported to ``finished_sent``."""
        item = self.queue.popleft()
        if not isinstance(item, node_pb2.NodeTaskEvent):
            return item
        limit = self.message_limit
        fit(item, limit)
        batch, size = [item], item.ByteSize()
        queue = self.queue
        while queue and len(batch) < BATCH_LIMIT:
            following = queue[0]
            if type(following) is not NodeTaskEvent:
                break
            fit(following, limit)
            following_size = following.ByteSize()
            if size + following_size > BATCH_BYTES:
                break
            batch.append(queue.popleft())
            size += following_size
        if self.resending:
            self.resending = max(0, self.resending - len(batch))
        now = time.monotonic()
        for event in batch:
            kind = event.WhichOneof("body")
            if kind in BOUNDED:
                self._count(event, -1)
            if kind == "progress":
                key = (event.task_id, event.attempt)
                if self.queued_progress.get(key) is event:
                    del self.queued_progress[key]
            elif kind == "output":
                self._keep_output(event)
            elif kind == "started":
                self.sent_started[(event.task_id, event.attempt)] = event
            elif kind == "finished":
                key = (event.task_id, event.attempt)
                self.sent_started.pop(key, None)
                finished_sent(key)
                if key not in self.redeliver:
                    self.redeliver[key] = (now, event)
                    self.redeliver_bytes += payload_bytes(event)
                if key in self.sent_output:
                    self.sent_finished.append((now, key))
        self.prune(now)
        return node_pb2.NodeMessage(events=node_pb2.TaskEvents(events=batch))

    # -- the redelivery window -----------------------------------------------

    def forget(self, key: Key) -> None:
        """Drops a kept result (the coordinator cancelled it: stale there)."""
        forgotten = self.redeliver.pop(key, None)
        if forgotten is not None:
            self.redeliver_bytes -= payload_bytes(forgotten[1])
        self.sent_started.pop(key, None)
        self._forget_output(key)

    def prune(self, now: float) -> None:
        """Drops results past the redelivery window or beyond its bounds, oldest
        first, and the output of attempts whose result is past the window."""
        while self.sent_finished and self.sent_finished[0][0] + REDELIVER_WINDOW < now:
            self._forget_output(self.sent_finished.popleft()[1])
        while self.redeliver:
            sent_at, event = next(iter(self.redeliver.values()))
            if (
                sent_at + REDELIVER_WINDOW >= now
                and len(self.redeliver) <= REDELIVER_MAX
                and self.redeliver_bytes <= REDELIVER_MAX_BYTES
            ):
                return
            self.redeliver.popitem(last=False)
            self.redeliver_bytes -= payload_bytes(event)

    # -- sent output -----------------------------------------------------------

    def _keep_output(self, event: node_pb2.NodeTaskEvent) -> None:
        key = (event.task_id, event.attempt)
        kept = self.sent_output.setdefault(key, collections.deque())
        if kept and kept[-1].output.seq >= event.output.seq:
            return  # a kept chunk sent again after a reconnect: kept already
        kept.append(event)
        self.sent_order.append((key, event.output.seq))
        self.sent_output_bytes += len(event.output.data)
        self.sent_output_count += 1
        while self.sent_output_bytes > SENT_OUTPUT_MAX_BYTES and self.sent_order:
            old_key, seq = self.sent_order.popleft()
            kept = self.sent_output.get(old_key)
            if not kept or kept[0].output.seq != seq:
                continue  # forgotten
            self.sent_output_bytes -= len(kept.popleft().output.data)
            self.sent_output_count -= 1
            if old_key not in self.truncated:
                self.truncated.add(old_key)
                log.warning(
                    "output of %s#%d sent more than the last %d bytes ago is no longer kept to send again; "
                    "a coordinator crash now may lose some of it",
                    old_key[0],
                    old_key[1],
                    SENT_OUTPUT_MAX_BYTES,
                )
        if len(self.sent_order) > 2 * self.sent_output_count + 64:
            # Entries of forgotten attempts pile up while others live on.
            self.sent_order = collections.deque(
                (k, seq) for k, seq in self.sent_order if self.sent_output.get(k) and self.sent_output[k][0].output.seq <= seq
            )

    def _forget_output(self, key: Key) -> None:
        kept = self.sent_output.pop(key, None)
        if kept is not None:
            self.sent_output_bytes -= sum(len(e.output.data) for e in kept)
            self.sent_output_count -= len(kept)
        self.truncated.discard(key)
        if not self.sent_output:
            self.sent_order.clear()
            self.sent_finished.clear()
