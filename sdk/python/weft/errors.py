"""Typed errors: gRPC status codes mapped to exception classes.

Every client call raises a subclass of :class:`WeftError` instead of a bare
``grpc.RpcError``; the class says what went wrong, ``code`` keeps the gRPC
status code and ``details`` the server's message. Task outcomes are separate:
:class:`TaskFailed` (and its subclasses) is raised by the convenience calls
that wait for a task's result when the task did not succeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import grpc

if TYPE_CHECKING:  # pragma: no cover
    from .models import Task


class WeftError(Exception):
    """Base class of every error the Weft SDK raises."""

    #: The gRPC status code this error stands for (None for local errors).
    code: Optional[grpc.StatusCode] = None

    def __init__(self, details: str = "", code: Optional[grpc.StatusCode] = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def is_retryable(self) -> bool:
        """Whether the same call may succeed if simply tried again later."""
        return self.code in _RETRYABLE


class Unavailable(WeftError, ConnectionError):
    """The coordinator cannot be reached, or the connection was lost."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(WeftError, TimeoutError):
    """The call did not finish within its deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InvalidArgument(WeftError):
    """A bad request: e.g. a task spec the coordinator refuses."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(WeftError):
    """No such task or node."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(WeftError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(WeftError):
    """The coordinator's queue is full; nothing was committed, retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(WeftError):
    """The request does not fit the current state (e.g. cancel a finished task)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(WeftError):
    """Missing or bad credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(WeftError):
    """Not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(WeftError):
    """The call itself was cancelled (not to be confused with a cancelled task)."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(WeftError):
    """The server does not implement this call."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(WeftError):
    """A bug on the server side (INTERNAL, UNKNOWN, DATA_LOSS, ...)."""

    code = grpc.StatusCode.INTERNAL


_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

_BY_CODE = {
    cls.code: cls
    for cls in (
        Unavailable,
        DeadlineExceeded,
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def from_status(code: grpc.StatusCode, details: str = "") -> WeftError:
    """The typed error for a gRPC status code (unknown codes map to Internal)."""
    cls = _BY_CODE.get(code, Internal)
    return cls(details or (code.name if code else ""), code)


def from_rpc_error(error: grpc.RpcError) -> WeftError:
    """Converts a ``grpc.RpcError`` (sync or asyncio) into its typed error."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return from_status(code, details or "")


class TaskFailed(WeftError):
    """A task ended in a state other than SUCCEEDED.

    ``task`` is the final :class:`weft.Task` (state, error, exit code, output).
    """

    def __init__(self, task: "Task"):
        message = f"task {task.id} {task.state.lower()}"
        if task.error:
            message += f": {task.error}"
        if task.exit_code is not None:
            message += f" (exit code {task.exit_code})"
        super().__init__(message)
        self.task = task


class TaskCancelled(TaskFailed):
    """The task ended CANCELLED."""


class TaskTimedOut(TaskFailed):
    """The task ended TIMED_OUT."""


class UpstreamFailed(TaskFailed):
    """The task ended UPSTREAM_FAILED without running: a task it runs after did
    not end as its dependency rule needs (e.g. failed, under "all_succeeded").

    :class:`weft.Executor` also raises it, with ``task`` None, for a call never
    submitted because a future it depends on failed before it was (its
    Submit refused, or the future cancelled first)."""

    def __init__(self, task: Optional["Task"] = None, message: str = ""):
        if task is not None:
            super().__init__(task)
            return
        WeftError.__init__(self, message)
        self.task = None


class TaskSkipped(TaskFailed):
    """The task ended SKIPPED without running (``after_rule="any_failed"``, and all its
    parents succeeded): not a failure, but there is no result."""


def task_error(task: "Task") -> TaskFailed:
    """The TaskFailed subclass for a final, unsuccessful task."""
    if task.state == "UPSTREAM_FAILED":
        return UpstreamFailed(task)
    if task.state == "SKIPPED":
        return TaskSkipped(task)
    if task.state == "CANCELLED":
        return TaskCancelled(task)
    if task.state == "TIMED_OUT":
        return TaskTimedOut(task)
    return TaskFailed(task)
