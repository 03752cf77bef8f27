"""A Weft worker in Python: serve Python functions to a coordinator.

>>> import weft
>>> worker = weft.Worker("http://127.0.0.1:7070", slots=4, labels={"lang": "py"})
>>> @worker.handler(kind="asyncio")          # a coroutine on the worker's loop
... async def fetch(data: bytes) -> bytes: ...
>>> @worker.handler(kind="thread")           # blocking code, on a thread pool
... def resize(data: bytes) -> bytes: ...
>>> @worker.handler(kind="process")          # CPU-bound, on a process pool
... def crunch(data: bytes) -> bytes: ...
>>> worker.run()                             # until drained (SIGTERM/SIGINT)

The worker speaks the node protocol (``proto/README.md``) over one
``NodeService.Connect`` stream: Register first (protocol version 1, slots,
labels, handler names, and after a reconnect the attempts it still runs and
its previous node id), incremental credits, heartbeats both ways, events
named by (task_id, attempt), Cancel within a second, Drain, and reconnect
with backoff when the stream ends or the coordinator falls silent.

It runs ``exec`` tasks too (a child process in its own process group, output
streamed), because a coordinator may assign those to any node.

A handler takes ``(input: bytes)`` or ``(input: bytes, ctx: weft.Context)``
and returns bytes, str, None (empty output) or anything JSON-serialisable.
Raising fails the attempt (retried under the task's max_attempts);
``raise weft.HandlerError("msg")`` fails it with exactly "msg" as the error.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

import grpc

from . import errors
from ._channel import aio_channel, coordinator_url
from ._pool import PoolCallError, ProcessPool
from ._proto import common_pb2, node_pb2, node_pb2_grpc
from .models import DurationLike, duration_from_pb, parse_duration

log = logging.getLogger("weft.worker")

#: The node protocol version this worker speaks.
PROTOCOL_VERSION = node_pb2.PROTOCOL_VERSION_1
#: How handlers run.
KINDS = ("asyncio", "thread", "process")
#: Largest output chunk sent in one event.
CHUNK_LIMIT = 64 * 1024
#: Most events in one TaskEvents batch.
BATCH_LIMIT = 512
#: Payload bytes after which a batch is sent (well under gRPC's 4 MiB limit).
BATCH_BYTES = 1024 * 1024
#: How long the coordinator may take to answer Register.
REGISTER_TIMEOUT = 10.0
#: A cancelled handler that has not stopped by then is reported CANCELLED anyway.
CANCEL_REPORT_WITHIN = 0.75
#: How long a sent Finished is kept to be sent again after a reconnect (the
#: coordinator may have crashed before recording it).
REDELIVER_WINDOW = 60.0
#: Most sent Finished events kept for redelivery, and most payload bytes.
REDELIVER_MAX = 10_000
REDELIVER_MAX_BYTES = 64 * 1024 * 1024


class HandlerError(Exception):
    """Raise from a handler to fail the attempt with exactly this message."""

    weft_plain_message = True


class StartFailed(Exception):
    """The attempt could not start (unknown handler, missing binary): not retried."""


@dataclass
class Handler:
    """A registered handler: the function, its name and how it runs."""

    name: str
    fn: Callable
    kind: str
    wants_context: bool


class Context:
    """What a handler can do besides returning: output, progress, check for cancel.

    Passed as the second argument to handlers that take two parameters.
    Thread handlers should poll :attr:`cancelled` (or call
    :meth:`check_cancelled`) in long loops: a thread cannot be killed, so a
    cancelled thread handler is reported CANCELLED at once but keeps its slot
    until it returns. Asyncio handlers are cancelled with CancelledError,
    process handlers by killing their pool process.
    """

    def __init__(self, worker: "Worker", attempt: "_Attempt", kind: str, input: bytes):
        self._worker = worker
        self._attempt = attempt
        self.kind = kind
        self.input = input
        self.task_id = attempt.task_id
        self.attempt = attempt.attempt
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
        """Sends a chunk of output (``stream`` is ``"stdout"`` or ``"stderr"``)."""
        if isinstance(data, str):
            data = data.encode()
        self._call(self._worker._output, self._attempt, bytes(data), stream)

    def print(self, *args: Any, sep: str = " ", end: str = "\n", stream: str = "stdout") -> None:
        """Like ``print``, into the task's output."""
        self.output(sep.join(str(a) for a in args) + end, stream)

    def progress(self, fraction: float, message: str = "") -> None:
        """Reports progress: ``fraction`` in 0..1 (negative when unknown)."""
        self._call(self._worker._progress, self._attempt, float(fraction), str(message))

    def _call(self, fn, *args) -> None:
        loop = self._worker._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)


class _Attempt:
    """One (task_id, attempt) this worker runs."""

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
        self.released = False
        self.next_output_seq = 0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.kill: Optional[Callable[[], None]] = None  # hard stop (process group, pool process)

    def __repr__(self) -> str:
        return f"{self.task_id}#{self.attempt}"


_CLOSE = object()


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


class _Reaper:
    """The process beside this worker that kills its exec tasks' process
    groups if the worker dies outright (see ``weft._reaper``)."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_reaper.py")
        if getattr(sys, "frozen", False) or not os.path.isfile(script) or not sys.executable:
            log.warning("no reaper in this packaging: exec tasks will outlive a worker that is killed outright")
            return
        try:
            self._proc: Optional[subprocess.Popen] = subprocess.Popen(
                [sys.executable, "-I", "-S", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C meant for the worker is not for it
            )
        except OSError as e:
            log.warning("cannot start the reaper (%s): exec tasks will outlive a worker that is killed outright", e)
            self._proc = None
            return
        _REAPER_FDS.add(self._proc.stdin.fileno())

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (OSError, ValueError):
            log.warning("the reaper is gone: exec tasks will outlive a worker that is killed outright")
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
        if self._proc is None:
            return
        self._forget_fd()
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
            proc.wait(timeout=1)
        except (OSError, subprocess.TimeoutExpired):
            pass


class _Session:
    """One Connect stream."""

    def __init__(self) -> None:
        self.registered = asyncio.Event()
        self.credits_open = False
        self.last_recv = time.monotonic()
        self.call = None
        self.node_id = ""
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 5.0
        self.closing = False
        self.dropped = False  # this side cancelled the call
        self.redeliver: List[node_pb2.NodeTaskEvent] = []  # listed in Register, sent after Registered


def _payload_bytes(event: node_pb2.NodeTaskEvent) -> int:
    return len(event.finished.output) + len(event.finished.error)


def _handler_wants_context(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _to_output(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


def _error_text(e: BaseException) -> str:
    if getattr(e, "weft_plain_message", False):
        return str(e)
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Worker:
    """A node that serves registered Python functions (and exec tasks).

    ``coordinator``: URL like ``http://127.0.0.1:7070`` (default
    ``$WEFT_COORDINATOR``). ``slots``: how many slots of work it takes at
    once (default: number of CPUs). ``labels``: key=value pairs tasks can
    require. ``process_workers``: size of the process pool (default: slots).
    ``drain_grace``: how long running attempts may finish when draining on a
    signal or a Drain without a grace.
    """

    def __init__(
        self,
        coordinator: Optional[str] = None,
        *,
        slots: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        name: Optional[str] = None,
        drain_grace: DurationLike = 30.0,
        reconnect_min: DurationLike = 0.1,
        reconnect_max: DurationLike = 5.0,
        process_workers: Optional[int] = None,
        thread_workers: Optional[int] = None,
    ):
        self.coordinator = coordinator_url(coordinator)
        self.slots = int(slots if slots is not None else (os.cpu_count() or 1))
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        self.labels = dict(labels or {})
        self.name = name or f"{socket.gethostname()}-py{os.getpid()}"
        self.drain_grace = parse_duration(drain_grace)
        self.reconnect_min = parse_duration(reconnect_min)
        self.reconnect_max = parse_duration(reconnect_max)
        self._process_workers = process_workers or self.slots
        self._thread_workers = thread_workers or self.slots
        self._handlers: Dict[str, Handler] = {}
        self._attempts: Dict[Tuple[str, int], _Attempt] = {}
        self._used = 0
        self._out: Deque[Any] = collections.deque()
        # Sent Finished events within the redelivery window: key -> (sent at, event), oldest first.
        self._redeliver: "collections.OrderedDict[Tuple[str, int], Tuple[float, node_pb2.NodeTaskEvent]]" = (
            collections.OrderedDict()
        )
        self._redeliver_bytes = 0
        self._out_ready: Optional[asyncio.Event] = None
        self._session: Optional[_Session] = None
        self._node_id = ""
        self._draining = False
        self._drain_task: Optional[asyncio.Task] = None
        self._stopped: Optional[asyncio.Event] = None
        self._registered_once: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._threads: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._processes: Optional[ProcessPool] = None
        self._tasks: set = set()
        self._reaper: Optional[_Reaper] = None

    # -- registration -------------------------------------------------------

    def register(self, name: str, fn: Callable, kind: Optional[str] = None) -> Handler:
        """Registers ``fn`` as the handler ``name``.

        ``kind`` is ``"asyncio"`` (default for ``async def``), ``"thread"``
        (default for plain functions) or ``"process"`` (CPU-bound work; the
        function must be importable: defined at module level).
        """
        if kind is None:
            kind = "asyncio" if inspect.iscoroutinefunction(fn) else "thread"
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if kind == "asyncio" and not inspect.iscoroutinefunction(fn):
            raise TypeError(f"handler {name!r}: kind='asyncio' needs an `async def` function (use kind='thread' for blocking code)")
        if kind != "asyncio" and inspect.iscoroutinefunction(fn):
            raise TypeError(f"handler {name!r}: an `async def` function must use kind='asyncio'")
        if not name:
            raise ValueError("handler name must not be empty")
        handler = Handler(name=name, fn=fn, kind=kind, wants_context=_handler_wants_context(fn))
        self._handlers[name] = handler
        return handler

    def handler(self, name: Optional[str] = None, *, kind: Optional[str] = None) -> Callable:
        """Decorator form of :meth:`register`; the name defaults to the function's."""

        def decorate(fn: Callable) -> Callable:
            self.register(name or fn.__name__, fn, kind)
            return fn

        return decorate

    @property
    def handlers(self) -> List[str]:
        """Names of the registered handlers."""
        return sorted(self._handlers)

    @property
    def node_id(self) -> str:
        """The node id the coordinator gave this worker ("" before registering)."""
        return self._node_id

    # -- running ------------------------------------------------------------

    def run(self) -> None:
        """Serves until drained. SIGTERM/SIGINT drain; a second signal exits at once."""
        asyncio.run(self._run_with_signals())

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("signal received: draining (again to exit at once)")
                self.start_drain()
            else:
                log.warning("second signal: exiting at once")
                self._kill_everything()
                os._exit(130)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        await self.serve()

    async def serve(self) -> None:
        """Connects, serves, reconnects; returns once the worker has drained."""
        self._loop = asyncio.get_running_loop()
        self._out_ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._registered_once = asyncio.Event()
        self._threads = concurrent.futures.ThreadPoolExecutor(self._thread_workers, thread_name_prefix="weft-handler")
        if any(h.kind == "process" for h in self._handlers.values()):
            self._processes = ProcessPool(self._process_workers)
        self._reaper = _Reaper()
        backoff = self.reconnect_min
        try:
            while not self._stopped.is_set():
                started = time.monotonic()
                try:
                    await self._run_session()
                except _Fatal as e:
                    raise e.error from None
                except Exception as e:  # noqa: BLE001 - any session failure reconnects
                    log.warning("session ended: %s", e)
                if self._stopped.is_set():
                    break
                if self._draining:
                    # The drain finishes locally and stops the worker.
                    await self._stopped.wait()
                    break
                if time.monotonic() - started > 5.0:
                    backoff = self.reconnect_min
                delay = backoff * (0.5 + random.random() / 2)
                backoff = min(self.reconnect_max, max(backoff * 2, self.reconnect_min))
                log.info("reconnecting in %.2fs", delay)
                try:
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._stopped.set()
            self._kill_everything()
            for task in list(self._tasks):
                task.cancel()
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._reaper.close()

    async def registered(self, timeout: Optional[float] = None) -> str:
        """Waits until the first Registered; returns the node id."""
        while self._registered_once is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(self._registered_once.wait(), timeout)
        return self._node_id

    def start_drain(self, grace: Optional[DurationLike] = None) -> None:
        """Starts draining (like SIGTERM): no new work, finish or cancel, close, stop."""
        if self._draining or self._loop is None:
            return
        self._draining = True
        grace_s = self.drain_grace if grace is None else parse_duration(grace)
        self._send_control(node_pb2.NodeMessage(draining=node_pb2.Draining()))
        self._drain_task = self._spawn(self._drain(grace_s))

    async def drain(self, grace: Optional[DurationLike] = None) -> None:
        """Drains and waits until the worker has stopped."""
        self.start_drain(grace)
        if self._stopped is not None:
            await self._stopped.wait()

    def stop(self) -> None:
        """Stops at once, like a crash: kills running work, reports nothing."""
        self._kill_everything()
        if self._stopped is not None:
            self._stopped.set()
        session = self._session
        if session is not None and session.call is not None:
            session.closing = session.dropped = True
            session.call.cancel()

    # -- the session --------------------------------------------------------

    async def _run_session(self) -> None:
        session = _Session()
        # Control messages of a dead session are meaningless; events are kept.
        self._out = collections.deque(item for item in self._out if isinstance(item, node_pb2.NodeTaskEvent))
        # Listed as running: attempts still running, finished ones whose
        # Finished is not sent yet, and sent ones within the redelivery
        # window (a restarted coordinator may not have recorded them; they
        # are sent again right after Registered, before any credits).
        self._prune_redelivery(time.monotonic())
        session.redeliver = [event for _, event in self._redeliver.values()]
        # A redelivered result the last stream did not take is sent once.
        self._out = collections.deque(
            e for e in self._out if not (e.WhichOneof("body") == "finished" and (e.task_id, e.attempt) in self._redeliver)
        )
        keys = {a.key for a in self._attempts.values() if not a.finished_sent}
        keys.update(
            (e.task_id, e.attempt)
            for e in self._out
            if isinstance(e, node_pb2.NodeTaskEvent) and e.WhichOneof("body") == "finished"
        )
        keys.update((e.task_id, e.attempt) for e in session.redeliver)
        running = [node_pb2.AttemptRef(task_id=t, attempt=n) for t, n in sorted(keys)]
        register = node_pb2.Register(
            name=self.name,
            labels=self.labels,
            slots=self.slots,
            handlers=self.handlers,
            protocol_version=PROTOCOL_VERSION,
            running=running,
            previous_node_id=self._node_id,
        )
        log.info("connecting to %s as %s (%d running)", self.coordinator, self.name, len(running))
        channel = aio_channel(self.coordinator)
        self._session = session
        heartbeat: Optional[asyncio.Task] = None
        register_timer: Optional[asyncio.TimerHandle] = None
        try:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            call = stub.Connect(self._requests(session, register))
            session.call = call

            def register_timed_out() -> None:
                if not session.registered.is_set() and not session.closing:
                    log.warning("no Registered within %.0fs: reconnecting", REGISTER_TIMEOUT)
                    session.dropped = True
                    call.cancel()

            register_timer = self._loop.call_later(REGISTER_TIMEOUT, register_timed_out)
            first = True
            try:
                async for message in call:
                    session.last_recv = time.monotonic()
                    body = message.WhichOneof("body")
                    if first:
                        first = False
                        if body != "registered":
                            raise RuntimeError(f"coordinator's first message was {body!r}, not registered")
                        self._on_registered(session, message.registered)
                        heartbeat = self._spawn(self._heartbeats(session))
                        continue
                    self._on_message(session, body, message)
            except asyncio.CancelledError:
                if not session.dropped:
                    raise
                if session.closing:
                    return
                raise RuntimeError("stream dropped") from None
            except grpc.RpcError as e:
                code = e.code()
                if first and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                    raise _Fatal(errors.from_rpc_error(e)) from None
                if session.closing and code == grpc.StatusCode.CANCELLED:
                    return
                raise RuntimeError(f"{code.name}: {e.details()}") from None
            if not session.closing:
                raise RuntimeError("coordinator closed the stream")
        finally:
            if register_timer is not None:
                register_timer.cancel()
            session.closing = True
            session.credits_open = False
            if heartbeat is not None:
                heartbeat.cancel()
            if self._session is session:
                self._session = None
            self._wake()
            await channel.close(grace=None)

    async def _requests(self, session: _Session, register: node_pb2.NodeMessage):
        yield node_pb2.NodeMessage(register=register)
        await session.registered.wait()
        while True:
            if session.closing:
                return
            if not self._out:
                self._out_ready.clear()
                await self._out_ready.wait()
                continue
            item = self._out.popleft()
            if item is _CLOSE:
                session.closing = True
                return
            if isinstance(item, node_pb2.NodeTaskEvent):
                batch, size = [item], item.ByteSize()
                while (
                    self._out
                    and isinstance(self._out[0], node_pb2.NodeTaskEvent)
                    and len(batch) < BATCH_LIMIT
                    and size < BATCH_BYTES
                ):
                    batch.append(self._out.popleft())
                    size += batch[-1].ByteSize()
                now = time.monotonic()
                for event in batch:
                    if event.WhichOneof("body") == "finished":
                        key = (event.task_id, event.attempt)
                        attempt = self._attempts.get(key)
                        if attempt is not None:
                            attempt.finished_sent = True
                        if key not in self._redeliver:
                            self._redeliver[key] = (now, event)
                            self._redeliver_bytes += _payload_bytes(event)
                self._prune_redelivery(now)
                yield node_pb2.NodeMessage(events=node_pb2.TaskEvents(events=batch))
            else:
                yield item

    def _on_registered(self, session: _Session, registered: node_pb2.Registered) -> None:
        session.node_id = registered.node_id
        self._node_id = registered.node_id
        interval = duration_from_pb(registered.heartbeat_interval)
        timeout = duration_from_pb(registered.heartbeat_timeout)
        session.heartbeat_interval = max(0.01, interval) if interval > 0 else 1.0
        session.heartbeat_timeout = max(0.05, timeout) if timeout > 0 else 5.0
        log.info("registered as node %s", registered.node_id)
        session.registered.set()
        # Results an earlier stream took go out again first, then credits.
        self._out.extendleft(reversed(session.redeliver))
        if self._draining:
            self._out.appendleft(node_pb2.NodeMessage(draining=node_pb2.Draining()))
        else:
            free = self.slots - self._used
            if free > 0:
                self._send_control(node_pb2.NodeMessage(credits=node_pb2.Credits(grant=free)))
        session.credits_open = True
        self._wake()
        self._registered_once.set()

    async def _heartbeats(self, session: _Session) -> None:
        beat = node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat())
        while not session.closing:
            await asyncio.sleep(min(session.heartbeat_interval, session.heartbeat_timeout / 2))
            if session.closing:
                return
            if time.monotonic() - session.last_recv > session.heartbeat_timeout:
                log.warning("coordinator silent for %.1fs: reconnecting", session.heartbeat_timeout)
                session.dropped = True
                if session.call is not None:
                    session.call.cancel()
                return
            self._send_control(beat)

    def _on_message(self, session: _Session, body: Optional[str], message: node_pb2.CoordinatorMessage) -> None:
        if body == "assign":
            for assignment in message.assign.tasks:
                self._assign(assignment)
        elif body == "cancel":
            # Stale at the coordinator: its result is not sent again.
            forgotten = self._redeliver.pop((message.cancel.task_id, message.cancel.attempt), None)
            if forgotten is not None:
                self._redeliver_bytes -= _payload_bytes(forgotten[1])
            attempt = self._attempts.get((message.cancel.task_id, message.cancel.attempt))
            if attempt is None:
                log.debug("cancel for unknown attempt %s#%s ignored", message.cancel.task_id, message.cancel.attempt)
            else:
                self._stop_attempt(attempt, "cancelled", message.cancel.reason or "cancelled by the coordinator")
        elif body == "drain":
            grace = duration_from_pb(message.drain.grace) if message.drain.HasField("grace") else None
            self.start_drain(grace)
        elif body in ("heartbeat", "registered"):
            pass
        else:
            log.warning("unknown coordinator message %r ignored", body)

    def _prune_redelivery(self, now: float) -> None:
        """Drops results past the redelivery window or beyond its bounds, oldest first."""
        while self._redeliver:
            sent_at, event = next(iter(self._redeliver.values()))
            if (
                sent_at + REDELIVER_WINDOW >= now
                and len(self._redeliver) <= REDELIVER_MAX
                and self._redeliver_bytes <= REDELIVER_MAX_BYTES
            ):
                return
            self._redeliver.popitem(last=False)
            self._redeliver_bytes -= _payload_bytes(event)

    # -- outgoing -----------------------------------------------------------

    def _wake(self) -> None:
        if self._out_ready is not None:
            self._out_ready.set()

    def _send_control(self, message: node_pb2.NodeMessage) -> None:
        if self._session is None:
            return
        self._out.append(message)
        self._wake()

    def _event(self, attempt: _Attempt, **body) -> None:
        self._out.append(node_pb2.NodeTaskEvent(task_id=attempt.task_id, attempt=attempt.attempt, **body))
        self._wake()

    def _output(self, attempt: _Attempt, data: bytes, stream: str = "stdout") -> None:
        if attempt.finished or not data:
            return
        stream_pb = common_pb2.OUTPUT_STREAM_STDERR if stream == "stderr" else common_pb2.OUTPUT_STREAM_STDOUT
        for start in range(0, len(data), CHUNK_LIMIT):
            chunk = node_pb2.OutputChunk(stream=stream_pb, data=data[start:start + CHUNK_LIMIT], seq=attempt.next_output_seq)
            attempt.next_output_seq += 1
            self._event(attempt, output=chunk)

    def _progress(self, attempt: _Attempt, fraction: float, message: str) -> None:
        if not attempt.finished:
            self._event(attempt, progress=node_pb2.Progress(fraction=fraction, message=message))

    def _finish(self, attempt: _Attempt, outcome: int, *, output: bytes = b"", error: str = "", exit_code: Optional[int] = None) -> None:
        if attempt.finished:
            return
        attempt.finished = True
        if attempt.timer is not None:
            attempt.timer.cancel()
        finished = node_pb2.Finished(outcome=outcome, output=output, error=error)
        if exit_code is not None:
            finished.exit_code = exit_code
        log.debug("attempt %r finished: %s %s", attempt, common_pb2.Outcome.Name(outcome), error)
        self._event(attempt, finished=finished)
        self._maybe_release(attempt)

    def _maybe_release(self, attempt: _Attempt) -> None:
        if attempt.released or not (attempt.finished and attempt.work_done):
            return
        attempt.released = True
        self._used -= attempt.slots
        if self._attempts.get(attempt.key) is attempt:
            del self._attempts[attempt.key]
        session = self._session
        if session is not None and session.credits_open and not self._draining:
            self._send_control(node_pb2.NodeMessage(credits=node_pb2.Credits(grant=attempt.slots)))

    # -- attempts -----------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _assign(self, assignment: node_pb2.Assignment) -> None:
        key = (assignment.task_id, assignment.attempt)
        if key in self._attempts:
            log.debug("duplicate assignment %s#%s ignored", *key)
            return
        attempt = _Attempt(assignment.task_id, assignment.attempt, assignment.spec)
        if self._draining:
            attempt.work_done = True
            attempt.released = True  # never counted
            self._finish(attempt, common_pb2.OUTCOME_CANCELLED, error="node is draining")
            return
        if self._used + attempt.slots > self.slots:
            log.warning("attempt %r assigned beyond the granted credits (%d used of %d)", attempt, self._used, self.slots)
        self._attempts[key] = attempt
        self._used += attempt.slots
        if assignment.spec.HasField("timeout"):
            seconds = duration_from_pb(assignment.spec.timeout)
            attempt.timer = self._loop.call_later(seconds, self._stop_attempt, attempt, "timed_out", f"timed out after {seconds:g}s")
        attempt.runner = self._spawn(self._run_attempt(attempt))

    def _stop_attempt(self, attempt: _Attempt, reason: str, detail: str) -> None:
        if attempt.finished or attempt.stop_reason is not None:
            return
        attempt.stop_reason, attempt.stop_detail = reason, detail
        log.info("stopping attempt %r: %s", attempt, detail)
        if attempt.context is not None:
            attempt.context._cancel.set()
        if attempt.kill is not None:
            attempt.kill()
        if attempt.runner is not None:
            attempt.runner.cancel()
        # A handler that swallows the cancel is reported stopped anyway.
        self._loop.call_later(CANCEL_REPORT_WITHIN, self._report_stopped, attempt)

    def _report_stopped(self, attempt: _Attempt) -> None:
        if attempt.finished:
            return
        if attempt.stop_reason == "timed_out":
            self._finish(attempt, common_pb2.OUTCOME_TIMED_OUT, error=attempt.stop_detail)
        else:
            self._finish(attempt, common_pb2.OUTCOME_CANCELLED, error=attempt.stop_detail)

    async def _run_attempt(self, attempt: _Attempt) -> None:
        try:
            kind = attempt.spec.WhichOneof("kind")
            if kind == "call":
                output = await self._run_call(attempt)
                self._finish(attempt, common_pb2.OUTCOME_SUCCEEDED, output=output)
            elif kind == "exec":
                await self._run_exec(attempt)
            else:
                raise StartFailed("task spec has neither exec nor call")
        except asyncio.CancelledError:
            self._report_stopped(attempt)
        except StartFailed as e:
            self._finish(attempt, common_pb2.OUTCOME_START_FAILED, error=str(e))
        except PoolCallError as e:
            outcome = common_pb2.OUTCOME_START_FAILED if e.type_name == "StartFailed" else common_pb2.OUTCOME_FAILED
            self._finish(attempt, outcome, error=e.message)
        except Exception as e:  # noqa: BLE001 - a handler's failure is the attempt's
            if attempt.stop_reason is not None:
                self._report_stopped(attempt)
            else:
                self._finish(attempt, common_pb2.OUTCOME_FAILED, error=_error_text(e))
        finally:
            if not attempt.finished:  # defensive: exactly one Finished per attempt
                self._finish(attempt, common_pb2.OUTCOME_FAILED, error="attempt ended without a result")
            if not attempt.work_done and attempt.kill is None and attempt.context is not None and attempt.context.kind == "thread":
                pass  # released by the thread's own completion callback
            else:
                attempt.work_done = True
                self._maybe_release(attempt)

    async def _run_call(self, attempt: _Attempt) -> bytes:
        call = attempt.spec.call
        handler = self._handlers.get(call.handler)
        if handler is None:
            known = ", ".join(self.handlers) or "none"
            raise StartFailed(f"unknown handler '{call.handler}' (this worker serves: {known})")
        data = bytes(call.input)
        context = Context(self, attempt, handler.kind, data)
        attempt.context = context
        args = (data, context) if handler.wants_context else (data,)
        if handler.kind == "asyncio":
            self._event(attempt, started=node_pb2.Started())
            return _to_output(await handler.fn(*args))
        if handler.kind == "thread":
            future = self._threads.submit(handler.fn, *args)

            def thread_done(_f) -> None:
                def release() -> None:
                    attempt.work_done = True
                    self._maybe_release(attempt)

                if not self._loop.is_closed():
                    self._loop.call_soon_threadsafe(release)

            future.add_done_callback(thread_done)
            self._event(attempt, started=node_pb2.Started())
            return _to_output(await asyncio.wrap_future(future))
        # process
        def on_message(message: tuple) -> None:
            if message[0] == "output":
                self._output(attempt, message[2], message[1])
            else:
                self._progress(attempt, message[1], message[2])

        pcall = await self._processes.call(handler.fn, data, attempt.task_id, attempt.attempt, handler.wants_context, on_message)
        attempt.kill = pcall.kill
        self._event(attempt, started=node_pb2.Started(pid=pcall.pid))
        try:
            return _to_output(await pcall.result)
        finally:
            pcall.kill()  # no-op when it already finished

    async def _run_exec(self, attempt: _Attempt) -> None:
        spec = attempt.spec.exec
        if not spec.argv:
            raise StartFailed("exec task with an empty argv")
        env = dict(os.environ)
        env.update(spec.env)
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.PIPE if spec.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=spec.cwd or None,
                env=env,
                start_new_session=True,
            )
        except (OSError, ValueError) as e:
            raise StartFailed(f"cannot start {spec.argv[0]!r}: {e}") from None

        def kill() -> None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

        attempt.kill = kill
        reaper = self._reaper
        if reaper is not None:
            reaper.watch(proc.pid)
        self._event(attempt, started=node_pb2.Started(pid=proc.pid))

        async def pump(reader: asyncio.StreamReader, stream: str) -> None:
            while True:
                chunk = await reader.read(CHUNK_LIMIT)
                if not chunk:
                    return
                self._output(attempt, chunk, stream)

        async def feed() -> None:
            try:
                proc.stdin.write(bytes(spec.stdin))
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                proc.stdin.close()

        io = [asyncio.ensure_future(pump(proc.stdout, "stdout")), asyncio.ensure_future(pump(proc.stderr, "stderr"))]
        if spec.stdin:
            io.append(asyncio.ensure_future(feed()))
        told_gone = False

        def gone() -> None:
            nonlocal told_gone
            if reaper is not None and not told_gone:
                told_gone = True
                reaper.forget(proc.pid)

        try:
            code = await proc.wait()
            kill()  # what it left running in its group goes with it
            gone()
            await asyncio.gather(*io)
        except asyncio.CancelledError:
            kill()
            await asyncio.shield(proc.wait())
            gone()
            for task in io:
                task.cancel()
            raise
        if attempt.stop_reason is not None:
            raise asyncio.CancelledError()
        if code == 0:
            self._finish(attempt, common_pb2.OUTCOME_SUCCEEDED, exit_code=0)
        elif code > 0:
            self._finish(attempt, common_pb2.OUTCOME_FAILED, exit_code=code, error=f"exited with code {code}")
        else:
            self._finish(attempt, common_pb2.OUTCOME_FAILED, error=f"killed by signal {-code}")

    async def _drain(self, grace: float) -> None:
        log.info("draining: %d running, grace %.1fs", len(self._attempts), grace)
        deadline = time.monotonic() + grace
        while any(not a.finished for a in self._attempts.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for attempt in list(self._attempts.values()):
            self._stop_attempt(attempt, "cancelled", "node drained past its grace period")
        while any(not a.finished for a in self._attempts.values()):
            await asyncio.sleep(0.02)
        # Let the queued events go out, then close the stream and stop.
        session = self._session
        if session is not None and session.registered.is_set():
            self._out.append(_CLOSE)
            self._wake()
            flush_deadline = time.monotonic() + 5.0
            while _CLOSE in self._out and time.monotonic() < flush_deadline:
                await asyncio.sleep(0.01)
            # Give the coordinator a moment to end its side after our half-close.
            end_deadline = time.monotonic() + 2.0
            while self._session is session and time.monotonic() < end_deadline:
                await asyncio.sleep(0.01)
            if self._session is session and session.call is not None:
                session.dropped = True
                session.call.cancel()
        log.info("drained")
        self._stopped.set()
        session = self._session
        if session is not None and session.call is not None:
            session.closing = session.dropped = True
            session.call.cancel()

    def _kill_everything(self) -> None:
        for attempt in list(self._attempts.values()):
            if attempt.kill is not None:
                attempt.kill()
            if attempt.context is not None:
                attempt.context._cancel.set()
        if self._processes is not None:
            self._processes.shutdown()


class _Fatal(Exception):
    def __init__(self, error: errors.WeftError):
        super().__init__(str(error))
        self.error = error
