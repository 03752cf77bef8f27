"""Jobs, graphs, limits and schedules: the plain views and request builders
behind :meth:`weft.Client.submit_graph`, ``job``/``cancel_job``,
``set_limit``/``list_limits``/``delete_limit`` and the schedule calls (the
blocking and asyncio clients share them).
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from ._proto import admin_pb2, common_pb2, schedule_pb2, task_pb2
from .models import DurationLike, Task, TaskState, _time, duration_from_pb, duration_to_pb, parse_duration
from .policy import Ref, check_key  # noqa: F401 - Ref is part of this module's interface

_U32 = 2**32 - 1
#: A task id: a ULID, 26 characters of Crockford base32 (either case), the first at most 7.
#: ASCII: ignoring case must not take the Kelvin sign for K or the long s for S.
_TASK_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.ASCII | re.IGNORECASE)
#: What Rust's ``str::trim`` takes off (Unicode White_Space, ``char::is_whitespace``):
#: ``str.strip()`` also takes the separators U+001C-U+001F, which the coordinator keeps.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"

# -- graphs and jobs ----------------------------------------------------------


def graph_request(specs: Iterable[common_pb2.TaskSpec]) -> task_pb2.SubmitRequest:
    """One ``SubmitRequest`` of a whole graph: every spec as given, except that an ``after``
    entry naming another spec's ``ref`` (a plain string given as ``after=["fetch"]``)
    becomes a dependency by ref. Refs must be unique; a dependency on a ref no spec has,
    or a plain string that is neither a ref of the graph nor a task id (a ULID: 26
    characters of Crockford base32), is a ValueError naming it (the coordinator also
    refuses cycles and dangling refs, committing nothing)."""
    request = task_pb2.SubmitRequest()
    for spec in specs:
        if not isinstance(spec, common_pb2.TaskSpec):
            raise TypeError(f"submit_graph takes task specs (weft.call_spec / weft.exec_spec), not {type(spec).__name__}")
        request.tasks.add().CopyFrom(spec)
    if not request.tasks:
        raise ValueError("submit_graph needs at least one task")
    refs = set()
    for index, spec in enumerate(request.tasks):
        if spec.ref:
            if spec.ref in refs:
                raise ValueError(f"tasks[{index}].ref {spec.ref!r} is used twice in the graph")
            refs.add(spec.ref)
    for index, spec in enumerate(request.tasks):
        named = set()
        for dependency in spec.after:
            if dependency.task_id and dependency.task_id in refs:
                name = dependency.task_id
                dependency.ClearField("task_id")
                dependency.ref = name
            # A task id stripped, as the coordinator reads one (TaskId::from_str trims).
            elif dependency.task_id and not _TASK_ID.fullmatch(dependency.task_id.strip(_WHITE_SPACE)):
                raise ValueError(
                    f"tasks[{index}].after names {dependency.task_id!r}, which is neither a ref of the graph "
                    f"nor a task id"
                )
            if dependency.ref and dependency.ref not in refs:
                raise ValueError(f"tasks[{index}].after names ref {dependency.ref!r}, which no task of the graph has")
            if dependency.ref and dependency.ref == spec.ref:
                raise ValueError(f"tasks[{index}] ({spec.ref!r}) runs after itself")
            name = dependency.ref or dependency.task_id
            if name in named:
                raise ValueError(f"tasks[{index}].after names {name!r} twice")
            named.add(name)
    return request


@dataclass
class Job:
    """One ``Submit``: its id (its first task's id) and its tasks' ids, in submission order;
    ``by_ref`` maps each task's ``ref`` to its id. :meth:`weft.Client.job` fills ``tasks``
    with their records (oldest first)."""

    id: str
    task_ids: List[str]
    by_ref: Dict[str, str] = field(default_factory=dict)
    tasks: List[Task] = field(default_factory=list)

    def __getitem__(self, ref: str) -> str:
        """The id of the task whose ``ref`` is ``ref``."""
        return self.by_ref[ref]

    @property
    def task_id(self) -> str:
        """The job's first task id (so a Job may be named in ``after=``)."""
        return self.id

    def states(self) -> Dict[TaskState, int]:
        """How many of ``tasks`` are in each state."""
        counts: Dict[TaskState, int] = {}
        for task in self.tasks:
            counts[task.state] = counts.get(task.state, 0) + 1
        return counts

    @property
    def is_final(self) -> bool:
        """Whether every task in ``tasks`` is final."""
        return bool(self.tasks) and all(task.is_final for task in self.tasks)

    @property
    def succeeded(self) -> bool:
        """Whether every task in ``tasks`` succeeded."""
        return bool(self.tasks) and all(task.succeeded for task in self.tasks)


def job_of(request: task_pb2.SubmitRequest, response: task_pb2.SubmitResponse) -> Job:
    """The :class:`Job` a Submit made."""
    ids = list(response.task_ids)
    by_ref = {spec.ref: task_id for spec, task_id in zip(request.tasks, ids) if spec.ref}
    return Job(id=response.job_id or (ids[0] if ids else ""), task_ids=ids, by_ref=by_ref)


def job_from_tasks(job_id: str, tasks: List[Task]) -> Job:
    """A :class:`Job` read back with ``List(job=...)``."""
    return Job(id=job_id, task_ids=[t.id for t in tasks], by_ref={t.ref: t.id for t in tasks if t.ref}, tasks=tasks)


@dataclass
class JobCancelled:
    """What :meth:`weft.Client.cancel_job` did."""

    cancelled: int
    already_final: int


# -- limits -------------------------------------------------------------------

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str) -> admin_pb2.RateLimit:
    """``"100/s"``, ``"10/m"``, ``"5/h"``, ``"3/500ms"``, ``"20/10s"`` as a token bucket."""
    units, sep, per = str(text).strip().partition("/")
    if not sep:
        raise ValueError(f"rate {text!r} is not UNITS/PERIOD, e.g. 100/s, 10/m, 3/500ms")
    try:
        count = int(units.strip())
    except ValueError:
        raise ValueError(f"rate {text!r} is not UNITS/PERIOD, e.g. 100/s, 10/m, 3/500ms") from None
    per = per.strip()
    seconds = _PERIODS.get(per)
    if seconds is None:
        try:
            seconds = parse_duration(per)
        except ValueError:
            raise ValueError(f"rate {text!r} is not UNITS/PERIOD, e.g. 100/s, 10/m, 3/500ms") from None
    return rate_limit(count, seconds)


def rate_limit(units: int, period: DurationLike, burst: int = 0) -> admin_pb2.RateLimit:
    """A checked ``RateLimit``: ``units`` (>= 1) per ``period`` (1ms to 24h), ``burst`` (0: ``units``)."""
    if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= _U32:
        raise ValueError(f"rate: units must be an integer from 1 to {_U32}, not {units!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= _U32:
        raise ValueError(f"rate: burst must be an integer from 0 to {_U32}, not {burst!r}")
    seconds = parse_duration(period)
    if not 0.001 <= seconds <= 86400:
        raise ValueError(f"rate: the period must be between 1ms and 24h, not {seconds:g}s")
    return admin_pb2.RateLimit(units=units, period=duration_to_pb(seconds), burst=burst)


def limit_pb(name: str, rate: Union[str, admin_pb2.RateLimit, None], burst: Optional[int],
             max_running: Optional[int]) -> admin_pb2.Limit:
    """The ``Limit`` of :meth:`weft.Client.set_limit` (exactly one of ``rate``, ``max_running``)."""
    check_key("name", name)
    if (rate is None) == (max_running is None):
        raise ValueError("set_limit takes a rate (e.g. rate='100/s') or max_running=N, exactly one")
    limit = admin_pb2.Limit(name=name)
    if rate is not None:
        bucket = parse_rate(rate) if isinstance(rate, str) else rate
        if burst is not None:
            if isinstance(burst, bool) or not isinstance(burst, int) or not 0 <= burst <= _U32:
                raise ValueError(f"burst must be an integer from 0 to {_U32}, not {burst!r}")
            bucket.burst = burst
        limit.rate.CopyFrom(bucket)
    else:
        if burst is not None:
            raise ValueError("burst applies to a rate limit")
        if isinstance(max_running, bool) or not isinstance(max_running, int) or not 1 <= max_running <= _U32:
            raise ValueError(f"max_running must be an integer from 1 to {_U32}, not {max_running!r}")
        limit.max_running = max_running
    return limit


@dataclass
class LimitInfo:
    """A limit and how it stands (``weft.v1.LimitInfo``). ``kind`` is ``"rate"`` (``units``
    per ``period`` seconds, ``burst``; ``available`` units in the bucket) or
    ``"concurrency"`` (``max_running``; ``running`` now); ``waiting``: ready tasks
    waiting on it."""

    name: str
    kind: str
    units: int
    period: float
    burst: int
    max_running: int
    available: int
    running: int
    waiting: int
    pb: admin_pb2.LimitInfo = field(repr=False)

    @classmethod
    def from_pb(cls, info: admin_pb2.LimitInfo) -> "LimitInfo":
        limit = info.limit
        is_rate = limit.WhichOneof("kind") == "rate"
        return cls(
            name=limit.name,
            kind="rate" if is_rate else "concurrency",
            units=limit.rate.units if is_rate else 0,
            period=duration_from_pb(limit.rate.period) if is_rate else 0.0,
            burst=limit.rate.burst if is_rate else 0,
            max_running=0 if is_rate else limit.max_running,
            available=info.available,
            running=info.running,
            waiting=info.waiting,
            pb=info,
        )


def check_limit_kind(kind: str) -> str:
    if kind not in ("rate", "concurrency"):
        raise ValueError(f"kind must be 'rate' or 'concurrency', not {kind!r}")
    return kind


# -- schedules ----------------------------------------------------------------

OVERLAP = {
    "skip": schedule_pb2.OVERLAP_POLICY_SKIP,
    "queue": schedule_pb2.OVERLAP_POLICY_QUEUE,
    "cancel_running": schedule_pb2.OVERLAP_POLICY_CANCEL_RUNNING,
}
CATCH_UP = {"none": schedule_pb2.CATCH_UP_NONE, "one": schedule_pb2.CATCH_UP_ONE, "all": schedule_pb2.CATCH_UP_ALL}


def _choice(field_name: str, value: Any, names: Mapping[str, int]) -> int:
    key = str(value).strip().lower().replace("-", "_")
    if key not in names:
        raise ValueError(f"{field_name} must be one of {', '.join(names)}, not {value!r}")
    return names[key]


def schedule_spec(name: str, cron: str, task: common_pb2.TaskSpec, time_zone: str = "", overlap: str = "skip",
                  catch_up: str = "one") -> schedule_pb2.ScheduleSpec:
    """A checked ``ScheduleSpec`` (the cron expression and time zone are the coordinator's to check)."""
    check_key("name", name)
    # A nickname (`@daily`, `@hourly`, ...) is one word; the coordinator says which it knows.
    nickname = isinstance(cron, str) and cron.strip().startswith("@") and cron.strip()[1:].isalpha()
    if not isinstance(cron, str) or not (nickname or len(cron.split()) in (5, 6)):
        raise ValueError(f"cron {cron!r} must have five fields (minute hour day-of-month month day-of-week), "
                         "or six with seconds first, or be a nickname such as @daily")
    if not isinstance(task, common_pb2.TaskSpec):
        raise TypeError(f"a schedule's task is a task spec (weft.call_spec / weft.exec_spec), not {type(task).__name__}")
    if task.ref or len(task.after) or task.HasField("not_before"):
        raise ValueError("a schedule's task takes no ref, after, not_before or delay: each fire is a job of its own, "
                         "submitted at its fire time")
    return schedule_pb2.ScheduleSpec(
        name=name, cron=cron, time_zone=time_zone or "", task=task,
        overlap=_choice("overlap", overlap, OVERLAP), catch_up=_choice("catch_up", catch_up, CATCH_UP),
    )


def _name_of(names: Mapping[str, int], value: int) -> str:
    for name, number in names.items():
        if number == value:
            return name
    return ""


@dataclass
class Schedule:
    """A cron schedule and how it stands (``weft.v1.Schedule``)."""

    name: str
    cron: str
    time_zone: str
    task: common_pb2.TaskSpec
    overlap: str
    catch_up: str
    paused: bool
    created_at: Optional[_dt.datetime]
    next_fire: Optional[_dt.datetime]
    last_fire: Optional[_dt.datetime]
    last_task_id: str
    fired: int
    skipped: int
    pb: schedule_pb2.Schedule = field(repr=False)

    @classmethod
    def from_pb(cls, schedule: schedule_pb2.Schedule) -> "Schedule":
        spec = schedule.spec
        return cls(
            name=spec.name,
            cron=spec.cron,
            time_zone=spec.time_zone,
            task=spec.task,
            overlap=_name_of(OVERLAP, spec.overlap) or "skip",
            catch_up=_name_of(CATCH_UP, spec.catch_up) or "one",
            paused=schedule.paused,
            created_at=_time(schedule.created_at if schedule.HasField("created_at") else None),
            next_fire=_time(schedule.next_fire if schedule.HasField("next_fire") else None),
            last_fire=_time(schedule.last_fire if schedule.HasField("last_fire") else None),
            last_task_id=schedule.last_task_id,
            fired=schedule.fired,
            skipped=schedule.skipped,
            pb=schedule,
        )


__all__ = [
    "Job", "JobCancelled", "LimitInfo", "Ref", "Schedule", "graph_request", "job_of", "limit_pb", "parse_rate",
    "rate_limit", "schedule_spec",
]
