"""Pacing of workers of different speeds: when a round ends and how much a lease holds.

Two policies, both computed from the workers' own heartbeat figures (WorkerStats.step_seconds and
tokens_per_second, smoothed per worker by `Rates`):

- **Rounds end together** (`round_time_cap`). A round of `round.steps` inner steps
  (`RoundConfig.steps_for`: shorter while 3 or more deltas merge per round, sent in every
  HeartbeatReply as `round_steps`; round.steps below means that length) also ends
  after `round.time_cap` x round.steps x the fastest worker's step time (seconds, sent in every
  HeartbeatReply as `round_seconds_cap`). The fastest worker still trains its round.steps; a worker
  at half its speed pushes after about half of them, at the same moment, so a semi-sync
  merge does not wait for the slowest and nobody's update lands tens of steps late (the dynamic
  local updates of Async Local-SGD). At equal speeds a worker a little slower than the fastest
  pushes a step or two early, with the others. The merges and their count stay paced by the
  fastest worker's round.steps, so the traffic does not change.
- **Leases sized by speed** (`lease_cap`). A lease holds what the worker trains in `LEASE_ROUNDS`
  rounds of the fastest worker (one round of steps until its speed is known), and near the end of
  a token budget at most what it trains in a quarter of the time everyone needs for what is left
  (guided self-scheduling), never less than `MIN_LEASE_STEPS` steps of the run's batch. A capped lease
  splits its unit (coordinator/ledger.py), so the rest is free for anyone at once. Slow and fast
  workers then run out of data at about the same time, instead of the others idling while the
  slowest finishes a whole unit it leased early.

Plain functions and one small class, no locking: coordinator/state.py calls them under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_LEASE_STEPS = 4  # the smallest lease, in steps of the run's batch (batch_size x block_size tokens)
LEASE_ROUNDS = 2  # a lease holds at most this many rounds of training at the fastest worker's speed
DEFAULT_ROUND_STEPS = 30  # rounds of steps assumed for leases when rounds are time-based
# Near the end a lease holds at most 1/END_SHARE of the time everyone needs for what is left: a
# worker holds two leases (the one it trains and the one it fetched ahead), so together at most
# half of it, and the leases shrink geometrically as the budget runs out.
END_SHARE = 4
SMOOTHING = 0.3  # weight of the newest heartbeat figure in a worker's running estimate


@dataclass
class Rates:
    """Each worker's smoothed step seconds and tokens/s, from its heartbeats (0 = not known yet)."""

    step_seconds: dict[str, float] = field(default_factory=dict)
    tokens_per_second: dict[str, float] = field(default_factory=dict)

    def observe(self, worker_id: str, step_seconds: float, tokens_per_second: float) -> None:
        """One heartbeat's figures over its interval; an interval without steps (0) is skipped."""
        for table, value in ((self.step_seconds, step_seconds), (self.tokens_per_second, tokens_per_second)):
            if value > 0:
                old = table.get(worker_id)
                table[worker_id] = value if old is None else (1 - SMOOTHING) * old + SMOOTHING * value

    def forget(self, worker_id: str) -> None:
        self.step_seconds.pop(worker_id, None)
        self.tokens_per_second.pop(worker_id, None)


def round_time_cap(step_seconds: list[float], round_steps: int, factor: float) -> float:
    """Seconds after which a step-based round ends anyway: factor x round_steps x the fastest of
    `step_seconds` (the workers training async now). 0 (no cap) for time-based rounds, factor 0,
    or fewer than two workers with a known step time (a lone worker has nobody to wait for)."""
    known = [s for s in step_seconds if s > 0]
    if round_steps <= 0 or factor <= 0 or len(known) < 2:
        return 0.0
    return factor * round_steps * min(known)


def lease_cap(worker_rate: float, rates: list[float], unleased: int | None, outstanding: int, step_tokens: int,
              round_steps: int) -> int:
    """The most tokens one lease to a worker may hold now (0 = no cap: a unit's whole free range).

    worker_rate: the asking worker's tokens/s (0 = not known yet); rates: every live worker's, the
    asking one's included (unknown ones count as the mean of the known); unleased: tokens of the
    budget not leased yet (None: no budget); outstanding: tokens leased and not committed yet;
    step_tokens: batch_size x block_size of the run; round_steps: round.steps (0 for time-based
    rounds: counted as DEFAULT_ROUND_STEPS). The cap is a multiple of step_tokens:

    - a worker whose speed is not known yet: one round of steps;
    - else its tokens/s x the shorter of LEASE_ROUNDS rounds of the fastest worker and 1/END_SHARE
      of the time the whole run needs to finish what is left ((unleased + outstanding) / everyone's
      tokens/s): a slower worker holds proportionally less, and near the end the leases shrink.
    """
    if step_tokens <= 0:
        return 0
    if not rates:
        raise ValueError("lease_cap needs the rates of the live workers, the asking one's included")
    steps = round_steps if round_steps > 0 else DEFAULT_ROUND_STEPS
    floor = MIN_LEASE_STEPS * step_tokens
    if worker_rate <= 0:
        return max(floor, steps * step_tokens)
    known = [r for r in rates if r > 0]
    mean = sum(known) / len(known)
    total = sum(r if r > 0 else mean for r in rates)
    seconds = LEASE_ROUNDS * steps * step_tokens / max(known)  # LEASE_ROUNDS rounds of the fastest
    if unleased is not None:
        seconds = min(seconds, (unleased + outstanding) / total / END_SHARE)
    cap = int(worker_rate * seconds) // step_tokens * step_tokens
    return max(floor, cap)
