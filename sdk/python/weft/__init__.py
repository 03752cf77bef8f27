"""Python SDK for Weft, a gRPC-native task fabric.

- :class:`Client` / :class:`weft.aio.Client`: submit ``exec`` and ``call``
  tasks, wait, stream events and output, cancel, list nodes.
- :class:`Worker`: serve Python functions (``asyncio``, ``thread`` or
  ``process`` handlers) to a coordinator over the node protocol.
- :class:`Executor` / :class:`weft.aio.Executor`: ``concurrent.futures``-style
  executors over Weft, for handlers by name and module-level Python functions.
- Typed errors (:class:`WeftError` and subclasses) mapped from gRPC codes.

The generated ``weft.v1`` stubs live in ``weft._proto`` (``node_pb2``,
``task_pb2``, ... and their ``*_pb2_grpc`` services).
"""

from ._channel import PinMismatch
from .client import Client
from .executor import AsyncExecutor, Executor, RemoteTraceback
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TaskCancelled,
    TaskFailed,
    TaskSkipped,
    TaskTimedOut,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UpstreamFailed,
    WeftError,
)
from .models import (
    Attempt,
    ClusterInfo,
    NodeInfo,
    NodeState,
    OutputStream,
    Task,
    TaskEvent,
    TaskState,
    call_spec,
    exec_spec,
    parse_duration,
    parse_label,
)
from .policy import Ref
from .worker import PROTOCOL_VERSION, Context, HandlerError, ParentResult, Worker
from .workflow import Job, JobCancelled, LimitInfo, Schedule

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "AsyncExecutor", "Attempt", "Cancelled", "Client", "ClusterInfo", "Context", "DeadlineExceeded", "Executor",
    "FailedPrecondition", "HandlerError", "Internal", "InvalidArgument", "Job", "JobCancelled", "LimitInfo", "NodeInfo",
    "NodeState", "NotFound", "OutputStream", "PROTOCOL_VERSION", "ParentResult", "PermissionDenied", "PinMismatch", "Ref",
    "RemoteTraceback", "ResourceExhausted", "Schedule", "Task", "TaskCancelled", "TaskEvent", "TaskFailed",
    "TaskSkipped", "TaskState", "TaskTimedOut", "Unauthenticated", "Unavailable", "Unimplemented", "UpstreamFailed",
    "WeftError", "Worker", "call_spec", "exec_spec", "parse_duration", "parse_label",
]
