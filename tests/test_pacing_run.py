"""Workers of different speeds in a real run (coordinator/pacing.py): a worker throttled to a
quarter of its speed (`worker --speed 0.25`) pushes with the fast one, after fewer steps, instead
of holding up every semi-sync merge for a whole round of its own."""

from __future__ import annotations

import pytest

from procs import Cluster, prepare_corpus, tiny_config

ROUND = 20
PUSHES = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), n_bytes=200_000)


def _steps_per_push(status: dict) -> dict[str, float]:
    return {w["name"]: w["stats"].get("steps", 0.0) / max(1, w["pushes"]) for w in status["worker_list"]}


@pytest.mark.parametrize("time_cap", [1.0, 0.0])
def test_a_slow_worker_pushes_with_the_fast_one(data_dir, tmp_path, time_cap):
    config = tiny_config(round__steps=ROUND, round__time_cap=time_cap, plan__max_tokens=4_000_000,
                         plan__unit_tokens=8192)
    with Cluster(tmp_path, data_dir, config) as c:
        c.start_coordinator()
        c.start_worker("fast")
        c.start_worker("slow", extra=["--speed", "0.25"])
        status = c.wait_status(
            lambda s: len(s["worker_list"]) == 2 and all(w["pushes"] >= PUSHES for w in s["worker_list"]),
            timeout=240, what=f"{PUSHES} pushes from each worker")
        per_push = _steps_per_push(status)
    # (steps come from the last heartbeat, pushes from now: a few steps per push too few at most)
    if time_cap:
        # the first rounds come before any step time is known; after that the slow worker's
        # rounds end with the fast one's, after about a quarter of the steps
        assert per_push["slow"] < 0.7 * ROUND, per_push
        assert per_push["fast"] > 0.7 * ROUND, per_push
        assert per_push["slow"] < 0.7 * per_push["fast"], per_push
    else:  # rounds of steps only: the slow worker trains whole rounds, the fast one waits past its own
        assert per_push["slow"] > 0.7 * ROUND, per_push
        assert per_push["fast"] > per_push["slow"], per_push
