"""The asyncio client: the same calls as :class:`weft.Client`, awaitable.

>>> import weft.aio
>>> async def main():
...     async with weft.aio.Client("http://127.0.0.1:7070") as client:
...         task_id = await client.submit_exec(["sh", "-c", "echo hi"])
...         async for event in client.watch(task_id):
...             print(event.kind, event.data)
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, AsyncIterator, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from . import errors
from ._channel import client_token, lazy_aio_channel
from ._proto import admin_pb2, admin_pb2_grpc, common_pb2, schedule_pb2, schedule_pb2_grpc, task_pb2, task_pb2_grpc
from .client import (
    _CLEANUP_STOPS,
    MAP_CANCEL_REASON,
    SUBMIT_BATCH,
    UNARY_TIMEOUT,
    InputLike,
    _Resume,
    _deadline,
    _distinct,
    _InOrder,
    _cleanup_deadline,
    _cleanup_timeout,
    _job_id,
    _MapRun,
    _new_records,
    _open_wait,
    _call_requests,
    _remaining,
    _unary_timeout,
    _wait_many_batch,
    log,
)
from .models import (
    ClusterInfo,
    DurationLike,
    NodeInfo,
    OutputStream,
    Task,
    TaskEvent,
    TaskState,
    TimeLike,
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


class Client:
    """An asyncio connection to a coordinator (see :class:`weft.Client`)."""

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        token: Optional[str] = None,
        channel: Optional[grpc.aio.Channel] = None,
        ca_file: Optional[str] = None,
        ca_pin: Optional[str] = None,
    ):
        # Never blocks the event loop: a list of addresses is probed, and a
        # pinned CA fetched, in a worker thread at the first call.
        self._channel = channel or lazy_aio_channel(url, client_token(token), ca_file=ca_file, ca_pin=ca_pin)
        self._tasks = task_pb2_grpc.TaskServiceStub(self._channel)
        #: Whether to wait over WaitManyBatches (cleared when the coordinator lacks it).
        self._wait_batches = True
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._schedules = schedule_pb2_grpc.ScheduleServiceStub(self._channel)
        #: The maps still open, cancelled by :meth:`close` (see :class:`weft.Client`).
        self._maps: "weakref.WeakSet[_MapRun]" = weakref.WeakSet()
        #: Cleanups that outlived a map cancelled while it ran them (strong references,
        #: so that the event loop does not drop them half done).
        self._cleanups: set = set()

    async def close(self) -> None:
        """Cancels the calls that open :meth:`map` iterators did not yield, then closes the
        channel: an ``async for`` left with ``break`` finalises its generator only later."""
        unread = [job for run in list(self._maps) for job in run.take_unread()]
        if unread:
            await self._cancel_unread(unread)
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method, request, timeout: Optional[float] = None):
        try:
            return await method(request, timeout=UNARY_TIMEOUT if timeout is None else timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    async def submit(self, spec: common_pb2.TaskSpec, *, traceparent: str = "", tracestate: str = "") -> str:
        """Commits one task; returns its id. Trace context as :meth:`submit_many`."""
        return (await self.submit_many([spec], traceparent=traceparent, tracestate=tracestate))[0]

    async def submit_many(
        self, specs: Iterable[common_pb2.TaskSpec], *, traceparent: str = "", tracestate: str = ""
    ) -> List[str]:
        """Commits many tasks in one transaction; returns their ids. Each
        continues ``traceparent`` when given, else its spec's trace, else the
        current OpenTelemetry span's (see :meth:`weft.Client.submit_many`)."""
        specs = traced(specs, traceparent, tracestate)
        response = await self._unary(self._tasks.Submit, task_pb2.SubmitRequest(tasks=specs))
        return list(response.task_ids)

    async def submit_call(self, handler: str, input: Union[bytes, str, None] = b"", **options) -> str:
        """Submits a call of ``handler``; returns the id."""
        return await self.submit(call_spec(handler, input, **options))

    async def submit_exec(self, argv: Sequence[str], **options) -> str:
        """Submits a program run; returns the id."""
        return await self.submit(exec_spec(argv, **options))

    async def call(
        self,
        handler: str,
        input: Union[bytes, str, None] = b"",
        *,
        wait_timeout: Optional[DurationLike] = None,
        **options,
    ) -> Any:
        """Calls ``handler`` on some node and returns its output (raises TaskFailed); with
        ``json=VALUE``, JSON in and out (see :meth:`weft.Client.call`)."""
        task = await self.wait(await self.submit_call(handler, input, **options), timeout=wait_timeout)
        if not task.succeeded:
            raise errors.task_error(task)
        return task.json() if "json" in options else task.output

    async def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        wait_timeout: Optional[DurationLike] = None,
        **options,
    ) -> Task:
        """Runs ``argv`` on some node, waits, returns the final Task."""
        task = await self.wait(await self.submit_exec(argv, **options), timeout=wait_timeout)
        if check and not task.succeeded:
            raise errors.task_error(task)
        return task

    async def get(self, task_id: str) -> Task:
        """A task's current record."""
        return await self._get(task_id)

    async def _get(self, task_id: str, timeout: Optional[float] = None) -> Task:
        response = await self._unary(self._tasks.Get, task_pb2.GetRequest(task_id=task_id), timeout)
        return Task.from_pb(response.task)

    async def list(
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
        """Tasks, newest first, with the filters of :meth:`weft.Client.list` (``job``: that job's, oldest first)."""
        request = list_request(state, 0, labels, name, node, since, until, _job_id(job))
        limit = limit if limit > 0 else 100
        tasks: List[Task] = []
        while True:
            request.limit = min(limit - len(tasks), 10_000)
            page = await self._unary(self._tasks.List, request)
            tasks.extend(Task.from_pb(t) for t in page.tasks)
            if len(tasks) >= limit or not page.next_page_token:
                return tasks[:limit]
            request.page_token = page.next_page_token

    async def _stream(self, call) -> AsyncIterator[TaskEvent]:
        try:
            async for event in call:
                yield TaskEvent.from_pb(event)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        finally:
            call.cancel()

    def watch(self, task_id: str, from_seq: int = 0, *, timeout: Optional[DurationLike] = None) -> AsyncIterator[TaskEvent]:
        """``async for event in client.watch(id)``: recorded events, then live ones."""
        call = self._tasks.Watch(
            task_pb2.WatchRequest(task_id=task_id, from_seq=from_seq),
            timeout=None if timeout is None else parse_duration(timeout),
        )
        return self._stream(call)

    async def output(self, task_id: str, from_seq: int = 0) -> AsyncIterator[Tuple[OutputStream, bytes]]:
        """``async for stream, data in client.output(id)``."""
        async for event in self.watch(task_id, from_seq):
            if event.kind == "output":
                yield event.stream, event.data

    def run(self, spec: common_pb2.TaskSpec, *, traceparent: str = "", tracestate: str = "") -> AsyncIterator[TaskEvent]:
        """Submits ``spec`` and streams its events (trace context as :meth:`submit_many`)."""
        [spec] = traced([spec], traceparent, tracestate)
        return self._stream(self._tasks.Run(task_pb2.RunRequest(spec=spec)))

    async def wait(self, task_id: str, timeout: Optional[DurationLike] = None) -> Task:
        """Until the task reaches a final state; DeadlineExceeded after ``timeout``, Unavailable
        after failing tries for the resume window (see :meth:`weft.Client.wait`)."""
        deadline = _deadline(timeout)
        resume = _Resume()
        first = True
        while True:
            resume.opened()
            try:
                task = await self._get(task_id, _unary_timeout(deadline, first))
                first = False
                # Not resume.ok(): only a watch event, or a watch open the window, ends a run of
                # failed tries (see weft.Client.wait).
                if task.is_final:
                    return task
                resume.opened()
                async for event in self.watch(task_id, task.next_seq, timeout=_remaining(deadline)):
                    resume.ok()
                    if event.kind == "finished" and event.task is not None:
                        return event.task
            except errors.Unavailable:
                # The coordinator went away, or the channel did not open (a pinned CA not fetched).
                pause = resume.failed(deadline)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
            _remaining(deadline)

    async def wait_many(self, task_ids: Iterable[str], timeout: Optional[DurationLike] = None) -> AsyncIterator[Task]:
        """``async for task in client.wait_many(ids)``: final records as tasks finish (see
        :meth:`weft.Client.wait_many`)."""
        async for record in self._wait_many_records(task_ids, timeout):
            yield Task.from_pb(record)

    async def _wait_many_records(
        self, task_ids: Iterable[str], timeout: Optional[DurationLike] = None, results_only: bool = False
    ) -> AsyncIterator[task_pb2.Task]:
        """:meth:`wait_many`'s records as they come (``weft.Executor`` reads a
        pickled result straight from one)."""
        deadline = _deadline(timeout)
        resume = _Resume()
        pending = _distinct(task_ids)
        left = set(pending)
        while left:
            batches = self._wait_batches
            resume.opened()
            call = _open_wait(self._tasks, _wait_many_batch(pending, left), batches, _remaining(deadline), results_only)
            try:
                try:
                    async for message in call:
                        resume.ok()
                        for record in _new_records(message, batches, left):
                            yield record
                except grpc.RpcError as e:
                    if batches and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                        self._wait_batches = False  # an older coordinator: one record per message
                        continue
                    raise errors.from_rpc_error(e) from None
            except errors.Unavailable as error:
                # The coordinator went away, or the channel did not open (a pinned CA not
                # fetched): resume for the rest, within the window.
                pause = resume.failed(deadline)
                if pause is None:
                    raise error from None
                await asyncio.sleep(pause)
                _remaining(deadline)
            finally:
                call.cancel()

    def as_completed(self, task_ids: Iterable[str], timeout: Optional[DurationLike] = None) -> AsyncIterator[Task]:
        """The tasks' final records as they finish (:meth:`wait_many`)."""
        return self.wait_many(task_ids, timeout)

    async def map(
        self,
        handler: str,
        inputs: Iterable[InputLike],
        *,
        timeout: Optional[DurationLike] = None,
        **options,
    ) -> AsyncIterator[bytes]:
        """``async for result in client.map(handler, inputs)``: results in input order; the
        calls not yielded are cancelled when it stops early, ``aclose()`` included (see
        :meth:`weft.Client.map`)."""
        run = _MapRun()
        self._maps.add(run)
        try:
            for request in _call_requests(handler, inputs, options):
                response = await self._unary(self._tasks.Submit, request)
                run.ids.extend(response.task_ids)
                run.jobs.append((response.job_id or response.task_ids[0], len(run.ids)))
            run.order = _InOrder(run.ids)
            async for record in self._wait_many_records(run.ids, timeout, results_only=True):
                for result in run.order.add(record):
                    yield result
        except BaseException as error:  # GeneratorExit (aclose) and CancelledError included
            self._maps.discard(run)
            unread = run.take_unread()
            if unread:
                await self._cancel_unread_for(unread, error)
            raise
        self._maps.discard(run)

    async def _cancel_unread_for(self, unread: List[Tuple[str, List[str]]], error: BaseException) -> None:
        """:meth:`_cancel_unread` on ``map``'s way out with ``error``, in a task of its own:
        should the map's task be cancelled meanwhile, the cleanup goes on (within its
        budget), and ``error`` stays the one raised rather than that CancelledError (but a
        cancelled ``aclose()`` raises it: its caller is the one cancelled)."""
        cleanup = asyncio.ensure_future(self._cancel_unread(unread))
        self._cleanups.add(cleanup)
        cleanup.add_done_callback(self._cleanups.discard)
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            if isinstance(error, GeneratorExit):
                raise

    async def _cancel_unread(self, unread: List[Tuple[str, List[str]]]) -> None:
        """Cancels what ``map`` did not yield, within :data:`weft.client.MAP_CANCEL_BUDGET`
        (see :meth:`weft.Client._cancel_unread`); errors are logged, never raised."""
        deadline = _cleanup_deadline()
        try:
            for job_id, task_ids in unread:
                try:
                    try:
                        request = task_pb2.CancelJobRequest(job_id=job_id, reason=MAP_CANCEL_REASON)
                        await self._unary(self._tasks.CancelJob, request, _cleanup_timeout(deadline))
                    except errors.Unimplemented:
                        for task_id in task_ids:
                            try:
                                request = task_pb2.CancelRequest(task_id=task_id, reason=MAP_CANCEL_REASON)
                                await self._unary(self._tasks.Cancel, request, _cleanup_timeout(deadline))
                            except errors.FailedPrecondition:
                                pass  # final already
                except _CLEANUP_STOPS:
                    raise
                except errors.WeftError as error:
                    log.debug("map could not cancel job %s: %s", job_id, error)
        except Exception as error:  # a closed channel raises grpc.aio.UsageError
            log.warning("map left %d job(s) of calls it did not yield uncancelled: %s", len(unread), error)

    async def cancel(self, task_id: str, reason: str = "") -> Task:
        """Cancels a task; returns it as recorded after the cancel."""
        response = await self._unary(self._tasks.Cancel, task_pb2.CancelRequest(task_id=task_id, reason=reason))
        return Task.from_pb(response.task)

    # -- graphs, jobs, limits, schedules (as weft.Client's) ------------------

    async def submit_graph(self, specs: Iterable[common_pb2.TaskSpec], *, traceparent: str = "", tracestate: str = "") -> Job:
        """Submits a whole graph in one ``Submit``; see :meth:`weft.Client.submit_graph`."""
        request = task_pb2.SubmitRequest(tasks=traced(graph_request(specs).tasks, traceparent, tracestate))
        return job_of(request, await self._unary(self._tasks.Submit, request))

    async def job(self, job_id: str) -> Job:
        """A job's tasks as recorded now, oldest first."""
        job_id = _job_id(job_id)
        tasks = await self.list(job=job_id, limit=1_000_000)
        if not tasks:
            raise errors.NotFound(f"no job {job_id}")
        return job_from_tasks(job_id, tasks)

    async def wait_job(self, job_id: str, timeout: Optional[DurationLike] = None) -> Job:
        """Waits until every task of the job is final; returns the job with its final records
        (through a coordinator restart, its first look at the job included: see
        :meth:`weft.Client.wait_job`)."""
        deadline = _deadline(timeout)
        resume = _Resume()
        while True:
            resume.opened()
            try:
                job = await self.job(job_id)
                break
            except errors.Unavailable:
                pause = resume.failed(deadline)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
            _remaining(deadline)
        final = {task.id: task async for task in self.wait_many(job.task_ids, _remaining(deadline))}
        return job_from_tasks(job.id, [final.get(task.id, task) for task in job.tasks])

    async def cancel_job(self, job_id: str, reason: str = "") -> JobCancelled:
        """Cancels every task of the job not final yet; see :meth:`weft.Client.cancel_job`."""
        request = task_pb2.CancelJobRequest(job_id=_job_id(job_id), reason=reason)
        response = await self._unary(self._tasks.CancelJob, request)
        return JobCancelled(cancelled=response.cancelled, already_final=response.already_final)

    async def set_limit(self, name: str, rate=None, *, burst: Optional[int] = None, max_running: Optional[int] = None) -> None:
        """Sets a named limit; see :meth:`weft.Client.set_limit`."""
        limit = limit_pb(name, rate, burst, max_running)
        await self._unary(self._admin.SetLimit, admin_pb2.SetLimitRequest(limit=limit))

    async def list_limits(self) -> List[LimitInfo]:
        """Every limit set, with what it holds now."""
        response = await self._unary(self._admin.ListLimits, admin_pb2.ListLimitsRequest())
        return [LimitInfo.from_pb(info) for info in response.limits]

    async def delete_limit(self, name: str, kind: str = "rate") -> None:
        """Removes a limit (``kind``: ``"rate"`` or ``"concurrency"``)."""
        request = admin_pb2.DeleteLimitRequest(name=name, kind=check_limit_kind(kind))
        await self._unary(self._admin.DeleteLimit, request)

    async def create_schedule(
        self, name: str, cron: str, task: common_pb2.TaskSpec, *, time_zone: str = "", overlap: str = "skip",
        catch_up: str = "one",
    ) -> Schedule:
        """Creates a cron schedule; see :meth:`weft.Client.create_schedule`."""
        spec = schedule_spec(name, cron, task, time_zone, overlap, catch_up)
        response = await self._unary(self._schedules.CreateSchedule, schedule_pb2.CreateScheduleRequest(spec=spec))
        return Schedule.from_pb(response.schedule)

    async def list_schedules(self) -> List[Schedule]:
        """Every schedule, by name, following the coordinator's pages; see
        :meth:`weft.Client.list_schedules`."""
        schedules: List[Schedule] = []
        token = ""
        while True:
            request = schedule_pb2.ListSchedulesRequest(page_token=token)
            page = await self._unary(self._schedules.ListSchedules, request)
            schedules.extend(Schedule.from_pb(s) for s in page.schedules)
            token = next_schedule_token(token, page.next_page_token)
            if not token:
                return schedules

    async def pause_schedule(self, name: str, paused: bool = True) -> Schedule:
        """Pauses (or with ``paused=False`` resumes) a schedule."""
        request = schedule_pb2.PauseScheduleRequest(name=name, paused=bool(paused))
        return Schedule.from_pb((await self._unary(self._schedules.PauseSchedule, request)).schedule)

    async def resume_schedule(self, name: str) -> Schedule:
        """Resumes a paused schedule."""
        return await self.pause_schedule(name, paused=False)

    async def delete_schedule(self, name: str) -> None:
        """Deletes a schedule (the tasks it fired are kept)."""
        await self._unary(self._schedules.DeleteSchedule, schedule_pb2.DeleteScheduleRequest(name=name))

    async def nodes(self) -> List[NodeInfo]:
        """Every node the coordinator knows."""
        response = await self._unary(self._admin.ListNodes, admin_pb2.ListNodesRequest())
        return [NodeInfo.from_pb(n) for n in response.nodes]

    async def drain(self, node: str, grace: Optional[DurationLike] = None) -> NodeInfo:
        """Asks a node to drain."""
        request = admin_pb2.DrainNodeRequest(node=node)
        if grace is not None:
            request.grace.CopyFrom(duration_to_pb(grace))
        return NodeInfo.from_pb((await self._unary(self._admin.DrainNode, request)).node)

    async def cluster_info(self) -> ClusterInfo:
        """Cluster-wide figures."""
        return ClusterInfo.from_pb(await self._unary(self._admin.ClusterInfo, admin_pb2.ClusterInfoRequest()))


def __getattr__(name: str):
    # ``weft.aio.Executor`` lives in weft/executor.py, which imports this module.
    if name == "Executor":
        from .executor import AsyncExecutor

        return AsyncExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Client"]
