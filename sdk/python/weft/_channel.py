"""Coordinator URLs to gRPC channels."""

from __future__ import annotations

import os
from typing import Tuple

import grpc

#: Where clients and workers look when given no URL.
DEFAULT_COORDINATOR = "http://127.0.0.1:7070"

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


def parse_target(url: str) -> Tuple[str, bool]:
    """``("host:port", secure)`` from ``http://host:port``, ``https://...`` or ``host:port``."""
    url = url.strip()
    secure = False
    if url.startswith("https://"):
        secure, url = True, url[len("https://"):]
    elif url.startswith("http://"):
        url = url[len("http://"):]
    url = url.rstrip("/")
    if not url:
        raise ValueError("empty coordinator address")
    return url, secure


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
