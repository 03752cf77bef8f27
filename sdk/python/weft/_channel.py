"""Coordinator addresses to gRPC channels.

An address is ``http://HOST:PORT``, ``https://HOST:PORT`` or ``HOST:PORT``
(``127.0.0.1:7070``, ``[::1]:7070``, ``localhost:7070``): the rules of
``weft_proto::address`` in Rust, so every binary and both SDKs take the
same forms and refuse the same garbage with the same message. Several,
comma-separated (``https://a:7070,https://b:7070``), name coordinators that
take over from each other: a channel goes to the first that accepts a
connection (:func:`first_reachable`).
"""

from __future__ import annotations

import _ssl
import asyncio
import collections
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import warnings
from typing import List, Optional, Tuple

import grpc

from . import errors

#: Where clients and workers look when given no URL.
DEFAULT_COORDINATOR = "https://127.0.0.1:7070"

#: The scheme of an address written without one: ``https``, as
#: ``DEFAULT_SCHEME`` in ``proto/src/address.rs`` (the coordinator serves
#: TLS by default; ``http://`` reaches one started with ``--insecure``).
DEFAULT_SCHEME = "https"

_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+\Z")
_PORT = re.compile(r"[0-9]+\Z")

#: What a client or worker decodes: ``CLIENT_MAX_MESSAGE_BYTES`` of
#: ``proto/src/limits.rs`` (one task's answer holds its spec and its output,
#: each up to the coordinator's --max-message-size, at most 64 MiB). A
#: request past the coordinator's limit is refused there with
#: RESOURCE_EXHAUSTED naming it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Fail fast when the coordinator is down instead of backing off for long.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


def coordinator_url(url: str | None) -> str:
    """``url``, else ``$WEFT_COORDINATOR``, else the default."""
    return url or os.environ.get("WEFT_COORDINATOR") or DEFAULT_COORDINATOR


def parse_address(address: str) -> Tuple[str, str, int]:
    """``(scheme, host, port)`` from ``http(s)://HOST:PORT`` or ``HOST:PORT``
    (then the scheme is :data:`DEFAULT_SCHEME`); an IPv6 host keeps its
    brackets. Surrounding blanks and one trailing ``/`` are ignored.

    Raises ValueError on anything else (a path, a user, a missing or zero
    port, an unbracketed IPv6 address, another scheme).
    """
    invalid = ValueError(f"invalid coordinator address '{address}': expected HOST:PORT or http(s)://HOST:PORT")
    text = address.strip()
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise invalid
    else:
        scheme, rest = DEFAULT_SCHEME, text
    if rest.endswith("/"):
        rest = rest[:-1]
    if rest.startswith("["):
        ip, sep, port = rest[1:].partition("]:")
        if not sep:
            raise invalid
        try:
            if "%" in ip:  # a zone id, which the Rust side does not take
                raise ValueError(ip)
            ipaddress.IPv6Address(ip)
        except ValueError:
            raise invalid from None
        host = f"[{ip}]"
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not _HOST_NAME.match(host):
            raise invalid
    if not _PORT.match(port) or not 0 < int(port) <= 65535:
        raise invalid
    return scheme, host, int(port)


def parse_addresses(text: str) -> List[str]:
    """The addresses in ``text``, one or several separated by commas, in
    order, blanks around each dropped, each checked as :func:`parse_address`
    does (``CoordinatorAddr::parse_list`` in Rust). Raises ValueError on an
    empty list or entry (naming the whole text) or a malformed address."""
    addresses = [part.strip() for part in text.split(",")]
    for address in addresses:
        if not address:
            raise ValueError(f"invalid coordinator address '{text}': expected HOST:PORT or http(s)://HOST:PORT")
        parse_address(address)
    return addresses


#: How long :func:`first_reachable` waits for each address to accept a
#: connection (``CONNECT_TIMEOUT`` of the Rust client).
CONNECT_TIMEOUT = 5.0


def first_reachable(addresses: List[str], timeout: float = CONNECT_TIMEOUT) -> str:
    """The first of ``addresses`` whose host accepts a TCP connection,
    trying them in order: a refused connection (a standby coordinator does
    not listen) moves on at once, an unreachable host after ``timeout``.
    The first address when none does (its calls then fail UNAVAILABLE, as
    with one address)."""
    for address in addresses:
        _, host, port = parse_address(address)
        try:
            socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
            return address
        except OSError:
            continue
    return addresses[0]


def _pick(url: str) -> str:
    """The one address to dial for ``url`` (see :func:`parse_addresses`)."""
    addresses = parse_addresses(url)
    return addresses[0] if len(addresses) == 1 else first_reachable(addresses)


def parse_target(url: str) -> Tuple[str, bool]:
    """``("HOST:PORT", secure)`` for gRPC from a coordinator address (see
    :func:`parse_address`)."""
    scheme, host, port = parse_address(url)
    return f"{host}:{port}", scheme == "https"


def ca_pin(der: bytes) -> str:
    """The pin of a CA certificate: ``sha256:`` + the hex SHA-256 of its
    DER (what the coordinator logs and ``weft --ca-pin`` takes)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _pin_digest(pin: str) -> str:
    text = pin.strip()
    if not text.lower().startswith("sha256:"):
        raise ValueError(f"invalid CA pin '{pin}': expected sha256: followed by 64 hex digits")
    digest = text[len("sha256:"):].lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"invalid CA pin '{pin}': expected sha256: followed by 64 hex digits")
    return digest


def _pem_certificates(pem: bytes):
    """The DER of each certificate in a PEM bundle."""
    text = pem.decode("ascii", "replace")
    return [ssl.PEM_cert_to_DER_cert(block + "-----END CERTIFICATE-----\n")
            for block in re.findall(r"-----BEGIN CERTIFICATE-----.*?(?=-----END CERTIFICATE-----)", text, re.S)]


def _unverified_chain(tls: ssl.SSLSocket) -> List[bytes]:
    """The DER of each certificate the peer sent, in its order, unverified.

    Python 3.13 has ``SSLSocket.get_unverified_chain()``; 3.10 to 3.12 have
    the same call on the socket's private ``_sslobj`` (returning
    certificate objects)."""
    if hasattr(tls, "get_unverified_chain"):
        return [bytes(cert) for cert in tls.get_unverified_chain() or ()]
    sslobj = getattr(tls, "_sslobj", None)
    if sslobj is None or not hasattr(sslobj, "get_unverified_chain"):
        raise ValueError("this Python cannot read the certificate chain a server sends: pass the cluster's "
                         "ca.pem (ca_file= / WEFT_CA)")
    return [cert.public_bytes(_ssl.ENCODING_DER) for cert in sslobj.get_unverified_chain() or ()]


class PinMismatch(errors.WeftError, ValueError):
    """The coordinator's certificate chain holds no certificate with the
    expected pin: it is not the cluster's coordinator (or the pin is
    wrong). Nothing was sent to it. A :class:`weft.WeftError`, and a
    ValueError as a malformed pin is."""


def fetch_pinned_ca(target: str, pin: str, timeout: float = 5.0) -> bytes:
    """The PEM of the certificate with SHA-256 ``pin`` (``sha256:HEX``) in
    the chain the coordinator at ``target`` (``HOST:PORT``) sends (leaf,
    then CA), read without verification; it then becomes the only trusted
    root, so gRPC's usual checks (signature, dates, name) run against it.

    Raises :class:`PinMismatch` when no certificate matches, ValueError on
    a malformed pin, OSError when the coordinator cannot be reached."""
    digest = _pin_digest(pin)
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            chain = _unverified_chain(tls)
    for der in chain:
        if hashlib.sha256(der).hexdigest() == digest:
            return ssl.DER_cert_to_PEM_cert(der).encode()
    raise PinMismatch(f"the coordinator at {target} is not the one the CA pin sha256:{digest} names: none of the "
                      f"{len(chain)} certificate(s) it sent has that SHA-256 (a wrong pin, or another server "
                      "at that address); nothing was sent to it")


def root_certificates(target: str, ca_file: Optional[str], ca_pin: Optional[str]) -> bytes:
    """The PEM of the CA to trust for ``target``.

    ``ca_file`` (else ``$WEFT_CA``): the cluster's ``ca.pem``. ``ca_pin``
    (else ``$WEFT_CA_PIN``): with a file, the file must match the pin;
    without one, the CA is taken from the chain the coordinator sends, if
    a certificate in it matches the pin (:func:`fetch_pinned_ca`). Raises
    ValueError when neither is given or they disagree (:class:`PinMismatch`
    when the coordinator sends no certificate with the pin), and
    :class:`weft.Unavailable` when the coordinator to fetch it from cannot
    be reached.
    """
    ca_file = ca_file or os.environ.get("WEFT_CA") or None
    ca_pin = ca_pin or os.environ.get("WEFT_CA_PIN") or None
    digest = _pin_digest(ca_pin) if ca_pin else None
    if ca_file:
        with open(ca_file, "rb") as f:
            pem = f.read()
        ders = _pem_certificates(pem)
        if not ders:
            raise ValueError(f"the CA file {ca_file} holds no PEM certificate (expected the cluster's ca.pem)")
        if digest and not any(hashlib.sha256(d).hexdigest() == digest for d in ders):
            raise ValueError(f"the CA file {ca_file} does not match the CA pin {ca_pin}")
        return pem
    if digest:
        try:
            return fetch_pinned_ca(target, ca_pin)
        except OSError as e:  # refused, unreachable, a failed handshake: as a call to it would be
            raise errors.Unavailable(f"cannot fetch the CA from the coordinator at {target} to check it "
                                     f"against the CA pin: {e}") from e
    raise ValueError(f"the coordinator at https://{target} serves TLS: pass the cluster's ca.pem "
                     "(ca_file= / WEFT_CA) or its pin (ca_pin= / WEFT_CA_PIN); for a coordinator "
                     "started with --insecure, use http://HOST:PORT")


def _credentials(target: str, ca_file: Optional[str], ca_pin: Optional[str]) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates(target, ca_file, ca_pin))


def client_token(token: str | None) -> Optional[str]:
    """The client token, in the CLI's order (``cli/src/token.rs``):
    ``token`` when given (even empty: then none), else the contents of
    ``$WEFT_TOKEN_FILE``, else ``$WEFT_TOKEN``, else None; surrounding
    blanks dropped. Raises ValueError naming the file when
    ``$WEFT_TOKEN_FILE`` cannot be read or holds nothing."""
    if token is not None:
        value = token
    elif os.environ.get("WEFT_TOKEN_FILE"):
        value = _read_token_file(os.environ["WEFT_TOKEN_FILE"])
    else:
        value = os.environ.get("WEFT_TOKEN")
    value = (value or "").strip()
    return value or None


def _read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the client token file {path} ($WEFT_TOKEN_FILE): {e}") from None
    if not token:
        raise ValueError(f"the client token file {path} ($WEFT_TOKEN_FILE) is empty")
    return token


def _with_token(metadata, token: str):
    return tuple(metadata or ()) + (("authorization", f"Bearer {token}"),)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a sync channel."""

    def __init__(self, token: str):
        self._token = token

    def __repr__(self) -> str:  # never the token itself
        return "_Bearer(<token>)"

    def _details(self, d):
        return _CallDetails(
            d.method,
            d.timeout,
            _with_token(d.metadata, self._token),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _AioBearer:
    """Adds ``authorization: Bearer <token>`` to calls of an asyncio channel.

    grpc.aio files each interceptor under the first call type it implements,
    so there is one subclass per call type (see :func:`_aio_bearers`)."""

    def __init__(self, token: str):
        self._token = token

    def __repr__(self) -> str:  # never the token itself
        return f"{type(self).__name__}(<token>)"

    def _details(self, d):
        metadata = grpc.aio.Metadata()
        for key, value in (d.metadata or ()):
            metadata.add(key, value)
        metadata.add("authorization", f"Bearer {self._token}")
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


class _AioBearerUU(_AioBearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioBearerUS(_AioBearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioBearerSU(_AioBearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioBearerSS(_AioBearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _aio_bearers(token: str):
    return [cls(token) for cls in (_AioBearerUU, _AioBearerUS, _AioBearerSU, _AioBearerSS)]


class PlaintextTokenWarning(UserWarning):
    """A client token is sent over plaintext ``http://``: anyone on the path can read it."""


def _check_plaintext(url: str, target: str, token: Optional[str], ca_file: Optional[str],
                     ca_pin: Optional[str]) -> None:
    """The rules for an ``http://`` address (as ``weft_proto::tls::dial_plan``
    and the Rust client): a CA or pin (given, or ``$WEFT_CA`` /
    ``$WEFT_CA_PIN``) is refused, since plaintext cannot check it; a token is
    warned about (:class:`PlaintextTokenWarning`)."""
    if ca_file or ca_pin or os.environ.get("WEFT_CA") or os.environ.get("WEFT_CA_PIN"):
        raise ValueError(f"{url} is plaintext, but a CA or pin was given: dial https://{target} "
                         f"(or {target}) to check the coordinator's certificate, or drop the CA/pin "
                         "(ca_file= / WEFT_CA, ca_pin= / WEFT_CA_PIN) for a coordinator started with --insecure")
    if token:
        warnings.warn(f"sending the client token over plaintext {url}: anyone on the path can read it; "
                      "dial https:// with the cluster CA", PlaintextTokenWarning, stacklevel=5)


def _check_addresses(url: str, token: Optional[str], ca_file: Optional[str], ca_pin: Optional[str]) -> None:
    """Checks what needs no network in every address of ``url``: its form
    (:func:`parse_addresses`) and, for ``http://``, the plaintext rules
    (:func:`_check_plaintext`), whichever address is dialled later."""
    for address in parse_addresses(url):
        target, secure = parse_target(address)
        if not secure:
            _check_plaintext(address, target, token, ca_file, ca_pin)


def sync_channel(url: str | None, token: str | None = None, ca_file: Optional[str] = None,
                 ca_pin: Optional[str] = None) -> grpc.Channel:
    """A blocking-API channel to the coordinator at ``url``: TLS trusting
    the cluster CA for ``https://`` and bare ``HOST:PORT`` (see
    :func:`root_certificates`), plaintext for ``http://`` (where a CA or pin
    is refused and a token warned about: see :func:`_check_plaintext`);
    with a ``token``, every call carries it as ``authorization: Bearer``
    metadata. Several comma-separated addresses: each checked first (as
    :func:`_check_addresses`), then the first that accepts a connection
    (:func:`first_reachable`); calls are not sent again to another one."""
    url = coordinator_url(url)
    # Every address is checked before any is probed, as the asyncio client does.
    _check_addresses(url, token, ca_file, ca_pin)
    url = _pick(url)
    target, secure = parse_target(url)
    if secure:
        channel = grpc.secure_channel(target, _credentials(target, ca_file, ca_pin), options=_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return channel


def _aio_channel_to(url: str, token: Optional[str], ca_file: Optional[str], ca_pin: Optional[str],
                    credentials: Optional[grpc.ChannelCredentials] = None,
                    roots: Optional[bytes] = None, checked: bool = False) -> grpc.aio.Channel:
    """An asyncio-API channel to the one coordinator address ``url`` (as
    :func:`sync_channel`); ``credentials`` (a joined worker's: its CA and
    client certificate) replace the CA file and pin; ``roots``: the CA to
    trust, already read or fetched; ``checked``: the plaintext rules were
    checked already."""
    target, secure = parse_target(url)
    if credentials is not None and secure:
        return grpc.aio.secure_channel(target, credentials, options=_OPTIONS)
    if not secure and not checked:
        _check_plaintext(url, target, token, ca_file, ca_pin)
    interceptors = _aio_bearers(token) if token else None
    if secure:
        if roots is None:
            roots = root_certificates(target, ca_file, ca_pin)
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.aio.secure_channel(target, credentials, options=_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=_OPTIONS, interceptors=interceptors)


def _blocks(url: str, ca_file: Optional[str], ca_pin: Optional[str]) -> bool:
    """Whether opening a channel to ``url`` waits on the network: a list of
    addresses to probe, or a CA to fetch by its pin."""
    if len(parse_addresses(url)) > 1:
        return True
    pinned = ca_pin or os.environ.get("WEFT_CA_PIN")
    return bool(pinned) and not (ca_file or os.environ.get("WEFT_CA"))


def _resolve_later(url: str, token: Optional[str], ca_file: Optional[str], ca_pin: Optional[str],
                   credentials: Optional[grpc.ChannelCredentials]):
    """For :func:`lazy_aio_channel` and :func:`open_aio_channel`: checks
    now what needs no network (the addresses, the plaintext rules) and
    answers the blocking rest, the address to dial and the CA to trust, as
    a function for a worker thread."""
    _check_addresses(url, token, ca_file, ca_pin)

    def resolve() -> Tuple[str, Optional[bytes]]:
        picked = _pick(url)
        target, secure = parse_target(picked)
        wanted = secure and credentials is None
        return picked, (root_certificates(target, ca_file, ca_pin) if wanted else None)

    return resolve


def lazy_aio_channel(url: str | None, token: str | None = None, ca_file: Optional[str] = None,
                     ca_pin: Optional[str] = None) -> grpc.aio.Channel:
    """An asyncio-API channel to the coordinator at ``url`` (as
    :func:`sync_channel`) that never blocks the event loop: when opening it
    waits on the network (several addresses to probe, a CA to fetch by its
    pin), the addresses are checked now and the rest is done in a worker
    thread at the first call (:class:`_LazyChannel`); otherwise it is
    opened at once."""
    url = coordinator_url(url)
    if not _blocks(url, ca_file, ca_pin):
        return _aio_channel_to(url, token, ca_file, ca_pin)
    resolve = _resolve_later(url, token, ca_file, ca_pin, None)

    async def open_channel() -> grpc.aio.Channel:
        picked, roots = await asyncio.to_thread(resolve)
        return _aio_channel_to(picked, token, ca_file, ca_pin, roots=roots, checked=True)

    return _LazyChannel(open_channel)


async def open_aio_channel(url: str | None, token: str | None = None, ca_file: Optional[str] = None,
                           ca_pin: Optional[str] = None,
                           credentials: Optional[grpc.ChannelCredentials] = None) -> grpc.aio.Channel:
    """An asyncio-API channel to the coordinator at ``url`` (as
    :func:`sync_channel`; ``credentials``: a joined worker's), opened from a
    coroutine: the probe of several addresses and the fetch of a pinned CA
    run in a worker thread, so the event loop (a worker's running
    handlers, say) goes on meanwhile."""
    url = coordinator_url(url)
    if not _blocks(url, ca_file, ca_pin) or (credentials is not None and len(parse_addresses(url)) == 1):
        return _aio_channel_to(url, token, ca_file, ca_pin, credentials)
    resolve = _resolve_later(url, token, ca_file, ca_pin, credentials)
    picked, roots = await asyncio.to_thread(resolve)
    return _aio_channel_to(picked, token, ca_file, ca_pin, credentials, roots=roots, checked=True)


class _LazyChannel:
    """A ``grpc.aio`` channel opened at its first call, by ``open_channel``
    (a coroutine): the stubs built on it keep their methods, each unary
    call awaits the opening, each streaming call opens on its first
    message. Only what the SDK's stubs and calls use: the four kinds of
    methods, ``close``.

    The opening is a task of its own, shared by the calls that wait on it:
    a caller cancelled meanwhile does not cancel it, and its outcome is
    taken by a done-callback (:meth:`_opened`), so a channel it opens is
    kept (and closed by :meth:`close`) whoever still waits on it."""

    def __init__(self, open_channel):
        self._open_channel = open_channel
        self._channel: Optional[grpc.aio.Channel] = None
        self._opening: Optional[asyncio.Future] = None
        self._closed = False

    async def channel(self) -> grpc.aio.Channel:
        """The channel, opened once whoever asks first. An opening that
        failed (the coordinator down, a wrong pin) raises to the calls
        that waited on it and is not kept: the next call opens again.
        After :meth:`close`, raises ``grpc.aio.UsageError``, as do the calls
        that waited on the opening it cancelled."""
        if self._closed:
            raise grpc.aio.UsageError("the channel is closed: this client was closed")
        if self._channel is not None:
            return self._channel
        if self._opening is None:
            opening = asyncio.ensure_future(self._open_channel())
            opening.add_done_callback(self._opened)
            self._opening = opening
        opening = self._opening
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The opening cancelled by close(), not this caller: it gets what a call
            # after close() gets. A caller cancelled itself is cancelled still.
            # (Task.cancelling is Python 3.11+; on 3.10 a caller cancelled at that very
            # moment gets UsageError too.)
            cancelling = getattr(asyncio.current_task(), "cancelling", lambda: 0)
            if self._closed and opening.cancelled() and not cancelling():
                raise grpc.aio.UsageError("the channel is closed: this client was closed") from None
            raise

    def _opened(self, opening: asyncio.Future) -> None:
        """Takes an opening's outcome: its channel is kept, its failure
        forgotten (it was raised to whoever waited). An opening no longer
        current was cancelled or taken by :meth:`close`."""
        if self._opening is not opening:
            return
        self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self._channel = opening.result()

    def unary_unary(self, method, *args, **kwargs):
        async def call(request, **options):
            real = (await self.channel()).unary_unary(method, *args, **kwargs)
            return await real(request, **options)
        return call

    def stream_unary(self, method, *args, **kwargs):
        async def call(requests, **options):
            real = (await self.channel()).stream_unary(method, *args, **kwargs)
            return await real(requests, **options)
        return call

    def unary_stream(self, method, *args, **kwargs):
        return lambda request, **options: _LazyStreamCall(
            self, "unary_stream", method, args, kwargs, request, options)

    def stream_stream(self, method, *args, **kwargs):
        return lambda requests, **options: _LazyStreamCall(
            self, "stream_stream", method, args, kwargs, requests, options)

    async def close(self, grace: Optional[float] = None) -> None:
        """Closes the channel, one an opening finished with included (its
        done-callback may not have run yet), or cancels the opening under
        way. Later calls raise ``grpc.aio.UsageError``."""
        self._closed = True
        channel, self._channel = self._channel, None
        opening, self._opening = self._opening, None
        if channel is None and opening is not None:
            if not opening.done():
                opening.cancel()
            elif not opening.cancelled() and opening.exception() is None:
                channel = opening.result()
        if channel is not None:
            await channel.close(grace)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _LazyStreamCall:
    """A streaming call on a :class:`_LazyChannel`: iterated with ``async
    for``, cancelled with :meth:`cancel`, like ``grpc.aio``'s."""

    def __init__(self, lazy: _LazyChannel, kind: str, method, args, kwargs, request, options):
        self._lazy = lazy
        self._open = (kind, method, args, kwargs, request, options)
        self._call = None
        self._cancelled = False

    async def _opened(self):
        if self._call is None:
            kind, method, args, kwargs, request, options = self._open
            channel = await self._lazy.channel()
            self._call = getattr(channel, kind)(method, *args, **kwargs)(request, **options)
            if self._cancelled:
                self._call.cancel()
        return self._call

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        call = await self._opened()
        async for message in call:
            yield message

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel() if self._call is not None else True
