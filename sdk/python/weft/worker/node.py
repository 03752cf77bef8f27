"""The :class:`Worker`: what a program builds and runs. It holds the
settings and the handler registry, starts and ends serving (pools, reaper,
signals), and supervises a drain.

The counterpart of ``node/src/lib.rs`` (``start``, ``RunningNode``). It
wires the parts together and owns none of their logic: the stream is
``session.py``'s, reconnecting ``reconnect.py``'s, outgoing messages
``outbox.py``'s, attempts ``attempt.py``'s, slot counts ``slots.py``'s,
handlers ``handlers.py``'s and the reaper ``reaper.py``'s. Nothing in those modules imports this one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Callable, List, Mapping, Optional, Union

from .._channel import coordinator_url, parse_addresses, parse_target
from .._pool import ProcessPool
from .._proto import node_pb2
from ..models import DurationLike, parse_duration
from ..policy import parse_resources
from .attempt import Attempts, HandlerThreads
from .exec_policy import ExecPolicy, ExecSetting
from .handlers import Handler, Handlers
from .identity import Identity, check_name, load, state_dir_of
from .join import JoinToken
from .lease import Lease, watch as watch_lease
from .outbox import Outbox
from .pickled import HANDLER as PICKLED, handler as pickled_handler
from .reaper import Reaper
from .reconnect import run as reconnect
from .session import Sessions
from .slots import Slots, default_prefetch

log = logging.getLogger("weft.worker")


class Worker:
    """A node that serves registered Python functions (and, when allowed,
    exec tasks).

    ``coordinator``: address like ``127.0.0.1:7070`` or
    ``https://127.0.0.1:7070`` (TLS, the default) or ``http://...`` (a
    coordinator started with ``--insecure``); default ``$WEFT_COORDINATOR``;
    a malformed one is a ValueError here, not a retry loop later. Several,
    comma-separated (coordinators that take over from each other): the
    worker dials them in turn, the next at once when a session ends, and
    backs off only after all of them failed in a row
    (:attr:`coordinators`).
    ``ca_file`` / ``ca_pin``: how the coordinator's certificate is trusted,
    as for :class:`weft.Client` (defaults ``$WEFT_CA`` / ``$WEFT_CA_PIN``). ``slots``: how many slots of work it takes at
    once (default: number of CPUs). ``labels``: key=value pairs tasks can
    require. ``resources``: numeric resources it offers beyond slots, e.g.
    ``{"gpu": 2, "mem": "32GiB"}`` (``weft-node --resource``), declared in
    Register; tasks that ask for resources are placed only where that much is
    free. ``process_workers``: size of the process pool (default: slots).
    ``drain_grace``: how long running attempts may finish when draining on a
    signal or a Drain without a grace. ``exec``: whether it runs exec tasks
    (shell commands anyone who may submit can send): ``"deny"`` (the
    default: handlers only), ``"allow"`` (any program, as this process's
    user), or a list of programs (bare names or absolute paths, matched
    against ``argv[0]`` exactly, as ``weft-node --exec-allow`` does). It is
    declared in Register, so the coordinator never assigns this worker an
    exec task it refuses; one assigned anyway is reported START_FAILED and
    never run.

    ``prefetch`` (default ``$WEFT_NODE_PREFETCH``, else 256 per slot; the
    setting of ``weft-node --prefetch``): the most attempts, in slots, it holds queued
    beyond its slots, so the next task is already here when a slot frees
    (never more than ``slots`` run at once). It is a ceiling: the worker
    holds only what covers ~20 ms of refill at the average run time it has
    seen (none before its first attempt ends; about one per slot for tasks
    of 20 ms and more), so long tasks stay spread over the nodes. 0
    disables it. Queued attempts are listed in Register after a reconnect,
    a cancelled one is reported CANCELLED without running, and a drain
    reports them all CANCELLED at once (the coordinator gives them to other
    nodes).

    ``lease``: how long running attempts go on while nothing is heard from
    the coordinator (``weft-node --lease``); past it the coordinator has
    given them to other nodes, so they are stopped (reported CANCELLED on
    the next session). Default: the coordinator's heartbeat timeout.

    ``allow_modules``: serve :class:`weft.Executor`'s pickled calls
    (``weft.pickle``, see ``weft/worker/pickled.py``) of functions in these
    modules only, run as ``pickle_kind`` handlers (default ``"process"``);
    anyone who may submit can then call any of their functions.

    ``join_token`` (default ``$WEFT_JOIN_TOKEN``): a join token
    (``weft token create --role node``). The worker checks the coordinator
    against the token's CA pin, makes its own key, and trades the token
    for a certificate naming its node id (``NodeService.Join``), kept with
    the key in ``state_dir`` (default ``$WEFT_NODE_STATE_DIR``, else
    ``weft-node-state``; the layout of ``weft-node --state-dir``). A worker
    whose state dir holds an identity needs no token (one given is
    ignored, as by ``weft-node``): it connects with its certificate as its
    name, and renews it over its session. The
    coordinator address defaults to the one in the token (or the state
    dir). A malformed token is a ValueError here; a refused one
    (``weft.Unauthenticated``), a coordinator that is not the one the pin
    names (ValueError) or a revoked node (``weft.PermissionDenied``) ends
    :meth:`serve` with that error.
    """

    def __init__(
        self,
        coordinator: Optional[str] = None,
        *,
        slots: Optional[int] = None,
        labels: Optional[Mapping[str, str]] = None,
        resources: Optional[Mapping[str, Union[int, str]]] = None,
        name: Optional[str] = None,
        drain_grace: DurationLike = 30.0,
        reconnect_min: DurationLike = 0.1,
        reconnect_max: DurationLike = 5.0,
        process_workers: Optional[int] = None,
        thread_workers: Optional[int] = None,
        exec: ExecSetting = "deny",
        ca_file: Optional[str] = None,
        ca_pin: Optional[str] = None,
        join_token: Optional[str] = None,
        state_dir: Optional[str] = None,
        prefetch: Optional[int] = None,
        lease: Optional[DurationLike] = None,
        allow_modules: Optional[List[str]] = None,
        pickle_kind: str = "process",
    ):
        token_text = join_token if join_token is not None else os.environ.get("WEFT_JOIN_TOKEN", "")
        self.join_token: Optional[JoinToken] = JoinToken.parse(token_text) if token_text.strip() else None
        self.state_dir = state_dir_of(state_dir)
        self.identity: Optional[Identity] = load(self.state_dir)
        if self.identity is not None and self.join_token is not None:
            # As weft-node: a node that joined needs its token no more.
            log.info("this node already joined (its identity is in %s): the join token is not needed and is "
                     "ignored", self.state_dir)
        joined_at = (self.identity.coordinator if self.identity is not None
                     else self.join_token.address if self.join_token is not None else None)
        #: The coordinator addresses, dialed in turn (:meth:`next_coordinator`).
        self.coordinators: List[str] = parse_addresses(
            coordinator_url(coordinator or os.environ.get("WEFT_COORDINATOR") or joined_at))
        self._coordinator_index = 0
        if joined_at is not None and not all(parse_target(c)[1] for c in self.coordinators):
            if self.join_token is not None:
                raise ValueError(f"{','.join(self.coordinators)} is plaintext: a node that joins connects over TLS with its "
                                 "certificate (https://HOST:PORT or HOST:PORT)")
            log.warning("%s is plaintext: the identity in %s is not used", ",".join(self.coordinators),
                        self.state_dir)
            self.identity = None
        if self.identity is not None and name and name != self.identity.name:
            raise ValueError(f"the state dir {self.state_dir} holds node '{self.identity.name}', not '{name}': "
                             "drop the name, or use another state dir (state_dir= / WEFT_NODE_STATE_DIR)")
        self.ca_file = ca_file
        self.ca_pin = ca_pin
        self._slots = Slots(int(slots if slots is not None else (os.cpu_count() or 1)))
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        self._slots.prefetch = self._prefetch_of(prefetch)
        if self._slots.prefetch < 0:
            self._slots.prefetch = default_prefetch(self.slots)
        self.lease = parse_duration(lease) if lease is not None else None
        if self.lease is not None and self.lease <= 0:
            raise ValueError(f"lease must be positive, not {lease!r} (leave it unset for the coordinator's heartbeat "
                             "timeout)")
        self.labels = dict(labels or {})
        self.resources = parse_resources(resources or {}, "resources")
        if self.identity is not None:
            self.name = self.identity.name
        else:
            self.name = name or f"{socket.gethostname()}-py{os.getpid()}"
        if self.join_token is not None:
            check_name(self.name)
        self.drain_grace = parse_duration(drain_grace)
        self.reconnect_min = parse_duration(reconnect_min)
        self.reconnect_max = parse_duration(reconnect_max)
        self._process_workers = process_workers or self.slots
        self._thread_workers = thread_workers or self.slots
        self._handlers = Handlers()
        if allow_modules:
            self._handlers.register(PICKLED, pickled_handler(allow_modules), pickle_kind)
        self._outbox = Outbox()
        self.exec_policy = ExecPolicy(exec)
        self._lease = Lease(self.lease)
        self._attempts = Attempts(self._handlers, self._slots, self._outbox, self.exec_policy, self._lease)
        self._sessions = Sessions(self, self._attempts, self._outbox, self._slots, self.start_drain, self._spawn)
        self._drain_task: Optional[asyncio.Task] = None
        self._stopped: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._tasks: set = set()

    @property
    def coordinator(self) -> str:
        """The coordinator address the next session dials."""
        return self.coordinators[self._coordinator_index]

    def next_coordinator(self) -> None:
        """Moves on to the next coordinator address (round-robin)."""
        self._coordinator_index = (self._coordinator_index + 1) % len(self.coordinators)

    @property
    def slots(self) -> int:
        """How many slots of work it takes at once."""
        return self._slots.total

    @slots.setter
    def slots(self, total: int) -> None:
        self._slots.total = total

    @property
    def prefetch(self) -> int:
        """The most attempts (in slots) it holds queued beyond its slots."""
        return self._slots.prefetch

    @staticmethod
    def _prefetch_of(prefetch: Optional[int]) -> int:
        if prefetch is None:
            text = os.environ.get("WEFT_NODE_PREFETCH", "").strip()
            if not text:
                return -1  # the default, once the slots are known
            try:
                prefetch = int(text)
            except ValueError:
                raise ValueError(f"WEFT_NODE_PREFETCH must be a whole number of slots, not {text!r}") from None
        if isinstance(prefetch, bool) or not isinstance(prefetch, int):
            raise TypeError(f"prefetch must be an int, not {type(prefetch).__name__}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 (no prefetch) or more, not {prefetch}")
        return prefetch

    # -- registration -------------------------------------------------------

    def register(self, name: str, fn: Callable, kind: Optional[str] = None, codec: str = "bytes") -> Handler:
        """Registers ``fn`` as the handler ``name``.

        ``kind`` is ``"asyncio"`` (default for ``async def``), ``"thread"``
        (default for plain functions) or ``"process"`` (CPU-bound work; the
        function must be importable: defined at module level). ``codec``:
        ``"bytes"`` (the input as bytes) or ``"json"`` (the input decoded
        from JSON, the result encoded to JSON; input that is not JSON fails
        the task to start).
        """
        return self._handlers.register(name, fn, kind, codec)

    def handler(self, name: Optional[str] = None, *, kind: Optional[str] = None, codec: str = "bytes") -> Callable:
        """Decorator form of :meth:`register`; the name defaults to the function's."""

        def decorate(fn: Callable) -> Callable:
            self.register(name or fn.__name__, fn, kind, codec)
            return fn

        return decorate

    @property
    def handlers(self) -> List[str]:
        """Names of the registered handlers."""
        return self._handlers.names()

    @property
    def node_id(self) -> str:
        """The node id the coordinator gave this worker (a joined worker's
        own before it registers; else "" before registering)."""
        return self._sessions.node_id or (self.identity.node_id if self.identity is not None else "")

    # -- running ------------------------------------------------------------

    def run(self) -> None:
        """Serves until drained. SIGTERM/SIGINT drain; a second signal exits at once."""
        asyncio.run(self._run_with_signals())

    async def _run_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("signal received: draining (again to exit at once)")
                self.start_drain()
            else:
                log.warning("second signal: exiting at once")
                self._kill_everything()
                os._exit(130)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):
                pass
        await self.serve()

    async def serve(self) -> None:
        """Connects, serves, reconnects; returns once the worker has drained."""
        self._loop = asyncio.get_running_loop()
        self._outbox.start()
        self._stopped = asyncio.Event()
        self._sessions.start()
        threads = HandlerThreads(self._thread_workers, self._loop)
        processes = ProcessPool(self._process_workers) if self._handlers.any_process() else None
        reaper = Reaper()
        self._attempts.start(self._loop, self._spawn, threads, processes, reaper)
        self._spawn(watch_lease(self._lease, self._lease_expired, self._sessions.lost_lease))
        try:
            await reconnect(self._sessions, self, self._slots, self._stopped)
        finally:
            self._stopped.set()
            self._kill_everything()
            for task in list(self._tasks):
                task.cancel()
            threads.shutdown()
            reaper.close()

    async def registered(self, timeout: Optional[float] = None) -> str:
        """Waits until the first Registered; returns the node id."""
        while self._sessions.registered_once is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(self._sessions.registered_once.wait(), timeout)
        return self.node_id

    def start_drain(self, grace: Optional[DurationLike] = None) -> None:
        """Starts draining (like SIGTERM): no new work, finish or cancel, close, stop."""
        if self._slots.draining or self._loop is None:
            return
        self._attempts.set_draining()
        grace_s = self.drain_grace if grace is None else parse_duration(grace)
        self._outbox.control(node_pb2.NodeMessage(draining=node_pb2.Draining()))
        self._drain_task = self._spawn(self._drain(grace_s))

    async def drain(self, grace: Optional[DurationLike] = None) -> None:
        """Drains and waits until the worker has stopped."""
        self.start_drain(grace)
        if self._stopped is not None:
            await self._stopped.wait()

    def stop(self) -> None:
        """Stops at once, like a crash: kills running work, reports nothing."""
        self._kill_everything()
        if self._stopped is not None:
            self._stopped.set()
        self._sessions.drop()

    # -- inside -------------------------------------------------------------

    def _lease_expired(self, detail: str) -> int:
        return self._attempts.stop_all("cancelled", detail)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain(self, grace: float) -> None:
        attempts = self._attempts
        log.info("draining: %d running, grace %.1fs", len(attempts.table), grace)
        deadline = time.monotonic() + grace
        while attempts.any_running() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for attempt in list(attempts.table.values()):
            attempts.stop(attempt, "cancelled", "node drained past its grace period")
        while attempts.any_running():
            await asyncio.sleep(0.02)
        # Let the queued events go out, then close the stream and stop.
        session = self._sessions.current
        if session is not None and session.registered.is_set():
            self._outbox.close()
            flush_deadline = time.monotonic() + 5.0
            while self._outbox.closing and time.monotonic() < flush_deadline:
                await asyncio.sleep(0.01)
            # Give the coordinator a moment to end its side after our half-close.
            end_deadline = time.monotonic() + 2.0
            while self._sessions.current is session and time.monotonic() < end_deadline:
                await asyncio.sleep(0.01)
            if self._sessions.current is session and session.call is not None:
                session.dropped = True
                session.call.cancel()
        log.info("drained")
        self._stopped.set()
        self._sessions.drop()

    def _kill_everything(self) -> None:
        self._attempts.kill_all()
        if self._attempts.processes is not None:
            self._attempts.processes.shutdown()
