"""Python at the speed of a process pool: every Python path through Weft
beside ``concurrent.futures.ProcessPoolExecutor(2)``, in one sitting.

    cargo build --release --bins
    sdk/python/run-tests.sh --co -q >/dev/null     # makes sdk/python/.venv with the package
    sdk/python/.venv/bin/python sdk/python/benchmarks/python_paths.py --bin-dir target/release

Paths (noop tasks: the argument travels and comes back, checked):

- ``ppe``: ``ProcessPoolExecutor(2).map(noop, range(N), chunksize=1)``;
- ``rust-client``: ``weft bench --only throughput`` (the Rust client) against
  the cluster below: a durable TLS coordinator and 2 ``weft-node --slots 1``;
- ``sdk-client``: the Python asyncio client (``weft.aio.Client.map``) against
  that same cluster;
- ``worker-asyncio`` / ``-thread`` / ``-process``: the Python client against one
  SDK ``weft.Worker`` with 2 slots serving a noop handler of that kind;
- ``executor`` and ``ppe-chunked``: ``weft.Executor.map(noop, range(N),
  chunksize=K)`` on that SDK worker (pickled by reference, ``bench_tasks``
  allowed) beside ``ProcessPoolExecutor(2)`` with the same chunksize.

Each figure is the median of ``--runs`` runs of ``--tasks`` tasks after a
warm-up, with the CPU the cluster's processes (coordinator, nodes or worker
with its pool) and the client spent per task. The figures hold for this run
on this machine only: compare the ratios, which the table prints.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpc  # noqa: E402

import weft  # noqa: E402
import weft.aio  # noqa: E402
from weft._proto import admin_pb2, admin_pb2_grpc  # noqa: E402

import bench_tasks  # noqa: E402

PATHS = ["ppe", "rust-client", "sdk-client", "worker-asyncio", "worker-thread", "worker-process", "executor"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting -----------------------------------------------------------


def _stat(pid: int) -> Optional[List[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def tree_cpu(pids: List[int]) -> float:
    """CPU seconds (user + system) of ``pids`` and all their descendants now."""
    children: Dict[int, List[int]] = {}
    stats: Dict[int, List[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
                children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += (int(stats[pid][11]) + int(stats[pid][12])) / CLK_TCK
        todo.extend(children.get(pid, []))
    return total


def own_cpu() -> float:
    """CPU seconds of this process (its threads included, its pools not)."""
    times = os.times()
    return times.user + times.system


# -- the cluster ----------------------------------------------------------------


class Cluster:
    """A durable TLS coordinator in a temp dir, and the workers started on it."""

    def __init__(self, bin_dir: Path, tmp: Path):
        self.bin_dir, self.tmp = bin_dir, tmp
        self.procs: List[subprocess.Popen] = []
        addr_file = tmp / "coordinator.addr"
        self.ca_file = str(tmp / "data" / "ca.pem")
        self.token_file = tmp / "admin.token"
        self.coordinator = self._spawn(
            [str(bin_dir / "weft-coordinator"), "--listen", "127.0.0.1:0", "--addr-file", str(addr_file),
             "--data-dir", str(tmp / "data"), "--admin-token-file", str(self.token_file)], "coordinator")
        deadline = time.monotonic() + 30
        while not (addr_file.exists() and addr_file.read_text().strip()):
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the coordinator did not start: see {tmp / 'coordinator.log'}")
            time.sleep(0.02)
        self.url = "https://" + addr_file.read_text().strip()
        self.token = self.token_file.read_text().strip()

    def _spawn(self, argv: List[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc

    def client(self) -> weft.Client:
        return weft.Client(self.url, token=self.token, ca_file=self.ca_file)

    def aio_client(self) -> weft.aio.Client:
        return weft.aio.Client(self.url, token=self.token, ca_file=self.ca_file)

    def join_token(self) -> str:
        with open(self.ca_file, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(self.url[len("https://"):], credentials) as channel:
            answer = admin_pb2_grpc.AdminServiceStub(channel).CreateToken(
                admin_pb2.CreateTokenRequest(role="node", uses=1, name="bench"), timeout=10,
                metadata=(("authorization", f"Bearer {self.token}"),))
        return answer.token

    def rust_node(self, name: str) -> subprocess.Popen:
        return self._spawn([str(self.bin_dir / "weft-node"), "--join", self.join_token(), "--state-dir",
                            str(self.tmp / f"state-{name}"), "--slots", "1", "--name", name], name)

    def sdk_worker(self, kind: str) -> subprocess.Popen:
        name = f"py-{kind}"
        return self._spawn([sys.executable, str(HERE / "bench_worker.py"), "--coordinator", self.url, "--ca-file",
                            self.ca_file, "--join", self.join_token(), "--state-dir", str(self.tmp / f"state-{name}"),
                            "--kind", kind, "--slots", "2", "--name", name], name)

    def wait_ready(self, names: List[str]) -> None:
        """Until every node in ``names`` is connected and ready."""
        with self.client() as client:
            deadline = time.monotonic() + 60
            while True:
                ready = {n.name for n in client.nodes() if n.state == weft.NodeState.READY}
                if set(names) <= ready:
                    return
                for proc in self.procs:
                    if proc.poll() is not None and proc is not self.coordinator and proc.returncode not in (0, -15):
                        raise SystemExit(f"a worker exited ({proc.args[0]}): see the logs in {self.tmp}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"nodes {names} not ready within 60 s; ready: {sorted(ready)}")
                time.sleep(0.05)

    def stop(self, proc: subprocess.Popen) -> None:
        """Drains a worker (SIGTERM) and waits for it to exit."""
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


# -- measuring ------------------------------------------------------------------


class Figure:
    """A path's runs: tasks/s each, and CPU µs per task (cluster, client)."""

    def __init__(self, path: str, note: str):
        self.path, self.note = path, note
        self.rates: List[float] = []
        self.cluster_us: List[float] = []
        self.client_us: List[float] = []

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    def as_json(self) -> dict:
        return {
            "path": self.path, "note": self.note, "tasks_per_s": round(self.rate),
            "runs_tasks_per_s": [round(r) for r in self.rates],
            "cluster_cpu_us_per_task": round(statistics.median(self.cluster_us), 1) if self.cluster_us else None,
            "client_cpu_us_per_task": round(statistics.median(self.client_us), 1) if self.client_us else None,
        }


def measure(figure: Figure, runs: int, n: int, body: Callable[[], None], cluster_pids: List[int]) -> Figure:
    """Runs ``body`` (``n`` tasks, checked by itself) ``runs`` times."""
    for _ in range(runs):
        cpu0, own0 = tree_cpu(cluster_pids), own_cpu()
        start = time.perf_counter()
        body()
        wall = time.perf_counter() - start
        figure.rates.append(n / wall)
        figure.cluster_us.append((tree_cpu(cluster_pids) - cpu0) / n * 1e6)
        figure.client_us.append((own_cpu() - own0) / n * 1e6)
        print(f"  {figure.path}: {n / wall:,.0f} tasks/s", file=sys.stderr)
    return figure


def check(results: List, expected: List, what: str) -> None:
    if results != expected:
        wrong = next(i for i, (a, b) in enumerate(zip(results, expected)) if a != b) if len(results) == len(expected) else -1
        raise SystemExit(f"{what}: wrong results (first difference at {wrong}; {len(results)} of {len(expected)})")


def sdk_map(cluster: Cluster, handler: str, n: int) -> Callable[[], None]:
    """One run: the asyncio client maps ``handler`` over ``n`` inputs."""
    inputs = [str(i).encode() for i in range(n)]

    async def go() -> None:
        async with cluster.aio_client() as client:
            results = [r async for r in client.map(handler, inputs)]
        check(results, inputs, handler)

    return lambda: asyncio.run(go())


def rust_client(cluster: Cluster, args, figure: Figure, pids: List[int]) -> Figure:
    """``weft bench --only throughput`` against the cluster: the Rust client's tasks/s. The cluster's
    CPU per task is taken over the whole bench (its warm-up included, so a little high)."""
    weft_bin = str(args.bin_dir / "weft")
    argv = [weft_bin, "--coordinator", cluster.url, "--ca-file", cluster.ca_file, "--token-file",
            str(cluster.token_file), "bench", "--coordinator", cluster.url, "--only", "throughput", "--output", "json"]
    if args.quick:
        argv.append("--quick")
    cpu0 = tree_cpu(pids)
    answer = subprocess.run(argv, capture_output=True, text=True, cwd=cluster.tmp)
    cpu = tree_cpu(pids) - cpu0
    if answer.returncode != 0:
        raise SystemExit(f"weft bench failed ({answer.returncode}):\n{answer.stderr[-2000:]}")
    throughput = json.loads(answer.stdout).get("throughput") or {}
    figure.rates = [float(r) for r in throughput.get("runs") or []]
    if not figure.rates:
        raise SystemExit(f"weft bench reported no throughput runs:\n{answer.stdout[-2000:]}")
    tasks = throughput.get("n", 0) * len(figure.rates) + 200
    figure.cluster_us = [cpu / tasks * 1e6]
    if throughput.get("client_cpu_us_per_task") is not None:
        figure.client_us = [float(throughput["client_cpu_us_per_task"])]
    print(f"  {figure.path}: {figure.rate:,.0f} tasks/s", file=sys.stderr)
    return figure


# -- the sitting ------------------------------------------------------------------


def run(args) -> List[Figure]:
    n, runs, k = args.tasks, args.runs, args.chunksize
    wanted = set(args.only or PATHS)
    figures: List[Figure] = []
    expected = list(range(n))

    if "ppe" in wanted or "executor" in wanted:
        with concurrent.futures.ProcessPoolExecutor(2) as pool:
            check(list(pool.map(bench_tasks.noop, range(200))), list(range(200)), "ppe warm-up")
            pids = [p.pid for p in pool._processes.values()]
            plan = ([(1, "ppe")] if "ppe" in wanted else []) + ([(k, "ppe-chunked")] if "executor" in wanted else [])
            for chunk, name in plan:
                body = lambda c=chunk: check(list(pool.map(bench_tasks.noop, range(n), chunksize=c)), expected, name)
                figures.append(measure(Figure(name, f"ProcessPoolExecutor(2).map, chunksize {chunk}"), runs, n, body,
                                       pids))

    tmp = Path(tempfile.mkdtemp(prefix="weft-pybench-"))
    cluster = Cluster(args.bin_dir, tmp)
    try:
        if wanted & {"rust-client", "sdk-client"}:
            nodes = [cluster.rust_node("rust-1"), cluster.rust_node("rust-2")]
            cluster.wait_ready(["rust-1", "rust-2"])
            pids = [cluster.coordinator.pid] + [p.pid for p in nodes]
            sdk_map(cluster, "noop", 200)()
            if "rust-client" in wanted:
                figures.append(rust_client(cluster, args, Figure("rust-client", "weft bench (Rust client) → 2 weft-node --slots 1"),
                                           pids))
            if "sdk-client" in wanted:
                figures.append(measure(Figure("sdk-client", "weft.aio.Client.map → 2 weft-node --slots 1"), runs, n,
                                       sdk_map(cluster, "noop", n), pids))
            for node in nodes:
                cluster.stop(node)
        for kind in ("asyncio", "thread", "process"):
            if f"worker-{kind}" not in wanted and not (kind == "process" and "executor" in wanted):
                continue
            worker = cluster.sdk_worker(kind)
            cluster.wait_ready([f"py-{kind}"])
            pids = [cluster.coordinator.pid, worker.pid]
            sdk_map(cluster, f"noop_{kind}", 200)()
            if f"worker-{kind}" in wanted:
                figures.append(measure(Figure(f"worker-{kind}", f"weft.aio.Client.map → SDK worker, 2 slots, {kind} handler"),
                                       runs, n, sdk_map(cluster, f"noop_{kind}", n), pids))
            if kind == "process" and "executor" in wanted:
                figures.append(executor(cluster, n, runs, k, pids))
            cluster.stop(worker)
    finally:
        cluster.close()
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return figures


def executor(cluster: Cluster, n: int, runs: int, k: int, pids: List[int]) -> Figure:
    figure = Figure("executor", f"weft.Executor.map → SDK worker, 2 slots, chunksize {k}")
    expected = list(range(n))
    with weft.Executor(cluster.url, token=cluster.token, ca_file=cluster.ca_file) as ex:
        check(list(ex.map(bench_tasks.noop, range(200), chunksize=k)), list(range(200)), "executor warm-up")
        return measure(figure, runs, n,
                       lambda: check(list(ex.map(bench_tasks.noop, range(n), chunksize=k)), expected, "executor"), pids)


def table(figures: List[Figure], n: int) -> str:
    by = {f.path: f for f in figures}
    ppe = by.get("ppe")
    lines = [f"| path | {n:,} noop, tasks/s (median) | cluster CPU µs/task | client CPU µs/task | vs |",
             "|---|---:|---:|---:|---|"]
    for f in figures:
        j = f.as_json()
        ratio = ""
        if f.path.startswith("worker-") and ppe and ppe.rate:
            ratio = f"{f.rate / ppe.rate:.2f}× ppe"
        elif f.path == "sdk-client" and "rust-client" in by and by["rust-client"].rate:
            ratio = f"{f.rate / by['rust-client'].rate:.0%} of rust-client"
        elif f.path == "executor" and "ppe-chunked" in by and f.rate:
            ratio = f"{by['ppe-chunked'].rate / f.rate:.2f}× ppe-chunked's time"
        cluster_us, client_us = (j[key] if j[key] is not None else "n/a"
                                 for key in ("cluster_cpu_us_per_task", "client_cpu_us_per_task"))
        lines.append(f"| {f.path}: {f.note} | {f.rate:,.0f} | {cluster_us} | {client_us} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_bins = os.environ.get("WEFT_BIN_DIR") or str(HERE.parent.parent.parent / "target" / "release")
    parser.add_argument("--bin-dir", type=Path, default=Path(default_bins),
                        help="where weft, weft-coordinator and weft-node are (default $WEFT_BIN_DIR, else target/release)")
    parser.add_argument("--tasks", type=int, help="tasks per run (default 20,000; 2,000 with --quick)")
    parser.add_argument("--runs", type=int, default=3, help="runs per path; the median is reported (default 3)")
    parser.add_argument("--chunksize", type=int, default=100,
                        help="chunksize of the executor and ppe-chunked paths (default 100)")
    parser.add_argument("--only", type=lambda s: s.split(","), help=f"comma-separated paths: {','.join(PATHS)}")
    parser.add_argument("--quick", action="store_true",
                        help="1 run of 2,000 tasks (unless --tasks), weft bench --quick: a smoke test, not comparable")
    parser.add_argument("--output", choices=["table", "json"], default="table", help="stdout format")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's logs and data dir")
    args = parser.parse_args()
    for path in args.only or []:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}; choose from {','.join(PATHS)}")
    for name in ("weft", "weft-coordinator", "weft-node"):
        if not (args.bin_dir / name).is_file():
            parser.error(f"{args.bin_dir / name} missing: build with `cargo build --release --bins` or pass --bin-dir")
    if args.tasks is None:
        args.tasks = 2_000 if args.quick else 20_000
    if args.quick:
        args.runs = 1
    if args.tasks < 1 or args.runs < 1 or args.chunksize < 1:
        parser.error("--tasks, --runs and --chunksize must be at least 1")
    args.bin_dir = args.bin_dir.resolve()
    figures = run(args)
    if args.output == "json":
        print(json.dumps({"tasks": args.tasks, "runs": args.runs, "chunksize": args.chunksize,
                          "figures": [f.as_json() for f in figures]}, indent=2))
    else:
        print(table(figures, args.tasks))


if __name__ == "__main__":
    main()
