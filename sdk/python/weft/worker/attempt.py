"""The attempts a Python worker runs: taking an assignment, running its
handler or process, stopping it (cancel, timeout, drain), the one
``Finished`` it reports, and giving its slots back.

The counterpart of ``node/src/attempt.rs`` (with the attempts table the
Rust node keeps beside it). Events go to the outbox (``outbox.py``), slots
are counted in ``slots.py``, exec tasks' processes run in ``process.py``
and handlers come from ``handlers.py``. It must not touch the stream or
the session: what the coordinator says reaches it as :meth:`Attempts.assign`
and :meth:`Attempts.stop`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .._pool import PoolCallError
from .._proto import common_pb2, node_pb2
from ..models import duration_from_pb
from .exec_policy import ExecPolicy
from .handlers import Handlers, StartFailed, error_text, to_output, with_traceback
from .outbox import CHUNK_LIMIT, Outbox
from .process import run_exec
from .slots import Slots

log = logging.getLogger("weft.worker")

#: A cancelled handler that has not stopped by then is reported CANCELLED anyway.
CANCEL_REPORT_WITHIN = 0.75


class Attempt:
    """One (task_id, attempt) this worker runs."""

    def __init__(self, task_id: str, attempt: int, spec: common_pb2.TaskSpec):
        self.task_id = task_id
        self.attempt = attempt
        self.spec = spec
        self.slots = max(1, spec.slots)
        self.key = (task_id, attempt)
        self.runner: Optional[asyncio.Task] = None
        self.context: Optional[Context] = None
        self.stop_reason: Optional[str] = None  # "cancelled" | "timed_out" | "draining"
        self.stop_detail = ""
        self.finished = False  # Finished queued
        self.finished_sent = False  # Finished handed to a stream
        self.work_done = False  # nothing of it runs any more
        self.released = False
        self.next_output_seq = 0
        self.timer: Optional[asyncio.TimerHandle] = None
        self.kill: Optional[Callable[[], None]] = None  # hard stop (process group, pool process)

    def __repr__(self) -> str:
        return f"{self.task_id}#{self.attempt}"


class Context:
    """What a handler can do besides returning: output, progress, check for cancel.

    Passed as the second argument to handlers that take two parameters.
    Thread handlers should poll :attr:`cancelled` (or call
    :meth:`check_cancelled`) in long loops: a thread cannot be killed, so a
    cancelled thread handler is reported CANCELLED at once but keeps its slot
    until it returns. Asyncio handlers are cancelled with CancelledError,
    process handlers by killing their pool process.
    """

    def __init__(self, attempts: "Attempts", attempt: Attempt, kind: str, input: bytes):
        self._attempts = attempts
        self._attempt = attempt
        self.kind = kind
        self.input = input
        self.task_id = attempt.task_id
        self.attempt = attempt.attempt
        #: The task's secret environment (name -> value), given only to the
        #: node running this attempt: read it, never log or return it.
        self.secret_env: Dict[str, str] = dict(attempt.spec.secret_env)
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether the attempt was cancelled or timed out."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raises ``asyncio.CancelledError`` if the attempt was cancelled."""
        if self._cancel.is_set():
            raise asyncio.CancelledError()

    def output(self, data: Union[bytes, str], stream: str = "stdout") -> None:
        """Sends a chunk of output (``stream`` is ``"stdout"`` or ``"stderr"``)."""
        if isinstance(data, str):
            data = data.encode()
        self._call(self._attempts.output, self._attempt, bytes(data), stream)

    def print(self, *args: Any, sep: str = " ", end: str = "\n", stream: str = "stdout") -> None:
        """Like ``print``, into the task's output."""
        self.output(sep.join(str(a) for a in args) + end, stream)

    def progress(self, fraction: float, message: str = "") -> None:
        """Reports progress: ``fraction`` in 0..1 (negative when unknown)."""
        self._call(self._attempts.progress, self._attempt, float(fraction), str(message))

    def _call(self, fn, *args) -> None:
        loop = self._attempts.loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)


class Attempts:
    """The attempts this worker runs, by (task_id, attempt), and how they run.

    ``start`` gives it what only exists once the worker serves: the loop,
    a way to spawn tasks, the thread pool, the process pool (if a handler
    needs one) and the reaper (if one started)."""

    def __init__(self, handlers: Handlers, slots: Slots, outbox: Outbox, exec_policy: Optional[ExecPolicy] = None):
        self.handlers = handlers
        self.exec_policy = exec_policy if exec_policy is not None else ExecPolicy("deny")
        self.slots = slots
        self.outbox = outbox
        self.table: Dict[Tuple[str, int], Attempt] = {}
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.threads = None
        self.processes = None
        self.reaper = None
        self._spawn: Optional[Callable[[Any], asyncio.Task]] = None

    def start(self, loop, spawn, threads, processes, reaper) -> None:
        """Hands over the running loop, the task spawner, the pools and the reaper."""
        self.loop, self._spawn = loop, spawn
        self.threads, self.processes, self.reaper = threads, processes, reaper

    def any_running(self) -> bool:
        """Whether an attempt has not reported its Finished yet."""
        return any(not a.finished for a in self.table.values())

    def finished_sent(self, key: Tuple[str, int]) -> None:
        """The outbox handed ``key``'s Finished to a stream."""
        attempt = self.table.get(key)
        if attempt is not None:
            attempt.finished_sent = True

    # -- what it reports -----------------------------------------------------

    def _event(self, attempt: Attempt, **body) -> None:
        self.outbox.event(attempt.task_id, attempt.attempt, **body)

    def output(self, attempt: Attempt, data: bytes, stream: str = "stdout") -> None:
        """Sends output, in numbered chunks of at most ``CHUNK_LIMIT`` bytes."""
        if attempt.finished or not data:
            return
        stream_pb = common_pb2.OUTPUT_STREAM_STDERR if stream == "stderr" else common_pb2.OUTPUT_STREAM_STDOUT
        for start in range(0, len(data), CHUNK_LIMIT):
            chunk = node_pb2.OutputChunk(stream=stream_pb, data=data[start:start + CHUNK_LIMIT], seq=attempt.next_output_seq)
            attempt.next_output_seq += 1
            self._event(attempt, output=chunk)

    def progress(self, attempt: Attempt, fraction: float, message: str) -> None:
        """Sends progress, until the attempt has finished."""
        if not attempt.finished:
            self._event(attempt, progress=node_pb2.Progress(fraction=fraction, message=message))

    def finish(self, attempt: Attempt, outcome: int, *, output: bytes = b"", error: str = "", exit_code: Optional[int] = None) -> None:
        """Queues the attempt's one Finished (later calls do nothing)."""
        if attempt.finished:
            return
        attempt.finished = True
        if attempt.timer is not None:
            attempt.timer.cancel()
        finished = node_pb2.Finished(outcome=outcome, output=output, error=error)
        if exit_code is not None:
            finished.exit_code = exit_code
        log.debug("attempt %r finished: %s %s", attempt, common_pb2.Outcome.Name(outcome), error)
        self._event(attempt, finished=finished)
        self._maybe_release(attempt)

    def _maybe_release(self, attempt: Attempt) -> None:
        if attempt.released or not (attempt.finished and attempt.work_done):
            return
        attempt.released = True
        self.slots.give_back(attempt.slots)
        if self.table.get(attempt.key) is attempt:
            del self.table[attempt.key]
        if not self.slots.draining:
            self.outbox.grant(attempt.slots)

    # -- starting and stopping -----------------------------------------------

    def assign(self, assignment: node_pb2.Assignment) -> None:
        """Starts an assigned attempt (a draining worker reports it CANCELLED)."""
        key = (assignment.task_id, assignment.attempt)
        if key in self.table:
            log.debug("duplicate assignment %s#%s ignored", *key)
            return
        attempt = Attempt(assignment.task_id, assignment.attempt, assignment.spec)
        if self.slots.draining:
            attempt.work_done = True
            attempt.released = True  # never counted
            self.finish(attempt, common_pb2.OUTCOME_CANCELLED, error="node is draining")
            return
        if self.slots.used + attempt.slots > self.slots.total:
            log.warning("attempt %r assigned beyond the granted credits (%d used of %d)", attempt, self.slots.used, self.slots.total)
        self.table[key] = attempt
        self.slots.take(attempt.slots)
        if assignment.spec.HasField("timeout"):
            seconds = duration_from_pb(assignment.spec.timeout)
            attempt.timer = self.loop.call_later(seconds, self.stop, attempt, "timed_out", f"timed out after {seconds:g}s")
        attempt.runner = self._spawn(self._run(attempt))

    def stop(self, attempt: Attempt, reason: str, detail: str) -> None:
        """Stops a running attempt for ``reason`` ("cancelled" or "timed_out")."""
        if attempt.finished or attempt.stop_reason is not None:
            return
        attempt.stop_reason, attempt.stop_detail = reason, detail
        log.info("stopping attempt %r: %s", attempt, detail)
        if attempt.context is not None:
            attempt.context._cancel.set()
        if attempt.kill is not None:
            attempt.kill()
        if attempt.runner is not None:
            attempt.runner.cancel()
        # A handler that swallows the cancel is reported stopped anyway.
        self.loop.call_later(CANCEL_REPORT_WITHIN, self._report_stopped, attempt)

    def kill_all(self) -> None:
        """Kills what can be killed and flags the rest cancelled; reports nothing."""
        for attempt in list(self.table.values()):
            if attempt.kill is not None:
                attempt.kill()
            if attempt.context is not None:
                attempt.context._cancel.set()

    def _report_stopped(self, attempt: Attempt) -> None:
        if attempt.finished:
            return
        if attempt.stop_reason == "timed_out":
            self.finish(attempt, common_pb2.OUTCOME_TIMED_OUT, error=attempt.stop_detail)
        else:
            self.finish(attempt, common_pb2.OUTCOME_CANCELLED, error=attempt.stop_detail)

    # -- running -------------------------------------------------------------

    async def _run(self, attempt: Attempt) -> None:
        try:
            kind = attempt.spec.WhichOneof("kind")
            if kind == "call":
                output = await self._run_call(attempt)
                self.finish(attempt, common_pb2.OUTCOME_SUCCEEDED, output=output)
            elif kind == "exec":
                await self._run_exec(attempt)
            else:
                raise StartFailed("task spec has neither exec nor call")
        except asyncio.CancelledError:
            self._report_stopped(attempt)
        except StartFailed as e:
            self.finish(attempt, common_pb2.OUTCOME_START_FAILED, error=str(e))
        except PoolCallError as e:
            outcome = common_pb2.OUTCOME_START_FAILED if e.type_name == "StartFailed" else common_pb2.OUTCOME_FAILED
            self.finish(attempt, outcome, error=with_traceback(e.message, e.traceback))
        except Exception as e:  # noqa: BLE001 - a handler's failure is the attempt's
            if attempt.stop_reason is not None:
                self._report_stopped(attempt)
            else:
                self.finish(attempt, common_pb2.OUTCOME_FAILED, error=error_text(e))
        finally:
            if not attempt.finished:  # defensive: exactly one Finished per attempt
                self.finish(attempt, common_pb2.OUTCOME_FAILED, error="attempt ended without a result")
            if not attempt.work_done and attempt.kill is None and attempt.context is not None and attempt.context.kind == "thread":
                pass  # released by the thread's own completion callback
            else:
                attempt.work_done = True
                self._maybe_release(attempt)

    async def _run_call(self, attempt: Attempt) -> bytes:
        call = attempt.spec.call
        handler = self.handlers.get(call.handler)
        if handler is None:
            known = ", ".join(self.handlers.names()) or "none"
            raise StartFailed(f"unknown handler '{call.handler}' (this worker serves: {known})")
        data = bytes(call.input)
        context = Context(self, attempt, handler.kind, data)
        attempt.context = context
        args = (data, context) if handler.wants_context else (data,)
        if handler.kind == "asyncio":
            self._event(attempt, started=node_pb2.Started())
            return to_output(await handler.fn(*args))
        if handler.kind == "thread":
            future = self.threads.submit(handler.fn, *args)

            def thread_done(_f) -> None:
                def release() -> None:
                    attempt.work_done = True
                    self._maybe_release(attempt)

                if not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(release)

            future.add_done_callback(thread_done)
            self._event(attempt, started=node_pb2.Started())
            return to_output(await asyncio.wrap_future(future))
        # process
        def on_message(message: tuple) -> None:
            if message[0] == "output":
                self.output(attempt, message[2], message[1])
            else:
                self.progress(attempt, message[1], message[2])

        pcall = await self.processes.call(
            handler.fn, data, attempt.task_id, attempt.attempt, handler.wants_context, on_message,
            secret_env=dict(attempt.spec.secret_env),
        )
        attempt.kill = pcall.kill
        self._event(attempt, started=node_pb2.Started(pid=pcall.pid))
        try:
            return to_output(await pcall.result)
        finally:
            pcall.kill()  # no-op when it already finished

    async def _run_exec(self, attempt: Attempt) -> None:
        # The coordinator matches exec tasks to the policy in Register; this
        # refuses what one assigns anyway, before anything starts.
        refusal = self.exec_policy.refusal(attempt.spec.exec, attempt.spec.secret_env)
        if refusal is not None:
            log.warning("refusing task %s attempt %d: %s", attempt.task_id, attempt.attempt, refusal)
            raise StartFailed(refusal)
        def set_kill(kill: Callable[[], None]) -> None:
            attempt.kill = kill

        code = await run_exec(
            attempt.spec.exec,
            self.reaper,
            set_kill,
            lambda pid: self._event(attempt, started=node_pb2.Started(pid=pid)),
            lambda chunk, stream: self.output(attempt, chunk, stream),
            secret_env=attempt.spec.secret_env,
        )
        if attempt.stop_reason is not None:
            raise asyncio.CancelledError()
        if code == 0:
            self.finish(attempt, common_pb2.OUTCOME_SUCCEEDED, exit_code=0)
        elif code > 0:
            self.finish(attempt, common_pb2.OUTCOME_FAILED, exit_code=code, error=f"exited with code {code}")
        else:
            self.finish(attempt, common_pb2.OUTCOME_FAILED, error=f"killed by signal {-code}")
