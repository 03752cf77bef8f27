"""Module-level handlers for the in-process worker tests (process handlers must be importable)."""

import os
import time


def burn(data: bytes) -> str:
    """Burns CPU for the seconds in its input; returns pid and CPU seconds used."""
    start = time.process_time()
    deadline = time.monotonic() + float(data or b"0.5")
    x = 0
    while time.monotonic() < deadline:
        x += sum(i * i for i in range(1000))
    return f"{os.getpid()} {time.process_time() - start:.3f}"


def report(data: bytes, ctx) -> bytes:
    ctx.output(b"from a process\n")
    ctx.progress(0.5, "half")
    return data.upper()


def secret_upper(data: bytes, ctx) -> str:
    """The task's API_KEY secret, upper-cased (proof it arrived, without echoing it)."""
    return ctx.secret_env.get("API_KEY", "missing").upper()


def crash(data: bytes) -> None:
    os._exit(3)


def hang(data: bytes) -> None:
    time.sleep(60)


def _parse_config(data: bytes) -> int:
    return int(data.decode())


def raise_value_error(data: bytes) -> int:
    """Fails with a ValueError two frames down (for the traceback)."""
    return _parse_config(data)


def touch(data: bytes) -> str:
    """Creates the file named by the input; returns this process's pid."""
    with open(data.decode(), "w"):
        pass
    return str(os.getpid())


def echo(data: bytes) -> bytes:
    """Returns its input."""
    return data


def trace_of(data: bytes, ctx) -> str:
    """The W3C trace context this attempt runs under, as the handler sees it."""
    return f"{ctx.traceparent} {ctx.tracestate}".strip()
