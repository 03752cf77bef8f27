"""The client against a scripted TaskService/AdminService: typed errors, conversions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from concurrent import futures

import grpc
import pytest

import weft
import weft.aio
from weft._proto import admin_pb2, admin_pb2_grpc, common_pb2, task_pb2, task_pb2_grpc
from weft.errors import from_status


def _task(task_id: str, state: int, **fields) -> task_pb2.Task:
    return task_pb2.Task(id=task_id, state=state, **fields)


class Tasks(task_pb2_grpc.TaskServiceServicer):
    def __init__(self):
        self.submitted = []

    def Submit(self, request, context):
        if len(request.tasks) > 2:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        for spec in request.tasks:
            if spec.WhichOneof("kind") == "exec" and not spec.exec.argv:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "exec argv must not be empty")
        self.submitted += list(request.tasks)
        return task_pb2.SubmitResponse(task_ids=[f"T{i}" for i in range(len(request.tasks))])

    def Get(self, request, context):
        if request.task_id == "T0":
            return task_pb2.GetResponse(task=_task("T0", common_pb2.TASK_STATE_RUNNING, next_seq=2))
        if request.task_id == "T1":
            return task_pb2.GetResponse(task=_task("T1", common_pb2.TASK_STATE_FAILED, error="boom", exit_code=3))
        context.abort(grpc.StatusCode.NOT_FOUND, f"no task {request.task_id}")

    def Watch(self, request, context):
        assert request.from_seq in (0, 2)
        events = [
            task_pb2.TaskEvent(task_id="T0", seq=0, state=task_pb2.StateChanged(state=common_pb2.TASK_STATE_QUEUED)),
            task_pb2.TaskEvent(task_id="T0", seq=1, attempt=1, state=task_pb2.StateChanged(state=common_pb2.TASK_STATE_RUNNING, node_name="n1")),
            task_pb2.TaskEvent(task_id="T0", seq=2, attempt=1, output=task_pb2.TaskOutput(stream=common_pb2.OUTPUT_STREAM_STDERR, data=b"oops")),
            task_pb2.TaskEvent(task_id="T0", seq=3, attempt=1, progress=task_pb2.TaskProgress(fraction=0.5, message="half")),
            task_pb2.TaskEvent(
                task_id="T0", seq=4, attempt=1,
                finished=_task("T0", common_pb2.TASK_STATE_SUCCEEDED, output=b"done", attempt=1, node_name="n1"),
            ),
        ]
        yield from events[request.from_seq:]

    def Cancel(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "task T1 already finished")

    def List(self, request, context):
        # As a coordinator whose bounded scan found nothing on its first page.
        self.list_requests = getattr(self, "list_requests", []) + [request]
        if not request.page_token:
            return task_pb2.ListResponse(next_page_token="T9")
        task = _task("T9", common_pb2.TASK_STATE_SUCCEEDED, attempt=2)
        lost = task.attempts.add(number=1, node_id="N1", node_name="n1", reason="node n1 lost; retrying as attempt 2")
        lost.assigned_at.FromSeconds(100)
        lost.ended_at.FromSeconds(103)
        ran = task.attempts.add(number=2, node_id="N2", node_name="n2", outcome=common_pb2.OUTCOME_SUCCEEDED, exit_code=0)
        ran.assigned_at.FromSeconds(104)
        ran.started_at.FromSeconds(105)
        ran.ended_at.FromSeconds(107)
        return task_pb2.ListResponse(tasks=[task])

    def WaitMany(self, request, context):
        # A coordinator from before WaitManyBatches: one record per message (and no
        # WaitManyBatches: this servicer leaves it UNIMPLEMENTED).
        self.wait_many_calls = getattr(self, "wait_many_calls", 0) + 1
        self.views = getattr(self, "views", []) + [request.view]
        for task_id in reversed(request.task_ids):
            yield _task(task_id, common_pb2.TASK_STATE_SUCCEEDED, output=task_id.encode())


class Admin(admin_pb2_grpc.AdminServiceServicer):
    def ListNodes(self, request, context):
        node = admin_pb2.NodeInfo(node_id="N1", name="n1", slots=4, slots_free=3, handlers=["echo"], state=admin_pb2.NODE_STATE_READY)
        node.labels["gpu"] = "1"
        node.running.add(task_id="T0", attempt=2)
        node.last_heartbeat_age.FromTimedelta(dt.timedelta(milliseconds=250))
        return admin_pb2.ListNodesResponse(nodes=[node])

    def DrainNode(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no node {request.node}")


@pytest.fixture
def server():
    srv = grpc.server(futures.ThreadPoolExecutor(8))
    tasks = Tasks()
    task_pb2_grpc.add_TaskServiceServicer_to_server(tasks, srv)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"http://127.0.0.1:{port}", tasks
    srv.stop(0)


def test_grpc_codes_become_typed_errors():
    assert isinstance(from_status(grpc.StatusCode.NOT_FOUND, "x"), weft.NotFound)
    assert isinstance(from_status(grpc.StatusCode.UNAVAILABLE), ConnectionError)
    assert isinstance(from_status(grpc.StatusCode.DEADLINE_EXCEEDED), TimeoutError)
    assert isinstance(from_status(grpc.StatusCode.DATA_LOSS), weft.Internal)
    assert from_status(grpc.StatusCode.RESOURCE_EXHAUSTED).is_retryable()
    assert not from_status(grpc.StatusCode.INVALID_ARGUMENT).is_retryable()


def test_durations_parse_like_the_rust_side():
    assert weft.parse_duration("250ms") == 0.25
    assert weft.parse_duration("1m30s") == 90
    assert weft.parse_duration("1.5") == 1.5
    assert weft.parse_duration(dt.timedelta(seconds=2)) == 2
    for bad in ("soon", "-1", "", "5 parsecs"):
        with pytest.raises(ValueError):
            weft.parse_duration(bad)


def test_specs_carry_every_option():
    spec = weft.exec_spec(["sh", "-c", "true"], env={"A": "1"}, cwd="/tmp", stdin="in", slots=2,
                          labels={"gpu": "1"}, timeout="1.5s", max_attempts=5, name="n")
    assert list(spec.exec.argv) == ["sh", "-c", "true"] and spec.exec.stdin == b"in"
    assert (spec.slots, dict(spec.labels), spec.max_attempts, spec.name) == (2, {"gpu": "1"}, 5, "n")
    assert (spec.timeout.seconds, spec.timeout.nanos) == (1, 500_000_000)
    with pytest.raises(TypeError):
        weft.exec_spec("sh -c true")
    assert weft.call_spec("echo", "hi").call.input == b"hi"
    waits = weft.call_spec("echo", schedule_timeout="2m")
    assert waits.HasField("schedule_timeout") and waits.schedule_timeout.seconds == 120
    assert not weft.call_spec("echo").HasField("schedule_timeout")
    forever = weft.call_spec("echo", schedule_timeout=0)
    assert forever.HasField("schedule_timeout") and forever.schedule_timeout.seconds == 0


def test_sync_client_maps_errors_and_converts_results(server):
    url, tasks = server
    with weft.Client(url) as client:
        assert client.submit_call("echo", b"x") == "T0"
        with pytest.raises(weft.ResourceExhausted, match="queue full"):
            client.submit_many([weft.call_spec("echo")] * 3)
        with pytest.raises(weft.InvalidArgument):
            client.submit(weft.exec_spec([]))
        with pytest.raises(weft.NotFound):
            client.get("nope")
        with pytest.raises(weft.FailedPrecondition):
            client.cancel("T1")
        with pytest.raises(weft.NotFound):
            client.drain("ghost")
        events = list(client.watch("T0"))
        assert [e.kind for e in events] == ["state", "state", "output", "progress", "finished"]
        assert events[1].state == weft.TaskState.RUNNING and events[1].node_name == "n1"
        assert (events[2].stream, events[2].data) == (weft.OutputStream.STDERR, b"oops")
        assert (events[3].fraction, events[3].message) == (0.5, "half")
        assert list(client.output("T0")) == [(weft.OutputStream.STDERR, b"oops")]
        task = client.wait("T0", timeout=5)  # Get says RUNNING, Watch from next_seq finishes it
        assert task.state == "SUCCEEDED" and task.output == b"done" and task.is_final
        failed = client.get("T1")
        assert failed.exit_code == 3 and failed.error == "boom"
        [node] = client.nodes()
        assert (node.name, node.labels, node.running, node.state) == ("n1", {"gpu": "1"}, [("T0", 2)], weft.NodeState.READY)
        assert node.last_heartbeat_age == pytest.approx(0.25)


def test_list_sends_its_filters_pages_past_empty_pages_and_shows_attempts(server):
    url, tasks = server
    since = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with weft.Client(url) as client:
        [task] = client.list("SUCCEEDED", 5, labels={"zone": "a"}, name="resize", node="n2", since=since, until="10m")
        with pytest.raises(ValueError, match="key"):
            client.list(labels={"": "a"})
    first, second = tasks.list_requests
    assert (first.page_token, second.page_token) == ("", "T9")
    assert first.state == common_pb2.TASK_STATE_SUCCEEDED and first.limit == 5
    assert (dict(first.labels), first.name, first.node) == ({"zone": "a"}, "resize", "n2")
    assert first.since.ToDatetime() == dt.datetime(2026, 5, 1, 10, 0)
    ago = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - first.until.ToDatetime()
    assert dt.timedelta(minutes=9) < ago < dt.timedelta(minutes=11)
    assert second.name == "resize", "the next page keeps the filters"
    lost, ran = task.attempts
    assert (lost.number, lost.node_name, lost.outcome, lost.started_at) == (1, "n1", None, None)
    assert "lost" in lost.reason and lost.duration is None
    assert (ran.number, ran.node_name, ran.outcome, ran.exit_code) == (2, "n2", "succeeded", 0)
    assert ran.duration == dt.timedelta(seconds=2)
    assert isinstance(ran, weft.Attempt)


def test_asyncio_list_pages_with_the_same_filters(server):
    url, tasks = server

    async def main():
        async with weft.aio.Client(url) as client:
            return await client.list(name="resize")

    [task] = asyncio.run(main())
    assert [a.number for a in task.attempts] == [1, 2]
    assert [r.name for r in tasks.list_requests] == ["resize", "resize"]


def test_call_raises_task_failed_with_the_final_task(server):
    url, _ = server

    class Failing(weft.Client):
        def submit(self, spec):
            return "T1"

    with Failing(url) as client, pytest.raises(weft.TaskFailed) as info:
        client.call("fail", b"boom")
    assert info.value.task.error == "boom" and "exit code 3" in str(info.value)


def test_asyncio_client_watches_with_async_for(server):
    url, _ = server

    async def scenario():
        async with weft.aio.Client(url) as client:
            kinds = [event.kind async for event in client.watch("T0")]
            assert kinds == ["state", "state", "output", "progress", "finished"]
            assert (await client.wait("T0", timeout=5)).output == b"done"
            with pytest.raises(weft.NotFound):
                await client.get("nope")
            assert [n.name for n in await client.nodes()] == ["n1"]

    asyncio.run(scenario())


def test_an_unreachable_coordinator_is_unavailable_within_seconds():
    import time

    started = time.monotonic()
    with weft.Client("http://127.0.0.1:9") as client, pytest.raises(weft.Unavailable):
        client.get("T0")
    assert time.monotonic() - started < 5


def test_addresses_take_every_form_and_refuse_garbage_naming_the_forms():
    from weft._channel import DEFAULT_SCHEME, parse_target

    assert DEFAULT_SCHEME == "https"
    assert parse_target("http://10.0.0.5:7070") == ("10.0.0.5:7070", False)
    assert parse_target("https://weft.example.com:443") == ("weft.example.com:443", True)
    assert parse_target("127.0.0.1:7070") == ("127.0.0.1:7070", True)
    assert parse_target("localhost:7070") == ("localhost:7070", True)
    assert parse_target("[::1]:7070") == ("[::1]:7070", True)
    assert parse_target(" HTTP://node-1.lan:7070/ ") == ("node-1.lan:7070", False)
    for bad in ["", "x", "localhost", "http://localhost", "127.0.0.1:", ":7070", "127.0.0.1:0",
                "127.0.0.1:65536", "127.0.0.1:70x", "::1:7070", "[::1]", "[nope]:7070",
                "grpc://c:7070", "http://c:7070/api", "http://user@c:7070", "c :7070"]:
        with pytest.raises(ValueError) as err:
            parse_target(bad)
        assert str(err.value) == f"invalid coordinator address '{bad}': expected HOST:PORT or http(s)://HOST:PORT"


def test_clients_and_workers_refuse_a_malformed_address_when_made():
    for make in (weft.Client, weft.aio.Client, weft.Worker):
        with pytest.raises(ValueError, match="invalid coordinator address 'nope'"):
            make("nope")


def test_http_with_a_ca_or_pin_is_refused_and_a_token_over_it_warned(monkeypatch, recwarn):
    from weft._channel import PlaintextTokenWarning

    monkeypatch.delenv("WEFT_CA", raising=False)
    monkeypatch.delenv("WEFT_CA_PIN", raising=False)
    pin = "sha256:" + "ab" * 32
    for kwargs in [{"ca_file": "ca.pem"}, {"ca_pin": pin}]:
        with pytest.raises(ValueError, match="dial https://127.0.0.1:9"):
            weft.Client("http://127.0.0.1:9", **kwargs)
        with pytest.raises(ValueError, match="dial https://127.0.0.1:9"):
            weft.aio.Client("http://127.0.0.1:9", **kwargs)
    monkeypatch.setenv("WEFT_CA", "ca.pem")
    with pytest.raises(ValueError, match="CA or pin"):
        weft.Client("http://127.0.0.1:9")
    monkeypatch.delenv("WEFT_CA")

    # Plaintext without a token: no warning; with one: a warning.
    weft.Client("http://127.0.0.1:9", token="").close()
    assert not [w for w in recwarn if issubclass(w.category, PlaintextTokenWarning)]
    with pytest.warns(PlaintextTokenWarning, match="plaintext http://127.0.0.1:9"):
        weft.Client("http://127.0.0.1:9", token="weft_x_y").close()


def test_wait_many_and_map_fall_back_to_wait_many_on_a_coordinator_without_batches(server):
    url, tasks = server
    with weft.Client(url) as client:
        assert sorted(t.id for t in client.wait_many(["A", "B", "C"])) == ["A", "B", "C"]
        assert list(client.map("echo", [b"x", b"y"])) == [b"T0", b"T1"], "results in input order"
    assert tasks.wait_many_calls == 2
    # wait_many answers whole tasks; map needs only the results, so the
    # inputs are not sent back.
    whole, results = task_pb2.TASK_VIEW_UNSPECIFIED, task_pb2.TASK_VIEW_RESULT
    assert tasks.views == [whole, results]

    async def scenario():
        async with weft.aio.Client(url) as client:
            assert sorted([t.id async for t in client.wait_many(["A", "B"])]) == ["A", "B"]
            assert [r async for r in client.map("echo", [b"x", b"y"])] == [b"T0", b"T1"]

    asyncio.run(scenario())
    assert tasks.wait_many_calls == 4
    assert tasks.views == [whole, results, whole, results]


def _refused_url() -> str:
    """An http:// address where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def tls_server():
    """The scripted TaskService over TLS, its certificate from a throw-away
    CA: ``(url, ca)``, where ``ca.pin`` pins it."""
    from weft.testing import TestCA

    ca = TestCA()
    srv = grpc.server(futures.ThreadPoolExecutor(8))
    task_pb2_grpc.add_TaskServiceServicer_to_server(Tasks(), srv)
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([ca.serving()]))
    srv.start()
    yield f"https://127.0.0.1:{port}", ca
    srv.stop(0)


@pytest.fixture
def ca_fetches(monkeypatch):
    """Fetches of a pinned CA, recorded by target; the first ``refuse`` of
    them fail as with the coordinator down (connection refused)."""
    import weft._channel as channel

    monkeypatch.delenv("WEFT_CA", raising=False)
    monkeypatch.delenv("WEFT_CA_PIN", raising=False)
    fetches = _Fetches()
    fetch = channel.fetch_pinned_ca

    def recorded(target, pin, timeout=5.0):
        fetches.append(target)
        if len(fetches) <= fetches.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        return fetch(target, pin, timeout)

    monkeypatch.setattr(channel, "fetch_pinned_ca", recorded)
    return fetches


class _Fetches(list):
    refuse = 0


async def test_the_asyncio_client_fetches_a_pinned_ca_again_after_a_failed_fetch(tls_server, ca_fetches):
    url, ca = tls_server
    ca_fetches.refuse = 1
    async with weft.aio.Client(url, ca_pin=ca.pin) as client:
        with pytest.raises(weft.Unavailable, match="cannot fetch the CA .* Connection refused"):
            await client.submit_call("echo", b"x")
        assert await client.submit_call("echo", b"x") == "T0", "the second call reaches the coordinator"
    assert len(ca_fetches) == 2

    # A wait resumes after a failed fetch as after a lost connection.
    ca_fetches[:], ca_fetches.refuse = [], 2
    async with weft.aio.Client(url, ca_pin=ca.pin) as client:
        assert sorted([t.id async for t in client.wait_many(["A", "B"], timeout=10)]) == ["A", "B"]
    assert len(ca_fetches) == 3


async def test_a_wrong_pin_fails_every_call_of_the_asyncio_client_and_is_checked_again_each_time(tls_server, ca_fetches):
    from weft._channel import PinMismatch

    url, _ = tls_server
    async with weft.aio.Client(url, ca_pin="sha256:" + "ab" * 32) as client:
        for _ in range(2):
            with pytest.raises(PinMismatch, match="is not the one the CA pin"):
                await client.submit_call("echo", b"x")
    assert len(ca_fetches) == 2, "a failed fetch is not kept: the next call fetches again"


def test_several_addresses_are_checked_and_the_first_that_answers_is_used(server):
    import time

    from weft._channel import first_reachable, parse_addresses

    url, _ = server
    assert parse_addresses(" https://a:1, b:2 ") == ["https://a:1", "b:2"]
    for bad in ["", "a:1,", "a:1,,b:2", "a:1,b"]:
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_addresses(bad)
    dead = _refused_url()
    started = time.monotonic()
    assert first_reachable([dead, url]) == url
    assert time.monotonic() - started < 2, "a refused connection moves on at once"
    assert first_reachable([dead]) == dead, "none answers: the first, whose calls fail UNAVAILABLE"
    with weft.Client(f"{dead},{url}") as client:
        assert client.submit_call("echo", b"x") == "T0"
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        weft.Client(f"{url},nope")


async def test_the_asyncio_client_takes_several_addresses_too(server):
    url, _ = server
    async with weft.aio.Client(f"{_refused_url()},{url}") as client:
        assert await client.submit_call("echo", b"x") == "T0"


@pytest.fixture
def slow_probe(monkeypatch):
    """Probes of an address list slowed to 0.5 s each, as a silent host
    makes them; the list records, per probe, whether it ran on the main
    thread (the event loop's)."""
    import threading
    import time

    import weft._channel as channel

    probes = []
    probe = channel.first_reachable

    def slow(addresses, timeout=channel.CONNECT_TIMEOUT):
        probes.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.5)
        return probe(addresses, timeout)

    monkeypatch.setattr(channel, "first_reachable", slow)
    return probes


class _Ticker:
    """Counts the event loop's turns every 10 ms while it runs."""

    async def __aenter__(self):
        self.ticks = 0

        async def tick():
            while True:
                self.ticks += 1
                await asyncio.sleep(0.01)

        self._task = asyncio.create_task(tick())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()


async def test_the_asyncio_client_never_blocks_its_event_loop_to_open(server, slow_probe):
    # Several addresses are probed with blocking connects (a silent host
    # takes up to CONNECT_TIMEOUT): the asyncio client does it in a worker
    # thread at its first call, never in its constructor or on the loop.
    import time

    url, _ = server
    made = time.monotonic()
    client = weft.aio.Client(f"{_refused_url()},{url}")
    assert time.monotonic() - made < 0.2 and slow_probe == [], "the constructor probed"
    async with _Ticker() as loop, client:
        first, second = await asyncio.gather(client.submit_call("echo", b"x"), client.submit_call("echo", b"y"))
        assert [first, second] == ["T0", "T0"], "this test server numbers each Submit from T0"
        assert [event.kind async for event in client.watch("T0")], "streams open on the probed channel"
    assert slow_probe == [False], "probed once for both calls, off the event loop's thread"
    assert loop.ticks >= 20, f"the event loop stalled while probing ({loop.ticks} ticks in 0.5 s)"


async def test_a_worker_opens_its_channel_off_its_event_loop(server, slow_probe):
    # The worker's session dials its list with open_aio_channel: the
    # attempts running on its loop go on while it probes.
    from weft._channel import open_aio_channel

    url, _ = server
    async with _Ticker() as loop:
        channel = await open_aio_channel(f"{_refused_url()},{url}")
        response = await task_pb2_grpc.TaskServiceStub(channel).Submit(task_pb2.SubmitRequest(tasks=[weft.call_spec("echo", b"x")]))
        await channel.close()
    assert list(response.task_ids) == ["T0"]
    assert slow_probe == [False] and loop.ticks >= 20, (slow_probe, loop.ticks)


# -- waits through an unreachable coordinator, timeouts, map's cleanup -------


class _Scripted(task_pb2_grpc.TaskServiceServicer):
    """A TaskService whose calls the test scripts one by one: ``script[name]`` is a list of
    what each call does in turn (the last repeats): a response, a status code to abort with,
    or a function of the request and context."""

    def __init__(self, **script):
        self.script = script
        self.calls = {}

    def _next(self, name, request, context):
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        steps = self.script[name]
        step = steps[min(n, len(steps) - 1)]
        if isinstance(step, grpc.StatusCode):
            context.abort(step, f"{name} scripted to fail")
        return step(request, context) if callable(step) else step

    def Get(self, request, context):
        return self._next("Get", request, context)

    def Watch(self, request, context):
        yield from self._next("Watch", request, context)

    def WaitMany(self, request, context):
        yield from self._next("WaitMany", request, context)

    def List(self, request, context):
        return self._next("List", request, context)


@contextlib.contextmanager
def _serving(servicer):
    srv = grpc.server(futures.ThreadPoolExecutor(8))
    task_pb2_grpc.add_TaskServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.stop(0)


def _got(state, **fields):
    return task_pb2.GetResponse(task=_task("T0", state, **fields))


def _restarting():
    """A coordinator restarting while a wait follows T0: the watch breaks, the Get after it
    finds nobody, the next finds T0 done."""
    return _Scripted(
        Get=[_got(common_pb2.TASK_STATE_RUNNING), grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE,
             _got(common_pb2.TASK_STATE_SUCCEEDED, output=b"done")],
        Watch=[grpc.StatusCode.UNAVAILABLE],
    )


def test_wait_goes_on_when_the_get_after_a_broken_watch_is_unavailable_too():
    with _serving(_restarting()) as url, weft.Client(url) as client:
        assert client.wait("T0", timeout=10).output == b"done"

    async def scenario():
        with _serving(_restarting()) as url:
            async with weft.aio.Client(url) as client:
                assert (await client.wait("T0", timeout=10)).output == b"done"

    asyncio.run(scenario())


@pytest.fixture
def short_resume_window(monkeypatch):
    import weft.client

    monkeypatch.setattr(weft.client, "RESUME_WINDOW", 0.5, raising=False)


def test_a_wait_whose_every_watch_breaks_at_once_gives_up_after_the_window_though_its_gets_answer(
        short_resume_window):
    import time

    def scripted():
        return _Scripted(Get=[_got(common_pb2.TASK_STATE_RUNNING)], Watch=[grpc.StatusCode.UNAVAILABLE])

    servicer = scripted()
    with _serving(servicer) as url, weft.Client(url) as client:
        started = time.monotonic()
        with pytest.raises(weft.Unavailable):
            client.wait("T0", timeout=5)
        assert time.monotonic() - started < 3
    assert servicer.calls["Get"] > 1, "tried again within the window"

    async def scenario():
        with _serving(scripted()) as url:
            async with weft.aio.Client(url) as client:
                started = time.monotonic()
                with pytest.raises(weft.Unavailable):
                    await client.wait("T0", timeout=5)
                assert time.monotonic() - started < 3

    asyncio.run(scenario())


def test_wait_job_goes_on_when_its_first_look_at_the_job_is_unavailable():
    def scripted():
        def done(request, context):
            yield _task("J0", common_pb2.TASK_STATE_SUCCEEDED, job_id="J0", output=b"done")

        listed = task_pb2.ListResponse(tasks=[_task("J0", common_pb2.TASK_STATE_RUNNING, job_id="J0")])
        return _Scripted(List=[grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE, listed], WaitMany=[done])

    with _serving(scripted()) as url, weft.Client(url) as client:
        assert [t.output for t in client.wait_job("J0", timeout=10).tasks] == [b"done"]

    async def scenario():
        with _serving(scripted()) as url:
            async with weft.aio.Client(url) as client:
                assert [t.output for t in (await client.wait_job("J0", timeout=10)).tasks] == [b"done"]

    asyncio.run(scenario())


def test_waits_give_up_after_the_resume_window_without_a_success(short_resume_window):
    import time

    url = _refused_url()
    with weft.Client(url) as client:
        for wait in (lambda: client.wait("T0"), lambda: list(client.wait_many(["A"], timeout=4))):
            started = time.monotonic()
            with pytest.raises(weft.Unavailable):
                wait()
            assert time.monotonic() - started < 3

    async def scenario():
        async with weft.aio.Client(url) as client:
            for wait in (client.wait("T0"), _drain(client.wait_many(["A"], timeout=4))):
                started = time.monotonic()
                with pytest.raises(weft.Unavailable):
                    await wait
                assert time.monotonic() - started < 3

    asyncio.run(scenario())


async def _drain(iterator):
    return [item async for item in iterator]


def test_a_wait_many_that_gets_through_between_breaks_goes_on(monkeypatch):
    import weft.client

    monkeypatch.setattr(weft.client, "RESUME_WINDOW", 0.05, raising=False)

    def one_then_break(request, context):
        yield _task(request.task_ids[0], common_pb2.TASK_STATE_SUCCEEDED)
        context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator restarting")

    with _serving(_Scripted(WaitMany=[one_then_break])) as url, weft.Client(url) as client:
        assert [t.id for t in client.wait_many(["A", "B", "C", "D"], timeout=10)] == ["A", "B", "C", "D"]


def test_waits_whose_streams_each_break_with_nothing_before_the_window_give_up_after_it(monkeypatch):
    import time

    import weft.client

    # Each stream stays open longer than the longest pause but less than the window: no break
    # may start a new run of tries.
    monkeypatch.setattr(weft.client, "RESUME_WINDOW", 0.6, raising=False)
    monkeypatch.setattr(weft.client, "RESUME_BACKOFF_MAX", 0.2, raising=False)

    def nothing_then_break(request, context):
        time.sleep(0.3)
        context.abort(grpc.StatusCode.UNAVAILABLE, "stream timeout")
        yield  # a generator: the stream opens, then breaks

    with _serving(_Scripted(WaitMany=[nothing_then_break])) as url:
        with weft.Client(url) as client:
            started = time.monotonic()
            with pytest.raises(weft.Unavailable):
                list(client.wait_many(["A"], timeout=8))
            assert time.monotonic() - started < 4

        async def scenario():
            async with weft.aio.Client(url) as client:
                started = time.monotonic()
                with pytest.raises(weft.Unavailable):
                    await _drain(client.wait_many(["A"], timeout=8))
                assert time.monotonic() - started < 4

        asyncio.run(scenario())


async def test_a_failed_ca_fetch_ends_an_asyncio_wait_after_the_resume_window(tls_server, ca_fetches, short_resume_window):
    import time

    url, ca = tls_server
    ca_fetches.refuse = 1_000_000
    async with weft.aio.Client(url, ca_pin=ca.pin) as client:
        started = time.monotonic()
        with pytest.raises(weft.Unavailable, match="cannot fetch the CA"):
            await _drain(client.wait_many(["A"], timeout=4))
        assert time.monotonic() - started < 3
    assert len(ca_fetches) > 1, "fetched again within the window"


def _slow_get(request, context):
    import time

    time.sleep(2)
    return _got(common_pb2.TASK_STATE_RUNNING)


def test_a_wait_timeout_bounds_its_get_and_a_zero_timeout_is_no_time():
    import time

    with _serving(_Scripted(Get=[_slow_get])) as url, weft.Client(url) as client:
        started = time.monotonic()
        with pytest.raises(weft.DeadlineExceeded):
            client.wait("T0", timeout=0.3)
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with pytest.raises(weft.DeadlineExceeded):
            client._unary(client._tasks.Get, task_pb2.GetRequest(task_id="T0"), timeout=0)
        assert time.monotonic() - started < 1

    async def scenario():
        with _serving(_Scripted(Get=[_slow_get])) as url:
            async with weft.aio.Client(url) as client:
                started = time.monotonic()
                with pytest.raises(weft.DeadlineExceeded):
                    await client.wait("T0", timeout=0.3)
                assert time.monotonic() - started < 1.5

    asyncio.run(scenario())


def test_a_wait_with_a_zero_timeout_answers_a_task_already_final():
    def final_get(request, context):
        return _got(common_pb2.TASK_STATE_SUCCEEDED)

    with _serving(_Scripted(Get=[final_get])) as url, weft.Client(url) as client:
        assert client.wait("T0", timeout=0).state == weft.TaskState.SUCCEEDED

    async def scenario():
        with _serving(_Scripted(Get=[final_get])) as url:
            async with weft.aio.Client(url) as client:
                assert (await client.wait("T0", timeout=0)).state == weft.TaskState.SUCCEEDED

    asyncio.run(scenario())


class _MapTasks(task_pb2_grpc.TaskServiceServicer):
    """Submits numbered by job (``J<k>-<i>``, job ``J<k>-0``), the ``refuse``-th refused;
    waits that answer the first task, then ``second`` for the next, then nothing more."""

    def __init__(self, second=common_pb2.TASK_STATE_FAILED, refuse=0, cancel_job=None):
        self.second, self.refuse = second, refuse
        self.submits, self.cancelled_jobs = 0, []
        #: What CancelJob does before it answers (a function of the context), if anything.
        self.cancel_job = cancel_job
        self.cancels = 0

    def Submit(self, request, context):
        self.submits += 1
        if self.submits == self.refuse:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        job = self.submits - 1
        ids = [f"J{job}-{i}" for i in range(len(request.tasks))]
        return task_pb2.SubmitResponse(task_ids=ids, job_id=ids[0])

    def WaitMany(self, request, context):
        import time

        ids = list(request.task_ids)
        yield _task(ids[0], common_pb2.TASK_STATE_SUCCEEDED, output=b"first")
        if len(ids) > 1:
            yield _task(ids[1], self.second, output=b"second")
        while len(ids) > 2 and context.is_active():  # the rest never end
            time.sleep(0.02)

    def CancelJob(self, request, context):
        self.cancelled_jobs.append(request.job_id)
        if self.cancel_job is not None:
            self.cancel_job(context)
        return task_pb2.CancelJobResponse(cancelled=1)

    def Cancel(self, request, context):
        import time

        self.cancels += 1
        time.sleep(1)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "final already")


def test_map_cancels_the_calls_it_did_not_yield_when_it_stops_early(monkeypatch):
    import weft.client

    tasks = _MapTasks()
    with _serving(tasks) as url, weft.Client(url) as client:
        results = client.map("echo", [b"a", b"b", b"c"])
        assert next(results) == b"first"
        with pytest.raises(weft.TaskFailed):
            next(results)
        assert tasks.cancelled_jobs == ["J0-0"], "a failed call: the rest cancelled"

        tasks.cancelled_jobs.clear()
        results = client.map("echo", [b"a", b"b", b"c"])
        assert next(results) == b"first"
        results.close()
        assert tasks.cancelled_jobs == ["J1-0"], "closed early: the rest cancelled"

        tasks.cancelled_jobs.clear()
        tasks.second = common_pb2.TASK_STATE_SUCCEEDED
        assert list(client.map("echo", [b"a", b"b"])) == [b"first", b"second"]
        assert tasks.cancelled_jobs == [], "all read: nothing to cancel"

    # A Submit refused after one went through: what did go through is cancelled.
    monkeypatch.setattr(weft.client, "SUBMIT_BATCH", 2)
    tasks = _MapTasks(refuse=2)
    with _serving(tasks) as url, weft.Client(url) as client:
        with pytest.raises(weft.ResourceExhausted):
            list(client.map("echo", [b"a", b"b", b"c"]))
        assert tasks.cancelled_jobs == ["J0-0"]
    monkeypatch.undo()

    async def scenario():
        tasks = _MapTasks()
        with _serving(tasks) as url:
            async with weft.aio.Client(url) as client:
                with pytest.raises(weft.TaskFailed):
                    await _drain(client.map("echo", [b"a", b"b", b"c"]))
                assert tasks.cancelled_jobs == ["J0-0"]
                results = client.map("echo", [b"a", b"b", b"c"])
                assert await results.__anext__() == b"first"
                await results.aclose()
                assert tasks.cancelled_jobs == ["J0-0", "J1-0"]

    asyncio.run(scenario())


def test_closing_the_client_cancels_what_open_maps_did_not_yield(caplog):
    tasks = _MapTasks()
    with _serving(tasks) as url:
        with weft.Client(url) as client:
            results = client.map("echo", [b"a", b"b", b"c"])
            assert next(results) == b"first"
        assert tasks.cancelled_jobs == ["J0-0"], "cancelled by close"
        results.close()
        assert tasks.cancelled_jobs == ["J0-0"], "once"

        # A channel closed under the map: its cleanup logs, never raises.
        channel = grpc.insecure_channel(url.removeprefix("http://"))
        results = weft.Client(channel=channel).map("echo", [b"a", b"b", b"c"])
        assert next(results) == b"first"
        channel.close()
        results.close()
        assert "uncancelled" in caplog.text

    async def scenario():
        tasks = _MapTasks()
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        with _serving(tasks) as url:
            async with weft.aio.Client(url) as client:
                async for result in client.map("echo", [b"a", b"b", b"c"]):
                    assert result == b"first"
                    break
            await asyncio.sleep(0.2)  # the generator's own aclose runs meanwhile, on a closed channel
        assert tasks.cancelled_jobs == ["J0-0"]
        assert errors == []

    asyncio.run(scenario())


def test_maps_cleanup_is_bounded_by_its_budget_and_stops_at_the_first_unavailable(monkeypatch):
    import time

    import weft.client

    monkeypatch.setattr(weft.client, "SUBMIT_BATCH", 1)
    monkeypatch.setattr(weft.client, "MAP_CANCEL_BUDGET", 0.5, raising=False)
    inputs = [b"a", b"b", b"c", b"d"]

    def slow(context):
        time.sleep(2)

    def unavailable(context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator restarting")

    def unimplemented(context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no CancelJob")

    for cancel_job in (slow, unimplemented):
        tasks = _MapTasks(cancel_job=cancel_job)
        with _serving(tasks) as url, weft.Client(url) as client:
            started = time.monotonic()
            with pytest.raises(weft.TaskFailed):
                list(client.map("echo", inputs))
            assert time.monotonic() - started < 1.5, cancel_job.__name__
            assert tasks.cancels <= 1

    tasks = _MapTasks(cancel_job=unavailable)
    with _serving(tasks) as url, weft.Client(url) as client:
        with pytest.raises(weft.TaskFailed):
            list(client.map("echo", inputs))
    assert tasks.cancelled_jobs == ["J2-0"], "stopped at the first Unavailable"

    async def scenario():
        # The map's task cancelled while it cancels: TaskFailed stays the error raised.
        tasks = _MapTasks(cancel_job=slow)
        with _serving(tasks) as url:
            async with weft.aio.Client(url) as client:
                started = time.monotonic()
                consumer = asyncio.ensure_future(_drain(client.map("echo", inputs)))
                while not tasks.cancelled_jobs:
                    await asyncio.sleep(0.01)
                consumer.cancel()
                with pytest.raises(weft.TaskFailed):
                    await consumer
                await asyncio.sleep(0.6)
                assert time.monotonic() - started < 1.5

    asyncio.run(scenario())


def test_durations_carry_a_rounded_up_fraction_into_the_seconds():
    from weft.models import duration_to_pb

    for value, (seconds, nanos) in [(2.9999999999, (3, 0)), (1.5, (1, 500_000_000)), (0, (0, 0)),
                                    (dt.timedelta(microseconds=999_999), (0, 999_999_000))]:
        pb = duration_to_pb(value)
        assert (pb.seconds, pb.nanos) == (seconds, nanos), value
    for negative in (-1, "-2s", dt.timedelta(seconds=-1)):
        with pytest.raises(ValueError):
            duration_to_pb(negative)


def test_the_sync_client_checks_every_address_of_a_list_when_made(tls_server, ca_fetches):
    # The first address (TLS, pinned) answers; the second is plaintext, which a pin rules out.
    url, ca = tls_server
    for make in (weft.Client, weft.aio.Client):
        with pytest.raises(ValueError, match="http://127.0.0.1:9 is plaintext, but a CA or pin was given"):
            make(f"{url},http://127.0.0.1:9", ca_pin=ca.pin)
    assert ca_fetches == [], "refused before anything was dialled"


def test_the_token_comes_from_weft_token_file_as_the_cli_reads_it(monkeypatch, tmp_path):
    from weft._channel import client_token

    path = tmp_path / "admin.token"
    path.write_text("  weft_file_secret\n")
    monkeypatch.setenv("WEFT_TOKEN", "weft_env_secret")
    monkeypatch.setenv("WEFT_TOKEN_FILE", str(path))
    assert client_token(None) == "weft_file_secret", "the file wins over $WEFT_TOKEN"
    assert client_token(" weft_arg ") == "weft_arg", "an argument wins over both"
    monkeypatch.setenv("WEFT_TOKEN_FILE", "")
    assert client_token(None) == "weft_env_secret"

    missing = tmp_path / "nope.token"
    monkeypatch.setenv("WEFT_TOKEN_FILE", str(missing))
    with pytest.raises(ValueError, match=f"cannot read the client token file {missing}"):
        weft.Client("http://127.0.0.1:9")
    path.write_text("\n")
    monkeypatch.setenv("WEFT_TOKEN_FILE", str(path))
    with pytest.raises(ValueError, match=f"the client token file {path} .* is empty"):
        weft.aio.Client("http://127.0.0.1:9")


def test_pin_mismatch_is_exported_and_a_weft_error():
    assert issubclass(weft.PinMismatch, weft.WeftError) and issubclass(weft.PinMismatch, ValueError)
    from weft._channel import PinMismatch

    assert PinMismatch is weft.PinMismatch


# -- the asyncio client's lazily opened channel --------------------------------


class _FakeChannel:
    def __init__(self):
        self.closed = False

    async def close(self, grace=None):
        self.closed = True


def _opener(*outcomes, delay=0.1):
    """An ``open_channel`` for :class:`_LazyChannel`: each opening takes ``delay`` and ends
    as the next of ``outcomes`` (an exception raises); ``.opened`` counts them."""

    async def open_channel():
        open_channel.opened += 1
        await asyncio.sleep(delay)
        outcome = outcomes[min(open_channel.opened, len(outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    open_channel.opened = 0
    return open_channel


async def _cancelled_first_caller(lazy):
    first = asyncio.ensure_future(lazy.channel())
    await asyncio.sleep(0.02)
    first.cancel()
    await asyncio.sleep(0.2)  # the opening ends meanwhile, with nobody waiting


async def test_a_lazy_channel_keeps_what_an_orphaned_opening_opened_and_closes_it():
    from weft._channel import _LazyChannel

    channel = _FakeChannel()
    lazy = _LazyChannel(_opener(channel))
    await _cancelled_first_caller(lazy)
    assert await lazy.channel() is channel
    await lazy.close()
    assert channel.closed

    channel = _FakeChannel()
    lazy = _LazyChannel(_opener(channel))
    await _cancelled_first_caller(lazy)
    await lazy.close()
    assert channel.closed, "closed though no call ever got it"


async def test_a_lazy_channel_forgets_an_orphaned_failed_opening():
    from weft._channel import _LazyChannel

    channel = _FakeChannel()
    lazy = _LazyChannel(_opener(weft.Unavailable("coordinator down"), channel))
    await _cancelled_first_caller(lazy)
    assert await lazy.channel() is channel, "opened again, not the stale error"


async def test_a_closed_lazy_channel_refuses_calls_and_opens_nothing():
    from weft._channel import _LazyChannel

    opener = _opener(_FakeChannel())
    lazy = _LazyChannel(opener)
    await lazy.close()
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await lazy.channel()
    assert opener.opened == 0

    # Closed while opening: the opening is cancelled, and nothing is left open.
    channel = _FakeChannel()
    lazy = _LazyChannel(_opener(channel))
    waiting = asyncio.ensure_future(lazy.channel())
    await asyncio.sleep(0.02)
    await lazy.close()
    with pytest.raises(grpc.aio.UsageError, match="closed"):
        await waiting  # as a call after close(): this caller was not cancelled
    await asyncio.sleep(0.2)
    assert not channel.closed and lazy._channel is None
