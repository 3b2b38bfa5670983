"""Sync-group formation: which workers train as one power-of-two synchronous group.

Plain bookkeeping, no I/O and no locking: `CoordinatorState` calls it under its own lock.

- A worker that joins with `sync_group` NAME (or "auto": key = its config fingerprint) waits in the
  pending set of its key and trains as an ordinary async worker meanwhile.
- `tick()` (called on every assignment query) forms a group for a key once at least 2 of its
  members are pending and no new one has arrived for `settle_s` (so that 4 workers started together
  form one group of 4, not two of 2): the largest power of two of them, oldest (or, after a loss,
  lowest previous rank) first. The rest stay pending, i.e. async, with a log line saying so; they
  form a further group of the same key once they are 2 or more.
- A group is identified on the wire by group_id "<key>#<epoch>" and its epoch (unique, increasing).
  Rank 0 is the member that pulls basepoints and pushes the group's deltas; only it may push.
  Each group incarnation gets a random secret that only its members receive (with the
  assignment): their Peer calls carry it instead of the run token, so a worker that holds the run
  token but is not a member cannot talk to the group.
- A member lost (dropped by the coordinator: lease expired, left, rejoined) or a reported
  `PeerFailure` dissolves the group: the other members go back to pending and re-form, after the
  settle time, as the largest power of two of those still there (or stay async). Members that the
  reporter did not list as survivors are suspended (excluded from formation) until they report the
  failure themselves (then they are alive and know the group is gone) or join again.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_SETTLE_S = 2.0


@dataclass(frozen=True)
class Assignment:
    """One member's view of its group (what HeartbeatReply.group carries)."""

    group_id: str
    epoch: int
    rank: int
    world_size: int
    peers: tuple[str, ...]  # advertised "host:port" of every member, in rank order
    secret: str = ""        # the group's peer secret (hex), the same for every member


@dataclass
class _Member:
    worker_id: str
    key: str
    advertise: str
    order: float             # join time, or a re-form priority (lower first)
    pending_since: float
    group: str | None = None  # group_id while in a group
    active: str = ""          # the group the worker says it trains in (HeartbeatRequest.active_group_id)
    suspended: bool = False


@dataclass
class _Group:
    group_id: str
    key: str
    epoch: int
    members: list[str] = field(default_factory=list)  # worker ids in rank order
    secret: str = field(default_factory=lambda: secrets.token_hex(32))  # Peer calls' bearer (256 bits)


def group_key(sync_group: str, fingerprint: str) -> str:
    """The formation key: the group name, or "auto:<fingerprint>" for --sync-group auto."""
    return f"auto:{fingerprint}" if sync_group == "auto" else sync_group


class GroupFormation:
    def __init__(self, settle_s: float = DEFAULT_SETTLE_S, clock: Callable[[], float] = time.monotonic):
        self.settle_s, self.clock = settle_s, clock
        self.members: dict[str, _Member] = {}
        self.groups: dict[str, _Group] = {}
        self._epoch = 0
        self._told_async: set[tuple[str, str]] = set()  # (worker, reason) already logged

    # ------------------------------------------------------------------ membership

    def add(self, worker_id: str, sync_group: str, fingerprint: str, advertise: str) -> None:
        """A worker joined with --sync-group (a rejoin replaces its old entry)."""
        self.remove(worker_id, "rejoined")
        now = self.clock()
        key = group_key(sync_group, fingerprint)
        self.members[worker_id] = _Member(worker_id, key, advertise, order=now, pending_since=now)
        if not advertise:
            log.warning("worker %s asked for sync group %r but advertises no address: it trains async", worker_id, key)

    def remove(self, worker_id: str, why: str = "lost") -> None:
        """A worker is gone; its group (if any) dissolves and the others re-form."""
        member = self.members.pop(worker_id, None)
        if member is not None and member.group is not None:
            self._dissolve(member.group, f"member {worker_id} {why}")

    def report_failure(self, worker_id: str, group_id: str, epoch: int, survivor_ranks: list[int]) -> None:
        """A member's all-reduce failed (PeerFailure). Dissolve the group if it is still current;
        suspend the members the reporter did not see alive. A report for an old group only tells
        that the reporter is alive: it is un-suspended."""
        member = self.members.get(worker_id)
        if member is None:
            return
        member.suspended = False
        group = self.groups.get(group_id)
        if group is None or group.epoch != epoch or worker_id not in group.members:
            return
        alive = {group.members[r] for r in survivor_ranks if 0 <= r < len(group.members)} | {worker_id}
        for other in group.members:
            if other not in alive and other in self.members:
                self.members[other].suspended = True
        self._dissolve(group_id, f"member {worker_id} reported a peer failure (survivors {sorted(survivor_ranks)})")

    def _dissolve(self, group_id: str, why: str) -> None:
        group = self.groups.pop(group_id, None)
        if group is None:
            return
        now = self.clock()
        back = []
        for rank, wid in enumerate(group.members):
            member = self.members.get(wid)
            if member is not None:
                member.group, member.pending_since, member.order = None, now, rank - 1e6  # keep rank order
                back.append(wid)
        log.warning("sync group %s dissolved (%s); %d members re-form or train async meanwhile: %s", group_id, why, len(back), back)

    # ------------------------------------------------------------------ formation

    def tick(self) -> None:
        now = self.clock()
        by_key: dict[str, list[_Member]] = {}
        for m in self.members.values():
            if m.group is None and not m.suspended and m.advertise:
                by_key.setdefault(m.key, []).append(m)
        for key, pending in by_key.items():
            if len(pending) < 2:
                for m in pending:
                    self._tell_async(m, "no other member of its sync group is waiting")
                continue
            if now - max(m.pending_since for m in pending) < self.settle_s:
                continue
            pending.sort(key=lambda m: (m.order, m.worker_id))
            size = 1 << (len(pending).bit_length() - 1)
            chosen, extra = pending[:size], pending[size:]
            self._epoch += 1
            group = _Group(f"{key}#{self._epoch}", key, self._epoch, [m.worker_id for m in chosen])
            self.groups[group.group_id] = group
            for m in chosen:
                m.group = group.group_id
                self._told_async.discard((m.worker_id, "extra"))
            log.info("sync group %s formed: %d members %s (rank 0 = %s)", group.group_id, size, group.members, group.members[0])
            for m in extra:
                self._tell_async(m, f"beyond the largest power of two ({size}) of group {key!r}", "extra")

    def _tell_async(self, m: _Member, reason: str, tag: str | None = None) -> None:
        tag = tag or reason
        if (m.worker_id, tag) not in self._told_async:
            self._told_async.add((m.worker_id, tag))
            log.info("worker %s keeps training as an async worker: %s", m.worker_id, reason)

    # ------------------------------------------------------------------ queries

    def assignment(self, worker_id: str) -> Assignment | None:
        """The worker's current group (forming groups first), or None: train async."""
        self.tick()
        member = self.members.get(worker_id)
        if member is None or member.group is None:
            return None
        group = self.groups[member.group]
        return Assignment(
            group.group_id, group.epoch, group.members.index(worker_id), len(group.members),
            tuple(self.members[w].advertise for w in group.members), group.secret,
        )

    def group_of(self, worker_id: str) -> str | None:
        """The group the worker is assigned to now (None: async)."""
        member = self.members.get(worker_id)
        return None if member is None else member.group

    def set_active(self, worker_id: str, group_id: str) -> None:
        member = self.members.get(worker_id)
        if member is not None:
            member.active = group_id

    def rank_of(self, worker_id: str) -> int | None:
        """The worker's rank in the group it trains in (it confirmed it in a heartbeat), None when
        it trains async or has not switched yet (its async pushes are still welcome then)."""
        member = self.members.get(worker_id)
        if member is None or member.group is None or member.active != member.group:
            return None
        return self.groups[member.group].members.index(worker_id)
