"""A process pool whose calls can be killed one by one, and that keeps its
processes busy.

``concurrent.futures.ProcessPoolExecutor`` cannot stop a single running call,
but a node must stop a cancelled attempt within a second. So each pool
process runs one call at a time over its own pipe; cancelling a running call
SIGKILLs the process that runs it (a fresh one is spawned on demand), and a
call not begun yet is taken back without running (the process is told to skip
it, and is killed should it have begun it all the same).

Each process holds up to :data:`DEPTH` calls: the one it runs and the next,
so it starts the next as soon as one ends instead of waiting for the worker
to read the result and send another. It says which call it begins (with the
result of the one before, in one message), so the worker always knows which
call a kill would stop. Calls beyond what the processes hold wait in the
pool, first in first out. A call submitted ``ahead`` (its attempt is still
queued, holding no slot) goes only behind a running call, and begins in the
slot that call frees: the pool never runs more calls at once than it has
processes, nor an ahead call before a call ends. Up to
:attr:`ProcessPool.ahead_depth` of them wait behind one running call (the
worker makes it deep for short calls, one for long ones), in the process
holding the fewest.

What the worker sends a process within one turn of its loop goes in one
pipe write, after that turn (several calls that came in one batch, the next
calls after several results read at once); a process reads what arrived in
one go, so short calls cost few system calls and wake-ups on both sides.

Processes are started with the ``spawn`` method (forking a process that runs
gRPC threads is unsafe), so handlers must be importable module-level
functions: define them at the top of a module or script, and keep the
script's start-up under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing
import os
import pickle
import select
import signal
import struct
import traceback
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from .tracing import TracedContext

log = logging.getLogger("weft.worker")

#: Calls one pool process holds at once: the one it runs and the next.
DEPTH = 2
#: Most calls handed down ahead that wait behind a running call in one
#: process (:attr:`ProcessPool.ahead_depth` says how many now).
AHEAD_MAX = 8
#: Bytes read from a pool process at a time.
READ_SIZE = 1 << 16


class _ChildContext(TracedContext):
    """The handler context inside a pool process: output and progress go over the pipe."""

    def __init__(
        self, conn, call_id: int, task_id: str, attempt: int, input: bytes, secret_env: Optional[dict] = None,
        trace: Tuple[str, str] = ("", ""), parents: tuple = (),
    ):
        self._conn = conn
        self._id = call_id
        self.task_id = task_id
        self.attempt = attempt
        self.input = input
        self.secret_env = dict(secret_env or {})
        self.traceparent, self.tracestate = trace
        #: The task's parents' results (:class:`weft.ParentResult`), in ``after`` order.
        self.parents = list(parents)
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
        self._conn.send(("output", self._id, stream, bytes(data)))

    def print(self, *args, sep: str = " ", end: str = "\n", stream: str = "stdout") -> None:
        self.output(sep.join(str(a) for a in args) + end, stream)

    def progress(self, fraction: float, message: str = "") -> None:
        self._conn.send(("progress", self._id, float(fraction), str(message)))


def _frames(buffer: bytearray) -> List[tuple]:
    """Takes the whole frames off the head of ``buffer`` and answers their
    messages. ``multiprocessing.Connection``'s frames: a signed 4-byte
    big-endian length (-1: an 8-byte length follows), then the pickle."""
    out = []
    start, end = 0, len(buffer)
    while end - start >= 4:
        size = int.from_bytes(buffer[start:start + 4], "big", signed=True)
        head = 4
        if size == -1:
            if end - start < 12:
                break
            size = int.from_bytes(buffer[start + 4:start + 12], "big")
            head = 12
        if end - start < head + size:
            break
        out.append(pickle.loads(buffer[start + head:start + head + size]))
        start += head + size
    if start:
        del buffer[:start]
    return out


def _child_main(conn, out) -> None:
    """Body of a pool process: run calls in order until the pipe closes.

    Messages in: ``("call", id, fn_pickle, input, task_id, attempt,
    wants_context, secret_env, (traceparent, tracestate), parents)`` and ``("skip", id)``. Out: ``("ok", id,
    result, next_id)`` or ``("error", id, type, message, traceback,
    next_id)`` when a call ends, ``next_id`` naming the call it begins next
    (None: it runs the next call it reads, at once); output and progress
    as they come. So the worker knows which call runs: the one it sent to
    an idle process, else the one the last result named."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pending: Deque[tuple] = collections.deque()
    skipped: set = set()
    functions: Dict[bytes, Callable] = {}

    def take(message: tuple) -> None:
        if message[0] == "call":
            pending.append(message)
        elif message[0] == "skip":
            skipped.add(message[1])

    def next_call() -> Optional[tuple]:
        while pending:
            call = pending.popleft()
            if call[1] in skipped:
                skipped.discard(call[1])
                continue
            return call
        return None

    def run(call: tuple) -> tuple:
        _, call_id, fn_pickle, input, task_id, attempt, wants_context, secret_env, trace, parents = call
        try:
            fn = functions.get(fn_pickle)
            if fn is None:
                fn = functions[fn_pickle] = pickle.loads(fn_pickle)
        except Exception as e:  # noqa: BLE001 - an unloadable handler: report, keep serving
            return ("error", call_id, "StartFailed", f"cannot load handler in pool process: {e}", "")
        try:
            if wants_context:
                result = fn(input, _ChildContext(out, call_id, task_id, attempt, input, secret_env, trace, parents))
            else:
                result = fn(input)
            return ("ok", call_id, result)
        except BaseException as e:  # noqa: BLE001 - report every failure
            plain = getattr(e, "weft_plain_message", False)
            message = str(e) if plain else f"{type(e).__name__}: {e}"
            # A HandlerError's message is all it says; anything else
            # carries where it was raised.
            return ("error", call_id, type(e).__name__, message, "" if plain else traceback.format_exc())

    fd = conn.fileno()
    os.set_blocking(fd, False)
    buffer = bytearray()

    def read() -> None:
        """Takes every message that arrived (several per read: the worker
        writes what it has in one go); EOFError once the worker is gone."""
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not chunk:
                raise EOFError
            buffer.extend(chunk)
            for message in _frames(buffer):
                take(message)

    current: Optional[tuple] = None
    while True:
        try:
            if current is None:
                select.select([fd], [], [])  # idle: wait for work
                read()
                current = next_call()
                if current is None:
                    continue
            done = run(current)
            read()
            current = next_call()
            reply = done + (current[1] if current is not None else None,)
            try:
                out.send(reply)
            except (EOFError, OSError):
                return
            except Exception as e:  # noqa: BLE001 - an unpicklable result fails that call only
                out.send(("error", done[1], type(e).__name__, f"cannot send the result back: {type(e).__name__}: {e}",
                           "", reply[-1]))
        except (EOFError, OSError):
            return


#: What ``on_done`` gets as the value of a call that was killed (cancelled).
KILLED = object()


class ProcessCall:
    """One call submitted to the pool. ``on_done(tag, ok, value)`` follows
    once, on the loop: ``ok`` with the result, else a :class:`PoolCallError`
    or :data:`KILLED`."""

    __slots__ = ("id", "pool", "proc", "message", "tag", "on_message", "on_done", "begun", "done", "ahead")

    def __init__(self, pool: "ProcessPool", call_id: int, message: tuple, tag: Any,
                 on_message: Callable[[Any, tuple], None], on_done: Callable[[Any, bool, Any], None]):
        self.id = call_id
        self.pool = pool
        self.proc: Optional[_Proc] = None
        self.message = message
        self.tag = tag
        self.on_message = on_message
        self.on_done = on_done
        self.begun = False
        self.done = False
        self.ahead = False

    @property
    def pid(self) -> int:
        """The pool process it runs (or waits) in; 0 while it waits in the pool."""
        return self.proc.pid if self.proc is not None else 0

    def kill(self) -> None:
        """Stops this call: SIGKILLs its process if it runs, else takes it
        back without running it. ``on_done`` gets :data:`KILLED`."""
        self.pool._cancel(self)


class _Proc:
    def __init__(self, pool: "ProcessPool"):
        # Two one-way pipes, both used by the worker without blocking: it
        # parses the frames it reads itself (many per read) and writes what
        # it queued when the pipe has room, so a process blocked sending a
        # large result never waits on a worker blocked sending it a call.
        child_in, to_child = pool._ctx.Pipe(duplex=False)
        from_child, child_out = pool._ctx.Pipe(duplex=False)
        self.pool = pool
        self.conn = to_child
        self.reader = from_child
        self.fd = from_child.fileno()
        self.wfd = to_child.fileno()
        self.buffer = bytearray()
        self.process = pool._ctx.Process(target=_child_main, args=(child_in, child_out), daemon=True,
                                         name="weft-pool")
        self.process.start()
        child_in.close()
        child_out.close()
        os.set_blocking(self.fd, False)
        os.set_blocking(self.wfd, False)
        #: Calls sent to it, in order; the first is the one it runs once begun.
        self.calls: Dict[int, ProcessCall] = {}
        #: Frames not written yet: what one loop iteration sends it goes in one write.
        self.out = bytearray()
        self.dead = False
        self.reading = False
        #: Waiting for room in the pipe to write the rest of ``out``.
        self.writing = False

    def messages(self) -> List[tuple]:
        """The messages that arrived (none yet: empty); EOFError once the process is gone."""
        try:
            chunk = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        if not chunk:
            raise EOFError
        self.buffer += chunk
        return _frames(self.buffer)

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.reading and not self.dead:
            loop.add_reader(self.fd, self.pool._readable, self)
            self.reading = True

    def kill(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.dead = True
        self.out.clear()
        if self.reading and loop is not None:
            try:
                loop.remove_reader(self.fd)
            except (ValueError, OSError):
                pass
            self.reading = False
        if self.writing and loop is not None:
            try:
                loop.remove_writer(self.wfd)
            except (ValueError, OSError):
                pass
            self.writing = False
        try:
            self.process.kill()
        except (OSError, ValueError):
            pass
        for conn in (self.conn, self.reader):
            try:
                conn.close()
            except OSError:
                pass


class PoolCallError(Exception):
    """A process call raised (``type_name`` is the exception's class name)."""

    def __init__(self, type_name: str, message: str, traceback_text: str = ""):
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback_text


class ProcessPool:
    """Up to ``size`` spawn-started processes, each running one call at a
    time and holding the next (:data:`DEPTH`), or up to ``ahead_depth``
    calls handed down ahead; the rest wait here."""

    def __init__(self, size: int):
        self._ctx = multiprocessing.get_context("spawn")
        self._size = max(1, size)
        self._procs: List[_Proc] = []
        self._waiting: Deque[ProcessCall] = collections.deque()
        #: Calls handed down ahead (their attempts still queued): each goes
        #: only behind a running call, and begins in its slot when it ends.
        self._ahead: Deque[ProcessCall] = collections.deque()
        #: Calls handed down ahead that processes hold and have not begun.
        self._ahead_held = 0
        #: How many calls handed down ahead may wait behind a running call
        #: in one process (1 to :data:`AHEAD_MAX`); the worker sets it from
        #: the run times it sees, so short calls stream while a long one
        #: holds back at most one.
        self.ahead_depth = 1
        self._next_id = 0
        self._pickled: Dict[Any, bytes] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._flush_handle: Optional[asyncio.Handle] = None

    def warm_up(self, count: int) -> None:
        """Starts up to ``count`` processes ahead of the first call."""
        while len(self._procs) < min(count, self._size):
            self._procs.append(_Proc(self))

    def submit(
        self, fn: Callable, input: bytes, task_id: str, attempt: int, wants_context: bool, *, tag: Any,
        on_message: Callable[[Any, tuple], None], on_done: Callable[[Any, bool, Any], None],
        secret_env: Optional[dict] = None, ahead: bool = False, trace: Tuple[str, str] = ("", ""),
        parents: tuple = (),
    ) -> ProcessCall:
        """Runs ``fn(input[, ctx])`` in a pool process, now or once one has
        room; call on the loop. ``on_message(tag, message)`` gets
        ``("begin",)`` when its process begins it, then its output and
        progress; ``on_done(tag, ok, value)`` its end."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        fn_pickle = self._pickled.get(fn)
        if fn_pickle is None:
            try:
                fn_pickle = pickle.dumps(fn)
            except Exception as e:  # noqa: BLE001 - a handler that cannot go to a process
                fn_pickle = b""
                log.warning("handler %r cannot be sent to a pool process: %s", fn, e)
            else:
                self._pickled[fn] = fn_pickle
        self._next_id += 1
        message = ("call", self._next_id, fn_pickle, input, task_id, attempt, wants_context, secret_env or {}, trace,
                   parents)
        call = ProcessCall(self, self._next_id, message, tag, on_message, on_done)
        if ahead:
            call.ahead = True
            self._ahead.append(call)
        else:
            self._waiting.append(call)
        self._dispatch()
        return call

    def ahead_count(self) -> int:
        """Calls handed down ahead and not begun yet."""
        return len(self._ahead) + self._ahead_held

    def reclaim_ahead(self) -> Optional[Any]:
        """Turns the first call handed down ahead that no process holds yet
        into an ordinary one (its attempt got a slot); answers its tag, or
        None. Then :meth:`dispatch`."""
        if not self._ahead:
            return None
        call = self._ahead.popleft()
        call.ahead = False
        self._waiting.append(call)
        return call.tag

    def dispatch(self) -> None:
        """Sends what waits to the processes with room (after :meth:`reclaim_ahead`)."""
        self._dispatch()

    @property
    def size(self) -> int:
        """The most processes it runs."""
        return self._size

    # -- inside ----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Sends waiting calls to the processes with room: idle ones first,
        starting new ones up to the size, then as second in line."""
        waiting, ahead = self._waiting, self._ahead
        while waiting:
            proc = self._room()
            if proc is None:
                break
            self._send(proc, waiting.popleft())
        if ahead:
            depth = max(1, min(self.ahead_depth, AHEAD_MAX))
        while ahead:
            # Only behind a call that runs (it begins when that one ends),
            # in the process that holds the fewest.
            proc: Optional[_Proc] = None
            for p in self._procs:
                held = len(p.calls)
                if (p.dead or not held or held > depth or (proc is not None and held >= len(proc.calls))
                        or not next(iter(p.calls.values())).begun):
                    continue
                proc = p
            if proc is None:
                break
            self._send(proc, ahead.popleft())

    def _send(self, proc: _Proc, call: ProcessCall) -> None:
        try:
            data = pickle.dumps(call.message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - an input that cannot be pickled fails its call
            self._end(call, False, PoolCallError(type(e).__name__, f"cannot send the call to a pool process: {e}"))
            return
        call.proc = proc
        idle = not proc.calls
        proc.calls[call.id] = call
        if call.ahead:
            self._ahead_held += 1
        self._write(proc, data)
        if idle:
            # An idle process begins it as soon as it reads it.
            self._mark_begun(call)

    def _write(self, proc: _Proc, data: bytes) -> None:
        """Queues one frame (``multiprocessing.Connection``'s) to ``proc``;
        what is queued goes in one write once the loop is done with what it
        handles now, so calls that come together cost one pipe write."""
        size = len(data)
        proc.out += struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        proc.out += data
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Writes what is queued to each process."""
        self._flush_handle = None
        for proc in list(self._procs):
            if proc.out and not proc.dead and not proc.writing:
                self._write_out(proc)

    def _write_out(self, proc: _Proc) -> None:
        """Writes what the pipe takes of ``proc.out``; the rest once it has
        room. A process that cannot be written to died."""
        if proc.dead:
            return
        try:
            while proc.out:
                del proc.out[:os.write(proc.wfd, proc.out)]
        except BlockingIOError:
            if not proc.writing:
                self._loop.add_writer(proc.wfd, self._write_out, proc)
                proc.writing = True
            return
        except (OSError, ValueError):
            self._died(proc)
            return
        if proc.writing:
            self._loop.remove_writer(proc.wfd)
            proc.writing = False

    def _mark_begun(self, call: ProcessCall) -> None:
        """``call`` runs now in its process: its slot is taken (``begin``)."""
        self._unheld(call)
        call.begun = True
        call.on_message(call.tag, ("begin",))

    def _unheld(self, call: ProcessCall) -> None:
        """``call`` no longer waits, not begun, in a process: counted out of :meth:`ahead_count`."""
        if call.ahead and not call.begun and call.proc is not None:
            self._ahead_held -= 1

    def _room(self) -> Optional[_Proc]:
        best: Optional[_Proc] = None
        for proc in self._procs:
            if proc.dead:
                continue
            held = len(proc.calls)
            if held == 0:
                proc.watch(self._loop)
                return proc
            if held < DEPTH and (best is None or held < len(best.calls)):
                best = proc
        live = [p for p in self._procs if not p.dead]
        if len(live) < self._size:
            self._procs = live
            proc = _Proc(self)
            self._procs.append(proc)
            proc.watch(self._loop)
            return proc
        return best

    def _readable(self, proc: _Proc) -> None:
        try:
            for message in proc.messages():
                if proc.dead:
                    break
                kind = message[0]
                if kind == "output" or kind == "progress":
                    call = proc.calls.get(message[1])
                    if call is not None:
                        call.on_message(call.tag, message)
                    continue
                if kind == "begin":
                    self._begun(proc, message[1])
                    continue
                call = proc.calls.pop(message[1], None)
                # What it begins next first: that call takes over the
                # slot of the one that ended.
                if message[-1] is not None:
                    self._begun(proc, message[-1])
                elif proc.calls:
                    # It went idle with a call on its way: it begins that one on reading it.
                    following = next(iter(proc.calls.values()))
                    if not following.begun:
                        self._mark_begun(following)
                if call is not None:
                    if kind == "ok":
                        self._end(call, True, message[2])
                    else:
                        self._end(call, False, PoolCallError(message[2], message[3], message[4]))
        except (EOFError, OSError):
            self._died(proc)
        except Exception as e:  # noqa: BLE001 - a result this process cannot unpickle
            running = next(iter(proc.calls.values()), None)
            if running is not None and running.begun:
                del proc.calls[running.id]
                self._end(running, False, PoolCallError(type(e).__name__, f"cannot read the result: {e}"))
            self._died(proc)
        self._dispatch()

    def _begun(self, proc: _Proc, call_id: int) -> None:
        call = proc.calls.get(call_id)
        if call is None:
            # A call taken back began all the same (the skip came late): it
            # must not run on.
            log.info("pool process %d began a call taken back: killing it", proc.pid)
            self._died(proc)
            return
        self._mark_begun(call)

    def _died(self, proc: _Proc) -> None:
        """The process is gone (or must go): its running call fails, the
        ones it had not begun go back to the head of the line."""
        if proc.dead and not proc.calls:
            return
        proc.kill(self._loop)
        calls = list(proc.calls.values())
        proc.calls.clear()
        if proc in self._procs:
            self._procs.remove(proc)
        for call in calls:
            self._unheld(call)
            call.proc = None
        # Those it had not begun go back first, so what the failed call's
        # end frees finds them.
        again = [c for c in calls if not c.begun]
        self._waiting.extendleft(reversed([c for c in again if not c.ahead]))
        self._ahead.extendleft(reversed([c for c in again if c.ahead]))
        for call in calls:
            if call.begun:
                self._end(call, False, PoolCallError("ProcessDied", f"pool process {proc.pid} died"))
        self._dispatch()

    def _cancel(self, call: ProcessCall) -> None:
        if call.done:
            return
        proc = call.proc
        if proc is None:
            for line in (self._waiting, self._ahead):
                try:
                    line.remove(call)
                except ValueError:
                    pass
        elif call.begun:
            del proc.calls[call.id]  # reported below, not as ProcessDied
            self._died(proc)
        else:
            self._unheld(call)
            del proc.calls[call.id]
            call.proc = None
            self._write(proc, pickle.dumps(("skip", call.id), protocol=pickle.HIGHEST_PROTOCOL))
        self._end(call, False, KILLED)
        self._dispatch()

    def _end(self, call: ProcessCall, ok: bool, value: Any) -> None:
        if call.done:
            return
        call.done = True
        call.on_done(call.tag, ok, value)

    # -- the whole pool ---------------------------------------------------------

    def pids(self) -> List[int]:
        """Process ids of the live pool processes."""
        return [p.pid for p in self._procs if not p.dead and p.process.is_alive()]

    def shutdown(self) -> None:
        """Kills every pool process."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for proc in list(self._procs):
            proc.kill(self._loop)
        for proc in list(self._procs):
            proc.process.join(timeout=1)
        self._procs.clear()
        self._waiting.clear()
        self._ahead.clear()
