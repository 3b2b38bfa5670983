"""Membership: who is in the run, their sessions, and what is remembered of those who left.

Plain bookkeeping, no locking: coordinator/state.py calls it under its state lock. Contract:
- `admit` validates a join (protocol version, name, field lengths) and creates the record;
  a worker rejoining with its previous id keeps its merged pushes (so a FULL reply can name them).
- `session` authenticates (worker id, session secret) and renews the lease (last_seen = now).
- `remove` forgets a worker and keeps its last stats and merged pushes for the summary and a
  rejoin (bounded: 4 x workers.max_workers departed workers).
Leases of data, pending deltas and sync groups are not kept here: the facade composes those.
"""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Callable

from geotrain.common import __version__
from geotrain.common.config import WorkersConfig
from geotrain.coordinator.records import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, WorkerRecord
from geotrain.protos.rpc import PROTOCOL_VERSION

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Membership:
    def __init__(self, config: WorkersConfig, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}
        self.departed_stats: dict[str, dict[str, float]] = {}  # worker_id -> last stats, after it left
        self.departed_pushes: dict[str, list[tuple[int, str]]] = {}  # for a rejoin after a drop

    @staticmethod
    def check_join(name: str, protocol_version: int, **fields: str) -> None:
        """Refuse a join before any state is touched: FailedPrecondition on a protocol mismatch,
        InvalidArgument on a bad name or a field over 256 characters."""
        if protocol_version != PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"protocol version mismatch: worker speaks {protocol_version}, coordinator "
                f"{PROTOCOL_VERSION} (geotrain {__version__}); install the same geotrain version on both"
            )
        if not NAME_RE.match(name or ""):
            raise InvalidArgument(f"worker name {name[:80]!r} must match [A-Za-z0-9._-]{{1,64}}")
        for label, value in fields.items():
            if len(value) > 256:
                raise InvalidArgument(f"{label} is longer than 256 characters")

    def live(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if not w.left]

    def carried_pushes(self, previous_worker_id: str) -> list[tuple[int, str]]:
        """The merged pushes a rejoining worker keeps (from its live or departed record)."""
        carried = self.departed_pushes.pop(previous_worker_id, [])
        if previous_worker_id in self.workers:
            carried = self.workers[previous_worker_id].merged_pushes
        return carried

    def admit(self, name: str, device: str, memory_bytes: int, fingerprint: str, advertise: str, sync_group: str,
              previous_worker_id: str, carried: list[tuple[int, str]]) -> WorkerRecord:
        """A new record (the previous id kept when it is a valid one). ResourceExhausted when the
        run is full. The caller removed the previous record first."""
        live = self.live()
        if len(live) >= self.config.max_workers:
            raise ResourceExhausted(f"the run already has {len(live)} workers (max {self.config.max_workers})")
        now = self.clock()
        record = WorkerRecord(
            worker_id=previous_worker_id if previous_worker_id and NAME_RE.match(previous_worker_id) else uuid.uuid4().hex[:12],
            session_id=secrets.token_hex(16),
            name=name,
            device=device,
            memory_bytes=memory_bytes,
            fingerprint=fingerprint,
            advertise=advertise,
            sync_group=sync_group,
            joined_at=now,
            last_seen=now,
            merged_pushes=list(carried),
        )
        self.workers[record.worker_id] = record
        return record

    def session(self, worker_id: str, session_id: str) -> WorkerRecord:
        """The live record of (worker_id, session_id), its lease renewed; NotFound otherwise."""
        record = self.workers.get(worker_id)
        if record is None or not secrets.compare_digest(record.session_id, session_id) or record.left:
            raise NotFound(f"unknown worker or session {worker_id!r}: join again")
        record.last_seen = self.clock()
        return record

    def remove(self, worker_id: str) -> WorkerRecord | None:
        """Forget a worker, remembering its stats and merged pushes."""
        record = self.workers.pop(worker_id, None)
        if record is not None and record.stats:
            self.departed_stats[worker_id] = record.stats
        if record is not None and record.merged_pushes:
            self.departed_pushes[worker_id] = record.merged_pushes
            while len(self.departed_pushes) > 4 * self.config.max_workers:
                self.departed_pushes.pop(next(iter(self.departed_pushes)))
        return record

    def silent(self, now: float) -> list[WorkerRecord]:
        """Workers whose lease ran out (no call for workers.lease_seconds)."""
        return [w for w in self.workers.values() if now - w.last_seen > self.config.lease_seconds]

    def all_stats(self) -> list[dict[str, float]]:
        return [w.stats for w in self.workers.values() if w.stats] + list(self.departed_stats.values())
