"""Shared fixtures: where the binaries are, worker implementations, processes."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

SDK_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = SDK_DIR.parents[1]
EXAMPLES_DIR = REPO_DIR / "examples" / "python"


def bin_dir() -> Optional[Path]:
    """$WEFT_BIN_DIR, else <repo>/target/debug (None if neither exists)."""
    env = os.environ.get("WEFT_BIN_DIR")
    if env:
        return Path(env)
    default = REPO_DIR / "target" / "debug"
    return default if default.is_dir() else None


def binary(name: str) -> Optional[Path]:
    """The path of a Weft binary, or None when it is not built."""
    directory = bin_dir()
    if directory is not None and (directory / name).is_file() and os.access(directory / name, os.X_OK):
        return directory / name
    found = shutil.which(name)
    return Path(found) if found else None


def require_binary(name: str) -> Path:
    path = binary(name)
    if path is None and os.environ.get("WEFT_REQUIRE_BINARIES") == "1":
        pytest.fail(f"{name} binary not found in {bin_dir()} and WEFT_REQUIRE_BINARIES=1")
    if path is None:
        pytest.skip(
            f"{name} binary not found (build it with `cargo build --bins`, or set WEFT_BIN_DIR to the directory holding it)"
        )
    return path


#: Worker implementations under test: name -> argv builder (url, name,
#: slots, exec, join, state_dir). ``exec`` is "allow" or "deny" (``--exec``), or None for a check that
#: runs no exec task (the built-in workers then get "allow"; a custom command without ``{exec}`` its one
#: policy); ``join`` and
#: ``state_dir`` become ``--join TOKEN`` and ``--state-dir DIR``, as
#: ``weft-node`` takes them; with either, the built-in workers get no
#: ``--coordinator`` (the token, or the state dir, names the address).
WorkerCommand = Callable[..., List[str]]


def _node_flags(url: Optional[str], join: Optional[str], state_dir: Optional[str]) -> List[str]:
    # A joining worker takes the address from its token, a joined one from its state dir.
    flags = ["--coordinator", url] if url and not (join or state_dir) else []
    if join:
        flags += ["--join", join]
    if state_dir:
        flags += ["--state-dir", str(state_dir)]
    return flags


_HELP: Dict[str, str] = {}


def require_join(impl: str) -> None:
    """Skips the test when the worker under test cannot join yet (a
    ``weft-node`` built before it learned ``--join``)."""
    if impl != "weft-node":
        return
    node = str(require_binary("weft-node"))
    if "--join" not in _HELP.setdefault(node, subprocess.run([node, "--help"], capture_output=True, text=True,
                                                             timeout=30).stdout):
        pytest.skip(f"{node} takes no --join: it was built before weft-node learned to join (node/**); "
                    "rebuild it with node join to run the kit against it")


def _weft_node(url: Optional[str], name: str, slots: int, exec: Optional[str] = "allow", join: Optional[str] = None,
               state_dir: Optional[str] = None) -> List[str]:
    node = str(require_binary("weft-node"))
    if join or state_dir:
        require_join("weft-node")
    return [node, *_node_flags(url, join, state_dir), "--slots", str(slots), "--name", name, "--prefetch", "0",
            "--exec", exec or "allow"]


def _python_demo(url: Optional[str], name: str, slots: int, exec: Optional[str] = "allow", join: Optional[str] = None,
                 state_dir: Optional[str] = None) -> List[str]:
    return [sys.executable, "-m", "weft.worker_demo", *_node_flags(url, join, state_dir), "--slots", str(slots),
            "--name", name, "--exec", exec or "allow"]


def _python_example(url: Optional[str], name: str, slots: int, exec: Optional[str] = "allow",
                    join: Optional[str] = None, state_dir: Optional[str] = None) -> List[str]:
    return [sys.executable, str(EXAMPLES_DIR / "worker.py"), *_node_flags(url, join, state_dir), "--slots",
            str(slots), "--name", name, "--exec", exec or "allow"]


def custom_exec_policy() -> Optional[str]:
    """The custom worker's one exec policy when its command has no
    ``{exec}``: ``$WEFT_CONFORMANCE_EXEC``, ``allow`` or ``deny`` (the
    default: a handler-only worker); None when the command takes ``{exec}``."""
    if "{exec}" in os.environ.get("WEFT_CONFORMANCE_WORKER", ""):
        return None
    policy = os.environ.get("WEFT_CONFORMANCE_EXEC", "deny")
    if policy not in ("allow", "deny"):
        raise ValueError(f"WEFT_CONFORMANCE_EXEC={policy!r}: expected allow or deny")
    return policy


def _custom(url: Optional[str], name: str, slots: int, exec: Optional[str] = "allow", join: Optional[str] = None,
            state_dir: Optional[str] = None) -> List[str]:
    template = os.environ["WEFT_CONFORMANCE_WORKER"]
    fixed = custom_exec_policy()
    if fixed is not None and exec is not None and exec != fixed:
        pytest.skip(f"this check needs a worker that {'runs' if exec == 'allow' else 'refuses'} exec tasks; "
                    f"WEFT_CONFORMANCE_WORKER has no {{exec}} placeholder and WEFT_CONFORMANCE_EXEC is {fixed!r}")
    exec = exec or fixed or "allow"
    if "{join}" not in template or "{state_dir}" not in template:
        pytest.skip("WEFT_CONFORMANCE_WORKER has no {join} and {state_dir} placeholders (e.g. `--join {join} "
                    "--state-dir {state_dir}`): the kit authenticates nodes as a coordinator does")
    return shlex.split(template.format(url=url or "", name=name, slots=slots, exec=exec, join=join or "",
                                       state_dir=state_dir or ""))


WORKERS: Dict[str, WorkerCommand] = {
    "weft-node": _weft_node,
    "python-worker-demo": _python_demo,
    "python-example-worker": _python_example,
}
if os.environ.get("WEFT_CONFORMANCE_WORKER"):
    WORKERS["custom"] = _custom


class Proc:
    """A child process started by a test, killed at teardown."""

    def __init__(self, argv: List[str], log_path: Path, env: Optional[dict] = None):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env.setdefault("RUST_LOG", "info")
        for key, value in (env or {}).items():  # None: not inherited
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        # cwd: not the SDK's source folder, whose weft/ has no generated stubs.
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True, cwd=log_path.parent
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_exit(self, timeout: float) -> Optional[int]:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)
        self._log.close()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


@pytest.fixture
def spawn(tmp_path, request):
    """spawn(argv, name=..., env=...) -> Proc; every process is killed at teardown.

    On failure, each process's log is printed to help the reader.
    """
    procs: List[Proc] = []

    def start(argv: List[str], name: str = "proc", env: Optional[dict] = None) -> Proc:
        proc = Proc(argv, tmp_path / f"{name}-{len(procs)}.log", env)
        procs.append(proc)
        return proc

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for proc in procs:
        proc.kill()
        if failed:
            sys.stderr.write(f"\n----- log of {' '.join(proc.argv)} -----\n{proc.output()}\n")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


def poll(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Polls ``predicate()`` until it returns a truthy value (AssertionError after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def machine_busy_seconds() -> Optional[float]:
    """CPU seconds spent busy by the whole machine so far (None off Linux)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def check_parallel(trial, attempts: int = 3) -> None:
    """Asserts that two CPU-bound calls ran on two cores at once.

    ``trial()`` runs one call alone, then two at once, and returns
    ``(together, alone, wall)``: the CPU seconds the two got together, what
    the one got alone, and the wall time of the pair. On one core the two
    would share what one gets alone; on two, about twice that. When other
    work on the machine used a noticeable share of the CPUs during a trial
    (CFS groups our processes, so a busy machine caps them at a share), the
    trial proves nothing and is repeated; if every trial was disturbed the
    test is skipped, saying so.
    """
    results = []
    for _ in range(attempts):
        before = machine_busy_seconds()
        together, alone, wall = trial()
        after = machine_busy_seconds()
        others = None if before is None else max(0.0, (after - before) - together - alone)
        results.append((round(together, 2), round(alone, 2), None if others is None else round(others, 2)))
        if together > 1.3 * alone:
            return
        if others is None or others < 0.4 * wall:
            pytest.fail(f"two CPU-bound calls got {together:.2f}s of CPU together, one alone {alone:.2f}s: not in parallel ({results})")
    pytest.skip(f"the machine was too busy to measure parallelism (together, alone, others' CPU s): {results}")
