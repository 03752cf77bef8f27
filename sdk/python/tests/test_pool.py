"""Unit tests of the worker's process pool (``weft._pool``) on a loop of their own: calls that
come together reach a process in one pipe write, calls handed down ahead wait several deep behind
a running one and spread over the processes, and taking one of them back never touches the call
that runs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

import handlers
from weft import _pool
from weft._pool import KILLED, ProcessPool


class Calls:
    """What the pool reports per tag: begins and ends."""

    def __init__(self) -> None:
        self.begun: List[Any] = []
        self.ended: Dict[Any, tuple] = {}

    def on_message(self, tag: Any, message: tuple) -> None:
        if message[0] == "begin":
            self.begun.append(tag)

    def on_done(self, tag: Any, ok: bool, value: Any) -> None:
        self.ended[tag] = (ok, value)

    def submit(self, pool: ProcessPool, fn: Callable, tag: Any, data: bytes = b"", ahead: bool = False):
        return pool.submit(fn, data, f"task-{tag}", 1, False, tag=tag, on_message=self.on_message,
                           on_done=self.on_done, ahead=ahead)


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def run(body) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


def test_calls_that_come_together_go_in_one_write_and_one_taken_back_never_touches_the_running_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    writes: List[int] = []
    real_write = os.write

    def counting_write(fd: int, data) -> int:
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(_pool.os, "write", counting_write)

    async def body() -> None:
        pool = ProcessPool(1)
        pool.ahead_depth = 4
        calls = Calls()
        markers = [tmp_path / f"m{i}" for i in range(3)]
        try:
            running = calls.submit(pool, handlers.hang, "hang")
            waiting = [calls.submit(pool, handlers.touch, i, str(m).encode(), ahead=True) for i, m in enumerate(markers)]
            proc = pool._procs[0]
            fd = proc.conn.fileno()
            assert list(proc.calls) == [running.id] + [c.id for c in waiting], "all behind the running call"
            assert calls.begun == ["hang"] and running.pid == proc.pid, "the running call names its process"
            assert pool.ahead_count() == 3
            await asyncio.sleep(0.05)
            assert writes.count(fd) == 1, "four calls, one pipe write"
            # The middle one is taken back: the process skips it, the running call runs on.
            waiting[1].kill()
            assert calls.ended[1] == (False, KILLED)
            assert pool.ahead_count() == 2
            await asyncio.sleep(0.2)
            assert proc.process.is_alive() and "hang" not in calls.ended
            # Killing the running call kills its process; what it had not begun goes back.
            running.kill()
            assert calls.ended["hang"] == (False, KILLED) and proc.dead
            assert pool.ahead_count() == 2 and not pool._procs
            # Their attempts got the freed slots: they run in a fresh process.
            assert pool.reclaim_ahead() == 0 and pool.reclaim_ahead() == 2 and pool.reclaim_ahead() is None
            pool.dispatch()
            await until(lambda: 0 in calls.ended and 2 in calls.ended, "the calls taken back to run")
            assert calls.ended[0][0] and calls.ended[2][0]
            assert calls.begun == ["hang", 0, 2]
            assert markers[0].exists() and markers[2].exists()
            assert not markers[1].exists(), "taken back: never ran"
            assert calls.ended[0][1] != str(proc.pid), "in a fresh process"
        finally:
            pool.shutdown()

    run(body)


@pytest.mark.parametrize("depth", [1, 2])
def test_calls_handed_down_ahead_spread_over_the_processes_up_to_the_depth(depth: int):
    async def body() -> None:
        pool = ProcessPool(2)
        pool.ahead_depth = depth
        calls = Calls()
        try:
            running = [calls.submit(pool, handlers.hang, f"hang{i}") for i in range(2)]
            assert calls.begun == ["hang0", "hang1"], "one per process, both run"
            assert len({c.pid for c in running}) == 2
            for i in range(4):
                calls.submit(pool, handlers.touch, i, b"/nonexistent/never", ahead=True)
            held = sorted(len(p.calls) for p in pool._procs)
            assert held == [1 + depth, 1 + depth], "each process holds its running call and up to depth more"
            assert len(pool._ahead) == 4 - 2 * depth, "the rest wait in the pool"
            assert pool.ahead_count() == 4
            assert calls.begun == ["hang0", "hang1"], "none begins before a running call ends"
        finally:
            pool.shutdown()

    run(body)


def test_large_calls_and_results_several_deep_never_block_the_worker_on_a_full_pipe():
    async def body() -> None:
        pool = ProcessPool(1)
        pool.ahead_depth = 4
        calls = Calls()
        # Each input and result is several times what a pipe holds.
        data = [bytes([i]) * (300 * 1024) for i in range(5)]
        try:
            calls.submit(pool, handlers.echo, 0, data[0])
            for i in range(1, 5):
                calls.submit(pool, handlers.echo, i, data[i], ahead=True)
            await until(lambda: len(calls.ended) == 5, "the five results", timeout=30)
            assert [calls.ended[i] for i in range(5)] == [(True, d) for d in data]
            assert calls.begun == [0, 1, 2, 3, 4]
        finally:
            pool.shutdown()

    run(body)
