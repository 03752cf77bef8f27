"""The task bodies the Python paths benchmark runs, as importable module-level
functions: a process pool (``ProcessPoolExecutor``), a ``weft.Executor`` and
the benchmark's SDK worker all run these same functions.

``noop(x)`` returns its argument, as in the peer benchmark kit's protocol
(``shared/peers/tasks.py``): the argument and the result must travel.
"""

from __future__ import annotations


def noop(x):
    """Returns ``x``."""
    return x


async def noop_async(data: bytes) -> bytes:
    """The noop as an asyncio handler: returns its input."""
    return data


def noop_bytes(data: bytes) -> bytes:
    """The noop as a thread or process handler: returns its input."""
    return data
