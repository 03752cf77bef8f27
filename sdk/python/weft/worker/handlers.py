"""The handlers a Python worker serves: the registry, how a handler is
called (its signature, what it returns) and the errors that fail an
attempt.

The counterpart of ``node/src/handlers/``. It knows nothing of attempts,
sessions or messages: ``attempt.py`` looks handlers up here and runs them,
and turns what they return or raise into a ``Finished`` with the helpers
below.
"""

from __future__ import annotations

import inspect
import json
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

#: How handlers run.
KINDS = ("asyncio", "thread", "process")
#: How a handler's input and result are encoded: raw bytes, or JSON both ways.
CODECS = ("bytes", "json")


class HandlerError(Exception):
    """Raise from a handler to fail the attempt with exactly this message."""

    weft_plain_message = True


class StartFailed(Exception):
    """The attempt could not start (unknown handler, missing binary, input
    its codec cannot decode): not retried; the error is its message alone."""

    weft_plain_message = True


@dataclass
class Handler:
    """A registered handler: the function, its name and how it runs."""

    name: str
    fn: Callable
    kind: str
    wants_context: bool
    codec: str = "bytes"


class Handlers:
    """The registered handlers, by name."""

    def __init__(self) -> None:
        self._by_name: Dict[str, Handler] = {}

    def register(self, name: str, fn: Callable, kind: Optional[str] = None, codec: str = "bytes") -> Handler:
        """Registers ``fn`` as ``name`` (see ``Worker.register``). With
        ``codec="json"`` the registered function is ``fn`` wrapped in
        :class:`JsonCodec`: input decoded from JSON, result encoded to it."""
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
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
        context = wants_context(fn)
        if codec == "json":
            fn = (AsyncJsonCodec if kind == "asyncio" else JsonCodec)(name, fn, context)
        handler = Handler(name=name, fn=fn, kind=kind, wants_context=context, codec=codec)
        self._by_name[name] = handler
        return handler

    def get(self, name: str) -> Optional[Handler]:
        """The handler registered as ``name``, if any."""
        return self._by_name.get(name)

    def names(self) -> List[str]:
        """Names of the registered handlers, sorted."""
        return sorted(self._by_name)

    def any_process(self) -> bool:
        """Whether a handler needs the process pool."""
        return any(h.kind == "process" for h in self._by_name.values())


def wants_context(fn: Callable) -> bool:
    """Whether ``fn`` takes a second positional argument (the ``Context``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class JsonCodec:
    """A handler taking and returning JSON: ``fn(obj[, ctx])`` for the
    decoded input; its result is JSON-encoded (``None`` is ``null``).

    A class, not a closure, so that a ``process`` handler pickles into the
    pool. Input that is not JSON fails the attempt to start (not retried),
    saying so; a result JSON cannot encode fails it like any exception.
    """

    def __init__(self, name: str, fn: Callable, wants_context: bool):
        self.name = name
        self.fn = fn
        self.wants_context = wants_context

    def decode(self, data: bytes) -> Any:
        """The input as JSON (empty input is ``None``); StartFailed when it is not JSON."""
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StartFailed(f"handler '{self.name}' takes JSON input, and its input is not JSON: {e}") from None

    @staticmethod
    def encode(value: Any) -> bytes:
        """The result as JSON bytes."""
        return json.dumps(value).encode()

    def __call__(self, data: bytes, *ctx: Any) -> bytes:
        return self.encode(self.fn(self.decode(data), *ctx))


class AsyncJsonCodec(JsonCodec):
    """:class:`JsonCodec` for an ``async def`` handler."""

    async def __call__(self, data: bytes, *ctx: Any) -> bytes:
        return self.encode(await self.fn(self.decode(data), *ctx))


def to_output(value: Any) -> bytes:
    """A handler's return value as the attempt's output bytes."""
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


#: Most characters of a traceback kept in an attempt's error (the
#: coordinator keeps 64 KiB of it; the innermost frames are the ones kept).
TRACEBACK_LIMIT = 16 * 1024


def error_text(e: BaseException) -> str:
    """What a handler's exception says in the attempt's error: ``Type: message`` on the first
    line, then the traceback (a :class:`HandlerError` says its message only)."""
    if getattr(e, "weft_plain_message", False):
        return str(e)
    text = str(e)
    summary = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return with_traceback(summary, "".join(traceback.format_exception(type(e), e, e.__traceback__)))


def with_traceback(summary: str, trace: str) -> str:
    """``summary``, then ``trace`` (its last :data:`TRACEBACK_LIMIT` characters) below a blank line."""
    trace = trace.strip()
    if not trace:
        return summary
    if len(trace) > TRACEBACK_LIMIT:
        trace = "... (traceback cut)\n" + trace[-TRACEBACK_LIMIT:]
    return f"{summary}\n\n{trace}"

