"""Unit tests of the worker's plain parts (``weft.worker.slots``,
``weft.worker.outbox``, ``weft.worker.exec_policy``), without a loop, a stream or a coordinator; and of
the package's shape (no import cycle between its modules)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

import weft
import weft.worker
from weft._proto import node_pb2
from weft.worker.exec_policy import ExecPolicy, from_flags
from weft._proto import common_pb2
from weft.worker.outbox import BATCH_BYTES, BATCH_LIMIT, CLOSE, TEXT_LIMIT, TRUNCATED_MARKER, Outbox
from weft.worker.slots import Slots


def test_slots_count_what_attempts_hold_and_drain_once():
    slots = Slots(3)
    assert slots.take(2) and slots.free == 1
    assert not slots.take(2), "beyond the total: counted, but reported"
    assert slots.free == -1
    slots.give_back(2)
    slots.give_back(2)
    assert slots.free == 3
    assert slots.drain() and slots.draining
    assert not slots.drain(), "draining twice is one drain"


def finished(task_id: str, output: bytes = b"") -> node_pb2.NodeTaskEvent:
    return node_pb2.NodeTaskEvent(task_id=task_id, attempt=1, finished=node_pb2.Finished(output=output))


def test_outbox_batches_events_between_control_messages_and_keeps_sent_results():
    outbox = Outbox()
    outbox.control(node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat()))
    assert not outbox.queue, "no session: control messages are dropped"
    outbox.attached = True
    for i in range(BATCH_LIMIT + 1):
        outbox.event(f"t{i}", 1, progress=node_pb2.Progress(fraction=0.5))
    outbox.queue.append(finished("done", b"out"))
    outbox.control(node_pb2.NodeMessage(heartbeat=node_pb2.Heartbeat()))
    outbox.event("late", 1, progress=node_pb2.Progress(fraction=0.1))
    sent = []
    first = outbox.take(sent.append)
    assert len(first.events.events) == BATCH_LIMIT
    second = outbox.take(sent.append)
    assert [e.task_id for e in second.events.events] == [f"t{BATCH_LIMIT}", "done"]
    assert sent == [("done", 1)] and ("done", 1) in outbox.redeliver and outbox.redeliver_bytes == 3
    assert outbox.take(sent.append).WhichOneof("body") == "heartbeat"
    assert [e.task_id for e in outbox.take(sent.append).events.events] == ["late"]
    outbox.close()
    assert outbox.closing and outbox.take(sent.append) is CLOSE and not outbox.closing


def test_every_batch_fits_the_coordinators_limit_and_a_result_too_large_fails_saying_so():
    outbox = Outbox()
    outbox.message_limit = 1024 * 1024
    for i in range(8):
        outbox.event(f"o{i}", 1, output=node_pb2.OutputChunk(data=b"x" * (BATCH_BYTES // 4)))
    outbox.queue.append(finished("big", b"y" * (2 * 1024 * 1024)))
    outbox.event("texts", 1, progress=node_pb2.Progress(fraction=0.5, message="m" * (1024 * 1024)))
    sent, messages = [], []
    while outbox.queue:
        messages.append(outbox.take(sent.append))
    assert all(m.ByteSize() <= outbox.message_limit for m in messages)
    events = {e.task_id: e for m in messages for e in m.events.events}
    assert len(events) == 10
    big = events["big"].finished
    assert big.outcome == common_pb2.OUTCOME_FAILED and not big.output
    assert str(outbox.message_limit) in big.error and "--max-message-size" in big.error
    message = events["texts"].progress.message
    assert len(message.encode()) <= TEXT_LIMIT and message.endswith(TRUNCATED_MARKER)


def test_a_new_session_drops_control_messages_and_lists_kept_and_queued_results():
    outbox = Outbox()
    outbox.attached = True
    outbox.queue.append(finished("sent"))
    outbox.take(lambda key: None)
    outbox.control(node_pb2.NodeMessage(credits=node_pb2.Credits(grant=1)))
    outbox.queue.append(finished("queued"))
    outbox.queue.append(finished("sent"))  # the same result, queued again
    redeliver, keys = outbox.begin_session()
    assert [e.task_id for e in redeliver] == ["sent"]
    assert keys == {("sent", 1), ("queued", 1)}
    assert [e.task_id for e in outbox.queue] == ["queued"], "controls dropped, a kept result queued once"
    outbox.forget(("sent", 1))
    assert not outbox.redeliver and outbox.redeliver_bytes == 0


def chunk(task_id: str, seq: int, data: bytes = b"x") -> node_pb2.NodeTaskEvent:
    return node_pb2.NodeTaskEvent(task_id=task_id, attempt=1, output=node_pb2.OutputChunk(data=data, seq=seq))


def test_sent_output_is_kept_and_sent_again_in_seq_order_for_listed_attempts_within_its_bound(monkeypatch):
    outbox = Outbox()
    outbox.attached = True
    for event in [chunk("run", 0), chunk("done", 0), chunk("run", 1), chunk("gone", 0), finished("done")]:
        outbox.queue.append(event)
    outbox.take(lambda key: None)
    outbox.queue.append(chunk("run", 2))  # not taken: still queued
    outbox.forget(("gone", 1))  # cancelled by the coordinator: stale there
    redeliver, keys = outbox.begin_session()
    keys.add(("run", 1))  # still running
    resend = outbox.resendable(keys)
    assert [(e.task_id, e.output.seq) for e in resend] == [("done", 0), ("run", 0), ("run", 1)]
    outbox.resend_first(resend + redeliver)
    sent = outbox.take(lambda key: None).events.events
    kinds = [(e.task_id, e.WhichOneof("body"), e.output.seq) for e in sent]
    assert kinds == [
        ("done", "output", 0),
        ("run", "output", 0),
        ("run", "output", 1),
        ("done", "finished", 0),
        ("run", "output", 2),
    ], "kept output first, each attempt's before its result, then what was queued"
    assert outbox.resendable({("run", 1)}) == [chunk("run", 0), chunk("run", 1), chunk("run", 2)]
    assert set(outbox.sent_output) == {("run", 1)}, "an attempt not listed is forgotten"

    monkeypatch.setattr("weft.worker.outbox.SENT_OUTPUT_MAX_BYTES", 4)
    for seq in range(3, 6):
        outbox.queue.append(chunk("run", seq, b"yy"))
    outbox.take(lambda key: None)
    assert [e.output.seq for e in outbox.resendable({("run", 1)})] == [4, 5], "the oldest go first"
    assert outbox.sent_output_bytes == 4


def test_the_worker_modules_import_each_other_without_a_cycle():
    package = Path(weft.worker.__file__).parent
    deps = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.add(node.module or "__init__")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("weft.worker"):
                names.add((node.module.split(".") + ["__init__"])[2])
        deps[path.stem] = names
    assert all("__init__" not in names for names in deps.values()), "nothing imports the package's __init__"

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in deps.get(module, ()):
            visit(dep, path + [module])

    for module in deps:
        visit(module, [])
    assert not deps["reaper"] and not deps["slots"], "leaf modules"


def test_a_worker_refuses_exec_tasks_unless_told_otherwise():
    assert weft.Worker("http://127.0.0.1:1", slots=1).exec_policy.register_fields() == (node_pb2.EXEC_POLICY_DENY, [])
    allow = weft.Worker("http://127.0.0.1:1", slots=1, exec="allow").exec_policy
    assert allow.register_fields() == (node_pb2.EXEC_POLICY_ALLOW, [])
    assert allow.refusal(weft.exec_spec(["anything"]).exec) is None
    deny = ExecPolicy("deny")
    assert "does not run exec tasks" in deny.refusal(weft.exec_spec(["true"]).exec)
    listed = weft.Worker("http://127.0.0.1:1", slots=1, exec=ExecPolicy(["echo"])).exec_policy
    assert listed.register_fields() == (node_pb2.EXEC_POLICY_ALLOW_LIST, ["echo"])


def test_an_exec_allow_list_matches_argv0_exactly_as_weft_node_does():
    policy = ExecPolicy(["echo", "/bin/true"])
    assert policy.register_fields() == (node_pb2.EXEC_POLICY_ALLOW_LIST, ["/bin/true", "echo"])
    assert policy.refusal(weft.exec_spec(["echo", "hi"]).exec) is None
    assert policy.refusal(weft.exec_spec(["/bin/true"]).exec) is None
    for refused in (["/bin/echo"], ["true"], ["sh", "-c", "echo"]):
        assert policy.refusal(weft.exec_spec(refused).exec) is not None, refused
    assert "PATH" in policy.refusal(weft.exec_spec(["echo"], env={"PATH": "/tmp"}).exec)
    for bad in ([], ["./x"], ["bin/x"], [""], "sometimes"):
        with pytest.raises(ValueError):
            ExecPolicy(bad)
    assert from_flags(None, ["echo,/bin/true"]).register_fields()[1] == ["/bin/true", "echo"]
    assert from_flags(None, None).register_fields()[0] == node_pb2.EXEC_POLICY_DENY
    with pytest.raises(ValueError):
        from_flags("allow", ["echo"])


def test_an_exec_allow_list_refuses_path_and_loader_variables_from_secret_env_too():
    policy = ExecPolicy(["echo", "/bin/true"])
    # PATH from secret_env (applied after env) would choose which echo runs.
    spec = weft.exec_spec(["echo"], secret_env={"PATH": "/tmp/x"})
    why = policy.refusal(spec.exec, spec.secret_env)
    assert why is not None and "PATH" in why and "secret_env" in why
    spec = weft.exec_spec(["/bin/true"], secret_env={"PATH": "/tmp/x"})
    assert policy.refusal(spec.exec, spec.secret_env) is None
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "GCONV_PATH", "DYLD_INSERT_LIBRARIES"):
        for argv in (["echo"], ["/bin/true"]):
            spec = weft.exec_spec(argv, secret_env={name: "/tmp/x.so"})
            why = policy.refusal(spec.exec, spec.secret_env)
            assert why is not None and name in why and "secret_env" in why, (name, argv)
            spec = weft.exec_spec(argv, env={name: "/tmp/x.so"})
            why = policy.refusal(spec.exec, spec.secret_env)
            assert why is not None and name in why and "(in env)" in why, (name, argv)
            assert ExecPolicy("allow").refusal(spec.exec, {name: "x"}) is None
    spec = weft.exec_spec(["echo"], secret_env={"API_KEY": "k"})
    assert policy.refusal(spec.exec, spec.secret_env) is None



def test_labels_are_key_value_and_a_bad_one_is_a_usage_error_not_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    assert weft.parse_label("gpu=a100") == ("gpu", "a100")
    assert weft.parse_label("empty=") == ("empty", "")
    for bad in ("gpu", "=x", ""):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            weft.parse_label(bad)
    example = Path(__file__).resolve().parents[3] / "examples" / "python" / "worker.py"
    # From elsewhere than the source tree, so the installed package is the one imported.
    run = subprocess.run([sys.executable, str(example), "--label", "gpu"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 2, run
    assert "a label is KEY=VALUE, not 'gpu'" in run.stderr and "Traceback" not in run.stderr, run.stderr
    demo = subprocess.run([sys.executable, "-m", "weft.worker_demo", "--label", "gpu"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert demo.returncode != 0 and "--label: a label is KEY=VALUE" in demo.stderr, demo
    assert "Traceback" not in demo.stderr


def test_the_installed_demo_worker_names_itself_in_its_usage(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "weft-py-worker"
    if not script.exists():
        script = shutil.which("weft-py-worker")
    assert script, "weft-py-worker is installed with the package"
    run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run
    assert run.stdout.startswith("usage: weft-py-worker"), run.stdout


def test_a_posted_call_that_raises_does_not_drop_the_rest_of_its_batch():
    from weft.worker.attempt import HandlerThreads

    loop = asyncio.new_event_loop()
    threads = HandlerThreads(1, loop)
    ran = []

    def raises() -> None:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    try:
        # Posted while the loop does not run: one batch, drained in one callback.
        threads.post(raises)
        threads.post(ran.append, "after")
        loop.run_until_complete(asyncio.sleep(0))
        assert ran == ["after"]
    finally:
        threads.shutdown()
        loop.close()


def test_a_call_whose_prefetched_follower_fails_to_begin_still_finishes():
    import threading
    from types import SimpleNamespace

    from weft.worker.attempt import HandlerThreads

    loop = asyncio.new_event_loop()
    threads = HandlerThreads(1, loop)
    first, following = SimpleNamespace(ran_for=None), SimpleNamespace(ran_for=None)
    ended = {}
    last = loop.create_future()

    def done(attempt, ok, value) -> None:
        ended[value] = ok
        if attempt is following:  # drained in order: the first call's end came before
            last.set_result(None)

    def began(attempt) -> None:
        raise RuntimeError("begin failed")

    threads.began = began
    gate = threading.Event()
    try:
        # The follower is handed down ahead before the first call ends: the thread begins it next.
        threads.submit(lambda: gate.wait(10) and "first", (), first, done)
        threads.put_ahead(lambda: "following", (), following, done)
        gate.set()
        loop.run_until_complete(asyncio.wait_for(last, 10))
        assert ended == {"first": True, "following": True}
        assert first.ran_for is not None
    finally:
        threads.shutdown()
        loop.close()


def test_progress_while_cut_off_keeps_the_queue_within_its_bound_and_the_latest_progress():
    from weft.worker.outbox import QUEUED_OUTPUT_MAX_EVENTS

    outbox = Outbox()  # no session: nothing is taken
    calls = 100_000
    for i in range(calls):
        outbox.event("t", 1, progress=node_pb2.Progress(fraction=i / calls, message=f"step {i}"))
    assert len(outbox.queue) <= QUEUED_OUTPUT_MAX_EVENTS
    # Past the bound another attempt's first progress is queued, its later ones replace it.
    outbox.event("u", 1, progress=node_pb2.Progress(fraction=0.1))
    outbox.event("u", 1, progress=node_pb2.Progress(fraction=0.2))
    assert len(outbox.queue) <= QUEUED_OUTPUT_MAX_EVENTS + 1
    sent = []
    while outbox.queue:
        sent += outbox.take(lambda key: None).events.events
    latest = {}
    for event in sent:
        latest[event.task_id] = event.progress
    assert latest["t"].message == f"step {calls - 1}" and latest["u"].fraction == 0.2
    assert outbox.queued_output_events == 0 and outbox.queued_progress == {}
    # With room again, progress queues one event per call.
    outbox.event("t", 1, progress=node_pb2.Progress(fraction=0.5))
    outbox.event("t", 1, progress=node_pb2.Progress(fraction=0.6))
    assert len(outbox.queue) == 2


def test_waiting_for_room_returns_at_once_for_a_stopped_attempt():
    import threading

    class NoRoom:
        """A room that never opens, counting how often it was waited on."""

        waits = 0

        def wait(self, timeout=None):
            NoRoom.waits += 1
            return False

    outbox = Outbox()
    outbox.room_open = NoRoom()
    stopped = threading.Event()
    stopped.set()
    outbox.wait_room(stopped)
    assert NoRoom.waits == 0, "a stopped attempt does not wait for room first"
