#!/usr/bin/env python3
"""A Weft worker in Python, serving handlers of all three kinds.

    pip install ./sdk/python
    python examples/python/worker.py --join "$(weft token create --role node)" --slots 4

The join token carries the coordinator's address and its CA's pin: the
worker checks the coordinator, gets its own certificate and keeps it in
--state-dir (default weft-node-state); started again, it needs no token.
For a coordinator started with --insecure: --coordinator http://HOST:PORT.

It runs no exec tasks (shell commands) unless started with `--exec allow`.

Then, from anywhere:

    weft call echo hello                 # asyncio handler, output streamed
    weft call sha256 hello               # thread handler
    weft call primes 200000              # process handler: CPU-bound, own core
    weft call burn 2s                    # burns a core for 2 s in a pool process
    weft call sleep 2s                   # cancel it with `weft cancel ID`

It serves the same handler names as `weft-node`'s built-ins (noop, echo,
sleep, sha256, fail, spin), so the conformance kit can drive it like the Rust
node, plus `countdown` (asyncio), `wordcount` (thread), `primes` and `burn`
(process).
"""

import argparse
import asyncio
import hashlib
import logging
import os
import sys
import time

import weft

# -- asyncio: coroutines on the worker's event loop (I/O-bound work) ---------


async def noop(data: bytes) -> bytes:
    return data


async def echo(data: bytes, ctx: weft.Context) -> bytes:
    ctx.output(data)  # streamed to watchers as stdout
    return data


async def sleep(data: bytes) -> None:
    await asyncio.sleep(weft.parse_duration(data.decode() or "0"))


async def fail(data: bytes) -> None:
    raise weft.HandlerError(data.decode(errors="replace"))


async def countdown(data: bytes, ctx: weft.Context) -> str:
    n = int(data or b"3")
    for i in range(n, 0, -1):
        ctx.print(i)
        ctx.progress((n - i + 1) / n, f"{i} to go")
        await asyncio.sleep(0.1)
    return "liftoff"


# -- thread: blocking library code on a thread pool --------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spin(data: bytes, ctx: weft.Context) -> None:
    deadline = time.monotonic() + weft.parse_duration(data.decode() or "0")
    while time.monotonic() < deadline:
        ctx.check_cancelled()  # threads cannot be killed: poll for cancel
        sum(i * i for i in range(2000))


def wordcount(data: bytes) -> dict:
    words = data.decode(errors="replace").split()
    return {"words": len(words), "distinct": len(set(words))}  # sent as JSON


# -- process: CPU-bound work on a process pool (one core per process) --------


def primes(data: bytes) -> str:
    """Counts the primes below N by trial division: pure CPU, no GIL contention."""
    n = int(data or b"100000")
    count = 0
    for candidate in range(2, n):
        if all(candidate % d for d in range(2, int(candidate**0.5) + 1)):
            count += 1
    return f"{count} primes below {n} (pid {os.getpid()})"


def burn(data: bytes) -> dict:
    """Burns CPU for the duration in its input; returns its pid and CPU seconds."""
    started = time.process_time()
    deadline = time.monotonic() + weft.parse_duration(data.decode() or "1s")
    while time.monotonic() < deadline:
        sum(i * i for i in range(2000))
    return {"pid": os.getpid(), "cpu": time.process_time() - started}


def label(text: str):
    """``--label``: KEY=VALUE, or a usage error saying so."""
    try:
        return weft.parse_label(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--coordinator", default=os.environ.get("WEFT_COORDINATOR"),
                        help="HOST:PORT or a URL (default: the join token's or the state dir's address)")
    parser.add_argument("--join", default=os.environ.get("WEFT_JOIN_TOKEN"), metavar="TOKEN",
                        help="a join token (weft token create --role node); not needed once joined")
    parser.add_argument("--state-dir", default=os.environ.get("WEFT_NODE_STATE_DIR"),
                        help="where the node's key and certificate live (default weft-node-state)")
    parser.add_argument("--ca-file", default=os.environ.get("WEFT_CA"),
                        help="the cluster CA's certificate (the coordinator's ca.pem)")
    parser.add_argument("--ca-pin", default=os.environ.get("WEFT_CA_PIN"),
                        help="the cluster CA's pin (sha256:HEX)")
    parser.add_argument("--slots", type=int, default=None,
                        help="tasks run at once (default: the number of CPUs)")
    parser.add_argument("--name", default=None, help="node name (default: HOST-pyPID)")
    parser.add_argument("--label", action="append", default=[], metavar="K=V", type=label,
                        help="a label tasks can require, KEY=VALUE (repeatable)")
    parser.add_argument("--drain-grace", default="30s",
                        help="how long running tasks may take to finish on SIGTERM (default 30s)")
    # Exec tasks are shell commands anyone who may submit can send; this
    # worker serves handlers and refuses them unless told otherwise.
    parser.add_argument("--exec", choices=["allow", "deny"], default=os.environ.get("WEFT_EXEC", "deny"),
                        help="run exec tasks of any program (allow) or none (deny, the default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        worker = build(args)
        worker.run()  # until drained: SIGTERM/SIGINT or `weft drain NAME`
    except (weft.WeftError, ValueError, OSError) as e:
        # A refusal reconnecting would not fix: a bad or used-up token, a
        # coordinator the pin does not name, a revoked node.
        sys.exit(f"worker stopped: {e}")


def build(args) -> weft.Worker:
    worker = weft.Worker(
        args.coordinator,
        slots=args.slots,
        name=args.name,
        labels=dict(args.label),
        drain_grace=args.drain_grace,
        exec=args.exec,
        ca_file=args.ca_file,
        ca_pin=args.ca_pin,
        join_token=args.join,
        state_dir=args.state_dir,
    )
    for fn in (noop, echo, sleep, fail, countdown):
        worker.register(fn.__name__, fn, kind="asyncio")
    for fn in (sha256, spin, wordcount):
        worker.register(fn.__name__, fn, kind="thread")
    for fn in (primes, burn):
        worker.register(fn.__name__, fn, kind="process")
    return worker


if __name__ == "__main__":
    main()
