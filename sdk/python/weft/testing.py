"""A fake coordinator for testing workers: the conformance kit's half of the wire.

:class:`FakeCoordinator` is a real gRPC ``NodeService`` server on
``127.0.0.1:0`` that hands every ``Connect`` stream to the test as a
:class:`FakeSession`: the test reads the worker's messages one by one and
sends whatever coordinator messages it likes (Registered, Assign, Cancel,
Drain, Heartbeat), or ends the stream to play a coordinator restart.
Any worker implementation, in any language, can be pointed at its URL.

Each session checks, as messages pass, the rules every message must keep
(``Ledger.violations`` lists any breach; :meth:`Ledger.check` asserts none):

- credits: granted-and-unused plus the slots of the attempts it holds never
  exceed ``slots + prefetch``, and no ``Credits{grant: 0}``;
- at most ``slots`` attempts started and not finished at once;
- per attempt and stream: ``Started`` only as its first event (an attempt
  not listed in ``Register.running`` opens with ``Started``, or with a bare
  ``Finished``; a listed one goes on, or starts if it was queued), nothing
  after its ``Finished``, output chunks in seq order without gaps (from 0
  for an attempt not listed), a progress fraction of at most 1;
- every message within ``Registered.max_message_size`` (4 MiB when 0);
- ``Register`` first, and nothing else before ``Registered``.

Like a real coordinator it serves TLS and authenticates nodes: a worker
joins with a token from :meth:`FakeCoordinator.join_token` and connects
with the certificate it got (mutual TLS; see ``proto/README.md``,
"Joining").
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import grpc

from ._proto import common_pb2, node_pb2, node_pb2_grpc
from .models import duration_to_pb

_CLOSE = object()
_END = object()
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_ulid() -> str:
    """A fresh ULID (26 Crockford base32 characters), the id format of tasks and nodes."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


class Ids(dict):
    """``ids["echo"]``: a stable fresh ULID per name, for readable tests."""

    def __missing__(self, key: str) -> str:
        self[key] = new_ulid()
        return self[key]


@dataclass
class Received:
    """A message from the worker and when it arrived (time.monotonic())."""

    at: float
    message: node_pb2.NodeMessage

    @property
    def kind(self) -> str:
        return self.message.WhichOneof("body") or ""


#: What ``Registered.max_message_size = 0`` means (an older coordinator).
LEGACY_MESSAGE_LIMIT = 4 * 1024 * 1024
#: The largest message the fake sends or takes (a coordinator's most).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024


@dataclass
class Ledger:
    """Credit accounting of one worker across sessions, and the rules broken."""

    slots: int = 0
    prefetch: int = 0
    window: int = 0  # granted and not yet used, this session
    running: Dict[Tuple[str, int], int] = field(default_factory=dict)  # held attempt -> slots
    started: set = field(default_factory=set)  # attempts started and not finished
    violations: List[str] = field(default_factory=list)

    def check(self) -> None:
        """AssertionError listing every rule broken so far."""
        assert self.violations == [], "the worker broke the protocol:\n" + "\n".join(self.violations)


class FakeSession:
    """One worker's Connect stream, as seen from the coordinator's side."""

    def __init__(self, ledger: Ledger, previous: Dict[Tuple[str, int], int], fake: Optional["FakeCoordinator"] = None):
        self._fake = fake
        #: The node certificate the worker presented (``cryptography`` object; None without node auth).
        self.certificate = None
        #: The node id that certificate names ("" without one).
        self.node_id = ""
        self._inbox: "queue.Queue" = queue.Queue()
        self._outbox: "queue.Queue" = queue.Queue()
        self.received: List[Received] = []
        self.ended = threading.Event()
        self.ledger = ledger
        self._known_slots = previous
        self.register: Optional[node_pb2.Register] = None
        self._lock = threading.Lock()
        self._expected: Dict[str, int] = {}
        #: What the last Registered said (seconds; bytes).
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 5.0
        self.max_message_size = LEGACY_MESSAGE_LIMIT
        self._registered_sent = False
        # Per attempt, this session: the next seq expected (None: any), finished.
        self._next_seq: Dict[Tuple[str, int], Optional[int]] = {}
        self._finished: set = set()
        self._listed: set = set()  # Register.running of this stream
        self._had_event: set = set()  # attempts with an event on this stream
        self._keepalive: Optional[threading.Thread] = None

    # -- worker -> coordinator ---------------------------------------------

    def _on_message(self, message: node_pb2.NodeMessage) -> None:
        with self._lock:
            self.received.append(Received(time.monotonic(), message))
            self._account(message)
        self._inbox.put(message)
        if message.WhichOneof("body") == "renew_certificate" and self._fake is not None and self._fake.auto_renew:
            self._fake._renew(self, message.renew_certificate)

    def _on_end(self) -> None:
        self.ended.set()
        self._inbox.put(_END)
        self._outbox.put(_CLOSE)  # a real coordinator ends its side too

    def _account(self, message: node_pb2.NodeMessage) -> None:
        ledger = self.ledger
        kind = message.WhichOneof("body")
        size = message.ByteSize()
        if size > self.max_message_size:
            ledger.violations.append(f"a {kind} message of {size} bytes, past Registered.max_message_size "
                                     f"{self.max_message_size}")
        if self.register is None and kind != "register":
            ledger.violations.append(f"first message {kind}, not Register")
        elif kind == "register" and self.register is not None:
            ledger.violations.append("a second Register on one stream")
        elif not self._registered_sent and kind != "register":
            ledger.violations.append(f"{kind} sent before Registered")
        if kind == "register":
            self.register = message.register
            ledger.slots = message.register.slots
            ledger.prefetch = message.register.prefetch
            ledger.window = 0
            ledger.running = {
                (r.task_id, r.attempt): self._known_slots.get((r.task_id, r.attempt), 1) for r in message.register.running
            }
            listed = {(r.task_id, r.attempt) for r in message.register.running}
            # Listed attempts carry on: their chunks go on from where they were.
            self._next_seq = {key: None for key in listed}
            self._listed = listed
            ledger.started &= listed
        elif kind == "credits":
            grant = message.credits.grant
            ledger.window += grant
            used = sum(ledger.running.values())
            if grant == 0:
                ledger.violations.append("Credits{grant: 0} (send nothing when no slot is free)")
            if ledger.window + used > ledger.slots + ledger.prefetch:
                ledger.violations.append(
                    f"granted {grant}: window {ledger.window} + held {used} > slots {ledger.slots} "
                    f"+ prefetch {ledger.prefetch}"
                )
        elif kind == "events":
            for event in message.events.events:
                self._check_event(event)

    def _check_event(self, event: node_pb2.NodeTaskEvent) -> None:
        """The per-attempt rules of proto/README.md §3, on this session."""
        ledger = self.ledger
        key = (event.task_id, event.attempt)
        body = event.WhichOneof("body")
        name = f"{event.task_id}#{event.attempt}"
        if key in self._finished:
            ledger.violations.append(f"{body} of {name} after its Finished")
        first = key not in self._had_event
        self._had_event.add(key)
        if body == "started":
            if not first:
                ledger.violations.append(f"Started of {name} is not its first event")
            ledger.started.add(key)
            if len(ledger.started) > ledger.slots:
                ledger.violations.append(
                    f"{len(ledger.started)} attempts started and not finished > slots {ledger.slots}")
        elif body == "finished":
            self._finished.add(key)
            ledger.running.pop(key, None)
            ledger.started.discard(key)
        else:
            if first and key not in self._listed:
                ledger.violations.append(f"{body} of {name} before its Started")
            if body == "progress" and event.progress.fraction > 1.0:
                ledger.violations.append(f"progress of {name}: fraction {event.progress.fraction} past 1")
            if body == "output":
                expected = self._next_seq.get(key, 0)
                seq = event.output.seq
                if expected is not None and seq != expected:
                    ledger.violations.append(f"output of {name}: seq {seq}, expected {expected} (in order, no gaps)")
                self._next_seq[key] = seq + 1

    def recv(self, timeout: float = 5.0, skip_heartbeats: bool = True) -> Optional[node_pb2.NodeMessage]:
        """The worker's next message; None when its stream ended. AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message from the worker within {timeout}s")
            try:
                item = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if item is _END:
                self._inbox.put(_END)
                return None
            if skip_heartbeats and item.WhichOneof("body") == "heartbeat":
                continue
            return item

    def expect(self, kind: str, timeout: float = 5.0) -> node_pb2.NodeMessage:
        """The next message of ``kind`` not yet returned by expect (does not consume recv's queue)."""
        index = self._expected.get(kind, 0)
        deadline = time.monotonic() + timeout
        while True:
            found = self.of_kind(kind)
            if len(found) > index:
                self._expected[kind] = index + 1
                return found[index].message
            if self.ended.is_set() and len(self.of_kind(kind)) <= index:
                raise AssertionError(f"stream ended while waiting for {kind}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind} from the worker within {timeout}s")
            time.sleep(0.005)

    def attempt_events(self, task_id: str, attempt: int) -> List[node_pb2.NodeTaskEvent]:
        """Every event of one attempt received so far, in order."""
        with self._lock:
            return [
                event
                for r in self.received
                if r.kind == "events"
                for event in r.message.events.events
                if (event.task_id, event.attempt) == (task_id, attempt)
            ]

    def events(self, task_id: str, attempt: int, until: str = "finished", timeout: float = 5.0) -> List[node_pb2.NodeTaskEvent]:
        """Events of one attempt up to (and including) its first one of kind ``until``."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.attempt_events(task_id, attempt)
            for i, event in enumerate(got):
                if event.WhichOneof("body") == until:
                    return got[: i + 1]
            if self.ended.is_set():
                raise AssertionError(f"stream ended before {until} of {task_id}#{attempt}; got {got}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {until} for {task_id}#{attempt} within {timeout}s; got {got}")
            time.sleep(0.005)

    def credits_granted(self) -> int:
        """Sum of all Credits grants on this session so far."""
        with self._lock:
            return sum(r.message.credits.grant for r in self.received if r.kind == "credits")

    def wait_for(self, predicate, timeout: float = 5.0, what: str = "condition") -> None:
        """Polls ``predicate()`` until true (AssertionError after timeout)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def of_kind(self, kind: str) -> List[Received]:
        with self._lock:
            return [r for r in self.received if r.kind == kind]

    # -- coordinator -> worker ---------------------------------------------

    def send(self, message: node_pb2.CoordinatorMessage) -> None:
        self._outbox.put(message)

    def registered(self, node_id: str, heartbeat_interval: float = 0.2, heartbeat_timeout: float = 3.0,
                   max_message_size: int = 0, start_timeout: Optional[float] = None) -> None:
        """Answers Register. ``max_message_size`` 0 means 4 MiB (an older
        coordinator's); ``start_timeout`` None leaves it unset (no deadline)."""
        registered = node_pb2.Registered(
            node_id=node_id,
            heartbeat_interval=duration_to_pb(heartbeat_interval),
            heartbeat_timeout=duration_to_pb(heartbeat_timeout),
            max_message_size=max_message_size,
        )
        if start_timeout is not None:
            registered.start_timeout.CopyFrom(duration_to_pb(start_timeout))
        with self._lock:
            self.heartbeat_interval = heartbeat_interval
            self.heartbeat_timeout = heartbeat_timeout
            self.max_message_size = max_message_size or LEGACY_MESSAGE_LIMIT
            self._registered_sent = True
        self.send(node_pb2.CoordinatorMessage(registered=registered))

    def keepalive(self) -> None:
        """Sends ``Heartbeat`` every ``heartbeat_interval`` until the stream
        ends, as a coordinator does (the fake is silent otherwise: a test
        longer than ``heartbeat_timeout`` needs this, or the worker rightly
        drops the stream)."""
        if self._keepalive is not None:
            return

        def beat() -> None:
            while not self.ended.wait(self.heartbeat_interval):
                self.heartbeat()

        self._keepalive = threading.Thread(target=beat, daemon=True, name="fake-coordinator-heartbeat")
        self._keepalive.start()

    def assign(self, *assignments: Tuple[str, int, common_pb2.TaskSpec], account: bool = True) -> None:
        """Assigns (task_id, attempt, spec) tuples in one Assign message.
        ``account=False`` sends it without using credits: an assignment a
        coordinator would not send (one the worker already runs, say)."""
        tasks = []
        with self._lock:
            for task_id, attempt, spec in assignments:
                slots = max(1, spec.slots)
                if not account:
                    tasks.append(node_pb2.Assignment(task_id=task_id, attempt=attempt, spec=spec))
                    continue
                self.ledger.window -= slots
                if self.ledger.window < 0:
                    self.ledger.violations.append(f"kit assigned {task_id}#{attempt} beyond credits")
                self.ledger.running[(task_id, attempt)] = slots
                self._known_slots[(task_id, attempt)] = slots
                tasks.append(node_pb2.Assignment(task_id=task_id, attempt=attempt, spec=spec))
        self.send(node_pb2.CoordinatorMessage(assign=node_pb2.Assign(tasks=tasks)))

    def cancel(self, task_id: str, attempt: int, reason: str = "cancelled by the kit") -> None:
        self.send(node_pb2.CoordinatorMessage(cancel=node_pb2.Cancel(task_id=task_id, attempt=attempt, reason=reason)))

    def drain(self, grace: Optional[float] = None) -> None:
        drain = node_pb2.Drain()
        if grace is not None:
            drain.grace.CopyFrom(duration_to_pb(grace))
        self.send(node_pb2.CoordinatorMessage(drain=drain))

    def heartbeat(self) -> None:
        self.send(node_pb2.CoordinatorMessage(heartbeat=node_pb2.Heartbeat()))

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """Ends the stream with an error status (a refusal, a revoked node)."""
        self._outbox.put(_Abort(code, details))

    def close(self) -> None:
        """Ends the stream from the coordinator's side (like a coordinator restart)."""
        self._outbox.put(_CLOSE)

    def wait_ended(self, timeout: float = 5.0) -> None:
        """Until the worker's side of the stream has ended."""
        if not self.ended.wait(timeout):
            raise AssertionError(f"worker did not close its stream within {timeout}s")


class _Servicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, fake: "FakeCoordinator"):
        self._fake = fake

    def Join(self, request, context):
        return self._fake._join(request, context)

    def Connect(self, request_iterator, context):
        fake = self._fake
        certificate = fake._authenticate(context)
        session = FakeSession(fake.ledger, fake._slots_of, fake)
        session.certificate = certificate
        session.node_id = _common_name(certificate) if certificate is not None else ""

        def read() -> None:
            try:
                for message in request_iterator:
                    session._on_message(message)
            except Exception:
                pass
            finally:
                session._on_end()

        threading.Thread(target=read, daemon=True, name="fake-coordinator-reader").start()
        context.add_callback(lambda: session._outbox.put(_CLOSE))
        fake._sessions.put(session)
        fake.all_sessions.append(session)
        while True:
            item = session._outbox.get()
            if item is _CLOSE:
                return
            if isinstance(item, _Abort):
                context.abort(item.code, item.details)
            yield item


@dataclass
class _Abort:
    code: grpc.StatusCode
    details: str


@dataclass
class Joined:
    """One successful Join the fake answered."""

    name: str
    node_id: str
    csr_der: bytes
    certificate_pem: bytes


def _common_name(certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


class TestCA:
    """A throw-away cluster CA (ECDSA P-256), as a real coordinator makes
    one: it signs the fake's serving certificate and the node certificates
    Join and renewals hand out. Needs the ``cryptography`` package."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Weft test CA")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.der = self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pin(self) -> str:
        """``sha256:HEX`` of the CA certificate: what a join token carries."""
        return "sha256:" + hashlib.sha256(self.der).hexdigest()

    def _leaf(self, subject: str, public_key, lifetime: float, extensions):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Backdated a little, like the coordinator's; lifetime from now.
            .not_valid_before(now - datetime.timedelta(seconds=1))
            .not_valid_after(now + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.key, hashes.SHA256())

    def serving(self) -> Tuple[bytes, bytes]:
        """``(key_pem, chain_pem)`` for 127.0.0.1, ::1 and localhost (chain: leaf, then the CA)."""
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._leaf("weft-fake-coordinator", key.public_key(), 86400, [
            (x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ])
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, leaf.public_bytes(serialization.Encoding.PEM) + self.pem

    def node(self, public_key, node_id: str, lifetime: float):
        """A node certificate as the coordinator issues one: CN = the node
        id, EKU clientAuth only, KeyUsage digitalSignature."""
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        return self._leaf(node_id, public_key, lifetime, [
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                           key_encipherment=False, data_encipherment=False, key_agreement=False,
                           encipher_only=False, decipher_only=False), True),
        ])


def make_test_pki(directory: str) -> Tuple[str, bytes, bytes]:
    """A throw-away CA and a serving certificate for 127.0.0.1/localhost,
    as a real coordinator makes them (ECDSA P-256): writes ``ca.pem`` in
    ``directory`` and answers ``(ca_file, key_pem, chain_pem)``. Needs the
    ``cryptography`` package."""
    ca = TestCA()
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca.pem)
    key_pem, chain_pem = ca.serving()
    return ca_file, key_pem, chain_pem


class _TlsFront:
    """TLS in front of the fake's plaintext gRPC port, for node
    authentication.

    grpcio's server either demands a client certificate on every call or
    never asks for one, but a coordinator must serve ``Join`` (no client
    certificate yet) and ``Connect`` (a node certificate) on one port. So
    the fake terminates TLS itself: it asks for a client certificate,
    verifies one against the CA when sent (a certificate from another CA
    fails the handshake), and forwards the bytes to the gRPC server on
    loopback, remembering which forwarded connection (by its local port,
    what ``context.peer()`` shows) carries which certificate.
    """

    def __init__(self, backend_port: int, ca: TestCA, directory: str) -> None:
        import asyncio
        import ssl

        key_pem, chain_pem = ca.serving()
        chain_file, key_file, ca_file = (os.path.join(directory, n) for n in ("front.pem", "front.key", "front-ca.pem"))
        for path, data in ((chain_file, chain_pem), (key_file, key_pem), (ca_file, ca.pem)):
            with open(path, "wb") as f:
                f.write(data)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain_file, key_file)
        context.load_verify_locations(ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["h2"])
        self._backend_port = backend_port
        #: local port of a forwarded connection -> the client certificate's DER (b"": none)
        self.peers: Dict[int, bytes] = {}
        self._writers: set = set()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, ctx: None)  # failed handshakes are the clients' business
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fake-coordinator-tls")
        self._thread.start()

        async def listen():
            return await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)

        self._server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        import asyncio

        tls = writer.get_extra_info("ssl_object")
        der = (tls.getpeercert(binary_form=True) if tls is not None else None) or b""
        try:
            backend_reader, backend_writer = await asyncio.open_connection("127.0.0.1", self._backend_port)
        except OSError:
            writer.close()
            return
        self.peers[backend_writer.get_extra_info("sockname")[1]] = der
        self._writers.update((writer, backend_writer))

        async def pipe(source, sink) -> None:
            try:
                while True:
                    data = await source.read(65536)
                    if not data:
                        break
                    sink.write(data)
                    await sink.drain()
            except Exception:  # noqa: BLE001 - either side went away
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, backend_writer), pipe(backend_reader, writer))
        self._writers.difference_update((writer, backend_writer))

    def certificate_of(self, peer: str) -> bytes:
        """The client certificate (DER; b"" for none) of a gRPC peer (``ipv4:127.0.0.1:PORT``)."""
        _, _, port = peer.rpartition(":")
        return self.peers.get(int(port), b"") if port.isdigit() else b""

    def stop(self) -> None:
        def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()

        self.loop.call_soon_threadsafe(close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class FakeCoordinator:
    """A NodeService server on 127.0.0.1 whose sessions the test drives.

    It serves TLS like a real coordinator (``tls=True``, the default), with
    a throw-away CA (:attr:`ca`) whose ``ca.pem`` is :attr:`ca_file`, and
    authenticates nodes like one (``node_auth=True``, the default): it
    answers ``Join`` for the tokens :meth:`join_token` made, issuing a node
    certificate (CN = :attr:`node_id` if set, else a fresh id; EKU
    clientAuth; chain: the certificate, then the CA) valid for
    ``cert_lifetime`` seconds, refuses a ``Connect`` without one
    (UNAUTHENTICATED) or from a revoked node (PERMISSION_DENIED), and
    answers ``RenewCertificate`` on its own. ``node_auth=False`` takes any
    TLS client (a coordinator with ``--no-auth``); ``tls=False`` serves
    plaintext (``http://``).
    """

    def __init__(self, tls: bool = True, node_auth: bool = True, node_id: Optional[str] = None,
                 cert_lifetime: float = 86400.0) -> None:
        import tempfile

        self.ledger = Ledger()
        self._slots_of: Dict[Tuple[str, int], int] = {}
        self._sessions: "queue.Queue[FakeSession]" = queue.Queue()
        self.all_sessions: List[FakeSession] = []
        self.node_auth = tls and node_auth
        self.node_id = node_id
        self.cert_lifetime = cert_lifetime
        #: Successful joins, in order.
        self.joins: List[Joined] = []
        #: Every Join request, answered or refused.
        self.join_requests: List[node_pb2.JoinRequest] = []
        #: (node id, csr_der, chain_pem) of each certificate renewal answered.
        self.renewals: List[Tuple[str, bytes, str]] = []
        self.revoked: set = set()
        #: Connect calls refused for want of a (valid, unrevoked) node certificate.
        self.refused: List[str] = []
        self.auto_renew = True
        self._credentials: Dict[str, int] = {}  # join credential -> uses left (0: no limit)
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE + 4096),
            ("grpc.max_send_message_length", MAX_MESSAGE_SIZE + 4096),
        ])
        node_pb2_grpc.add_NodeServiceServicer_to_server(_Servicer(self), self._server)
        self._pki = tempfile.TemporaryDirectory(prefix="weft-fake-pki-") if tls else None
        self.ca: Optional[TestCA] = None
        self.ca_file: Optional[str] = None
        self._front: Optional[_TlsFront] = None
        if self._pki is not None:
            self.ca = TestCA()
            self.ca_file = os.path.join(self._pki.name, "ca.pem")
            with open(self.ca_file, "wb") as f:
                f.write(self.ca.pem)
        if self.node_auth:
            backend = self._server.add_insecure_port("127.0.0.1:0")
            self._server.start()
            self._front = _TlsFront(backend, self.ca, self._pki.name)
            self.port = self._front.port
        else:
            if self.ca is not None:
                key_pem, chain_pem = self.ca.serving()
                self.port = self._server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, chain_pem)]))
            else:
                self.port = self._server.add_insecure_port("127.0.0.1:0")
            self._server.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- joining ------------------------------------------------------------

    def join_token(self, uses: int = 0, pin: Optional[str] = None, address: Optional[str] = None) -> str:
        """A join token for this fake (``weftjoin_...``): its address, the
        pin of its CA (or ``pin``, to test a wrong one), a fresh credential
        good for ``uses`` joins (0: any number)."""
        from .worker.join import JoinToken, new_credential

        credential = new_credential()
        with self._lock:
            self._credentials[credential] = uses
        return JoinToken(address or f"127.0.0.1:{self.port}", pin or self.ca.pin, credential).encode()

    def _join(self, request: node_pb2.JoinRequest, context) -> node_pb2.JoinResponse:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from .worker.identity import NAME

        self.join_requests.append(request)
        if not self.node_auth:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this coordinator does not authenticate nodes: "
                                                               "no token needed")
        with self._lock:
            uses = self._credentials.get(request.token)
            if uses is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown, expired or used-up join token: "
                                                               "make one with `weft token create --role node`")
            if uses == 1:
                del self._credentials[request.token]
            elif uses > 1:
                self._credentials[request.token] = uses - 1
        if not NAME.match(request.name):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid node name {request.name!r}")
        try:
            csr = x509.load_der_x509_csr(request.csr_der)
            valid = csr.is_signature_valid
        except ValueError:
            valid = False
        if not valid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "csr_der is not a self-signed PKCS#10 request")
        node_id = self.node_id or new_ulid()
        certificate = self.ca.node(csr.public_key(), node_id, self.cert_lifetime)
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.joins.append(Joined(request.name, node_id, request.csr_der, pem))
        response = node_pb2.JoinResponse(node_id=node_id, certificate_chain_pem=(pem + self.ca.pem).decode(),
                                         ca_pem=self.ca.pem.decode())
        response.not_after.FromDatetime(certificate.not_valid_after_utc.replace(tzinfo=None))
        return response

    def _authenticate(self, context):
        """The peer's node certificate, or None without node authentication; aborts a refused peer."""
        if not self.node_auth:
            return None
        from cryptography import x509

        der = self._front.certificate_of(context.peer())
        if not der:
            self.refused.append("no certificate")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no node certificate: join first with a join token "
                                                           "(weft-node --join TOKEN)")
        certificate = x509.load_der_x509_certificate(der)
        if _common_name(certificate) in self.revoked:
            self.refused.append("revoked")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {_common_name(certificate)} was revoked")
        return certificate

    def _renew(self, session: "FakeSession", request: node_pb2.RenewCertificate) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        answer = node_pb2.NodeCertificate()
        try:
            csr = x509.load_der_x509_csr(request.csr_der)
            valid = csr.is_signature_valid
        except ValueError:
            valid = False
        if not self.node_auth or not session.node_id:
            answer.error = "this session is not authenticated by a node certificate"
        elif not valid:
            answer.error = "csr_der is not a self-signed PKCS#10 request"
        else:
            certificate = self.ca.node(csr.public_key(), session.node_id, self.cert_lifetime)
            answer.certificate_chain_pem = (certificate.public_bytes(serialization.Encoding.PEM) + self.ca.pem).decode()
            answer.not_after.FromDatetime(certificate.not_valid_after_utc.replace(tzinfo=None))
            self.renewals.append((session.node_id, request.csr_der, answer.certificate_chain_pem))
        session.send(node_pb2.CoordinatorMessage(certificate=answer))

    def revoke(self, node_id: str) -> None:
        """Refuses the node's certificate from now on and ends its streams with PERMISSION_DENIED."""
        self.revoked.add(node_id)
        for session in self.all_sessions:
            if session.node_id == node_id:
                session.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {node_id} was revoked")

    # -- sessions -----------------------------------------------------------

    def accept(self, timeout: float = 10.0) -> FakeSession:
        """The next Connect stream (AssertionError if none arrives in time)."""
        try:
            return self._sessions.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no worker connected within {timeout}s") from None

    def stop(self) -> None:
        for session in self.all_sessions:
            session.close()
        self._server.stop(grace=0.5).wait(2)
        if self._front is not None:
            self._front.stop()
        if self._pki is not None:
            self._pki.cleanup()

    def __enter__(self) -> "FakeCoordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
