"""Coordinator addresses to gRPC channels.

An address is ``http://HOST:PORT``, ``https://HOST:PORT`` or ``HOST:PORT``
(``127.0.0.1:7070``, ``[::1]:7070``, ``localhost:7070``): the rules of
``weft_proto::address`` in Rust, so every binary and both SDKs take the
same forms and refuse the same garbage with the same message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Tuple

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


def sync_channel(url: str | None) -> grpc.Channel:
    """A blocking-API channel to the coordinator at ``url``."""
    target, secure = parse_target(coordinator_url(url))
    if secure:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=_OPTIONS)
    return grpc.insecure_channel(target, options=_OPTIONS)


def aio_channel(url: str | None) -> grpc.aio.Channel:
    """An asyncio-API channel to the coordinator at ``url``."""
    target, secure = parse_target(coordinator_url(url))
    if secure:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=_OPTIONS)
    return grpc.aio.insecure_channel(target, options=_OPTIONS)
