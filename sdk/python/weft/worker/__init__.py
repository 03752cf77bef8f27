"""A Weft worker in Python: serve Python functions to a coordinator.

>>> import weft
>>> worker = weft.Worker("http://127.0.0.1:7070", slots=4, labels={"lang": "py"})
>>> @worker.handler(kind="asyncio")          # a coroutine on the worker's loop
... async def fetch(data: bytes) -> bytes: ...
>>> @worker.handler(kind="thread")           # blocking code, on a thread pool
... def resize(data: bytes) -> bytes: ...
>>> @worker.handler(kind="process")          # CPU-bound, on a process pool
... def crunch(data: bytes) -> bytes: ...
>>> worker.run()                             # until drained (SIGTERM/SIGINT)

The worker speaks the node protocol (``proto/README.md``) over one
``NodeService.Connect`` stream: Register first (protocol version 1, slots,
labels, handler names, and after a reconnect the attempts it still runs and
its previous node id), incremental credits, heartbeats both ways, events
named by (task_id, attempt), Cancel within a second, Drain, and reconnect
with backoff when the stream ends or the coordinator falls silent.

It runs ``exec`` tasks only when told to (``Worker(exec="allow")`` or a list
of programs): by default it declares in Register that it refuses them, so
the coordinator never assigns it one, and reports one assigned anyway
START_FAILED without running it. Allowed exec tasks run as a child process
in its own process group, output streamed.

A handler takes ``(input: bytes)`` or ``(input: bytes, ctx: weft.Context)``
and returns bytes, str, None (empty output) or anything JSON-serialisable.
Raising fails the attempt (retried under the task's max_attempts);
``raise weft.HandlerError("msg")`` fails it with exactly "msg" as the error.

Layout (each module mirrors the Rust node's file of the same name, so a
protocol change touches same-named files on both sides):

- ``node.py``: :class:`Worker`, settings, serving, drain (``lib.rs``)
- ``session.py``: the Connect stream, Register/Registered, heartbeats;
  joining before it when needed, certificate renewal over it
- ``join.py``: join tokens (``weftjoin_...``) and ``NodeService.Join``, the pin check
- ``identity.py``: the state dir (``weft-node``'s layout), keys and
  certificate requests, renewal timing
- ``reconnect.py``: one session after another, the reconnect backoff
- ``lease.py``: how long attempts run while the coordinator is silent
- ``outbox.py``: outgoing queue, event batches, redelivery window
- ``slots.py``: slot and credit accounting, the prefetch queue and the
  draining flag, plain state
- ``attempt.py``: running attempts, stop reasons, the Finished, :class:`Context`
- ``process.py``: exec tasks' child processes
- ``exec_policy.py``: which exec tasks it runs (``proto/src/exec_policy.rs``)
- ``handlers.py``: the handler registry, codecs (bytes, JSON) and how a handler's result is read
- ``parents.py``: a task's parents' results (``ctx.parents``), the
  ``$WEFT_PARENTS`` files and ``$WEFT_OUTPUT`` of exec tasks
- ``pickled.py``: the ``weft.pickle`` handler behind :class:`weft.Executor`
  (served only with ``allow_modules``; restricted unpickling)
- ``reaper.py``: the reaper process and the worker's handle on it

This file only re-exports; nothing in the package imports it.
"""

from .attempt import CANCEL_REPORT_WITHIN, Context
from .exec_policy import ExecPolicy
from .handlers import KINDS, Handler, HandlerError, StartFailed
from .node import Worker
from .parents import ParentResult
from .outbox import BATCH_BYTES, BATCH_LIMIT, CHUNK_LIMIT, REDELIVER_MAX, REDELIVER_MAX_BYTES, REDELIVER_WINDOW
from .session import PROTOCOL_VERSION, REGISTER_TIMEOUT

__all__ = [
    "BATCH_BYTES", "BATCH_LIMIT", "CANCEL_REPORT_WITHIN", "CHUNK_LIMIT", "Context", "ExecPolicy", "Handler", "HandlerError",
    "KINDS", "PROTOCOL_VERSION", "ParentResult", "REDELIVER_MAX", "REDELIVER_MAX_BYTES", "REDELIVER_WINDOW", "REGISTER_TIMEOUT",
    "StartFailed", "Worker",
]
