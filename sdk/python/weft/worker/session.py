"""The Python worker's session with the coordinator: dial, Register and
Registered, heartbeats both ways (a silent coordinator ends the stream),
what the coordinator sends, and a joined worker's identity on the stream:
joining before the first session when it must, presenting its certificate,
and renewing it over the session at 2/3 of its lifetime.

The counterpart of ``node/src/session.rs``. One ``NodeService.Connect``
stream per :class:`Session`, run by :meth:`Sessions.run_session`;
reconnecting with backoff is ``reconnect.py``'s. Outgoing messages come
from the outbox (``outbox.py``), which also keeps what must survive a
reconnect; ``Assign`` and ``Cancel`` go to the attempts (``attempt.py``).
After each batch it sends it grants the credits ``slots.py`` answers (one
``Credits`` for many releases), and every message heard renews the lease
(``lease.py``).
The state dir and the certificate requests are ``identity.py``'s, the
token and Join ``join.py``'s.
It must not run or finish attempts itself, nor batch events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, List, Optional

import grpc

from .. import errors
from .._channel import PinMismatch, open_aio_channel
from .._proto import node_pb2, node_pb2_grpc
from ..models import duration_from_pb
from .attempt import Attempts
from .identity import Identity, RENEW_AT, check_chain, new_key_and_csr, retry_delay, save_renewed, utc
from .join import JoinTokenError, join
from .lease import Lease
from .outbox import CLOSE, LEGACY_MESSAGE_LIMIT, Outbox
from .slots import Slots

log = logging.getLogger("weft.worker")

#: The node protocol version this worker speaks.
PROTOCOL_VERSION = node_pb2.PROTOCOL_VERSION_1
#: A sender finding fewer events queued while attempts run waits one turn of the loop.
COALESCE_BELOW = 64
#: How long the coordinator may take to answer Register.
REGISTER_TIMEOUT = 10.0
#: Refusals on Connect after which reconnecting would not help, at any
#: point of the stream: no valid certificate (join first), a revoked node
#: or another node's id.
FINAL = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
#: ... and those final only as the answer to Register.
FINAL_AT_REGISTER = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                     grpc.StatusCode.UNIMPLEMENTED)


class Fatal(Exception):
    """The coordinator refused this worker: reconnecting would not help."""

    def __init__(self, error: Exception):
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
        self.resend: List[node_pb2.NodeTaskEvent] = []  # kept Started and output of listed attempts, sent first
        # Renewal: when to ask (Unix time), and the new key of the request
        # in flight (None when none is).
        self.renew_at = 0.0
        self.renew_key: Optional[bytes] = None
        self.renew_wake = asyncio.Event()


class Sessions:
    """The worker's sessions, one after another, and what outlives them
    (the node id, the first registration).

    ``worker`` is read for its public settings at each Register
    (``coordinator``, ``name``, ``labels``, ``slots``, ``handlers``) and
    holds the identity (``identity``, ``join_token``, ``state_dir``),
    which a join or a renewal here replaces;
    ``start_drain`` is called on a Drain, ``spawn`` starts a task the
    worker tracks."""

    def __init__(self, worker, attempts: Attempts, outbox: Outbox, slots: Slots, start_drain: Callable, spawn: Callable,
                 lease: Optional[Lease] = None):
        self._worker = worker
        self._lease = lease if lease is not None else attempts.lease
        self._attempts = attempts
        self._outbox = outbox
        self._slots = slots
        self._start_drain = start_drain
        self._spawn = spawn
        self.current: Optional[Session] = None
        self.node_id = ""
        self.registered_once: Optional[asyncio.Event] = None
        #: Sessions that registered so far (the reconnect loop tells a
        #: session that ended from a dial that failed).
        self.registrations = 0

    def start(self) -> None:
        """Creates the first-registration event on the running loop."""
        self.registered_once = asyncio.Event()

    def drop(self) -> None:
        """Ends the current stream from this side, as a clean close."""
        session = self.current
        if session is not None and session.call is not None:
            session.closing = session.dropped = True
            session.call.cancel()

    def lost_lease(self) -> None:
        """The lease ran out: the coordinator has given up on this worker."""
        self.lost("lease expired")

    def lost(self, why: str) -> None:
        """Ends the current stream from this side as a lost one (the worker
        reconnects with backoff)."""
        session = self.current
        if session is not None and session.call is not None and not session.closing:
            log.warning("ending the session: %s", why)
            session.dropped = True
            session.call.cancel()

    async def run_session(self) -> None:
        """One Connect stream, from dial to its end: returns when it closed
        cleanly, raises :class:`Fatal` when the coordinator refused this
        worker, and any other error when the stream was lost."""
        worker, outbox = self._worker, self._outbox
        identity = await self._identity()
        session = Session()
        # Listed as running: attempts still running, finished ones whose
        # Finished is not sent yet, and sent ones within the redelivery
        # window (sent again right after Registered, before any credits).
        session.redeliver, keys = outbox.begin_session()
        keys.update(a.key for a in self._attempts.table.values() if not a.finished_sent)
        # The Started and output those attempts sent on earlier streams go out again first.
        session.resend = outbox.resendable(keys)
        running = [node_pb2.AttemptRef(task_id=t, attempt=n) for t, n in sorted(keys)]
        exec_mode, exec_allow = worker.exec_policy.register_fields()
        register = node_pb2.Register(
            name=worker.name,
            labels=worker.labels,
            resources=worker.resources,
            slots=worker.slots,
            handlers=worker.handlers,
            protocol_version=PROTOCOL_VERSION,
            running=running,
            previous_node_id=self.node_id or (identity.node_id if identity is not None else ""),
            exec=exec_mode,
            exec_allow=exec_allow,
            prefetch=self._slots.prefetch,
        )
        log.info("connecting to %s as %s (%d running)", worker.coordinator, worker.name, len(running))
        # A list of addresses is probed (and a pinned CA fetched) in a worker
        # thread: the attempts running on this loop go on meanwhile.
        if identity is not None:
            channel = await open_aio_channel(worker.coordinator, credentials=identity.credentials())
        else:
            channel = await open_aio_channel(worker.coordinator, ca_file=worker.ca_file, ca_pin=worker.ca_pin)
        self.current = session
        outbox.attached = True
        heartbeat: Optional[asyncio.Task] = None
        renewal: Optional[asyncio.Task] = None
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
                    session.last_recv = now = time.monotonic()
                    body = message.WhichOneof("body")
                    if not first:
                        silence = self._lease.heard(now)
                        if silence is not None:
                            # Sent before the coordinator gave up on this worker.
                            log.warning("message after the lease expired (%.1fs of silence) ignored; reconnecting",
                                        silence)
                            raise RuntimeError("lease expired")
                    if first:
                        first = False
                        if body != "registered":
                            raise RuntimeError(f"coordinator's first message was {body!r}, not registered")
                        self._on_registered(session, message.registered)
                        heartbeat = self._spawn(self._heartbeats(session))
                        if identity is not None:
                            renewal = self._spawn(self._renewal(session, identity))
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
                if code in FINAL or (first and code in FINAL_AT_REGISTER):
                    raise Fatal(self._refusal(e, identity)) from None
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
            if renewal is not None:
                renewal.cancel()
            if self.current is session:
                self.current = None
                outbox.attached = False
            outbox.wake()
            await channel.close(grace=None)

    async def _requests(self, session: Session, register: node_pb2.Register):
        """What the stream sends: Register, then (once Registered) one
        message per batch of queued events, each followed by the credits
        its results freed (one grant for all of them), and control messages
        in order."""
        outbox, slots, finished_sent = self._outbox, self._slots, self._attempts.finished_sent
        yield node_pb2.NodeMessage(register=register)
        await session.registered.wait()
        ready = outbox.ready
        while True:
            # Cleared before looking: a wake-up while this sends is not lost.
            ready.clear()
            if session.closing:
                return
            sent = False
            if outbox.queue:
                if len(outbox.queue) < COALESCE_BELOW and slots.used:
                    # One turn of the loop first: attempts about to end join
                    # this batch rather than each costing a write.
                    await asyncio.sleep(0)
                message = outbox.take(finished_sent)
                if message is CLOSE:
                    session.closing = True
                    return
                yield message
                sent = True
            if outbox.credits_open and not outbox.resending:
                grant = slots.take_grant()
                if grant:
                    yield node_pb2.NodeMessage(credits=node_pb2.Credits(grant=grant))
                    sent = True
            if not sent:
                await ready.wait()

    def _on_registered(self, session: Session, registered: node_pb2.Registered) -> None:
        session.node_id = registered.node_id
        self.node_id = registered.node_id
        interval = duration_from_pb(registered.heartbeat_interval)
        timeout = duration_from_pb(registered.heartbeat_timeout)
        session.heartbeat_interval = max(0.01, interval) if interval > 0 else 1.0
        session.heartbeat_timeout = max(0.05, timeout) if timeout > 0 else 5.0
        self._outbox.message_limit = registered.max_message_size or LEGACY_MESSAGE_LIMIT
        self.registrations += 1
        log.info("registered as node %s with %s", registered.node_id, self._worker.coordinator)
        session.registered.set()
        # Output and results an earlier stream took go out again first (an
        # attempt's chunks before its result), then credits.
        # Credits follow once those are out (the sender grants what the
        # attempts it still holds leave of slots + prefetch).
        self._outbox.resend_first(session.resend + session.redeliver)
        self._slots.reset_window()
        self._lease.begin(session.heartbeat_timeout, session.heartbeat_interval, time.monotonic())
        if self._slots.draining:
            self._outbox.control_first(node_pb2.NodeMessage(draining=node_pb2.Draining()))
        self._outbox.credits_open = True
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
        elif body == "certificate":
            self._on_certificate(message.certificate)
        elif body in ("heartbeat", "registered"):
            pass
        else:
            log.warning("unknown coordinator message %r ignored", body)

    # -- identity -----------------------------------------------------------

    async def _identity(self) -> Optional[Identity]:
        """The identity to connect with: the kept one while its certificate
        lives, else a new one from joining with the worker's token; None
        for a worker that never joined (it connects without a client
        certificate: a coordinator started with --insecure or --no-auth).
        Raises :class:`Fatal` when joining was refused or cannot succeed;
        other errors (the coordinator unreachable) are retried."""
        worker = self._worker
        current = worker.identity
        if current is not None and not current.expired(time.time()):
            return current
        token = worker.join_token
        if token is None:
            if current is None:
                return None
            raise Fatal(errors.Unauthenticated(
                f"this node's certificate (state dir {worker.state_dir}) expired at "
                f"{utc(current.validity()[1])}: join again with a new token (join_token= / "
                "WEFT_JOIN_TOKEN / --join), made with `weft token create --role node`"))
        log.info("joining %s as %s (token %s)", ",".join(worker.coordinators), worker.name, token.id)
        try:
            joined = await asyncio.to_thread(join, token, worker.name, worker.state_dir, worker.coordinators)
        except (PinMismatch, JoinTokenError) as e:
            raise Fatal(e) from None
        except errors.WeftError as e:
            if e.is_retryable():
                raise
            raise Fatal(e) from None
        except ValueError as e:  # a plaintext address, an answer that does not fit
            raise Fatal(e) from None
        worker.identity = joined
        log.info("joined as node %s; identity kept in %s", joined.node_id, worker.state_dir)
        return joined

    def _refusal(self, e: grpc.RpcError, identity: Optional[Identity]) -> errors.WeftError:
        error = errors.from_rpc_error(e)
        if error.code == grpc.StatusCode.UNAUTHENTICATED and identity is None:
            hint = ("this worker has no node certificate: start it with a join token (join_token= / "
                    "WEFT_JOIN_TOKEN / --join) made with `weft token create --role node`")
            error = type(error)(f"{error.details}; {hint}" if error.details else hint, error.code)
        log.error("the coordinator refused this node (%s): %s; not reconnecting", error.code.name, error.details)
        return error

    async def _renewal(self, session: Session, identity: Identity) -> None:
        """Asks for a new certificate at 2/3 of the current one's lifetime,
        and again at a tenth of the time left while no answer is usable."""
        not_before, not_after = identity.validity()
        session.renew_at = not_before + (not_after - not_before) * RENEW_AT
        while not session.closing:
            delay = session.renew_at - time.time()
            if delay > 0:
                session.renew_wake.clear()
                try:
                    await asyncio.wait_for(session.renew_wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            current = self._worker.identity
            key_pem, csr_der = new_key_and_csr(current.name)
            session.renew_key = key_pem
            now = time.time()
            session.renew_at = now + retry_delay(current.validity()[1], now)
            log.info("renewing the node certificate (it expires %s)", utc(current.validity()[1]))
            self._outbox.control(node_pb2.NodeMessage(renew_certificate=node_pb2.RenewCertificate(csr_der=csr_der)))
            self._outbox.wake()

    def _on_certificate(self, answer: node_pb2.NodeCertificate) -> None:
        session, worker = self.current, self._worker
        if session is None or session.renew_key is None or worker.identity is None:
            log.warning("a certificate nobody asked for was ignored")
            return
        now = time.time()
        current = worker.identity
        if answer.error or not answer.certificate_chain_pem:
            session.renew_at = now + retry_delay(current.validity()[1], now)
            session.renew_wake.set()
            log.warning("certificate renewal refused: %s; asking again at %s", answer.error or "no certificate",
                        utc(session.renew_at))
            return
        chain = answer.certificate_chain_pem.encode()
        try:
            check_chain(chain, session.renew_key, current.node_id)
        except ValueError as e:
            log.warning("renewed certificate not used (%s); asking again at %s", e, utc(session.renew_at))
            return
        renewed = current.renewed(session.renew_key, chain)
        try:
            save_renewed(worker.state_dir, renewed)
        except OSError as e:
            log.error("could not save the renewed certificate in %s (%s); asking again at %s", worker.state_dir, e,
                      utc(session.renew_at))
            return
        worker.identity = renewed
        session.renew_key = None
        not_before, not_after = renewed.validity()
        session.renew_at = max(now, not_before + (not_after - not_before) * RENEW_AT)
        session.renew_wake.set()
        log.info("node certificate renewed: it expires %s; the next connection uses it", utc(not_after))
