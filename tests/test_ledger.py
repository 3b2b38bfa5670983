"""The shard ledger: every training token is committed exactly once per epoch, none lost."""

import random

import pytest

from geotrain.coordinator.ledger import Ledger, LedgerError, TrainedRange

SHARDS = [("a", 1000), ("b", 333), ("c", 65)]


def covered(ledger: Ledger) -> list[tuple[str, int, int]]:
    return sorted((u.shard, u.start, u.end) for u in ledger.units)


def train_range(r: TrainedRange, step: int) -> list[TrainedRange]:
    """Split a leased range into per-step sub-ranges, as a worker reports them."""
    out, cursor = [], r.start
    while cursor < r.end:
        nxt = min(r.end, cursor + step)
        out.append(TrainedRange(r.unit_id, cursor, nxt, r.epoch))
        cursor = nxt
    return out


def test_units_cover_each_shard_in_blocks():
    ledger = Ledger(SHARDS, unit_tokens=100, block_size=16)
    for u in ledger.units:
        assert (u.end - u.start) % 16 == 0 and u.end <= dict(SHARDS)[u.shard] - 1
    # shard a: 999 usable -> 992 in blocks of 16; unit size 96
    assert sum(u.end - u.start for u in ledger.units if u.shard == "a") == 992


def test_every_token_committed_exactly_once_per_epoch_with_failures():
    ledger = Ledger(SHARDS, unit_tokens=64, block_size=16, seed=3)
    rng = random.Random(0)
    seen: dict[tuple[str, int], int] = {}
    workers = ["w1", "w2", "w3"]
    epoch_tokens = ledger.epoch_tokens
    while ledger.epoch == 0:
        w = rng.choice(workers)
        r = ledger.lease(w)
        if r is None:
            for other in workers:  # someone else holds the rest: let them finish or die
                ledger.release(other)
            continue
        pieces = train_range(r, 16)
        if rng.random() < 0.3:  # worker dies after training part: nothing committed
            ledger.release(w)
            continue
        ledger.commit(w, pieces)
        if ledger.epoch == 0:
            for p in pieces:
                unit = ledger.units[p.unit_id]
                for t in range(p.start, p.end):
                    key = (unit.shard, t)
                    seen[key] = seen.get(key, 0) + 1
        if all(u.done for u in ledger.units):
            break
    assert all(count == 1 for count in seen.values())
    assert len(seen) == epoch_tokens


def test_released_unit_resumes_at_committed_cursor():
    ledger = Ledger([("a", 1001)], unit_tokens=1000, block_size=10)
    r = ledger.lease("w1")
    pieces = train_range(r, 100)
    ledger.commit("w1", pieces[:3])  # 300 tokens merged
    assert ledger.release("w1") == 700
    r2 = ledger.lease("w2")
    assert (r2.unit_id, r2.start, r2.end) == (r.unit_id, 300, 1000)


def test_commit_refuses_gaps_overlaps_and_foreign_units():
    ledger = Ledger([("a", 1001)], unit_tokens=500, block_size=10)
    r = ledger.lease("w1")
    with pytest.raises(LedgerError, match="does not continue"):
        ledger.commit("w1", [TrainedRange(r.unit_id, r.start + 10, r.start + 20, 0)])
    with pytest.raises(LedgerError, match="not leased to this worker"):
        ledger.commit("w2", [TrainedRange(r.unit_id, r.start, r.start + 10, 0)])
    with pytest.raises(LedgerError, match="unknown unit"):
        ledger.commit("w1", [TrainedRange(99, 0, 10, 0)])
    ledger.commit("w1", [TrainedRange(r.unit_id, r.start, r.start + 10, 0)])
    with pytest.raises(LedgerError):  # replaying the same range is an overlap
        ledger.commit("w1", [TrainedRange(r.unit_id, r.start, r.start + 10, 0)])
    assert ledger.committed_total == 10


def test_budget_caps_leases_and_finishes():
    ledger = Ledger([("a", 10_001)], unit_tokens=1000, block_size=10, max_tokens=2500)
    leased = []
    while (r := ledger.lease("w1")) is not None:
        leased.append(r)
    assert sum(r.end - r.start for r in leased) == 2500
    assert not ledger.finished()
    for r in leased:
        ledger.commit("w1", [r])
    assert ledger.finished() and ledger.committed_total == 2500


def test_a_budget_that_is_not_whole_sequences_still_finishes():
    """300,000 tokens at block 64: the last 32 can never be leased; the budget is 299,968 and the
    run finishes (it used to wait for those 32 forever)."""
    ledger = Ledger([("a", 1_000_001)], unit_tokens=65536, block_size=64, max_tokens=300_000)
    leased = []
    while (r := ledger.lease("w1")) is not None:
        leased.append(r)
    assert sum(r.end - r.start for r in leased) == 299_968 and ledger.remaining_budget() == 0
    for r in leased:
        ledger.commit("w1", [r])
    assert ledger.finished()
    with pytest.raises(ValueError, match="at least one block"):
        Ledger([("a", 1000)], unit_tokens=100, block_size=64, max_tokens=10)


def test_state_round_trip_and_mismatch():
    ledger = Ledger(SHARDS, unit_tokens=64, block_size=16, seed=1)
    r = ledger.lease("w1")
    ledger.commit("w1", train_range(r, 16)[:1])
    state = ledger.state_dict()
    again = Ledger(SHARDS, unit_tokens=64, block_size=16, seed=1)
    again.load_state_dict(state)
    assert again.state_dict() == state
    other = Ledger([("z", 500)], unit_tokens=64, block_size=16)
    with pytest.raises(ValueError, match="different data"):
        other.load_state_dict(state)


def test_the_next_epoch_starts_while_the_last_units_of_this_one_are_held():
    ledger = Ledger([("a", 1000)], unit_tokens=256, block_size=16)
    held = []
    while (r := ledger.lease("slow")) is not None and r.epoch == 0:
        held.append(r)
    # every unit of epoch 0 is held by "slow": another worker gets epoch 1 at once
    assert r is None  # all units held, none free in either epoch
    ledger.commit("slow", [held[0]])
    nxt = ledger.lease("fast")
    assert nxt is not None and nxt.epoch == 1 and nxt.unit_id == held[0].unit_id
    # the held units finish epoch 0, then join epoch 1
    ledger.commit("slow", held[1:])
    assert all(u.epoch == 1 for u in ledger.units)
    with pytest.raises(LedgerError, match="epoch"):
        ledger.check("fast", [TrainedRange(nxt.unit_id, nxt.start, nxt.end, 0)])


def test_every_token_once_per_epoch_across_epoch_borders_with_split_leases_and_failures():
    rng = random.Random(7)
    ledger = Ledger(SHARDS, unit_tokens=100, block_size=16)
    usable = {name: (n - 1) - (n - 1) % 16 for name, n in SHARDS}
    commits: dict[int, list[tuple[str, int, int]]] = {}
    held: dict[str, list[TrainedRange]] = {"w1": [], "w2": [], "w3": []}
    for _ in range(3000):
        w = rng.choice(list(held))
        roll = rng.random()
        if held[w] and roll < 0.45:
            r = held[w].pop(0)
            cut = r.start + rng.randrange(1, (r.end - r.start) // 16 + 1) * 16  # trains a prefix, or all
            part = TrainedRange(r.unit_id, r.start, cut, r.epoch)
            ledger.commit(w, [part])
            commits.setdefault(r.epoch, []).append((ledger.units[r.unit_id].shard, r.start, cut))
            if cut < r.end:
                held[w].insert(0, TrainedRange(r.unit_id, cut, r.end, r.epoch))
        elif roll < 0.5:  # the worker dies: its leases go back at their committed cursors
            ledger.release(w)
            held[w] = []
        else:
            r = ledger.lease(w, cap=rng.choice([0, 16, 48, 160]))
            if r is not None:
                held[w].append(r)
    assert ledger.epoch >= 3
    for epoch in range(ledger.epoch - 1):  # the finished epochs: each token once
        ends: dict[str, int] = {}
        for shard, start, end in sorted(commits[epoch]):
            assert ends.get(shard, 0) == start, (epoch, shard, start)
            ends[shard] = end
        assert ends == usable, epoch
