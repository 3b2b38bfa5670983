"""benchmarks/gpu_check.py: skips cleanly without CUDA; its checks run end to end on CPU (smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA: the script would run")
def test_skips_without_cuda():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("gpu_check: skipped, CUDA is not available")


@pytest.mark.slow  # ~40 s on 2 busy cores
def test_cpu_smoke_runs_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["results"]
    checks = {r["check"]: r for r in rows}
    assert checks["trainer"]["tokens_per_second"] > 0 and checks["trainer"]["micro_batch"] == 2
    assert checks["memory"]["fits"] and checks["memory"]["loss"] > 0
    assert checks["dropout"]["different_workers_differ"] and checks["dropout"]["same_worker_repeats"]
    assert "dropout 0.1: two workers' masks differ" in result.stdout
