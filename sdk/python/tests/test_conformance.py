"""The node protocol conformance kit.

The kit plays the coordinator (``weft.testing.FakeCoordinator``, a real
NodeService server on 127.0.0.1:0) and launches the worker under test as a
subprocess pointed at it, then drives it through register, credits,
heartbeats, assign, output, failure, cancel, timeout, fencing by attempt,
drain and a coordinator restart. Every test runs against every worker
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
roles not named keep theirs); and run ``exec`` tasks when started with exec
allowed (the kit starts it so); started with exec denied it declares that in
Register and runs none.
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
def fake(tmp_path):
    coordinator = FakeCoordinator(node_id=NODE_ID)
    coordinator.state_dir = tmp_path / "node-state"  # where the kit's worker keeps its identity
    yield coordinator
    coordinator.stop()


def start(fake: FakeCoordinator, spawn, impl: str, slots: int = SLOTS, exec: str = "allow", token: str = None,
          join: bool = True) -> Proc:
    """Starts the worker with a join token (``token``, else a fresh one;
    none with ``join=False``) and the kit's state dir."""
    if token is None and (join or impl == "custom"):
        # A custom command always has {join}: restarted, the worker must
        # use its state dir and leave the token unused.
        token = fake.join_token()
    argv = WORKERS[impl](fake.url, "conf", slots, exec, join=token, state_dir=str(fake.state_dir))
    return spawn(argv, name=impl, env=CLEAN_ENV)


def connect(fake: FakeCoordinator, spawn, impl: str, slots: int = SLOTS, exec: str = "allow", join: bool = True) -> Conn:
    """Starts the worker (with exec tasks allowed unless ``exec="deny"``;
    joining with a fresh token, or with ``join=False`` from the state dir
    alone), takes its Register, answers Registered, waits for its credits."""
    proc = start(fake, spawn, impl, slots, exec, join=join)
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
    session.assign((ids["t-call"], 1, kit_call("echo", b"hi")))
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
    assert again.credits_granted() == SLOTS - 1
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
    argv = WORKERS[impl](fake.url, "conf", SLOTS, "allow")
    proc = spawn(argv, name=impl, env={**CLEAN_ENV, "WEFT_CA": fake.ca_file})
    out = exits_refused(proc)
    assert "join" in out.lower(), out
    assert fake.refused == ["no certificate"], "refused once, and it did not try again"


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
