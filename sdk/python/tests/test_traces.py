"""Traces: a handler sees its attempt's W3C trace context, and the client
continues the caller's trace (an explicit ``traceparent=``, else the current
OpenTelemetry span)."""

from __future__ import annotations

import pytest

import weft
from weft import tracing
from weft._proto import common_pb2

from test_e2e import Cluster

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def cluster(spawn, tmp_path):
    c = Cluster(spawn, tmp_path)
    yield c
    c.client.close()


def _worker(cluster: Cluster, name: str):
    from test_worker import RunningWorker
    import handlers

    worker = weft.Worker(cluster.url, slots=2, name=name, labels={"lang": name}, exec="allow",
                         ca_file=cluster.ca_file, **cluster.join_kwargs(name))

    @worker.handler(kind="thread")
    def trace_thread(data: bytes, ctx: weft.Context) -> str:
        return f"{ctx.traceparent} {ctx.tracestate}".strip()

    worker.handler(kind="process", name="trace_process")(handlers.trace_of)
    return RunningWorker(worker)


def test_a_python_handler_sees_the_trace_context_it_runs_under(cluster):
    running = _worker(cluster, "py-trace")
    try:
        cluster.wait_nodes("py-trace")
        for handler in ("trace_thread", "trace_process"):
            # Without trace export the client's context reaches the handler unchanged.
            out = cluster.client.call(handler, traceparent=PARENT, tracestate="k=v", wait_timeout=30)
            assert out == f"{PARENT} k=v".encode(), handler
            assert cluster.client.call(handler, wait_timeout=30) == b"", "no trace, none made up"
        # An exec task on the Python worker: TRACEPARENT in its environment.
        echo = ["sh", "-c", 'printf "%s %s" "$TRACEPARENT" "$TRACESTATE"']
        task = cluster.client.exec(echo, labels={"lang": "py-trace"}, traceparent=PARENT, tracestate="k=v",
                                   wait_timeout=30)
        assert b"".join(data for _, data in cluster.client.output(task.id)) == f"{PARENT} k=v".encode()
    finally:
        running.stop()


def test_an_explicit_traceparent_wins_and_the_callers_spec_is_not_changed():
    spec = weft.call_spec("echo", b"x")
    [sent] = tracing.traced([spec], PARENT, "a=b")
    assert sent.trace.traceparent == PARENT and sent.trace.tracestate == "a=b"
    assert not spec.HasField("trace")
    own = weft.call_spec("echo", b"x", traceparent=PARENT)
    assert tracing.traced([own])[0].trace.traceparent == PARENT


def test_the_client_injects_the_current_opentelemetry_span(cluster):
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace

    tracer = sdk_trace.TracerProvider().get_tracer("weft-tests")
    running = _worker(cluster, "py-otel")
    try:
        cluster.wait_nodes("py-otel")
        with tracer.start_as_current_span("caller") as span:
            out = cluster.client.call("trace_thread", wait_timeout=30).decode()
            ctx = span.get_span_context()
        # (The flags may carry W3C level 2's "random" bit beside "sampled".)
        assert out.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
        # A handler's helper: its spans join the task's trace.
        joined = trace.get_current_span(tracing.otel_context(out)).get_span_context()
        assert (joined.trace_id, joined.span_id) == (ctx.trace_id, ctx.span_id)
        with tracer.start_as_current_span("child", context=tracing.otel_context(out)) as child:
            assert child.get_span_context().trace_id == ctx.trace_id
            assert child.parent.span_id == ctx.span_id
    finally:
        running.stop()


def test_a_malformed_traceparent_is_refused_naming_the_field(cluster):
    with pytest.raises(weft.InvalidArgument) as refused:
        cluster.client.submit(common_pb2.TaskSpec(call=common_pb2.CallSpec(handler="noop")), traceparent="00-nope")
    assert "trace.traceparent" in str(refused.value)
