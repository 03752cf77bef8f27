"""The Python worker's session with the coordinator: dial, Register and
Registered, heartbeats both ways (a silent coordinator ends the stream),
and what the coordinator sends.

The counterpart of ``node/src/session.rs``. One ``NodeService.Connect``
stream per :class:`Session`, run by :meth:`Sessions.run_session`;
reconnecting with backoff is ``reconnect.py``'s. Outgoing messages come
from the outbox (``outbox.py``), which also keeps what must survive a
reconnect; ``Assign`` and ``Cancel`` go to the attempts (``attempt.py``).
It must not run or finish attempts itself, nor batch events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, List, Optional

import grpc

from .. import errors
from .._channel import aio_channel
from .._proto import node_pb2, node_pb2_grpc
from ..models import duration_from_pb
from .attempt import Attempts
from .outbox import CLOSE, Outbox
from .slots import Slots

log = logging.getLogger("weft.worker")

#: The node protocol version this worker speaks.
PROTOCOL_VERSION = node_pb2.PROTOCOL_VERSION_1
#: How long the coordinator may take to answer Register.
REGISTER_TIMEOUT = 10.0


class Fatal(Exception):
    """The coordinator refused this worker: reconnecting would not help."""

    def __init__(self, error: errors.WeftError):
        super().__init__(str(error))
        self.error = error


class Session:
    """One Connect stream."""

    def __init__(self) -> None:
        self.registered = asyncio.Event()
        self.last_recv = time.monotonic()
        self.call = None
        self.node_id = ""
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 5.0
        self.closing = False
        self.dropped = False  # this side cancelled the call
        self.redeliver: List[node_pb2.NodeTaskEvent] = []  # listed in Register, sent after Registered


class Sessions:
    """The worker's sessions, one after another, and what outlives them
    (the node id, the first registration).

    ``worker`` is read for its public settings at each Register
    (``coordinator``, ``name``, ``labels``, ``slots``, ``handlers``);
    ``start_drain`` is called on a Drain, ``spawn`` starts a task the
    worker tracks."""

    def __init__(self, worker, attempts: Attempts, outbox: Outbox, slots: Slots, start_drain: Callable, spawn: Callable):
        self._worker = worker
        self._attempts = attempts
        self._outbox = outbox
        self._slots = slots
        self._start_drain = start_drain
        self._spawn = spawn
        self.current: Optional[Session] = None
        self.node_id = ""
        self.registered_once: Optional[asyncio.Event] = None

    def start(self) -> None:
        """Creates the first-registration event on the running loop."""
        self.registered_once = asyncio.Event()

    def drop(self) -> None:
        """Ends the current stream from this side, as a clean close."""
        session = self.current
        if session is not None and session.call is not None:
            session.closing = session.dropped = True
            session.call.cancel()

    async def run_session(self) -> None:
        """One Connect stream, from dial to its end: returns when it closed
        cleanly, raises :class:`Fatal` when the coordinator refused this
        worker, and any other error when the stream was lost."""
        worker, outbox = self._worker, self._outbox
        session = Session()
        # Listed as running: attempts still running, finished ones whose
        # Finished is not sent yet, and sent ones within the redelivery
        # window (sent again right after Registered, before any credits).
        session.redeliver, keys = outbox.begin_session()
        keys.update(a.key for a in self._attempts.table.values() if not a.finished_sent)
        running = [node_pb2.AttemptRef(task_id=t, attempt=n) for t, n in sorted(keys)]
        exec_mode, exec_allow = worker.exec_policy.register_fields()
        register = node_pb2.Register(
            name=worker.name,
            labels=worker.labels,
            slots=worker.slots,
            handlers=worker.handlers,
            protocol_version=PROTOCOL_VERSION,
            running=running,
            previous_node_id=self.node_id,
            exec=exec_mode,
            exec_allow=exec_allow,
        )
        log.info("connecting to %s as %s (%d running)", worker.coordinator, worker.name, len(running))
        channel = aio_channel(worker.coordinator, ca_file=worker.ca_file, ca_pin=worker.ca_pin)
        self.current = session
        outbox.attached = True
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

            register_timer = asyncio.get_running_loop().call_later(REGISTER_TIMEOUT, register_timed_out)
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
                    self._on_message(body, message)
            except asyncio.CancelledError:
                if not session.dropped:
                    raise
                if session.closing:
                    return
                raise RuntimeError("stream dropped") from None
            except grpc.RpcError as e:
                code = e.code()
                if first and code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                    raise Fatal(errors.from_rpc_error(e)) from None
                if session.closing and code == grpc.StatusCode.CANCELLED:
                    return
                raise RuntimeError(f"{code.name}: {e.details()}") from None
            if not session.closing:
                raise RuntimeError("coordinator closed the stream")
        finally:
            if register_timer is not None:
                register_timer.cancel()
            session.closing = True
            outbox.credits_open = False
            if heartbeat is not None:
                heartbeat.cancel()
            if self.current is session:
                self.current = None
                outbox.attached = False
            outbox.wake()
            await channel.close(grace=None)

    async def _requests(self, session: Session, register: node_pb2.Register):
        outbox = self._outbox
        yield node_pb2.NodeMessage(register=register)
        await session.registered.wait()
        while True:
            if session.closing:
                return
            if not outbox.queue:
                outbox.ready.clear()
                await outbox.ready.wait()
                continue
            message = outbox.take(self._attempts.finished_sent)
            if message is CLOSE:
                session.closing = True
                return
            yield message

    def _on_registered(self, session: Session, registered: node_pb2.Registered) -> None:
        session.node_id = registered.node_id
        self.node_id = registered.node_id
        interval = duration_from_pb(registered.heartbeat_interval)
        timeout = duration_from_pb(registered.heartbeat_timeout)
        session.heartbeat_interval = max(0.01, interval) if interval > 0 else 1.0
        session.heartbeat_timeout = max(0.05, timeout) if timeout > 0 else 5.0
        log.info("registered as node %s", registered.node_id)
        session.registered.set()
        # Results an earlier stream took go out again first, then credits.
        self._outbox.resend_first(session.redeliver)
        if self._slots.draining:
            self._outbox.control_first(node_pb2.NodeMessage(draining=node_pb2.Draining()))
            self._outbox.credits_open = True
        else:
            self._outbox.open_credits(self._slots.free)
        self._outbox.wake()
        self.registered_once.set()

    async def _heartbeats(self, session: Session) -> None:
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
            self._outbox.control(beat)

    def _on_message(self, body: Optional[str], message: node_pb2.CoordinatorMessage) -> None:
        if body == "assign":
            for assignment in message.assign.tasks:
                self._attempts.assign(assignment)
        elif body == "cancel":
            key = (message.cancel.task_id, message.cancel.attempt)
            # Stale at the coordinator: its result is not sent again.
            self._outbox.forget(key)
            attempt = self._attempts.table.get(key)
            if attempt is None:
                log.debug("cancel for unknown attempt %s#%s ignored", *key)
            else:
                self._attempts.stop(attempt, "cancelled", message.cancel.reason or "cancelled by the coordinator")
        elif body == "drain":
            grace = duration_from_pb(message.drain.grace) if message.drain.HasField("grace") else None
            self._start_drain(grace)
        elif body in ("heartbeat", "registered"):
            pass
        else:
            log.warning("unknown coordinator message %r ignored", body)
