"""Step throttle: make a worker train at a fraction of its host's speed (demo and benchmarks only).

`worker --speed S` (0 < S <= 1; `geotrain demo --speeds 1,1,0.5,0.25` gives each worker its own)
stretches every inner step to 1/S of its measured duration by sleeping after it, so a worker with
S = 0.25 trains a quarter as many tokens per second as it could: a stand-in for a slower GPU when
every worker shares one machine. The sleep counts as step time (the worker's tokens/s falls with
S), not as waiting on the network. S = 1 (the default) never sleeps.

On a shared CPU the sleeping worker also gives its cores to the others, and the scheduler favours
a process that wakes from a sleep, so the run's workers keep the ratios of S only roughly (4 workers
at 1, 1, 0.5, 0.25 on 2 busy cores: 763, 874, 401, 207 tokens/s of training), and not at all on a
badly oversubscribed machine (a worker at 0.25 beside one at 1 once trained more tokens than it);
benchmarks report each worker's own tokens/s rather than assume S.
"""

from __future__ import annotations

import time


def parse_speeds(text: str, workers: int) -> list[float]:
    """The relative speed of each of `workers` workers from "1,1,0.5,0.25" ("" = all 1.0).

    ValueError (naming the value) unless there is one number per worker, each in (0, 1]."""
    if not text.strip():
        return [1.0] * workers
    try:
        speeds = [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--speeds must be comma-separated numbers, got {text!r}") from None
    if len(speeds) != workers:
        raise ValueError(f"--speeds needs one speed per worker ({workers}), got {len(speeds)} in {text!r}")
    for s in speeds:
        if not 0 < s <= 1:
            raise ValueError(f"--speeds: every speed must be in (0, 1], got {s:g} in {text!r}")
    return speeds


def stretch_step(started: float, speed: float, sleep=time.sleep, clock=time.monotonic) -> float:
    """Sleep so that a step begun at `started` (time.monotonic() seconds) lasts 1/speed of the time
    it took so far; returns the seconds slept (0 for speed 1). Called by the worker's training loop
    right after each optimizer step, before it measures the step's duration."""
    if speed >= 1.0:
        return 0.0
    if speed <= 0:
        raise ValueError(f"speed must be in (0, 1], got {speed!r}")
    pause = (clock() - started) * (1.0 / speed - 1.0)
    if pause > 0:
        sleep(pause)
    return max(0.0, pause)
