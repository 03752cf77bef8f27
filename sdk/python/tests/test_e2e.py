"""End to end: the real weft-coordinator, weft-node and weft CLI with Python workers and clients.

Skipped (with the reason) when the binaries are not built: run `cargo build
--bins` at the repository root, or point WEFT_BIN_DIR at them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import grpc
import pytest

import weft
import weft.aio
from weft._proto import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc

from conftest import EXAMPLES_DIR, check_parallel, poll, require_binary


class Cluster:
    """A coordinator process plus whatever workers a test starts on it."""

    def __init__(self, spawn, tmp_path: Path):
        self._spawn = spawn
        self._tmp = tmp_path
        coordinator = require_binary("weft-coordinator")
        self.weft_bin = require_binary("weft")
        self.node_bin = require_binary("weft-node")
        addr_file = tmp_path / "coordinator.addr"
        # TLS, the default: the CA lives in the data dir, as on a real machine.
        self.data_dir = tmp_path / "weft-data"
        self.ca_file = str(self.data_dir / "ca.pem")
        self.token_file = tmp_path / "admin.token"
        self.coordinator = spawn(
            [str(coordinator), "--listen", "127.0.0.1:0", "--addr-file", str(addr_file),
             "--data-dir", str(self.data_dir),
             "--heartbeat-interval", "500ms", "--heartbeat-timeout", "5s",
             # A call no node serves fails after this (it waits for one that does).
             "--schedule-timeout", "1s",
             "--admin-token-file", str(self.token_file)],
            name="coordinator",
        )

        def address():
            if self.coordinator.popen.poll() is not None:
                raise AssertionError(f"coordinator exited:\n{self.coordinator.output()}")
            return addr_file.exists() and addr_file.read_text().strip()

        self.url = "https://" + poll(address, timeout=20, what="the coordinator's address file")
        # Written before the coordinator listens (first start).
        self.token = self.token_file.read_text().strip()
        self.client = weft.Client(self.url, token=self.token, ca_file=self.ca_file)
        #: Whether the coordinator authenticates nodes (answers Join): then
        #: every worker joins with a token of its own, as in production.
        self.joins = self._answers_join()

    def _answers_join(self) -> bool:
        with open(self.ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(self.url[len("https://"):], credentials) as channel:
            try:
                node_pb2_grpc.NodeServiceStub(channel).Join(node_pb2.JoinRequest(), timeout=10)
            except grpc.RpcError as e:
                return e.code() != grpc.StatusCode.UNIMPLEMENTED
        return True

    def join_token(self, uses: int = 1) -> str:
        """A join token made through the admin API (``weft token create --role node``)."""
        with open(self.ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(self.url[len("https://"):], credentials) as channel:
            answer = admin_pb2_grpc.AdminServiceStub(channel).CreateToken(
                admin_pb2.CreateTokenRequest(role="node", uses=uses, name="e2e"), timeout=10,
                metadata=(("authorization", f"Bearer {self.token}"),))
        assert answer.token.startswith("weftjoin_"), "the coordinator made no join token"
        return answer.token

    def state_dir(self, name: str) -> Path:
        return self._tmp / f"state-{name}"

    def join_kwargs(self, name: str) -> dict:
        """What an in-process ``weft.Worker`` named ``name`` needs to join (nothing while nodes need not)."""
        return {"join_token": self.join_token(), "state_dir": str(self.state_dir(name))} if self.joins else {}

    def rust_node(self, name: str = "rust", slots: int = 2, labels=("lang=rust",)):
        if self.joins:
            argv = [str(self.node_bin), "--join", self.join_token(), "--state-dir", str(self.state_dir(name)),
                    "--slots", str(slots), "--name", name]
        else:
            argv = [str(self.node_bin), "--coordinator", self.url, "--ca-file", self.ca_file, "--slots", str(slots),
                    "--name", name]
        for label in labels:
            argv += ["--label", label]
        return self._spawn(argv, name=name)

    def python_worker(self, name: str = "py", slots: int = 2, labels=("lang=py",), url: str = None, exec: Optional[str] = None):
        argv = [sys.executable, str(EXAMPLES_DIR / "worker.py"), "--coordinator", url or self.url, "--ca-file", self.ca_file,
                "--slots", str(slots), "--name", name]
        if self.joins:
            argv += ["--join", self.join_token(), "--state-dir", str(self.state_dir(name))]
        if exec is not None:
            argv += ["--exec", exec]
        for label in labels:
            argv += ["--label", label]
        return self._spawn(argv, name=name)

    def wait_nodes(self, *names: str, timeout: float = 20) -> List[weft.NodeInfo]:
        def ready():
            nodes = self.client.nodes()
            return nodes if set(names) <= {n.name for n in nodes} else None

        return poll(ready, timeout=timeout, what=f"nodes {names}")

    def weft(self, *args: str, timeout: float = 60, input: bytes = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "WEFT_TOKEN": self.token, "XDG_CONFIG_HOME": str(self._tmp / "config")}
        return subprocess.run(
            [str(self.weft_bin), "--coordinator", self.url, "--ca-file", self.ca_file, *args],
            capture_output=True, timeout=timeout, input=input, cwd=self._tmp, env=env,
        )


@pytest.fixture
def cluster(spawn, tmp_path):
    c = Cluster(spawn, tmp_path)
    yield c
    c.client.close()


def test_a_python_worker_and_a_rust_node_serve_one_coordinator(cluster):
    cluster.rust_node("rust")
    cluster.python_worker("py")
    nodes = {n.name: n for n in cluster.wait_nodes("rust", "py")}
    assert {"primes", "burn", "countdown", "wordcount", "echo", "sleep"} <= set(nodes["py"].handlers)
    assert {"noop", "echo", "sleep", "sha256", "fail", "spin"} <= set(nodes["rust"].handlers)
    assert nodes["py"].labels == {"lang": "py"} and nodes["py"].slots == 2

    # A Python client running a shell command on the Rust node.
    task = cluster.client.exec(["sh", "-c", "echo hello from $(uname -s)"], labels={"lang": "rust"}, wait_timeout=30)
    assert task.state == weft.TaskState.SUCCEEDED and task.exit_code == 0
    assert task.node_name == "rust"
    output = b"".join(data for _, data in cluster.client.output(task.id))
    assert output.startswith(b"hello from ")

    # The same call lands on either kind of node, by label.
    for lang in ("py", "rust"):
        digest = cluster.client.call("sha256", b"abc", labels={"lang": lang}, wait_timeout=30)
        assert digest == b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

    # A handler only the Python worker has goes there.
    task_id = cluster.client.submit_call("wordcount", b"to be or not to be")
    task = cluster.client.wait(task_id, timeout=30)
    assert task.node_name == "py" and json.loads(task.output) == {"words": 6, "distinct": 4}


def test_a_python_client_and_worker_take_host_and_port_without_a_scheme(cluster):
    bare = cluster.url[len("https://"):]
    cluster.python_worker("bare", url=bare)
    cluster.wait_nodes("bare")
    with weft.Client(bare, token=cluster.token, ca_file=cluster.ca_file) as client:
        assert json.loads(client.call("wordcount", b"a b a", wait_timeout=30)) == {"words": 3, "distinct": 2}

    async def via_aio():
        async with weft.aio.Client(bare, token=cluster.token, ca_file=cluster.ca_file) as client:
            return [n.name for n in await client.nodes()]

    assert asyncio.run(via_aio()) == ["bare"]


def test_weft_call_reaches_python_handlers_of_all_three_kinds(cluster):
    cluster.python_worker("py")
    cluster.wait_nodes("py")
    # asyncio: output streamed, return value printed
    result = cluster.weft("call", "countdown", "3")
    assert result.returncode == 0, result.stderr.decode()
    assert b"3\n2\n1\n" in result.stdout and b"liftoff" in result.stdout
    # thread
    result = cluster.weft("call", "wordcount", "a b a")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout.decode().strip().splitlines()[-1]) == {"words": 3, "distinct": 2}
    # process
    result = cluster.weft("call", "primes", "1000")
    assert result.returncode == 0, result.stderr.decode()
    assert b"168 primes below 1000" in result.stdout
    # a handler error: exit 1, the error on stderr
    result = cluster.weft("call", "--max-attempts", "1", "fail", "boom")
    assert result.returncode == 1 and b"boom" in result.stderr


def test_a_cpu_bound_process_handler_uses_more_than_one_core(cluster):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs at least 2 CPUs")
    cluster.python_worker("py", slots=2)
    cluster.wait_nodes("py")
    cluster.client.call("burn", b"10ms", wait_timeout=30)  # warm the pool up

    def trial():
        alone = json.loads(cluster.client.call("burn", b"1s", wait_timeout=30))["cpu"]
        started = time.monotonic()
        ids = cluster.client.submit_many([weft.call_spec("burn", b"1s") for _ in range(2)])
        results = [json.loads(cluster.client.wait(i, timeout=30).output) for i in ids]
        assert len({r["pid"] for r in results}) == 2, f"both ran in one process: {results}"
        return sum(r["cpu"] for r in results), alone, time.monotonic() - started

    check_parallel(trial)


def _children(pid: int) -> List[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def _pool_processes(pid: int) -> List[int]:
    """Children of ``pid`` that are multiprocessing pool processes."""
    out = []
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline and _alive(child):
            out.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_cancel_stops_running_python_handlers_of_every_kind(cluster):
    worker = cluster.python_worker("py", slots=3)
    cluster.wait_nodes("py")
    client = cluster.client
    asyncio_id = client.submit_call("sleep", b"60s")
    thread_id = client.submit_call("spin", b"60s")
    process_id = client.submit_call("burn", b"60s")
    for task_id in (asyncio_id, thread_id, process_id):
        poll(lambda: client.get(task_id).state == weft.TaskState.RUNNING, timeout=20, what=f"{task_id} running")
    pool = poll(lambda: _pool_processes(worker.pid), timeout=10, what="the pool process")

    started = time.monotonic()
    for task_id in (asyncio_id, thread_id, process_id):
        client.cancel(task_id, reason="test")
    for task_id in (asyncio_id, thread_id, process_id):
        assert client.wait(task_id, timeout=10).state == weft.TaskState.CANCELLED
    assert time.monotonic() - started < 5
    # The burning pool process was killed (a fresh one may be spawned later).
    poll(lambda: not any(_alive(p) for p in pool), timeout=5, what="the pool process to be killed")
    # All three slots come back: three more calls run at once.
    ids = client.submit_many([weft.call_spec("sleep", b"300ms") for _ in range(3)])
    for task_id in ids:
        assert client.wait(task_id, timeout=30).state == weft.TaskState.SUCCEEDED


def test_the_asyncio_client_streams_events_and_errors_are_typed(cluster):
    cluster.rust_node("rust")
    cluster.wait_nodes("rust")

    async def scenario():
        async with weft.aio.Client(cluster.url, token=cluster.token, ca_file=cluster.ca_file) as client:
            task_id = await client.submit_exec(["sh", "-c", "echo one; echo two >&2"])
            events = [event async for event in client.watch(task_id)]
            assert [e.seq for e in events] == list(range(len(events)))
            assert events[0].kind == "state" and events[0].state == weft.TaskState.QUEUED
            assert events[-1].kind == "finished" and events[-1].task.state == weft.TaskState.SUCCEEDED
            out = {e.stream: e.data for e in events if e.kind == "output"}
            assert out == {weft.OutputStream.STDOUT: b"one\n", weft.OutputStream.STDERR: b"two\n"}
            with pytest.raises(weft.FailedPrecondition):
                await client.cancel(task_id)
            with pytest.raises((weft.NotFound, weft.InvalidArgument)):
                await client.get("not-a-task")
            with pytest.raises(weft.InvalidArgument):
                await client.submit(weft.exec_spec([]))
            with pytest.raises(weft.TaskFailed, match="unknown handler"):
                await client.call("no_such_handler", wait_timeout=10)
            nodes = await client.nodes()
            assert [n.name for n in nodes] == ["rust"]

    asyncio.run(scenario())


def test_wait_many_as_completed_and_map_wait_over_one_stream_not_one_per_task(cluster):
    import hashlib

    cluster.rust_node("rust", slots=4)
    cluster.wait_nodes("rust")
    client = cluster.client
    inputs = [f"item {i}".encode() for i in range(300)]
    digests = [hashlib.sha256(data).hexdigest().encode() for data in inputs]

    # map: results in input order, over one WaitMany stream.
    assert list(client.map("sha256", inputs, timeout=60)) == digests

    # wait_many / as_completed: each final record once, the slow one last.
    slow = client.submit_call("sleep", b"400ms")
    fast = [client.submit_call("sha256", data) for data in inputs[:20]]
    seen = [task.id for task in client.as_completed([slow, *fast, fast[0]], timeout=60)]
    assert sorted(seen) == sorted([slow, *fast]) and seen[-1] == slow
    assert all(task.is_final for task in client.wait_many(fast, timeout=60))

    # A failed call raises at its place in the order; an unknown id is NotFound.
    with pytest.raises(weft.TaskFailed, match="boom"):
        list(client.map("fail", [b"boom"], max_attempts=1, timeout=60))
    with pytest.raises(weft.NotFound):
        list(client.wait_many(["01J0000000000000000000000Z"], timeout=10))
    with pytest.raises(weft.DeadlineExceeded):
        list(client.wait_many([client.submit_call("sleep", b"5s")], timeout=0.3))

    async def scenario():
        async with weft.aio.Client(cluster.url, token=cluster.token, ca_file=cluster.ca_file) as aclient:
            results = [result async for result in aclient.map("sha256", inputs[:50], timeout=60)]
            assert results == digests[:50]
            ids = [await aclient.submit_call("sha256", data) for data in inputs[:10]]
            done = [task.id async for task in aclient.as_completed(ids, timeout=60)]
            assert sorted(done) == sorted(ids)

    asyncio.run(scenario())


def test_wait_many_batches_sends_the_records_ready_together_in_one_message_each_once(cluster):
    from weft._proto import task_pb2, task_pb2_grpc

    cluster.rust_node("rust", slots=4)
    cluster.wait_nodes("rust")
    client = cluster.client
    ids = client.submit_many([weft.call_spec("echo", str(i)) for i in range(500)])
    assert all(task.succeeded for task in client.wait_many(ids, timeout=60))
    # All final already: they come in far fewer messages than records, each record once.
    with grpc.secure_channel(cluster.url[len("https://"):],
                             grpc.ssl_channel_credentials(open(cluster.ca_file, "rb").read())) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        messages = list(stub.WaitManyBatches(task_pb2.WaitManyRequest(task_ids=ids + ids[:3]), timeout=30,
                                             metadata=(("authorization", f"Bearer {cluster.token}"),)))
        got = [task.id for message in messages for task in message.tasks]
        assert sorted(got) == sorted(ids), "every id once, a repeated one too"
        assert len(messages) < len(ids) / 10, f"{len(messages)} messages for {len(ids)} records"
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.WaitManyBatches(task_pb2.WaitManyRequest(task_ids=["01J0000000000000000000000Z"]), timeout=30,
                                      metadata=(("authorization", f"Bearer {cluster.token}"),)))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_specs_past_a_limit_are_refused_with_typed_errors_naming_the_field(cluster):
    client = cluster.client
    with pytest.raises(weft.InvalidArgument, match="call.handler"):
        client.submit(weft.call_spec("x" * 257))
    with pytest.raises(weft.InvalidArgument, match="name"):
        client.submit(weft.call_spec("echo", name="a\0b"))
    with pytest.raises(weft.InvalidArgument, match="exec.cwd"):
        client.submit(weft.exec_spec(["true"], cwd="/tmp\0"))
    with pytest.raises(weft.InvalidArgument, match="max-node-slots"):
        client.submit(weft.call_spec("echo", slots=1_000_000))
    # Past the coordinator's default --max-message-size (16 MiB).
    with pytest.raises(weft.ResourceExhausted, match="16777216"):
        client.submit(weft.call_spec("echo", b"x" * (17 * 1024 * 1024)))
    assert client.list(limit=10) == []


def test_draining_a_python_worker_through_the_admin_api_stops_it(cluster):
    worker = cluster.python_worker("py")
    cluster.wait_nodes("py")
    task_id = cluster.client.submit_call("sleep", b"500ms")
    poll(lambda: cluster.client.get(task_id).state == weft.TaskState.RUNNING, timeout=20, what="running")
    cluster.client.drain("py", grace=10)
    assert cluster.client.wait(task_id, timeout=20).state == weft.TaskState.SUCCEEDED
    assert worker.wait_exit(15) == 0
    poll(lambda: "py" not in {n.name for n in cluster.client.nodes()}, timeout=10, what="py gone from the node list")


def test_a_python_worker_reconnects_after_a_coordinator_restart(cluster, spawn, tmp_path):
    cluster.python_worker("py")
    cluster.wait_nodes("py")
    address = cluster.url[len("https://"):]
    cluster.coordinator.kill()
    coordinator = require_binary("weft-coordinator")
    # The same address and admin token file. Nodes that joined are known
    # only to a coordinator on the same data dir (its store keeps them):
    # one that lost its store refuses them until they join again.
    keep = ["--data-dir", str(cluster.data_dir)] if cluster.joins else ["--in-memory", "--pki-dir", str(cluster.data_dir)]
    spawn([str(coordinator), "--listen", address, *keep, "--heartbeat-interval", "500ms",
           "--admin-token-file", str(cluster.token_file)], name="coordinator-again")
    nodes = poll(lambda: _nodes_or_none(cluster.client), timeout=30, what="the worker to re-register")
    assert [n.name for n in nodes] == ["py"]
    assert cluster.client.call("sha256", b"", wait_timeout=30).startswith(b"e3b0c442")


def _nodes_or_none(client):
    try:
        return client.nodes() or None
    except weft.Unavailable:
        return None


def test_a_sigkilled_python_worker_takes_its_exec_tasks_processes_with_it(cluster, tmp_path):
    worker = cluster.python_worker("py", slots=1, exec="allow")
    cluster.wait_nodes("py")
    pidfile = tmp_path / "grandchild.pid"
    task_id = cluster.client.submit_exec(["sh", "-c", 'sleep 300 & echo $! > "$1"; wait', "sh", str(pidfile)])
    pid = poll(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit() and int(pidfile.read_text()),
               timeout=20, what="the task's background child")
    assert _alive(pid)
    worker.signal(signal.SIGKILL)  # the worker alone: no drain, no cleanup of its own
    assert worker.wait_exit(10) is not None
    poll(lambda: not _alive(pid), timeout=5, what=f"the task's background child {pid} to die with its worker")
    assert cluster.client.get(task_id).state != weft.TaskState.SUCCEEDED


def test_a_default_python_worker_never_receives_an_exec_task(cluster):
    cluster.python_worker("py")
    cluster.wait_nodes("py")
    first = cluster.client.submit_exec(["sh", "-c", "echo first"])
    waiting = poll(lambda: cluster.client.get(first).pending_reason or None, timeout=10, what="a pending reason")
    assert waiting == "no connected node accepts exec tasks"
    assert cluster.client.get(first).state == weft.TaskState.QUEUED
    # Calls still run on it.
    assert cluster.client.call("sha256", b"", wait_timeout=30).startswith(b"e3b0c442")
    # With a Rust node (exec allowed) in the cluster, every exec task goes there.
    cluster.rust_node("rust", slots=1)
    cluster.wait_nodes("py", "rust")
    ids = [first] + cluster.client.submit_many([weft.exec_spec(["sh", "-c", "echo hi"]) for _ in range(6)])
    for task_id in ids:
        task = cluster.client.wait(task_id, timeout=30)
        assert (task.state, task.node_name) == (weft.TaskState.SUCCEEDED, "rust")


def test_a_secret_reaches_the_process_and_a_python_handler_but_no_answer(cluster):
    from test_worker import RunningWorker
    from weft.testing import new_ulid

    cluster.rust_node("rust")
    worker = weft.Worker(cluster.url, slots=2, name="py-secret", labels={"lang": "py-secret"},
                         ca_file=cluster.ca_file, **cluster.join_kwargs("py-secret"))

    @worker.handler(kind="thread")
    def secret_upper(data: bytes, ctx: weft.Context) -> str:
        return ctx.secret_env.get("API_KEY", "missing").upper()

    running = RunningWorker(worker)
    try:
        cluster.wait_nodes("rust", "py-secret")
        secret = "s3cr3t-" + new_ulid().lower()
        task = cluster.client.exec(
            ["sh", "-c", 'printf %s "$API_KEY" | tr a-z A-Z'], labels={"lang": "rust"},
            secret_env={"API_KEY": secret}, wait_timeout=30,
        )
        output = b"".join(data for _, data in cluster.client.output(task.id))
        assert output == secret.upper().encode()
        assert cluster.client.call("secret_upper", secret_env={"API_KEY": secret}, wait_timeout=30) == secret.upper().encode()
        # No answer carries it: the records, their specs, the events.
        for t in cluster.client.list(limit=10):
            assert len(t.spec.secret_env) == 0
            assert secret.encode() not in t.pb.SerializeToString()
        for event in cluster.client.watch(task.id):
            assert event.pb is not None and secret.encode() not in event.pb.SerializeToString()
        shown = cluster.weft("get", task.id, "--output", "json")
        assert shown.returncode == 0 and secret.encode() not in shown.stdout
    finally:
        running.stop()


def test_clients_carry_tokens_and_refusals_are_typed(cluster, monkeypatch):
    monkeypatch.setenv("WEFT_CA", cluster.ca_file)
    # No token at all: Unauthenticated, with how to get one.
    monkeypatch.delenv("WEFT_TOKEN", raising=False)
    with weft.Client(cluster.url) as client:
        with pytest.raises(weft.Unauthenticated) as err:
            client.nodes()
        assert "weft token create" in err.value.details
    # A read-only token made by the admin CLI: reads work, submitting is
    # PermissionDenied naming the scope.
    made = cluster.weft("token", "create", "--scope", "read", "--name", "py")
    assert made.returncode == 0, made.stderr
    reader_token = made.stdout.decode().strip()
    with weft.Client(cluster.url, token=reader_token) as client:
        assert client.nodes() == []
        with pytest.raises(weft.PermissionDenied) as err:
            client.submit_exec(["true"])
        assert "'submit'" in err.value.details
    # $WEFT_TOKEN is the default; the asyncio client sends it on streams too.
    monkeypatch.setenv("WEFT_TOKEN", cluster.token)

    async def via_aio():
        async with weft.aio.Client(cluster.url) as client:
            await client.nodes()
        async with weft.aio.Client(cluster.url, token="weft_wrong") as client:
            with pytest.raises(weft.Unauthenticated):
                await client.nodes()

    asyncio.run(via_aio())
    with weft.Client(cluster.url) as client:
        assert client.nodes() == []


def test_tls_the_client_trusts_the_cluster_ca_and_refuses_others(cluster, tmp_path, monkeypatch):
    from weft._channel import ca_pin

    cluster.rust_node("rust")
    cluster.wait_nodes("rust")
    # $WEFT_CA is the default CA file.
    monkeypatch.setenv("WEFT_CA", cluster.ca_file)
    monkeypatch.setenv("WEFT_TOKEN", cluster.token)
    with weft.Client(cluster.url) as client:
        assert [n.name for n in client.nodes()] == ["rust"]
    monkeypatch.delenv("WEFT_CA")
    # A pin that matches the file is accepted; one that does not is refused.
    with open(cluster.ca_file, "rb") as f:
        import ssl
        der = ssl.PEM_cert_to_DER_cert(f.read().decode())
    with weft.Client(cluster.url, ca_file=cluster.ca_file, ca_pin=ca_pin(der)) as client:
        assert len(client.nodes()) == 1
    with pytest.raises(ValueError, match="does not match the CA pin"):
        weft.Client(cluster.url, ca_file=cluster.ca_file, ca_pin="sha256:" + "0" * 64)
    # No CA at all: says what to pass.
    with pytest.raises(ValueError, match="ca_file= / WEFT_CA"):
        weft.Client(cluster.url)
    # Another cluster's CA: the call fails, never reaching the coordinator.
    other = tmp_path / "other-data"
    spawn_other = [str(require_binary("weft-coordinator")), "--listen", "127.0.0.1:0", "--addr-file",
                   str(tmp_path / "other.addr"), "--data-dir", str(other)]
    proc = subprocess.Popen(spawn_other, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll(lambda: (other / "ca.pem").exists(), timeout=20, what="another CA")
        with weft.Client(cluster.url, ca_file=str(other / "ca.pem")) as client:
            with pytest.raises(weft.Unavailable):
                client.nodes()
    finally:
        proc.kill()
        proc.wait()
    # A plaintext client against the TLS coordinator fails too.
    with weft.Client("http://" + cluster.url[len("https://"):]) as client:
        with pytest.raises(weft.WeftError):
            client.nodes()


# -- joining (needs a coordinator that answers NodeService.Join) ----------------------

NOT_JOINING = ("this weft-coordinator answers UNIMPLEMENTED to NodeService.Join (node authentication is not "
               "built into it yet): nothing to join")


def node_conf(state: Path) -> dict:
    return dict(line.split("=", 1) for line in (state / "node.conf").read_text().splitlines() if "=" in line)


def test_a_python_worker_joins_with_a_token_from_the_cli_and_needs_none_after_a_restart(cluster, spawn):
    if not cluster.joins:
        pytest.skip(NOT_JOINING)
    made = cluster.weft("token", "create", "--role", "node", "--uses", "1")
    if made.returncode != 0:
        pytest.skip(f"`weft token create --role node` failed: {made.stderr.decode(errors='replace').strip()}")
    token = made.stdout.decode().strip()
    assert token.startswith("weftjoin_") and "\n" not in token, "the join token alone on stdout"
    state = cluster.state_dir("joined")
    # The token alone: it names the coordinator and pins its CA.
    argv = [sys.executable, str(EXAMPLES_DIR / "worker.py"), "--join", token, "--state-dir", str(state),
            "--name", "joined", "--slots", "2"]
    clean = {"WEFT_COORDINATOR": None, "WEFT_CA": None, "WEFT_CA_PIN": None}
    worker = spawn(argv, name="joined", env=clean)
    node = {n.name: n for n in cluster.wait_nodes("joined")}["joined"]
    assert node.id == node_conf(state)["node_id"], "the node id is the one its certificate names"
    assert json.loads(cluster.client.call("wordcount", b"a b a", wait_timeout=30)) == {"words": 3, "distinct": 2}
    # Restarted without a token (it was for one use): the state dir is enough.
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(20) == 0
    poll(lambda: "joined" not in {n.name for n in cluster.client.nodes()}, timeout=10, what="the worker gone")
    spawn([sys.executable, str(EXAMPLES_DIR / "worker.py"), "--state-dir", str(state), "--slots", "2"],
          name="joined-again", env=clean)
    node = {n.name: n for n in cluster.wait_nodes("joined")}["joined"]
    assert node.id == node_conf(state)["node_id"]
    assert cluster.client.call("sha256", b"", wait_timeout=30).startswith(b"e3b0c442")


def test_a_revoked_python_worker_is_cut_off_and_stops(cluster):
    if not cluster.joins:
        pytest.skip(NOT_JOINING)
    worker = cluster.python_worker("doomed")
    node = {n.name: n for n in cluster.wait_nodes("doomed")}["doomed"]
    with open(cluster.ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(cluster.url[len("https://"):], credentials) as channel:
        answer = admin_pb2_grpc.AdminServiceStub(channel).RevokeNode(
            admin_pb2.RevokeNodeRequest(node=node.id), timeout=10,
            metadata=(("authorization", f"Bearer {cluster.token}"),))
    assert answer.node_id == node.id
    code = worker.wait_exit(20)
    assert code is not None and code != 0, f"a revoked worker must stop, non-zero:\n{worker.output()}"
    assert "revoked" in worker.output().lower() or "PERMISSION_DENIED" in worker.output()


def test_a_python_worker_without_a_node_certificate_is_refused_and_stops(cluster, spawn):
    if not cluster.joins:
        pytest.skip(NOT_JOINING)
    argv = [sys.executable, str(EXAMPLES_DIR / "worker.py"), "--coordinator", cluster.url, "--ca-file", cluster.ca_file,
            "--name", "stranger", "--state-dir", str(cluster.state_dir("stranger"))]
    worker = spawn(argv, name="stranger", env={"WEFT_JOIN_TOKEN": None})
    code = worker.wait_exit(20)
    assert code is not None and code != 0, worker.output()
    assert "join" in worker.output().lower()
    assert "stranger" not in {n.name for n in cluster.client.nodes()}


def test_list_filters_and_each_tasks_attempts(cluster):
    cluster.rust_node("rust")
    cluster.python_worker("py")
    cluster.wait_nodes("rust", "py")
    client = cluster.client
    ids = {}
    for name, lang in (("resize-py", "py"), ("thumb-rust", "rust"), ("resize-rust", "rust")):
        ids[name] = client.submit(weft.call_spec("echo", name.encode(), name=name, labels={"lang": lang}))
        assert client.wait(ids[name], timeout=30).state == weft.TaskState.SUCCEEDED
    listed = lambda **filters: [t.id for t in client.list(**filters)]  # noqa: E731
    assert listed(name="resize") == [ids["resize-rust"], ids["resize-py"]]
    assert listed(labels={"lang": "rust"}) == [ids["resize-rust"], ids["thumb-rust"]]
    assert listed(node="py") == [ids["resize-py"]]
    assert listed(name="resize", node="rust", state="SUCCEEDED") == [ids["resize-rust"]]
    assert listed(since="1h") == [ids["resize-rust"], ids["thumb-rust"], ids["resize-py"]]
    assert listed(until="1h") == []
    with pytest.raises(weft.InvalidArgument, match="since"):
        client.list(since="1m", until="2h")
    task = client.get(ids["thumb-rust"])
    [attempt] = task.attempts
    assert (attempt.number, attempt.node_name, attempt.outcome, attempt.reason) == (1, "rust", "succeeded", "")
    assert attempt.started_at is not None and attempt.ended_at >= attempt.started_at
    assert attempt.duration is not None
