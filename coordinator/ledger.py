"""The shard ledger: which training tokens have been merged into the global model.

The training split is cut into *units*: a contiguous range of *positions* of one shard, a multiple
of the block size. Position p trains the sequence slot `sequence_order(...)[p // block_size]`
(common/order.py): a seeded per-epoch shuffle of the shard's sequences, so a unit's batches mix
sequences from the whole shard while the ledger keeps simple prefixes. Each epoch visits every unit once, in a seeded random order. A worker leases a range
of a unit, trains it in order, and reports the trained sub-ranges with its delta; the ranges are
*committed* only when that delta is merged. So:

- a unit's committed part is always a prefix [start, committed);
- when a worker dies or leaves, its units are released and the next lease resumes at the committed
  cursor: tokens whose delta was lost are trained again, merged tokens are never handed out twice;
- every token of the split is committed exactly once per epoch (test_ledger.py checks it);
- when every unit of an epoch is done or held, the next epoch starts at once: a held unit keeps
  its epoch (`Unit.epoch`) until its lease ends, then joins the new one, so workers never wait at
  an epoch's border; at most two epochs are in flight.

`max_tokens` (0 = no limit) caps the tokens leased over the run; once it is spent, `lease` returns
None and the run finishes when every leased token is committed or released.

Plain module: no gRPC, no torch. Called by coordinator/state.py under its lock.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence


@dataclass
class Unit:
    unit_id: int
    shard: str
    start: int  # first token offset in the shard
    end: int  # one past the last input token; the target of token end-1 is token end
    committed: int  # tokens [start, committed) are merged this epoch
    holder: str = ""  # worker id holding the lease, "" when free
    lease_end: int = 0  # end of the leased range (<= end) while held
    epoch: int = 0  # the epoch `committed` counts in: the ledger's, or the one before while held

    @property
    def done(self) -> bool:
        return self.committed >= self.end


@dataclass(frozen=True)
class TrainedRange:
    """A sub-range a worker reports as trained: tokens [start, end) of unit `unit_id`."""

    unit_id: int
    start: int
    end: int
    epoch: int


class LedgerError(ValueError):
    """A report that does not fit the ledger (wrong holder, gap, overlap, unknown unit)."""


class Ledger:
    def __init__(
        self,
        shards: Sequence[tuple[str, int]],
        unit_tokens: int,
        block_size: int,
        seed: int = 0,
        max_tokens: int = 0,
    ):
        """shards: (name, token count) of the training split, in manifest order."""
        if unit_tokens < block_size or block_size <= 0:
            raise ValueError(f"unit_tokens ({unit_tokens}) must be >= block_size ({block_size}) > 0")
        self.block_size = block_size
        self.unit_tokens = unit_tokens - unit_tokens % block_size
        self.seed = seed
        if max_tokens < 0 or 0 < max_tokens < block_size:
            raise ValueError(f"max_tokens must be 0 (no limit) or at least one block ({block_size}), got {max_tokens}")
        # Whole sequences only: a remainder shorter than a block could never be leased, and the
        # run would wait for it forever.
        self.max_tokens = max_tokens - max_tokens % block_size
        self.units: list[Unit] = self._cut(shards)
        if not self.units:
            raise ValueError("the training split has no full block of tokens to train on")
        self.epoch = 0
        self.order: list[int] = self._order(0)
        self.committed_total = 0  # over all epochs
        self.leased_total = 0  # tokens handed out and not released (committed + outstanding)

    def _cut(self, shards: Sequence[tuple[str, int]]) -> list[Unit]:
        units: list[Unit] = []
        for name, count in shards:
            usable = count - 1  # the last token is only ever a target
            usable -= usable % self.block_size
            for start in range(0, usable, self.unit_tokens):
                end = min(start + self.unit_tokens, usable)
                units.append(Unit(len(units), name, start, end, start))
        return units

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.units)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    # ------------------------------------------------------------------ queries

    @property
    def epoch_tokens(self) -> int:
        return sum(u.end - u.start for u in self.units)

    def remaining_budget(self) -> int | None:
        if not self.max_tokens:
            return None
        return max(0, self.max_tokens - self.leased_total)

    def outstanding(self) -> int:
        """Tokens leased and not committed yet (trained or not)."""
        return sum(u.lease_end - u.committed for u in self.units if u.holder)

    def counts(self) -> dict[str, int]:
        """Units by state: pending (free, not done), leased, done."""
        out = {"pending": 0, "leased": 0, "done": 0}
        for u in self.units:
            out["done" if u.done else "leased" if u.holder else "pending"] += 1
        return out

    def held_by(self, worker_id: str) -> list[Unit]:
        return [u for u in self.units if u.holder == worker_id]

    def finished(self) -> bool:
        """True when the budget is spent and nothing leased is outstanding."""
        budget = self.remaining_budget()
        return budget == 0 and not any(u.holder for u in self.units)

    # ------------------------------------------------------------------ changes

    def lease(self, worker_id: str, cap: int = 0) -> TrainedRange | None:
        """Lease the next free range to `worker_id`; None when the token budget is spent.
        Starts a new epoch when every unit of this one is done. cap > 0: the range holds at most
        that many tokens (rounded down to whole blocks, at least one); the rest of the unit is
        leased again once this range is committed."""
        budget = self.remaining_budget()
        if budget == 0:
            return None
        unit = self._next_free()
        if unit is None:
            if any(u.epoch < self.epoch for u in self.units):
                return None  # two epochs in flight already: the older one's last units are held
            # Every unit of this epoch is done or held: start the next one now, and the held
            # units join it when their leases end (`_catch_up`), so no worker waits at the border.
            self._new_epoch()
            unit = self._next_free()
            if unit is None:
                return None  # every unit is held; caller retries later
        end = unit.end
        if budget is not None:
            room = budget - budget % self.block_size
            if room <= 0:
                return None
            end = min(end, unit.committed + room)
        if cap > 0 and unit.committed + max(self.block_size, cap - cap % self.block_size) < end:
            end = unit.committed + max(self.block_size, cap - cap % self.block_size)
            self._split(unit, end)  # the rest is a free unit of its own: another worker may take it now
        unit.holder = worker_id
        unit.lease_end = end
        self.leased_total += end - unit.committed
        return TrainedRange(unit.unit_id, unit.committed, end, unit.epoch)

    def _split(self, unit: Unit, at: int) -> None:
        """Cut `unit` at token `at` (a block boundary inside its uncommitted part): [at, end)
        becomes a new free unit, visited right after it in this epoch's order. The units still
        tile the shards, so every token is committed exactly once per epoch as before."""
        assert unit.committed <= at < unit.end and (at - unit.start) % self.block_size == 0
        tail = Unit(len(self.units), unit.shard, at, unit.end, at, epoch=unit.epoch)
        unit.end = at
        self.units.append(tail)
        self.order.insert(self.order.index(unit.unit_id) + 1, tail.unit_id)

    def _next_free(self) -> Unit | None:
        """A free unit with tokens left in its epoch: the previous epoch's first (a range a
        dead worker gave back), then this epoch's in its order."""
        for u in self.units:
            if not u.holder and u.epoch < self.epoch and not u.done:
                return u
        for idx in self.order:
            u = self.units[idx]
            if not u.holder and u.epoch == self.epoch and not u.done:
                return u
        return None

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.order = self._order(self.epoch)
        for u in self.units:
            if not u.holder:
                u.committed, u.epoch = u.start, self.epoch

    def _catch_up(self, u: Unit) -> None:
        """A unit of the previous epoch whose lease ended done joins the current epoch."""
        if not u.holder and u.epoch < self.epoch and u.done:
            u.committed, u.epoch = u.start, self.epoch

    def check(self, worker_id: str, ranges: Iterable[TrainedRange]) -> None:
        """Raise LedgerError unless `ranges` extend the committed prefixes of units `worker_id`
        holds, in order, without gaps or overlap. Changes nothing."""
        cursors: dict[int, int] = {}
        for r in ranges:
            if not 0 <= r.unit_id < len(self.units):
                raise LedgerError(f"unknown unit {r.unit_id}")
            u = self.units[r.unit_id]
            if u.holder != worker_id:
                raise LedgerError(f"unit {r.unit_id} is not leased to this worker")
            if r.epoch != u.epoch:
                raise LedgerError(f"unit {r.unit_id}: range from epoch {r.epoch}, the unit is at {u.epoch}")
            cursor = cursors.get(r.unit_id, u.committed)
            if r.start != cursor or not r.start < r.end <= u.lease_end:
                raise LedgerError(
                    f"unit {r.unit_id}: range [{r.start}, {r.end}) does not continue the committed "
                    f"cursor {cursor} within the lease end {u.lease_end}"
                )
            cursors[r.unit_id] = r.end

    def commit(self, worker_id: str, ranges: Sequence[TrainedRange]) -> int:
        """Commit trained ranges (after their delta merged). Returns tokens committed.
        A unit whose leased range is fully committed is released."""
        self.check(worker_id, ranges)
        total = 0
        for r in ranges:
            u = self.units[r.unit_id]
            u.committed = r.end
            total += r.end - r.start
            if u.committed >= u.lease_end:
                u.holder, u.lease_end = "", 0
                self._catch_up(u)
        self.committed_total += total
        return total

    def release(self, worker_id: str) -> int:
        """The worker is gone: free its units at their committed cursors. Returns tokens returned."""
        returned = 0
        for u in self.held_by(worker_id):
            returned += u.lease_end - u.committed
            u.holder, u.lease_end = "", 0
        self.leased_total -= returned
        return returned

    def release_all(self) -> None:
        """After a coordinator restart no lease survives: every holder is gone."""
        for u in self.units:
            if u.holder:
                self.leased_total -= u.lease_end - u.committed
                u.holder, u.lease_end = "", 0

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        return {
            "units": [asdict(u) for u in self.units],
            "epoch": self.epoch,
            "order": list(self.order),
            "seed": self.seed,
            "unit_tokens": self.unit_tokens,
            "block_size": self.block_size,
            "max_tokens": self.max_tokens,
            "committed_total": self.committed_total,
            "leased_total": self.leased_total,
        }

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint written before units kept their own epoch: all were at the ledger's
        units = [Unit(**{"epoch": int(state["epoch"]), **u}) for u in state["units"]]
        if _coverage(units) != _coverage(self.units) or any(u.unit_id != i for i, u in enumerate(units)):
            raise ValueError("checkpointed ledger was cut from different data (shards or unit size differ)")
        self.units = units
        self.epoch = int(state["epoch"])
        self.order = state.get("order") or self._order(self.epoch)
        self.committed_total = int(state["committed_total"])
        self.leased_total = int(state["leased_total"])


def _coverage(units: Sequence[Unit]) -> list[tuple[str, int, int]]:
    """The token ranges the units cover, adjacent ones joined: (shard, start, end) sorted. Equal
    for a ledger as cut and the same ledger after any splits."""
    out: list[tuple[str, int, int]] = []
    for shard, start, end in sorted((u.shard, u.start, u.end) for u in units):
        if out and out[-1][0] == shard and out[-1][2] == start:
            out[-1] = (shard, out[-1][1], end)
        else:
            out.append((shard, start, end))
    return out
