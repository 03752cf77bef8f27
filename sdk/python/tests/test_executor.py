"""weft.Executor and weft.aio.Executor against the real coordinator and a real Python worker
process serving pickled calls (``--allow-module exec_funcs --allow-module math``), and
handlers with ``codec="json"``. The first tests need no binaries: the worker's unpickling
rules and the client's checks, called directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import pickle
import sys
import threading
from pathlib import Path

import grpc
import pytest

import exec_funcs
import weft
import weft.aio
from weft._proto import common_pb2, task_pb2, task_pb2_grpc
from weft.executor import encode_call, encode_chunk
from weft.worker.handlers import HandlerError, StartFailed
from weft.worker.pickled import HANDLER, handler, run_pickled

from conftest import poll
from test_e2e import Cluster

TESTS_DIR = Path(__file__).resolve().parent
ALLOWED = ("exec_funcs", "math")


class Evil:
    """Pickles as a call of ``os.system``: what a hostile submitter would send."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def global_payload(module: str, name: str, arg: str) -> bytes:
    """A protocol 0 pickle calling ``module.name(arg)``, written by hand (as an attacker would)."""
    return f"c{module}\n{name}\n(S{arg!r}\ntR.".encode()


# -- no binaries needed --------------------------------------------------------


def test_the_worker_runs_an_allowed_call_and_a_chunk_and_answers_pickles():
    assert pickle.loads(run_pickled(encode_call(exec_funcs.add, (1,), {"y": 2, "scale": 3}), allowed=ALLOWED)) == 9
    assert pickle.loads(run_pickled(encode_call(math.factorial, (20,), {}), allowed=ALLOWED)) == math.factorial(20)
    chunk = encode_chunk(exec_funcs.add, [(1, 2), (3, 4), (5, 6)])
    assert pickle.loads(run_pickled(chunk, allowed=ALLOWED)) == [3, 7, 11]
    # Ordinary argument types need nothing allowed.
    import collections
    import datetime
    import decimal

    args = ({1, 2}, frozenset([3]), bytearray(b"x"), 1 + 2j, collections.OrderedDict(a=1), decimal.Decimal("1.5"),
            datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc), range(3))
    assert pickle.loads(run_pickled(encode_call(exec_funcs.noop, (args,), {}), allowed=ALLOWED)) == args


def test_the_worker_refuses_a_global_outside_the_allowed_modules_before_running_anything(tmp_path):
    proof = tmp_path / "ran"
    with pytest.raises(StartFailed) as refused:
        run_pickled(encode_call(exec_funcs.noop, (Evil(f"touch {proof}"),), {}), allowed=ALLOWED)
    message = str(refused.value)
    assert "module 'posix' is not allowed" in message and "never" in message, message
    with pytest.raises(StartFailed) as refused:
        run_pickled(encode_call(json.dumps, (1,), {}), allowed=ALLOWED)
    assert "module 'json' is not allowed" in str(refused.value) and "--allow-module json" in str(refused.value)
    # An allowed module is no door to the modules it imports.
    with pytest.raises(StartFailed) as refused:
        run_pickled(global_payload("exec_funcs", "os.system", f"touch {proof}"), allowed=ALLOWED)
    assert "names a module" in str(refused.value), str(refused.value)
    # A submodule is allowed with its package, a similarly named module is not.
    with pytest.raises(StartFailed, match="module 'exec_funcs_other' is not allowed"):
        run_pickled(global_payload("exec_funcs_other", "noop", "x"), allowed=ALLOWED)
    with pytest.raises(StartFailed, match="dunder"):
        run_pickled(global_payload("exec_funcs", "noop.__globals__", "x"), allowed=ALLOWED)
    with pytest.raises(StartFailed, match="not a payload"):
        run_pickled(b"not a pickle", allowed=ALLOWED)
    assert not proof.exists(), "nothing ran"


def test_pickled_refuses_a_global_imported_into_an_allowed_module(tmp_path):
    import pickled_imports

    allowed = ("pickled_imports",)
    proof = tmp_path / "written"
    with pytest.raises(StartFailed, match="defined in posix"):
        run_pickled(global_payload("pickled_imports", "getcwd", "x"), allowed=allowed)
    with pytest.raises(StartFailed, match="defined in pathlib"):
        run_pickled(global_payload("pickled_imports", "Path", str(proof)), allowed=allowed)
    # Path.write_text(proof, "x"), through the allowed module: a call built from the global.
    write = f"cpickled_imports\nPath.write_text\n(S{str(proof)!r}\nS'x'\ntR.".encode()
    with pytest.raises(StartFailed, match="defined in pathlib"):
        run_pickled(write, allowed=allowed)
    assert not proof.exists(), "nothing ran"
    # What the module defines itself is still callable, and so are C functions of an allowed module.
    assert pickle.loads(run_pickled(encode_call(pickled_imports.own, (3,), {}), allowed=allowed)) == 3
    assert pickle.loads(run_pickled(encode_call(math.factorial, (5,), {}), allowed=ALLOWED)) == 120
    assert pickle.loads(run_pickled(encode_call(exec_funcs.Oops, ("x",), {}), allowed=ALLOWED)).args == ("x",)


def _unbound_c_function(c_function, module: str):
    """``c_function`` (a C function of a module) made again bound to no object (``__self__``
    None, as Cython makes with binding=False): ``PyCFunction_NewEx(its PyMethodDef, NULL, module)``."""
    import ctypes

    # A PyCFunctionObject: the object header, then the pointer to its PyMethodDef.
    ml = ctypes.c_void_p.from_address(id(c_function) + object.__basicsize__).value
    new = ctypes.pythonapi.PyCFunction_NewEx
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_void_p, ctypes.py_object]
    return new(ml, None, module)


def test_pickled_takes_a_c_function_bound_to_nothing_by_its_module(monkeypatch):
    import pickled_imports

    fn = _unbound_c_function(math.factorial, "pickled_imports")
    assert fn.__self__ is None and fn.__module__ == "pickled_imports" and fn(5) == 120
    monkeypatch.setattr(pickled_imports, "factorial", fn, raising=False)
    payload = pickle.dumps((1, "call", fn, (5,), {}))
    assert b"pickled_imports" in payload, "pickle names it by its __module__"
    assert pickle.loads(run_pickled(payload, allowed=("pickled_imports",))) == 120
    # Its __module__ is what counts: one naming another module is refused through this one.
    monkeypatch.setattr(pickled_imports, "imported", _unbound_c_function(math.factorial, "elsewhere"), raising=False)
    with pytest.raises(StartFailed, match="defined in elsewhere"):
        run_pickled(global_payload("pickled_imports", "imported", "x"), allowed=("pickled_imports",))


def test_an_object_naming_no_module_counts_as_its_types_package_only_when_reached_through_it(monkeypatch):
    import itertools

    import pickled_imports
    from weft.worker.pickled import home, loads

    # Like numpy.add before numpy 2.2: no __module__ of its own; its type's is "itertools".
    counter = itertools.count(7)
    assert not hasattr(counter, "__module__")
    assert home(counter, "itertools") == "itertools" and home(counter, "itertools.sub") == "itertools"
    assert home(counter, "pickled_imports") is None and home(counter) is None
    # Reached through its type's package, allowed: taken (numpy.add with numpy allowed).
    monkeypatch.setattr(itertools, "weft_test_counter", counter, raising=False)
    assert loads(b"citertools\nweft_test_counter\n.", ("itertools",)) is counter
    # Imported into an allowed module from elsewhere: refused.
    monkeypatch.setattr(pickled_imports, "counter", counter, raising=False)
    with pytest.raises(StartFailed, match="defined in no module"):
        loads(b"cpickled_imports\ncounter\n.", ("pickled_imports",))


def test_an_object_hiding_its_module_is_refused_though_its_type_is_of_an_allowed_module(monkeypatch):
    import itertools

    import pickled_imports
    from weft.worker.pickled import home, loads

    # Its type says "pickled_imports", its __module__ forwards to a counter that has none.
    proxy = pickled_imports.Proxy(itertools.count(7))
    assert type(proxy).__module__ == "pickled_imports" and not hasattr(proxy, "__module__")
    assert home(proxy, "pickled_imports") is None
    monkeypatch.setattr(pickled_imports, "proxied", proxy, raising=False)
    with pytest.raises(StartFailed, match="defined in no module"):
        loads(b"cpickled_imports\nproxied\n.", ("pickled_imports",))


def test_the_function_s_exception_fails_the_call_with_its_traceback_and_the_pickled_exception():
    with pytest.raises(HandlerError) as failed:
        run_pickled(encode_call(exec_funcs.fail, ("boom",), {}), allowed=ALLOWED)
    text = str(failed.value)
    assert text.startswith("exec_funcs.Oops: boom\n\nTraceback"), text
    assert "weft-exception-pickle: " in text.splitlines()[-1]


def test_the_allow_list_is_checked_when_the_worker_is_built():
    for bad in ([], ["os system"], "math", ["os"], ["subprocess"], ["builtins"], ["os.path"]):
        with pytest.raises((ValueError, TypeError)):
            handler(bad)
    worker = weft.Worker("http://127.0.0.1:1", slots=1, allow_modules=["exec_funcs"])
    assert HANDLER in worker.handlers
    assert HANDLER not in weft.Worker("http://127.0.0.1:1", slots=1).handlers, "served only when told"


def test_functions_a_worker_cannot_import_are_refused_on_the_client():
    for fn in (lambda x: x, _nested()):
        with pytest.raises(TypeError, match="lambda or a nested function"):
            encode_call(fn, (1,), {})
    main = type(exec_funcs.noop)(exec_funcs.noop.__code__, {"__name__": "__main__"}, "main_fn")
    main.__module__ = "__main__"
    with pytest.raises(TypeError, match="__main__"):
        encode_call(main, (), {})
    with pytest.raises(TypeError, match="cannot pickle"):
        encode_call(exec_funcs.noop, (lambda: None,), {})


def _nested():
    def inner(x):
        return x

    return inner


class _HeldClient:
    """A stand-in for ``weft.aio.Client``: its first Submit waits until released; every task
    succeeds with its id as the (pickled) result."""

    def __init__(self) -> None:
        self.submits: list = []
        self.release = asyncio.Event()
        #: What each wait asked: results only (no specs sent back), or whole records.
        self.results_only: list = []

    async def submit_many(self, specs):
        self.submits.append(len(specs))
        number = len(self.submits)
        if number == 1:
            await self.release.wait()
        return [f"t{number}.{i}" for i in range(len(specs))]

    async def _wait_many_records(self, task_ids, timeout=None, results_only=False):
        from weft._proto import common_pb2, task_pb2

        self.results_only.append(results_only)

        for task_id in task_ids:
            yield task_pb2.Task(id=task_id, state=common_pb2.TASK_STATE_SUCCEEDED, output=pickle.dumps(task_id))


def test_a_batch_queued_while_another_is_on_its_way_is_submitted_at_once():
    async def body() -> None:
        client = _HeldClient()
        ex = weft.aio.Executor(client=client)
        first = ex.submit(math.factorial, 3)
        while client.submits != [1]:
            await asyncio.sleep(0.001)
        second = ex.submit(math.factorial, 4)
        assert await asyncio.wait_for(second, 10) == "t2.0", "not held behind the first Submit"
        assert not first.done()
        client.release.set()
        assert await asyncio.wait_for(first, 10) == "t1.0"
        await ex.shutdown()
        assert client.results_only == [True, True], "futures wait for results, not specs"

    asyncio.run(body())


def test_futures_cancelled_before_they_were_sent_leave_the_executor_working():
    async def body() -> None:
        client = _HeldClient()
        client.release.set()
        ex = weft.aio.Executor(client=client)
        # Cancelled before the executor's pump ran: nothing is submitted for them.
        cancelled = [ex.submit(math.factorial, n) for n in range(3)]
        for future in cancelled:
            assert future.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        later = ex.submit(math.factorial, 5)
        assert await asyncio.wait_for(later, 10) == "t1.0", "the executor still submits"
        assert client.submits == [1]
        await ex.shutdown()

    asyncio.run(body())


class _SlowSubmits:
    """A stand-in for ``weft.aio.Client`` whose Submit is slow: the coordinator commits the
    tasks at once and answers 0.2 s later, so a Submit abandoned meanwhile leaves committed
    tasks behind. Records the Cancels; nothing ever finishes."""

    def __init__(self) -> None:
        self.committed: list = []
        self.cancelled: list = []
        self.closed = False

    async def submit_many(self, specs):
        ids = [f"t{len(self.committed) + i}" for i in range(len(specs))]
        self.committed += ids
        await asyncio.sleep(0.2)
        return ids

    async def _wait_many_records(self, task_ids, timeout=None, results_only=False):
        await asyncio.Event().wait()
        yield  # never reached: an async generator

    async def cancel(self, task_id, reason=""):
        self.cancelled.append(task_id)

    async def close(self):
        self.closed = True


def test_shutdown_cancelling_futures_cancels_the_tasks_of_a_submit_on_its_way(monkeypatch):
    client = _SlowSubmits()
    monkeypatch.setattr(weft.aio, "Client", lambda *args, **kwargs: client)
    ex = weft.Executor("http://127.0.0.1:1")
    futures = [ex.submit(math.factorial, n) for n in range(3)]
    poll(lambda: client.committed, what="the Submit to be committed")
    ex.shutdown(cancel_futures=True)
    assert all(future.cancelled() for future in futures)
    assert sorted(client.cancelled) == sorted(client.committed) == ["t0", "t1", "t2"]
    assert client.closed

    async def body() -> None:
        client = _SlowSubmits()
        ex = weft.aio.Executor(client=client)
        futures = [ex.submit(math.factorial, n) for n in range(3)]
        while not client.committed:
            await asyncio.sleep(0.001)
        await ex.shutdown(cancel_futures=True)
        assert all(future.cancelled() for future in futures)
        assert sorted(client.cancelled) == sorted(client.committed) == ["t0", "t1", "t2"]

    asyncio.run(body())


class _GatedResults:
    """A stand-in for ``weft.aio.Client``: Submit answers at once (ids t0, t1, ... in
    submission order); task ``tN`` succeeds once ``release(N)`` is called."""

    def __init__(self) -> None:
        self.gates: dict = {}
        self.count = 0
        self.loop = None
        #: Results as a chunk's (a list of one), for map.
        self.chunks = False
        #: The specs submitted, and the task ids cancelled, in order.
        self.specs: list = []
        self.cancelled: list = []

    def _gate(self, task_id: str) -> asyncio.Event:
        return self.gates.setdefault(task_id, asyncio.Event())

    async def submit_many(self, specs):
        self.loop = asyncio.get_running_loop()
        self.specs += specs
        ids = [f"t{self.count + i}" for i in range(len(specs))]
        self.count += len(specs)
        return ids

    async def _wait_many_records(self, task_ids, timeout=None, results_only=False):
        for task_id in task_ids:
            await self._gate(task_id).wait()
            result = [task_id] if self.chunks else task_id
            yield task_pb2.Task(id=task_id, state=common_pb2.TASK_STATE_SUCCEEDED, output=pickle.dumps(result))

    def release(self, number: int) -> None:
        self.loop.call_soon_threadsafe(lambda: self._gate(f"t{number}").set())

    async def cancel(self, task_id, reason=""):
        self.cancelled.append(task_id)

    async def close(self):
        pass


def test_result_inside_a_done_callback_does_not_hang(monkeypatch):
    client = _GatedResults()
    monkeypatch.setattr(weft.aio, "Client", lambda *args, **kwargs: client)
    ex = weft.Executor("http://127.0.0.1:1")
    first, second = ex.submit(math.factorial, 1), ex.submit(math.factorial, 2)
    seen = {}

    def waits_for_second(future) -> None:
        try:
            second.result(timeout=0)  # a poll waits for nothing: it times out as anywhere
        except BaseException as e:  # noqa: BLE001
            seen["poll"] = e
        try:
            # Without a guard this blocks the one thread that could settle `second`.
            seen["result"] = second.result(timeout=5)
        except BaseException as e:  # noqa: BLE001
            seen["result"] = e
        if isinstance(seen["result"], RuntimeError):
            try:
                ex.shutdown(wait=True)
            except BaseException as e:  # noqa: BLE001
                seen["shutdown"] = e
        seen["done"] = True

    first.add_done_callback(waits_for_second)
    poll(lambda: client.count == 2, what="both submitted")
    client.release(0)
    poll(lambda: seen.get("done"), what="the callback ran")
    assert isinstance(seen["result"], RuntimeError) and "done-callback" in str(seen["result"]), seen
    assert isinstance(seen["poll"], concurrent.futures.TimeoutError), seen
    assert isinstance(seen.get("shutdown"), RuntimeError), seen
    # The executor goes on: the other future settles, and a plain wait still works.
    client.release(1)
    assert second.result(timeout=10) == "t1" and first.result(timeout=10) == "t0"
    ex.shutdown(wait=True)


def test_async_map_submits_at_call():
    async def body() -> None:
        client = _GatedResults()
        client.chunks = True
        ex = weft.aio.Executor(client=client)
        with pytest.raises(TypeError):
            ex.map(lambda x: x, [1])  # checked at the call, not at the first iteration
        results = ex.map(math.factorial, [1, 2, 3])
        for _ in range(1000):
            if client.count == 3:
                break
            await asyncio.sleep(0.001)
        assert client.count == 3, "submitted before the first iteration"
        for n in range(3):
            client.release(n)
        assert [r async for r in results] == ["t0", "t1", "t2"]
        await ex.shutdown()

    asyncio.run(body())


def test_closing_an_async_map_before_iterating_cancels_its_tasks():
    async def body() -> None:
        client = _GatedResults()
        client.chunks = True
        ex = weft.aio.Executor(client=client)
        results = ex.map(math.factorial, range(3))
        futures = list(ex._futures)
        for _ in range(1000):
            if all(f.task_id is not None for f in futures):
                break
            await asyncio.sleep(0.001)
        assert len(futures) == 3 and all(f.task_id is not None for f in futures), "submitted"
        await results.aclose()
        assert all(f.cancelled() for f in futures)
        for _ in range(1000):
            if len(client.cancelled) == 3:
                break
            await asyncio.sleep(0.001)
        assert sorted(client.cancelled) == ["t0", "t1", "t2"]
        assert [r async for r in results] == [], "closed: nothing more"
        await ex.shutdown()

    asyncio.run(body())


def test_an_async_map_that_fails_cancels_the_rest_and_ends():
    async def body() -> None:
        client = _GatedResults()
        ex = weft.aio.Executor(client=client)
        results = ex.map("h", [b"a", b"b", b"c"])
        futures = sorted(ex._futures, key=lambda f: f._request.spec.call.input)
        futures[0].set_exception(ValueError("first failed"))
        with pytest.raises(ValueError, match="first failed"):
            await results.__anext__()
        assert futures[1].cancelled() and futures[2].cancelled()
        assert [r async for r in results] == []
        await ex.shutdown()

    asyncio.run(body())


def test_two_readers_of_one_async_map_neither_duplicate_nor_drop():
    async def body() -> None:
        client = _GatedResults()
        client.chunks = True
        ex = weft.aio.Executor(client=client)
        results = ex.map(math.factorial, [1, 2])
        first = asyncio.ensure_future(results.__anext__())
        second = asyncio.ensure_future(results.__anext__())
        for _ in range(1000):
            if client.count == 2:
                break
            await asyncio.sleep(0.001)
        assert client.count == 2, "submitted"
        client.release(0)
        client.release(1)
        got = await asyncio.gather(first, second, return_exceptions=True)
        got += [r async for r in results]
        refused = [r for r in got if isinstance(r, RuntimeError)]
        assert len(refused) == 1 and "already running" in str(refused[0]), got
        assert [r for r in got if not isinstance(r, BaseException)] == ["t0", "t1"], got
        await ex.shutdown()

    asyncio.run(body())


def test_an_executor_runs_after_each_task_of_a_job_as_call_spec_does():
    job = weft.Job(id="01J5Z3K4M5N6P7Q8R9S0T1V2W3", task_ids=["01J5Z3K4M5N6P7Q8R9S0T1V2W3", "01J5Z3K4M5N6P7Q8R9S0T1V2W4"])
    t0, t1 = job.task_ids
    assert [d.task_id for d in weft.call_spec("h", after=job).after] == [t0, t1]

    async def body() -> None:
        client = _GatedResults()
        ex = weft.aio.Executor(client=client)
        futures = [ex.submit("h", b"x", after=job), ex.submit(math.factorial, 3, after=[job, t1, "other"])]
        for _ in range(1000):
            if len(client.specs) == 2:
                break
            await asyncio.sleep(0.001)
        lone, listed = client.specs
        assert [d.task_id for d in lone.after] == [t0, t1]
        assert [d.task_id for d in listed.after] == [t0, t1, "other"]
        for future in futures:
            future.cancel()
        await ex.shutdown()

    asyncio.run(body())


def test_call_spec_after_an_asyncio_future_names_its_task_done_or_not():
    from types import SimpleNamespace

    from weft.executor import AsyncFuture

    task_id = "01J5Z3K4M5N6P7Q8R9S0T1V2W3"

    async def body() -> None:
        loop = asyncio.get_running_loop()
        pending, done = AsyncFuture(loop=loop), AsyncFuture(loop=loop)
        for future in (pending, done):
            future._request = SimpleNamespace(task_id=task_id)
        done.set_result("out")
        for future in (done, pending):
            assert [d.task_id for d in weft.call_spec("h", after=future).after] == [task_id]
        # A future that names no task is refused, not dropped.
        plain = loop.create_future()
        plain.set_result(None)
        with pytest.raises(ValueError, match="not a task id"):
            weft.call_spec("h", after=plain)
        pending.cancel()

    asyncio.run(body())


def test_cancel_runs_done_callbacks_outside_the_futures_lock():
    from weft.executor import Future

    a, b = Future(), Future()
    entered, go = threading.Event(), threading.Event()
    touched = []

    def touches_b(future) -> None:
        entered.set()
        go.wait(10)
        touched.append(b.done())  # takes b's lock

    a.add_done_callback(touches_b)
    canceller = threading.Thread(target=a.cancel)
    canceller.start()
    assert entered.wait(10)
    try:
        # What concurrent.futures.wait([a, b]) does in another thread: b's lock, then a's.
        with b._condition:
            got = a._condition.acquire(timeout=2)
            if got:
                a._condition.release()
    finally:
        go.set()
    canceller.join(10)
    assert got, "a's callback ran holding a's lock"
    assert touched == [False] and a.cancelled()
    done, _ = concurrent.futures.wait([a], timeout=0)
    assert done == {a}, "wait() counts it done (notified)"


def test_cancel_racing_shutdown_without_waiting_never_raises(monkeypatch):
    monkeypatch.setattr(weft.aio, "Client", lambda *args, **kwargs: _GatedResults())
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave as often as they can
    errors = []
    try:
        for _ in range(30):
            ex = weft.Executor("http://127.0.0.1:1")
            futures = [ex.submit(math.factorial, n) for n in range(50)]

            def cancel_all() -> None:
                for future in futures:
                    try:
                        future.cancel()
                    except BaseException as e:  # noqa: BLE001
                        errors.append(e)

            cancellers = [threading.Thread(target=cancel_all) for _ in range(4)]
            for thread in cancellers:
                thread.start()
            ex.shutdown(wait=False)
            for thread in cancellers:
                thread.join(10)
            ex.shutdown(wait=True)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def _shuts_down(ex, **options) -> bool:
    """Whether ``ex.shutdown(wait=True, **options)`` returns within 10 s (run on a thread, so a
    hang fails the test instead of blocking it)."""
    import threading

    closing = threading.Thread(target=ex.shutdown, kwargs=options, daemon=True)
    closing.start()
    closing.join(10)
    return not closing.is_alive()


def test_futures_fail_when_the_channel_cannot_open_and_shutdown_returns(monkeypatch):
    from test_client import _refused_url
    from weft._channel import PinMismatch
    from weft.testing import FakeCoordinator

    monkeypatch.delenv("WEFT_CA", raising=False)
    # The pinned CA cannot be fetched: the coordinator is down.
    ex = weft.Executor(_refused_url().replace("http://", "https://"), ca_pin="sha256:" + "0" * 64)
    futures = [ex.submit(math.factorial, n) for n in range(3)]
    for future in futures:
        with pytest.raises(weft.Unavailable, match="cannot fetch the CA"):
            future.result(timeout=10)
    assert _shuts_down(ex), "shutdown(wait=True) hung"

    # A coordinator the pin does not name.
    with FakeCoordinator(tls=True) as fake:
        ex = weft.Executor(fake.url, ca_pin="sha256:" + "0" * 64)
        with pytest.raises(PinMismatch):
            ex.submit(math.factorial, 3).result(timeout=10)
        assert _shuts_down(ex), "shutdown(wait=True) hung"


class _SmallMessages(task_pb2_grpc.TaskServiceServicer):
    """A TaskService taking messages of at most 1 MiB, as a coordinator started with
    ``--max-message-size 1MiB``; each task succeeds at once (a one-call chunk answering its input's length)."""

    LIMIT = 1024 * 1024

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inputs: dict = {}
        self.submits: list = []

    def Submit(self, request, context):
        if request.ByteSize() > self.LIMIT:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"message of {request.ByteSize()} bytes")
        with self.lock:
            self.submits.append(len(request.tasks))
            ids = []
            for spec in request.tasks:
                ids.append(f"T{len(self.inputs)}")
                self.inputs[ids[-1]] = spec.call.input
        return task_pb2.SubmitResponse(task_ids=ids)

    def WaitMany(self, request, context):
        for task_id in request.task_ids:
            yield task_pb2.Task(id=task_id, state=common_pb2.TASK_STATE_SUCCEEDED,
                                output=pickle.dumps([len(self.inputs[task_id])]))


@pytest.fixture
def small_messages():
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    tasks = _SmallMessages()
    task_pb2_grpc.add_TaskServiceServicer_to_server(tasks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", tasks
    server.stop(0)


def test_executor_splits_submits_by_bytes(monkeypatch, small_messages):
    import weft.client

    url, tasks = small_messages
    # Within the fake's limit, as the default is within the coordinator's default limit.
    monkeypatch.setattr(weft.client, "SUBMIT_BATCH_BYTES", 768 * 1024)
    items = [b"x" * 4096] * 1000  # ~4 MiB of pickled calls: far fewer than SUBMIT_BATCH
    with weft.Executor(url) as ex:
        results = list(ex.map(exec_funcs.noop, items, timeout=30))
    assert len(results) == len(items)
    assert len(tasks.submits) >= 5 and sum(tasks.submits) == len(items), tasks.submits
    # Client.map's requests are cut the same way.
    from weft.client import _call_requests

    requests = list(_call_requests("h", items, {}))
    assert len(requests) >= 5 and sum(len(r.tasks) for r in requests) == len(items)
    assert all(r.ByteSize() <= 768 * 1024 for r in requests), [r.ByteSize() for r in requests]


def test_a_json_codec_decodes_the_input_and_encodes_the_result():
    worker = weft.Worker("http://127.0.0.1:1", slots=1)
    h = worker.register("s", exec_funcs.json_sum, "process", codec="json")
    assert json.loads(h.fn(b'{"values": [1, 2]}')) == {"sum": 3, "n": 2}
    assert pickle.loads(pickle.dumps(h.fn)).fn is exec_funcs.json_sum, "a process handler pickles into the pool"
    with pytest.raises(StartFailed, match="takes JSON input"):
        h.fn(b"{not json")
    with pytest.raises(ValueError, match="codec"):
        worker.register("x", exec_funcs.noop, codec="yaml")
    spec = weft.call_spec("s", json={"values": [1]})
    assert json.loads(spec.call.input) == {"values": [1]}
    with pytest.raises(TypeError):
        weft.call_spec("s", b"raw", json=1)


# -- against the coordinator and a worker process -------------------------------


@pytest.fixture
def cluster(spawn, tmp_path):
    c = Cluster(spawn, tmp_path)
    argv = [sys.executable, str(TESTS_DIR / "exec_worker.py"), "--coordinator", c.url, "--ca-file", c.ca_file,
            "--slots", "2", "--name", "py", "--allow-module", "exec_funcs", "--allow-module", "math"]
    if c.joins:
        argv += ["--join", c.join_token(), "--state-dir", str(c.state_dir("py"))]
    pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    c.worker = spawn(argv, name="py", env={"PYTHONPATH": pythonpath})
    nodes = c.wait_nodes("py")
    assert HANDLER in nodes[0].handlers
    yield c
    c.client.close()


def executor(cluster, **options) -> weft.Executor:
    return weft.Executor(cluster.url, token=cluster.token, ca_file=cluster.ca_file, **options)


def test_submit_and_map_run_module_level_functions_on_the_worker(cluster):
    with executor(cluster) as ex:
        assert ex.submit(math.factorial, 20).result(timeout=60) == math.factorial(20)
        assert ex.submit(exec_funcs.add, 1, y=2, scale=3).result(timeout=60) == 9
        assert ex.submit(exec_funcs.pid).result(timeout=60) != os.getpid()
        assert ex.submit("sha256", b"abc").result(timeout=60) == \
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        assert list(ex.map(exec_funcs.square, range(1000), timeout=120)) == [x * x for x in range(1000)]
        assert list(ex.map(exec_funcs.add, range(5000), range(5000), chunksize=100, timeout=120)) == \
            [2 * x for x in range(5000)]
        assert list(ex.map(exec_funcs.square, range(7), chunksize=3)) == [x * x for x in range(7)], "a short last chunk"
        assert list(ex.map("noop", [b"a", b"b", b"c"])) == [b"a", b"b", b"c"]
    tasks = cluster.client.list(limit=10_000)
    assert sum(t.spec.call.handler == HANDLER for t in tasks) == 3 + 1000 + 50 + 3, "chunksize k: one task per k items"


def test_as_completed_and_wait_take_the_futures(cluster):
    with executor(cluster) as ex:
        futures = [ex.submit(exec_funcs.square, i) for i in range(20)]
        assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=60)) == \
            sorted(i * i for i in range(20))
        done, not_done = concurrent.futures.wait([ex.submit(exec_funcs.square, 3)], timeout=60)
        assert not not_done and done.pop().result() == 9
        assert {f.result() for f in ex.as_completed([ex.submit(exec_funcs.square, 4)], timeout=60)} == {16}
        assert all(f.task_id for f in futures)


def test_the_function_s_exception_is_raised_again_as_itself(cluster):
    with executor(cluster, max_attempts=1) as ex:
        with pytest.raises(exec_funcs.Oops, match="boom") as raised:
            ex.submit(exec_funcs.fail, "boom").result(timeout=60)
        assert isinstance(raised.value.__cause__, weft.RemoteTraceback)
        assert "in fail" in str(raised.value.__cause__)
        results = ex.map(exec_funcs.fail_on, range(10), [7] * 10, chunksize=2, timeout=60)
        assert [next(results) for _ in range(6)] == [0, 1, 2, 3, 4, 5]
        with pytest.raises(KeyError):
            next(results)
        # One that does not pickle back: TaskFailed with the worker's traceback.
        with pytest.raises(weft.TaskFailed, match="UnpicklableError: ") as failed:
            ex.submit(exec_funcs.unpicklable_failure).result(timeout=60)
        assert "Traceback" in failed.value.task.error
        task = cluster.client.get(failed.value.task.id)
        assert task.state == weft.TaskState.FAILED and "unpicklable_failure" in task.error, "the task records it"


def test_a_function_of_a_module_not_allowed_fails_naming_the_module_and_the_flag(cluster, tmp_path):
    proof = tmp_path / "ran"
    with executor(cluster) as ex:
        with pytest.raises(weft.TaskFailed) as failed:
            ex.submit(json.dumps, [1]).result(timeout=60)
        error = failed.value.task.error
        assert "module 'json' is not allowed" in error and "--allow-module json" in error, error
        assert failed.value.task.attempt == 1, "a refusal is not retried"
        # A payload naming os.system is refused before anything runs.
        with pytest.raises(weft.TaskFailed) as failed:
            ex.submit(exec_funcs.noop, Evil(f"touch {proof}")).result(timeout=60)
        assert "is not allowed" in failed.value.task.error
    assert not proof.exists(), "os.system never ran"
    assert cluster.worker.popen.poll() is None, "the worker lives on"


def _running(cluster, future) -> str:
    task_id = poll(lambda: future.task_id, timeout=30, what="the submit")
    poll(lambda: cluster.client.get(task_id).state == weft.TaskState.RUNNING, timeout=30, what=f"{task_id} running")
    return task_id


def test_cancel_cancels_a_queued_and_a_running_task(cluster, tmp_path):
    release = tmp_path / "release"
    with executor(cluster) as ex:
        running = [ex.submit(exec_funcs.touch_then_wait, str(tmp_path / f"started-{i}"), str(release)) for i in range(2)]
        running_ids = [_running(cluster, f) for f in running]
        queued = ex.submit(exec_funcs.touch, str(tmp_path / "queued-ran"))
        queued_id = poll(lambda: queued.task_id, timeout=30, what="the submit")
        assert cluster.client.get(queued_id).state in (weft.TaskState.QUEUED, weft.TaskState.ASSIGNED), \
            "both slots are busy"
        assert queued.cancel() and queued.cancelled()
        assert running[0].cancel(), "a running task is cancelled too (unlike a local pool)"
        with pytest.raises(concurrent.futures.CancelledError):
            running[0].result()
        assert cluster.client.wait(queued_id, timeout=30).state == weft.TaskState.CANCELLED
        assert cluster.client.wait(running_ids[0], timeout=30).state == weft.TaskState.CANCELLED
        release.touch()
        assert running[1].result(timeout=60) == "released"
        assert not running[1].cancel(), "done: nothing to cancel"
    assert not (tmp_path / "queued-ran").exists()


def test_shutdown_with_cancel_futures_cancels_every_task_not_done(cluster, tmp_path):
    release = tmp_path / "release"
    ex = executor(cluster)
    running = [ex.submit(exec_funcs.touch_then_wait, str(tmp_path / f"started-{i}"), str(release)) for i in range(2)]
    for future in running:
        _running(cluster, future)
    queued = [ex.submit(exec_funcs.touch, str(tmp_path / f"queued-{i}")) for i in range(3)]
    ids = [poll(lambda f=f: f.task_id, timeout=30, what="the submit") for f in running + queued]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in running + queued)
    for task_id in ids:
        assert cluster.client.wait(task_id, timeout=30).state == weft.TaskState.CANCELLED
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(exec_funcs.square, 2)
    assert not list(tmp_path.glob("queued-*"))


def test_the_asyncio_executor(cluster, tmp_path):
    async def main():
        async with weft.aio.Executor(cluster.url, token=cluster.token, ca_file=cluster.ca_file, max_attempts=1) as ex:
            assert await ex.submit(exec_funcs.square, 12) == 144
            futures = [ex.submit(exec_funcs.square, i) for i in range(10)]
            assert sorted([await f for f in asyncio.as_completed(futures)]) == sorted(i * i for i in range(10))
            assert [x async for x in ex.map(exec_funcs.add, range(300), range(300), chunksize=25)] == \
                [2 * x for x in range(300)]
            assert await asyncio.gather(ex.submit("noop", b"x")) == [b"x"]
            with pytest.raises(exec_funcs.Oops):
                await ex.submit(exec_funcs.fail, "async boom")
            # Cancelling the future cancels the running task.
            future = ex.submit(exec_funcs.touch_then_wait, str(tmp_path / "started"), str(tmp_path / "never"))
            task_id = await asyncio.to_thread(_running, cluster, future)
            future.cancel()
            task = await asyncio.to_thread(cluster.client.wait, task_id, 30)
            assert task.state == weft.TaskState.CANCELLED

    asyncio.run(main())


def test_json_handlers_take_and_give_json(cluster):
    client = cluster.client
    assert client.call("json_sum", json={"values": [1, 2, 3]}, wait_timeout=60) == {"sum": 6, "n": 3}
    task = client.wait(client.submit_call("json_echo", json=[1, "two", None]), timeout=60)
    assert task.json() == {"got": [1, "two", None]}
    with executor(cluster, codec="json") as ex:
        assert ex.submit("json_echo", {"a": 1}).result(timeout=60) == {"got": {"a": 1}}
        assert list(ex.map("json_sum", [{"values": [i, i]} for i in range(5)])) == \
            [{"sum": 2 * i, "n": 2} for i in range(5)]

    async def via_aio():
        async with weft.aio.Client(cluster.url, token=cluster.token, ca_file=cluster.ca_file) as aclient:
            return await aclient.call("json_echo", json="hi", wait_timeout=60)

    assert asyncio.run(via_aio()) == {"got": "hi"}
    # Input that is not JSON fails the task to start, saying so; it is not retried.
    for name in ("json_sum", "json_echo"):
        with pytest.raises(weft.TaskFailed) as failed:
            client.call(name, b"{not json", wait_timeout=60)
        assert f"handler '{name}' takes JSON input, and its input is not JSON" in failed.value.task.error
        assert failed.value.task.attempt == 1
