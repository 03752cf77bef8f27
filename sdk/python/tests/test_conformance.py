"""The node protocol conformance kit.

The kit plays the coordinator (``weft.testing.FakeCoordinator``, a real
NodeService server on 127.0.0.1:0) and launches the worker under test as a
subprocess pointed at it, then drives it through every rule of
``proto/README.md`` a worker must keep; the table in its "Checking your
worker" section maps each rule to the check here that covers it. Besides
what each check asserts, every message the worker sends is checked as it
arrives (credits, event order, seq, message size: ``weft.testing``), and a
breach fails the check. Every test runs against every worker
implementation: ``weft-node`` (skipped when the binary is not built), the
Python demo worker, the Python example worker, and any command in
``$WEFT_CONFORMANCE_WORKER`` (a template with ``{url}``, ``{name}``,
``{slots}``, ``{exec}``: ``allow`` or ``deny``, ``{join}`` and
``{state_dir}``). So the protocol is defined by these tests, not by one
implementation.

The kit authenticates nodes as a coordinator does: every worker is started
with ``--join TOKEN`` (a token the kit encodes: its address and its test
CA's pin) and ``--state-dir`` (a temp dir), joins (``NodeService.Join``),
and connects over mutual TLS with the certificate it got. Joining itself
is tested too: the state dir's layout, a restart without a token, a wrong
pin, a client token, no certificate, a revoked node, renewal.

Every worker must serve three handlers: ``echo`` (output chunk + return
the input), ``sleep`` (input like ``250ms``) and ``fail`` (fail with the
input as the error), under those names or, for the custom worker, the names
``$WEFT_CONFORMANCE_HANDLERS`` maps them to (``echo=my_echo,sleep=nap,...``;
roles not named keep theirs): no check calls a handler by any other name
(but ``no_such_handler``, which must be unknown). Exec tasks run when the
worker is started with exec allowed; started with exec denied it declares
that in Register and runs none. A custom command without ``{exec}`` has one
policy, ``$WEFT_CONFORMANCE_EXEC`` (``deny`` by default: a handler-only
worker), and the checks that need the other are skipped, saying so.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from weft import call_spec, exec_spec
from weft._proto import common_pb2, node_pb2
from weft.testing import FakeCoordinator, FakeSession, Ids, new_ulid

from conftest import WORKERS, Proc, require_join

SLOTS = 2
KIT_HANDLERS = {"echo", "sleep", "fail"}
NODE_ID = new_ulid()


def _custom_handlers(text: str) -> dict:
    """``$WEFT_CONFORMANCE_HANDLERS``: ``role=name`` pairs, comma-separated."""
    names = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        role, sep, name = pair.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or role not in KIT_HANDLERS or not name:
            raise ValueError(
                f"WEFT_CONFORMANCE_HANDLERS: {pair!r} is not ROLE=NAME with ROLE one of {sorted(KIT_HANDLERS)}"
            )
        names[role] = name
    return names


#: The custom worker's names for the kit's handlers.
CUSTOM_HANDLERS = _custom_handlers(os.environ.get("WEFT_CONFORMANCE_HANDLERS", ""))
#: The names the worker under test serves the kit's handlers as (set per test).
_names: dict = {}


@pytest.fixture(autouse=True)
def _handler_names(request):
    callspec = getattr(request.node, "callspec", None)
    impl = callspec.params.get("impl") if callspec else None
    _names.clear()
    if impl == "custom":
        _names.update(CUSTOM_HANDLERS)


def handler(role: str) -> str:
    """The name the worker under test serves the kit's ``role`` handler as."""
    return _names.get(role, role)


def kit_call(role: str, input: bytes, **options):
    """A call of the kit's ``role`` handler, by the worker's name for it."""
    return call_spec(handler(role), input, **options)


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


#: What the kit's workers must not inherit from the environment running it.
CLEAN_ENV = {"WEFT_COORDINATOR": None, "WEFT_CA": None, "WEFT_CA_PIN": None, "WEFT_JOIN_TOKEN": None,
             "WEFT_NODE_STATE_DIR": None,
             # Every worker without prefetch (weft-node --prefetch 0): the kit counts credits slot by slot.
             "WEFT_NODE_PREFETCH": "0"}


@pytest.fixture
def fake(tmp_path, request):
    coordinator = FakeCoordinator(node_id=NODE_ID)
    coordinator.state_dir = tmp_path / "node-state"  # where the kit's worker keeps its identity
    yield coordinator
    coordinator.stop()
    # Every check also checks the rules each message must keep (credits,
    # event order, seq, message size: see weft.testing).
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.passed:
        coordinator.ledger.check()


def start(fake: FakeCoordinator, spawn, impl: str, slots: int = SLOTS, exec: str = None, token: str = None,
          join: bool = True, env: dict = None, prefetch: int = 0) -> Proc:
    """Starts the worker with a join token (``token``, else a fresh one;
    none with ``join=False``) and the kit's state dir. ``exec``: "allow" or
    "deny" for a check that needs that policy (a custom worker that has
    only the other is skipped), None for one that runs no exec task.
    ``prefetch``: what a worker started with ``--prefetch 0`` (weft-node) is
    started with instead, also given as ``$WEFT_NODE_PREFETCH``; a worker
    that takes neither keeps its own."""
    if token is None and (join or impl == "custom"):
        # A custom command always has {join}: restarted, the worker must
        # use its state dir and leave the token unused.
        token = fake.join_token()
    argv = WORKERS[impl](fake.url, "conf", slots, exec, join=token, state_dir=str(fake.state_dir))
    if prefetch:
        env = {**(env or {}), "WEFT_NODE_PREFETCH": str(prefetch)}
        if "--prefetch" in argv:
            argv[argv.index("--prefetch") + 1] = str(prefetch)
    return spawn(argv, name=impl, env={**CLEAN_ENV, **(env or {})})


def connect(fake: FakeCoordinator, spawn, impl: str, slots: int = SLOTS, exec: str = None, join: bool = True,
            env: dict = None, prefetch: int = 0, **registered) -> Conn:
    """Starts the worker (``exec``: as :func:`start`; joining with a fresh
    token, or with ``join=False`` from the state dir alone), takes its
    Register, answers Registered (``registered``: its fields, see
    ``FakeSession.registered``), waits for its credits."""
    proc = start(fake, spawn, impl, slots, exec, join=join, env=env, prefetch=prefetch)
    session = fake.accept(timeout=20)
    first = session.recv(timeout=10, skip_heartbeats=False)
    assert first is not None, "worker closed the stream without a message"
    assert first.WhichOneof("body") == "register", f"first message must be Register, got {first}"
    session.registered(node_id=NODE_ID, **registered)
    session.wait_for(lambda: session.credits_granted() >= slots, timeout=5, what=f"credits for {slots} slots")
    return Conn(fake, proc, session, first.register)


def finished_of(events) -> node_pb2.Finished:
    assert events[-1].WhichOneof("body") == "finished"
    return events[-1].finished


def no_violations(conn: Conn) -> None:
    conn.fake.ledger.check()


def capacity(conn: Conn) -> int:
    """What the worker may have granted in all: its slots and its prefetch."""
    return conn.register.slots + conn.register.prefetch


def test_register_is_first_with_version_1_slots_and_the_kit_handlers(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    reg = conn.register
    assert reg.protocol_version == node_pb2.PROTOCOL_VERSION_1
    assert reg.slots == SLOTS
    assert reg.name == "conf"
    wanted = {handler(role) for role in KIT_HANDLERS}
    assert wanted <= set(reg.handlers), f"handlers {list(reg.handlers)} must include {sorted(wanted)}"
    assert list(reg.running) == []
    # A joined node may name its own id (the certificate's) from the start.
    assert reg.previous_node_id in ("", NODE_ID)


def test_credits_are_granted_after_registered_and_match_free_slots(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    session = conn.session
    kinds = [r.kind for r in session.received]
    assert kinds[0] == "register"
    assert "credits" in kinds
    time.sleep(0.3)  # nothing more may be granted while idle
    assert SLOTS <= session.credits_granted() <= capacity(conn)
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
    session.assign((ids["task-echo"], 1, kit_call("echo", b"hello")))
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
    session.assign((ids["t-a"], 1, kit_call("echo", b"a")), (ids["t-b"], 3, kit_call("echo", b"b")))
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
    session.assign((ids["t-fail"], 2, kit_call("fail", b"boom")))
    finished = finished_of(session.events(ids["t-fail"], 2))
    assert finished.outcome == common_pb2.OUTCOME_FAILED
    assert "boom" in finished.error
    session.assign((ids["t-unknown"], 1, call_spec("no_such_handler", b"")))
    finished = finished_of(session.events(ids["t-unknown"], 1))
    assert finished.outcome == common_pb2.OUTCOME_START_FAILED
    assert "no_such_handler" in finished.error
    no_violations(conn)


def test_exec_streams_stdout_and_stderr_and_reports_the_exit_code(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow")
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
    conn = connect(fake, spawn, impl, exec="allow")
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
    session.assign((ids["t-call"], 1, kit_call("echo", b"hi")))
    assert finished_of(session.events(ids["t-call"], 1)).outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_for(lambda: session.credits_granted() >= SLOTS + 2, timeout=2, what="both slots granted back")
    assert not marker.exists(), "the refused exec task ran"


def test_exec_gets_secret_env_after_env(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow")
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
    session.assign((ids["t-sleep"], 1, kit_call("sleep", b"30s")))
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
    conn = connect(fake, spawn, impl, exec="allow")
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
    spec = kit_call("sleep", b"30s", timeout=0.3)
    session.assign((ids["t-timeout"], 1, spec))
    started = time.monotonic()
    finished = finished_of(session.events(ids["t-timeout"], 1, timeout=5))
    assert finished.outcome == common_pb2.OUTCOME_TIMED_OUT
    assert time.monotonic() - started < 2.0


def test_attempts_are_fenced_cancel_names_one_attempt_and_unknown_ones_are_ignored(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    # A stale attempt 1 still runs while attempt 2 of the same task is assigned.
    session.assign((ids["t-fence"], 1, kit_call("sleep", b"30s")))
    session.events(ids["t-fence"], 1, until="started")
    session.assign((ids["t-fence"], 2, kit_call("sleep", b"300ms")))
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
    session.assign((ids["t-short"], 1, kit_call("sleep", b"300ms")))
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
    session.assign((ids["t-long"], 1, kit_call("sleep", b"30s")))
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
    session.assign((ids["t-keep"], 4, kit_call("sleep", b"30s")))
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
    assert SLOTS - 1 <= again.credits_granted() <= capacity(conn) - 1
    # The new coordinator says that attempt is stale: the worker stops it.
    again.cancel(ids["t-keep"], 4, reason="not current")
    assert finished_of(again.events(ids["t-keep"], 4, timeout=3)).outcome == common_pb2.OUTCOME_CANCELLED
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=3, what="its slot granted back")
    # And the worker still works on the new session.
    again.assign((ids["t-after"], 1, kit_call("echo", b"still here")))
    assert finished_of(again.events(ids["t-after"], 1)).output == b"still here"
    no_violations(conn)


def test_work_that_finished_while_disconnected_is_reported_after_reconnect(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-gap"], 1, kit_call("sleep", b"500ms")))
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
    session.assign((ids["t-sent"], 1, kit_call("echo", b"once")))
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
    again.assign((ids["t-probe"], 1, kit_call("echo", b"probe")))
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


# -- every other rule of proto/README.md a worker must honour ------------------
#
# The table in proto/README.md ("Checking your worker") maps each rule to
# the check below (or above) that covers it.


def take_register(session: FakeSession) -> node_pb2.Register:
    """The session's first message, which must be Register."""
    first = session.recv(timeout=10, skip_heartbeats=False)
    assert first is not None, "the worker closed the stream without a message"
    assert first.WhichOneof("body") == "register", f"first message must be Register, got {first}"
    return first.register


def listed(register: node_pb2.Register) -> list:
    return [(r.task_id, r.attempt) for r in register.running]


def output_of(events) -> list:
    """(seq, data) of each output chunk among ``events``."""
    return [(e.output.seq, e.output.data) for e in events if e.WhichOneof("body") == "output"]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has stopped running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


def background_pid(session: FakeSession, task_id: str, attempt: int) -> int:
    """The pid an exec task of ``sh -c 'sleep 30 & echo $!; wait'`` printed first."""
    events = session.events(task_id, attempt, until="output", timeout=5)
    return int(output_of(events)[0][1].split()[0])


#: An exec task whose shell waits on a child in its process group.
WAITS_ON_A_CHILD = ["sh", "-c", "sleep 30 & echo $!; wait"]


def test_nothing_but_register_is_sent_before_registered(fake, spawn, impl):
    start(fake, spawn, impl)
    session = fake.accept(timeout=20)
    take_register(session)
    time.sleep(1.0)  # the kit holds Registered back
    assert [r.kind for r in session.received] == ["register"], "nothing but Register until Registered"
    session.registered(node_id=NODE_ID)
    session.wait_for(lambda: session.credits_granted() >= SLOTS, timeout=5, what="credits after Registered")


def test_without_registered_the_worker_drops_the_stream_and_dials_again(fake, spawn, impl):
    start(fake, spawn, impl)
    session = fake.accept(timeout=20)
    take_register(session)
    began = time.monotonic()
    again = fake.accept(timeout=25)  # ~10 s without Registered, then its backoff
    session.wait_ended(timeout=5)
    assert time.monotonic() - began >= 2.0, "it waits for Registered a while (the page says ~10 s)"
    assert take_register(again).name == "conf"
    again.registered(node_id=NODE_ID)
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=5, what="credits on the second stream")


@pytest.mark.parametrize("code,details", [
    ("INVALID_ARGUMENT", "node declares 2 slots; this coordinator accepts at most 1 (--max-node-slots)"),
    ("FAILED_PRECONDITION", "unknown protocol version 1"),
])
def test_a_refused_register_stops_the_worker_without_dialing_again(fake, spawn, impl, code, details):
    import grpc

    proc = start(fake, spawn, impl)
    session = fake.accept(timeout=20)
    take_register(session)
    session.abort(getattr(grpc.StatusCode, code), details)
    out = exits_refused(proc)
    assert details in out, f"the worker must report the refusal:\n{out}"
    assert len(fake.all_sessions) == 1, "reconnecting will not help: it must not dial again"


def test_every_attempt_sent_is_started_within_the_start_timeout(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, start_timeout=1.0)
    session = conn.session
    tasks = [ids[f"t-start-{i}"] for i in range(SLOTS)]
    session.assign(*[(task, 1, kit_call("sleep", b"300ms")) for task in tasks])
    sent = time.monotonic()
    for task in tasks:
        session.events(task, 1, until="started", timeout=1.0)
    assert time.monotonic() - sent < 1.0, "Started within Registered.start_timeout of the Assign"
    for task in tasks:
        assert finished_of(session.events(task, 1)).outcome == common_pb2.OUTCOME_SUCCEEDED
    no_violations(conn)


def test_a_worker_that_queues_runs_at_most_its_slots_and_cancels_queued_attempts_without_running_them(
        fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, prefetch=4)
    session = conn.session
    session.keepalive()
    if conn.register.prefetch == 0:
        pytest.skip("the worker declares no prefetch (Register.prefetch = 0): it holds no queued attempts")
    # A worker may grant its prefetch only once it has seen how long tasks
    # take (weft-node does): a few short ones first.
    for i in range(4):
        session.assign((ids[f"t-warm-{i}"], 1, kit_call("echo", b"warm")))
        finished_of(session.events(ids[f"t-warm-{i}"], 1))
    try:
        session.wait_for(lambda: fake.ledger.window > SLOTS, timeout=5, what="credits beyond the slots")
    except AssertionError:
        pytest.skip(f"the worker declares prefetch {conn.register.prefetch} but never granted beyond its slots")
    running = [ids[f"t-run-{i}"] for i in range(SLOTS)]
    session.assign(*[(task, 1, kit_call("sleep", b"2s")) for task in running], (ids["t-queued"], 1,
                                                                                kit_call("echo", b"queued")))
    for task in running:
        session.events(task, 1, until="started")
    time.sleep(0.5)
    assert session.attempt_events(ids["t-queued"], 1) == [], "queued while every slot is busy: not started"
    sent = time.monotonic()
    session.cancel(ids["t-queued"], 1)
    events = session.events(ids["t-queued"], 1, timeout=2)
    assert [e.WhichOneof("body") for e in events] == ["finished"], "a queued attempt cancelled never ran"
    assert finished_of(events).outcome == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0
    # Queued attempts are listed on reconnect with the running ones.
    session.wait_for(lambda: fake.ledger.window >= 1, timeout=3, what="the cancelled attempt's slot granted back")
    session.assign((ids["t-queued-2"], 1, kit_call("echo", b"queued")))
    time.sleep(0.3)
    session.close()
    again = fake.accept(timeout=15)
    held = {(task, 1) for task in running} | {(ids["t-queued-2"], 1)}
    assert held <= set(listed(take_register(again))), "running and queued attempts are listed"
    again.registered(node_id=NODE_ID)
    again.keepalive()
    # Draining reports the queued attempt cancelled at once, without running it.
    sent = time.monotonic()
    again.drain(grace=10)
    again.expect("draining", timeout=3)
    events = again.events(ids["t-queued-2"], 1, timeout=2)
    assert [e.WhichOneof("body") for e in events] == ["finished"]
    assert finished_of(events).outcome == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0, "at once, not after the running ones"
    for task in running:
        assert finished_of(again.events(task, 1, timeout=5)).outcome == common_pb2.OUTCOME_SUCCEEDED
    again.wait_ended(timeout=5)
    no_violations(conn)


def test_an_assignment_of_an_attempt_it_already_runs_is_ignored(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    task = ids["t-twice"]
    session.assign((task, 1, kit_call("sleep", b"300ms")))
    session.events(task, 1, until="started")
    # The same attempt again (it uses a credit, as any assignment does).
    session.assign((task, 1, kit_call("sleep", b"300ms")))
    assert finished_of(session.events(task, 1)).outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_for(lambda: fake.ledger.window >= 1, timeout=3, what="its slot granted back")
    session.assign((ids["t-probe"], 1, kit_call("sleep", b"400ms")))
    finished_of(session.events(ids["t-probe"], 1))
    kinds = [e.WhichOneof("body") for e in session.attempt_events(task, 1)]
    assert kinds.count("started") == 1 and kinds.count("finished") == 1, f"it ran once: {kinds}"
    no_violations(conn)


def test_a_cancel_for_an_attempt_already_finished_is_ignored(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    task = ids["t-done"]
    session.assign((task, 1, kit_call("echo", b"done")))
    assert finished_of(session.events(task, 1)).outcome == common_pb2.OUTCOME_SUCCEEDED
    session.cancel(task, 1, reason="too late")
    # The worker reads in order: once the probe is done, the Cancel was handled.
    session.assign((ids["t-probe"], 1, kit_call("echo", b"probe")))
    assert finished_of(session.events(ids["t-probe"], 1)).output == b"probe"
    kinds = [e.WhichOneof("body") for e in session.attempt_events(task, 1)]
    assert kinds.count("finished") == 1, f"nothing more about a finished attempt: {kinds}"
    no_violations(conn)


def test_a_flood_of_cancels_for_attempts_it_does_not_run_is_ignored_and_the_session_goes_on(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.keepalive()
    for _ in range(5000):  # a coordinator answers each stale event with one
        session.cancel(new_ulid(), 1, reason="not current")
    session.assign((ids["t-after"], 1, kit_call("echo", b"after")))
    assert finished_of(session.events(ids["t-after"], 1, timeout=20)).output == b"after"
    assert not session.ended.is_set()
    reported = {(e.task_id, e.attempt) for r in session.of_kind("events") for e in r.message.events.events}
    assert reported == {(ids["t-after"], 1)}, "nothing reported for attempts it does not run"
    no_violations(conn)


def test_a_silent_coordinator_is_dropped_after_the_heartbeat_timeout_and_dialed_again(fake, spawn, impl):
    conn = connect(fake, spawn, impl, heartbeat_timeout=1.0)
    session = conn.session  # the kit says nothing more on it
    session.wait_ended(timeout=6)
    again = fake.accept(timeout=10)
    register = take_register(again)
    assert register.previous_node_id == NODE_ID, "previous_node_id: the node_id of the last Registered"
    again.registered(node_id=NODE_ID, heartbeat_timeout=1.0)
    again.keepalive()
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=5, what="credits on the second stream")
    time.sleep(2.5)  # past the timeout twice over, with heartbeats: it stays
    assert not again.ended.is_set() and len(fake.all_sessions) == 2, "a coordinator that speaks is not dropped"
    no_violations(conn)


def test_a_drain_without_a_grace_lets_running_work_finish_within_the_workers_own(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-short"], 1, kit_call("sleep", b"500ms")))
    session.events(ids["t-short"], 1, until="started")
    session.drain()  # no grace: the worker's own default, not zero
    session.expect("draining", timeout=3)
    assert finished_of(session.events(ids["t-short"], 1, timeout=5)).outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_ended(timeout=5)
    assert conn.proc.wait_exit(10) == 0
    no_violations(conn)


def test_an_assign_while_draining_is_cancelled_without_running_it(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-running"], 1, kit_call("sleep", b"1s")))
    session.events(ids["t-running"], 1, until="started")
    session.drain(grace=10)
    session.expect("draining", timeout=3)
    session.assign((ids["t-late"], 1, kit_call("echo", b"late")))  # sent before the coordinator saw Draining
    events = session.events(ids["t-late"], 1)
    assert [e.WhichOneof("body") for e in events] == ["finished"], "no Started: it must not run"
    assert finished_of(events).outcome == common_pb2.OUTCOME_CANCELLED
    assert finished_of(session.events(ids["t-running"], 1, timeout=5)).outcome == common_pb2.OUTCOME_SUCCEEDED
    session.wait_ended(timeout=5)
    assert conn.proc.wait_exit(10) == 0
    no_violations(conn)


def test_output_and_results_keep_within_registered_max_message_size(fake, spawn, impl, ids):
    limit = 1024 * 1024  # the least a coordinator says (--max-message-size is 1 MiB to 64 MiB)
    conn = connect(fake, spawn, impl, max_message_size=limit)
    session = conn.session
    data = os.urandom(700 * 1024)  # its chunks and its result do not fit in one message together
    session.assign((ids["t-fits"], 1, kit_call("echo", data)))
    events = session.events(ids["t-fits"], 1, timeout=10)
    chunks = output_of(events)
    assert [seq for seq, _ in chunks] == list(range(len(chunks))), "seq from 0, no gaps"
    assert b"".join(d for _, d in chunks) == data
    finished = finished_of(events)
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED and finished.output == data, "the result fits alone"
    # A result that cannot fit in one message (its Assign is past the limit
    # too, which a worker decodes all the same) is replaced by a failure.
    big = os.urandom(limit + 200 * 1024)
    session.assign((ids["t-too-big"], 1, kit_call("echo", big)))
    events = session.events(ids["t-too-big"], 1, timeout=10)
    assert b"".join(d for _, d in output_of(events)) == big
    finished = finished_of(events)
    assert finished.outcome == common_pb2.OUTCOME_FAILED and finished.error, finished
    no_violations(conn)  # every message within the limit


def test_a_large_assign_is_decoded_and_its_large_result_sent(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, max_message_size=16 * 1024 * 1024)
    session = conn.session
    session.keepalive()
    data = os.urandom(5 * 1024 * 1024)  # past gRPC's default 4 MiB
    session.assign((ids["t-large"], 1, kit_call("echo", data)))
    finished = finished_of(session.events(ids["t-large"], 1, timeout=30))
    assert finished.outcome == common_pb2.OUTCOME_SUCCEEDED
    assert finished.output == data
    no_violations(conn)


def test_an_error_is_sent_within_64_kib(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    session.assign((ids["t-long-error"], 1, kit_call("fail", b"x" * (100 * 1024))))
    finished = finished_of(session.events(ids["t-long-error"], 1))
    assert finished.outcome == common_pb2.OUTCOME_FAILED
    assert 0 < len(finished.error.encode()) <= 64 * 1024, len(finished.error.encode())
    no_violations(conn)


def test_output_sent_before_the_coordinator_went_away_is_sent_again_in_seq_order_ahead_of_its_result(
        fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl)
    session = conn.session
    task = ids["t-resend"]
    data = os.urandom(100 * 1024)  # several chunks
    session.assign((task, 1, kit_call("echo", data)))
    sent = output_of(session.events(task, 1))
    assert b"".join(d for _, d in sent) == data
    session.close()

    again = fake.accept(timeout=15)
    assert listed(take_register(again)) == [(task, 1)]
    again.registered(node_id=NODE_ID)
    events = again.events(task, 1, timeout=5)
    assert output_of(events) == sent, "every chunk again, in seq order"
    assert [e.WhichOneof("body") for e in events] == ["output"] * len(sent) + ["finished"], "ahead of its result"
    assert finished_of(events).output == data
    kinds = [r.kind for r in again.received]
    assert "credits" not in kinds[:kinds.index("events") + 1], "credits only after the redelivered result"
    again.wait_for(lambda: again.credits_granted() >= SLOTS, timeout=3, what="all slots granted")
    no_violations(conn)


def test_output_of_an_attempt_running_across_a_reconnect_goes_on_in_seq_order(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow")
    session = conn.session
    task = ids["t-across"]
    session.assign((task, 1, exec_spec(["sh", "-c", "echo one; sleep 1.5; echo two"])))
    assert output_of(session.events(task, 1, until="output")) == [(0, b"one\n")]
    session.close()

    again = fake.accept(timeout=15)
    assert listed(take_register(again)) == [(task, 1)]
    again.registered(node_id=NODE_ID)
    again.keepalive()
    events = again.events(task, 1, timeout=5)
    assert output_of(events) == [(0, b"one\n"), (1, b"two\n")], "the sent chunk first, then the new one"
    assert finished_of(events).outcome == common_pb2.OUTCOME_SUCCEEDED
    no_violations(conn)


def test_attempts_are_stopped_when_the_lease_runs_out_while_disconnected(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow", heartbeat_timeout=1.5)
    session = conn.session
    session.keepalive()
    task = ids["t-lease"]
    session.assign((task, 1, exec_spec(WAITS_ON_A_CHILD)))
    child = background_pid(session, task, 1)
    session.close()  # the coordinator goes away: nothing heard from now on
    again = fake.accept(timeout=15)  # the kit holds Registered back
    assert listed(take_register(again)) == [(task, 1)]
    time.sleep(0.3)
    assert alive(child), "a broken stream alone does not stop an attempt"
    deadline = time.monotonic() + 1.5 + 3.0
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "past its lease (heartbeat_timeout) the attempt's processes are stopped"
    # It reports the attempt on the next stream the kit answers (it may
    # have dropped this one and dialed again meanwhile).
    current, deadline = again, time.monotonic() + 20
    while True:
        if not current.ended.is_set():
            current.registered(node_id=NODE_ID)
            try:
                finished = finished_of(current.events(task, 1, timeout=5))
                break
            except AssertionError:
                if not current.ended.is_set():
                    raise
        assert time.monotonic() < deadline, "the stopped attempt was never reported"
        current = fake.accept(timeout=15)
        assert (task, 1) in listed(take_register(current))
    assert finished.outcome != common_pb2.OUTCOME_SUCCEEDED
    no_violations(conn)


# -- exec: what the page says about running a process ------------------------


def test_exec_gets_stdin_cwd_and_env_on_top_of_the_workers_environment(fake, spawn, impl, ids, tmp_path):
    conn = connect(fake, spawn, impl, exec="allow", env={"WEFT_KIT_FROM_NODE": "node"})
    session = conn.session
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    spec = exec_spec(["sh", "-c", 'pwd; cat; printf "%s|%s" "$WEFT_KIT_FROM_NODE" "$FROM_TASK"'],
                     env={"FROM_TASK": "task"}, cwd=str(workdir), stdin=b"from stdin\n")
    session.assign((ids["t-env"], 1, spec))
    events = session.events(ids["t-env"], 1)
    out = b"".join(d for _, d in output_of(events)).decode()
    assert out == f"{os.path.realpath(workdir)}\nfrom stdin\nnode|task"
    assert finished_of(events).outcome == common_pb2.OUTCOME_SUCCEEDED
    no_violations(conn)


def test_exec_that_cannot_start_is_start_failed_and_one_killed_by_a_signal_has_no_exit_code(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow")
    session = conn.session
    session.assign((ids["t-bad-cwd"], 1, exec_spec(["true"], cwd="/nonexistent/weft-kit-dir")))
    assert finished_of(session.events(ids["t-bad-cwd"], 1)).outcome == common_pb2.OUTCOME_START_FAILED
    session.assign((ids["t-no-argv"], 1, common_pb2.TaskSpec(exec=common_pb2.ExecSpec())))
    assert finished_of(session.events(ids["t-no-argv"], 1)).outcome == common_pb2.OUTCOME_START_FAILED
    session.assign((ids["t-killed"], 1, exec_spec(["sh", "-c", "kill -9 $$"])))
    finished = finished_of(session.events(ids["t-killed"], 1))
    assert finished.outcome == common_pb2.OUTCOME_FAILED
    assert not finished.HasField("exit_code"), "exit_code only when the process exited"
    no_violations(conn)


def test_exec_cancel_kills_the_whole_process_group(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow")
    session = conn.session
    task = ids["t-group"]
    session.assign((task, 1, exec_spec(WAITS_ON_A_CHILD)))
    child = background_pid(session, task, 1)
    sent = time.monotonic()
    session.cancel(task, 1)
    assert finished_of(session.events(task, 1, timeout=3)).outcome == common_pb2.OUTCOME_CANCELLED
    assert time.monotonic() - sent < 1.0
    session.wait_for(lambda: not alive(child), timeout=1.0, what="the task's child process gone too")
    no_violations(conn)


def test_exec_past_its_timeout_is_killed_even_when_it_ignores_sigterm(fake, spawn, impl, ids):
    conn = connect(fake, spawn, impl, exec="allow")
    session = conn.session
    task = ids["t-stubborn"]
    spec = exec_spec(["sh", "-c", 'trap "" TERM; sleep 30 & echo $!; wait'], timeout=0.5)
    session.assign((task, 1, spec))
    started = time.monotonic()
    child = background_pid(session, task, 1)
    finished = finished_of(session.events(task, 1, timeout=5))
    assert finished.outcome == common_pb2.OUTCOME_TIMED_OUT
    assert not finished.HasField("exit_code")
    assert time.monotonic() - started < 2.0
    session.wait_for(lambda: not alive(child), timeout=1.0, what="the whole process group killed")
    no_violations(conn)



# -- joining and the node's identity ------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def exits_refused(proc: Proc, timeout: float = 20) -> str:
    """Waits for the worker to exit non-zero; returns its output."""
    code = proc.wait_exit(timeout)
    assert code is not None, f"the worker kept running after a final refusal:\n{proc.output()}"
    assert code != 0, f"the worker exited 0 after a final refusal:\n{proc.output()}"
    return proc.output()


def test_a_worker_joins_with_a_token_and_keeps_its_identity_like_weft_node(fake, spawn, impl):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    conn = connect(fake, spawn, impl)
    assert [j.name for j in fake.joins] == ["conf"]
    csr = x509.load_der_x509_csr(fake.joins[0].csr_der)
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    # It connected with the certificate Join gave it.
    assert conn.session.node_id == NODE_ID
    assert conn.session.certificate.public_bytes(serialization.Encoding.PEM) == fake.joins[0].certificate_pem
    # The state dir: 0700, every file 0600, weft-node's names.
    state = fake.state_dir
    assert mode(state) == 0o700
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith(".")) == ["ca.pem", "node.conf", "node.key", "node.pem"]
    for name in ("ca.pem", "node.conf", "node.key", "node.pem"):
        assert mode(state / name) == 0o600, name
    conf = dict(line.split("=", 1) for line in (state / "node.conf").read_text().splitlines() if "=" in line)
    assert conf["node_id"] == NODE_ID and conf["name"] == "conf"
    assert conf["coordinator"] in (f"127.0.0.1:{fake.port}", fake.url)
    assert (state / "ca.pem").read_bytes().strip() == fake.ca.pem.strip()
    assert (state / "node.pem").read_bytes().startswith(fake.joins[0].certificate_pem)
    assert b"PRIVATE KEY" in (state / "node.key").read_bytes()


def test_a_restarted_worker_connects_from_its_state_dir_without_a_token(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    conn.proc.signal(signal.SIGTERM)
    conn.session.wait_ended(timeout=10)
    assert conn.proc.wait_exit(10) is not None
    again = connect(fake, spawn, impl, join=False)
    assert again.session.node_id == NODE_ID, "it presents the certificate it joined with"
    assert again.register.name == "conf"
    assert again.register.previous_node_id in ("", NODE_ID)
    assert len(fake.joins) == 1, "a joined node does not join again"


def test_a_wrong_pin_is_refused_before_anything_is_sent(fake, spawn, impl):
    proc = start(fake, spawn, impl, token=fake.join_token(pin="sha256:" + "ab" * 32))
    out = exits_refused(proc)
    assert "pin" in out.lower(), out
    assert fake.join_requests == [], "nothing may be sent to a coordinator the pin does not name"
    assert not (fake.state_dir / "node.conf").exists()


def test_a_client_token_is_not_a_join_token(fake, spawn, impl):
    proc = start(fake, spawn, impl, token="weft_0123456789abcdef_" + "s" * 43)
    out = exits_refused(proc)
    assert "weft token create --role node" in out, out
    assert fake.join_requests == []


def test_a_used_up_token_is_refused_and_the_worker_stops(fake, spawn, impl):
    token = fake.join_token(uses=1)
    # The one-use token works once...
    first = start(fake, spawn, impl, token=token)
    fake.accept(timeout=20)
    first.kill()
    # ...and not for a second node (another state dir).
    fake.state_dir = fake.state_dir.parent / "second-state"
    out = exits_refused(start(fake, spawn, impl, token=token))
    assert "UNAUTHENTICATED" in out or "join token" in out, out
    assert len(fake.joins) == 1 and len(fake.join_requests) == 2


def test_a_worker_without_a_certificate_is_refused_and_stops(fake, spawn, impl):
    # Neither a token nor a state dir: it dials with the CA alone, and the
    # coordinator wants a node certificate.
    require_join(impl)
    if impl == "custom":
        pytest.skip("the kit starts a custom worker only with {join} and {state_dir}")
    argv = WORKERS[impl](fake.url, "conf", SLOTS, None)
    proc = spawn(argv, name=impl, env={**CLEAN_ENV, "WEFT_CA": fake.ca_file})
    out = exits_refused(proc)
    assert "join" in out.lower(), out
    # A stream that grpcio's core loses before it reads the answer (it says
    # INTERNAL "Internal error from Core") is a lost session, dialed again
    # like any other; the refusal the worker did read is final.
    lost = out.count("Internal error from Core")
    assert fake.refused == ["no certificate"] * (1 + lost), "refused once, and it did not try again"


def test_a_revoked_worker_stops_and_does_not_reconnect(fake, spawn, impl):
    conn = connect(fake, spawn, impl)
    fake.revoke(NODE_ID)
    out = exits_refused(conn.proc)
    assert "revoked" in out.lower() or "PERMISSION_DENIED" in out, out
    assert fake.refused == [] and len(fake.all_sessions) == 1, "it did not try again"


def test_the_certificate_is_renewed_over_the_session_and_used_on_the_next_connection(spawn, impl, tmp_path, ids):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with FakeCoordinator(node_id=NODE_ID, cert_lifetime=4) as fake:
        fake.state_dir = tmp_path / "node-state"
        conn = connect(fake, spawn, impl)
        session = conn.session
        joined = x509.load_pem_x509_certificate(fake.joins[0].certificate_pem)
        # Asked at 2/3 of the lifetime (5 s with the backdating): within ~4 s.
        session.wait_for(lambda: fake.renewals, timeout=8, what="a RenewCertificate")
        node_id, csr_der, chain_pem = fake.renewals[0]
        assert node_id == NODE_ID
        csr = x509.load_der_x509_csr(csr_der)
        assert csr.is_signature_valid
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert csr.public_key().public_bytes(*spki) != joined.public_key().public_bytes(*spki), "a new key"
        renewed = x509.load_pem_x509_certificate(chain_pem.encode())
        session.wait_for(lambda: (fake.state_dir / "node.pem").read_bytes().startswith(
            renewed.public_bytes(serialization.Encoding.PEM)), timeout=5, what="the renewed certificate saved")
        # The live session goes on, and work still runs on it.
        assert not session.ended.is_set()
        session.assign((ids["t-renew"], 1, kit_call("echo", b"after")))
        assert finished_of(session.events(ids["t-renew"], 1)).output == b"after"
        # The next connection presents the new certificate.
        session.close()
        again = fake.accept(timeout=15)
        assert again.certificate.serial_number in {
            x509.load_pem_x509_certificate(c.encode()).serial_number for _, _, c in fake.renewals}
        assert again.certificate.serial_number != joined.serial_number


def test_the_custom_workers_handler_names_come_from_the_environment():
    assert _custom_handlers("") == {}
    assert _custom_handlers("echo=my_echo, sleep=nap") == {"echo": "my_echo", "sleep": "nap"}
    with pytest.raises(ValueError, match="ROLE=NAME"):
        _custom_handlers("echo")
    with pytest.raises(ValueError, match="ROLE=NAME"):
        _custom_handlers("other=x")
