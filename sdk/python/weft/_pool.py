"""A process pool whose tasks can be killed one by one.

``concurrent.futures.ProcessPoolExecutor`` cannot stop a single running call,
but a node must stop a cancelled attempt within a second. So each pool
process runs one call at a time over its own pipe; cancelling a call SIGKILLs
the process that runs it, and a fresh one is spawned on demand.

Processes are started with the ``spawn`` method (forking a process that runs
gRPC threads is unsafe), so handlers must be importable module-level
functions: define them at the top of a module or script, and keep the
script's start-up under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import traceback
from typing import Any, Callable, List, Optional

log = logging.getLogger("weft.worker")


class _ChildContext:
    """The handler context inside a pool process: output and progress go over the pipe."""

    def __init__(self, conn, task_id: str, attempt: int, input: bytes, secret_env: Optional[dict] = None):
        self._conn = conn
        self.task_id = task_id
        self.attempt = attempt
        self.input = input
        self.secret_env = dict(secret_env or {})
        self.kind = "process"

    @property
    def cancelled(self) -> bool:
        # A cancelled process call is killed; it never observes the flag.
        return False

    def check_cancelled(self) -> None:
        return None

    def output(self, data, stream: str = "stdout") -> None:
        if isinstance(data, str):
            data = data.encode()
        self._conn.send(("output", stream, bytes(data)))

    def print(self, *args, sep: str = " ", end: str = "\n", stream: str = "stdout") -> None:
        self.output(sep.join(str(a) for a in args) + end, stream)

    def progress(self, fraction: float, message: str = "") -> None:
        self._conn.send(("progress", float(fraction), str(message)))


def _child_main(conn) -> None:
    """Body of a pool process: run calls until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            fn, input, task_id, attempt, wants_context, secret_env = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # unpicklable handler: report, keep serving
            conn.send(("error", "StartFailed", f"cannot load handler in pool process: {e}"))
            continue
        try:
            if wants_context:
                result = fn(input, _ChildContext(conn, task_id, attempt, input, secret_env))
            else:
                result = fn(input)
            conn.send(("ok", result))
        except BaseException as e:  # noqa: BLE001 - report every failure
            plain = getattr(e, "weft_plain_message", False)
            message = str(e) if plain else f"{type(e).__name__}: {e}"
            # A HandlerError's message is all it says; anything else
            # carries where it was raised.
            log_tail = "" if plain else traceback.format_exc()
            try:
                conn.send(("error", type(e).__name__, message, log_tail))
            except Exception:
                return


class _Proc:
    def __init__(self, ctx):
        parent, child = ctx.Pipe(duplex=True)
        self.conn = parent
        self.process = ctx.Process(target=_child_main, args=(child,), daemon=True, name="weft-pool")
        self.process.start()
        child.close()
        self.busy = False

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def kill(self) -> None:
        try:
            self.process.kill()
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


class ProcessCall:
    """One call running in a pool process."""

    def __init__(self, pool: "ProcessPool", proc: _Proc, on_message: Callable[[tuple], None]):
        self._pool = pool
        self.proc = proc
        self._on_message = on_message
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _readable(self) -> None:
        try:
            while self.proc.conn.poll():
                message = self.proc.conn.recv()
                kind = message[0]
                if kind in ("output", "progress"):
                    self._on_message(message)
                elif kind == "ok":
                    self._done(result=message[1])
                    return
                elif kind == "error":
                    self._done(error=message)
                    return
        except (EOFError, OSError):
            self._done(error=("error", "ProcessDied", f"pool process {self.proc.pid} died"), dead=True)
        except Exception as e:  # an unpicklable result, say
            self._done(error=("error", type(e).__name__, f"{type(e).__name__}: {e}"), dead=True)

    def _done(self, result: Any = None, error: Optional[tuple] = None, dead: bool = False) -> None:
        if self.result.done():
            return
        self._pool._release(self.proc, dead=dead)
        if error is not None:
            self.result.set_exception(PoolCallError(error[1], error[2], error[3] if len(error) > 3 else ""))
        else:
            self.result.set_result(result)

    def kill(self) -> None:
        """SIGKILLs the process running this call; the call fails with Cancelled."""
        if self.result.done():
            return
        self._pool._release(self.proc, dead=True)
        self.result.set_exception(asyncio.CancelledError())


class PoolCallError(Exception):
    """A process call raised (``type_name`` is the exception's class name)."""

    def __init__(self, type_name: str, message: str, traceback_text: str = ""):
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback_text


class ProcessPool:
    """Up to ``size`` spawn-started processes, each running one call at a time."""

    def __init__(self, size: int):
        self._ctx = multiprocessing.get_context("spawn")
        self._size = max(1, size)
        self._idle: List[_Proc] = []
        self._all: List[_Proc] = []
        self._free = None  # asyncio.Semaphore, made on the loop

    def warm_up(self, count: int) -> None:
        """Starts up to ``count`` processes ahead of the first call."""
        while len(self._all) < min(count, self._size):
            proc = _Proc(self._ctx)
            self._all.append(proc)
            self._idle.append(proc)

    async def call(
        self, fn: Callable, input: bytes, task_id: str, attempt: int, wants_context: bool,
        on_message: Callable[[tuple], None], secret_env: Optional[dict] = None,
    ) -> ProcessCall:
        """Starts ``fn(input[, ctx])`` in an idle process (waiting for one if all are busy)."""
        if self._free is None:
            self._free = asyncio.Semaphore(self._size)
        await self._free.acquire()
        try:
            proc = self._idle.pop() if self._idle else None
            if proc is None or not proc.process.is_alive():
                if proc is not None:
                    self._forget(proc)
                proc = _Proc(self._ctx)
                self._all.append(proc)
            proc.busy = True
            call = ProcessCall(self, proc, on_message)
            proc.conn.send((fn, input, task_id, attempt, wants_context, secret_env or {}))
            asyncio.get_running_loop().add_reader(proc.conn.fileno(), call._readable)
            return call
        except BaseException:
            self._free.release()
            raise

    def _forget(self, proc: _Proc) -> None:
        if proc in self._all:
            self._all.remove(proc)

    def _release(self, proc: _Proc, dead: bool) -> None:
        try:
            asyncio.get_running_loop().remove_reader(proc.conn.fileno())
        except Exception:
            pass
        proc.busy = False
        if dead:
            proc.kill()
            self._forget(proc)
        else:
            self._idle.append(proc)
        if self._free is not None:
            self._free.release()

    def pids(self) -> List[int]:
        """Process ids of the live pool processes."""
        return [p.pid for p in self._all if p.process.is_alive()]

    def shutdown(self) -> None:
        """Kills every pool process."""
        for proc in list(self._all):
            proc.kill()
        for proc in list(self._all):
            proc.process.join(timeout=1)
        self._all.clear()
        self._idle.clear()
