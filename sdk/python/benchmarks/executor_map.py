"""``weft.Executor.map`` against ``ProcessPoolExecutor(2)``: a noop function over
``-n`` items (default 20,000) at each ``--chunksize``, in one sitting.

Starts ``weft-coordinator`` (durable store in a temporary data dir,
``--insecure --no-auth``: plaintext and no tokens, for the measurement only)
from ``$WEFT_BIN_DIR`` (default ``<repo>/target/debug``) and one Python
worker with ``--slots`` slots (``python -m weft.worker_demo --allow-module
executor_map``: the pickled calls run on its process pool). For each
chunksize, after a warm-up of both, it times ``list(ex.map(noop, range(n),
chunksize=k))`` ``--repeat`` times on each executor and prints the best and
the median, and their ratio (Weft's time over the pool's; the target is at
most 2).

    python sdk/python/benchmarks/executor_map.py --chunksize 100 --chunksize 1000

Run it with the SDK installed (``sdk/python/run-tests.sh`` makes
``sdk/python/.venv``). The function is this file's ``noop``, imported as the
module ``executor_map`` on both sides.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def noop(x):
    """The mapped function: returns its argument."""
    return x


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process, its waited-for children and its live ones, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(k) for k in kids)


def timed(run, repeat: int):
    """``repeat`` timings of ``run()`` (seconds) and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000, help="items mapped (default 20000)")
    p.add_argument("--chunksize", type=int, action="append", help="chunksize (repeatable; default 100 and 1000)")
    p.add_argument("--slots", type=int, default=2, help="the worker's slots, and the local pool's size (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per executor and chunksize (default 3)")
    args = p.parse_args()
    chunksizes = args.chunksize or [100, 1000]

    import weft
    from executor_map import noop as fn  # this file as a module, so that a worker can import it

    bin_dir = Path(os.environ.get("WEFT_BIN_DIR") or REPO / "target" / "debug")
    coordinator_bin = bin_dir / "weft-coordinator"
    if not coordinator_bin.exists():
        sys.exit(f"{coordinator_bin} missing: build it (cargo build --bins) or set WEFT_BIN_DIR")
    with tempfile.TemporaryDirectory(prefix="weft-bench-") as tmp:
        addr_file = Path(tmp) / "addr"
        procs = []
        try:
            procs.append(subprocess.Popen(
                [str(coordinator_bin), "--listen", "127.0.0.1:0", "--addr-file", str(addr_file),
                 "--data-dir", str(Path(tmp) / "data"), "--insecure", "--no-auth"],
                stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "coordinator.log", "wb"),
            ))
            deadline = time.monotonic() + 30
            while not (addr_file.exists() and addr_file.read_text().strip()):
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    sys.exit("the coordinator did not start:\n" + (Path(tmp) / "coordinator.log").read_text())
                time.sleep(0.05)
            url = "http://" + addr_file.read_text().strip()
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "weft.worker_demo", "--coordinator", url, "--slots", str(args.slots),
                 "--name", "bench-executor", "--allow-module", "executor_map", "--log-level", "warning"],
                cwd=tmp, env=env,
            ))
            with weft.Client(url) as client:
                deadline = time.monotonic() + 30
                while not any("weft.pickle" in n.handlers for n in client.nodes()):
                    if time.monotonic() > deadline:
                        sys.exit("the worker did not register")
                    time.sleep(0.05)
            items = range(args.n)
            expected = list(items)
            print(f"# {args.n} noop items, worker --slots {args.slots} vs ProcessPoolExecutor({args.slots}); "
                  f"best/median of {args.repeat} (seconds)")
            with weft.Executor(url) as wex, concurrent.futures.ProcessPoolExecutor(args.slots) as pool:
                # Warm-up: pool processes, connections, the coordinator's caches.
                assert list(wex.map(fn, range(2000), chunksize=100)) == list(range(2000))
                assert list(pool.map(fn, range(2000), chunksize=100)) == list(range(2000))
                for chunksize in chunksizes:
                    pool_times, result = timed(lambda: list(pool.map(fn, items, chunksize=chunksize)), args.repeat)
                    assert result == expected
                    before = [cpu_seconds(p.pid) for p in procs] + [time.process_time()]
                    weft_times, result = timed(lambda: list(wex.map(fn, items, chunksize=chunksize)), args.repeat)
                    after = [cpu_seconds(p.pid) for p in procs] + [time.process_time()]
                    assert result == expected
                    cpu = [(b - a) / args.repeat for a, b in zip(before, after)]
                    wb, wm = min(weft_times), statistics.median(weft_times)
                    pb, pm = min(pool_times), statistics.median(pool_times)
                    print(f"chunksize={chunksize} weft.Executor best={wb:.3f} median={wm:.3f} "
                          f"({args.n / wb:,.0f} items/s) | ProcessPoolExecutor best={pb:.3f} median={pm:.3f} "
                          f"({args.n / pb:,.0f} items/s) | ratio best={wb / pb:.2f} median={wm / pm:.2f} | "
                          f"weft cpu_s/run: coordinator={cpu[0]:.2f} worker={cpu[1]:.2f} client={cpu[2]:.2f}")
        finally:
            # The worker drains first, then the coordinator stops.
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
