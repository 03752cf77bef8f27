"""W3C trace context for tasks: the client continues the caller's trace,
a handler joins the task's.

A task carries a ``TraceContext`` (``traceparent``, ``tracestate``). The
client sets it on submit: an explicit ``traceparent=`` wins; else, when the
``opentelemetry`` package is importable and a span is current, that span's
context; else none. The node hands each attempt its own context (the
attempt's span is the parent when the coordinator exports traces): an exec
process gets ``TRACEPARENT``/``TRACESTATE`` in its environment, a handler
``ctx.traceparent``/``ctx.tracestate``, and ``ctx.otel_context()`` turns them
into an OpenTelemetry ``Context`` for
``tracer.start_as_current_span(name, context=ctx.otel_context())``.

``opentelemetry`` is optional: nothing here imports it until it is used,
and without it the plain strings still travel.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

from ._proto import common_pb2


def current_traceparent() -> Optional[Tuple[str, str]]:
    """``(traceparent, tracestate)`` of the current OpenTelemetry span, or
    None (no ``opentelemetry`` package, or no valid span is current)."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict = {}
    TraceContextTextMapPropagator().inject(carrier)
    traceparent = carrier.get("traceparent")
    if not traceparent:
        return None
    return traceparent, carrier.get("tracestate", "")


def traced(
    specs: Iterable[common_pb2.TaskSpec], traceparent: Optional[str] = None, tracestate: Optional[str] = None
) -> List[common_pb2.TaskSpec]:
    """``specs`` as submitted: with ``traceparent`` when given (it wins);
    else each keeps the trace it has, and one without gets the current
    OpenTelemetry span's context, if any. A spec that changes is copied,
    never the caller's changed."""
    specs = list(specs)
    if traceparent:
        trace = common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate or "")
    else:
        current = current_traceparent()
        if current is None:
            return specs
        trace = common_pb2.TraceContext(traceparent=current[0], tracestate=current[1])
    out = []
    for spec in specs:
        if traceparent or not spec.HasField("trace"):
            copy = common_pb2.TaskSpec()
            copy.CopyFrom(spec)
            copy.trace.CopyFrom(trace)
            spec = copy
        out.append(spec)
    return out


def otel_context(traceparent: str, tracestate: str = "") -> Any:
    """An OpenTelemetry ``Context`` whose remote parent is ``traceparent``
    (the current context unchanged when it is empty). Raises ImportError
    without the ``opentelemetry`` package."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent} if traceparent else {}
    if traceparent and tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


class TracedContext:
    """What a handler's context knows of the trace its attempt runs under."""

    #: The attempt's W3C ``traceparent`` ("" when the task has no trace).
    traceparent: str = ""
    #: Its ``tracestate`` (often "").
    tracestate: str = ""

    def otel_context(self) -> Any:
        """An OpenTelemetry ``Context`` in the task's trace, for
        ``tracer.start_as_current_span(name, context=ctx.otel_context())``:
        the handler's spans become children of the attempt's span. Needs the
        ``opentelemetry-api`` package (ImportError without it)."""
        return otel_context(self.traceparent, self.tracestate)
