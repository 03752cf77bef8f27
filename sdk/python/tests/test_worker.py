"""Unit tests of weft.Worker, in-process, against the fake coordinator."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest

import weft
from weft import call_spec
from weft._proto import common_pb2
from weft.testing import FakeCoordinator, new_ulid

NODE_U = new_ulid()
NODE_S = new_ulid()

import handlers
from conftest import check_parallel, poll


class RunningWorker:
    """A weft.Worker serving on its own event loop in a background thread."""

    def __init__(self, worker: weft.Worker):
        self.worker = worker
        self.loop = asyncio.new_event_loop()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.worker.serve())
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.worker.stop)
            self.thread.join(5)


@pytest.fixture
def fake():
    coordinator = FakeCoordinator()
    yield coordinator
    coordinator.stop()


@pytest.fixture
def run_worker(fake, tmp_path):
    running = []

    def start(slots: int = 2, setup=None, exec: str = "deny", prefetch: int = 0, **kwargs) -> tuple:
        # It joins the fake (which authenticates nodes, as a coordinator does).
        # No prefetch unless asked: most tests count credits slot by slot.
        worker = weft.Worker(slots=slots, name="unit", labels={"lang": "py"}, process_workers=slots, exec=exec,
                             join_token=fake.join_token(), state_dir=str(tmp_path / f"state-{len(running)}"),
                             prefetch=prefetch, **kwargs)
        if setup:
            setup(worker)
        rw = RunningWorker(worker)
        running.append(rw)
        session = fake.accept(timeout=10)
        assert session.recv(timeout=5, skip_heartbeats=False).WhichOneof("body") == "register"
        session.registered(NODE_U)
        session.wait_for(lambda: session.credits_granted() >= slots, what="credits")
        return rw, session

    yield start
    for rw in running:
        rw.stop()


def outcome(events) -> int:
    return events[-1].finished.outcome


def test_register_lists_handlers_labels_and_slots(fake, run_worker):
    def setup(w):
        w.register("a", handlers.burn, "process")

        @w.handler()
        async def b(data):
            return data

    rw, session = run_worker(slots=3, setup=setup)
    reg = session.received[0].message.register
    assert sorted(reg.handlers) == ["a", "b"]
    assert dict(reg.labels) == {"lang": "py"}
    assert reg.slots == 3 and reg.name == "unit"
    assert rw.worker.node_id == NODE_U


def test_handler_kind_must_match_the_function():
    w = weft.Worker("http://127.0.0.1:1", slots=1)

    async def coro(data):
        return data

    with pytest.raises(TypeError):
        w.register("x", handlers.burn, "asyncio")
    with pytest.raises(TypeError):
        w.register("y", coro, "thread")
    with pytest.raises(ValueError):
        w.register("z", handlers.burn, "greenlet")
    assert w.register("c", coro).kind == "asyncio"
    assert w.register("d", handlers.burn).kind == "thread"


def test_return_values_become_bytes(fake, run_worker):
    def setup(w):
        w.register("none", lambda data: None, "thread")
        w.register("text", lambda data: "héllo", "thread")
        w.register("json", lambda data: {"n": 1}, "thread")

    _, session = run_worker(setup=setup)
    session.assign(("t1", 1, call_spec("none")), ("t2", 1, call_spec("text")))
    assert session.events("t1", 1)[-1].finished.output == b""
    assert session.events("t2", 1)[-1].finished.output == "héllo".encode()
    session.assign(("t3", 1, call_spec("json")))
    assert session.events("t3", 1)[-1].finished.output == b'{"n": 1}'


def test_context_output_and_progress_from_every_kind(fake, run_worker):
    async def a(data, ctx):
        ctx.print("async", data.decode())
        ctx.progress(0.25, "quarter")
        return b"a"

    def t(data, ctx):
        ctx.output(b"thread\n", stream="stderr")
        return b"t"

    def setup(w):
        w.register("a", a, "asyncio")
        w.register("t", t, "thread")
        w.register("p", handlers.report, "process")

    _, session = run_worker(setup=setup)
    session.assign(("ta", 1, call_spec("a", b"x")))
    events = session.events("ta", 1)
    assert [e.WhichOneof("body") for e in events] == ["started", "output", "progress", "finished"]
    assert events[1].output.data == b"async x\n" and events[2].progress.fraction == 0.25
    session.assign(("tt", 1, call_spec("t")))
    events = session.events("tt", 1)
    assert events[1].output.stream == common_pb2.OUTPUT_STREAM_STDERR
    session.assign(("tp", 1, call_spec("p", b"abc")))
    events = session.events("tp", 1, timeout=20)
    assert events[0].started.pid not in (0, os.getpid())
    assert [e.WhichOneof("body") for e in events] == ["started", "output", "progress", "finished"]
    assert events[-1].finished.output == b"ABC"


def test_secret_env_reaches_handlers_of_every_kind_and_exec_processes(fake, run_worker):
    async def a(data, ctx):
        return ctx.secret_env["API_KEY"].upper()

    def t(data, ctx):
        return ctx.secret_env["API_KEY"].upper()

    def setup(w):
        w.register("a", a, "asyncio")
        w.register("t", t, "thread")
        w.register("p", handlers.secret_upper, "process")

    _, session = run_worker(setup=setup, exec="allow")
    secret = {"API_KEY": "s3cr3t"}
    for name in ("a", "t", "p"):
        session.assign((f"t{name}", 1, call_spec(name, secret_env=secret)))
        events = session.events(f"t{name}", 1, timeout=20)
        assert events[-1].finished.output == b"S3CR3T", (name, events[-1])
    # An exec process gets it after env: the secret wins over a plain value.
    spec = weft.exec_spec(["sh", "-c", 'printf %s "$API_KEY"'], env={"API_KEY": "plain"}, secret_env=secret)
    session.assign(("tx", 1, spec))
    events = session.events("tx", 1, timeout=20)
    assert b"".join(e.output.data for e in events if e.WhichOneof("body") == "output") == b"s3cr3t"


def test_process_handlers_run_on_more_than_one_core(fake, run_worker):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs at least 2 CPUs")

    def setup(w):
        w.register("burn", handlers.burn, "process")

    _, session = run_worker(slots=2, setup=setup)
    # Warm both pool processes up, so spawn time does not count.
    session.assign(("w1", 1, call_spec("burn", b"0.01")), ("w2", 1, call_spec("burn", b"0.01")))
    session.events("w1", 1, timeout=20)
    session.events("w2", 1, timeout=20)
    session.wait_for(lambda: session.credits_granted() >= 4, what="slots back")
    counter = iter(range(100))

    def trial():
        n = next(counter)
        granted = session.credits_granted()
        session.assign((f"alone{n}", 1, call_spec("burn", b"1.0")))
        alone = float(session.events(f"alone{n}", 1, timeout=20)[-1].finished.output.split()[1])
        session.wait_for(lambda: session.credits_granted() >= granted + 1, what="slot back")
        started = time.monotonic()
        session.assign((f"a{n}", 1, call_spec("burn", b"1.0")), (f"b{n}", 1, call_spec("burn", b"1.0")))
        results = [session.events(f"{x}{n}", 1, timeout=20)[-1].finished.output for x in "ab"]
        wall = time.monotonic() - started
        assert len({r.split()[0] for r in results}) == 2, f"both calls ran in one process: {results}"
        session.wait_for(lambda: session.credits_granted() >= granted + 3, what="slots back")
        return sum(float(r.split()[1]) for r in results), alone, wall

    check_parallel(trial)


def test_cancelled_process_handler_is_killed_and_the_pool_recovers(fake, run_worker):
    def setup(w):
        w.register("hang", handlers.hang, "process")
        w.register("burn", handlers.burn, "process")

    _, session = run_worker(slots=1, setup=setup)
    session.assign(("h", 1, call_spec("hang")))
    pid = session.events("h", 1, until="started", timeout=20)[-1].started.pid
    sent = time.monotonic()
    session.cancel("h", 1)
    assert outcome(session.events("h", 1)) == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
            return f.read().split()[2] == "Z"

    session.wait_for(gone, timeout=5, what=f"pool process {pid} killed")
    session.wait_for(lambda: session.credits_granted() >= 2, what="slot back")
    session.assign(("b", 1, call_spec("burn", b"0.01")))
    assert outcome(session.events("b", 1, timeout=20)) == common_pb2.OUTCOME_SUCCEEDED


def test_a_crashing_process_handler_fails_the_attempt(fake, run_worker):
    def setup(w):
        w.register("crash", handlers.crash, "process")

    _, session = run_worker(slots=1, setup=setup)
    session.assign(("c", 1, call_spec("crash")))
    finished = session.events("c", 1, timeout=20)[-1].finished
    assert finished.outcome == common_pb2.OUTCOME_FAILED
    assert "died" in finished.error


def test_a_failed_handler_records_its_traceback_under_the_error_of_every_kind(fake, run_worker):
    def setup(w):
        w.register("in_thread", handlers.raise_value_error, "thread")
        w.register("in_process", handlers.raise_value_error, "process")

        @w.handler()
        async def in_asyncio(data):
            return handlers.raise_value_error(data)

        @w.handler()
        async def plain(data):
            raise weft.HandlerError("just this")

    _, session = run_worker(slots=2, setup=setup)
    for n, name in enumerate(("in_asyncio", "in_thread", "in_process")):
        session.assign((f"t{n}", 1, call_spec(name, b"not a number")))
        finished = session.events(f"t{n}", 1, timeout=20)[-1].finished
        assert finished.outcome == common_pb2.OUTCOME_FAILED
        first, _, rest = finished.error.partition("\n\n")
        assert first == "ValueError: invalid literal for int() with base 10: 'not a number'", finished.error
        assert rest.startswith("Traceback (most recent call last):"), finished.error
        assert "_parse_config" in rest and "raise_value_error" in rest, finished.error
    # A HandlerError says its message only.
    session.assign(("p", 1, call_spec("plain")))
    assert session.events("p", 1)[-1].finished.error == "just this"


def test_cancelled_thread_handler_reports_at_once_but_keeps_its_slot_until_it_returns(fake, run_worker):
    release = threading.Event()

    def stubborn(data, ctx):
        release.wait(10)  # ignores ctx.cancelled
        return b"late"

    def setup(w):
        w.register("stubborn", stubborn, "thread")

    _, session = run_worker(slots=1, setup=setup)
    session.assign(("s", 1, call_spec("stubborn")))
    session.events("s", 1, until="started")
    sent = time.monotonic()
    session.cancel("s", 1)
    assert outcome(session.events("s", 1)) == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0
    time.sleep(0.2)
    assert session.credits_granted() == 1, "slot granted back while the thread still runs"
    release.set()
    session.wait_for(lambda: session.credits_granted() == 2, what="slot back once the thread returned")
    # Exactly one Finished.
    finished = [e for r in session.of_kind("events") for e in r.message.events.events if e.WhichOneof("body") == "finished"]
    assert len(finished) == 1


def test_started_sent_before_the_coordinator_went_away_is_sent_again_first(fake, run_worker):
    release = threading.Event()

    def held(data, ctx):
        ctx.output(b"before\n")
        release.wait(10)
        return b"done"

    def setup(w):
        w.register("held", held, "thread")

    _, session = run_worker(slots=1, setup=setup)
    try:
        session.assign(("s", 1, call_spec("held")))
        assert [e.WhichOneof("body") for e in session.events("s", 1, until="output")] == ["started", "output"]
        session.close()  # the stream breaks (a coordinator that may not have recorded the Started)
        again = fake.accept(timeout=10)
        register = again.recv(timeout=5, skip_heartbeats=False).register
        assert ("s", 1) in {(r.task_id, r.attempt) for r in register.running}
        again.registered(NODE_U)
        first = again.expect("events").events.events[0]
        assert (first.task_id, first.attempt, first.WhichOneof("body")) == ("s", 1, "started"), first
        release.set()
        kinds = [e.WhichOneof("body") for e in again.events("s", 1)]
        assert kinds == ["started", "output", "finished"], kinds
    finally:
        release.set()
    assert fake.ledger.violations == []


def test_exec_output_while_disconnected_is_bounded(fake, run_worker, tmp_path):
    from weft._proto import node_pb2
    from weft.worker.outbox import CHUNK_LIMIT, QUEUED_OUTPUT_MAX_BYTES

    total = 8 * QUEUED_OUTPUT_MAX_BYTES
    go, marker = tmp_path / "go", tmp_path / "wrote everything"
    script = (f"import os, sys, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
              f"for _ in range({total // CHUNK_LIMIT}): sys.stdout.buffer.write(b'y' * {CHUNK_LIMIT})\n"
              f"sys.stdout.flush()\nopen({str(marker)!r}, 'w').close()\n")
    rw, session = run_worker(slots=1, exec="allow")
    outbox = rw.worker._outbox

    def queued_output() -> int:
        return sum(len(e.output.data) for e in list(outbox.queue)
                   if isinstance(e, node_pb2.NodeTaskEvent) and e.WhichOneof("body") == "output")

    session.assign(("yes", 1, weft.exec_spec([sys.executable, "-c", script])))
    pid = session.events("yes", 1, until="started")[0].started.pid
    session.close()  # from now on no coordinator takes what the worker sends
    again = fake.accept(timeout=10)
    assert again.recv(timeout=5, skip_heartbeats=False).WhichOneof("body") == "register"
    go.touch()
    poll(lambda: queued_output() >= QUEUED_OUTPUT_MAX_BYTES, what="the output queued up to its bound")

    def child_blocked_writing() -> bool:
        try:
            with open(f"/proc/{pid}/wchan") as f:
                return "pipe_write" in f.read()
        except OSError:
            return False

    # The pump stops reading: the child fills its pipe and waits there (it would have
    # written everything and ended, all of it queued, without the bound).
    poll(lambda: child_blocked_writing() or marker.exists(), what="the child blocked writing (or done)")
    assert not marker.exists(), f"the child wrote all of it: {queued_output()} bytes queued"
    assert queued_output() < QUEUED_OUTPUT_MAX_BYTES + CHUNK_LIMIT
    # Once a coordinator takes it, everything comes through, in order.
    again.registered(NODE_U)
    events = again.events("yes", 1, timeout=60)
    assert events[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED, events[-1]
    assert sum(len(e.output.data) for e in events if e.WhichOneof("body") == "output") == total
    assert fake.ledger.violations == []


def test_async_handler_calling_sys_exit_fails_the_attempt_not_the_worker(fake, run_worker):
    async def quits(data):
        sys.exit(3)

    def setup(w):
        w.register("quits", quits, "asyncio")
        w.register("echo", lambda data: data, "thread")

    rw, session = run_worker(slots=1, setup=setup)
    session.assign(("q", 1, call_spec("quits")))
    done = session.events("q", 1)[-1].finished
    assert done.outcome == common_pb2.OUTCOME_FAILED and done.error.startswith("SystemExit: 3"), done
    session.assign(("e", 1, call_spec("echo", b"still here")))
    assert session.events("e", 1)[-1].finished.output == b"still here"
    assert rw.thread.is_alive() and rw.error is None


def test_a_keyboard_interrupt_in_an_async_handler_stops_the_worker(fake, run_worker):
    async def interrupted(data):
        raise KeyboardInterrupt()

    def setup(w):
        w.register("interrupted", interrupted, "asyncio")

    rw, session = run_worker(slots=1, setup=setup)
    session.assign(("k", 1, call_spec("interrupted")))
    rw.thread.join(10)
    assert not rw.thread.is_alive() and isinstance(rw.error, KeyboardInterrupt), rw.error


def test_a_keyboard_interrupt_in_an_async_handler_starts_nothing_queued_behind_it(fake, run_worker):
    began = threading.Event()

    async def interrupted(data):
        raise KeyboardInterrupt()

    def setup(w):
        w.register("interrupted", interrupted, "asyncio")
        w.register("echo", lambda data: data, "thread")
        w.register("marks", lambda data: began.set(), "thread")

    rw, session = run_worker(slots=1, prefetch=1, setup=setup)
    # One attempt that ended turns prefetch on: the worker takes one queued behind a running one.
    session.assign(("warm", 1, call_spec("echo", b"w")))
    assert outcome(session.events("warm", 1)) == common_pb2.OUTCOME_SUCCEEDED
    session.wait_for(lambda: session.credits_granted() >= 3, what="a credit for the slot and one for prefetch")
    session.assign(("k", 1, call_spec("interrupted")), ("m", 1, call_spec("marks")))
    rw.thread.join(10)
    assert not rw.thread.is_alive() and isinstance(rw.error, KeyboardInterrupt), rw.error
    # Whatever the interrupt handed to the handler threads runs before they take their end.
    threads = rw.worker._attempts.threads
    threads.shutdown()
    for thread in threads._threads:
        thread.join(10)
        assert not thread.is_alive()
    assert not began.is_set(), "the queued attempt began on a worker going down"


def test_cooperative_thread_handler_stops_on_cancel(fake, run_worker):
    stopped = threading.Event()

    def polite(data, ctx):
        while not ctx.cancelled:
            time.sleep(0.01)
        stopped.set()

    def setup(w):
        w.register("polite", polite, "thread")

    _, session = run_worker(slots=1, setup=setup)
    session.assign(("p", 1, call_spec("polite")))
    session.events("p", 1, until="started")
    session.cancel("p", 1)
    assert outcome(session.events("p", 1)) == common_pb2.OUTCOME_CANCELLED
    assert stopped.wait(2)
    session.wait_for(lambda: session.credits_granted() == 2, what="slot back")


def test_asyncio_handler_that_swallows_cancel_is_still_reported_cancelled(fake, run_worker):
    async def deaf(data):
        for _ in range(3):
            try:
                await asyncio.sleep(0.4)
            except asyncio.CancelledError:
                pass
        return b"done"

    def setup(w):
        w.register("deaf", deaf, "asyncio")

    _, session = run_worker(slots=1, setup=setup)
    session.assign(("d", 1, call_spec("deaf")))
    session.events("d", 1, until="started")
    sent = time.monotonic()
    session.cancel("d", 1)
    assert outcome(session.events("d", 1)) == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0


async def _returns_when_cancelled(data):
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return b"partial"  # swallows the cancel and returns at once
    return b"done"


def test_asyncio_handler_that_returns_when_cancelled_is_reported_cancelled_not_succeeded(fake, run_worker):
    _, session = run_worker(slots=1, setup=lambda w: w.register("quick", _returns_when_cancelled, "asyncio"))
    session.assign(("q", 1, call_spec("quick")))
    session.events("q", 1, until="started")
    session.cancel("q", 1)
    finished = session.events("q", 1)[-1].finished
    assert finished.outcome == common_pb2.OUTCOME_CANCELLED, common_pb2.Outcome.Name(finished.outcome)
    assert finished.output == b"", "a stopped attempt reports no output"


def test_asyncio_handler_that_returns_when_it_times_out_is_reported_timed_out(fake, run_worker):
    _, session = run_worker(slots=1, setup=lambda w: w.register("quick", _returns_when_cancelled, "asyncio"))
    session.assign(("t", 1, call_spec("quick", timeout=0.3)))
    finished = session.events("t", 1)[-1].finished
    assert finished.outcome == common_pb2.OUTCOME_TIMED_OUT, common_pb2.Outcome.Name(finished.outcome)
    assert "timed out after 0.3s" in finished.error


def test_output_chunks_are_split_and_numbered(fake, run_worker):
    async def big(data, ctx):
        ctx.output(b"x" * (weft.worker.CHUNK_LIMIT * 2 + 10))
        ctx.output(b"tail")

    def setup(w):
        w.register("big", big, "asyncio")

    _, session = run_worker(setup=setup)
    session.assign(("big", 1, call_spec("big")))
    chunks = [e.output for e in session.events("big", 1) if e.WhichOneof("body") == "output"]
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert sum(len(c.data) for c in chunks) == weft.worker.CHUNK_LIMIT * 2 + 14


def test_assignment_while_draining_is_cancelled_without_running(fake, run_worker):
    ran = threading.Event()

    def work(data):
        ran.set()

    def setup(w):
        w.register("work", work, "thread")
        w.register("sleep", handlers_sleep, "asyncio")

    rw, session = run_worker(slots=2, setup=setup)
    session.assign(("long", 1, call_spec("sleep", b"0.5")))
    session.events("long", 1, until="started")
    session.drain(grace=5)
    session.expect("draining")
    session.assign(("late", 1, call_spec("work")))
    assert outcome(session.events("late", 1)) == common_pb2.OUTCOME_CANCELLED
    assert not ran.is_set()
    assert outcome(session.events("long", 1)) == common_pb2.OUTCOME_SUCCEEDED
    session.wait_ended()
    rw.thread.join(5)
    assert not rw.thread.is_alive() and rw.error is None


async def handlers_sleep(data):
    await asyncio.sleep(float(data))


def test_coordinator_silence_past_heartbeat_timeout_makes_the_worker_reconnect(fake, tmp_path):
    worker = weft.Worker(slots=1, name="silent", join_token=fake.join_token(), state_dir=str(tmp_path / "state"))
    rw = RunningWorker(worker)
    try:
        session = fake.accept()
        session.recv(skip_heartbeats=False)
        session.registered(NODE_S, heartbeat_interval=0.1, heartbeat_timeout=0.5)
        # The fake never sends a heartbeat: the worker must give up and come back.
        again = fake.accept(timeout=5)
        reg = again.recv(skip_heartbeats=False).register
        assert reg.previous_node_id == NODE_S
    finally:
        rw.stop()


def test_a_refused_register_is_a_typed_error(fake):
    import grpc

    from weft._proto import node_pb2_grpc

    class Refuse(node_pb2_grpc.NodeServiceServicer):
        def Connect(self, request_iterator, context):
            next(request_iterator)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "protocol version 1 not spoken here")

    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(4))
    node_pb2_grpc.add_NodeServiceServicer_to_server(Refuse(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        worker = weft.Worker(f"http://127.0.0.1:{port}", slots=1)
        with pytest.raises(weft.FailedPrecondition, match="protocol version"):
            asyncio.run(asyncio.wait_for(worker.serve(), 10))
    finally:
        server.stop(0)


def test_redelivery_keeps_results_within_its_window_and_bounds(monkeypatch):
    from weft.worker import outbox as worker_mod
    from weft._proto import node_pb2

    box = worker_mod.Outbox()
    monkeypatch.setattr(worker_mod, "REDELIVER_MAX", 3)
    monkeypatch.setattr(worker_mod, "REDELIVER_MAX_BYTES", 10)

    def sent(task_id: str, at: float, output: bytes = b"") -> None:
        event = node_pb2.NodeTaskEvent(task_id=task_id, attempt=1, finished=node_pb2.Finished(output=output))
        box.redeliver[(task_id, 1)] = (at, event)
        box.redeliver_bytes += len(output)
        box.prune(at)

    for i in range(4):
        sent(f"t{i}", at=100.0)
    assert [k for k, _ in box.redeliver] == ["t1", "t2", "t3"], "at most REDELIVER_MAX, oldest dropped"
    sent("big", at=100.0, output=b"x" * 8)
    sent("bigger", at=100.0, output=b"y" * 8)
    assert "big" not in [k for k, _ in box.redeliver] and box.redeliver_bytes <= 10
    box.prune(100.0 + worker_mod.REDELIVER_WINDOW + 1)
    assert not box.redeliver and box.redeliver_bytes == 0, "past the window: nothing kept"


def test_the_reaper_keeps_groups_started_and_not_gone():
    from weft.worker.reaper import watch

    lines = [b"+100\n", b"+200\n", b"-100\n", b"+300\n", b"nonsense\n", b"+1\n", b"+-5\n", b"-999\n", b"+\n", b"\n", b"+400"]
    assert watch(lines) == {200, 300, 400}


def test_the_reaper_counts_a_reused_group_id():
    from weft.worker.reaper import watch

    assert watch([b"+500\n", b"+500\n", b"-500\n"]) == {500}


def test_the_reaper_survives_a_stray_sigterm_and_kills_what_is_left_at_eof():
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import weft.worker.reaper
    from conftest import poll

    reaper = subprocess.Popen([sys.executable, "-I", "-S", weft.worker.reaper.__file__], stdin=subprocess.PIPE, start_new_session=True)

    def ignores_term() -> bool:
        status = Path(f"/proc/{reaper.pid}/status").read_text()
        ignored = int(next(l for l in status.splitlines() if l.startswith("SigIgn:")).split()[1], 16)
        return bool(ignored & (1 << (signal.SIGTERM - 1)))

    poll(ignores_term, timeout=10, what="the reaper to be ready")
    task = subprocess.Popen(["sleep", "300"], start_new_session=True)
    os.kill(reaper.pid, signal.SIGTERM)
    reaper.stdin.write(f"+{task.pid}\n".encode())
    reaper.stdin.close()
    assert reaper.wait(timeout=10) == 0, "it ended at EOF, not by SIGTERM"
    assert task.wait(timeout=10) == -signal.SIGKILL


def test_a_refused_renewal_is_asked_again_at_a_tenth_of_the_time_left_and_the_session_goes_on(tmp_path):
    from weft._proto import node_pb2

    with FakeCoordinator(cert_lifetime=4) as fake:
        fake.auto_renew = False
        worker = weft.Worker(slots=1, name="renewing", join_token=fake.join_token(), state_dir=str(tmp_path / "state"))
        rw = RunningWorker(worker)
        try:
            session = fake.accept()
            session.recv(skip_heartbeats=False)
            session.registered(session.node_id, heartbeat_interval=0.2, heartbeat_timeout=5)
            # At 2/3 of 5 s (4 s, backdated 1 s): about 2.3 s after joining.
            session.expect("renew_certificate", timeout=6)
            refused_at = time.monotonic()
            session.send(node_pb2.CoordinatorMessage(certificate=node_pb2.NodeCertificate(error="not now")))
            # A tenth of the ~1.6 s left, at least 1 s.
            session.expect("renew_certificate", timeout=4)
            assert time.monotonic() - refused_at >= 0.9
            assert not session.ended.is_set(), "a refused renewal does not end the session"
            assert (tmp_path / "state" / "node.pem").read_bytes().startswith(fake.joins[0].certificate_pem)
        finally:
            rw.stop()


def test_a_failed_address_moves_on_at_once_and_only_a_failed_round_backs_off():
    from weft.worker.reconnect import Rotation

    rotation = Rotation(3)
    assert (rotation.fail(), rotation.fail(), rotation.fail()) == (False, False, True)
    rotation.registered()
    assert (rotation.fail(), rotation.fail(), rotation.fail()) == (False, False, True)
    single = Rotation(1)
    assert single.fail() and single.fail(), "one address: every failure backs off, as before"
    worker = weft.Worker("http://127.0.0.1:1, http://127.0.0.1:2", slots=1)
    assert worker.coordinators == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert worker.coordinator == "http://127.0.0.1:1"
    worker.next_coordinator()
    assert worker.coordinator == "http://127.0.0.1:2"
    worker.next_coordinator()
    assert worker.coordinator == "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        weft.Worker("http://127.0.0.1:1,nope", slots=1)


def test_a_worker_with_several_coordinators_skips_a_dead_one_and_moves_to_the_next_at_once():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with FakeCoordinator(tls=False) as first, FakeCoordinator(tls=False) as second:
        # Far longer than the test waits: any backoff would fail it.
        worker = weft.Worker(f"{dead},{first.url},{second.url}", slots=1, reconnect_min=30, reconnect_max=30)
        rw = RunningWorker(worker)
        try:
            session = first.accept(timeout=5)
            assert session.recv(timeout=5, skip_heartbeats=False).WhichOneof("body") == "register"
            session.registered(NODE_U)
            # The coordinator goes away: the next address is dialed at once.
            session.close()
            again = second.accept(timeout=5)
            register = again.recv(timeout=5, skip_heartbeats=False).register
            assert register.previous_node_id == NODE_U
        finally:
            rw.stop()
