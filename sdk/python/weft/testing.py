"""A fake coordinator for testing workers: the conformance kit's half of the wire.

:class:`FakeCoordinator` is a real gRPC ``NodeService`` server on
``127.0.0.1:0`` that hands every ``Connect`` stream to the test as a
:class:`FakeSession`: the test reads the worker's messages one by one and
sends whatever coordinator messages it likes (Registered, Assign, Cancel,
Drain, Heartbeat), or ends the stream to play a coordinator restart.
Any worker implementation, in any language, can be pointed at its URL.

Each session checks the credit rule as messages pass: the worker must never
grant more than its free slots (``violations`` lists any breach).
"""

from __future__ import annotations

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


@dataclass
class Ledger:
    """Credit accounting of one worker across sessions."""

    slots: int = 0
    window: int = 0  # granted and not yet used, this session
    running: Dict[Tuple[str, int], int] = field(default_factory=dict)  # attempt -> slots
    violations: List[str] = field(default_factory=list)


class FakeSession:
    """One worker's Connect stream, as seen from the coordinator's side."""

    def __init__(self, ledger: Ledger, previous: Dict[Tuple[str, int], int]):
        self._inbox: "queue.Queue" = queue.Queue()
        self._outbox: "queue.Queue" = queue.Queue()
        self.received: List[Received] = []
        self.ended = threading.Event()
        self.ledger = ledger
        self._known_slots = previous
        self.register: Optional[node_pb2.Register] = None
        self._lock = threading.Lock()
        self._expected: Dict[str, int] = {}

    # -- worker -> coordinator ---------------------------------------------

    def _on_message(self, message: node_pb2.NodeMessage) -> None:
        with self._lock:
            self.received.append(Received(time.monotonic(), message))
            self._account(message)
        self._inbox.put(message)

    def _on_end(self) -> None:
        self.ended.set()
        self._inbox.put(_END)
        self._outbox.put(_CLOSE)  # a real coordinator ends its side too

    def _account(self, message: node_pb2.NodeMessage) -> None:
        ledger = self.ledger
        kind = message.WhichOneof("body")
        if kind == "register":
            self.register = message.register
            ledger.slots = message.register.slots
            ledger.window = 0
            ledger.running = {
                (r.task_id, r.attempt): self._known_slots.get((r.task_id, r.attempt), 1) for r in message.register.running
            }
        elif kind == "credits":
            ledger.window += message.credits.grant
            used = sum(ledger.running.values())
            if ledger.window + used > ledger.slots:
                ledger.violations.append(
                    f"granted {message.credits.grant}: window {ledger.window} + running {used} > slots {ledger.slots}"
                )
        elif kind == "events":
            for event in message.events.events:
                if event.WhichOneof("body") == "finished":
                    ledger.running.pop((event.task_id, event.attempt), None)

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

    def registered(self, node_id: str, heartbeat_interval: float = 0.2, heartbeat_timeout: float = 3.0) -> None:
        self.send(
            node_pb2.CoordinatorMessage(
                registered=node_pb2.Registered(
                    node_id=node_id,
                    heartbeat_interval=duration_to_pb(heartbeat_interval),
                    heartbeat_timeout=duration_to_pb(heartbeat_timeout),
                )
            )
        )

    def assign(self, *assignments: Tuple[str, int, common_pb2.TaskSpec]) -> None:
        """Assigns (task_id, attempt, spec) tuples in one Assign message."""
        tasks = []
        with self._lock:
            for task_id, attempt, spec in assignments:
                slots = max(1, spec.slots)
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

    def Connect(self, request_iterator, context):
        session = FakeSession(self._fake.ledger, self._fake._slots_of)

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
        self._fake._sessions.put(session)
        self._fake.all_sessions.append(session)
        while True:
            item = session._outbox.get()
            if item is _CLOSE:
                return
            yield item


def make_test_pki(directory: str) -> Tuple[str, bytes, bytes]:
    """A throw-away CA and a serving certificate for 127.0.0.1/localhost,
    as a real coordinator makes them (ECDSA P-256): writes ``ca.pem`` in
    ``directory`` and answers ``(ca_file, key_pem, chain_pem)``. Needs the
    ``cryptography`` package (a test extra)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Weft test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weft-fake-coordinator")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    ca_file = os.path.join(directory, "ca.pem")
    with open(ca_file, "wb") as f:
        f.write(ca_pem)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ca_file, key_pem, leaf.public_bytes(serialization.Encoding.PEM) + ca_pem


class FakeCoordinator:
    """A NodeService server on 127.0.0.1:0 whose sessions the test drives.

    It serves TLS like a real coordinator (``tls=True``, the default), with
    a throw-away CA whose ``ca.pem`` is :attr:`ca_file`: give workers that
    (``--ca-file``, or ``WEFT_CA`` in their environment). ``tls=False``
    serves plaintext (``http://``).
    """

    def __init__(self, tls: bool = True) -> None:
        import tempfile

        self.ledger = Ledger()
        self._slots_of: Dict[Tuple[str, int], int] = {}
        self._sessions: "queue.Queue[FakeSession]" = queue.Queue()
        self.all_sessions: List[FakeSession] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        node_pb2_grpc.add_NodeServiceServicer_to_server(_Servicer(self), self._server)
        self._pki = tempfile.TemporaryDirectory(prefix="weft-fake-pki-") if tls else None
        self.ca_file: Optional[str] = None
        if self._pki is not None:
            self.ca_file, key_pem, chain_pem = make_test_pki(self._pki.name)
            credentials = grpc.ssl_server_credentials([(key_pem, chain_pem)])
            self.port = self._server.add_secure_port("127.0.0.1:0", credentials)
        else:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

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
        if self._pki is not None:
            self._pki.cleanup()

    def __enter__(self) -> "FakeCoordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
