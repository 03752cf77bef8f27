"""Coordinator addresses to gRPC channels.

An address is ``http://HOST:PORT``, ``https://HOST:PORT`` or ``HOST:PORT``
(``127.0.0.1:7070``, ``[::1]:7070``, ``localhost:7070``): the rules of
``weft_proto::address`` in Rust, so every binary and both SDKs take the
same forms and refuse the same garbage with the same message.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import re
from typing import Optional, Tuple

import grpc

#: Where clients and workers look when given no URL.
DEFAULT_COORDINATOR = "http://127.0.0.1:7070"

#: The scheme of an address written without one. ``http`` while the
#: coordinator serves plaintext; when TLS becomes the default this turns to
#: ``https`` (together with ``DEFAULT_SCHEME`` in ``proto/src/address.rs``).
DEFAULT_SCHEME = "http"

_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+\Z")
_PORT = re.compile(r"[0-9]+\Z")

_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
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


def parse_target(url: str) -> Tuple[str, bool]:
    """``("HOST:PORT", secure)`` for gRPC from a coordinator address (see
    :func:`parse_address`)."""
    scheme, host, port = parse_address(url)
    return f"{host}:{port}", scheme == "https"


def client_token(token: str | None) -> Optional[str]:
    """``token``, else ``$WEFT_TOKEN``, else None (surrounding blanks dropped)."""
    value = token if token is not None else os.environ.get("WEFT_TOKEN")
    value = (value or "").strip()
    return value or None


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


def sync_channel(url: str | None, token: str | None = None) -> grpc.Channel:
    """A blocking-API channel to the coordinator at ``url``; with a ``token``,
    every call carries it as ``authorization: Bearer`` metadata."""
    target, secure = parse_target(coordinator_url(url))
    if secure:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=_OPTIONS)
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return channel


def aio_channel(url: str | None, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio-API channel to the coordinator at ``url`` (``token`` as in
    :func:`sync_channel`)."""
    target, secure = parse_target(coordinator_url(url))
    interceptors = _aio_bearers(token) if token else None
    if secure:
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), options=_OPTIONS, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=_OPTIONS, interceptors=interceptors)
