"""The worker of weft.Executor's tests: the demo worker's flags and handlers (so
``--allow-module`` is the real flag), plus handlers registered with ``codec="json"``."""

from __future__ import annotations

import logging

import exec_funcs
from weft.worker_demo import build_worker, parser


async def json_echo(obj):
    """An asyncio JSON handler: answers what it got, wrapped."""
    return {"got": obj}


def main() -> None:
    args = parser("exec_worker.py").parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = build_worker(args)
    worker.register("json_sum", exec_funcs.json_sum, "process", codec="json")
    worker.register("json_echo", json_echo, codec="json")
    worker.register("parents_thread", exec_funcs.parents_seen, "thread")
    worker.register("parents_process", exec_funcs.parents_seen, "process")
    worker.run()


if __name__ == "__main__":
    main()
