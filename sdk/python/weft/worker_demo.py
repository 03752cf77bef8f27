"""A demo worker: the Rust node's built-in handlers, in Python, plus one per kind.

Run it with ``python -m weft.worker_demo --coordinator http://127.0.0.1:7070``
(or the ``weft-py-worker`` script). It takes ``weft-node``'s flags for the
coordinator, ``--join TOKEN --state-dir DIR`` to join a cluster,
``--slots N --prefetch N --name NAME --label k=v ... --drain-grace 30s
--lease 5s``, the exec policy, ``--allow-module`` (serve
``weft.Executor``'s pickled calls of that module), ``--log-level`` and ``--log-format
text|json``.

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
from typing import Callable, Optional

from .errors import WeftError
from .models import parse_duration, parse_label
from .policy import parse_resources
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
    try:
        resources = parse_resources(args.resource or [], "--resource")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    worker = Worker(
        args.coordinator,
        slots=args.slots,
        labels=labels,
        resources=resources,
        name=args.name,
        drain_grace=args.drain_grace,
        exec=policy,
        ca_file=args.ca_file,
        ca_pin=args.ca_pin,
        join_token=args.join,
        state_dir=args.state_dir,
        prefetch=args.prefetch,
        lease=args.lease,
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
    p.add_argument("--slots", type=positive_int, default=None, help="slots offered (default: number of CPUs)")
    p.add_argument("--prefetch", type=prefetch_count, metavar="N", default=os.environ.get("WEFT_NODE_PREFETCH"),
                   help="extra tasks (in slots) held queued beyond the slots, so the next task is already here when "
                        "a slot frees; 0 disables. A ceiling: the worker holds only what covers ~20 ms of refill at "
                        "the average task run time it sees (about one per slot for tasks of 20 ms and more); never "
                        "more than --slots run at once (default: 256 per slot; env WEFT_NODE_PREFETCH)")
    p.add_argument("--name", default=None, help="node name (default: host-pyPID)")
    p.add_argument("--label", action="append", metavar="K=V", help="a label tasks can require (repeatable)")
    p.add_argument("--resource", action="append", metavar="NAME=AMOUNT",
                   help="a numeric resource offered beyond slots, e.g. gpu=2, cpu=8, mem=32GiB (repeatable); tasks "
                        "asking for resources are placed only where that much is free")
    p.add_argument("--drain-grace", type=duration, default="30s",
                   help="on SIGTERM/SIGINT or a coordinator drain: how long running tasks may take before they are "
                        "cancelled (e.g. 500ms, 30s, 1m; default 30s)")
    p.add_argument("--lease", type=lease_duration, metavar="DURATION", default=None,
                   help="how long running tasks may continue while the coordinator is unreachable; after that they "
                        "are stopped, because the coordinator will have given them to another node (e.g. 5s; "
                        "default: the coordinator's heartbeat timeout)")
    p.add_argument("--exec", choices=["allow", "deny"], default=os.environ.get("WEFT_EXEC"),
                   help="run exec tasks (shell commands) of any program, or none (default: deny)")
    p.add_argument("--exec-allow", action="append", metavar="PROGRAM",
                   help="run only exec tasks of this program (bare name or absolute path; repeatable)")
    p.add_argument("--allow-module", action="append", metavar="MODULE",
                   help="serve weft.Executor's pickled calls of functions in this module and its submodules "
                        "(repeatable; none by default). Anyone who may submit can call any of its functions "
                        "with any arguments: never allow os, subprocess, builtins or the like")
    p.add_argument("--log-level", type=log_level, default=os.environ.get("WEFT_LOG", "info"),
                   help="least severe log lines shown: debug, info, warning or error (default info; env WEFT_LOG)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines on stderr: text (human-readable) or json (one JSON object per line)")
    return p


def whole_number(minimum: int, what: str = "a whole number", below: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``; ``what`` names it in the error,
    ``below`` says what the minimum means."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum}{below} or more, not {value}")
        return value

    return parse


#: A whole number of at least 1 (argparse type).
positive_int = whole_number(1)
#: A whole number of slots, 0 or more (argparse type).
prefetch_count = whole_number(0, "a whole number of slots (0 disables prefetch)", " (no prefetch)")


def duration(text: str) -> float:
    """A duration like 500ms, 30s, 1m (argparse type)."""
    try:
        return parse_duration(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lease_duration(text: str) -> float:
    """A positive duration (argparse type)."""
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text!r} (leave it out for the coordinator's "
                                         "heartbeat timeout)")
    return value


LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level(text: str) -> str:
    """A logging level name (argparse type)."""
    name = text.strip().lower()
    if name == "warn":
        name = "warning"
    if name not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return name


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``--log-format json``), with the fields
    weft-node's JSON lines have: timestamp, level, target, fields.message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.replace("WARNING", "WARN"),
            "target": record.name,
            "fields": {"message": record.getMessage()},
        }
        if record.exc_info:
            entry["fields"]["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, log_format: str, stream: Optional[object] = None) -> None:
    """Logs to stderr at ``level`` as text lines or JSON objects."""
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def main(argv=None) -> None:
    # Installed as a script, its usage names the script.
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    args = (parser("weft-py-worker") if script == "weft-py-worker" else parser()).parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        build_worker(args).run()
    except (WeftError, ValueError, OSError) as e:
        sys.exit(f"worker stopped: {e}")


if __name__ == "__main__":
    main()
