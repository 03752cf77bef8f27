"""The Python paths benchmark (``sdk/python/benchmarks/python_paths.py``) still
runs end to end: every path starts its processes, checks every result and
reports a figure. A smoke test on small counts; its numbers mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import SDK_DIR, require_binary

HARNESS = SDK_DIR / "benchmarks" / "python_paths.py"


def test_every_python_path_runs_and_checks_its_results(tmp_path):
    bin_dir = require_binary("weft-coordinator").parent
    require_binary("weft-node")
    require_binary("weft")
    answer = subprocess.run(
        [sys.executable, str(HARNESS), "--bin-dir", str(bin_dir), "--quick", "--tasks", "300", "--chunksize", "30",
         "--output", "json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert answer.returncode == 0, answer.stderr[-4000:]
    report = json.loads(answer.stdout)
    figures = {f["path"]: f for f in report["figures"]}
    assert set(figures) == {"ppe", "ppe-chunked", "rust-client", "sdk-client", "worker-asyncio", "worker-thread",
                            "worker-process", "executor"}, figures
    for path, figure in figures.items():
        assert figure["tasks_per_s"] > 0, f"{path} reported no throughput: {figure}"


def test_a_path_the_harness_does_not_know_is_a_usage_error(tmp_path):
    answer = subprocess.run([sys.executable, str(HARNESS), "--only", "ppe,nope"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert answer.returncode == 2
    assert "unknown path 'nope'" in answer.stderr
