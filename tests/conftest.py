"""Fixtures shared by several test files (pytest finds them here; test files never import each
other). Building blocks that are plain functions live in modules beside this one: states.py
(CoordinatorState runs), groups.py (in-process all-reduce groups), procs.py (real processes),
tools.py (external binaries, live runs)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from geotrain.common.prepare import prepare
from geotrain.common.reader import TokenData


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TokenData:
    """A prepared byte-token corpus of one repeated English sentence (~135k tokens): enough units
    for several leases of states.small_run(); module-scoped, it is prepared once per test file."""
    root = tmp_path_factory.mktemp("data")
    (root / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3000)
    prepare([root / "a.txt"], root / "tokens", progress=False)
    return TokenData(root / "tokens")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A prepared byte-token corpus of random short lines over a 13-word vocabulary (seed 0, 3000
    lines): the reference trainer's and the Hugging Face tests' data directory."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "to"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000))
    (root / "text.txt").write_text(text)
    prepare([root / "text.txt"], root / "data", progress=False)
    return root / "data"
