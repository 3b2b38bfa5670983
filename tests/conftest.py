"""Fixtures shared by several test files (pytest finds them here; test files never import each
other). Building blocks that are plain functions live in modules beside this one: states.py
(CoordinatorState runs), groups.py (in-process all-reduce groups), procs.py (real processes),
tools.py (external binaries, live runs)."""

from __future__ import annotations

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
