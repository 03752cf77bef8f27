"""A demo worker: the Rust node's built-in handlers, in Python, plus one per kind.

Run it with ``python -m weft.worker_demo --coordinator http://127.0.0.1:7070``
(or the ``weft-py-worker`` script). It takes ``weft-node``'s flags for the
coordinator, ``--join TOKEN --state-dir DIR`` to join a cluster,
``--slots N --name NAME --label k=v ... --drain-grace 30s``, the exec
policy, ``--allow-module`` (serve ``weft.Executor``'s pickled calls of
that module) and ``--log-level`` (not ``--lease``, ``--prefetch`` or
``--log-format``).

Handlers (input and output are bytes):

=========== ========= =======================================================
name        kind      what it does
=========== ========= =======================================================
noop        asyncio   returns its input unchanged
echo        asyncio   writes the input to stdout (an output chunk), returns it
sleep       asyncio   sleeps for the duration in its input (``250ms``)
sha256      thread    returns the lowercase hex SHA-256 of the input
fail        asyncio   fails with the input as the error message
spin        thread    burns CPU for the duration in its input, checking cancel
py_spin     process   burns CPU in a pool process for the duration in its input
py_pid      process   returns ``pid`` of the pool process that ran it
py_info     asyncio   returns JSON about this worker (pid, kinds)
=========== ========= =======================================================

``sleep``/``spin`` are the names the conformance kit uses on every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
import time

from .errors import WeftError
from .models import parse_duration, parse_label
from .worker import Context, HandlerError, Worker, exec_policy


async def noop(data: bytes) -> bytes:
    return data


async def echo(data: bytes, ctx: Context) -> bytes:
    ctx.output(data)
    return data


async def sleep(data: bytes) -> None:
    await asyncio.sleep(parse_duration(data.decode() or "0"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def fail(data: bytes) -> None:
    raise HandlerError(data.decode(errors="replace"))


def spin(data: bytes, ctx: Context) -> None:
    """Burns CPU on a worker thread (holds the GIL: one core at most)."""
    deadline = time.monotonic() + parse_duration(data.decode() or "0")
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        sum(i * i for i in range(2000))


def py_spin(data: bytes) -> str:
    """Burns CPU in a pool process (one core per process): returns the pid and CPU seconds."""
    start = time.process_time()
    deadline = time.monotonic() + parse_duration(data.decode() or "0")
    while time.monotonic() < deadline:
        sum(i * i for i in range(2000))
    return json.dumps({"pid": os.getpid(), "cpu": time.process_time() - start})


def py_pid(data: bytes) -> str:
    return str(os.getpid())


async def py_info(data: bytes) -> str:
    return json.dumps({"pid": os.getpid(), "python": sys.version.split()[0], "kinds": ["asyncio", "thread", "process"]})


def build_worker(args: argparse.Namespace) -> Worker:
    """A Worker with the demo handlers, configured from the parsed flags."""
    labels = {}
    for item in args.label or []:
        try:
            key, value = parse_label(item)
        except ValueError as e:
            raise SystemExit(f"--label: {e}") from None
        labels[key] = value
    try:
        policy = exec_policy.from_flags(args.exec, args.exec_allow)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    worker = Worker(
        args.coordinator,
        slots=args.slots,
        labels=labels,
        name=args.name,
        drain_grace=args.drain_grace,
        exec=policy,
        ca_file=args.ca_file,
        ca_pin=args.ca_pin,
        join_token=args.join,
        state_dir=args.state_dir,
        allow_modules=args.allow_module,
    )
    worker.register("noop", noop, "asyncio")
    worker.register("echo", echo, "asyncio")
    worker.register("sleep", sleep, "asyncio")
    worker.register("sha256", sha256, "thread")
    worker.register("fail", fail, "asyncio")
    worker.register("spin", spin, "thread")
    worker.register("py_spin", py_spin, "process")
    worker.register("py_pid", py_pid, "process")
    worker.register("py_info", py_info, "asyncio")
    return worker


def parser(prog: str = "python -m weft.worker_demo") -> argparse.ArgumentParser:
    """The weft-node-compatible command line."""
    p = argparse.ArgumentParser(prog=prog, description="A Weft worker written in Python.")
    p.add_argument("--coordinator", default=os.environ.get("WEFT_COORDINATOR"),
                   help="HOST:PORT or a URL (default: the join token's or the state dir's address)")
    p.add_argument("--join", default=os.environ.get("WEFT_JOIN_TOKEN"), metavar="TOKEN",
                   help="a join token (weft token create --role node); not needed once joined")
    p.add_argument("--state-dir", default=os.environ.get("WEFT_NODE_STATE_DIR"),
                   help="where the node's key and certificate live (default weft-node-state)")
    p.add_argument("--ca-file", default=os.environ.get("WEFT_CA"),
                   help="the cluster CA's certificate (the coordinator's ca.pem)")
    p.add_argument("--ca-pin", default=os.environ.get("WEFT_CA_PIN"),
                   help="the cluster CA's pin (sha256:HEX)")
    p.add_argument("--slots", type=int, default=None, help="slots offered (default: number of CPUs)")
    p.add_argument("--name", default=None, help="node name (default: host-pyPID)")
    p.add_argument("--label", action="append", metavar="K=V", help="a label tasks can require (repeatable)")
    p.add_argument("--drain-grace", default="30s", help="grace period when draining on a signal")
    p.add_argument("--exec", choices=["allow", "deny"], default=os.environ.get("WEFT_EXEC"),
                   help="run exec tasks (shell commands) of any program, or none (default: deny)")
    p.add_argument("--exec-allow", action="append", metavar="PROGRAM",
                   help="run only exec tasks of this program (bare name or absolute path; repeatable)")
    p.add_argument("--allow-module", action="append", metavar="MODULE",
                   help="serve weft.Executor's pickled calls of functions in this module and its submodules "
                        "(repeatable; none by default). Anyone who may submit can call any of its functions "
                        "with any arguments: never allow os, subprocess, builtins or the like")
    p.add_argument("--log-level", default=os.environ.get("WEFT_LOG", "info"))
    return p


def main(argv=None) -> None:
    # Installed as a script, its usage names the script.
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    args = (parser("weft-py-worker") if script == "weft-py-worker" else parser()).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        build_worker(args).run()
    except (WeftError, ValueError, OSError) as e:
        sys.exit(f"worker stopped: {e}")


if __name__ == "__main__":
    main()
