#!/usr/bin/env python3
"""A Weft client in Python: run a shell command on some node, call handlers.

    pip install ./sdk/python
    export WEFT_CA=$PWD/weft-data/ca.pem           # the coordinator's CA
    export WEFT_TOKEN="$(cat weft-data/admin.token)"
    python examples/python/client.py --coordinator 127.0.0.1:7070

For a coordinator started with --insecure: --coordinator http://HOST:PORT
(and no WEFT_CA).

Shows the blocking API (submit, stream output, wait, cancel, list nodes) and
the asyncio API (`async for event in client.watch(id)`).
"""

import argparse
import asyncio
import os
import sys

import weft
import weft.aio


def blocking(url: str) -> None:
    with weft.Client(url) as client:
        for node in client.nodes():
            print(f"node {node.name}: {node.slots} slots, handlers {', '.join(node.handlers)}")

        # A shell command on whichever node has room, its output streamed live.
        task_id = client.submit_exec(["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done; uname -n"])
        for stream, data in client.output(task_id):
            (sys.stdout if stream == weft.OutputStream.STDOUT else sys.stderr).write(data.decode())
        task = client.wait(task_id)
        print(f"exec {task.id}: {task.state} (exit code {task.exit_code}) on {task.node_name}")

        # A handler call: submit, wait, get the output bytes back.
        print("sha256:", client.call("sha256", b"hello").decode())
        try:
            client.call("fail", b"boom", max_attempts=1)
        except weft.TaskFailed as e:
            print("fail:", e.task.state, e.task.error)

        # Cancel a long task.
        task_id = client.submit_call("sleep", b"60s")
        client.cancel(task_id, reason="demo")  # the node stops it within a second
        print("after cancel:", client.wait(task_id, timeout=10).state)


async def with_asyncio(url: str) -> None:
    async with weft.aio.Client(url) as client:
        task_id = await client.submit_call("echo", b"hello from asyncio")
        async for event in client.watch(task_id):
            if event.kind == "state":
                print(f"  [{event.seq}] state {event.state} {event.node_name}")
            elif event.kind == "output":
                print(f"  [{event.seq}] {event.stream}: {event.data!r}")
            elif event.kind == "finished":
                print(f"  [{event.seq}] finished {event.task.state}: {event.task.output!r}")
        # Many at once: these run in parallel across the nodes' slots.
        digests = await asyncio.gather(*(client.call("sha256", str(i)) for i in range(8)))
        print("8 digests:", [d[:8].decode() for d in digests])


def main() -> None:
    parser = argparse.ArgumentParser(description="Weft Python client example")
    parser.add_argument("--coordinator", default=os.environ.get("WEFT_COORDINATOR", "127.0.0.1:7070"),
                        help="HOST:PORT (TLS, trusting $WEFT_CA), or http://HOST:PORT for an --insecure coordinator")
    args = parser.parse_args()
    try:
        blocking(args.coordinator)
        asyncio.run(with_asyncio(args.coordinator))
    except weft.Unavailable as e:
        sys.exit(f"coordinator unreachable at {args.coordinator}: {e}")


if __name__ == "__main__":
    main()
