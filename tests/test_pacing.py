"""Workers of different speeds (coordinator/pacing.py): rounds that end together, leases that
shrink near the end of the budget, through the real coordinator state and its gRPC servicer."""

from __future__ import annotations

import time

import pytest

from geotrain.common.config import RoundConfig
from geotrain.coordinator.ledger import Ledger
from geotrain.coordinator.pacing import END_SHARE, LEASE_ROUNDS, MIN_LEASE_STEPS, Rates, lease_cap, round_time_cap
from geotrain.coordinator.state import CoordinatorState
from geotrain.protos.rpc import PROTOCOL_VERSION
from geotrain.worker.rebase import RoundState
from tests.states import small_run


def test_round_time_cap_follows_the_fastest_worker():
    assert round_time_cap([0.4, 0.1, 0.2], 30, 1.25) == pytest.approx(1.25 * 30 * 0.1)
    assert round_time_cap([0.1], 30, 1.25) == 0.0  # a lone worker waits for nobody
    assert round_time_cap([0.0, 0.2], 30, 1.25) == 0.0  # one known step time is not a comparison
    assert round_time_cap([0.1, 0.2], 0, 1.25) == 0.0  # time-based rounds
    assert round_time_cap([0.1, 0.2], 30, 0.0) == 0.0  # switched off


def test_lease_cap_follows_each_workers_speed_and_halves_near_the_end():
    step, H = 768, 30
    rates = [1000.0, 1000.0, 500.0, 250.0]
    horizon = LEASE_ROUNDS * H * step / 1000.0  # seconds: LEASE_ROUNDS rounds of the fastest
    # far from the end: each worker holds what it trains in that time
    fast = lease_cap(1000.0, rates, 10_000_000, 0, step, H)
    slow = lease_cap(250.0, rates, 10_000_000, 0, step, H)
    assert fast == int(1000.0 * horizon) // step * step == LEASE_ROUNDS * H * step
    assert slow == int(250.0 * horizon) // step * step
    # near the end: half the time everyone needs for what is left (leased tokens included)
    left = 200_000
    near = lease_cap(1000.0, rates, left - 50_000, 50_000, step, H)
    assert near == int(1000.0 * left / 2750 / END_SHARE) // step * step < fast
    assert near % step == 0
    # never below MIN_LEASE_STEPS steps
    assert lease_cap(250.0, rates, 1000, 0, step, H) == MIN_LEASE_STEPS * step
    # speed not known yet: one round of steps
    assert lease_cap(0.0, [0.0, 1000.0], 10_000_000, 0, step, H) == H * step
    # no budget: the speed rule alone
    assert lease_cap(250.0, rates, None, 0, step, H) == slow
    with pytest.raises(ValueError, match="rates"):
        lease_cap(1000.0, [], 1000, 0, step, H)


def test_rates_smooth_and_skip_idle_intervals():
    r = Rates()
    r.observe("a", 0.2, 1000.0)
    r.observe("a", 0.0, 0.0)  # an interval without steps changes nothing
    assert r.step_seconds["a"] == 0.2 and r.tokens_per_second["a"] == 1000.0
    r.observe("a", 0.4, 500.0)
    assert 0.2 < r.step_seconds["a"] < 0.4 and 500.0 < r.tokens_per_second["a"] < 1000.0
    r.forget("a")
    assert "a" not in r.step_seconds and "a" not in r.tokens_per_second


def test_a_capped_lease_splits_its_unit_so_another_worker_takes_the_rest_at_once():
    ledger = Ledger([("a", 10_000)], unit_tokens=4096, block_size=16, max_tokens=9000)
    r = ledger.lease("w1", cap=1000)
    assert r is not None and r.end - r.start == 992  # whole blocks
    other = ledger.lease("w2", cap=0)  # before w1 commits: the rest of the unit is free
    assert other.unit_id != r.unit_id and other.start == r.end
    ledger.commit("w1", [r])
    ledger.commit("w2", [other])
    # the split units still tile the shard, and survive a checkpoint
    state = ledger.state_dict()
    again = Ledger([("a", 10_000)], unit_tokens=4096, block_size=16, max_tokens=9000)
    again.load_state_dict(state)
    assert [(u.start, u.end, u.committed) for u in again.units] == [(u.start, u.end, u.committed) for u in ledger.units]
    assert again.order == ledger.order
    with pytest.raises(ValueError, match="different data"):
        Ledger([("a", 20_000)], unit_tokens=4096, block_size=16).load_state_dict(state)


def test_capped_leases_commit_every_token_exactly_once():
    import random

    rng = random.Random(0)
    ledger = Ledger([("a", 5000), ("b", 3001)], unit_tokens=1024, block_size=16, max_tokens=0)
    seen: list[tuple[str, int, int]] = []
    held: dict[str, list] = {"w1": [], "w2": [], "w3": []}
    while True:
        w = rng.choice(list(held))
        if held[w] and rng.random() < 0.5:
            r = held[w].pop(0)
            ledger.commit(w, [r])
            seen.append((ledger.units[r.unit_id].shard, r.start, r.end))
            continue
        r = ledger.lease(w, cap=rng.choice([0, 16, 100, 500]))
        if r is None or r.epoch > 0:
            if not any(held.values()):
                break
            continue
        held[w].append(r)
    by_shard: dict[str, int] = {}
    for shard, start, end in sorted(seen):
        assert by_shard.get(shard, 0) == start  # no gap, no overlap
        by_shard[shard] = end
    assert by_shard == {"a": 4992 - 4992 % 16, "b": 3000 - 3000 % 16}


def test_round_ends_at_its_steps_or_at_the_coordinators_time_cap():
    rounds = RoundState.__new__(RoundState)  # only the round counters are used here
    rounds.round_steps, rounds.round_start = 3, time.monotonic() - 5.0
    steps = RoundConfig(steps=30)
    assert not rounds.round_over(steps)  # no cap: 3 of 30 steps
    assert not rounds.round_over(steps, 10.0)  # cap not reached
    assert rounds.round_over(steps, 4.0)  # 5 s > 4 s: the slower worker pushes now
    rounds.round_steps = 0
    assert not rounds.round_over(steps, 4.0)  # never an empty round
    rounds.round_steps = 30
    assert rounds.round_over(steps, 0.0)


def test_the_coordinators_round_length_decides_when_a_round_ends():
    rounds = RoundState.__new__(RoundState)
    rounds.round_steps, rounds.round_start = 26, time.monotonic()
    assert not rounds.round_over(RoundConfig(steps=32))  # the run's 32
    assert rounds.round_over(RoundConfig(steps=32), 0.0, 26)  # HeartbeatReply.round_steps


def test_rounds_shorten_from_three_merging_deltas_and_bad_scales_are_refused():
    r = RoundConfig(steps=32)
    assert [r.steps_for(n) for n in (0, 1, 2, 3, 4, 8)] == [32, 32, 32, 24, 24, 24]
    assert RoundConfig(steps=50, many_scale=0.5).steps_for(4) == 25
    assert RoundConfig(steps=32, many_scale=1.0).steps_for(4) == 32
    assert RoundConfig(steps=0, seconds=5.0).steps_for(4) == 0  # time-based rounds
    assert RoundConfig(steps=1, many_scale=0.1).steps_for(4) == 1
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="round.many_scale"):
            RoundConfig(many_scale=bad).validate()


def test_the_round_length_counts_async_workers_and_sync_groups(data, tmp_path):
    from geotrain.coordinator.service import CoordinatorServicer
    from geotrain.protos import geotrain_pb2 as pb

    now = [0.0]
    run = small_run(merge__policy="semi-sync")
    run.round.steps = 30
    state = CoordinatorState(run, data, tmp_path, clock=lambda: now[0])
    service = CoordinatorServicer(state)

    def reply(rec):
        return service.Heartbeat(pb.HeartbeatRequest(worker_id=rec.worker_id, session_id=rec.session_id), None)

    a, b = _join(state, "a"), _join(state, "b")
    assert reply(a).round_steps == 30  # a pair merges 2 deltas
    c = _join(state, "c")
    short = run.round.steps_for(3)
    assert short == round(30 * run.round.many_scale) < 30
    assert reply(a).round_steps == reply(c).round_steps == short  # 3 deltas
    state.leave(c.worker_id, c.session_id, "test")
    assert reply(a).round_steps == 30
    # four members of one sync group push one delta per round between them
    grouped = tmp_path / "grouped"
    state = CoordinatorState(run, data, grouped, clock=lambda: now[0])
    service = CoordinatorServicer(state)
    recs = [state.join(f"g{i}", "cpu", 0, "0", PROTOCOL_VERSION, "fp", f"127.0.0.1:{9000 + i}", "demo")[0]
            for i in range(4)]
    assert reply(recs[0]).round_steps == short  # not formed yet: 4 async workers
    now[0] += 5  # the settle time: the group forms
    assert all(state.group_assignment(r.worker_id) is not None for r in recs)
    assert reply(recs[0]).round_steps == 30


def _join(state, name):
    record, _ = state.join(name, "cpu", 0, "0", PROTOCOL_VERSION, "fp", "", "")
    return record


def test_the_coordinator_paces_rounds_and_shrinks_the_last_leases(data, tmp_path):
    run = small_run(merge__policy="semi-sync")
    run.round.steps = 30
    step_tokens = run.train.batch_size * run.model.block_size
    run.plan.max_tokens = 64 * step_tokens
    run.plan.unit_tokens = 64 * step_tokens
    state = CoordinatorState(run, data, tmp_path)
    fast, slow = _join(state, "fast"), _join(state, "slow")
    assert state.round_seconds_cap() == 0.0  # no step times yet
    state.heartbeat(fast.worker_id, fast.session_id, {"step_seconds": 0.1, "tokens_per_second": 4 * step_tokens})
    state.heartbeat(slow.worker_id, slow.session_id, {"step_seconds": 0.4, "tokens_per_second": step_tokens})
    assert state.round_seconds_cap() == pytest.approx(run.round.time_cap * 30 * 0.1)
    # the budget is one unit: uncapped, the fast worker would take all of it; it gets 1/END_SHARE
    # of the time everyone needs for the budget at its speed, the slow one a quarter of that
    budget = 64 * step_tokens
    _, r = state.lease(fast.worker_id, fast.session_id)
    assert r.end - r.start == int(4 * step_tokens * budget / (5 * step_tokens) / END_SHARE) // step_tokens * step_tokens
    _, r_slow = state.lease(slow.worker_id, slow.session_id)  # the rest of the split unit, at its speed
    assert r_slow.start == r.end and r_slow.unit_id != r.unit_id
    assert r_slow.end - r_slow.start == max(MIN_LEASE_STEPS * step_tokens,
                                            int(step_tokens * budget / (5 * step_tokens) / END_SHARE) // step_tokens * step_tokens)
    state.leave(slow.worker_id, slow.session_id, "test")
    assert state.round_seconds_cap() == 0.0  # alone again

    run.plan.guided_leases = False
    state2 = CoordinatorState(run, data, tmp_path / "unguided")
    w = _join(state2, "w")
    _, r = state2.lease(w.worker_id, w.session_id)
    assert r.end - r.start == 64 * step_tokens


def test_heartbeat_reply_carries_the_round_cap(data, tmp_path):
    from geotrain.coordinator.service import CoordinatorServicer
    from geotrain.protos import geotrain_pb2 as pb

    run = small_run(merge__policy="semi-sync")
    state = CoordinatorState(run, data, tmp_path)
    service = CoordinatorServicer(state)
    a, b = _join(state, "a"), _join(state, "b")
    service.Heartbeat(pb.HeartbeatRequest(worker_id=b.worker_id, session_id=b.session_id,
                                          stats=pb.WorkerStats(step_seconds=0.3)), None)
    reply = service.Heartbeat(pb.HeartbeatRequest(worker_id=a.worker_id, session_id=a.session_id,
                                                  stats=pb.WorkerStats(step_seconds=0.2)), None)
    assert reply.round_seconds_cap == pytest.approx(run.round.time_cap * run.round.steps * 0.2)


def test_a_time_cap_between_zero_and_one_is_refused():
    for bad in (0.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match="round.time_cap"):
            RoundConfig(time_cap=bad).validate()
    RoundConfig(time_cap=0.0).validate()
