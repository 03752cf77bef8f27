"""The attempts a Python worker runs: taking an assignment, running its
handler or process, stopping it (cancel, timeout, drain), the one
``Finished`` it reports, and giving its slots back.

The counterpart of ``node/src/attempt.rs`` (with the attempts table the
Rust node keeps beside it). Events go to the outbox (``outbox.py``), slots
are counted in ``slots.py``, exec tasks' processes run in ``process.py``
and handlers come from ``handlers.py``. It must not touch the stream or
the session: what the coordinator says reaches it as :meth:`Attempts.assign`
and :meth:`Attempts.stop`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .._pool import KILLED, PoolCallError
from .._proto import common_pb2, node_pb2
from ..models import duration_from_pb
from ..tracing import TracedContext
from .exec_policy import ExecPolicy
from .handlers import Handlers, StartFailed, error_text, to_output, with_traceback
from .lease import Lease, expired_message
from .outbox import CHUNK_LIMIT, Outbox, sendable
from .parents import ExecFiles, ParentResult, parents_of
from .pickled import HANDLER as PICKLE_HANDLER, with_parents
from .process import run_exec
from .slots import Slots

log = logging.getLogger("weft.worker")

#: A cancelled handler that has not stopped by then is reported CANCELLED anyway.
CANCEL_REPORT_WITHIN = 0.75
#: An attempt still running this long (seconds) after it started reports
#: ``Started``; a shorter one reports its ``Finished`` alone (the protocol
#: allows it), which spares the coordinator an event per short task.
STARTED_DELAY = 0.005

SUCCEEDED = common_pb2.OUTCOME_SUCCEEDED


class Attempt:
    """One (task_id, attempt) this worker runs or holds queued."""

    __slots__ = (
        "task_id", "attempt", "spec", "slots", "key", "runner", "context", "stop_reason", "stop_detail", "finished",
        "finished_sent", "work_done", "released", "reported", "queued", "started_sent", "began", "ran_for", "pid", "pcall", "ahead", "handler",
        "next_output_seq", "timer", "kill", "parents", "__weakref__",
    )

    def __init__(self, task_id: str, attempt: int, spec: common_pb2.TaskSpec):
        self.task_id = task_id
        self.attempt = attempt
        self.spec = spec
        self.slots = max(1, spec.slots)
        self.key = (task_id, attempt)
        self.runner: Optional[asyncio.Task] = None
        self.context: Optional[Context] = None
        self.stop_reason: Optional[str] = None  # "cancelled" | "timed_out" | "draining"
        self.stop_detail = ""
        self.finished = False  # Finished queued
        self.finished_sent = False  # Finished handed to a stream
        self.work_done = False  # nothing of it runs any more
        self.released = False  # its running slots are free again (or it never took any)
        self.reported = False  # no longer held: Finished sent and work done
        self.queued = False  # assigned, waiting for a slot (prefetched)
        self.started_sent = False  # its Started is queued
        self.began: Optional[float] = None  # when it started running (monotonic)
        self.ran_for: Optional[float] = None  # how long its handler ran, when measured where it ran
        self.pid = 0  # Started.pid
        self.pcall = None  # its call in the process pool
        self.ahead = False  # queued, handed down to the handler threads ahead
        self.handler = None  # a call's handler, once looked up
        self.next_output_seq = 0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.kill: Optional[Callable[[], None]] = None  # hard stop (process group, pool process)
        self.parents: tuple = ()  # its parents' results (ParentResult), in `after` order

    def __repr__(self) -> str:
        return f"{self.task_id}#{self.attempt}"


class Context(TracedContext):
    """What a handler can do besides returning: output, progress, check for cancel.

    Passed as the second argument to handlers that take two parameters.
    Thread handlers should poll :attr:`cancelled` (or call
    :meth:`check_cancelled`) in long loops: a thread cannot be killed, so a
    cancelled thread handler is reported CANCELLED at once but keeps its slot
    until it returns. Asyncio handlers are cancelled with CancelledError,
    process handlers by killing their pool process.
    """

    def __init__(self, attempts: "Attempts", attempt: Attempt, kind: str, input: bytes):
        self._attempts = attempts
        self._attempt = attempt
        self.kind = kind
        self.input = input
        self.task_id = attempt.task_id
        self.attempt = attempt.attempt
        #: The task's secret environment (name -> value), given only to the
        #: node running this attempt: read it, never log or return it.
        self.secret_env: Dict[str, str] = dict(attempt.spec.secret_env)
        #: The W3C trace context the attempt runs under (see
        #: :meth:`otel_context`); "" when the task has no trace.
        self.traceparent: str = attempt.spec.trace.traceparent
        self.tracestate: str = attempt.spec.trace.tracestate
        #: The final results of the tasks this one runs after (:class:`weft.ParentResult`:
        #: ``task_id``, ``ref``, ``state``, ``output``), in the order of its ``after``.
        self.parents: List[ParentResult] = list(attempt.parents)
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether the attempt was cancelled or timed out."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raises ``asyncio.CancelledError`` if the attempt was cancelled."""
        if self._cancel.is_set():
            raise asyncio.CancelledError()

    def output(self, data: Union[bytes, str], stream: str = "stdout") -> None:
        """Sends a chunk of output (``stream`` is ``"stdout"`` or ``"stderr"``).

        On a thread handler's thread it waits while the output not yet sent
        is at its bound (a coordinator out of reach), as a process writing
        to a full pipe does."""
        if isinstance(data, str):
            data = data.encode()
        self._call(self._attempts.output, self._attempt, bytes(data), stream, wait_room=True)

    def print(self, *args: Any, sep: str = " ", end: str = "\n", stream: str = "stdout") -> None:
        """Like ``print``, into the task's output."""
        self.output(sep.join(str(a) for a in args) + end, stream)

    def progress(self, fraction: float, message: str = "") -> None:
        """Reports progress: ``fraction`` in 0..1 (negative when unknown)."""
        self._call(self._attempts.progress, self._attempt, float(fraction), str(message))

    def _call(self, fn, *args, wait_room: bool = False) -> None:
        loop = self._attempts.loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
            return
        if wait_room:
            self._attempts.outbox.wait_room(self._cancel)
        threads = self._attempts.threads
        if self.kind == "thread" and threads is not None:
            # The way the call's end goes too: its output is on the loop
            # before its Finished (a callback of its own could come after).
            threads.post(fn, *args)
        else:
            loop.call_soon_threadsafe(fn, *args)


class HandlerThreads:
    """The threads thread handlers run on: ``size`` threads taking started
    calls from one queue, and ``ahead``: attempts still queued (prefetched)
    handed down in advance. A thread that ends a call begins the next one
    from ``ahead`` at once, in the slot the ended call held, without waiting
    for the loop (so at most ``size`` calls run at once, each in a slot).
    What ended goes back to the loop through a list drained in one callback
    (with what handlers send meanwhile, so a call's output precedes its end),
    saying which call the thread began next: a burst of short calls costs
    the loop one wake-up, and a thread runs several of them in one turn at
    the interpreter lock (``concurrent.futures`` costs a future, a lock and
    a wake-up per call, and a round trip through the loop between two)."""

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.size = max(1, size)
        self._calls: "queue.SimpleQueue" = queue.SimpleQueue()
        self._done: List[tuple] = []
        self.ahead: "collections.deque" = collections.deque()
        self._lock = threading.Lock()
        #: ``began(attempt)``, on the loop, for an attempt a thread took from ``ahead``.
        self.began: Callable[[Any], None] = lambda attempt: None
        self._threads = [
            threading.Thread(target=self._serve, name=f"weft-handler-{i}", daemon=True) for i in range(self.size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, args: tuple, attempt: Any, done: Callable[[Any, bool, Any], None]) -> None:
        """Runs ``fn(*args)`` on a thread; ``done(attempt, ok, value)`` follows on the loop."""
        self._calls.put((fn, args, attempt, done))

    def put_ahead(self, fn: Callable, args: tuple, attempt: Any, done: Callable[[Any, bool, Any], None]) -> None:
        """Hands a queued attempt down: the next thread to end a call begins it."""
        with self._lock:
            self.ahead.append((fn, args, attempt, done))

    def withdraw(self, attempt: Any) -> Optional[tuple]:
        """Takes ``attempt`` back from ``ahead`` (None: a thread began it)."""
        with self._lock:
            for item in self.ahead:
                if item[2] is attempt:
                    self.ahead.remove(item)
                    return item
        return None

    def withdraw_first(self) -> Optional[tuple]:
        """Takes the first attempt of ``ahead`` back (None when empty)."""
        with self._lock:
            return self.ahead.popleft() if self.ahead else None

    def withdraw_all(self) -> List[tuple]:
        """Takes every attempt of ``ahead`` back."""
        with self._lock:
            items = list(self.ahead)
            self.ahead.clear()
        return items

    def post(self, fn: Callable, *args) -> None:
        """Runs ``fn(*args)`` on the loop, in order with the ends of calls
        posted after it (a handler's output and progress come before its end)."""
        with self._lock:
            first = not self._done
            self._done.append((None, fn, args))
        if first:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed: the worker stopped
                pass

    def _serve(self) -> None:
        calls, lock, done_list, ahead, monotonic = self._calls, self._lock, self._done, self.ahead, time.monotonic
        while True:
            item = calls.get()
            if item is None:
                return
            while item is not None:
                fn, args, attempt, done = item
                began = monotonic()
                try:
                    value, ok = fn(*args), True
                except BaseException as e:  # noqa: BLE001 - a handler's failure is the attempt's
                    value, ok = e, False
                took = monotonic() - began
                del fn, args
                with lock:
                    item = ahead.popleft() if ahead else None
                    first = not done_list
                    done_list.append((attempt, done, ok, value, took, item[2] if item is not None else None))
                del attempt, value
                if first:
                    try:
                        self._loop.call_soon_threadsafe(self._drain)
                    except RuntimeError:  # the loop closed: the worker stopped
                        return

    def _drain(self) -> None:
        with self._lock:
            batch = self._done[:]
            self._done.clear()
        began = self.began
        for item in batch:
            # One item that raises must not drop the rest: another call's end among them
            # would never be reported, its attempt never finish and its slots never return.
            try:
                if item[0] is None:  # posted by a handler (``post``)
                    item[1](*item[2])
                    continue
                attempt, done, ok, value, took, following = item
                if following is not None:
                    # First, so it takes over the slot the ended call frees; on its own, so
                    # the ended call is reported even if this raises.
                    try:
                        began(following)
                    except Exception:  # noqa: BLE001 - logged; the ended call still finishes
                        log.exception("beginning a thread handler's prefetched call on the loop failed")
                # Its own run time, not the wait for a thread or the loop: what prefetch follows.
                attempt.ran_for = took
                done(attempt, ok, value)
            except Exception:  # noqa: BLE001 - logged; the batch goes on
                log.exception("handing a thread handler's call back to the loop failed")

    def shutdown(self) -> None:
        """Lets the threads end once their current call returns (they are daemons)."""
        self.withdraw_all()
        for _ in self._threads:
            self._calls.put(None)


class Attempts:
    """The attempts this worker runs or holds queued, by (task_id, attempt),
    and how they run.

    ``start`` gives it what only exists once the worker serves: the loop,
    a way to spawn tasks, the thread pool, the process pool (if a handler
    needs one) and the reaper (if one started).

    Per attempt it does as little as it can, since short tasks come by the
    thousand a second: an asyncio handler runs in one task, a thread
    handler in no task at all (its result comes back to the loop in
    batches, one wake-up for several), and ``Started`` is only sent for an
    attempt still running :data:`STARTED_DELAY` after it started (or that
    sends output first): a short attempt reports its ``Finished`` alone."""

    def __init__(self, handlers: Handlers, slots: Slots, outbox: Outbox, exec_policy: Optional[ExecPolicy] = None,
                 lease: Optional[Lease] = None):
        self.handlers = handlers
        self.exec_policy = exec_policy if exec_policy is not None else ExecPolicy("deny")
        self.slots = slots
        self.outbox = outbox
        self.lease = lease if lease is not None else Lease(None)
        self.table: Dict[Tuple[str, int], Attempt] = {}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.threads: Optional[HandlerThreads] = None
        self.processes = None
        self.reaper = None
        self._spawn: Optional[Callable[[Any], asyncio.Task]] = None
        self._unstarted: List[Attempt] = []
        self._started_timer: Optional[asyncio.TimerHandle] = None

    def start(self, loop, spawn, threads, processes, reaper) -> None:
        """Hands over the running loop, the task spawner, the pools and the reaper."""
        self.loop, self._spawn = loop, spawn
        self.threads, self.processes, self.reaper = threads, processes, reaper
        if threads is not None:
            threads.began = self._began_ahead

    def any_running(self) -> bool:
        """Whether an attempt has not reported its Finished yet."""
        return any(not a.finished for a in self.table.values())

    def finished_sent(self, key: Tuple[str, int]) -> None:
        """The outbox handed ``key``'s Finished to a stream."""
        attempt = self.table.get(key)
        if attempt is not None and not attempt.finished_sent:
            attempt.finished_sent = True
            self._maybe_forget(attempt)

    # -- what it reports -----------------------------------------------------

    def _event(self, attempt: Attempt, **body) -> None:
        self.outbox.event(attempt.task_id, attempt.attempt, **body)

    def _started(self, attempt: Attempt) -> None:
        """Queues the attempt's Started now (before its first output)."""
        if not attempt.started_sent and not attempt.finished:
            attempt.started_sent = True
            pid = attempt.pcall.pid if attempt.pcall is not None else attempt.pid
            self._event(attempt, started=node_pb2.Started(pid=pid))

    def _started_soon(self, attempt: Attempt) -> None:
        """Queues the attempt's Started if it still runs after :data:`STARTED_DELAY`."""
        self._unstarted.append(attempt)
        if self._started_timer is None:
            self._started_timer = self.loop.call_later(STARTED_DELAY, self._flush_started)

    def _flush_started(self) -> None:
        self._started_timer = None
        unstarted, self._unstarted = self._unstarted, []
        for attempt in unstarted:
            self._started(attempt)

    def output(self, attempt: Attempt, data: bytes, stream: str = "stdout") -> None:
        """Sends output, in numbered chunks of at most ``CHUNK_LIMIT`` bytes."""
        if attempt.finished or not data:
            return
        self._started(attempt)
        stream_pb = common_pb2.OUTPUT_STREAM_STDERR if stream == "stderr" else common_pb2.OUTPUT_STREAM_STDOUT
        for start in range(0, len(data), CHUNK_LIMIT):
            chunk = node_pb2.OutputChunk(stream=stream_pb, data=data[start:start + CHUNK_LIMIT], seq=attempt.next_output_seq)
            attempt.next_output_seq += 1
            self._event(attempt, output=chunk)

    def progress(self, attempt: Attempt, fraction: float, message: str) -> None:
        """Sends progress, until the attempt has finished."""
        if not attempt.finished:
            self._started(attempt)
            self._event(attempt, progress=node_pb2.Progress(fraction=fraction, message=sendable(message)))

    def finish(self, attempt: Attempt, outcome: int, *, output: bytes = b"", error: str = "", exit_code: Optional[int] = None) -> None:
        """Queues the attempt's one Finished (later calls do nothing)."""
        if attempt.finished:
            return
        attempt.finished = True
        if attempt.timer is not None:
            attempt.timer.cancel()
        event = node_pb2.NodeTaskEvent(task_id=attempt.task_id, attempt=attempt.attempt)
        finished = event.finished
        finished.outcome = outcome
        if output:
            finished.output = output
        if error:
            finished.error = sendable(error)
        if exit_code is not None:
            finished.exit_code = exit_code
        if outcome != SUCCEEDED and log.isEnabledFor(logging.DEBUG):
            log.debug("attempt %r finished: %s %s", attempt, common_pb2.Outcome.Name(outcome), error)
        self.outbox.push(event)
        self._maybe_release(attempt)

    def _maybe_release(self, attempt: Attempt) -> None:
        """Frees the slots of an attempt whose work is over and whose
        Finished is queued, and starts the queued attempts that now fit."""
        if attempt.released or not (attempt.finished and attempt.work_done):
            self._maybe_forget(attempt)
            return
        attempt.released = True
        slots = self.slots
        slots.give_back(attempt.slots)
        if attempt.ran_for is not None:
            slots.record_run_time(attempt.ran_for)
        elif attempt.began is not None:
            slots.record_run_time(time.monotonic() - attempt.began)
        self._maybe_forget(attempt)
        threads, processes = self.threads, self.processes
        # The attempts handed down ahead are the head of the queue.
        while processes is not None and slots.used < slots.total:
            ahead = processes.reclaim_ahead()
            if ahead is None:
                break
            ahead.ahead = False
            slots.ahead_began(ahead.slots)
            self._begin(ahead)
            processes.dispatch()  # Started follows its begin
        while threads is not None and threads.ahead and slots.used < slots.total:
            item = threads.withdraw_first()
            if item is None:
                break
            ahead = item[2]
            ahead.ahead = False
            slots.ahead_began(ahead.slots)
            self._begin(ahead)
            self._started_soon(ahead)
            threads.submit(*item)
        while slots.queued:
            ready = slots.next_ready()
            if ready is None:
                break
            ready.queued = False
            self._run(ready)
        if slots.queued:
            self._fill_ahead()

    def _maybe_forget(self, attempt: Attempt) -> None:
        """Drops an attempt the coordinator no longer counts here (its
        Finished went to a stream and its work is over): its slots may be
        granted again."""
        if attempt.reported or not (attempt.finished_sent and attempt.work_done):
            return
        attempt.reported = True
        self.slots.reported(attempt.slots)
        if self.table.get(attempt.key) is attempt:
            del self.table[attempt.key]
        self.outbox.wake()

    # -- starting and stopping -----------------------------------------------

    def assign(self, assignment: node_pb2.Assignment) -> None:
        """Takes an assigned attempt: runs it if a slot is free, else queues
        it (prefetch). A draining worker, a worker whose lease ran out, or
        one over its capacity reports it CANCELLED without running it."""
        key = (assignment.task_id, assignment.attempt)
        if key in self.table:
            self.slots.window = max(0, self.slots.window - max(1, assignment.spec.slots))
            log.warning("duplicate assignment %s#%s ignored", *key)
            return
        spec = assignment.spec
        # The attempt runs under Assignment.trace, not spec.trace (see
        # node.proto): the spec carries it from here on.
        if assignment.HasField("trace"):
            spec.trace.CopyFrom(assignment.trace)
        else:
            spec.ClearField("trace")
        attempt = Attempt(assignment.task_id, assignment.attempt, spec)
        if assignment.parents:
            attempt.parents = tuple(parents_of(assignment))
        self.table[key] = attempt
        slots = self.slots
        slots.assigned(attempt.slots)
        if slots.draining:
            self._refuse(attempt, "node is draining")
            return
        overdue = self.lease.overdue(time.monotonic())
        if overdue is not None:
            self._refuse(attempt, expired_message(overdue))
            return
        if not slots.fits(attempt.slots):
            why = (f"node over capacity: task needs {attempt.slots} slots, {slots.free} of {slots.total} free, "
                   f"{slots.queued_slots + slots.ahead_slots} queued (prefetch {slots.prefetch})")
            log.warning("attempt %r refused: %s", attempt, why)
            self._refuse(attempt, why)
            return
        if slots.can_start(attempt.slots):
            slots.take(attempt.slots)
            self._run(attempt)
        else:
            attempt.queued = True
            slots.enqueue(attempt, attempt.slots)
            self._fill_ahead()

    def _fill_ahead(self) -> None:
        """Hands the queue's head attempts of thread and process handlers
        down to the threads and the pool processes, so one that ends a call
        begins the next at once (in the slot it frees)."""
        slots, threads, processes = self.slots, self.threads, self.processes
        process_room = 0
        if processes is not None and slots.queued:
            # Short calls wait several deep behind a running one, each
            # process taking what comes in one pipe write; long ones one.
            processes.ahead_depth = slots.per_slot_now()
            process_room = (processes.ahead_depth + 1) * processes.size
        while slots.queued:
            head = slots.queued[0][0]
            handler = self._handler_of(head)
            if handler is None or head.slots != 1 or head.stop_reason is not None:
                return
            if handler.kind == "thread" and threads is not None and len(threads.ahead) < 2 * threads.size:
                slots.take_head()
                head.queued, head.ahead = False, True
                threads.put_ahead(handler.fn, self._thread_args(head, handler), head, self._thread_done)
            elif handler.kind == "process" and processes is not None and processes.ahead_count() < process_room:
                slots.take_head()
                head.queued, head.ahead = False, True
                self._run_process(head, handler, ahead=True)
            else:
                return

    def _handler_of(self, attempt: Attempt):
        if attempt.handler is None and attempt.spec.WhichOneof("kind") == "call":
            attempt.handler = self.handlers.get(attempt.spec.call.handler)
        return attempt.handler

    def _began_ahead(self, attempt: Attempt) -> None:
        """A thread or pool process began an attempt handed down ahead (on the loop)."""
        if not attempt.ahead:
            return
        attempt.ahead = False
        self.slots.ahead_began(attempt.slots)
        self._begin(attempt)
        if not attempt.finished:
            self._started_soon(attempt)

    def _refuse(self, attempt: Attempt, why: str) -> None:
        """Reports an attempt that never ran (and never took a slot) CANCELLED."""
        attempt.work_done = attempt.released = True
        self.finish(attempt, common_pb2.OUTCOME_CANCELLED, error=why)

    def set_draining(self) -> None:
        """Stops taking work and granting credits; the queued attempts
        (never started) are reported CANCELLED at once, so the coordinator
        gives them to other nodes."""
        if not self.slots.drain():
            return
        taken = [item[2] for item in self.threads.withdraw_all()] if self.threads is not None else []
        for attempt in taken:
            attempt.ahead = False
            self.slots.ahead_back(attempt.slots)
        for attempt in [a for a in self.table.values() if a.ahead and a.pcall is not None]:
            self._take_back_call(attempt, "cancelled", "node is draining: returned before it started")
        for attempt in taken + self.slots.take_queued():
            attempt.queued = False
            self._refuse(attempt, "node is draining: returned before it started")

    def stop(self, attempt: Attempt, reason: str, detail: str) -> None:
        """Stops an attempt for ``reason`` ("cancelled" or "timed_out"); a
        queued one is reported at once, never started."""
        if attempt.finished or attempt.stop_reason is not None:
            return
        attempt.stop_reason, attempt.stop_detail = reason, detail
        if attempt.queued:
            self.slots.dequeue(attempt)
            attempt.queued = False
            log.info("cancelling queued attempt %r: %s", attempt, detail)
            attempt.work_done = attempt.released = True
            self._report_stopped(attempt)
            return
        if attempt.ahead and attempt.pcall is not None:
            self._take_back_call(attempt, reason, detail)
            return
        if attempt.ahead:
            if self.threads.withdraw(attempt) is not None:
                attempt.ahead = False
                self.slots.ahead_back(attempt.slots)
                log.info("cancelling queued attempt %r: %s", attempt, detail)
                attempt.work_done = attempt.released = True
                self._report_stopped(attempt)
                return
            # A thread has just begun it (its start is on the way to the
            # loop): stopped like any thread handler.
            log.info("stopping attempt %r: %s", attempt, detail)
            if attempt.context is not None:
                attempt.context._cancel.set()
            self._report_stopped(attempt)
            return
        log.info("stopping attempt %r: %s", attempt, detail)
        if attempt.context is not None:
            attempt.context._cancel.set()
        if attempt.kill is not None:
            attempt.kill()
        if attempt.runner is not None:
            attempt.runner.cancel()
        elif attempt.began is not None and not attempt.work_done:
            # A thread handler cannot be interrupted: reported now, its
            # slot kept until it returns.
            self._report_stopped(attempt)
            return
        # A handler that swallows the cancel is reported stopped anyway.
        self.loop.call_later(CANCEL_REPORT_WITHIN, self._report_stopped, attempt)

    def _take_back_call(self, attempt: Attempt, reason: str, detail: str) -> None:
        """Takes back a process call handed down ahead, not begun: it never runs."""
        attempt.stop_reason, attempt.stop_detail = reason, detail
        attempt.ahead = False
        self.slots.ahead_back(attempt.slots)
        attempt.released = True  # it never held a slot
        log.info("cancelling queued attempt %r: %s", attempt, detail)
        attempt.pcall.kill()  # reported CANCELLED through its end

    def stop_all(self, reason: str, detail: str) -> int:
        """Stops every attempt (queued ones are reported without running); answers how many."""
        attempts = [a for a in self.table.values() if not a.finished]
        for attempt in attempts:
            self.stop(attempt, reason, detail)
        return len(attempts)

    def kill_all(self) -> None:
        """Kills what can be killed and flags the rest cancelled; reports nothing."""
        for attempt in list(self.table.values()):
            if attempt.kill is not None:
                attempt.kill()
            if attempt.context is not None:
                attempt.context._cancel.set()

    def _report_stopped(self, attempt: Attempt) -> None:
        if attempt.finished:
            return
        if attempt.stop_reason == "timed_out":
            self.finish(attempt, common_pb2.OUTCOME_TIMED_OUT, error=attempt.stop_detail)
        else:
            self.finish(attempt, common_pb2.OUTCOME_CANCELLED, error=attempt.stop_detail)

    # -- running -------------------------------------------------------------

    def _begin(self, attempt: Attempt) -> None:
        """Marks an attempt started: its run time and its timeout count from now."""
        attempt.began = time.monotonic()
        spec = attempt.spec
        if spec.HasField("timeout"):
            seconds = duration_from_pb(spec.timeout)
            attempt.timer = self.loop.call_later(seconds, self.stop, attempt, "timed_out", f"timed out after {seconds:g}s")

    def _run(self, attempt: Attempt) -> None:
        """Starts an attempt that was given its slots."""
        self._begin(attempt)
        kind = attempt.spec.WhichOneof("kind")
        if kind == "call":
            handler = self._handler_of(attempt)
            if handler is not None and handler.kind == "thread":
                self._run_thread(attempt, handler)
                return
            if handler is not None and handler.kind == "process":
                self._run_process(attempt, handler)
                return
        attempt.runner = self._spawn(self._run_task(attempt, kind))

    @staticmethod
    def _input(attempt: Attempt, handler) -> bytes:
        """A call's input; for :class:`weft.Executor`'s handler with parents, wrapped with their
        results (the futures passed as arguments, ``pickled.py``)."""
        data = bytes(attempt.spec.call.input)
        if attempt.parents and handler.name == PICKLE_HANDLER:
            data = with_parents(attempt.parents, data)
        return data

    def _thread_args(self, attempt: Attempt, handler) -> tuple:
        data = self._input(attempt, handler)
        if handler.wants_context:
            attempt.context = Context(self, attempt, "thread", data)
            return (data, attempt.context)
        return (data,)

    def _run_thread(self, attempt: Attempt, handler) -> None:
        args = self._thread_args(attempt, handler)
        self._started_soon(attempt)
        self.threads.submit(handler.fn, args, attempt, self._thread_done)

    def _run_process(self, attempt: Attempt, handler, ahead: bool = False) -> None:
        data = self._input(attempt, handler)
        call = self.processes.submit(
            handler.fn, data, attempt.task_id, attempt.attempt, handler.wants_context, tag=attempt,
            on_message=self._process_message, on_done=self._thread_done,
            secret_env=dict(attempt.spec.secret_env) if attempt.spec.secret_env else None, ahead=ahead,
            trace=(attempt.spec.trace.traceparent, attempt.spec.trace.tracestate),
            parents=attempt.parents if handler.wants_context else (),
        )
        attempt.pcall = call
        attempt.kill = call.kill

    def _process_message(self, attempt: Attempt, message: tuple) -> None:
        if message[0] == "begin":
            # Started names the process that runs it, once it does.
            if attempt.ahead:
                self._began_ahead(attempt)
            else:
                self._started_soon(attempt)
        elif message[0] == "output":
            self.output(attempt, message[3], message[2])
        else:
            self.progress(attempt, message[2], message[3])

    def _thread_done(self, attempt: Attempt, ok: bool, value: Any) -> None:
        """A thread or process handler returned (``ok``) or raised
        ``value``; on the loop."""
        attempt.work_done = True
        if attempt.finished:  # reported stopped already; only its slot was kept
            self._maybe_release(attempt)
            return
        if ok:
            try:
                output = to_output(value)
            except Exception as e:  # noqa: BLE001 - a result that is not bytes, str or JSON
                self.finish(attempt, common_pb2.OUTCOME_FAILED, error=error_text(e))
                return
            self.finish(attempt, SUCCEEDED, output=output)
        elif attempt.stop_reason is not None or value is KILLED:
            self._report_stopped(attempt)
        elif isinstance(value, PoolCallError):
            outcome = common_pb2.OUTCOME_START_FAILED if value.type_name == "StartFailed" else common_pb2.OUTCOME_FAILED
            self.finish(attempt, outcome, error=with_traceback(value.message, value.traceback))
        elif isinstance(value, StartFailed):
            self.finish(attempt, common_pb2.OUTCOME_START_FAILED, error=str(value))
        else:
            self.finish(attempt, common_pb2.OUTCOME_FAILED, error=error_text(value))

    async def _run_task(self, attempt: Attempt, kind: Optional[str]) -> None:
        try:
            if kind == "call":
                output = await self._run_call(attempt)
                if attempt.stop_reason is not None:
                    # A handler that swallowed its cancel and returned: it
                    # was stopped (cancelled, timed out), not successful.
                    self._report_stopped(attempt)
                else:
                    self.finish(attempt, SUCCEEDED, output=output)
            elif kind == "exec":
                await self._run_exec(attempt)
            else:
                raise StartFailed("task spec has neither exec nor call")
        except asyncio.CancelledError:
            self._report_stopped(attempt)
        except StartFailed as e:
            self.finish(attempt, common_pb2.OUTCOME_START_FAILED, error=str(e))
        except PoolCallError as e:
            outcome = common_pb2.OUTCOME_START_FAILED if e.type_name == "StartFailed" else common_pb2.OUTCOME_FAILED
            self.finish(attempt, outcome, error=with_traceback(e.message, e.traceback))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a handler's failure is the attempt's
            # sys.exit() in a handler ends the attempt, not the worker's loop (as on a thread).
            if attempt.stop_reason is not None:
                self._report_stopped(attempt)
            else:
                self.finish(attempt, common_pb2.OUTCOME_FAILED, error=error_text(e))
        except KeyboardInterrupt:
            # Ctrl-C stops the worker, as anywhere else on its loop: the interrupt goes on.
            # Draining first, so the slot this frees starts nothing (a prefetched thread
            # call would begin user code only to be killed at exit, and be run again
            # elsewhere) and the queued attempts are handed back. Their Finished and this
            # one are queued, but likely never sent: the interrupt stops the loop.
            self.set_draining()
            self.finish(attempt, common_pb2.OUTCOME_FAILED, error="KeyboardInterrupt: the worker was interrupted")
            raise
        finally:
            if not attempt.finished:  # defensive: exactly one Finished per attempt
                self.finish(attempt, common_pb2.OUTCOME_FAILED, error="attempt ended without a result")
            attempt.work_done = True
            self._maybe_release(attempt)

    async def _run_call(self, attempt: Attempt) -> bytes:
        call = attempt.spec.call
        handler = self.handlers.get(call.handler)
        if handler is None:
            known = ", ".join(self.handlers.names()) or "none"
            raise StartFailed(f"unknown handler '{call.handler}' (this worker serves: {known})")
        data = self._input(attempt, handler)
        if handler.kind == "asyncio":
            if handler.wants_context:
                attempt.context = Context(self, attempt, "asyncio", data)
                args = (data, attempt.context)
            else:
                args = (data,)
            self._started_soon(attempt)
            began = time.monotonic()
            result = await handler.fn(*args)
            # Its own run time, not its wait for the loop: what prefetch follows.
            attempt.ran_for = time.monotonic() - began
            return to_output(result)
        raise StartFailed(f"handler '{call.handler}' of kind {handler.kind!r} cannot run in a task")

    def _exec_started(self, attempt: Attempt, pid: int) -> None:
        attempt.pid = pid
        self._started(attempt)

    async def _run_exec(self, attempt: Attempt) -> None:
        # The coordinator matches exec tasks to the policy in Register; this
        # refuses what one assigns anyway, before anything starts.
        refusal = self.exec_policy.refusal(attempt.spec.exec, attempt.spec.secret_env)
        if refusal is not None:
            log.warning("refusing task %s attempt %d: %s", attempt.task_id, attempt.attempt, refusal)
            raise StartFailed(refusal)
        def set_kill(kill: Callable[[], None]) -> None:
            attempt.kill = kill

        try:
            files = ExecFiles(attempt.parents)
        except OSError as e:
            raise StartFailed(f"cannot write the task's parents' files: {e}") from None
        try:
            code = await run_exec(
                attempt.spec.exec,
                self.reaper,
                set_kill,
                lambda pid: self._exec_started(attempt, pid),
                lambda chunk, stream: self.output(attempt, chunk, stream),
                secret_env=attempt.spec.secret_env,
                trace=attempt.spec.trace if attempt.spec.HasField("trace") else None,
                weft_env=files.env(),
                room=self.outbox.room,
            )
            # Read whenever it ran to its end, as weft-node reads it (a failed run's too).
            output = (files.output() if attempt.stop_reason is None else None) or b""
        except ValueError as e:  # $WEFT_OUTPUT too large
            self.finish(attempt, common_pb2.OUTCOME_FAILED, exit_code=code if code >= 0 else None, error=str(e))
            return
        finally:
            files.remove()
        if attempt.stop_reason is not None:
            raise asyncio.CancelledError()
        if code == 0:
            self.finish(attempt, common_pb2.OUTCOME_SUCCEEDED, exit_code=0, output=output)
        elif code > 0:
            self.finish(attempt, common_pb2.OUTCOME_FAILED, output=output, exit_code=code, error=f"exited with code {code}")
        else:
            self.finish(attempt, common_pb2.OUTCOME_FAILED, output=output, error=f"killed by signal {-code}")
