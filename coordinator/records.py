"""The coordinator's errors and plain records, shared by its modules (no logic, no locking).

Errors are `CoordinatorError` subclasses carrying the gRPC status name coordinator/service.py
answers with. Records: a member (`WorkerRecord`), a queued delta (`PendingDelta`), a published
version (`UpdateRecord` and its parts) and what the RPCs return (`PushOutcome`, `ModelReply`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import BinaryIO, Container, Iterator

from geotrain.coordinator.ledger import TrainedRange


# --------------------------------------------------------------------------- errors


class CoordinatorError(Exception):
    status = "INTERNAL"


class InvalidArgument(CoordinatorError):
    status = "INVALID_ARGUMENT"


class NotFound(CoordinatorError):
    status = "NOT_FOUND"


class FailedPrecondition(CoordinatorError):
    status = "FAILED_PRECONDITION"


class AlreadyExists(CoordinatorError):
    status = "ALREADY_EXISTS"


class ResourceExhausted(CoordinatorError):
    status = "RESOURCE_EXHAUSTED"


# --------------------------------------------------------------------------- members and deltas


@dataclass
class WorkerRecord:
    worker_id: str
    session_id: str
    name: str
    device: str
    memory_bytes: int
    fingerprint: str
    advertise: str
    sync_group: str
    joined_at: float
    last_seen: float
    stats: dict[str, float] = field(default_factory=dict)
    pushes: int = 0
    merged_tokens: int = 0
    left: bool = False
    merged_pushes: list[tuple[int, str]] = field(default_factory=list)  # (version, push id), last 32
    last_lease: tuple[str, bool, TrainedRange | None] | None = None  # (request id, exhausted, range)


@dataclass
class PendingDelta:
    """A validated delta waiting for its merge, kept as pushed (compressed): the merge decodes it
    a tensor at a time (coordinator/merger.py), so no decoded copy is held per worker. Has the
    fields common/merge.py merge_weights reads (tokens, base_version)."""

    push_id: str
    worker_id: str
    base_version: int
    tokens: int
    steps: int
    mean_loss: float
    ranges: list[TrainedRange]
    blob: bytes  # the payload exactly as the worker pushed it
    factor: float = 1.0  # the outlier gate's clip factor
    norm: float = 0.0  # L2 norm of the decoded delta
    magnitudes: list[float] | None = None  # per tensor (model order): the one |value| of a +-scale tensor; None: not
    # every tensor is one (the delta cannot join a count merge)


# --------------------------------------------------------------------------- versions


@dataclass
class RelayedDelta:
    """One delta inside a replayed version: a pushed delta as it was pushed (downlink "relay"), or
    the merge's combined delta (downlink "combine", weight 1, factor 1)."""

    push_id: str
    blob: bytes  # the payload exactly as the worker pushed it
    weight: float  # its merge weight (common/merge.py::merge_weights)
    factor: float  # the outlier gate's clip factor


@dataclass
class CountedRecord:
    """A count merge (downlink "count"): N "tsign" deltas with the same scales and weight."""

    push_ids: list[str]
    blobs: list[bytes]  # as pushed, in merge order (the count payloads are computed from them)
    weight: float
    scales: list[float]  # per tensor, the model's tensor order
    majority: bool = False  # k = N x sign(sum of signs); payloads are votes (common/counts.py)
    payloads: dict[str, bytes] = field(default_factory=dict)  # reference push id ("" = plus counts) -> payload


@dataclass
class UpdateRecord:
    """One version: global(version) = global(version - 1) + U, where U is decode(blob) (a plain
    update) or, when `relayed` is set, the replay of the merge: OuterOptimizer.update(
    weighted_sum(decoded deltas, factors, weights), fraction=outer_fraction)."""

    version: int
    blob: bytes
    merged_push_ids: list[str]
    params_sha256: str
    relayed: list[RelayedDelta] = field(default_factory=list)
    outer_fraction: float = 1.0
    counted: CountedRecord | None = None

    def wire_size(self, held: Container[str] = ()) -> int:
        """Bytes on the wire for a worker that holds the pushes in `held` (omitted when relayed;
        for a count merge, an upper bound: the blobs' sign bits, about what the counts pack to)."""
        if self.counted is not None:
            return max(len(b) for b in self.counted.blobs)
        if not self.relayed:
            return len(self.blob)
        return sum(len(r.blob) for r in self.relayed if r.push_id not in held)

    def held_bytes(self) -> int:
        """Bytes this record keeps in memory (blobs and computed count payloads)."""
        n = len(self.blob) + sum(len(r.blob) for r in self.relayed)
        if self.counted is not None:
            n += sum(len(b) for b in self.counted.blobs) + sum(len(p) for p in self.counted.payloads.values())
        return n


@dataclass
class UpdateSlice:
    """Where a record lies in a reply's blob: the record's bytes start at `offset`; for a
    relayed record, `parts` gives each delta's (offset, size), size 0 when omitted (held)."""

    record: UpdateRecord
    offset: int
    size: int
    parts: list[tuple[int, int]] = field(default_factory=list)
    reference: str = ""  # for a count merge: the requester's push the counts refer to ("" = plus counts)


# --------------------------------------------------------------------------- replies


@dataclass
class PushOutcome:
    accepted: bool
    version: int
    staleness: int
    message: str = ""


@dataclass
class ModelReply:
    """What GetModel streams: `total_bytes` bytes with sha256 `sha256`. UPDATES: the bytes are the
    `segments` back to back (the history's blobs themselves, never concatenated: a relayed merge
    of N deltas sent to N workers would otherwise copy N x (N - 1) blobs at once). FULL: the
    bytes are the file `file` (opened for this reply and read with pread, so a newer version
    replacing it on disk does not change what this reply streams)."""

    kind: str  # "FULL" | "UPDATES" | "UNCHANGED"
    version: int
    segments: list[bytes]
    params_sha256: str
    updates: list[UpdateSlice]
    merged_push_ids: list[str] = field(default_factory=list)  # for FULL: the caller's pushes since have_version
    momentum_bytes: int = 0  # for FULL under downlink "relay": the blob's tail is the outer momentum
    file: BinaryIO | None = None
    size: int = 0
    sha256: str = ""

    @property
    def total_bytes(self) -> int:
        return self.size if self.file is not None else sum(len(s) for s in self.segments)

    def chunks(self, size: int) -> Iterator[bytes]:
        """The reply's bytes in pieces of at most `size` bytes, in order (no copy of the whole)."""
        if self.file is not None:
            for offset in range(0, self.size, size):
                yield os.pread(self.file.fileno(), min(size, self.size - offset), offset)
            return
        for segment in self.segments:
            view = memoryview(segment)
            for offset in range(0, len(view), size):
                yield bytes(view[offset : offset + size])

    @property
    def blob(self) -> bytes:
        """The whole reply in memory (tests and small models; the server streams chunks())."""
        return b"".join(self.chunks(1 << 24))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
