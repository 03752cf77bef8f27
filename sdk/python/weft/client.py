"""The blocking client: submit tasks, follow them, cancel them, list nodes.

>>> import weft
>>> with weft.Client("http://127.0.0.1:7070") as client:
...     digest = client.call("sha256", b"hello")            # submit + wait
...     task = client.exec(["sh", "-c", "echo hi"])          # runs on some node
...     for event in client.watch(task.id):                  # replayed history
...         print(event.kind, event.data)

Every method raises a :class:`weft.WeftError` subclass on a gRPC error; the
calls that wait for a result raise :class:`weft.TaskFailed` when the task did
not succeed. The asyncio twin is :class:`weft.aio.Client`.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import errors
from ._channel import client_token, sync_channel
from ._proto import admin_pb2, admin_pb2_grpc, common_pb2, schedule_pb2, schedule_pb2_grpc, task_pb2, task_pb2_grpc
from .models import (
    ClusterInfo,
    DurationLike,
    NodeInfo,
    OutputStream,
    Task,
    TaskEvent,
    TaskState,
    TimeLike,
    _to_bytes,
    call_spec,
    duration_to_pb,
    exec_spec,
    list_request,
    next_schedule_token,
    parse_duration,
)
from .tracing import traced
from .workflow import (
    Job,
    JobCancelled,
    LimitInfo,
    Schedule,
    check_limit_kind,
    graph_request,
    job_from_tasks,
    job_of,
    limit_pb,
    schedule_spec,
)

#: Deadline of unary calls, in seconds.
UNARY_TIMEOUT = 30.0
#: Ids per ``WaitMany`` call (as the Rust client; the coordinator takes up to 100,000).
WAIT_MANY_BATCH = 30_000
#: Specs per ``Submit`` in :meth:`Client.map` (each ``Submit`` is all or nothing).
SUBMIT_BATCH = 5_000
#: Encoded bytes of specs per ``Submit`` in :meth:`Client.map` and :class:`weft.Executor`:
#: a quarter of the coordinator's default ``--max-message-size`` (16 MiB), so large inputs
#: split into more requests rather than fail whole batches with RESOURCE_EXHAUSTED. A
#: single spec larger than this goes alone.
SUBMIT_BATCH_BYTES = 4 * 1024 * 1024
#: Room a spec takes in a ``SubmitRequest`` beyond its own bytes, and an input beyond its
#: length in a spec (a tag and a length prefix each), counted generously.
_SPEC_OVERHEAD = 16

InputLike = Union[bytes, str, None]


def _distinct(task_ids: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(task_ids))


def _wait_many_batch(pending: List[str], left: set) -> List[str]:
    """The next ids to wait for: the first :data:`WAIT_MANY_BATCH` still missing."""
    batch = []
    for task_id in pending:
        if task_id in left:
            batch.append(task_id)
            if len(batch) == WAIT_MANY_BATCH:
                break
    return batch


class _InOrder:
    """Final records (``task_pb2.Task``) in completion order in, results in ``ids`` order out.
    It reads the output straight from each record; a :class:`Task` is built only for a
    failure's error (``map`` of many small calls spends most of its client CPU per task)."""

    def __init__(self, ids: List[str]):
        self.ids = ids
        self.done = {}
        self.next = 0

    def add(self, record: task_pb2.Task) -> List[bytes]:
        """Takes ``record``; answers the results now due, in order (TaskFailed at a failed one)."""
        self.done[record.id] = record
        due = []
        while self.next < len(self.ids) and self.ids[self.next] in self.done:
            ready = self.done.pop(self.ids[self.next])
            self.next += 1
            if ready.state != _SUCCEEDED:
                raise errors.task_error(Task.from_pb(ready))
            due.append(ready.output)
        return due


_SUCCEEDED = common_pb2.TASK_STATE_SUCCEEDED


def _call_requests(handler: str, inputs: Iterable[InputLike], options: dict) -> Iterator[task_pb2.SubmitRequest]:
    """``map``'s Submit requests, :data:`SUBMIT_BATCH` calls or :data:`SUBMIT_BATCH_BYTES`
    each, whichever comes first: every call a copy of one spec made by :func:`call_spec`
    with its own input set, which costs a quarter of a ``call_spec`` per input (the
    client's CPU per task bounds ``map`` on a small machine)."""
    if "json" in options:
        raise TypeError("map's inputs are the calls' inputs: json= does not apply (encode each input, "
                        "e.g. json.dumps(value).encode())")
    template = call_spec(handler, b"", **options)
    # Every input is checked before the first Submit: a bad one submits nothing.
    payloads = [_to_bytes(data) for data in inputs]
    base = template.ByteSize() + 2 * _SPEC_OVERHEAD
    budget = SUBMIT_BATCH_BYTES
    request, size = task_pb2.SubmitRequest(), 0
    for data in payloads:
        spec_size = base + len(data)
        if request.tasks and size + spec_size > budget:
            yield request
            request, size = task_pb2.SubmitRequest(), 0
        spec = request.tasks.add()
        spec.CopyFrom(template)
        spec.call.input = data
        size += spec_size
        if len(request.tasks) == SUBMIT_BATCH:
            yield request
            request, size = task_pb2.SubmitRequest(), 0
    if request.tasks:
        yield request


def _open_wait(stub, batch: List[str], batches: bool, timeout: Optional[float], results_only: bool = False):
    """One wait for ``batch``: over ``WaitManyBatches`` (the records ready together in one
    message), or ``WaitMany`` (one per message) for a coordinator without it. ``stub`` is a
    sync or asyncio ``TaskServiceStub``; the call is iterated with ``for`` or ``async for``.
    ``results_only`` asks for the records without their specs (``TASK_VIEW_RESULT``): the
    inputs are not sent back, and there is less to decode."""
    view = task_pb2.TASK_VIEW_RESULT if results_only else task_pb2.TASK_VIEW_UNSPECIFIED
    request = task_pb2.WaitManyRequest(task_ids=batch, view=view)
    method = stub.WaitManyBatches if batches else stub.WaitMany
    return method(request, timeout=timeout)


def _new_records(message, batches: bool, left: set) -> List[task_pb2.Task]:
    """The records of one stream message (a ``TaskBatch`` when ``batches``, else one ``Task``)
    whose ids are still in ``left``, taken out of it: each task is answered once."""
    fresh = [record for record in (message.tasks if batches else (message,)) if record.id in left]
    for record in fresh:
        left.discard(record.id)
    return fresh


#: The reason recorded on the tasks :meth:`Client.map` cancels when it stops early.
MAP_CANCEL_REASON = "cancelled by weft map: its results were no longer read"
#: The most time, in seconds, ``map`` spends cancelling what it did not yield, all its
#: ``Submit``s together: its caller is on its way out, and a coordinator that does not
#: answer must not hold it there.
MAP_CANCEL_BUDGET = 5.0

log = logging.getLogger("weft.client")


class _MapRun:
    """What one ``map`` submitted (``ids``; ``jobs``: each ``Submit``'s job id and where its
    tasks end in ``ids``) and has yielded (``order``). The map's generator holds it; its
    client keeps it in a weak set, so that closing the client cancels an open map's calls
    before the channel goes, whoever finalises the generator later."""

    def __init__(self):
        self.ids: List[str] = []
        self.jobs: List[Tuple[str, int]] = []
        self.order: Optional[_InOrder] = None
        self._taken = False

    def take_unread(self) -> List[Tuple[str, List[str]]]:
        """What to cancel (:func:`_unread`), once: a second taker (the generator's own
        cleanup after the client's close took it) gets nothing."""
        if self._taken:
            return []
        self._taken = True
        return _unread(self.ids, self.jobs, self.order)


def _cleanup_deadline() -> float:
    """When ``map``'s cleanup, starting now, must end (:data:`MAP_CANCEL_BUDGET`)."""
    return time.monotonic() + MAP_CANCEL_BUDGET


def _cleanup_timeout(deadline: float) -> float:
    """The deadline of one cancelling call of ``map``'s cleanup: what is left of its
    :data:`MAP_CANCEL_BUDGET` (DeadlineExceeded when nothing is)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded("map's cleanup spent its time cancelling")
    return min(left, UNARY_TIMEOUT)


#: The errors that end ``map``'s cleanup at once: the coordinator is not answering, or the
#: budget is spent; the calls left are not cancelled.
_CLEANUP_STOPS = (errors.Unavailable, errors.DeadlineExceeded)


def _unread(ids: List[str], jobs: List[Tuple[str, int]], order: Optional["_InOrder"]) -> List[Tuple[str, List[str]]]:
    """What ``map`` submitted and did not yield, per ``Submit``: ``(job id, task ids)`` for
    each job (``jobs``: its id and where its tasks end in ``ids``) with a task at or past
    the first result not yielded, less the tasks already known final."""
    first = order.next if order is not None else 0
    final = order.done if order is not None else {}
    unread, start = [], 0
    for job_id, end in jobs:
        left = [task_id for task_id in ids[max(start, first):end] if task_id not in final]
        if left:
            unread.append((job_id, left))
        start = end
    return unread


def _job_id(job: Any) -> str:
    """A job id from a str or a :class:`weft.Job`."""
    if isinstance(job, Job):
        return job.id
    if not isinstance(job, str):
        raise TypeError(f"a job is its id (a str) or a weft.Job, not {type(job).__name__}")
    return job


def _deadline(timeout: Optional[DurationLike]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + parse_duration(timeout)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.DeadlineExceeded("timed out waiting for the task")
    return left


#: The least time a wait's first look at its task gets, so that ``wait(id, timeout=0)``
#: still answers a task already final (as ``Future.result(timeout=0)`` does).
FIRST_LOOK_MIN = 1.0


def _unary_timeout(deadline: Optional[float], first: bool = False) -> float:
    """The deadline of one unary call within a wait: what is left of it, at most
    :data:`UNARY_TIMEOUT` (DeadlineExceeded when nothing is); the ``first`` look at the task
    gets at least :data:`FIRST_LOOK_MIN`."""
    if first and deadline is not None:
        left = max(deadline - time.monotonic(), FIRST_LOOK_MIN)
        return min(left, UNARY_TIMEOUT)
    left = _remaining(deadline)
    return UNARY_TIMEOUT if left is None else min(left, UNARY_TIMEOUT)


#: How long a wait (``wait``, ``wait_many``, ``as_completed``, ``map``, ``wait_job``) goes on
#: trying again while the coordinator cannot be reached: a run of failed tries this long, with
#: no try between them that got through, ends it with the last :class:`weft.Unavailable`
#: (``RESUME_WINDOW`` of the Rust client). A wait's ``timeout`` ends it sooner.
RESUME_WINDOW = 30.0
#: The pause before the first try again; it doubles up to :data:`RESUME_BACKOFF_MAX`.
RESUME_BACKOFF_MIN = 0.1
RESUME_BACKOFF_MAX = 1.0


class _Resume:
    """The rule of a wait that tries again after :class:`weft.Unavailable` (as ``Follow`` in
    ``client/src/follow.rs``): pauses doubling from :data:`RESUME_BACKOFF_MIN` to
    :data:`RESUME_BACKOFF_MAX`, until :data:`RESUME_WINDOW` has passed since the first failed
    try of a run. A try that got data (:meth:`ok`), or stayed open at least the window (and at
    least :data:`RESUME_BACKOFF_MAX`) before it broke, ends the run; one that broke sooner with
    nothing (a coordinator or proxy that cuts every stream after a second or two) is one more
    failed try of it, so such breaks raise after the window. No sleeping here: the sync and
    asyncio clients share it and sleep each their own way."""

    def __init__(self):
        self._failing_since: Optional[float] = None
        self._opened_at: Optional[float] = None
        self._backoff = RESUME_BACKOFF_MIN

    def opened(self) -> None:
        """A try starts."""
        self._opened_at = time.monotonic()

    def ok(self) -> None:
        """The try got data: the coordinator is there."""
        self._failing_since = None
        self._backoff = RESUME_BACKOFF_MIN

    def failed(self, deadline: Optional[float]) -> Optional[float]:
        """A try failed UNAVAILABLE: the pause before the next (cut short at ``deadline``), or
        None when the window is spent and the wait should raise the error."""
        now = time.monotonic()
        opened, self._opened_at = self._opened_at, None
        if opened is not None and now - opened >= max(RESUME_WINDOW, RESUME_BACKOFF_MAX):
            self.ok()  # it stayed open longer than the window: this break starts a new run
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= RESUME_WINDOW:
            return None
        pause = self._backoff
        self._backoff = min(self._backoff * 2, RESUME_BACKOFF_MAX)
        return pause if deadline is None else max(0.0, min(pause, deadline - now))


class Client:
    """A connection to a coordinator's TaskService and AdminService.

    ``url`` is like ``127.0.0.1:7070`` or ``https://127.0.0.1:7070`` (TLS,
    the default) or ``http://127.0.0.1:7070`` (a coordinator started with
    ``--insecure``); default ``$WEFT_COORDINATOR``, else
    ``https://127.0.0.1:7070``. Over TLS the coordinator is trusted by
    ``ca_file`` (the cluster's ``ca.pem``; default ``$WEFT_CA``) or
    ``ca_pin`` (``sha256:HEX``; default ``$WEFT_CA_PIN``; alone, the CA is
    taken from the chain the coordinator sends; with a file it checks the file); with ``http://`` a CA or
    pin (given or from the environment) raises ValueError, and a token
    warns :class:`weft._channel.PlaintextTokenWarning`. ``token`` is a client
    token (default: the contents of ``$WEFT_TOKEN_FILE``, else ``$WEFT_TOKEN``),
    sent as ``authorization: Bearer``
    metadata on every call; without a valid one calls raise
    :class:`weft.Unauthenticated`, and with one lacking the call's scope
    :class:`weft.PermissionDenied`. The channel connects
    lazily; a call to an unreachable coordinator raises
    :class:`weft.Unavailable` within a few seconds.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        token: Optional[str] = None,
        channel: Optional[grpc.Channel] = None,
        ca_file: Optional[str] = None,
        ca_pin: Optional[str] = None,
    ):
        self._channel = channel or sync_channel(url, client_token(token), ca_file=ca_file, ca_pin=ca_pin)
        self._tasks = task_pb2_grpc.TaskServiceStub(self._channel)
        #: Whether to wait over WaitManyBatches (cleared when the coordinator lacks it).
        self._wait_batches = True
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._schedules = schedule_pb2_grpc.ScheduleServiceStub(self._channel)
        #: The maps still open, cancelled by :meth:`close` (weak: a map dropped unread is
        #: cleaned up by its own generator).
        self._maps: "weakref.WeakSet[_MapRun]" = weakref.WeakSet()

    def close(self) -> None:
        """Cancels the calls that open :meth:`map` iterators did not yield, then closes the
        channel."""
        unread = [job for run in list(self._maps) for job in run.take_unread()]
        if unread:
            self._cancel_unread(unread)
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request, timeout: Optional[float] = None):
        try:
            return method(request, timeout=UNARY_TIMEOUT if timeout is None else timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    # -- submitting ---------------------------------------------------------

    def submit(self, spec: common_pb2.TaskSpec, *, traceparent: str = "", tracestate: str = "") -> str:
        """Commits one task; returns its id. Trace context as :meth:`submit_many`."""
        return self.submit_many([spec], traceparent=traceparent, tracestate=tracestate)[0]

    def submit_many(
        self, specs: Iterable[common_pb2.TaskSpec], *, traceparent: str = "", tracestate: str = ""
    ) -> List[str]:
        """Commits many tasks in one transaction (all or nothing); returns their ids.

        Each task continues a W3C trace: ``traceparent`` (and ``tracestate``)
        when given; else the one its spec has; else the current
        OpenTelemetry span's, when the ``opentelemetry`` package is
        installed and a span is current; else none."""
        specs = traced(specs, traceparent, tracestate)
        response = self._unary(self._tasks.Submit, task_pb2.SubmitRequest(tasks=specs))
        return list(response.task_ids)

    def submit_call(self, handler: str, input: Union[bytes, str, None] = b"", **options) -> str:
        """Submits a call of ``handler``; options as :func:`weft.call_spec`. Returns the id."""
        return self.submit(call_spec(handler, input, **options))

    def submit_exec(self, argv: Sequence[str], **options) -> str:
        """Submits a program run; options as :func:`weft.exec_spec`. Returns the id."""
        return self.submit(exec_spec(argv, **options))

    def call(
        self,
        handler: str,
        input: Union[bytes, str, None] = b"",
        *,
        wait_timeout: Optional[DurationLike] = None,
        **options,
    ) -> Any:
        """Calls ``handler`` on some node and returns its output bytes.

        With ``json=VALUE`` instead of ``input`` (a handler registered with
        ``codec="json"``) the input is that value as JSON, and the result is
        decoded from JSON. Raises :class:`weft.TaskFailed` (or
        ``TaskCancelled``/``TaskTimedOut``) when the task does not succeed.
        """
        task = self.wait(self.submit_call(handler, input, **options), timeout=wait_timeout)
        if not task.succeeded:
            raise errors.task_error(task)
        return task.json() if "json" in options else task.output

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        wait_timeout: Optional[DurationLike] = None,
        **options,
    ) -> Task:
        """Runs ``argv`` on some node, waits, and returns the final Task.

        With ``check`` (the default) an unsuccessful task raises
        :class:`weft.TaskFailed`. The output is in the task's events:
        see :meth:`watch` and :meth:`output`.
        """
        task = self.wait(self.submit_exec(argv, **options), timeout=wait_timeout)
        if check and not task.succeeded:
            raise errors.task_error(task)
        return task

    # -- following ----------------------------------------------------------

    def get(self, task_id: str) -> Task:
        """A task's current record; :class:`weft.NotFound` for an unknown id."""
        return self._get(task_id)

    def _get(self, task_id: str, timeout: Optional[float] = None) -> Task:
        return Task.from_pb(self._unary(self._tasks.Get, task_pb2.GetRequest(task_id=task_id), timeout).task)

    def list(
        self,
        state: Union[TaskState, str, None] = None,
        limit: int = 100,
        *,
        labels: Optional[Mapping[str, str]] = None,
        name: str = "",
        node: str = "",
        since: Optional[TimeLike] = None,
        until: Optional[TimeLike] = None,
        job: str = "",
    ) -> List[Task]:
        """Up to ``limit`` tasks, newest first, that match every filter given
        (``job``: only that job's tasks, oldest first).

        ``labels``: every one must match; ``name``: a substring of the task's
        name; ``node``: a node (name or id) any of its attempts ran on;
        ``since``/``until``: submitted within these times (a datetime, or a
        duration ago such as ``"10m"``). The coordinator examines a bounded
        number of tasks per call, so this pages on until it has ``limit``
        tasks or none is left.
        """
        request = list_request(state, 0, labels, name, node, since, until, _job_id(job))
        limit = limit if limit > 0 else 100
        tasks: List[Task] = []
        while True:
            request.limit = min(limit - len(tasks), 10_000)
            page = self._unary(self._tasks.List, request)
            tasks.extend(Task.from_pb(t) for t in page.tasks)
            if len(tasks) >= limit or not page.next_page_token:
                return tasks[:limit]
            request.page_token = page.next_page_token

    def _stream(self, call) -> Iterator[TaskEvent]:
        try:
            for event in call:
                yield TaskEvent.from_pb(event)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        finally:
            call.cancel()

    def watch(self, task_id: str, from_seq: int = 0, *, timeout: Optional[DurationLike] = None) -> Iterator[TaskEvent]:
        """The task's events from ``from_seq``: recorded ones, then live ones.

        Ends after the ``finished`` event. ``timeout`` bounds the whole stream.
        """
        call = self._tasks.Watch(
            task_pb2.WatchRequest(task_id=task_id, from_seq=from_seq),
            timeout=None if timeout is None else parse_duration(timeout),
        )
        return self._stream(call)

    def output(self, task_id: str, from_seq: int = 0) -> Iterator[Tuple[OutputStream, bytes]]:
        """The task's output chunks ``(stream, data)`` as they are produced."""
        for event in self.watch(task_id, from_seq):
            if event.kind == "output":
                yield event.stream, event.data

    def run(self, spec: common_pb2.TaskSpec, *, traceparent: str = "", tracestate: str = "") -> Iterator[TaskEvent]:
        """Submits ``spec`` and streams its events; the first names the new task id.
        Trace context as :meth:`submit_many`."""
        [spec] = traced([spec], traceparent, tracestate)
        return self._stream(self._tasks.Run(task_pb2.RunRequest(spec=spec)))

    def wait(self, task_id: str, timeout: Optional[DurationLike] = None) -> Task:
        """Blocks until the task reaches a final state and returns it.

        Raises :class:`weft.DeadlineExceeded` (a ``TimeoutError``) after ``timeout``, which
        bounds every call it makes, except that its first look at the task gets at least
        :data:`FIRST_LOOK_MIN` (so ``timeout=0`` answers a task already final). While the coordinator cannot be reached it tries again
        (:data:`RESUME_WINDOW`), then raises :class:`weft.Unavailable`.
        """
        deadline = _deadline(timeout)
        resume = _Resume()
        first = True
        while True:
            resume.opened()
            try:
                task = self._get(task_id, _unary_timeout(deadline, first))
                first = False
                # A Get that got through does not end a run of failed tries: a coordinator
                # (or proxy) that answers it and breaks every watch at once would go on
                # forever. Only a watch event, or a watch open the window, does (_Resume).
                if task.is_final:
                    return task
                resume.opened()
                for event in self.watch(task_id, task.next_seq, timeout=_remaining(deadline)):
                    resume.ok()
                    if event.kind == "finished" and event.task is not None:
                        return event.task
            except errors.Unavailable:
                # The coordinator went away (restarting, or a standby taking over): again.
                pause = resume.failed(deadline)
                if pause is None:
                    raise
                time.sleep(pause)
            _remaining(deadline)

    def wait_many(self, task_ids: Iterable[str], timeout: Optional[DurationLike] = None) -> Iterator[Task]:
        """Each task's final record once, as soon as it is final (those already final first), in
        completion order; ends when all are. One stream (``WaitMany``) per
        :data:`WAIT_MANY_BATCH` ids, not one per task. :class:`weft.NotFound` for an unknown id
        (before anything is yielded); :class:`weft.DeadlineExceeded` after ``timeout`` for the
        whole wait; a dropped connection is resumed for the tasks still missing, for up to
        :data:`RESUME_WINDOW` of failed tries in a row (then :class:`weft.Unavailable`).
        """
        for record in self._wait_many_records(task_ids, timeout):
            yield Task.from_pb(record)

    def _wait_many_records(
        self, task_ids: Iterable[str], timeout: Optional[DurationLike] = None, results_only: bool = False
    ) -> Iterator[task_pb2.Task]:
        """:meth:`wait_many`'s records as they come, before any :class:`Task` is built. They come
        over ``WaitManyBatches`` (the records ready together in one message: a Python client's
        cost is per message), or ``WaitMany`` from a coordinator without it."""
        deadline = _deadline(timeout)
        resume = _Resume()
        pending = _distinct(task_ids)
        left = set(pending)
        while left:
            batches = self._wait_batches
            resume.opened()
            call = _open_wait(self._tasks, _wait_many_batch(pending, left), batches, _remaining(deadline), results_only)
            try:
                for message in call:
                    resume.ok()
                    for record in _new_records(message, batches, left):
                        yield record
            except grpc.RpcError as e:
                if batches and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._wait_batches = False  # an older coordinator: one record per message
                    continue
                error = errors.from_rpc_error(e)
                pause = resume.failed(deadline) if isinstance(error, errors.Unavailable) else None
                if pause is None:
                    raise error from None
                time.sleep(pause)  # the coordinator went away: resume for the rest
                _remaining(deadline)
            finally:
                call.cancel()

    def as_completed(self, task_ids: Iterable[str], timeout: Optional[DurationLike] = None) -> Iterator[Task]:
        """Like :func:`concurrent.futures.as_completed`: the tasks' final records as they finish
        (:meth:`wait_many`)."""
        return self.wait_many(task_ids, timeout)

    def map(
        self,
        handler: str,
        inputs: Iterable[InputLike],
        *,
        timeout: Optional[DurationLike] = None,
        **options,
    ) -> Iterator[bytes]:
        """Calls ``handler`` once per input and yields the results in input order, each as soon as
        it and those before it are done (like :meth:`concurrent.futures.Executor.map`). Every call
        is submitted first (:data:`SUBMIT_BATCH` per ``Submit``), then waited for with
        :meth:`wait_many`. Raises :class:`weft.TaskFailed` (or ``TaskCancelled``/``TaskTimedOut``)
        at the first failed call in input order; :class:`weft.DeadlineExceeded` after ``timeout``.
        Options as :func:`weft.call_spec`.

        As :meth:`concurrent.futures.Executor.map`, the calls whose results were not yielded
        are cancelled when it stops early: an error (a failed call, a refused ``Submit``
        after others went through, a timeout) or the caller leaving the iteration (``break``,
        ``close()``).
        """
        run = _MapRun()
        self._maps.add(run)
        try:
            for request in _call_requests(handler, inputs, options):
                response = self._unary(self._tasks.Submit, request)
                run.ids.extend(response.task_ids)
                run.jobs.append((response.job_id or response.task_ids[0], len(run.ids)))
            run.order = _InOrder(run.ids)
            for record in self._wait_many_records(run.ids, timeout, results_only=True):
                yield from run.order.add(record)
        finally:
            self._maps.discard(run)
            unread = run.take_unread()
            if unread:
                self._cancel_unread(unread)

    def _cancel_unread(self, unread: List[Tuple[str, List[str]]]) -> None:
        """Cancels what ``map`` submitted and did not yield (:func:`_unread`): each job
        whole (the tasks yielded are final already), or each task on a coordinator without
        ``CancelJob``, within :data:`MAP_CANCEL_BUDGET` in all. It stops at the first
        Unavailable or DeadlineExceeded; errors are logged, never raised: the caller is on
        its way out, with an error of its own perhaps (and the channel may be closed)."""
        deadline = _cleanup_deadline()
        try:
            for job_id, task_ids in unread:
                try:
                    try:
                        request = task_pb2.CancelJobRequest(job_id=job_id, reason=MAP_CANCEL_REASON)
                        self._unary(self._tasks.CancelJob, request, _cleanup_timeout(deadline))
                    except errors.Unimplemented:
                        for task_id in task_ids:
                            try:
                                request = task_pb2.CancelRequest(task_id=task_id, reason=MAP_CANCEL_REASON)
                                self._unary(self._tasks.Cancel, request, _cleanup_timeout(deadline))
                            except errors.FailedPrecondition:
                                pass  # final already
                except _CLEANUP_STOPS:
                    raise
                except errors.WeftError as error:
                    log.debug("map could not cancel job %s: %s", job_id, error)
        except Exception as error:  # a closed channel raises ValueError or grpc.aio.UsageError
            log.warning("map left %d job(s) of calls it did not yield uncancelled: %s", len(unread), error)

    def cancel(self, task_id: str, reason: str = "") -> Task:
        """Cancels a task; returns it as recorded after the cancel.

        :class:`weft.FailedPrecondition` if it had already finished.
        """
        response = self._unary(self._tasks.Cancel, task_pb2.CancelRequest(task_id=task_id, reason=reason))
        return Task.from_pb(response.task)

    # -- graphs and jobs ----------------------------------------------------

    def submit_graph(self, specs: Iterable[common_pb2.TaskSpec], *, traceparent: str = "", tracestate: str = "") -> Job:
        """Submits a whole graph in one ``Submit`` (all or nothing) and returns its :class:`weft.Job`.

        Each spec may have a ``ref`` and name others in ``after`` by ref (``after=["fetch"]``
        or ``weft.Ref("fetch")``) or by task id. A dangling ref or a repeated one is a
        ValueError here; a cycle is :class:`weft.InvalidArgument` from the coordinator;
        either way nothing is committed. Trace context as :meth:`submit_many`.
        """
        request = task_pb2.SubmitRequest(tasks=traced(graph_request(specs).tasks, traceparent, tracestate))
        return job_of(request, self._unary(self._tasks.Submit, request))

    def job(self, job_id: str) -> Job:
        """A job's tasks as recorded now, oldest first (:class:`weft.NotFound` for an unknown job)."""
        job_id = _job_id(job_id)
        tasks = self.list(job=job_id, limit=1_000_000)
        if not tasks:
            raise errors.NotFound(f"no job {job_id}")
        return job_from_tasks(job_id, tasks)

    def wait_job(self, job_id: str, timeout: Optional[DurationLike] = None) -> Job:
        """Waits until every task of the job is final; returns the job with its final records.
        Its first look at the job (:meth:`job`) and the wait after it go on through a
        coordinator restart, as :meth:`wait_many` does (:data:`RESUME_WINDOW`); ``timeout``
        bounds the whole."""
        deadline = _deadline(timeout)
        resume = _Resume()
        while True:
            resume.opened()
            try:
                job = self.job(job_id)
                break
            except errors.Unavailable:
                # As the wait that follows: the coordinator restarting does not end it.
                pause = resume.failed(deadline)
                if pause is None:
                    raise
                time.sleep(pause)
            _remaining(deadline)
        final = {task.id: task for task in self.wait_many(job.task_ids, _remaining(deadline))}
        return job_from_tasks(job.id, [final.get(task.id, task) for task in job.tasks])

    def cancel_job(self, job_id: str, reason: str = "") -> JobCancelled:
        """Cancels every task of the job not final yet (PENDING ones at once; tasks that run
        after them end by their rules). :class:`weft.NotFound` for a job with no tasks left;
        :class:`weft.InvalidArgument` for a task id that is not a job id (the first task id
        of a submission); a reason over 1 KiB is refused the same way."""
        request = task_pb2.CancelJobRequest(job_id=_job_id(job_id), reason=reason)
        response = self._unary(self._tasks.CancelJob, request)
        return JobCancelled(cancelled=response.cancelled, already_final=response.already_final)

    # -- limits -------------------------------------------------------------

    def set_limit(self, name: str, rate=None, *, burst: Optional[int] = None, max_running: Optional[int] = None) -> None:
        """Sets (creates or replaces) a named limit: a rate limit tasks take units from
        (``rate="100/s"``, or :func:`weft.workflow.rate_limit`; ``burst``: most units held,
        default the units), or the running limit of the concurrency key ``name``
        (``max_running=2``). Durable; applies at once."""
        limit = limit_pb(name, rate, burst, max_running)
        self._unary(self._admin.SetLimit, admin_pb2.SetLimitRequest(limit=limit))

    def list_limits(self) -> List[LimitInfo]:
        """Every limit set, with what it holds now."""
        response = self._unary(self._admin.ListLimits, admin_pb2.ListLimitsRequest())
        return [LimitInfo.from_pb(info) for info in response.limits]

    def delete_limit(self, name: str, kind: str = "rate") -> None:
        """Removes a limit (``kind``: ``"rate"`` or ``"concurrency"``); :class:`weft.NotFound` if unknown."""
        request = admin_pb2.DeleteLimitRequest(name=name, kind=check_limit_kind(kind))
        self._unary(self._admin.DeleteLimit, request)

    # -- schedules ----------------------------------------------------------

    def create_schedule(
        self, name: str, cron: str, task: common_pb2.TaskSpec, *, time_zone: str = "", overlap: str = "skip",
        catch_up: str = "one",
    ) -> Schedule:
        """Creates a cron schedule that submits ``task`` (a :func:`weft.call_spec` /
        :func:`weft.exec_spec`) at each fire time, as a job of its own. ``cron``: five fields
        (or six, seconds first), read in ``time_zone`` (IANA; default UTC); ``overlap`` when
        the previous fire's task is not final: ``"skip"``, ``"queue"`` or
        ``"cancel_running"``; ``catch_up`` for fire times missed while the coordinator was
        down: ``"none"``, ``"one"`` or ``"all"``. :class:`weft.AlreadyExists` for a name in use."""
        spec = schedule_spec(name, cron, task, time_zone, overlap, catch_up)
        response = self._unary(self._schedules.CreateSchedule, schedule_pb2.CreateScheduleRequest(spec=spec))
        return Schedule.from_pb(response.schedule)

    def list_schedules(self) -> List[Schedule]:
        """Every schedule, by name. The coordinator answers a page at a time (about 1 MiB:
        each page's ``next_page_token`` is the name of its last schedule); this follows
        the pages to the last."""
        schedules: List[Schedule] = []
        token = ""
        while True:
            request = schedule_pb2.ListSchedulesRequest(page_token=token)
            page = self._unary(self._schedules.ListSchedules, request)
            schedules.extend(Schedule.from_pb(s) for s in page.schedules)
            token = next_schedule_token(token, page.next_page_token)
            if not token:
                return schedules

    def pause_schedule(self, name: str, paused: bool = True) -> Schedule:
        """Pauses (or with ``paused=False`` resumes) a schedule; fire times passed while
        paused are not caught up. :class:`weft.NotFound` for an unknown name."""
        request = schedule_pb2.PauseScheduleRequest(name=name, paused=bool(paused))
        return Schedule.from_pb(self._unary(self._schedules.PauseSchedule, request).schedule)

    def resume_schedule(self, name: str) -> Schedule:
        """Resumes a paused schedule."""
        return self.pause_schedule(name, paused=False)

    def delete_schedule(self, name: str) -> None:
        """Deletes a schedule (the tasks it fired are kept); :class:`weft.NotFound` if unknown."""
        self._unary(self._schedules.DeleteSchedule, schedule_pb2.DeleteScheduleRequest(name=name))

    # -- admin --------------------------------------------------------------

    def nodes(self) -> List[NodeInfo]:
        """Every node the coordinator knows."""
        response = self._unary(self._admin.ListNodes, admin_pb2.ListNodesRequest())
        return [NodeInfo.from_pb(n) for n in response.nodes]

    def drain(self, node: str, grace: Optional[DurationLike] = None) -> NodeInfo:
        """Asks a node (id or name) to drain; returns it, now draining."""
        request = admin_pb2.DrainNodeRequest(node=node)
        if grace is not None:
            request.grace.CopyFrom(duration_to_pb(grace))
        return NodeInfo.from_pb(self._unary(self._admin.DrainNode, request).node)

    def cluster_info(self) -> ClusterInfo:
        """Cluster-wide figures."""
        return ClusterInfo.from_pb(self._unary(self._admin.ClusterInfo, admin_pb2.ClusterInfoRequest()))
