"""Plain Python views of the weft.v1 messages, and task spec builders.

The client returns these dataclasses rather than protobuf messages; each keeps
the original message in ``pb`` for anything not surfaced here.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json as _json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from google.protobuf import duration_pb2

from ._proto import admin_pb2, common_pb2, task_pb2
from .policy import apply_policy

#: A duration given as seconds, a ``timedelta`` or a string like ``"250ms"``.
DurationLike = Union[float, int, str, _dt.timedelta]


class TaskState(str, enum.Enum):
    """The life of a task (``weft.v1.TaskState`` without its prefix)."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    #: Waiting for the tasks it runs after, or for its start time (``Task.waiting_for``).
    PENDING = "PENDING"
    #: Final, never ran: its dependency rule can no longer be met.
    UPSTREAM_FAILED = "UPSTREAM_FAILED"
    #: Final, never ran, not a failure (``after_rule="any_failed"`` when all succeeded).
    SKIPPED = "SKIPPED"

    @property
    def is_final(self) -> bool:
        """Whether the task can no longer change."""
        return self in _FINAL

    @classmethod
    def from_pb(cls, value: int) -> "TaskState":
        return cls(_strip(common_pb2.TaskState.Name(value), "TASK_STATE_")) if value in common_pb2.TaskState.values() else cls.UNSPECIFIED

    def to_pb(self) -> int:
        return common_pb2.TaskState.Value("TASK_STATE_" + self.value)

    def __str__(self) -> str:
        return self.value


_FINAL = frozenset((
    TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT, TaskState.UPSTREAM_FAILED,
    TaskState.SKIPPED,
))


class OutputStream(str, enum.Enum):
    """Which stream a chunk of output came from."""

    UNSPECIFIED = "UNSPECIFIED"
    STDOUT = "STDOUT"
    STDERR = "STDERR"

    @classmethod
    def from_pb(cls, value: int) -> "OutputStream":
        return cls(_strip(common_pb2.OutputStream.Name(value), "OUTPUT_STREAM_")) if value in common_pb2.OutputStream.values() else cls.UNSPECIFIED

    def to_pb(self) -> int:
        return common_pb2.OutputStream.Value("OUTPUT_STREAM_" + self.value)

    def __str__(self) -> str:
        return self.value


class NodeState(str, enum.Enum):
    """Whether a node takes work."""

    UNSPECIFIED = "UNSPECIFIED"
    READY = "READY"
    DRAINING = "DRAINING"

    @classmethod
    def from_pb(cls, value: int) -> "NodeState":
        return cls(_strip(admin_pb2.NodeState.Name(value), "NODE_STATE_")) if value in admin_pb2.NodeState.values() else cls.UNSPECIFIED

    def __str__(self) -> str:
        return self.value


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "secs": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0,
}
_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zµ]+)\s*")


def parse_label(text: str) -> Tuple[str, str]:
    """A ``KEY=VALUE`` label (``--label``) as a pair; ValueError naming the text otherwise."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"a label is KEY=VALUE, not {text!r}")
    return key, value


#: A ``since``/``until`` bound: a datetime (naive means UTC), or a duration
#: that long ago (``"10m"``, ``3600``, ``timedelta(hours=2)``).
TimeLike = Union[_dt.datetime, DurationLike]


def list_request(
    state: Optional[str],
    limit: int,
    labels: Optional[Mapping[str, str]],
    name: str,
    node: str,
    since: Optional[TimeLike],
    until: Optional[TimeLike],
    job: str = "",
) -> task_pb2.ListRequest:
    """A ``ListRequest`` with these filters (``limit`` and the page token are the caller's)."""
    request = task_pb2.ListRequest(limit=limit, name=name, node=node, job=job)
    if state is not None:
        request.state = TaskState(state).to_pb()
    for key, value in (labels or {}).items():
        if not str(key).strip():
            raise ValueError("a label filter needs a key")
        request.labels[str(key)] = str(value)
    for bound, value in (("since", since), ("until", until)):
        if value is not None:
            getattr(request, bound).FromDatetime(_absolute_time(value))
    return request


def next_schedule_token(token: str, next_token: str) -> str:
    """The ``page_token`` of the ``ListSchedules`` call after the one sent with ``token``
    that answered ``next_token`` (empty: that was the last page). Tokens are schedule
    names, each page's after the one before: one that does not move on would page
    forever, so it is an error."""
    if next_token and next_token <= token:
        raise RuntimeError(f"ListSchedules answered page token {next_token!r} after {token!r}")
    return next_token


def _absolute_time(value: TimeLike) -> _dt.datetime:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    ago = _dt.timedelta(seconds=parse_duration(value))
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None) - ago


def parse_duration(value: DurationLike) -> float:
    """Seconds from ``1.5``, ``timedelta(...)``, ``"250ms"``, ``"2s"``, ``"1m30s"``.

    Accepts the same text as the Rust side (a bare number is seconds).
    Raises ValueError on anything else or on a negative duration.
    """
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            seconds, pos = 0.0, 0
            if not text:
                raise ValueError("empty duration") from None
            while pos < len(text):
                match = _PART.match(text, pos)
                if not match or match.group(2) not in _UNITS:
                    raise ValueError(f"bad duration {text!r}: expected e.g. 250ms, 2s, 1m30s") from None
                seconds += float(match.group(1)) * _UNITS[match.group(2)]
                pos = match.end()
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ValueError(f"bad duration {value!r}: must be finite and not negative")
    return seconds


def duration_to_pb(value: DurationLike) -> duration_pb2.Duration:
    """A ``google.protobuf.Duration`` from anything :func:`parse_duration` takes
    (ValueError on a negative one), to the nearest nanosecond."""
    seconds = parse_duration(value)
    whole = int(seconds)
    nanos = int(round((seconds - whole) * 1e9))
    if nanos >= 1_000_000_000:  # a fraction that rounds up to the next second (2.9999999999)
        whole, nanos = whole + 1, nanos - 1_000_000_000
    return duration_pb2.Duration(seconds=whole, nanos=nanos)


def duration_from_pb(value: duration_pb2.Duration) -> float:
    """Seconds from a ``google.protobuf.Duration``."""
    return value.seconds + value.nanos / 1e9


def _to_bytes(data: Union[bytes, bytearray, memoryview, str, None]) -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


def _common(
    spec: common_pb2.TaskSpec,
    slots: int,
    labels: Optional[Mapping[str, str]],
    timeout: Optional[DurationLike],
    max_attempts: int,
    name: str,
    secret_env: Optional[Mapping[str, str]] = None,
    traceparent: str = "",
    tracestate: str = "",
) -> common_pb2.TaskSpec:
    if traceparent:
        spec.trace.CopyFrom(common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate))
    spec.slots = slots
    spec.secret_env.update(dict(secret_env or {}))
    spec.labels.update(dict(labels or {}))
    if timeout is not None:
        spec.timeout.CopyFrom(duration_to_pb(timeout))
    spec.max_attempts = max_attempts
    spec.name = name
    return spec


#: Stands for "no JSON input given" (``None`` is JSON's ``null``).
NO_JSON: Any = object()


def call_spec(
    handler: str,
    input: Union[bytes, str, None] = b"",
    *,
    json: Any = NO_JSON,
    slots: int = 0,
    labels: Optional[Mapping[str, str]] = None,
    timeout: Optional[DurationLike] = None,
    max_attempts: int = 0,
    name: str = "",
    secret_env: Optional[Mapping[str, str]] = None,
    schedule_timeout: Optional[DurationLike] = None,
    traceparent: str = "",
    tracestate: str = "",
    **policy: Any,
) -> common_pb2.TaskSpec:
    """A task that calls the handler ``handler`` on a node with ``input`` bytes.

    ``policy``: dependencies, start time, priority, fair key, concurrency key,
    rate limits, resources (:func:`weft.policy.apply_policy`: ``priority=``,
    ``fair_key=``, ``after=``, ``delay=``, ``resources=``, ...); a bad value
    is a ValueError naming the option.

    ``traceparent``/``tracestate``: the W3C trace context to continue (the
    task's spans and the handler's become part of that trace); without it
    the client uses the current OpenTelemetry span, if any (see
    :mod:`weft.tracing`).

    ``secret_env`` (name -> value) reaches only the node running the attempt
    (the handler reads it as ``ctx.secret_env``); no rpc answer ever shows it.
    ``schedule_timeout``: how long the call may wait while no connected node
    serves ``handler`` (a worker restarting) before it fails; 0 waits forever;
    unset, the coordinator's ``--schedule-timeout``.
    ``json``: the input as a JSON value instead of ``input`` (for a handler
    registered with ``codec="json"``); TypeError with both, or with a value
    JSON cannot encode.
    """
    if json is not NO_JSON:
        if input not in (b"", "", None):
            raise TypeError("give the input as `input` (bytes) or as `json`, not both")
        input = _json.dumps(json).encode()
    spec = common_pb2.TaskSpec(call=common_pb2.CallSpec(handler=handler, input=_to_bytes(input)))
    if schedule_timeout is not None:
        spec.schedule_timeout.CopyFrom(duration_to_pb(schedule_timeout))
    if policy:
        apply_policy(spec, **policy)
    return _common(spec, slots, labels, timeout, max_attempts, name, secret_env, traceparent, tracestate)


def exec_spec(
    argv: Sequence[str],
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: str = "",
    stdin: Union[bytes, str, None] = b"",
    slots: int = 0,
    labels: Optional[Mapping[str, str]] = None,
    timeout: Optional[DurationLike] = None,
    max_attempts: int = 0,
    name: str = "",
    secret_env: Optional[Mapping[str, str]] = None,
    traceparent: str = "",
    tracestate: str = "",
    **policy: Any,
) -> common_pb2.TaskSpec:
    """A task that runs ``argv`` as a child process on a node.

    ``policy``: as for :func:`call_spec`. With ``after``, the process finds
    its parents' results through ``$WEFT_PARENTS`` and may leave its own
    output in ``$WEFT_OUTPUT`` (``proto/README.md`` "Dependencies").

    ``traceparent``/``tracestate``: as for :func:`call_spec`; the process
    gets its attempt's context as ``TRACEPARENT``/``TRACESTATE``.

    ``secret_env`` (name -> value) is added to the process's environment after
    ``env`` (a secret wins over a plain value of the same name); it reaches
    only the node running the attempt, and no rpc answer ever shows it.
    """
    if isinstance(argv, str):
        raise TypeError("argv must be a list of strings, e.g. ['sh', '-c', 'echo hi']")
    spec = common_pb2.TaskSpec(
        exec=common_pb2.ExecSpec(argv=list(argv), env=dict(env or {}), cwd=cwd, stdin=_to_bytes(stdin))
    )
    if policy:
        apply_policy(spec, **policy)
    return _common(spec, slots, labels, timeout, max_attempts, name, secret_env, traceparent, tracestate)


def _time(ts) -> Optional[_dt.datetime]:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=_dt.timezone.utc)


@dataclass
class Attempt:
    """One attempt of a task (``weft.v1.Attempt``): where it ran, when, how it ended.

    ``started_at`` is None if it never started, ``ended_at`` while it is on its
    node; ``outcome`` is how its node reported it ended (``"succeeded"``,
    ``"failed"``, ``"cancelled"``, ``"timed_out"``, ``"start_failed"``), None
    while it runs or when it ended with no report (lost with its node, taken
    back: ``reason`` says why).
    """

    number: int
    node_id: str
    node_name: str
    assigned_at: Optional[_dt.datetime]
    started_at: Optional[_dt.datetime]
    ended_at: Optional[_dt.datetime]
    outcome: Optional[str]
    exit_code: Optional[int]
    reason: str

    @classmethod
    def from_pb(cls, attempt: task_pb2.Attempt) -> "Attempt":
        outcome = None
        if attempt.outcome:
            name = common_pb2.Outcome.Name(attempt.outcome) if attempt.outcome in common_pb2.Outcome.values() else ""
            outcome = name[len("OUTCOME_"):].lower() or None
        return cls(
            number=attempt.number,
            node_id=attempt.node_id,
            node_name=attempt.node_name,
            assigned_at=_time(attempt.assigned_at if attempt.HasField("assigned_at") else None),
            started_at=_time(attempt.started_at if attempt.HasField("started_at") else None),
            ended_at=_time(attempt.ended_at if attempt.HasField("ended_at") else None),
            outcome=outcome,
            exit_code=attempt.exit_code if attempt.HasField("exit_code") else None,
            reason=attempt.reason,
        )

    @property
    def duration(self) -> Optional[_dt.timedelta]:
        """How long it ran (so far, while it runs); None if it never started."""
        if self.started_at is None:
            return None
        end = self.ended_at or _dt.datetime.now(_dt.timezone.utc)
        return end - self.started_at


@dataclass
class Task:
    """A task's record (``weft.v1.Task``).

    ``attempts`` lists its attempts oldest first (the latest 100); the last is
    the current one while the task is on a node.
    """

    id: str
    state: TaskState
    attempt: int
    node_id: str
    node_name: str
    exit_code: Optional[int]
    output: bytes
    error: str
    pending_reason: str
    failures: int
    node_losses: int
    next_seq: int
    created_at: Optional[_dt.datetime]
    updated_at: Optional[_dt.datetime]
    pb: task_pb2.Task = field(repr=False)
    attempts: List[Attempt] = field(default_factory=list)
    #: The job (Submit) it belongs to: that Submit's first task's id.
    job_id: str = ""
    #: While PENDING: the ids of the tasks it runs after that are not final yet.
    waiting_for: List[str] = field(default_factory=list)

    @classmethod
    def from_pb(cls, task: task_pb2.Task) -> "Task":
        return cls(
            id=task.id,
            state=TaskState.from_pb(task.state),
            attempt=task.attempt,
            node_id=task.node_id,
            node_name=task.node_name,
            exit_code=task.exit_code if task.HasField("exit_code") else None,
            output=bytes(task.output),
            error=task.error,
            pending_reason=task.pending_reason,
            failures=task.failures,
            node_losses=task.node_losses,
            next_seq=task.next_seq,
            created_at=_time(task.created_at if task.HasField("created_at") else None),
            updated_at=_time(task.updated_at if task.HasField("updated_at") else None),
            pb=task,
            attempts=[Attempt.from_pb(a) for a in task.attempts],
            job_id=task.job_id,
            waiting_for=list(task.waiting_for),
        )

    @property
    def ref(self) -> str:
        """The task's ``ref`` in its graph ("" if none)."""
        return self.pb.spec.ref

    @property
    def spec(self) -> common_pb2.TaskSpec:
        """The task's spec as submitted, less ``secret_env``, which no answer carries."""
        return self.pb.spec

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    @property
    def succeeded(self) -> bool:
        return self.state == TaskState.SUCCEEDED

    def json(self) -> Any:
        """The output decoded from JSON (a ``codec="json"`` handler's result); ValueError if it is not JSON."""
        return _json.loads(self.output)


@dataclass
class TaskEvent:
    """One event of a task's history (``weft.v1.TaskEvent``).

    ``kind`` is ``"state"``, ``"output"``, ``"progress"`` or ``"finished"``;
    the fields of the other kinds are left at their defaults.
    """

    task_id: str
    seq: int
    attempt: int
    kind: str
    time: Optional[_dt.datetime] = None
    # kind == "state"
    state: Optional[TaskState] = None
    node_name: str = ""
    reason: str = ""
    # kind == "output"
    stream: Optional[OutputStream] = None
    data: bytes = b""
    # kind == "progress"
    fraction: float = 0.0
    message: str = ""
    # kind == "finished"
    task: Optional[Task] = None
    pb: Optional[task_pb2.TaskEvent] = field(default=None, repr=False)

    @classmethod
    def from_pb(cls, event: task_pb2.TaskEvent) -> "TaskEvent":
        kind = event.WhichOneof("body") or "unknown"
        out = cls(
            task_id=event.task_id,
            seq=event.seq,
            attempt=event.attempt,
            kind=kind,
            time=_time(event.time if event.HasField("time") else None),
            pb=event,
        )
        if kind == "state":
            out.state = TaskState.from_pb(event.state.state)
            out.node_name = event.state.node_name
            out.reason = event.state.reason
        elif kind == "output":
            out.stream = OutputStream.from_pb(event.output.stream)
            out.data = bytes(event.output.data)
        elif kind == "progress":
            out.fraction = event.progress.fraction
            out.message = event.progress.message
        elif kind == "finished":
            out.task = Task.from_pb(event.finished)
        return out


@dataclass
class NodeInfo:
    """One node as the coordinator sees it (``weft.v1.NodeInfo``)."""

    id: str
    name: str
    labels: Dict[str, str]
    slots: int
    slots_used: int
    slots_free: int
    running: List[Tuple[str, int]]
    last_heartbeat_age: float
    state: NodeState
    handlers: List[str]
    finished: int
    pb: admin_pb2.NodeInfo = field(repr=False)
    #: The resources it declared (``--resource``), and how much of each is free now.
    resources: Dict[str, int] = field(default_factory=dict)
    resources_free: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, node: admin_pb2.NodeInfo) -> "NodeInfo":
        return cls(
            id=node.node_id,
            name=node.name,
            labels=dict(node.labels),
            slots=node.slots,
            slots_used=node.slots_used,
            slots_free=node.slots_free,
            running=[(ref.task_id, ref.attempt) for ref in node.running],
            last_heartbeat_age=duration_from_pb(node.last_heartbeat_age),
            state=NodeState.from_pb(node.state),
            handlers=list(node.handlers),
            finished=node.finished,
            pb=node,
            resources=dict(node.resources),
            resources_free=dict(node.resources_free),
        )


@dataclass
class ClusterInfo:
    """Cluster-wide figures (``weft.v1.ClusterInfoResponse``)."""

    version: str
    nodes: int
    slots: int
    slots_free: int
    tasks: Dict[TaskState, int]
    uptime: float
    stale_events_refused: int
    nodes_lost: int
    pb: admin_pb2.ClusterInfoResponse = field(repr=False)

    @classmethod
    def from_pb(cls, info: admin_pb2.ClusterInfoResponse) -> "ClusterInfo":
        return cls(
            version=info.version,
            nodes=info.nodes,
            slots=info.slots,
            slots_free=info.slots_free,
            tasks={TaskState.from_pb(c.state): c.count for c in info.tasks},
            uptime=duration_from_pb(info.uptime),
            stale_events_refused=info.stale_events_refused,
            nodes_lost=info.nodes_lost,
            pb=info,
        )
