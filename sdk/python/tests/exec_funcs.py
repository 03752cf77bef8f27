"""Module-level functions for weft.Executor's tests: the test worker allows this module
(``--allow-module exec_funcs``) and imports it from the tests folder (PYTHONPATH)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class Oops(ValueError):
    """An exception of this module, raised again on the client as itself."""


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0, *, scale: int = 1) -> int:
    return (x + y) * scale


def noop(x):
    return x


def fail(message: str) -> None:
    raise Oops(message)


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise KeyError(x)
    return x


def unpicklable_failure() -> None:
    raise UnpicklableError("no way back", lambda: None)


class UnpicklableError(Exception):
    """Carries a lambda: it cannot be pickled back, so the client gets TaskFailed with the text."""


def wait_for_file(path: str, timeout: float = 60.0) -> str:
    """Blocks (running) until ``path`` exists: a test holds a task running with it."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


def touch_then_wait(started: str, path: str, timeout: float = 60.0) -> str:
    """Creates ``started``, then waits for ``path``: the test knows the call is running."""
    Path(started).touch()
    return wait_for_file(path, timeout)


def pid(_x=None) -> int:
    return os.getpid()


def touch(path: str) -> None:
    """Creates ``path``: proof that a call ran."""
    Path(path).touch()


def json_sum(obj: dict) -> dict:
    """A codec="json" handler: the sum of ``obj["values"]``."""
    return {"sum": sum(obj["values"]), "n": len(obj["values"])}


def total(values) -> int:
    """The sum of a list (a list of futures' results, substituted one level deep)."""
    return sum(values)


def parents_seen(data: bytes, ctx) -> list:
    """A handler that answers what its context says of its parents, in order."""
    return [[p.task_id, p.ref, p.state, p.output.decode()] for p in ctx.parents]
