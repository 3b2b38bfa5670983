"""Smoke runs of benchmarks/load.py and benchmarks/chaos.py with tiny settings: each script's own
checks must pass and it must exit 0 (the real runs are minutes long; see the scripts' docstrings).

Both start real processes on loopback. The load smoke takes ~20-30 s on 2 cores and runs by default;
the chaos smoke (~60 s: coordinator restarts cost a torch import each) is marked `slow` (-m slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from geotrain.common.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    prepare([root / "corpus.txt"], root / "tokens", progress=False, workers=1)
    return root / "tokens"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_load_smoke(tmp_path, data_dir):
    out = tmp_path / "load.json"
    _run(["benchmarks/load.py", "--workers", "4", "--seconds", "10", "--processes", "2", "--round-seconds", "0.5",
          "--data", str(data_dir), "--work-dir", str(tmp_path / "work"), "--out", str(out)], timeout=180)
    report = json.loads(out.read_text())["async"]
    assert report["ok"] and report["errors_total"] == 0
    assert report["accepted"] > 0 and report["latency_ms"]["push"]["n"] > 0
    assert report["coordinator_exit"] == 0


@pytest.mark.slow
def test_chaos_smoke(tmp_path, data_dir):
    out = tmp_path / "chaos.json"
    _run(["benchmarks/chaos.py", "--seconds", "30", "--workers", "2", "--seed", "3", "--mean-interval", "5",
          "--settle", "8", "--data", str(data_dir), "--work-dir", str(tmp_path / "work"), "--out", str(out)],
         timeout=240)
    report = json.loads(out.read_text())
    assert report["ok"], report["checks"]
    assert sum(report["kills"].values()) > 0
    assert report["ledger"]["committed_total"] > 0


def test_the_wait_probe_times_the_runner_methods_it_names(tmp_path):
    """benchmarks/wait_probe wraps WorkerRunner and StatsBook methods by name: a renamed method
    must fail here, not stop every worker of a benchmark at start-up."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks/wait_probe'); import sitecustomize as probe\n"
        f"probe._install({str(tmp_path)!r})\n"
        "from geotrain.worker.runner import WorkerRunner\n"
        "from geotrain.worker.metrics import StatsBook\n"
        "names = ('train_step', 'start_push', 'apply_inbox', 'run')\n"
        "assert all(getattr(WorkerRunner, n).__name__ != n for n in names), 'not wrapped'\n"
        "book = StatsBook(); book.add(wait_seconds=0.5)\n"
        "print(book.snapshot().wait_seconds)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0.5"
