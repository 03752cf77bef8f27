"""The Python worker's prefetch, lease and the demo worker's flags: against
the fake coordinator (what goes over the stream, exactly) and against the
real coordinator (what a user sees with ``weft get``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import weft
from weft import call_spec
from weft._proto import common_pb2
from weft.testing import FakeCoordinator, new_ulid
from weft.worker.slots import REFILL_TIME, Slots

from conftest import poll, require_binary
from test_e2e import Cluster
from test_worker import RunningWorker

NODE = new_ulid()


@pytest.fixture
def fake():
    coordinator = FakeCoordinator()
    yield coordinator
    coordinator.stop()


class Gate:
    """A thread handler that blocks until opened, and one that counts its runs."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.runs = {}
        self.lock = threading.Lock()

    def block(self, data: bytes) -> bytes:
        self.open.wait(30)
        return b"unblocked"

    def count(self, data: bytes) -> bytes:
        with self.lock:
            self.runs[data] = self.runs.get(data, 0) + 1
        return data

    def say(self, data: bytes, ctx) -> bytes:
        ctx.output(data)
        return data

    def odd_progress(self, data: bytes, ctx) -> bytes:
        ctx.progress(0.1, "\udcff")  # a lone surrogate: what an undecodable file name becomes
        return b"ok"

    def odd_failure(self, data: bytes) -> bytes:
        raise ValueError("no such file: \udcff")


@pytest.fixture
def gated(fake, tmp_path):
    """start(slots, prefetch, **worker options) -> (running worker, session, gate), with
    the worker's run time known (one short task ran), so prefetch is in use."""
    running = []
    gate = Gate()

    def start(slots: int = 1, prefetch: int = 4, **options):
        worker = weft.Worker(slots=slots, name="pf", prefetch=prefetch, join_token=fake.join_token(),
                             state_dir=str(tmp_path / f"state-{len(running)}"), **options)
        worker.register("block", gate.block, "thread")
        worker.register("count", gate.count, "thread")
        worker.register("say", gate.say, "thread")
        worker.register("odd_progress", gate.odd_progress, "thread")
        worker.register("odd_failure", gate.odd_failure, "thread")
        rw = RunningWorker(worker)
        running.append(rw)
        session = fake.accept(timeout=10)
        register = session.recv(timeout=5, skip_heartbeats=False).register
        assert register.prefetch == prefetch
        session.registered(NODE)
        session.wait_for(lambda: session.credits_granted() >= slots, what="credits")
        assert session.credits_granted() == slots, "no prefetch before an attempt has ended"
        session.assign(("warm", 1, call_spec("count", b"warm")))
        session.events("warm", 1)
        return rw, session, gate

    yield start
    gate.open.set()
    for rw in running:
        rw.stop()


def test_prefetch_follows_the_run_time_within_its_ceiling():
    slots = Slots(2, prefetch=8)
    assert slots.take_grant() == 2, "none before a run time is known"
    slots.reset_window()
    slots.record_run_time(REFILL_TIME)
    assert slots.take_grant() == 2 + 4, "two per slot cover the refill time at that run time"
    short, long = Slots(2, prefetch=8), Slots(2, prefetch=8)
    short.record_run_time(1e-6)
    long.record_run_time(60)
    assert short.take_grant() == 2 + 8, "capped at the ceiling"
    assert long.take_grant() == 2 + 2, "one per slot for long tasks"
    off = Slots(2, prefetch=0)
    off.record_run_time(1e-6)
    assert off.take_grant() == 2, "prefetch 0: never more than the slots"


def test_the_depth_of_a_pool_process_line_follows_the_run_time():
    slots = Slots(2, prefetch=8)
    assert slots.per_slot_now() == 1, "one before a run time is known"
    slots.record_run_time(REFILL_TIME / 4)
    assert slots.per_slot_now() == 5, "enough to cover the refill time"
    long = Slots(2, prefetch=8)
    long.record_run_time(60)
    assert long.per_slot_now() == 1, "one behind a long call"


def test_a_prefetching_worker_queues_beyond_its_slot_and_runs_one_at_a_time(gated):
    _, session, gate = gated(slots=1, prefetch=4)
    session.wait_for(lambda: session.credits_granted() >= 1 + 1 + 4, what="credits beyond the slot")
    session.assign(("a", 1, call_spec("block")), ("b", 1, call_spec("count", b"b")))
    session.events("a", 1, until="started")
    # "b" is held queued: assigned, not started, while "a" holds the slot.
    assert b"b" not in gate.runs
    assert session.attempt_events("b", 1) == []
    gate.open.set()
    assert session.events("a", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert session.events("b", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert gate.runs[b"b"] == 1
    assert session.ledger.violations == []


def test_a_queued_attempt_is_listed_on_reconnect_and_runs_once(fake, gated):
    _, session, gate = gated(slots=1, prefetch=4)
    session.wait_for(lambda: session.credits_granted() >= 6, what="credits beyond the slot")
    session.assign(("a", 1, call_spec("block")), ("q", 1, call_spec("count", b"q")))
    session.events("a", 1, until="started")
    session.close()  # the coordinator restarts
    again = fake.accept(timeout=10)
    register = again.recv(timeout=5, skip_heartbeats=False).register
    listed = {(r.task_id, r.attempt) for r in register.running}
    assert {("a", 1), ("q", 1)} <= listed, listed
    again.registered(NODE)
    gate.open.set()
    assert again.events("a", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert again.events("q", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert gate.runs[b"q"] == 1, "ran exactly once"
    assert fake.ledger.violations == []


def test_a_cancelled_queued_attempt_is_reported_without_running(gated):
    _, session, gate = gated(slots=1, prefetch=4)
    session.wait_for(lambda: session.credits_granted() >= 6, what="credits beyond the slot")
    session.assign(("a", 1, call_spec("block")), ("q", 1, call_spec("count", b"q")))
    session.events("a", 1, until="started")
    session.cancel("q", 1, "not wanted")
    events = session.events("q", 1)
    assert [e.WhichOneof("body") for e in events] == ["finished"], "never started"
    assert events[-1].finished.outcome == common_pb2.OUTCOME_CANCELLED
    assert events[-1].finished.error == "not wanted"
    gate.open.set()
    assert session.events("a", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert b"q" not in gate.runs
    assert session.ledger.violations == []


def test_a_drain_returns_queued_attempts_at_once_and_finishes_the_running_one(gated):
    rw, session, gate = gated(slots=1, prefetch=4)
    session.wait_for(lambda: session.credits_granted() >= 6, what="credits beyond the slot")
    session.assign(("a", 1, call_spec("block")), ("q1", 1, call_spec("count", b"q1")),
                   ("q2", 1, call_spec("count", b"q2")))
    session.events("a", 1, until="started")
    granted = session.credits_granted()
    session.drain(grace=10)
    session.expect("draining")
    for task in ("q1", "q2"):
        events = session.events(task, 1)
        assert [e.WhichOneof("body") for e in events] == ["finished"]
        assert events[-1].finished.outcome == common_pb2.OUTCOME_CANCELLED
        assert "before it started" in events[-1].finished.error
    assert not session.ended.is_set(), "the running attempt still runs"
    gate.open.set()
    assert session.events("a", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_ended()
    rw.thread.join(5)
    assert not rw.thread.is_alive() and rw.error is None
    assert session.credits_granted() == granted, "a draining worker grants nothing"
    assert b"q1" not in gate.runs and b"q2" not in gate.runs


def test_a_thread_handlers_output_precedes_its_finished_when_calls_end_while_the_loop_is_busy(gated):
    rw, session, gate = gated(slots=1, prefetch=4)
    session.wait_for(lambda: session.credits_granted() >= 6, what="credits beyond the slot")
    session.assign(("x", 1, call_spec("block")), ("y", 1, call_spec("say", b"from y")))
    session.events("x", 1, until="started")
    threads = rw.worker._attempts.threads
    # "y" waits ahead on the threads: the thread that ends "x" begins it at once.
    poll(lambda: any(item[2].task_id == "y" for item in list(threads.ahead)), what="y handed down ahead")
    stalled, release = threading.Event(), threading.Event()

    def stall() -> None:
        stalled.set()
        release.wait(30)

    rw.loop.call_soon_threadsafe(stall)
    assert stalled.wait(10)
    try:
        gate.open.set()  # "x" ends, then "y" runs, sends its output and ends, all while the loop waits
        poll(lambda: any(item[0] is not None and item[0].task_id == "y" for item in list(threads._done)),
             what="y's end handed to the loop")
    finally:
        release.set()
    events = session.events("y", 1)
    kinds = [e.WhichOneof("body") for e in events]
    assert "output" in kinds, kinds
    assert kinds.index("output") < kinds.index("finished"), kinds
    assert b"".join(e.output.data for e in events if e.WhichOneof("body") == "output") == b"from y"
    assert session.ledger.violations == []


def test_a_progress_message_that_utf8_cannot_carry_neither_loses_nor_fails_the_calls_ending_with_it(gated):
    rw, session, gate = gated(slots=1, prefetch=4)
    session.wait_for(lambda: session.credits_granted() >= 6, what="credits beyond the slot")
    session.assign(("x", 1, call_spec("block")), ("y", 1, call_spec("odd_progress")))
    session.events("x", 1, until="started")
    threads = rw.worker._attempts.threads
    poll(lambda: any(item[2].task_id == "y" for item in list(threads.ahead)), what="y handed down ahead")
    stalled, release = threading.Event(), threading.Event()

    def stall() -> None:
        stalled.set()
        release.wait(30)

    rw.loop.call_soon_threadsafe(stall)
    assert stalled.wait(10)
    try:
        gate.open.set()  # "x" ends, "y" sends its progress and ends: one batch for the loop
        poll(lambda: any(item[0] is not None and item[0].task_id == "y" for item in list(threads._done)),
             what="y's end handed to the loop")
    finally:
        release.set()
    assert session.events("x", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    events = session.events("y", 1)
    assert events[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED, events[-1]
    assert [e.progress.message for e in events if e.WhichOneof("body") == "progress"] == ["\ufffd"]
    # Both slots came back: the worker runs the next call.
    session.assign(("z", 1, call_spec("count", b"z")))
    assert session.events("z", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert session.ledger.violations == []


def test_an_exception_whose_message_utf8_cannot_carry_fails_the_attempt_with_a_readable_error(gated):
    _, session, _ = gated(slots=1, prefetch=4)
    session.assign(("f", 1, call_spec("odd_failure")))
    done = session.events("f", 1)[-1].finished
    assert done.outcome == common_pb2.OUTCOME_FAILED, done
    assert done.error.startswith("ValueError: no such file: \ufffd"), done.error
    session.assign(("z", 1, call_spec("count", b"z")))
    assert session.events("z", 1)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert session.ledger.violations == []


def test_prefetch_zero_never_grants_beyond_the_slots(gated):
    _, session, gate = gated(slots=2, prefetch=0)
    session.assign(("a", 1, call_spec("block")), ("b", 1, call_spec("block")))
    session.events("a", 1, until="started")
    session.events("b", 1, until="started")
    gate.open.set()
    session.events("a", 1)
    session.events("b", 1)
    session.wait_for(lambda: session.credits_granted() >= 2 + 1 + 2, what="slots granted back")
    assert session.credits_granted() == 2 + 1 + 2
    assert session.ledger.violations == []


async def sleepy(data: bytes) -> bytes:
    import asyncio

    await asyncio.sleep(30)
    return b"woke"


def test_the_lease_stops_attempts_once_the_coordinator_is_silent_that_long(fake, tmp_path):
    worker = weft.Worker(slots=1, name="leased", lease=1.0, prefetch=0, join_token=fake.join_token(),
                         state_dir=str(tmp_path / "state"))
    worker.register("sleepy", sleepy, "asyncio")
    rw = RunningWorker(worker)
    try:
        session = fake.accept(timeout=10)
        session.recv(timeout=5, skip_heartbeats=False)
        # A heartbeat timeout far longer than the lease: the lease decides.
        session.registered(NODE, heartbeat_interval=0.2, heartbeat_timeout=30)
        session.wait_for(lambda: session.credits_granted() >= 1, what="credits")
        session.assign(("s", 1, call_spec("sleepy")))
        session.events("s", 1, until="started")
        # Then silence: past the lease the attempt is stopped and the session ends.
        session.wait_ended(timeout=10)
        again = fake.accept(timeout=10)
        again.recv(timeout=5, skip_heartbeats=False)
        again.registered(NODE, heartbeat_interval=0.2, heartbeat_timeout=30)
        events = session.attempt_events("s", 1) + again.events("s", 1)
        finished = [e.finished for e in events if e.WhichOneof("body") == "finished"]
        assert len(finished) == 1
        assert finished[0].outcome == common_pb2.OUTCOME_CANCELLED
        assert finished[0].error.startswith("lease expired"), finished[0].error
    finally:
        rw.stop()


def test_worker_options_are_checked():
    with pytest.raises(ValueError, match="prefetch"):
        weft.Worker("http://127.0.0.1:1", slots=1, prefetch=-1)
    with pytest.raises(TypeError, match="prefetch"):
        weft.Worker("http://127.0.0.1:1", slots=1, prefetch="many")
    with pytest.raises(ValueError, match="lease"):
        weft.Worker("http://127.0.0.1:1", slots=1, lease=0)
    assert weft.Worker("http://127.0.0.1:1", slots=3).prefetch == 3 * 256


def demo(tmp_path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weft.worker_demo", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_the_demo_worker_explains_its_flags(tmp_path):
    out = demo(tmp_path, "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag, says in (("--prefetch", "0 disables"), ("--lease", "heartbeat timeout"),
                       ("--log-format", "json")):
        assert flag in text and says in text, (flag, text)


@pytest.mark.parametrize("args, says", [
    (["--prefetch", "-1"], "--prefetch"),
    (["--prefetch", "many"], "--prefetch"),
    (["--lease", "0s"], "--lease"),
    (["--lease", "soon"], "--lease"),
    (["--log-format", "xml"], "--log-format"),
    (["--slots", "0"], "--slots"),
])
def test_the_demo_worker_refuses_bad_values_with_a_usage_error(tmp_path, args, says):
    out = demo(tmp_path, "--coordinator", "http://127.0.0.1:1", *args)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_demo_worker_logs_json_lines(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "weft.worker_demo", "--coordinator", "http://127.0.0.1:1",
                             "--log-format", "json", "--prefetch", "0"], stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        line = proc.stderr.readline()
        entry = json.loads(line)
        assert entry["level"] == "INFO" and entry["target"].startswith("weft")
        assert "connecting to" in entry["fields"]["message"]
    finally:
        proc.kill()
        proc.wait(10)


# -- against the real coordinator -----------------------------------------------


@pytest.fixture
def cluster(spawn, tmp_path):
    c = Cluster(spawn, tmp_path)
    yield c
    c.client.close()


def demo_worker(cluster: Cluster, name: str, *flags: str):
    argv = [sys.executable, "-m", "weft.worker_demo", "--coordinator", cluster.url, "--ca-file", cluster.ca_file,
            "--name", name, "--slots", "1", *flags]
    if cluster.joins:
        argv += ["--join", cluster.join_token(), "--state-dir", str(cluster.state_dir(name))]
    return cluster._spawn(argv, name=name)


@pytest.mark.parametrize("prefetch", [None, "0"])
def test_weft_get_shows_a_second_task_held_by_a_one_slot_worker_only_with_prefetch(cluster, prefetch):
    require_binary("weft-coordinator")
    demo_worker(cluster, "one", *(["--prefetch", prefetch] if prefetch else []))
    cluster.wait_nodes("one")
    client = cluster.client
    # Short tasks first: the worker learns they are short, and prefetches.
    assert list(client.map("noop", [b"x"] * 20)) == [b"x"] * 20
    first = client.submit_call("sleep", b"30s")
    poll(lambda: client.get(first).state == weft.TaskState.RUNNING, timeout=20, what="the first task running")
    second = client.submit_call("noop", b"second")
    if prefetch is None:
        held = poll(lambda: (lambda t: t if t.state == weft.TaskState.ASSIGNED else None)(client.get(second)),
                    timeout=20, what="the second task assigned")
        assert held.node_name == "one"
        shown = cluster.weft("get", second)
        assert shown.returncode == 0 and b"ASSIGNED" in shown.stdout.upper() and b"one" in shown.stdout, shown
    else:
        waiting = poll(lambda: (lambda t: t if t.pending_reason else None)(client.get(second)), timeout=20,
                       what="the second task waiting")
        assert waiting.state == weft.TaskState.QUEUED and "free slot" in waiting.pending_reason
        assert [n.slots_used for n in client.nodes() if n.name == "one"] == [1]
    assert client.get(first).state == weft.TaskState.RUNNING, "the first still runs"
    client.cancel(first)
    done = poll(lambda: (lambda t: t if t.state.is_final else None)(client.get(second)), timeout=20,
                what="the second task done")
    assert done.state == weft.TaskState.SUCCEEDED and done.output == b"second"


def pool_worker(fake, tmp_path, name: str, slots: int, prefetch: int):
    """A worker with one pool process serving the process handlers ``hang`` and ``touch``,
    registered with the fake and holding its first credits: (running worker, session). The
    caller stops the worker."""
    import handlers

    worker = weft.Worker(slots=slots, name=name, prefetch=prefetch, process_workers=1, join_token=fake.join_token(),
                         state_dir=str(tmp_path / "state"))
    worker.register("hang", handlers.hang, "process")
    worker.register("touch", handlers.touch, "process")
    rw = RunningWorker(worker)
    try:
        session = fake.accept(timeout=10)
        session.recv(timeout=5, skip_heartbeats=False)
        session.registered(NODE)
        session.wait_for(lambda: session.credits_granted() >= slots, what="credits")
    except BaseException:
        rw.stop()
        raise
    return rw, session


def test_a_call_waiting_in_a_busy_pool_process_is_taken_back_without_killing_the_running_one(fake, tmp_path):
    import os

    rw, session = pool_worker(fake, tmp_path, "pool", slots=2, prefetch=0)
    try:
        marker = tmp_path / "touched"
        # One pool process: "t" waits behind "h" in it.
        session.assign(("h", 1, call_spec("hang")), ("t", 1, call_spec("touch", str(marker).encode())))
        pid = session.events("h", 1, until="started", timeout=30)[-1].started.pid
        session.cancel("t", 1)
        events = session.events("t", 1)
        assert [e.WhichOneof("body") for e in events] == ["finished"], "taken back: never started"
        assert events[-1].finished.outcome == common_pb2.OUTCOME_CANCELLED
        os.kill(pid, 0)  # the running call's process lives on
        assert session.attempt_events("h", 1)[-1].WhichOneof("body") == "started"
        session.cancel("h", 1)
        assert session.events("h", 1)[-1].finished.outcome == common_pb2.OUTCOME_CANCELLED
        # The pool recovers; what was taken back never ran.
        again = tmp_path / "again"
        session.wait_for(lambda: session.credits_granted() >= 4, what="slots back")
        session.assign(("u", 1, call_spec("touch", str(again).encode())))
        assert session.events("u", 1, timeout=30)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
        assert again.exists() and not marker.exists()
    finally:
        rw.stop()


def test_a_handler_thread_begins_the_next_call_handed_down_before_the_loop_sees_the_last_end():
    import asyncio

    from weft.worker.attempt import HandlerThreads

    class Item:
        ran_for = None

    loop = asyncio.new_event_loop()
    threads = HandlerThreads(1, loop)
    seen = []
    threads.began = lambda item: seen.append(("began", item))
    gate = threading.Event()

    def fn(x):
        gate.wait(5)
        return x

    def done(item, ok, value):
        seen.append(("done", item, value))

    a, b = Item(), Item()
    threads.submit(fn, (1,), a, done)
    threads.put_ahead(fn, (2,), b, done)
    gate.set()

    async def ended():
        while len(seen) < 3:
            await asyncio.sleep(0.005)

    try:
        loop.run_until_complete(asyncio.wait_for(ended(), 10))
    finally:
        threads.shutdown()
        loop.close()
    assert seen == [("began", b), ("done", a, 1), ("done", b, 2)]
    assert a.ran_for is not None and b.ran_for is not None


@pytest.mark.parametrize("how", ["cancel", "drain"])
def test_a_queued_process_call_handed_down_behind_a_running_one_is_returned_without_running(fake, tmp_path, how):
    import os

    rw, session = pool_worker(fake, tmp_path, "ahead", slots=1, prefetch=4)
    try:
        warm = tmp_path / "warm"
        session.assign(("w", 1, call_spec("touch", str(warm).encode())))
        assert session.events("w", 1, timeout=30)[-1].finished.outcome == common_pb2.OUTCOME_SUCCEEDED
        # Its run time (the pool process's start included) leaves room for one more at least.
        session.wait_for(lambda: session.credits_granted() >= 1 + 1 + 1, what="credits beyond the slot")
        marker = tmp_path / "touched"
        # One slot, one pool process: "t" is queued, handed down behind "h".
        session.assign(("h", 1, call_spec("hang")), ("t", 1, call_spec("touch", str(marker).encode())))
        pid = session.events("h", 1, until="started", timeout=30)[-1].started.pid
        if how == "cancel":
            session.cancel("t", 1)
        else:
            session.drain(grace=30)
        events = session.events("t", 1)
        assert [e.WhichOneof("body") for e in events] == ["finished"], "never started"
        assert events[-1].finished.outcome == common_pb2.OUTCOME_CANCELLED
        os.kill(pid, 0)  # the running call's process lives on
        assert session.attempt_events("h", 1)[-1].WhichOneof("body") == "started"
        session.cancel("h", 1)
        assert session.events("h", 1)[-1].finished.outcome == common_pb2.OUTCOME_CANCELLED
        if how == "drain":
            session.wait_ended(timeout=10)
        assert not marker.exists()
        assert session.ledger.violations == []
    finally:
        rw.stop()
