"""``weft.Executor``: a :class:`concurrent.futures.Executor` whose work runs
on Weft workers, and its asyncio twin ``weft.aio.Executor``.

>>> import math, weft
>>> with weft.Executor() as ex:                        # was: ProcessPoolExecutor()
...     print(ex.submit(math.factorial, 20).result())
...     print(list(ex.map(math.factorial, range(1000), chunksize=100))[-1] > 0)
...     print(ex.submit("sha256", b"hello").result())  # a handler by name

Two ways to name work:

- a handler by name, ``ex.submit("resize", data)``: one call task of that
  handler; the input is bytes (or str), the result the output bytes; with
  ``Executor(codec="json")`` both are JSON values (handlers registered with
  ``codec="json"``).
- a module-level Python function, ``ex.submit(math.factorial, 20)``, the way
  ``multiprocessing`` sends one: the function pickled by reference (its
  module and qualified name), the arguments pickled by value, as a call of
  the reserved handler ``weft.pickle`` (``weft/worker/pickled.py``). A worker
  serves it only for the modules it was told to allow (``weft-py-worker
  --allow-module mypkg``); any other fails the task, naming the module and
  the flag. Lambdas, nested functions and functions of ``__main__`` are
  refused here with a TypeError: a worker is another program, which cannot
  import the script that submits (``multiprocessing``'s spawn re-runs it; a
  worker on another machine cannot), so define them in a module both sides
  import. The function's exception is raised again here as the same type
  (its remote traceback as ``__cause__``, as ``ProcessPoolExecutor`` does)
  when it unpickles to an exception class already imported here; otherwise
  the future raises :class:`weft.TaskFailed`, whose message carries the
  worker's traceback.

Futures as dependencies, as Ray passes them: a future of the same executor
given as an argument of ``submit`` (positional or keyword, or an item of a
list, tuple or dict passed as one: one level deep, no deeper) makes the new
task run after that future's task (``after_rule="all_succeeded"``), and the
worker puts the parent's result (decoded as the parent's future would
decode it) in that argument's place when the task runs. Nothing waits
here: the child is submitted at once, PENDING until its parents succeed; a
parent that fails makes the child end UPSTREAM_FAILED without running, and
its future raise :class:`weft.UpstreamFailed`. ``after=[future, task_id,
job, ...]`` orders without passing data (a :class:`weft.Job`: each of its
tasks, as :func:`weft.call_spec` reads it). Only calls of Python functions take
futures as arguments; a handler by name takes its input as bytes (run it
``after=[future]`` and read ``ctx.parents`` in the handler).

Results are unpickled here as they come, with the trust a program puts in
its own process pool: use pickled calls only with workers you trust (nodes
that joined your cluster).

Every task is a Weft task: submitted in batches (one ``Submit`` per up to
5,000), followed with ``WaitMany``, retried under ``max_attempts`` (the
coordinator's default, 3, unless given: pass ``max_attempts=1`` for
``ProcessPoolExecutor``'s "no retry", at the price of a lost worker failing
the call), visible to ``weft list``/``weft get``.

Both executors share one asyncio core (:class:`_Core`) over
:class:`weft.aio.Client`; the blocking ``Executor`` runs it on a thread of
its own.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import io
import itertools
import logging
import pickle
import sys
import threading
import time
import types
from concurrent.futures._base import (
    CANCELLED as _CANCELLED, CANCELLED_AND_NOTIFIED as _CANCELLED_AND_NOTIFIED, FINISHED as _FINISHED, RUNNING as _RUNNING,
)
from typing import Any, AsyncIterator, Callable, Deque, Iterable, Iterator, List, Optional, Set, Tuple, Union

from . import errors
from . import client as _client
from .client import SUBMIT_BATCH
from .models import Task, TaskState, call_spec
from ._proto import common_pb2
from .policy import AFTER_MAX, _job_task_ids, after_items, task_id_of, too_many_after
from .worker.pickled import EXCEPTION_MARKER, FORMAT, HANDLER, Parent

log = logging.getLogger("weft.executor")

#: Submits one executor has on their way at once: a batch queued while
#: another is being committed goes at once rather than after it.
SUBMIT_CONCURRENCY = 4
#: Cancels sent at once by one executor (``shutdown(cancel_futures=True)`` over many futures).
CANCEL_CONCURRENCY = 64
#: A task record's state of success.
_SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED
#: The reason a cancelled future's task records.
CANCEL_REASON = "cancelled by weft.Executor"

Work = Union[str, Callable[..., Any]]


class RemoteTraceback(Exception):
    """The worker's traceback, set as ``__cause__`` of an exception raised again here."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


# -- encoding calls (client side of weft/worker/pickled.py) -------------------


def _check_function(fn: Callable) -> None:
    """TypeError, saying what to do, for a callable a worker could never import."""
    if not callable(fn):
        raise TypeError(f"submit takes a handler name or a module-level function, not {type(fn).__name__}")
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", "")
        where = f"{module}.{qualname}"
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise TypeError(f"{where} is a lambda or a nested function: a worker imports the function by module "
                            "and name, so define it at the top level of a module")
        if module in (None, "__main__", "__mp_main__"):
            raise TypeError(f"{qualname} is defined in __main__ (the script being run), which a worker cannot "
                            "import: move it into a module the client and the worker both import, and allow that "
                            "module on the worker (--allow-module)")


def _dumps(value: Any, what: str) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TypeError(f"cannot pickle {what} for a worker: {e}") from e


#: Keyword arguments ``submit`` takes for the task rather than passing them to the function.
SUBMIT_OPTIONS = ("after", "after_rule", "priority", "fair_key", "resources")
_SUBMIT_OPTIONS = frozenset(SUBMIT_OPTIONS)


def _is_future(value: Any) -> bool:
    return isinstance(value, (Future, AsyncFuture))


def _parent_codec(request: "_Request") -> str:
    if request.decode is _decode_json:
        return "json"
    if request.decode is _decode_bytes:
        return "bytes"
    return "pickle"


class _Parents:
    """The tasks a call runs after, in ``after`` order: requests (futures of this executor)
    and task ids; futures among the arguments become :class:`Parent` markers."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.items: List[Union["_Request", str]] = []
        self.index: dict = {}

    def add(self, value: Any) -> int:
        if _is_future(value):
            request = value._request
            if request is None or value._owner is not self.owner:
                raise TypeError("a future passed to submit must come from the same weft executor")
            key: Any = id(request)
            item: Union[_Request, str] = request
        else:
            item = key = task_id_of(value)
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append(item)
        return self.index[key]

    def add_after(self, after: Any) -> None:
        """Adds what ``after=`` names, as :func:`weft.call_spec` reads it: one item or several;
        a :class:`weft.Job` names each of its tasks."""
        if after is None:
            return
        # An asyncio future is iterable (``await``): one item all the same.
        for item in [after] if _is_future(after) else after_items(after):
            job_ids = None if isinstance(item, str) or _is_future(item) else _job_task_ids(item)
            if job_ids is None:
                self.add(item)
                if len(self.items) > AFTER_MAX:
                    raise too_many_after()
                continue
            if not job_ids:
                raise ValueError(f"after: job {task_id_of(item)!r} has no tasks")
            for task_id in job_ids:
                self.add(task_id)
            if len(self.items) > AFTER_MAX:
                raise too_many_after(item, len(job_ids))

    def marker(self, value: Any) -> Any:
        """``value`` with a future replaced by its marker (itself otherwise)."""
        if _is_future(value):
            return Parent(self.add(value), _parent_codec(value._request))
        return value

    def substitute(self, value: Any) -> Any:
        """``value`` with futures replaced: itself, or one level inside a list, tuple or dict."""
        if _is_future(value):
            return self.marker(value)
        if type(value) in (list, tuple) and any(_is_future(item) for item in value):
            return type(value)(self.marker(item) for item in value)
        if type(value) is dict and any(_is_future(item) for item in value.values()):
            return {key: self.marker(item) for key, item in value.items()}
        return value


def _has_future(args: tuple, kwargs: dict) -> bool:
    for value in itertools.chain(args, kwargs.values()):
        if _is_future(value):
            return True
        if type(value) in (list, tuple) and any(_is_future(item) for item in value):
            return True
        if type(value) is dict and any(_is_future(item) for item in value.values()):
            return True
    return False


def encode_call(fn: Callable, args: tuple, kwargs: dict) -> bytes:
    """The ``weft.pickle`` input of ``fn(*args, **kwargs)``."""
    _check_function(fn)
    return _dumps((FORMAT, "call", fn, tuple(args), dict(kwargs)), f"{_name(fn)} and its arguments")


def encode_chunk(fn: Callable, chunk: List[tuple]) -> bytes:
    """The ``weft.pickle`` input of ``[fn(*args) for args in chunk]``."""
    _check_function(fn)
    return _dumps((FORMAT, "chunk", fn, chunk), f"{_name(fn)} and its arguments")


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class _ExceptionUnpickler(pickle.Unpickler):
    """Unpickles a worker's exception: only exception classes of modules already imported here."""

    def find_class(self, module: str, name: str) -> Any:
        obj: Any = sys.modules.get(module)
        for part in name.split("."):
            if obj is None or not part or part.startswith("__"):
                obj = None
                break
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not an exception class imported here")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def task_exception(task: Task) -> BaseException:
    """What a failed pickled call raises here: the function's own exception when it unpickles
    safely (its traceback as ``__cause__``), else :class:`weft.TaskFailed` and friends."""
    at = task.error.rfind(EXCEPTION_MARKER) if task.state == TaskState.FAILED else -1
    if at < 0:
        return errors.task_error(task)
    # The coordinator may append " (attempt N of M)" after the base64 word.
    encoded = (task.error[at + len(EXCEPTION_MARKER):].split(None, 1) or [""])[0]
    try:
        exc = _ExceptionUnpickler(io.BytesIO(base64.b64decode(encoded, validate=True))).load()
    except Exception:  # noqa: BLE001 - anything that does not unpickle safely is carried as text
        return errors.task_error(task)
    if not isinstance(exc, BaseException):
        return errors.task_error(task)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{task.error[:at].strip()}\n"""')
    return exc


# -- the shared core ----------------------------------------------------------


class _Request:
    """One task to submit: its spec, how its result is read, the future it settles."""

    __slots__ = ("spec", "decode", "future", "task_id", "after", "batch")

    def __init__(self, spec, decode: Callable[[Task], Any], future, after: Optional[list] = None):
        self.spec = spec
        self.decode = decode
        self.future = future
        self.task_id: Optional[str] = None
        #: The requests (and task ids) it runs after, in order; None for most.
        self.after = after
        #: The batch (list) it went in, once it did.
        self.batch: Optional[list] = None


def _settle(future, value: Any = None, error: Optional[BaseException] = None) -> None:
    """Sets a future's outcome unless it is done (cancelled) already: either kind of future."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except (concurrent.futures.InvalidStateError, asyncio.InvalidStateError):
        pass  # cancelled from another thread meanwhile


def _outcome(request: _Request, task: Task) -> Tuple[Any, Optional[BaseException]]:
    """A final task as the future's result or exception."""
    if not task.succeeded:
        return None, task_exception(task) if request.decode is _decode_pickle else errors.task_error(task)
    try:
        return request.decode(task), None
    except Exception as e:  # noqa: BLE001 - a result that does not decode is the future's error
        return None, e


class _Core:
    """Submits requests in batches, follows them with ``WaitMany``, settles their futures, and
    cancels tasks. Runs on one event loop; :meth:`put` alone may be called from any thread."""

    def __init__(self, client, owns_client: bool):
        self.client = client
        self.owns_client = owns_client
        self.loop = asyncio.get_running_loop()
        self.queue: Deque[_Request] = collections.deque()
        self.kicked = False
        self.wake = asyncio.Event()
        self.tasks: Set[asyncio.Task] = set()
        self.cancelling: Set[asyncio.Task] = set()
        self.cancels = asyncio.Semaphore(CANCEL_CONCURRENCY)
        self.submits = asyncio.Semaphore(SUBMIT_CONCURRENCY)
        #: The Submits on their way (a call after one of their tasks waits for its id).
        self.submitting: Set[asyncio.Task] = set()
        self.refs = itertools.count(1)
        self.pump = self.loop.create_task(self._pump())

    def put(self, request: _Request) -> None:
        """Queues ``request`` for the next Submit (thread-safe: one wake-up per batch)."""
        self.queue.append(request)
        if not self.kicked:
            self.kicked = True
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self.loop:
                self.wake.set()
            else:
                self.loop.call_soon_threadsafe(self.wake.set)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _pump(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            self.kicked = False
            while self.queue:
                batch: List[_Request] = []
                # Bytes as well as specs: a Submit past the coordinator's message limit fails whole.
                size, budget = 0, _client.SUBMIT_BATCH_BYTES
                while self.queue and len(batch) < SUBMIT_BATCH:
                    request = self.queue[0]
                    if request.after is not None and not request.future.done():
                        if not self._link(request, batch):
                            break  # a parent's Submit is on its way: send this batch, wait for its id
                    if not request.future.done():
                        spec_size = request.spec.ByteSize() + _client._SPEC_OVERHEAD
                        if batch and size + spec_size > budget:
                            break  # full: it opens the next batch
                        size += spec_size
                    self.queue.popleft()
                    if not request.future.done():  # cancelled before it was sent: never submitted
                        batch.append(request)
                        request.batch = batch
                if batch:
                    await self.submits.acquire()
                    self._submitting(self._submit(batch))
                elif not self.queue:
                    break  # every request taken was cancelled before it was sent
                elif self.submitting:
                    await asyncio.wait(list(self.submitting))
                else:  # defensive: a parent neither submitted, failed nor on its way
                    request = self.queue.popleft()
                    _settle(request.future, error=errors.UpstreamFailed(message="not submitted: a future it runs "
                                                                                "after was never submitted"))

    def _submitting(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        self.submitting.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(self.submitting.discard)

    def _link(self, request: _Request, batch: list) -> bool:
        """Fills ``request``'s ``after`` from its parents: by id when submitted, by ref when in
        ``batch`` (the Submit being made). False when a parent's Submit is still on its way; a
        parent that failed before it was submitted settles ``request`` (UpstreamFailed)
        instead. A parent is always queued before its child, so it is one of these."""
        deps = []
        for parent in request.after:
            if isinstance(parent, str):
                deps.append(common_pb2.Dependency(task_id=parent))
            elif parent.task_id is not None:
                deps.append(common_pb2.Dependency(task_id=parent.task_id))
            elif parent.batch is batch:
                if not parent.spec.ref:
                    parent.spec.ref = f"weft-executor-{next(self.refs)}"
                deps.append(common_pb2.Dependency(ref=parent.spec.ref))
            elif parent.future.done():
                if parent.future.cancelled():
                    why = "was cancelled"
                else:
                    why = f"failed: {parent.future.exception()}"
                _settle(request.future, error=errors.UpstreamFailed(
                    message=f"not submitted: a future it runs after {why}"))
                return True
            else:
                return False
        spec = request.spec
        del spec.after[:]
        spec.after.extend(deps)
        return True

    async def _submit(self, batch: List[_Request]) -> None:
        try:
            ids = await self.client.submit_many([r.spec for r in batch])
        except Exception as e:  # noqa: BLE001 - any failure (a channel that did not open too) is the futures'
            for request in batch:
                request.batch = None
                _settle(request.future, error=e)
            return
        finally:
            self.submits.release()
        for request, task_id in zip(batch, ids):
            request.task_id = task_id
            request.batch = None  # a future kept does not keep its batch
            if request.future.cancelled():  # cancelled while the Submit was on its way
                self.cancel(request)
        self._spawn(self._follow(batch))

    async def _follow(self, batch: List[_Request]) -> None:
        by_id = {r.task_id: r for r in batch}
        try:
            # Results only: a future needs the outcome, not its task's input back.
            async for record in self.client._wait_many_records(list(by_id), results_only=True):
                request = by_id.pop(record.id, None)
                if request is None:
                    continue
                if request.decode is _decode_pickle and record.state == _SUCCEEDED:
                    # The common case, read straight from the record (no Task built).
                    try:
                        value, error = pickle.loads(record.output), None
                    except Exception as e:  # noqa: BLE001 - a result that does not decode is the future's error
                        value, error = None, e
                else:
                    value, error = _outcome(request, Task.from_pb(record))
                _settle(request.future, value, error)
        except Exception as e:  # noqa: BLE001 - whatever ends the wait is the error of the futures left
            for request in by_id.values():
                _settle(request.future, error=e)

    def cancel(self, request: _Request) -> None:
        """Cancels ``request``'s task (once submitted; before, the pump drops it). On the loop."""
        if request.task_id is not None:
            task = self.loop.create_task(self._cancel(request.task_id))
            self.cancelling.add(task)
            task.add_done_callback(self.cancelling.discard)

    async def _cancel(self, task_id: str) -> None:
        async with self.cancels:
            try:
                await self.client.cancel(task_id, reason=CANCEL_REASON)
            except (errors.FailedPrecondition, errors.NotFound):
                pass  # it finished first
            except errors.WeftError as e:
                log.warning("cancelling task %s: %s", task_id, e)

    async def close(self, cancel_grace: float = 10.0) -> None:
        """Lets the Submits and then the cancels in flight end (up to ``cancel_grace`` in all),
        stops everything, closes the client."""
        end = self.loop.time() + cancel_grace
        if self.submitting:
            # A Submit abandoned here may be committed all the same, its tasks then running
            # with nobody to cancel them: once it answers, it cancels the tasks of the
            # futures cancelled meanwhile (shutdown(cancel_futures=True)).
            await asyncio.wait(list(self.submitting), timeout=cancel_grace)
        if self.cancelling:
            await asyncio.wait(list(self.cancelling), timeout=max(0.0, end - self.loop.time()))
        self.pump.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self.pump, *self.tasks, return_exceptions=True)
        if self.owns_client:
            await self.client.close()


def _chunks(iterables: Tuple[Iterable, ...], chunksize: int) -> Iterator[List[tuple]]:
    args = zip(*iterables)
    while True:
        chunk = list(itertools.islice(args, chunksize))
        if not chunk:
            return
        yield chunk


def _check_map(fn: Work, iterables: Tuple[Iterable, ...], chunksize: int) -> None:
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if not iterables:
        raise TypeError("map() needs at least one iterable")
    if isinstance(fn, str):
        if chunksize != 1:
            raise ValueError(f"chunksize groups a Python function's calls into one task; the handler {fn!r} "
                             "takes one input per task, so map it with chunksize=1")
        if len(iterables) != 1:
            raise TypeError(f"the handler {fn!r} takes one input per call: map it over one iterable")


def _decode_pickle(task: Task) -> Any:
    return pickle.loads(task.output)


def _decode_bytes(task: Task) -> bytes:
    return task.output


def _decode_json(task: Task) -> Any:
    return task.json()


class _Options:
    """What every task of an executor gets: spec options and the codec for handlers by name."""

    def __init__(self, codec: str, spec_options: dict):
        if codec not in ("bytes", "json"):
            raise ValueError(f"codec must be 'bytes' or 'json', not {codec!r}")
        if "json" in spec_options:
            raise TypeError("give the codec with codec='json', not json=")
        for name in ("after", "ref", "not_before", "delay"):
            if name in spec_options:
                raise TypeError(f"{name}= is given per task (submit(fn, ..., after=[future])), not per executor")
        call_spec(HANDLER, b"", **spec_options)  # bad options fail here, not at every submit
        self.codec = codec
        self.spec_options = spec_options

    def call(self, fn: Work, args: tuple, kwargs: dict, owner: Any = None) -> Tuple[Any, Callable[[Task], Any], Optional[list]]:
        """The spec and decoder of ``fn(*args, **kwargs)`` (or of one call of the handler ``fn``),
        and what it runs after (None: nothing). The keywords of :data:`SUBMIT_OPTIONS` are
        the task's, not the function's."""
        options = self.spec_options
        after = None
        if kwargs and not _SUBMIT_OPTIONS.isdisjoint(kwargs):
            options = dict(options)
            kwargs = dict(kwargs)
            for name in SUBMIT_OPTIONS:
                if name in kwargs:
                    options[name] = kwargs.pop(name)
            after = options.pop("after", None)
        parents = None
        futures = _has_future(args, kwargs)
        if after is not None or futures:
            parents = _Parents(owner)
            if futures:
                if isinstance(fn, str):
                    raise TypeError(f"the handler {fn!r} takes its input as bytes, not a future: run it "
                                    f"after=[future] and read the parent's result from ctx.parents")
                args = tuple(parents.substitute(a) for a in args)
                kwargs = {k: parents.substitute(v) for k, v in kwargs.items()}
            parents.add_after(after)
        if isinstance(fn, str):
            if kwargs or len(args) > 1:
                raise TypeError(f"the handler {fn!r} takes one input: submit({fn!r}, input)")
            data = args[0] if args else (None if self.codec == "json" else b"")
            if self.codec == "json":
                spec, decode = call_spec(fn, json=data, **options), _decode_json
            else:
                if not isinstance(data, (bytes, bytearray, memoryview, str)):
                    raise TypeError(f"the input of {fn!r} is bytes or str, not {type(data).__name__} "
                                    "(Executor(codec='json') sends JSON)")
                spec, decode = call_spec(fn, data, **options), _decode_bytes
        else:
            spec, decode = call_spec(HANDLER, encode_call(fn, args, kwargs), **options), _decode_pickle
        return spec, decode, (parents.items if parents is not None and parents.items else None)

    def chunk(self, fn: Callable, chunk: List[tuple]) -> Tuple[Any, Callable[[Task], Any]]:
        """The spec and decoder of one ``map`` chunk (a list of results)."""
        return call_spec(HANDLER, encode_chunk(fn, chunk), **self.spec_options), _decode_pickle


# -- the blocking executor ----------------------------------------------------


class Future(concurrent.futures.Future):
    """A :class:`concurrent.futures.Future` of one Weft task (``task_id`` once submitted).

    Unlike a local pool's, :meth:`cancel` also cancels a task that is
    already running: there is no "running" state here, the task is cancelled
    at the coordinator wherever it is (queued or running on a worker).
    """

    def __init__(self) -> None:
        super().__init__()
        self._request: Optional[_Request] = None
        self._on_cancel: Optional[Callable[[_Request], None]] = None
        self._owner: Any = None

    @property
    def task_id(self) -> Optional[str]:
        """The task's id, once the Submit that carried it returned (None before)."""
        return self._request.task_id if self._request is not None else None

    def result(self, timeout: Optional[float] = None) -> Any:
        """As :meth:`concurrent.futures.Future.result`; a RuntimeError, not a hang, when
        waited for in a done-callback (see :meth:`_check_wait`)."""
        self._check_wait("result", timeout)
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """As :meth:`concurrent.futures.Future.exception`; a RuntimeError, not a hang, when
        waited for in a done-callback (see :meth:`_check_wait`)."""
        self._check_wait("exception", timeout)
        return super().exception(timeout)

    def _check_wait(self, what: str, timeout: Optional[float]) -> None:
        """Done-callbacks run on the executor's connection thread, the one thread that settles
        its futures: one waiting there for a future not done would wait for ever. A call that
        does not wait (``timeout`` 0 or less: a poll) raises TimeoutError as usual."""
        if timeout is not None and timeout <= 0:
            return
        owner = self._owner
        if owner is not None and not self.done() and owner._on_loop_thread():
            raise RuntimeError(f"Future.{what}() of a future not done, called in a done-callback (on the "
                               "executor's connection thread, which settles the futures): it would never return; "
                               "wait in another thread, or chain with add_done_callback")

    def cancel(self) -> bool:
        """Cancels the future and its Weft task, queued or running; False if already done."""
        # The state changes under the future's lock: of cancels from several threads, or one
        # after another, only the first notifies and cancels the task. The done-callbacks run
        # outside it, as the standard library runs them: one touching another future would
        # otherwise deadlock against a thread holding that one's lock and waiting for this
        # one's (concurrent.futures.wait takes them all).
        with self._condition:
            if self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED):
                return True
            if self._state in (_RUNNING, _FINISHED):
                return False
            self._state = _CANCELLED
            self._condition.notify_all()
            # What a local pool's worker does when it picks a cancelled future up:
            # wait() and as_completed() count it done only once notified.
            self.set_running_or_notify_cancel()
        self._invoke_callbacks()
        if self._on_cancel is not None and self._request is not None:
            self._on_cancel(self._request)
        return True


class Executor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` over a Weft coordinator.

    ``coordinator``, ``token``, ``ca_file``, ``ca_pin``: as for
    :class:`weft.Client`. ``codec``: how handlers by name take input and
    give results, ``"bytes"`` or ``"json"``. The other keyword arguments go
    to every task's spec (:func:`weft.call_spec`: ``labels``, ``timeout``,
    ``max_attempts``, ``slots``, ``name``, ``schedule_timeout``,
    ``secret_env``). See the module's documentation for what a submitted
    function may be.

    The futures work with :func:`concurrent.futures.as_completed` and
    :func:`concurrent.futures.wait`. Its connection runs on a thread of its
    own, shared by all its futures; :meth:`shutdown` ends it.
    """

    def __init__(
        self,
        coordinator: Optional[str] = None,
        *,
        token: Optional[str] = None,
        ca_file: Optional[str] = None,
        ca_pin: Optional[str] = None,
        codec: str = "bytes",
        **spec_options: Any,
    ):
        self._options = _Options(codec, spec_options)
        self._lock = threading.Lock()
        self._shutdown = False
        self._closed = False
        self._futures: Set[Future] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="weft-executor", daemon=True)
        self._thread.start()

        async def start() -> _Core:
            from .aio import Client

            return _Core(Client(coordinator, token=token, ca_file=ca_file, ca_pin=ca_pin), owns_client=True)

        try:
            self._core = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            raise

    def _put(self, spec, decode: Callable[[Task], Any], after: Optional[list] = None) -> Future:
        future = Future()
        request = _Request(spec, decode, future, after)
        future._request = request
        future._owner = self
        future._on_cancel = self._cancel
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        self._core.put(request)
        return future

    def _cancel(self, request: _Request) -> None:
        # Checked and called under the lock: ``_close`` marks the executor closed under it
        # before the loop closes, so a cancel racing shutdown never calls into a closed loop.
        with self._lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._core.cancel, request)

    def submit(self, fn: Work, /, *args: Any, **kwargs: Any) -> Future:
        """Runs ``fn(*args, **kwargs)`` on a worker (or calls the handler named ``fn`` with
        ``args[0]``); returns its :class:`Future`. A function that cannot be sent (a lambda,
        one of ``__main__``, unpicklable arguments) is a TypeError here.

        A future of this executor among the arguments (see the module) runs the call after
        its task, with its result in its place. The keywords ``after`` (futures, task ids,
        :class:`weft.Job`\\ s: each of the job's tasks; one of them alone or a list),
        ``after_rule``, ``priority``, ``fair_key`` and ``resources`` are the task's
        (:func:`weft.call_spec`), not passed to ``fn``."""
        spec, decode, after = self._options.call(fn, args, kwargs, self)
        return self._put(spec, decode, after)

    def map(
        self, fn: Work, *iterables: Iterable, timeout: Optional[float] = None, chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`: every call is submitted now (``chunksize``
        calls of a Python function per task), and the results are yielded in order as they
        come. The first exception in order is raised where its result would be;
        :class:`TimeoutError` once ``timeout`` seconds have passed since the call. Leaving the
        iterator early cancels the tasks not done yet."""
        _check_map(fn, iterables, chunksize)
        end = None if timeout is None else time.monotonic() + timeout
        if isinstance(fn, str):
            futures = [self.submit(fn, item) for item in iterables[0]]
            return _yield_in_order(futures, end, chunked=False)
        futures = [self._put(*self._options.chunk(fn, chunk)) for chunk in _chunks(iterables, chunksize)]
        return _yield_in_order(futures, end, chunked=True)

    @staticmethod
    def as_completed(fs: Iterable[concurrent.futures.Future], timeout: Optional[float] = None) -> Iterator[concurrent.futures.Future]:
        """:func:`concurrent.futures.as_completed`, here for symmetry with ``weft.Client``."""
        return concurrent.futures.as_completed(fs, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new futures after this. ``cancel_futures`` cancels every future not done yet and its
        task, running ones too (a local pool cancels only those not started). ``wait`` waits
        for the futures to finish and closes the connection; without it the connection closes
        in the background once they have."""
        if wait and self._on_loop_thread():
            raise RuntimeError("shutdown(wait=True) called in a done-callback (on the executor's connection "
                               "thread, which it would wait for): call shutdown(wait=False) there")
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)
            self._close()
        else:
            def close_later() -> None:
                concurrent.futures.wait(pending)
                self._close()

            threading.Thread(target=close_later, name="weft-executor-close", daemon=True).start()

    def _on_loop_thread(self) -> bool:
        """Whether this runs on the connection's thread (in a future's done-callback)."""
        return threading.current_thread() is self._thread

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        asyncio.run_coroutine_threadsafe(self._core.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def _yield_in_order(futures: List[Future], end: Optional[float], chunked: bool) -> Iterator[Any]:
    futures.reverse()  # pop from the end: the caller's order
    try:
        while futures:
            future = futures[-1]
            result = future.result() if end is None else future.result(end - time.monotonic())
            futures.pop()
            if chunked:
                yield from result
            else:
                yield result
    finally:
        for future in futures:
            future.cancel()


# -- the asyncio executor -----------------------------------------------------


class AsyncFuture(asyncio.Future):
    """An :class:`asyncio.Future` of one Weft task (``task_id`` once submitted); cancelling it
    cancels the task, queued or running."""

    _request: Optional[_Request] = None
    _owner: Any = None

    @property
    def task_id(self) -> Optional[str]:
        """The task's id, once the Submit that carried it returned (None before)."""
        return self._request.task_id if self._request is not None else None


class _MapResults:
    """:meth:`AsyncExecutor.map`'s results, in order: an async iterator (``async for``) whose
    :meth:`aclose` cancels the tasks not done yet, before the first iteration too (the
    calls are submitted when ``map`` is called; an async generator runs no ``finally`` when
    closed before it started). A failure, a timeout or the loop's cancel while waiting
    cancels the rest as well, and ends the iteration."""

    def __init__(self, futures: List["AsyncFuture"], end: Optional[float], chunked: bool):
        futures.reverse()  # pop from the end: the caller's order
        self._futures = futures
        self._end = end
        self._chunked = chunked
        #: A chunk's results not yet given.
        self._items: Deque[Any] = collections.deque()
        self._iterated = False
        #: An ``__anext__`` is waiting: a second one at once is refused, as an async
        #: generator's is (both would wait for the same future, and give its result twice).
        self._running = False

    def __aiter__(self) -> "_MapResults":
        return self

    async def __anext__(self) -> Any:
        if self._running:
            raise RuntimeError("anext(): asynchronous generator is already running")
        self._running = True
        try:
            return await self._next()
        finally:
            self._running = False

    async def _next(self) -> Any:
        self._iterated = True
        while not self._items:
            if not self._futures:
                raise StopAsyncIteration
            future = self._futures[-1]
            try:
                if self._end is None:
                    result = await asyncio.shield(future)
                else:
                    result = await asyncio.wait_for(asyncio.shield(future), max(0.0, self._end - time.monotonic()))
            except BaseException:
                self._cancel_rest()
                raise
            if self._futures and self._futures[-1] is future:  # else aclose() took it meanwhile
                self._futures.pop()
            if not self._chunked:
                return result
            self._items.extend(result)
        return self._items.popleft()

    async def aclose(self) -> None:
        """Stops the iteration: cancels the futures not done yet, and their tasks."""
        self._cancel_rest()

    def _cancel_rest(self) -> None:
        futures, self._futures = self._futures, []
        self._items.clear()
        for future in futures:
            future.cancel()

    def __del__(self) -> None:
        # Dropped after it was iterated, unfinished (as the async generator it replaces was
        # finalized, and as concurrent.futures' map does): the rest is cancelled, on the
        # futures' loop (this may run on any thread). Never iterated: the tasks run on.
        futures = self._futures
        if futures and self._iterated:
            loop = futures[0].get_loop()
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(_cancel_all, futures)
                except RuntimeError:  # closed meanwhile
                    pass


def _cancel_all(futures: List["AsyncFuture"]) -> None:
    for future in futures:
        future.cancel()


class AsyncExecutor:
    """The asyncio twin of :class:`Executor` (``weft.aio.Executor``).

    ``submit`` returns an :class:`asyncio.Future` at once (await it; it works
    with :func:`asyncio.as_completed`, :func:`asyncio.wait` and
    ``asyncio.gather``); ``map`` is an async iterator of the results in
    order; ``shutdown`` and ``async with`` end it. Cancelling a future
    (``future.cancel()``, or ``asyncio.wait_for`` timing out) cancels its
    Weft task, running ones too. Options as :class:`Executor`; ``client``:
    a :class:`weft.aio.Client` to use (not closed by the executor) instead
    of one made from the connection options.
    """

    def __init__(
        self,
        coordinator: Optional[str] = None,
        *,
        client=None,
        token: Optional[str] = None,
        ca_file: Optional[str] = None,
        ca_pin: Optional[str] = None,
        codec: str = "bytes",
        **spec_options: Any,
    ):
        self._options = _Options(codec, spec_options)
        self._connect = (coordinator, token, ca_file, ca_pin)
        self._given_client = client
        self._core: Optional[_Core] = None
        self._shutdown = False
        self._futures: Set[asyncio.Future] = set()

    def _core_now(self) -> _Core:
        if self._core is None:
            if self._given_client is not None:
                self._core = _Core(self._given_client, owns_client=False)
            else:
                from .aio import Client

                coordinator, token, ca_file, ca_pin = self._connect
                self._core = _Core(Client(coordinator, token=token, ca_file=ca_file, ca_pin=ca_pin), owns_client=True)
        return self._core

    async def __aenter__(self) -> "AsyncExecutor":
        self._core_now()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown(wait=True)

    def _put(self, spec, decode: Callable[[Task], Any], after: Optional[list] = None) -> AsyncFuture:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        core = self._core_now()
        future = AsyncFuture(loop=core.loop)
        request = _Request(spec, decode, future, after)
        future._request = request
        future._owner = self

        def done(f: asyncio.Future) -> None:
            self._futures.discard(f)
            if f.cancelled():
                core.cancel(request)

        future.add_done_callback(done)
        self._futures.add(future)
        core.put(request)
        return future

    def submit(self, fn: Work, /, *args: Any, **kwargs: Any) -> AsyncFuture:
        """Like :meth:`Executor.submit` (futures of this executor as arguments included);
        returns an :class:`AsyncFuture` (needs a running loop)."""
        spec, decode, after = self._options.call(fn, args, kwargs, self)
        return self._put(spec, decode, after)

    def map(
        self, fn: Work, *iterables: Iterable, timeout: Optional[float] = None, chunksize: int = 1,
    ) -> AsyncIterator[Any]:
        """``async for result in ex.map(fn, items, chunksize=k)``: as :meth:`Executor.map`,
        every call checked and submitted when ``map`` is called, not at the first iteration.
        ``aclose()`` on what it returns (or leaving an ``async with contextlib.aclosing(...)``)
        cancels the tasks not done yet, whether or not it was iterated."""
        _check_map(fn, iterables, chunksize)
        end = None if timeout is None else time.monotonic() + timeout
        if isinstance(fn, str):
            futures = [self.submit(fn, item) for item in iterables[0]]
        else:
            futures = [self._put(*self._options.chunk(fn, chunk)) for chunk in _chunks(iterables, chunksize)]
        return _MapResults(futures, end, chunked=not isinstance(fn, str))

    as_completed = staticmethod(asyncio.as_completed)

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new futures after this; ``cancel_futures`` cancels those not done (and their
        tasks); ``wait`` waits for the rest, then the connection closes."""
        self._shutdown = True
        pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if self._core is None:
            return
        core = self._core
        if wait:
            if pending:
                await asyncio.wait(pending)
            await core.close()
        else:
            async def close_later() -> None:
                if pending:
                    await asyncio.wait(pending)
                await core.close()

            core.loop.create_task(close_later())


__all__ = [
    "AsyncExecutor", "AsyncFuture", "Executor", "Future", "RemoteTraceback", "SUBMIT_OPTIONS", "encode_call", "encode_chunk",
    "task_exception",
]
