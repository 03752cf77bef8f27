"""Workflows and scheduling policy on a task spec: dependencies, start
times, priorities, fair keys, concurrency keys, rate limits and resources.

:func:`apply_policy` sets the ``TaskSpec`` fields of ``proto/README.md``
"Scheduling policy" and "Dependencies" from keyword options, checking each
as the coordinator does, so a bad value raises ``ValueError`` (naming the
option) before anything is sent. :func:`weft.call_spec`,
:func:`weft.exec_spec` and every ``submit_*``/``call``/``exec``/``map`` of
the clients take the same options:

>>> spec = weft.call_spec("train", b"", priority=8, fair_key="team-a",
...                       concurrency_key="user-42", max_concurrent=2,
...                       rate_limits={"api": 1}, resources={"gpu": 1, "mem": "2GiB"},
...                       after=[parent_id], delay="10m", ref="train")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import re
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Union

from ._proto import common_pb2

#: Keys, limit names and refs: 1 to 128 of these characters.
KEY_MAX = 128
_KEY = re.compile(r"[A-Za-z0-9_.:-]+")
#: Resource names: 1 to 64 of these.
RESOURCE_NAME_MAX = 64
_RESOURCE_NAME = re.compile(r"[a-z0-9_.-]+")
#: Most resources one task or node names.
RESOURCES_MAX = 64
#: Most tasks one task runs after.
AFTER_MAX = 10_000
#: Most units of a uint32 field.
_U32 = 2**32 - 1
_U64 = 2**64 - 1

#: ``after_rule`` names -> ``DependencyRule``.
AFTER_RULES = {
    "all_succeeded": common_pb2.DEPENDENCY_RULE_ALL_SUCCEEDED,
    "all_finished": common_pb2.DEPENDENCY_RULE_ALL_FINISHED,
    "any_failed": common_pb2.DEPENDENCY_RULE_ANY_FAILED,
    "any_succeeded": common_pb2.DEPENDENCY_RULE_ANY_SUCCEEDED,
}
#: ``on_limit`` names -> ``OverLimit``.
ON_LIMIT = {
    "queue": common_pb2.OVER_LIMIT_QUEUE,
    "cancel_newest": common_pb2.OVER_LIMIT_CANCEL_NEWEST,
    "cancel_oldest": common_pb2.OVER_LIMIT_CANCEL_OLDEST,
}

_SIZES = {
    "": 1, "B": 1, "k": 1000, "K": 1000, "kB": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
    "T": 10**12, "TB": 10**12, "Ki": 1 << 10, "KiB": 1 << 10, "Mi": 1 << 20, "MiB": 1 << 20, "Gi": 1 << 30,
    "GiB": 1 << 30, "Ti": 1 << 40, "TiB": 1 << 40,
}
_AMOUNT = re.compile(r"([0-9]+)\s*([A-Za-z]*)")


def check_key(field: str, key: Any) -> str:
    """``key`` if it is 1-128 of ``[A-Za-z0-9_.:-]``; ValueError naming ``field`` otherwise."""
    if not isinstance(key, str):
        raise ValueError(f"{field} must be a string, not {type(key).__name__}")
    if not key or len(key.encode()) > KEY_MAX:
        raise ValueError(f"{field} must be 1 to {KEY_MAX} characters long, not {len(key)}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"{field} {key!r} holds a character other than letters, digits and _ . : -")
    return key


def check_resource_name(field: str, name: Any) -> str:
    """``name`` if it is 1-64 of ``[a-z0-9_.-]``; ValueError otherwise."""
    if not isinstance(name, str) or not name or len(name) > RESOURCE_NAME_MAX or not _RESOURCE_NAME.fullmatch(name):
        raise ValueError(f"{field}: resource name {name!r} must be 1 to {RESOURCE_NAME_MAX} of a-z 0-9 _ . -")
    return name


def parse_amount(value: Union[int, str], field: str = "resources") -> int:
    """An amount as an integer: ``8``, ``"500M"`` (powers of 1000), ``"32GiB"`` (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: an amount is an integer or a size like '32GiB', not {value!r}")
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str):
        match = _AMOUNT.fullmatch(value.strip())
        if not match or match.group(2) not in _SIZES:
            raise ValueError(f"{field}: {value!r} is not an amount (e.g. 8, 500M, 32GiB)")
        amount = int(match.group(1)) * _SIZES[match.group(2)]
    else:
        raise ValueError(f"{field}: an amount is an integer or a size like '32GiB', not {type(value).__name__}")
    if amount < 0 or amount > _U64:
        raise ValueError(f"{field}: amount {value!r} is out of range")
    return amount


def parse_resources(resources: Mapping[str, Union[int, str]], field: str = "resources") -> dict:
    """``{"gpu": 1, "mem": "2GiB"}`` as name -> integer amount (zero amounts dropped)."""
    if isinstance(resources, (str, bytes)) or not isinstance(resources, Mapping):
        items = [_split_resource(text, field) for text in resources] if isinstance(resources, (list, tuple)) else None
        if items is None:
            raise ValueError(f"{field} is a mapping of name -> amount, e.g. {{'gpu': 1, 'mem': '2GiB'}}")
        resources = dict(items)
    if len(resources) > RESOURCES_MAX:
        raise ValueError(f"{field}: at most {RESOURCES_MAX} resources")
    out = {}
    for name, amount in resources.items():
        check_resource_name(field, name)
        amount = parse_amount(amount, f"{field}[{name!r}]")
        if amount:
            out[name] = amount
    return out


def _split_resource(text: Any, field: str):
    name, sep, amount = str(text).partition("=")
    if not sep:
        raise ValueError(f"{field}: {text!r} is not name=amount (e.g. cpu=8, mem=32GiB)")
    return name.strip(), amount.strip()


def _int_in(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer from {low} to {high}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{field} must be from {low} to {high}, not {value}")
    return value


def _enum(field: str, value: Any, names: Mapping[str, int]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value in names.values():
        return value
    key = str(value).strip().lower().replace("-", "_")
    if key not in names:
        raise ValueError(f"{field} must be one of {', '.join(names)}, not {value!r}")
    return names[key]


def task_id_of(value: Any, field: str = "after") -> str:
    """The task id of a dependency: a str id, a :class:`weft.Task`, a :class:`weft.Job` (its
    first task; ``after=`` names each of a job's tasks, see :func:`apply_policy`), or anything
    with a ``task_id`` (a submitted executor future)."""
    if isinstance(value, str):
        task_id = value
    elif hasattr(value, "task_id"):
        task_id = value.task_id
    elif hasattr(value, "id") and isinstance(getattr(value, "id"), str):
        task_id = value.id
    else:
        raise ValueError(f"{field}: {value!r} is not a task id, a Task or a submitted future")
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"{field}: {value!r} has no task id yet (it was not submitted)")
    return task_id


class Ref(str):
    """A dependency on another task of the same graph by its ``ref``
    (:meth:`weft.Client.submit_graph`): ``after=[weft.Ref("fetch")]``. In a
    graph a plain string that is a ref of the graph means the same."""

    __slots__ = ()


def to_timestamp_datetime(value: _dt.datetime) -> _dt.datetime:
    """An aware or naive (meaning UTC) datetime as naive UTC, for ``Timestamp.FromDatetime``."""
    if not isinstance(value, _dt.datetime):
        raise ValueError(f"not_before must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None:
        return value
    return value.astimezone(_dt.timezone.utc).replace(tzinfo=None)


def apply_policy(
    spec: common_pb2.TaskSpec,
    *,
    priority: Optional[int] = None,
    fair_key: Optional[str] = None,
    fair_weight: Optional[int] = None,
    concurrency_key: Optional[str] = None,
    max_concurrent: Optional[int] = None,
    on_limit: Optional[str] = None,
    rate_limits: Union[Mapping[str, int], Sequence[str], None] = None,
    resources: Optional[Mapping[str, Union[int, str]]] = None,
    after: Optional[Iterable[Any]] = None,
    after_rule: Optional[str] = None,
    not_before: Optional[_dt.datetime] = None,
    delay: Any = None,
    ref: Optional[str] = None,
    fail_if_infeasible: bool = False,
) -> common_pb2.TaskSpec:
    """Sets the policy fields of ``spec`` from the options (see the module); returns it.

    - ``priority``: 1 (lowest) to 9 (highest), default 5.
    - ``fair_key`` / ``fair_weight`` (1-1000): fair sharing within one priority.
    - ``concurrency_key`` with ``max_concurrent`` (>= 1; unset: the limit set with
      :meth:`weft.Client.set_limit`) and ``on_limit`` (``"queue"``, ``"cancel_newest"``,
      ``"cancel_oldest"``).
    - ``rate_limits``: ``{"api": 1}`` (name -> units) or ``["api"]`` (one unit each).
    - ``resources``: ``{"gpu": 1, "mem": "2GiB"}``.
    - ``after``: task ids, :class:`weft.Task`\\ s, :class:`weft.Job`\\ s (each of the job's
      tasks, so it runs after the whole job), submitted futures, or :class:`Ref`\\ s (a
      graph's refs); ``after_rule``: ``"all_succeeded"`` (default), ``"all_finished"``,
      ``"any_failed"``, ``"any_succeeded"``.
    - ``not_before``: a datetime (naive means UTC), or ``delay``: a duration from now
      (seconds, ``timedelta``, ``"10m"``); not both.
    - ``ref``: the task's name within its graph; ``fail_if_infeasible``: fail at once
      when no connected node could ever run it.
    """
    if priority is not None:
        spec.priority = _int_in("priority", priority, 1, 9)
    if fair_key is not None:
        spec.fair_key = check_key("fair_key", fair_key)
    if fair_weight is not None:
        spec.fair_weight = _int_in("fair_weight", fair_weight, 1, 1000)
    if concurrency_key is not None:
        limit = spec.concurrency
        limit.key = check_key("concurrency_key", concurrency_key)
        if max_concurrent is not None:
            limit.max_running = _int_in("max_concurrent", max_concurrent, 1, _U32)
        if on_limit is not None:
            limit.on_limit = _enum("on_limit", on_limit, ON_LIMIT)
    elif max_concurrent is not None or on_limit is not None:
        raise ValueError("max_concurrent and on_limit apply to a concurrency key: give concurrency_key= too")
    if rate_limits is not None:
        _rate_limits(spec, rate_limits)
    if resources is not None:
        spec.resources.update(parse_resources(resources))
    if after is not None:
        _after(spec, after)
    if after_rule is not None:
        spec.after_rule = _enum("after_rule", after_rule, AFTER_RULES)
    if not_before is not None and delay is not None:
        raise ValueError("give not_before (a time) or delay (a duration from now), not both")
    if delay is not None:
        from .models import parse_duration

        try:
            seconds = parse_duration(delay)
        except ValueError as e:
            raise ValueError(f"delay: {e}") from None
        not_before = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=seconds)
    if not_before is not None:
        spec.not_before.FromDatetime(to_timestamp_datetime(not_before))
    if ref is not None:
        spec.ref = check_key("ref", ref)
    if not isinstance(fail_if_infeasible, bool):
        raise ValueError(f"fail_if_infeasible must be True or False, not {fail_if_infeasible!r}")
    spec.fail_if_infeasible = fail_if_infeasible
    return spec


def _rate_limits(spec: common_pb2.TaskSpec, rate_limits: Any) -> None:
    if isinstance(rate_limits, str):
        rate_limits = [rate_limits]
    items = rate_limits.items() if isinstance(rate_limits, Mapping) else ((name, 1) for name in rate_limits)
    seen = set()
    for name, units in items:
        check_key("rate_limits", name)
        if name in seen:
            raise ValueError(f"rate_limits names {name!r} twice")
        seen.add(name)
        spec.rate_limits.add(name=name, units=_int_in(f"rate_limits[{name!r}]", units, 1, _U32))


def _job_task_ids(item: Any) -> Optional[List[str]]:
    """A :class:`weft.Job`'s task ids (None for anything else). Told by its fields, as
    ``weft.workflow`` imports this module."""
    task_ids = getattr(item, "task_ids", None)
    if isinstance(task_ids, list) and isinstance(getattr(item, "by_ref", None), dict):
        return task_ids
    return None


def after_items(after: Any) -> List[Any]:
    """``after`` as a list of its items: a lone item (a task id, a Task, a Job, a future) is
    one, not iterated (a Job would be by its refs; an asyncio future, by ``await``: nothing
    when done, an error when not)."""
    if isinstance(after, (str, bytes, asyncio.Future, concurrent.futures.Future)) or not hasattr(after, "__iter__"):
        return [after]
    return list(after)


def too_many_after(job: Any = None, size: int = 0) -> ValueError:
    """The error of an ``after`` past :data:`AFTER_MAX` tasks; when a job (of ``size`` tasks)
    took it there, naming the job and its size."""
    if job is None:
        return ValueError(f"after: at most {AFTER_MAX} tasks")
    return ValueError(f"after: at most {AFTER_MAX} tasks, and job {task_id_of(job)!r} has {size} "
                      "(naming a job names each of its tasks)")


def _after(spec: common_pb2.TaskSpec, after: Iterable[Any]) -> None:
    seen = set()
    # What a job named (one of its tasks also named on its own is named once), and the jobs.
    by_job, jobs = set(), set()
    for item in after_items(after):
        job_ids = None if isinstance(item, (str, Ref)) else _job_task_ids(item)
        if job_ids is not None:
            if not job_ids:
                raise ValueError(f"after: job {task_id_of(item)!r} has no tasks")
            if item.id in jobs:
                raise ValueError(f"after names job {item.id!r} twice")
            jobs.add(item.id)
            keys = [("task_id", task_id) for task_id in job_ids]
        elif isinstance(item, Ref):
            keys = [("ref", check_key("after", str(item)))]
        else:
            keys = [("task_id", task_id_of(item))]
        for key in keys:
            if key in seen:
                if job_ids is not None or key in by_job:
                    continue
                raise ValueError(f"after names {key[1]!r} twice")
            seen.add(key)
            if job_ids is not None:
                by_job.add(key)
            if len(seen) > AFTER_MAX:
                raise too_many_after(item, len(job_ids)) if job_ids is not None else too_many_after()
            dependency = spec.after.add()
            setattr(dependency, key[0], key[1])


#: The option names :func:`apply_policy` takes.
POLICY_OPTIONS = frozenset(apply_policy.__kwdefaults__)


def policy_options(options: dict) -> dict:
    """The policy options taken out of ``options`` (which keeps the rest)."""
    return {name: options.pop(name) for name in list(options) if name in POLICY_OPTIONS}


def after_ids(spec: common_pb2.TaskSpec) -> List[str]:
    """The task ids (not refs) ``spec`` runs after."""
    return [d.task_id for d in spec.after if d.task_id]
