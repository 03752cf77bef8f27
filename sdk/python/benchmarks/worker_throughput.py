"""Noop calls per second through one Python ``weft.Worker``.

Starts ``weft-coordinator`` (durable store in a temporary data dir,
``--insecure --no-auth``: plaintext and no tokens, for the measurement
only) from ``$WEFT_BIN_DIR`` (default ``<repo>/target/debug``), one worker
process serving a noop handler of the chosen kind with ``--slots`` slots,
and one client that calls it ``-n`` times with ``Client.map`` (submitted
in batches, waited for over one ``WaitMany`` stream), after a warm-up.
Prints one line: kind, calls, seconds, calls/s, and the CPU seconds the
coordinator, the worker (with its pool processes) and the client spent.

    python sdk/python/benchmarks/worker_throughput.py --kind asyncio -n 20000
    python sdk/python/benchmarks/worker_throughput.py --kind process --prefetch 0

Run it with the SDK installed (``sdk/python/run-tests.sh`` makes
``sdk/python/.venv``). ``--profile FILE`` writes the worker's cProfile
stats there.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


async def noop_asyncio(data: bytes) -> bytes:
    return data


def noop_thread(data: bytes) -> bytes:
    return data


def noop_process(data: bytes) -> bytes:
    return data


HANDLERS = {"asyncio": noop_asyncio, "thread": noop_thread, "process": noop_process}


def serve(args: argparse.Namespace) -> None:
    """The worker process: serves ``noop`` of one kind until SIGTERM."""
    import weft

    logging.basicConfig(level=logging.WARNING)
    options = {} if args.prefetch is None else {"prefetch": args.prefetch}
    worker = weft.Worker(args.coordinator, slots=args.slots, name=f"bench-{args.kind}", **options)
    worker.register("noop", HANDLERS[args.kind], args.kind)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            worker.run()
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        worker.run()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its waited-for children (its pool processes), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    total = ticks / os.sysconf("SC_CLK_TCK")
    for child in children(pid):
        total += cpu_seconds(child)
    return total


def children(pid: int) -> list:
    """Live child processes of ``pid`` (Linux)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def measure(args: argparse.Namespace) -> None:
    import weft

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
            worker_argv = [sys.executable, os.path.abspath(__file__), "--serve", "--coordinator", url,
                           "--kind", args.kind, "--slots", str(args.slots)]
            if args.prefetch is not None:
                worker_argv += ["--prefetch", str(args.prefetch)]
            if args.profile:
                worker_argv += ["--profile", args.profile]
            procs.append(subprocess.Popen(worker_argv, cwd=tmp))
            client = weft.Client(url)
            deadline = time.monotonic() + 30
            while not any("noop" in n.handlers for n in client.nodes()):
                if time.monotonic() > deadline:
                    sys.exit("the worker did not register")
                time.sleep(0.05)
            # Warm-up: pool processes, connections, the coordinator's caches.
            list(client.map("noop", [b""] * min(500, args.n)))
            before = [cpu_seconds(p.pid) for p in procs] + [time.process_time()]
            start = time.perf_counter()
            results = list(client.map("noop", [b"x"] * args.n))
            took = time.perf_counter() - start
            after = [cpu_seconds(p.pid) for p in procs] + [time.process_time()]
            assert len(results) == args.n and all(r == b"x" for r in results)
            cpu = [b - a for a, b in zip(before, after)]
            print(f"kind={args.kind} slots={args.slots} prefetch={args.prefetch if args.prefetch is not None else 'default'} "
                  f"calls={args.n} seconds={took:.2f} calls/s={args.n / took:,.0f} "
                  f"cpu_s: coordinator={cpu[0]:.2f} worker={cpu[1]:.2f} client={cpu[2]:.2f}")
            client.close()
        finally:
            # The worker drains first, then the coordinator stops.
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if args.coordinator_log:
                shutil.copyfile(Path(tmp) / "coordinator.log", args.coordinator_log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=sorted(HANDLERS), default="asyncio", help="the noop handler's kind")
    p.add_argument("-n", type=int, default=20000, help="calls measured (after a warm-up of 500)")
    p.add_argument("--slots", type=int, default=2, help="the worker's slots (and process pool size)")
    p.add_argument("--prefetch", type=int, default=None, help="the worker's prefetch (default: its own)")
    p.add_argument("--profile", default=None, help="write the worker's cProfile stats to this file")
    p.add_argument("--coordinator-log", default=None, help="copy the coordinator's log to this file")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
