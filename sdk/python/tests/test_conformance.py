"""The node protocol conformance kit.

The kit plays the coordinator (``weft.testing.FakeCoordinator``, a real
NodeService server on 127.0.0.1:0) and launches the worker under test as a
subprocess pointed at it, then drives it through register, credits,
heartbeats, assign, output, failure, cancel, timeout, fencing by attempt,
drain and a coordinator restart. Every test runs against every worker
implementation: ``weft-node`` (skipped when the binary is not built), the
Python demo worker, the Python example worker, and any command in
``$WEFT_CONFORMANCE_WORKER`` (a template with ``{url}``, ``{name}``,
``{slots}``, and ``{exec}``: ``allow`` or ``deny``). So the protocol is
defined by these tests, not by one implementation.

Every worker must serve the handlers ``echo`` (output chunk + return the
input), ``sleep`` (input like ``250ms``) and ``fail`` (fail with the input as
the error), and run ``exec`` tasks when started with exec allowed (the kit
starts it so); started with exec denied it declares that in Register and
runs none.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import pytest

from weft import call_spec, exec_spec
from weft._proto import common_pb2, node_pb2
from weft.testing import FakeCoordinator, FakeSession, Ids, new_ulid

from conftest import WORKERS, Proc

SLOTS = 2
KIT_HANDLERS = {"echo", "sleep", "fail"}
NODE_ID = new_ulid()


@dataclass
class Conn:
    fake: FakeCoordinator
    proc: Proc
    session: FakeSession
    register: node_pb2.Register


@pytest.fixture(params=sorted(WORKERS))
def impl(request):
    return request.param


@pytest.fixture
def ids():
    return Ids()


@pytest.fixture
def fake():
    coordinator = FakeCoordinator()
    yield coordinator
    coordinator.stop()


def connect(fake: FakeCoordinator, spawn, impl: str, slots: int = SLOTS, exec: str = "allow") -> Conn:
    """Starts the worker (with exec tasks allowed unless ``exec="deny"``), takes
    its Register, answers Registered, waits for its credits."""
    # Over TLS, as against a real coordinator: the worker gets the CA by
    # WEFT_CA, which weft-node and the Python workers all read.
    proc = spawn(WORKERS[impl](fake.url, "conf", slots, exec), name=impl, env={"WEFT_CA": fake.ca_file or ""})
    session = fake.accept(timeout=20)
    first = session.recv(timeout=10, skip_heartbeats=False)
    assert first is not None, "worker closed the stream without a message"
    assert first.WhichOneof("body") == "register", f"first message must be Register, got {first}"
    session.registered(node_id=NODE_ID)
    session.wait_for(lambda: session.credits_granted() >= slots, timeout=5, what=f"credits for {slots} slots")
    return Conn(fake, proc, session, first.register)


def finished_of(events) -> node_pb2.Finished:
    assert events[-1].WhichOneof("body") == "finished"
    return events[-1].finished


def no_violations(conn: Conn) -> None:
    assert conn.fake.ledger.violations == [], conn.fake.ledger.violations


def test_register_is_first_with_version_1_slots_and_the_kit_handlers(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    reg = conn.register
    assert reg.protocol_version == node_pb2.PROTOCOL_VERSION_1
    assert reg.slots == SLOTS
    assert reg.name == "conf"
    assert KIT_HANDLERS <= set(reg.handlers), f"handlers {list(reg.handlers)} must include {KIT_HANDLERS}"
    assert list(reg.running) == []
    assert reg.previous_node_id == ""


def test_credits_are_granted_after_registered_and_match_free_slots(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    session = conn.session
    kinds = [r.kind for r in session.received]
    assert kinds[0] == "register"
    assert "credits" in kinds
    time.sleep(0.3)  # nothing more may be granted while idle
    assert session.credits_granted() == SLOTS
    no_violations(conn)


def test_heartbeats_arrive_every_interval(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    session = conn.session
    # Registered said every 0.2 s: several must arrive within 1.5 s.
    session.wait_for(lambda: len(session.of_kind("heartbeat")) >= 3, timeout=1.5, what="3 heartbeats")
    beats = [r.at for r in session.of_kind("heartbeat")]
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) < 1.0, f"heartbeat gaps {gaps}"


def test_call_reports_started_output_finished_with_task_id_and_attempt(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["task-echo"], 1, call_spec("echo", b"hello")))
    events = session.events(ids["task-echo"], 1)
    kinds = [e.WhichOneof("body") for e in events]
    assert kinds[0] == "started", kinds
    assert kinds.count("finished") == 1 and kinds[-1] == "finished"
    chunks = [e.output for e in events if e.WhichOneof("body") == "output"]
    assert b"".join(c.data for c in chunks) == b"hello"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(c.stream == common_pb2.OUTPUT_STREAM_STDOUT for c in chunks)
    finished = finished_of(events)
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert finished.output == b"hello"
    # The slot is granted back after Finished.
    session.wait_for(lambda: session.credits_granted() >= SLOTS + 1, timeout=2, what="the slot granted back")
    no_violations(conn)


def test_batch_assign_runs_every_task_of_the_batch(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-a"], 1, call_spec("echo", b"a")), (ids["t-b"], 3, call_spec("echo", b"b")))
    seen = {}
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        message = session.recv(timeout=5)
        assert message is not None
        if message.WhichOneof("body") == "events":
            for e in message.events.events:
                if e.WhichOneof("body") == "finished":
                    seen[(e.task_id, e.attempt)] = e.finished.output
    assert seen == {(ids["t-a"], 1): b"a", (ids["t-b"], 3): b"b"}
    session.wait_for(lambda: session.credits_granted() >= SLOTS + 2, timeout=2, what="both slots granted back")
    no_violations(conn)


def test_handler_error_is_failed_and_unknown_handler_is_start_failed(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-fail"], 2, call_spec("fail", b"boom")))
    finished = finished_of(session.events(ids["t-fail"], 2))
    assert finished.outcome == common_pb2.OUTCOME_FAILED
    assert "boom" in finished.error
    session.assign((ids["t-unknown"], 1, call_spec("no_such_handler", b"")))
    finished = finished_of(session.events(ids["t-unknown"], 1))
    assert finished.outcome == common_pb2.OUTCOME_START_FAILED
    assert "no_such_handler" in finished.error
    no_violations(conn)


def test_exec_streams_stdout_and_stderr_and_reports_the_exit_code(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-exec"], 1, exec_spec(["sh", "-c", "echo out; echo err >&2; exit 3"])))
    events = session.events(ids["t-exec"], 1)
    started = events[0]
    assert started.WhichOneof("body") == "started" and started.started.pid > 0
    out = b"".join(e.output.data for e in events if e.WhichOneof("body") == "output" and e.output.stream == common_pb2.OUTPUT_STREAM_STDOUT)
    err = b"".join(e.output.data for e in events if e.WhichOneof("body") == "output" and e.output.stream == common_pb2.OUTPUT_STREAM_STDERR)
    assert (out, err) == (b"out\n", b"err\n")
    finished = finished_of(events)
    assert finished.outcome == common_pb2.OUTCOME_FAILED
    assert finished.HasField("exit_code") and finished.exit_code == 3
    session.assign((ids["t-missing"], 1, exec_spec(["/nonexistent/weft-binary"])))
    assert finished_of(session.events(ids["t-missing"], 1)).outcome == common_pb2.OUTCOME_START_FAILED


def test_a_worker_started_with_exec_denied_declares_it_in_register(fake, spawn, impl):
    conn = connect(fake, spawn, impl, exec="deny")
    assert conn.register.exec == node_pb2.EXEC_POLICY_DENY
    assert list(conn.register.exec_allow) == []


def test_a_worker_started_with_exec_allowed_does_not_declare_deny(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    # Unset (a worker from before the field) counts as allow.
    assert conn.register.exec in (node_pb2.EXEC_POLICY_UNSPECIFIED, node_pb2.EXEC_POLICY_ALLOW)
    assert list(conn.register.exec_allow) == []


def test_an_exec_task_assigned_to_a_worker_denying_exec_is_start_failed_and_never_runs(fake, spawn, impl, ids, tmp_path):
    conn = connect(fake, spawn, impl, exec="deny")
    session = conn.session
    marker = tmp_path / "ran"
    session.assign((ids["t-denied"], 1, exec_spec(["sh", "-c", 'touch "$1"', "sh", str(marker)])))
    events = session.events(ids["t-denied"], 1)
    assert [e.WhichOneof("body") for e in events] == ["finished"], "no Started: it must not run"
    finished = finished_of(events)
    assert finished.outcome == common_pb2.OUTCOME_START_FAILED
    assert "exec" in finished.error, finished.error
    # Call tasks still run, and the slot comes back.
    session.assign((ids["t-call"], 1, call_spec("echo", b"hi")))
    assert finished_of(session.events(ids["t-call"], 1)).outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_for(lambda: session.credits_granted() >= SLOTS + 2, timeout=2, what="both slots granted back")
    assert not marker.exists(), "the refused exec task ran"


def test_exec_gets_secret_env_after_env(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    spec = exec_spec(["sh", "-c", 'printf "%s %s" "$API_KEY" "$PLAIN"'], env={"API_KEY": "plain", "PLAIN": "p"},
                     secret_env={"API_KEY": "s3cr3t"})
    session.assign((ids["t-secret"], 1, spec))
    events = session.events(ids["t-secret"], 1)
    out = b"".join(e.output.data for e in events if e.WhichOneof("body") == "output")
    assert out == b"s3cr3t p", "secret_env goes into the environment after env (the secret wins)"
    assert finished_of(events).outcome == common_pb2.OUTCOME_SUCCEEDED
    no_violations(conn)


def test_cancel_reports_cancelled_within_one_second(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-sleep"], 1, call_spec("sleep", b"30s")))
    session.events(ids["t-sleep"], 1, until="started")
    sent = time.monotonic()
    session.cancel(ids["t-sleep"], 1)
    events = session.events(ids["t-sleep"], 1, timeout=3)
    elapsed = time.monotonic() - sent
    assert finished_of(events).outcome == common_pb2.OUTCOME_CANCELLED
    assert elapsed < 1.0, f"Finished CANCELLED took {elapsed:.2f}s"
    session.wait_for(lambda: session.credits_granted() >= SLOTS + 1, timeout=2, what="the slot granted back")
    no_violations(conn)


def test_exec_cancel_kills_the_process_within_one_second(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-exec-sleep"], 1, exec_spec(["sleep", "30"])))
    session.events(ids["t-exec-sleep"], 1, until="started")
    sent = time.monotonic()
    session.cancel(ids["t-exec-sleep"], 1)
    finished = finished_of(session.events(ids["t-exec-sleep"], 1, timeout=3))
    assert finished.outcome == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0


def test_timeout_reports_timed_out(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    spec = call_spec("sleep", b"30s", timeout=0.3)
    session.assign((ids["t-timeout"], 1, spec))
    started = time.monotonic()
    finished = finished_of(session.events(ids["t-timeout"], 1, timeout=5))
    assert finished.outcome == common_pb2.OUTCOME_TIMED_OUT
    assert time.monotonic() - started < 2.0


def test_attempts_are_fenced_cancel_names_one_attempt_and_unknown_ones_are_ignored(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    # A stale attempt 1 still runs while attempt 2 of the same task is assigned.
    session.assign((ids["t-fence"], 1, call_spec("sleep", b"30s")))
    session.events(ids["t-fence"], 1, until="started")
    session.assign((ids["t-fence"], 2, call_spec("sleep", b"300ms")))
    session.cancel(ids["t-fence"], 7)  # unknown attempt: ignored
    session.cancel(ids["nobody"], 1)  # unknown task: ignored
    session.cancel(ids["t-fence"], 1)  # the stale one
    finished = {}
    deadline = time.monotonic() + 5
    while len(finished) < 2 and time.monotonic() < deadline:
        message = session.recv(timeout=5)
        assert message is not None
        if message.WhichOneof("body") == "events":
            for e in message.events.events:
                assert (e.task_id, e.attempt) in {(ids["t-fence"], 1), (ids["t-fence"], 2)}, f"event for an unknown attempt: {e}"
                if e.WhichOneof("body") == "finished":
                    finished[e.attempt] = e.finished.outcome
    assert finished == {1: common_pb2.OUTCOME_CANCELLED, 2: common_pb2.OUTCOME_SUCCEEDED}
    time.sleep(0.3)
    # Nothing more about either attempt, and no event for the unknown ones.
    for r in session.received:
        if r.kind == "events":
            for e in r.message.events.events:
                assert e.task_id != ids["nobody"] and e.attempt != 7
    no_violations(conn)


def test_drain_sends_draining_finishes_running_work_closes_and_exits(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-short"], 1, call_spec("sleep", b"300ms")))
    session.events(ids["t-short"], 1, until="started")
    session.drain(grace=10)
    session.expect("draining", timeout=3)
    granted = session.credits_granted()
    finished = finished_of(session.events(ids["t-short"], 1, timeout=5))
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_ended(timeout=5)
    assert session.credits_granted() == granted, "a draining node must not grant credits"
    code = conn.proc.wait_exit(10)
    assert code is not None, "worker did not exit after draining"
    assert code == 0


def test_drain_past_its_grace_cancels_running_work_and_reports_it(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-long"], 1, call_spec("sleep", b"30s")))
    session.events(ids["t-long"], 1, until="started")
    sent = time.monotonic()
    session.drain(grace=0.2)
    session.expect("draining", timeout=3)
    finished = finished_of(session.events(ids["t-long"], 1, timeout=5))
    assert finished.outcome == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 2.0
    session.wait_ended(timeout=5)
    assert conn.proc.wait_exit(10) is not None


def test_sigterm_drains_like_a_drain_message(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    session = conn.session
    conn.proc.signal(signal.SIGTERM)
    session.expect("draining", timeout=5)
    session.wait_ended(timeout=5)
    assert conn.proc.wait_exit(10) is not None


def test_coordinator_restart_reconnects_listing_running_attempts_and_stale_ones_are_cancelled(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-keep"], 4, call_spec("sleep", b"30s")))
    session.events(ids["t-keep"], 4, until="started")
    session.close()  # the coordinator goes away

    again = fake.accept(timeout=15)
    first = again.recv(timeout=10, skip_heartbeats=False)
    assert first is not None and first.WhichOneof("body") == "register", first
    reg = first.register
    assert reg.previous_node_id == NODE_ID
    assert [(r.task_id, r.attempt) for r in reg.running] == [(ids["t-keep"], 4)]
    assert reg.protocol_version == node_pb2.PROTOCOL_VERSION_1
    again.registered(node_id=NODE_ID)
    # One slot is still taken by the running attempt: only the other is granted.
    again.wait_for(lambda: again.credits_granted() >= SLOTS - 1, timeout=5, what="credits after reconnect")
    time.sleep(0.3)
    assert again.credits_granted() == SLOTS - 1
    # The new coordinator says that attempt is stale: the worker stops it.
    again.cancel(ids["t-keep"], 4, reason="not current")
    assert finished_of(again.events(ids["t-keep"], 4, timeout=3)).outcome == common_pb2.OUTCOME_CANCELLED
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=3, what="its slot granted back")
    # And the worker still works on the new session.
    again.assign((ids["t-after"], 1, call_spec("echo", b"still here")))
    assert finished_of(again.events(ids["t-after"], 1)).output == b"still here"
    no_violations(conn)


def test_work_that_finished_while_disconnected_is_reported_after_reconnect(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-gap"], 1, call_spec("sleep", b"500ms")))
    session.events(ids["t-gap"], 1, until="started")
    session.close()
    again = fake.accept(timeout=15)
    first = again.recv(timeout=10, skip_heartbeats=False)
    assert first is not None and first.WhichOneof("body") == "register"
    # Running or finished-but-unsent at Register: listed either way, because
    # its result has not reached any coordinator yet.
    assert [(r.task_id, r.attempt) for r in first.register.running] == [(ids["t-gap"], 1)]
    time.sleep(0.8)  # the attempt (500 ms) ends before the kit answers Registered
    again.registered(node_id=NODE_ID)
    assert finished_of(again.events(ids["t-gap"], 1, timeout=3)).outcome == common_pb2.OUTCOME_SUCCEEDED
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=3, what="all slots granted")
    no_violations(conn)


def test_a_result_sent_just_before_the_coordinator_went_away_is_listed_and_sent_again(fake, spawn, impl, ids):
    # A coordinator can crash after reading a Finished and before recording
    # it; the restarted one must get that result, or it would run the task
    # again.
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-sent"], 1, call_spec("echo", b"once")))
    assert finished_of(session.events(ids["t-sent"], 1)).output == b"once"
    session.close()

    again = fake.accept(timeout=15)
    first = again.recv(timeout=10, skip_heartbeats=False)
    assert first is not None and first.WhichOneof("body") == "register", first
    assert [(r.task_id, r.attempt) for r in first.register.running] == [(ids["t-sent"], 1)]
    again.registered(node_id=NODE_ID)
    # The result again, before any credits (the listed attempt holds a slot
    # until its Finished is in: the ledger would flag an early grant).
    assert finished_of(again.events(ids["t-sent"], 1, timeout=3)).output == b"once"
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=3, what="all slots granted")
    no_violations(conn)

    # A coordinator that answers Cancel for it (stale there) stops the
    # repeats. The worker reads in order, so once the echo assigned after
    # the Cancel has finished, the Cancel was handled.
    again.cancel(ids["t-sent"], 1, reason="not current")
    again.assign((ids["t-probe"], 1, call_spec("echo", b"probe")))
    assert finished_of(again.events(ids["t-probe"], 1)).output == b"probe"
    again.close()
    third = fake.accept(timeout=15)
    reg = third.recv(timeout=10, skip_heartbeats=False)
    assert reg is not None and reg.WhichOneof("body") == "register", reg
    assert [(r.task_id, r.attempt) for r in reg.register.running] == [(ids["t-probe"], 1)]
    third.registered(node_id=NODE_ID)
    assert finished_of(third.events(ids["t-probe"], 1, timeout=3)).output == b"probe"
    third.wait_for(lambda: third.credits_granted() >= SLOTS, timeout=5, what="all slots granted")
    no_violations(conn)
