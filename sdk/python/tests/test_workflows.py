"""Workflows and scheduling policy in the Python SDK: the task options and their checks,
graph submit and jobs, limits, schedules, a worker's parents (``ctx.parents``,
``$WEFT_PARENTS``/``$WEFT_OUTPUT``), resources, and weft.Executor futures as dependencies.

The first tests need no binaries. The cluster tests need the coordinator's side of each
feature; a coordinator without it (the rpc UNIMPLEMENTED) skips them, naming the feature.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pickle
import sys
from pathlib import Path

import pytest

import exec_funcs
import weft
import weft.aio
from weft._proto import common_pb2, node_pb2, task_pb2
from weft.executor import encode_call
from weft.worker.handlers import HandlerError, StartFailed
from weft.worker.parents import INDEX, ExecFiles, ParentResult, parents_of
from weft.worker.pickled import run_pickled, with_parents
from weft.workflow import graph_request, limit_pb, parse_rate, schedule_spec

from conftest import poll
from test_e2e import Cluster

TESTS_DIR = Path(__file__).resolve().parent
ALLOWED = ("exec_funcs", "math")
#: A well-formed task id no task has.
NO_SUCH_TASK = "0" * 26


# -- options and their checks (no binaries) ------------------------------------


def test_every_policy_option_lands_in_the_spec():
    at = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    spec = weft.call_spec(
        "h", b"x", priority=8, fair_key="team-a", fair_weight=3, concurrency_key="user-42", max_concurrent=2,
        on_limit="cancel_oldest", rate_limits={"api": 2, "db": 1}, resources={"gpu": 1, "mem": "2GiB", "cpu": 0},
        after=["t1", weft.Ref("fetch")], after_rule="any_failed", not_before=at, ref="train", fail_if_infeasible=True,
    )
    assert (spec.priority, spec.fair_key, spec.fair_weight) == (8, "team-a", 3)
    assert (spec.concurrency.key, spec.concurrency.max_running) == ("user-42", 2)
    assert spec.concurrency.on_limit == common_pb2.OVER_LIMIT_CANCEL_OLDEST
    assert [(r.name, r.units) for r in spec.rate_limits] == [("api", 2), ("db", 1)]
    assert dict(spec.resources) == {"gpu": 1, "mem": 2 << 30}, "sizes parsed, zero amounts dropped"
    assert [(d.task_id, d.ref) for d in spec.after] == [("t1", ""), ("", "fetch")]
    assert spec.after_rule == common_pb2.DEPENDENCY_RULE_ANY_FAILED
    assert spec.not_before.ToDatetime(tzinfo=dt.timezone.utc) == at
    assert (spec.ref, spec.fail_if_infeasible) == ("train", True)
    # A delay is a start time from now; rate limits by name take one unit; exec specs take the same.
    before = dt.datetime.now(dt.timezone.utc)
    spec = weft.exec_spec(["true"], delay="10m", rate_limits=["api"], priority=1)
    start = spec.not_before.ToDatetime(tzinfo=dt.timezone.utc)
    assert dt.timedelta(minutes=9) < start - before < dt.timedelta(minutes=11)
    assert [(r.name, r.units) for r in spec.rate_limits] == [("api", 1)]
    # A task without options is a plain task: no policy field set.
    plain = weft.call_spec("h")
    assert plain.priority == 0 and not plain.after and not plain.resources and not plain.HasField("not_before")


@pytest.mark.parametrize("options, says", [
    (dict(priority=0), "priority"),
    (dict(priority=10), "priority"),
    (dict(priority=True), "priority"),
    (dict(fair_key="team a"), "fair_key"),
    (dict(fair_key="x" * 129), "fair_key"),
    (dict(fair_weight=0), "fair_weight"),
    (dict(fair_weight=1001), "fair_weight"),
    (dict(max_concurrent=2), "concurrency_key"),
    (dict(concurrency_key="k", max_concurrent=0), "max_concurrent"),
    (dict(concurrency_key="k", on_limit="drop"), "on_limit"),
    (dict(rate_limits={"api": 0}), "rate_limits"),
    (dict(rate_limits={"a pi": 1}), "rate_limits"),
    (dict(resources={"GPU": 1}), "resource name"),
    (dict(resources={"mem": "2XB"}), "not an amount"),
    (dict(resources={"mem": -1}), "out of range"),
    (dict(after=["a", "a"]), "twice"),
    (dict(after=[object()]), "after"),
    (dict(after_rule="sometimes"), "after_rule"),
    (dict(delay="soon"), "delay"),
    (dict(delay=5, not_before=dt.datetime(2030, 1, 1)), "not both"),
    (dict(ref="has space"), "ref"),
    (dict(fail_if_infeasible="yes"), "fail_if_infeasible"),
])
def test_a_bad_option_is_a_value_error_naming_it_before_anything_is_sent(options, says):
    with pytest.raises(ValueError, match=says):
        weft.call_spec("h", **options)
    client = weft.Client("http://127.0.0.1:1")  # nothing listens: the check comes first
    with pytest.raises(ValueError, match=says):
        client.submit_call("h", **options)
    client.close()


#: A task id (a ULID) of a task outside the graph.
EXISTING = "01J5Z3K4M5N6P7Q8R9S0T1V2W3"


def test_a_graph_after_that_is_neither_a_ref_nor_a_task_id_is_a_value_error_naming_it():
    for typo in ["fetchh", "01J5Z3K4M5N6P7Q8R9S0T1V2W", "81J5Z3K4M5N6P7Q8R9S0T1V2W3", "01J5Z3K4M5N6P7Q8R9S0T1V2WU"]:
        with pytest.raises(ValueError, match=f"tasks\\[1\\].after names {typo!r}, which is neither a ref of the graph nor a task id"):
            graph_request([weft.call_spec("fetch", ref="fetch"), weft.call_spec("count", after=[typo])])
    # A task id in either case is one (ULIDs are case-insensitive).
    request = graph_request([weft.call_spec("count", after=[EXISTING.lower()])])
    assert [d.task_id for d in request.tasks[0].after] == [EXISTING.lower()]


def test_a_task_id_in_a_graph_is_read_as_the_coordinator_reads_it():
    # Ignoring case is ASCII only: the Kelvin sign and the long s are no K and S.
    for lookalike in [EXISTING[:-2] + "\u212a" + EXISTING[-1], EXISTING[:-2] + "\u017f" + EXISTING[-1]]:
        with pytest.raises(ValueError, match="neither a ref of the graph nor a task id"):
            graph_request([weft.call_spec("count", after=[lookalike])])
    # Surrounding whitespace is trimmed there (TaskId::from_str), so it is no typo here.
    request = graph_request([weft.call_spec("count", after=[f" {EXISTING}\n"])])
    assert [d.task_id.strip() for d in request.tasks[0].after] == [EXISTING]
    # Unicode White_Space (str::trim) only: the separators str.strip() also takes are kept there.
    request = graph_request([weft.call_spec("count", after=[f"\u3000\x85{EXISTING}\u2029"])])
    assert len(request.tasks[0].after) == 1
    for separator in "\x1c\x1d\x1e\x1f":
        with pytest.raises(ValueError, match="neither a ref of the graph nor a task id"):
            graph_request([weft.call_spec("count", after=[separator + EXISTING])])


def test_a_job_too_large_to_run_after_is_refused_naming_the_job_and_its_size():
    from weft.policy import AFTER_MAX

    big = weft.Job(id="big0", task_ids=[f"big{i}" for i in range(AFTER_MAX + 1)])
    with pytest.raises(ValueError, match=f"at most {AFTER_MAX} tasks, and job 'big0' has {AFTER_MAX + 1}"):
        weft.call_spec("report", after=big)
    # One that fits alone, past the limit with what was named before it: named too.
    fits = weft.Job(id="fit0", task_ids=[f"fit{i}" for i in range(AFTER_MAX)])
    with pytest.raises(ValueError, match=f"job 'fit0' has {AFTER_MAX}"):
        weft.call_spec("report", after=["other", fits])


def test_after_a_job_waits_for_every_task_of_the_job():
    job = weft.Job(id="t0", task_ids=["t0", "t1", "t2"], by_ref={"a": "t0"})
    spec = weft.call_spec("report", after=[job])
    assert [d.task_id for d in spec.after] == ["t0", "t1", "t2"]
    # Beside one of its own tasks, each task is named once.
    spec = weft.call_spec("report", after=["t1", job, "other"])
    assert [d.task_id for d in spec.after] == ["t1", "t0", "t2", "other"]
    with pytest.raises(ValueError, match="twice"):
        weft.call_spec("report", after=[job, job])


def test_a_graph_names_its_tasks_by_ref_and_refuses_a_dangling_or_repeated_one():
    request = graph_request([
        weft.call_spec("fetch", ref="fetch"),
        weft.exec_spec(["train"], ref="train", after=["fetch"]),
        weft.call_spec("report", after=[weft.Ref("fetch"), "train", EXISTING], after_rule="all_finished"),
    ])
    assert [(d.task_id, d.ref) for d in request.tasks[2].after] == [("", "fetch"), ("", "train"), (EXISTING, "")]
    assert [(d.task_id, d.ref) for d in request.tasks[1].after] == [("", "fetch")]
    with pytest.raises(ValueError, match="no task of the graph"):
        graph_request([weft.call_spec("a", after=[weft.Ref("missing")])])
    with pytest.raises(ValueError, match="used twice"):
        graph_request([weft.call_spec("a", ref="a"), weft.call_spec("b", ref="a")])
    with pytest.raises(ValueError, match="twice"):
        graph_request([weft.call_spec("a", ref="a"), weft.call_spec("b", after=[weft.Ref("a"), "a"])])
    with pytest.raises(ValueError, match="at least one"):
        graph_request([])


def test_limits_and_schedules_are_checked_before_they_are_sent():
    rate = parse_rate("100/s")
    assert (rate.units, rate.period.seconds) == (100, 1)
    assert parse_rate("3/500ms").period.nanos == 500_000_000
    assert parse_rate("10/m").period.seconds == 60
    for bad in ("100", "0/s", "x/s", "1/2d", "5/0s"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    assert limit_pb("api", "20/s", 40, None).rate.burst == 40
    assert limit_pb("user-42", None, None, 2).max_running == 2
    for args in (("api", None, None, None), ("api", "1/s", None, 2), ("api", None, None, 0), ("a b", "1/s", None, None),
                 ("k", None, 5, 2)):
        with pytest.raises(ValueError):
            limit_pb(*args)
    spec = schedule_spec("nightly", "0 3 * * *", weft.exec_spec(["backup"]), "Europe/Paris", "cancel_running", "all")
    assert (spec.name, spec.time_zone, spec.overlap, spec.catch_up) == ("nightly", "Europe/Paris", 3, 3)
    with pytest.raises(ValueError, match="five fields"):
        schedule_spec("n", "* * *", weft.exec_spec(["x"]))
    with pytest.raises(ValueError, match="overlap"):
        schedule_spec("n", "* * * * *", weft.exec_spec(["x"]), overlap="never")
    with pytest.raises(ValueError, match="no ref, after"):
        schedule_spec("n", "* * * * *", weft.exec_spec(["x"], after=["t"]))


def test_a_schedule_may_use_a_cron_nickname():
    for nickname in ("@hourly", "@daily", " @weekly ", "@yearly"):
        assert schedule_spec("n", nickname, weft.exec_spec(["x"])).cron == nickname
    for bad in ("@", "@daily extra", "daily"):
        with pytest.raises(ValueError, match="five fields"):
            schedule_spec("n", bad, weft.exec_spec(["x"]))


def test_the_new_states_are_final_and_their_errors_say_so():
    assert not weft.TaskState.PENDING.is_final
    assert weft.TaskState.UPSTREAM_FAILED.is_final and weft.TaskState.SKIPPED.is_final
    assert weft.TaskState.from_pb(common_pb2.TASK_STATE_UPSTREAM_FAILED) == weft.TaskState.UPSTREAM_FAILED
    record = task_pb2.Task(id="t", state=common_pb2.TASK_STATE_UPSTREAM_FAILED, job_id="j", waiting_for=["p"])
    task = weft.Task.from_pb(record)
    assert (task.job_id, task.waiting_for, task.is_final) == ("j", ["p"], True)
    assert isinstance(weft.errors.task_error(task), weft.UpstreamFailed)
    task = weft.Task.from_pb(task_pb2.Task(id="t", state=common_pb2.TASK_STATE_SKIPPED))
    assert isinstance(weft.errors.task_error(task), weft.TaskSkipped)


# -- the worker's side (no binaries) ---------------------------------------------


def _assignment(*parents) -> node_pb2.Assignment:
    assignment = node_pb2.Assignment(task_id="child", attempt=1)
    for task_id, ref, state, output in parents:
        assignment.parents.add(task_id=task_id, ref=ref, state=state, output=output)
    return assignment


def test_parents_come_in_after_order_with_lower_case_states():
    parents = parents_of(_assignment(("p1", "fetch", common_pb2.TASK_STATE_SUCCEEDED, b'{"n": 1}'),
                                     ("p2", "", common_pb2.TASK_STATE_FAILED, b"")))
    assert parents == [ParentResult("p1", "fetch", "succeeded", b'{"n": 1}'), ParentResult("p2", "", "failed", b"")]
    assert parents[0].json() == {"n": 1} and parents[0].succeeded and not parents[1].succeeded


def test_an_exec_task_finds_its_parents_in_files_and_leaves_its_output_in_one():
    files = ExecFiles([ParentResult("p1", "fetch", "succeeded", b"data"), ParentResult("p2", "", "failed", b""),
                       ParentResult("p3", "../evil", "succeeded", b"x")])
    try:
        env = files.env()
        root = Path(env["WEFT_PARENTS"])
        index = json.loads((root / INDEX).read_text())
        assert [(e["task_id"], e["ref"], e["state"], e["file"]) for e in index] == [
            ("p1", "fetch", "succeeded", "fetch"), ("p2", "", "failed", "p2"), ("p3", "../evil", "succeeded", "p3")]
        assert (root / "fetch").read_bytes() == b"data", "a parent's file holds its output"
        assert files.output() is None, "nothing written: no output"
        Path(env["WEFT_OUTPUT"]).write_bytes(b"result")
        assert files.output() == b"result"
    finally:
        files.remove()
    assert not root.exists(), "the files go with the attempt"


def test_ten_thousand_parents_of_one_ref_get_the_first_free_names_in_linear_time():
    from weft.worker.parents import _Names

    parents = [ParentResult(f"p{i}", "build", "succeeded", b"") for i in range(10_000)]
    parents.insert(1, ParentResult("lit", "build.3", "succeeded", b""))
    names = _Names()
    given = [names.name(p) for p in parents]
    assert given[:5] == ["build", "build.3", "build.2", "build.4", "build.5"], "as weft-node names them"
    assert given[-1] == "build.10001" and len(set(given)) == len(given)
    assert names.probes <= 2 * len(given) + 1, f"{names.probes} tries for {len(given)} names"


def test_a_pickled_call_gets_its_parents_results_in_place_of_its_futures():
    from weft.worker.pickled import Parent

    parents = [ParentResult("a", "", "succeeded", pickle.dumps(9)), ParentResult("b", "", "succeeded", b'{"v": 2}'),
               ParentResult("c", "", "succeeded", b"raw")]
    data = encode_call(exec_funcs.add, (Parent(0, "pickle"),), {"y": Parent(1, "json")})
    with pytest.raises(HandlerError, match="TypeError"):  # 9 + {"v": 2}: the JSON parent decoded as a dict
        run_pickled(with_parents(parents, data), allowed=ALLOWED)
    data = encode_call(exec_funcs.noop, ([Parent(0, "pickle"), Parent(2, "bytes")],), {})
    assert pickle.loads(run_pickled(with_parents(parents, data), allowed=ALLOWED)) == [9, b"raw"]
    data = encode_call(exec_funcs.noop, ({"k": Parent(1, "json")},), {})
    assert pickle.loads(run_pickled(with_parents(parents, data), allowed=ALLOWED)) == {"k": {"v": 2}}
    # A parent that did not succeed (a rule other than all_succeeded) has no result to pass.
    failed = [ParentResult("a", "", "failed", b"")]
    with pytest.raises(HandlerError, match="ended failed"):
        run_pickled(with_parents(failed, encode_call(exec_funcs.noop, (Parent(0, "pickle"),), {})), allowed=ALLOWED)
    # A parent's pickled result is unpickled under the worker's restrictions too.
    evil = [ParentResult("a", "", "succeeded", pickle.dumps(os.system))]
    with pytest.raises(StartFailed, match="not allowed"):
        run_pickled(with_parents(evil, encode_call(exec_funcs.noop, (Parent(0, "pickle"),), {})), allowed=ALLOWED)


def test_a_worker_declares_its_resources():
    worker = weft.Worker("http://127.0.0.1:1", slots=1, resources={"gpu": 2, "mem": "32GiB"})
    assert worker.resources == {"gpu": 2, "mem": 32 << 30}
    with pytest.raises(ValueError, match="resource name"):
        weft.Worker("http://127.0.0.1:1", slots=1, resources={"GPU": 1})
    from weft.worker_demo import build_worker, parser

    args = parser().parse_args(["--coordinator", "http://127.0.0.1:1", "--resource", "gpu=1", "--resource", "mem=1KiB"])
    assert build_worker(args).resources == {"gpu": 1, "mem": 1024}
    with pytest.raises(SystemExit, match="not name=amount"):
        build_worker(parser().parse_args(["--coordinator", "http://127.0.0.1:1", "--resource", "gpu"]))


# -- the executor links futures without waiting (a stand-in client) ---------------


class _FakeClient:
    """``weft.aio.Client``'s part the executor uses: Submits are recorded (the first may be
    held), no task ever finishes unless told."""

    def __init__(self, hold_first: bool = False, refuse_first: bool = False):
        self.requests: list = []
        self.release = asyncio.Event()
        if not hold_first:
            self.release.set()
        self.refuse_first = refuse_first
        self.finished: asyncio.Queue = asyncio.Queue()

    async def submit_many(self, specs):
        specs = list(specs)
        self.requests.append(specs)
        number = len(self.requests)
        if number == 1:
            await self.release.wait()
            if self.refuse_first:
                raise weft.InvalidArgument("tasks[0]: refused")
        return [f"t{number}.{i}" for i in range(len(specs))]

    async def _wait_many_records(self, task_ids, timeout=None, results_only=False):
        await asyncio.Event().wait()  # nothing finishes
        yield  # pragma: no cover

    async def cancel(self, task_id, reason=""):
        pass

    async def close(self):
        pass


def test_futures_as_arguments_are_linked_by_ref_in_one_submit_and_by_id_across_submits():
    async def body() -> None:
        client = _FakeClient(hold_first=True)
        ex = weft.aio.Executor(client=client)
        a = ex.submit(exec_funcs.square, 3)
        b = ex.submit(exec_funcs.add, a, 1)
        c = ex.submit(exec_funcs.add, a, y=2, priority=7)
        d = ex.submit(exec_funcs.total, [b, c], after=["existing-task"])
        await poll_async(lambda: len(client.requests) == 1)
        first = client.requests[0]
        assert len(first) == 4, "a graph queued together goes in one Submit"
        assert first[0].ref and [x.ref for x in first[1].after] == [first[0].ref]
        assert [x.ref for x in first[3].after][:2] == [first[1].ref, first[2].ref]
        assert first[3].after[2].task_id == "existing-task"
        assert first[2].priority == 7, "priority= is the task's, not the function's"
        # A child of a parent whose Submit is on its way waits for its id, not for its end.
        e = ex.submit(exec_funcs.noop, d)
        await asyncio.sleep(0.05)
        assert len(client.requests) == 1, "sent before its parent had an id"
        client.release.set()
        await poll_async(lambda: len(client.requests) == 2)
        assert [x.task_id for x in client.requests[1][0].after] == ["t1.3"]
        assert not d.done() and e.task_id == "t2.0"
        await ex.shutdown(wait=False, cancel_futures=True)

    asyncio.run(body())


def test_a_child_of_a_future_that_was_never_submitted_raises_upstream_failed():
    async def body() -> None:
        client = _FakeClient(hold_first=True, refuse_first=True)
        ex = weft.aio.Executor(client=client)
        a = ex.submit(exec_funcs.square, 3)
        await poll_async(lambda: len(client.requests) == 1)
        b = ex.submit(exec_funcs.noop, a)
        client.release.set()
        with pytest.raises(weft.InvalidArgument):
            await asyncio.wait_for(a, 10)
        with pytest.raises(weft.UpstreamFailed, match="not submitted"):
            await asyncio.wait_for(b, 10)
        assert len(client.requests) == 1, "the child was never sent"
        await ex.shutdown()

    asyncio.run(body())


def test_the_executor_refuses_what_it_cannot_link():
    async def body() -> None:
        client = _FakeClient()
        one, other = weft.aio.Executor(client=client), weft.aio.Executor(client=client)
        a = one.submit(exec_funcs.square, 3)
        with pytest.raises(TypeError, match="same weft executor"):
            other.submit(exec_funcs.noop, a)
        with pytest.raises(TypeError, match="ctx.parents"):
            one.submit("echo", a)
        with pytest.raises(TypeError, match="per task"):
            weft.aio.Executor(client=client, after=["x"])
        await one.shutdown(wait=False, cancel_futures=True)
        await other.shutdown(wait=False, cancel_futures=True)

    asyncio.run(body())


async def poll_async(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


# -- against the coordinator and a Python worker -----------------------------------


def require_feature(cluster, feature: str) -> None:
    """Skips unless the coordinator serves ``feature`` (its rpc not UNIMPLEMENTED)."""
    probes = {
        "dependencies": lambda: cluster.client.cancel_job(NO_SUCH_TASK),
        "limits": cluster.client.list_limits,
        "schedules": cluster.client.list_schedules,
    }
    try:
        probes[feature]()
    except weft.Unimplemented:
        pytest.skip(f"this coordinator does not implement {feature} yet")
    except weft.NotFound:
        pass


@pytest.fixture
def cluster(spawn, tmp_path):
    c = Cluster(spawn, tmp_path)
    argv = [sys.executable, str(TESTS_DIR / "exec_worker.py"), "--coordinator", c.url, "--ca-file", c.ca_file,
            "--slots", "4", "--name", "py", "--allow-module", "exec_funcs", "--allow-module", "math",
            "--allow-module", "pipeline", "--exec", "allow", "--resource", "gpu=2"]
    if c.joins:
        argv += ["--join", c.join_token(), "--state-dir", str(c.state_dir("py"))]
    pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    c.worker = spawn(argv, name="py", env={"PYTHONPATH": pythonpath})
    c.wait_nodes("py")
    yield c
    c.client.close()


def executor(cluster, **options) -> weft.Executor:
    return weft.Executor(cluster.url, token=cluster.token, ca_file=cluster.ca_file, **options)


def test_a_graph_runs_in_order_and_its_job_can_be_read_listed_and_cancelled(cluster, tmp_path):
    require_feature(cluster, "dependencies")
    client = cluster.client
    gate = tmp_path / "gate"
    job = client.submit_graph([
        weft.exec_spec(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done; printf fetched > $WEFT_OUTPUT"],
                       ref="fetch"),
        weft.call_spec("parents_thread", ref="seen", after=["fetch"]),
        weft.call_spec("echo", b"cleanup", ref="cleanup", after=["seen"], after_rule="all_finished"),
    ])
    assert job.id == job.task_ids[0] and set(job.by_ref) == {"fetch", "seen", "cleanup"}
    poll(lambda: client.get(job["seen"]).state == weft.TaskState.PENDING, what="the child pending")
    assert client.get(job["seen"]).waiting_for == [job["fetch"]]
    listed = client.list(job=job.id)
    assert [t.id for t in listed] == job.task_ids, "a job lists oldest first"
    gate.touch()
    done = client.wait_job(job.id, timeout=60)
    assert done.succeeded, done.states()
    seen = json.loads(client.get(job["seen"]).output)
    assert seen == [[job["fetch"], "fetch", "succeeded", "fetched"]], "the handler saw its parent's output"
    # Cancel cascades: a pending child ends without running.
    second = client.submit_graph([
        weft.call_spec("sleep", b"30", ref="slow"),
        weft.call_spec("echo", b"never", ref="after", after=["slow"]),
    ])
    answer = client.cancel_job(second)
    assert answer.cancelled == 2
    final = client.wait_job(second.id, timeout=30)
    assert final.is_final and not final.succeeded
    assert client.get(second["after"]).state in (weft.TaskState.CANCELLED, weft.TaskState.UPSTREAM_FAILED)
    with pytest.raises(weft.NotFound):
        client.job(NO_SUCH_TASK)
    # A cycle is refused by the coordinator, nothing committed.
    with pytest.raises(weft.InvalidArgument):
        client.submit_graph([weft.call_spec("echo", ref="x", after=["y"]), weft.call_spec("echo", ref="y", after=["x"])])


def test_process_handlers_and_exec_tasks_on_the_python_worker_get_their_parents(cluster):
    require_feature(cluster, "dependencies")
    client = cluster.client
    job = client.submit_graph([
        weft.call_spec("echo", b"one", ref="one"),
        weft.exec_spec(["sh", "-c", "printf two > $WEFT_OUTPUT"], ref="two"),
        weft.call_spec("parents_process", ref="proc", after=["one", "two"]),
        weft.exec_spec(["sh", "-c", 'cat "$WEFT_PARENTS/index.json" > "$WEFT_OUTPUT"; cat "$WEFT_PARENTS/one"'],
                       ref="exec", after=["two", "one"]),
    ])
    done = client.wait_job(job.id, timeout=60)
    assert done.succeeded, done.states()
    assert json.loads(client.get(job["proc"]).output) == [
        [job["one"], "one", "succeeded", "one"], [job["two"], "two", "succeeded", "two"]]
    index = json.loads(client.get(job["exec"]).output)
    assert [(e["task_id"], e["ref"], e["state"]) for e in index] == [
        (job["two"], "two", "succeeded"), (job["one"], "one", "succeeded")], "in after order"
    assert b"".join(data for _, data in client.output(job["exec"])) == b"one"


def test_executor_futures_as_arguments_a_diamond_and_a_failing_parent(cluster, tmp_path):
    require_feature(cluster, "dependencies")
    gate = tmp_path / "gate"
    with executor(cluster, max_attempts=1) as ex:
        a = ex.submit(exec_funcs.wait_for_file, str(gate))  # "released", once the gate opens
        b = ex.submit(exec_funcs.add, "x", a)                # ("x" + "released")
        c = ex.submit(exec_funcs.add, a, y="y")
        d = ex.submit(exec_funcs.noop, {"left": b, "right": c, "n": 1})
        e = ex.submit(exec_funcs.total, [ex.submit(exec_funcs.square, 3), ex.submit(exec_funcs.square, 4)])
        # Nothing waited here: every task is submitted while the first still runs.
        poll(lambda: d.task_id is not None, what="the join submitted")
        assert not a.done()
        assert cluster.client.get(d.task_id).state == weft.TaskState.PENDING
        gate.touch()
        assert d.result(timeout=60) == {"left": "xreleased", "right": "releasedy", "n": 1}
        assert e.result(timeout=60) == 25
        bad = ex.submit(exec_funcs.fail, "boom")
        child = ex.submit(exec_funcs.noop, bad)
        ordered = ex.submit(exec_funcs.square, 5, after=[bad])
        with pytest.raises(exec_funcs.Oops):
            bad.result(timeout=60)
        with pytest.raises(weft.UpstreamFailed):
            child.result(timeout=60)
        with pytest.raises(weft.UpstreamFailed):
            ordered.result(timeout=60)


def test_the_readme_pipeline_runs_as_written(cluster):
    require_feature(cluster, "dependencies")
    import pipeline

    with executor(cluster, max_attempts=1) as ex:
        data = ex.submit(pipeline.load, 1000)
        squares = ex.submit(pipeline.square_all, data, priority=8)
        both = ex.submit(pipeline.total, [data, squares])
        assert both.result(timeout=60) == 333333000
        assert cluster.client.get(squares.task_id).spec.priority == 8


def test_limits_round_trip(cluster):
    require_feature(cluster, "limits")
    client = cluster.client
    client.set_limit("api", "100/s", burst=200)
    client.set_limit("user-42", max_running=2)
    limits = {(limit.name, limit.kind): limit for limit in client.list_limits()}
    api = limits[("api", "rate")]
    assert (api.units, api.period, api.burst) == (100, 1.0, 200)
    assert limits[("user-42", "concurrency")].max_running == 2
    client.delete_limit("api")
    client.delete_limit("user-42", kind="concurrency")
    assert client.list_limits() == []
    with pytest.raises(weft.NotFound):
        client.delete_limit("api")
    with pytest.raises(ValueError):
        client.delete_limit("api", kind="bucket")
    # A task taking units from a rate limit runs once the limit is set.
    client.set_limit("py-api", "5/s")
    assert client.call("echo", b"hi", rate_limits={"py-api": 1}, wait_timeout=30) == b"hi"


def test_schedules_round_trip(cluster):
    require_feature(cluster, "schedules")
    client = cluster.client
    created = client.create_schedule("tick", "* * * * * *", weft.call_spec("echo", b"tick"), overlap="queue")
    assert (created.name, created.cron, created.overlap, created.paused) == ("tick", "* * * * * *", "queue", False)
    with pytest.raises(weft.AlreadyExists):
        client.create_schedule("tick", "* * * * *", weft.call_spec("echo"))
    poll(lambda: client.list_schedules()[0].fired >= 1, timeout=20, what="the schedule fired")
    fired = client.list_schedules()[0]
    assert client.wait(fired.last_task_id, timeout=30).output == b"tick"
    paused = client.pause_schedule("tick")
    assert paused.paused and paused.next_fire is None
    assert not client.resume_schedule("tick").paused
    client.delete_schedule("tick")
    assert client.list_schedules() == []
    with pytest.raises(weft.NotFound):
        client.delete_schedule("tick")
    with pytest.raises(weft.InvalidArgument):
        client.create_schedule("bad", "99 * * * *", weft.call_spec("echo"))


def test_the_asyncio_client_submits_a_graph(cluster):
    require_feature(cluster, "dependencies")

    async def body() -> None:
        async with weft.aio.Client(cluster.url, token=cluster.token, ca_file=cluster.ca_file) as client:
            job = await client.submit_graph([weft.call_spec("echo", b"a", ref="a"),
                                             weft.call_spec("parents_thread", ref="b", after=["a"])])
            done = await client.wait_job(job.id, timeout=60)
            assert done.succeeded
            assert [t.id for t in (await client.job(job.id)).tasks] == job.task_ids

    asyncio.run(body())


def test_a_python_worker_declares_resources_and_tasks_are_placed_by_them(cluster):
    require_feature(cluster, "limits")  # served with resources, by the same part of the coordinator
    client = cluster.client
    [node] = client.nodes()
    assert node.resources == {"gpu": 2}, "declared in Register (--resource gpu=2)"
    assert client.call("echo", b"fits", resources={"gpu": 2}, priority=9, fair_key="team-a",
                       concurrency_key="user-1", max_concurrent=1, wait_timeout=30) == b"fits"
    task = client.wait(client.submit_call("echo", b"never", resources={"gpu": 3}, fail_if_infeasible=True), timeout=30)
    assert task.state == weft.TaskState.FAILED, "no node could ever run it: failed at once"
