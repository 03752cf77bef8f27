"""The SDK worker the Python paths benchmark runs: ``weft.Worker`` serving one
noop handler of one kind (``noop_asyncio``, ``noop_thread`` or
``noop_process``), and the functions of ``bench_tasks`` to ``weft.Executor``.

    python bench_worker.py --kind asyncio --slots 2 [weft-py-worker flags]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import weft  # noqa: E402

import bench_tasks  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True, help="coordinator URL")
    parser.add_argument("--ca-file", help="the coordinator's CA certificate")
    parser.add_argument("--join", help="a join token (weft token create --role node)")
    parser.add_argument("--state-dir", help="where the joined identity is kept")
    parser.add_argument("--kind", choices=["asyncio", "thread", "process"], required=True,
                        help="the kind of the noop handler it serves")
    parser.add_argument("--slots", type=int, default=2, help="slots (default 2)")
    parser.add_argument("--name", default=None, help="node name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = weft.Worker(args.coordinator, slots=args.slots, name=args.name or f"bench-{args.kind}",
                         ca_file=args.ca_file, join_token=args.join, state_dir=args.state_dir,
                         process_workers=args.slots, allow_modules=["bench_tasks"])
    fn = bench_tasks.noop_async if args.kind == "asyncio" else bench_tasks.noop_bytes
    worker.register(f"noop_{args.kind}", fn, args.kind)
    worker.run()


if __name__ == "__main__":
    main()
