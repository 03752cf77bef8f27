"""Child processes for ``exec`` tasks: start the argv in a process group of
its own, stream its stdout/stderr, feed its stdin, kill the whole group
when it ends or is stopped, and tell the reaper about the group.

The counterpart of ``node/src/process.rs``. It answers the exit code and
reports output and the start through callbacks; it does not build events
or decide outcomes (``attempt.py`` does both), and knows the reaper only
as something with ``watch(pgid)``/``forget(pgid)`` (``reaper.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Awaitable, Callable, Mapping, Optional

from .._proto import common_pb2
from .handlers import StartFailed
from .outbox import CHUNK_LIMIT


async def run_exec(
    spec: common_pb2.ExecSpec,
    reaper,
    set_kill: Callable[[Callable[[], None]], None],
    started: Callable[[int], None],
    output: Callable[[bytes, str], None],
    secret_env: Optional[Mapping[str, str]] = None,
    trace: Optional[common_pb2.TraceContext] = None,
    weft_env: Optional[Mapping[str, str]] = None,
    room: Optional[Callable[[], Awaitable[None]]] = None,
) -> int:
    """Runs ``spec`` to its end and answers its return code (negative: the
    signal that killed it). ``set_kill`` receives the hard stop (SIGKILL to
    the group) before ``started(pid)``; ``output(chunk, stream)`` gets the
    output as it comes. Raises :class:`StartFailed` if it cannot start; on
    cancellation kills the group, waits for the child and re-raises.
    ``weft_env``: ``$WEFT_PARENTS``/``$WEFT_OUTPUT`` (``parents.py``), set
    after the task's env (the node's, not the submitter's to choose).
    ``room()`` is awaited before each read: while the output sent so far
    waits for a coordinator, the pipes are not read and the child blocks
    writing (the outbox's bound)."""
    if not spec.argv:
        raise StartFailed("exec task with an empty argv")
    env = dict(os.environ)
    # The attempt's trace context (never the worker's own); the task's env
    # and secrets, after it, win.
    env.pop("TRACEPARENT", None)
    env.pop("TRACESTATE", None)
    if trace is not None and trace.traceparent:
        env["TRACEPARENT"] = trace.traceparent
        if trace.tracestate:
            env["TRACESTATE"] = trace.tracestate
    env.update(spec.env)
    env.update(weft_env or {})
    # After env: a secret wins over a plain value of the same name.
    env.update(secret_env or {})
    try:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.PIPE if spec.stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=spec.cwd or None,
            env=env,
            start_new_session=True,
        )
    except (OSError, ValueError) as e:
        raise StartFailed(f"cannot start {spec.argv[0]!r}: {e}") from None

    def kill() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    set_kill(kill)
    if reaper is not None:
        reaper.watch(proc.pid)
    started(proc.pid)

    async def pump(reader: asyncio.StreamReader, stream: str) -> None:
        while True:
            if room is not None:
                await room()
            chunk = await reader.read(CHUNK_LIMIT)
            if not chunk:
                return
            output(chunk, stream)

    async def feed() -> None:
        try:
            proc.stdin.write(bytes(spec.stdin))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            proc.stdin.close()

    io = [asyncio.ensure_future(pump(proc.stdout, "stdout")), asyncio.ensure_future(pump(proc.stderr, "stderr"))]
    if spec.stdin:
        io.append(asyncio.ensure_future(feed()))
    told_gone = False

    def gone() -> None:
        nonlocal told_gone
        if reaper is not None and not told_gone:
            told_gone = True
            reaper.forget(proc.pid)

    try:
        code = await proc.wait()
        kill()  # what it left running in its group goes with it
        gone()
        await asyncio.gather(*io)
    except asyncio.CancelledError:
        kill()
        await asyncio.shield(proc.wait())
        gone()
        for task in io:
            task.cancel()
        raise
    return code
