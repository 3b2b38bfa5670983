"""The coordinator's state machine: membership, the global model, merges, the ledger, checkpoints.

Plain module (no gRPC): coordinator/service.py decodes requests and calls these methods; errors are
`CoordinatorError` subclasses carrying the gRPC status name the servicer returns. One lock guards
all state; expensive work (decoding a pushed blob, evaluation, writing checkpoints) runs outside it.

Who calls what:
- service.py: join / heartbeat / leave / lease / model_stream / shard_path / push / status
- server.py: `tick()` every 0.5 s (lease expiry, semi-sync timeouts, checkpoints, evaluation,
  finishing), `checkpoint()` at shutdown.

Failure policies:
- worker silent for `workers.lease_seconds`: dropped; its pending delta is discarded and its leased
  tokens return to the pool at their committed cursor (trained again by someone else).
- push too stale (> merge.max_staleness versions): STALE result; the worker keeps the progress in its
  weights and sends it again after rebasing.
- push based on a version this coordinator never had (it restarted from an older checkpoint):
  FAILED_PRECONDITION; the worker resyncs.
- malformed / non-finite / outlier delta: INVALID_ARGUMENT, nothing changes.
- duplicate push id (a retried upload that had in fact arrived): ALREADY_EXISTS, nothing changes.
- restart: state comes back from the newest verifiable checkpoint; sessions do not survive, so
  workers get NOT_FOUND, join again and resync (their unmerged progress is retrained).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import statistics
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container

import numpy as np
import torch

from geotrain.common import __version__
from geotrain.common.checkpoint import load_latest_checkpoint, save_checkpoint
from geotrain.common.compression import ErrorFeedback, decode_tensors, encode_tensors, get_codec
from geotrain.common.config import (
    REPLAYED_DOWNLINKS, SEMI_SYNC_TIMEOUT_FACTOR, SEMI_SYNC_TIMEOUT_MIN_S, ModelConfig, RunConfig,
)
from geotrain.common.reader import TokenData
from geotrain.common.hellaswag import evaluate_hellaswag, read_examples
from geotrain.common.hf import initial_model
from geotrain.common.model import GPT
from geotrain.protos.rpc import PROTOCOL_VERSION
from geotrain.common.tensors import clone_tensors, global_norm, model_tensors, params_sha256, tensor_spec
from geotrain.coordinator.groups import Assignment, GroupFormation
from geotrain.coordinator.ledger import Ledger, LedgerError, TrainedRange
from geotrain.common.counts import encode_counts
from geotrain.common.merge import (
    Contribution,
    NormGate,
    OuterOptimizer,
    counted_mean,
    merge_weights,
    negative_signs,
    weighted_sum,
)

log = logging.getLogger(__name__)

COUNT_TOKEN_SPREAD = 1.5  # downlink "count": deltas within this token ratio are weighed equally
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
EVAL_SEED = 20_231_105


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


# --------------------------------------------------------------------------- records


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


@dataclass
class UpdateSlice:
    """Where a record lies in a reply's blob: the record's bytes start at `offset`; for a
    relayed record, `parts` gives each delta's (offset, size), size 0 when omitted (held)."""

    record: UpdateRecord
    offset: int
    size: int
    parts: list[tuple[int, int]] = field(default_factory=list)
    reference: str = ""  # for a count merge: the requester's push the counts refer to ("" = plus counts)


@dataclass
class PushOutcome:
    accepted: bool
    version: int
    staleness: int
    message: str = ""


@dataclass
class ModelReply:
    kind: str  # "FULL" | "UPDATES" | "UNCHANGED"
    version: int
    blob: bytes
    params_sha256: str
    updates: list[UpdateSlice]
    merged_push_ids: list[str] = field(default_factory=list)  # for FULL: the caller's pushes since have_version
    momentum_bytes: int = 0  # for FULL under downlink "relay": the blob's tail is the outer momentum


# --------------------------------------------------------------------------- state


class CoordinatorState:
    def __init__(
        self,
        run: RunConfig,
        data: TokenData,
        run_dir: Path,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.run = run.validate()
        self._order_cache: dict = {}  # (shard, epoch) -> (tokens memmap, visiting order): shard_sequences
        self.data = data
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics
        self.clock = clock
        self.lock = threading.RLock()
        self.version_changed = threading.Condition(self.lock)

        # model.init_from: Hugging Face GPT-2 weights instead of the seed's (common/hf.py)
        self.model_config, initial = initial_model(run.model, data.vocab_size, data.manifest.tokenizer.get("name", ""))
        self.hellaswag = (read_examples(run.eval.hellaswag_file, run.eval.hellaswag_examples or None)
                          if run.eval.hellaswag_file else None)  # eval.hellaswag_file, checked at start
        torch.manual_seed(run.train.seed)
        self.eval_model = GPT(self.model_config)
        if initial is not None:
            self.eval_model.load_state_dict(initial)
        self.global_params = clone_tensors(model_tensors(self.eval_model))
        self.spec = tensor_spec(self.global_params)
        self.num_params = sum(t.numel() for t in self.global_params.values())
        self.outer = OuterOptimizer(run.outer, self.spec)
        self.gate = NormGate(run.merge)
        self.groups = GroupFormation(clock=self.clock)  # sync groups (coordinator/groups.py)
        self.down_feedback = ErrorFeedback(get_codec(run.compression.down_scheme, run.compression.chunk))
        train_shards = [(s.name, s.tokens) for s in data.manifest.shards if s.split == "train"]
        self.ledger = Ledger(
            train_shards,
            unit_tokens=run.plan.unit_tokens,
            block_size=self.model_config.block_size,
            seed=run.train.seed,
            max_tokens=run.plan.max_tokens,
        )

        self.run_id = uuid.uuid4().hex[:12]
        self.version = 1  # the initial model; have_version 0 on the wire means "nothing yet"
        self.params_sha = params_sha256(self.global_params)
        # Version 1 is built from the seed: a worker that rebuilds it bit-identically (same seed,
        # same torch init) skips the first full download (run_spec "initial_sha256").
        # Imported weights cannot be rebuilt from the seed: "" makes every worker download them.
        self.initial_sha = self.params_sha if initial is None else ""
        self.history: deque[UpdateRecord] = deque()  # trimmed in _merge: see _history_limit
        self.full_blob_cache: tuple[int, bytes, int] | None = None  # (version, blob, momentum bytes)
        self.workers: dict[str, WorkerRecord] = {}
        self.pending: list[Contribution] = []
        self.first_pending_at: float | None = None
        self.seen_push_ids: OrderedDict[str, None] = OrderedDict()
        self.round_times: deque[float] = deque(maxlen=16)
        self.last_merge_at = self.clock()
        self.train_loss = float("nan")
        self.val_loss = float("nan")
        self.contributors: set[str] = set()
        self.departed_stats: dict[str, dict[str, float]] = {}  # worker_id -> last stats, after it left
        self.departed_pushes: dict[str, list[tuple[int, str]]] = {}  # for a rejoin after a drop
        self.sent_bytes = 0
        self.received_bytes = 0
        self.seconds_before_restart = 0.0
        self.started_at = self.clock()
        self.state = "training"
        self.last_checkpoint_version = self.version
        self.last_checkpoint_at = self.clock()
        self.checkpoint_wall_time = time.time()
        self.evaluating = False
        self.last_eval_version = -1
        self.final_summary: dict | None = None
        self.restored_from: Path | None = None
        self._restore()
        self._write_run_json()

    # ------------------------------------------------------------------ helpers

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def elapsed(self) -> float:
        return self.seconds_before_restart + (self.clock() - self.started_at)

    def _metric(self, name: str, *labels: str) -> Any:
        if self.metrics is None:
            return None
        metric = getattr(self.metrics, name)
        return metric.labels(*labels) if labels else metric

    def _session(self, worker_id: str, session_id: str) -> WorkerRecord:
        record = self.workers.get(worker_id)
        if record is None or not secrets.compare_digest(record.session_id, session_id) or record.left:
            raise NotFound(f"unknown worker or session {worker_id!r}: join again")
        record.last_seen = self.clock()
        return record

    def run_spec(self, step_offset: int) -> str:
        return json.dumps(
            {
                "run": self.run.to_dict(),
                "model": self.model_config.to_dict(),
                "manifest": json.loads(self.data.manifest.to_json()),
                "batch_tokens": self.run.train.batch_size * self.model_config.block_size,
                "step_offset": step_offset,
                "initial_sha256": self.initial_sha,
            }
        )

    # ------------------------------------------------------------------ membership

    def join(
        self,
        name: str,
        device: str,
        memory_bytes: int,
        software_version: str,
        protocol_version: int,
        fingerprint: str,
        advertise: str,
        sync_group: str,
        previous_worker_id: str = "",
    ) -> tuple[WorkerRecord, str]:
        """Register a worker. Returns its record and the run spec JSON."""
        if protocol_version != PROTOCOL_VERSION:
            raise FailedPrecondition(
                f"protocol version mismatch: worker speaks {protocol_version}, coordinator "
                f"{PROTOCOL_VERSION} (geotrain {__version__}); install the same geotrain version on both"
            )
        if not NAME_RE.match(name or ""):
            raise InvalidArgument(f"worker name {name[:80]!r} must match [A-Za-z0-9._-]{{1,64}}")
        for label, value in (("device", device), ("fingerprint", fingerprint), ("advertise", advertise), ("sync_group", sync_group)):
            if len(value) > 256:
                raise InvalidArgument(f"{label} is longer than 256 characters")
        with self.lock:
            carried = self.departed_pushes.pop(previous_worker_id, [])
            if previous_worker_id in self.workers:
                carried = self.workers[previous_worker_id].merged_pushes
                self._drop(previous_worker_id, "rejoined")
                self.departed_pushes.pop(previous_worker_id, None)
            live = [w for w in self.workers.values() if not w.left]
            if len(live) >= self.run.workers.max_workers:
                raise ResourceExhausted(f"the run already has {len(live)} workers (max {self.run.workers.max_workers})")
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
            if sync_group:
                self.groups.add(record.worker_id, sync_group, fingerprint, advertise)
            self._update_worker_gauge()
            log.info("worker %s (%s, %s) joined at version %d", record.name, record.worker_id, device, self.version)
            return record, self.run_spec(self._step_offset())

    def _step_offset(self) -> int:
        """Where a newly joined worker starts its learning-rate schedule: the run's progress as a
        fraction of max_tokens, in inner steps of max_iters (0 without a token budget)."""
        if not self.run.plan.max_tokens:
            return 0
        fraction = self.ledger.committed_total / self.run.plan.max_tokens
        return int(min(1.0, fraction) * self.run.train.max_iters)

    def heartbeat(self, worker_id: str, session_id: str, stats: dict[str, float]) -> tuple[str, int]:
        """Renew the lease; returns (action "CONTINUE"|"STOP", current version)."""
        with self.lock:
            record = self._session(worker_id, session_id)
            record.stats = stats
            if self.metrics is not None:
                self.metrics.observe_worker(record.name, stats, record.merged_tokens)
            # Only a finished run stops workers: while finishing, an idle worker stays (its lease
            # requests get "ask again soon") so it can retrain tokens a dying worker gives back.
            stop = self.state == "finished"
            return ("STOP" if stop else "CONTINUE"), self.version

    def group_assignment(self, worker_id: str, active_group_id: str = "") -> Assignment | None:
        """The worker's sync group now (None: train async). Forms pending groups first.
        active_group_id: the group the worker reports training in (push rule of rank_of)."""
        with self.lock:
            self.groups.set_active(worker_id, active_group_id)
            return self.groups.assignment(worker_id)

    def report_group_failure(self, worker_id: str, session_id: str, group_id: str, epoch: int, survivor_ranks: list[int]) -> None:
        """A member's all-reduce failed: dissolve the group so that the survivors re-form."""
        with self.lock:
            self._session(worker_id, session_id)
            self.groups.report_failure(worker_id, group_id, epoch, survivor_ranks)

    def leave(self, worker_id: str, session_id: str, reason: str) -> None:
        with self.lock:
            record = self._session(worker_id, session_id)
            record.left = True
            log.info("worker %s left: %s", record.name, reason[:200] or "no reason given")
            if not any(c.worker_id == worker_id for c in self.pending):
                self._drop(worker_id, "left")
            self._update_worker_gauge()
            self._maybe_merge()

    def _drop(self, worker_id: str, why: str) -> None:
        """Forget a worker: discard its pending delta, return its leased tokens."""
        record = self.workers.pop(worker_id, None)
        self.groups.remove(worker_id, why)
        if record is not None and record.stats:
            self.departed_stats[worker_id] = record.stats
        if record is not None and record.merged_pushes:
            self.departed_pushes[worker_id] = record.merged_pushes
            while len(self.departed_pushes) > 4 * self.run.workers.max_workers:
                self.departed_pushes.pop(next(iter(self.departed_pushes)))
        self.pending = [c for c in self.pending if c.worker_id != worker_id]
        returned = self.ledger.release(worker_id)
        if record is not None and why != "left":
            log.warning("worker %s dropped (%s); %d leased tokens return to the pool", record.name, why, returned)
        self._update_worker_gauge()

    def _update_worker_gauge(self) -> None:
        gauge = self._metric("workers")
        if gauge is not None:
            gauge.set(sum(1 for w in self.workers.values() if not w.left))

    # ------------------------------------------------------------------ data

    def lease(self, worker_id: str, session_id: str, request_id: str = "") -> tuple[bool, TrainedRange | None]:
        """(exhausted, range). exhausted=False with no range: nothing free now, ask again soon.

        A repeated `request_id` (a retry whose first reply was lost) gets the first answer again,
        so a lost reply never leaves a range leased to a worker that does not know it holds it."""
        with self.lock:
            record = self._session(worker_id, session_id)
            if request_id and record.last_lease is not None and record.last_lease[0] == request_id:
                return record.last_lease[1], record.last_lease[2]
            exhausted, r = self._lease_locked(worker_id)
            record.last_lease = (request_id, exhausted, r) if request_id else None
            return exhausted, r

    def _lease_locked(self, worker_id: str) -> tuple[bool, TrainedRange | None]:
        if self.state == "finished":
            return True, None
        r = self.ledger.lease(worker_id)
        if r is None and self.ledger.finished():
            return True, None  # budget spent and every leased token committed
        if r is not None and self.state == "finishing":
            # a dropped worker's tokens came back after the budget was leased out
            log.info("leased tokens returned to the pool: training again")
            self.state = "training"
        self._update_shard_gauge()
        return False, r

    def shard_path(self, worker_id: str, session_id: str, shard: str) -> tuple[Path, str]:
        """Path and sha256 of a shard named in the manifest; NotFound for anything else."""
        with self.lock:
            self._session(worker_id, session_id)
        for info in self.data.manifest.shards:
            if info.name == shard:
                return self.data.data_dir / info.name, info.sha256
        raise NotFound(f"shard {shard[:100]!r} is not in the run's manifest")

    def shard_sequences(self, worker_id: str, session_id: str, shard: str, epoch: int, first_slot: int,
                        sequences: int) -> tuple[bytes, str]:
        """`sequences` entries of the shard's visiting order in `epoch` from `first_slot` on, as
        rows of block_size + 1 tokens in the shard's dtype (common/order.py order_rows), and their
        sha256. NotFound for a shard outside the manifest; InvalidArgument for a bad range."""
        import hashlib

        from geotrain.common.order import order_rows, sequence_order

        from geotrain.common.shards import read_shard

        path, _ = self.shard_path(worker_id, session_id, shard)
        T = self.model_config.block_size
        with self.lock:
            cached = self._order_cache.get((shard, epoch))
        if cached is None:
            tokens = read_shard(path, verify_sha=False)
            order = sequence_order(shard, len(tokens), T, self.run.train.seed, epoch)
            cached = (tokens, order)
            with self.lock:
                self._order_cache = {(shard, epoch): cached}  # one shard at a time: the common case
        tokens, order = cached
        try:
            rows = order_rows(tokens, order, int(first_slot), int(sequences), T)
        except ValueError as exc:
            raise InvalidArgument(f"shard {shard!r}: {exc}") from exc
        data = rows.astype(rows.dtype.newbyteorder("<"), copy=False).tobytes()
        return data, hashlib.sha256(data).hexdigest()

    def _update_shard_gauge(self) -> None:
        if self.metrics is not None:
            for state, count in self.ledger.counts().items():
                self.metrics.shards.labels(state).set(count)

    # ------------------------------------------------------------------ model

    def model_reply(
        self, have_version: int, force_full: bool, wait_seconds: float, worker_id: str = "",
        held_push_ids: Container[str] = (),
    ) -> ModelReply:
        """Updates since `have_version` when all are held, else the full model. Waits up to
        `wait_seconds` (long poll) for a version newer than `have_version`. A relayed update omits
        the deltas named in `held_push_ids` (the caller's own pushes, which it still holds).
        Under downlink "relay" a FULL reply ends with the outer momentum (`momentum_bytes`)."""
        deadline = self.clock() + max(0.0, min(wait_seconds, 60.0))
        with self.version_changed:
            while (
                not force_full
                and have_version == self.version
                and self.state != "finished"
                and self.clock() < deadline
            ):
                self.version_changed.wait(timeout=max(0.01, deadline - self.clock()))
            if not force_full and have_version == self.version:
                return ModelReply("UNCHANGED", self.version, b"", self.params_sha, [])
            oldest = self.history[0].version if self.history else self.version + 1
            records = [u for u in self.history if u.version > have_version]
            # Updates only while they are smaller than the full fp32 weights would be.
            cheaper = sum(u.wire_size(held_push_ids) for u in records) < 4 * self.num_params
            if not force_full and 0 < have_version < self.version and have_version + 1 >= oldest and cheaper:
                return self._updates_reply(records, held_push_ids)
            if self.full_blob_cache is None or self.full_blob_cache[0] != self.version:
                blob, _ = encode_tensors(self.global_params, "none")
                momentum = b""
                if self.relaying and self.outer.momentum:
                    momentum, _ = encode_tensors(self.outer.momentum, "none")
                self.full_blob_cache = (self.version, blob + momentum, len(momentum))
            record = self.workers.get(worker_id)
            own = [p for v, p in record.merged_pushes if v > have_version] if record else []
            _, blob, momentum_bytes = self.full_blob_cache
            return ModelReply("FULL", self.version, blob, self.params_sha, [], own, momentum_bytes)

    def _updates_reply(self, records: list[UpdateRecord], held_push_ids: Container[str]) -> ModelReply:
        slices, blob = [], bytearray()
        for u in records:
            start, parts = len(blob), []
            if u.counted is not None:
                reference = next((p for p in u.counted.push_ids if p in held_push_ids), "")
                blob += self._count_payload(u.counted, reference)
                slices.append(UpdateSlice(u, start, len(blob) - start, [], reference))
                continue
            if not u.relayed:
                blob += u.blob
            for r in u.relayed:
                if r.push_id in held_push_ids:
                    parts.append((len(blob), 0))
                else:
                    parts.append((len(blob), len(r.blob)))
                    blob += r.blob
            slices.append(UpdateSlice(u, start, len(blob) - start, parts))
        return ModelReply("UPDATES", self.version, bytes(blob), self.params_sha, slices)

    @property
    def relaying(self) -> bool:
        """Downlinks whose versions the workers replay (outer step included): "relay", "combine"."""
        return self.run.compression.downlink in REPLAYED_DOWNLINKS

    # ------------------------------------------------------------------ pushes

    def push(
        self,
        worker_id: str,
        session_id: str,
        push_id: str,
        base_version: int,
        tokens: int,
        steps: int,
        mean_loss: float,
        ranges: list[TrainedRange],
        blob: bytes,
    ) -> PushOutcome:
        """Validate a delta and queue it (semi-sync) or merge it (async)."""
        with self.lock:
            self._session(worker_id, session_id)
            rank = self.groups.rank_of(worker_id)
            if rank:  # only rank 0 speaks for a sync group
                raise FailedPrecondition(f"worker {worker_id} is rank {rank} of a sync group: only rank 0 pushes")
            self._check_push_header(push_id, base_version, tokens, ranges, worker_id)
            staleness = self.version - base_version
            if staleness > self.run.merge.max_staleness:
                self._count_delta("stale")
                return PushOutcome(False, self.version, staleness, f"delta is {staleness} versions stale (max {self.run.merge.max_staleness})")
        try:
            tensors = decode_tensors(blob, self.spec, max_blob_bytes=self.max_blob_bytes())
        except ValueError as exc:
            self._count_delta("invalid")
            raise InvalidArgument(f"delta refused: {exc}") from exc
        accept, factor, reason = self.gate.check(tensors)
        if not accept:
            self._count_delta("invalid")
            raise InvalidArgument(f"delta refused: {reason}")
        if factor != 1.0:
            log.warning("clipping delta from %s: %s", worker_id, reason)
        with self.lock:
            record = self._session(worker_id, session_id)
            self._check_push_header(push_id, base_version, tokens, ranges, worker_id)  # again: state may have moved
            staleness = self.version - base_version
            self.gate.record(tensors, factor)
            self.seen_push_ids[push_id] = None
            while len(self.seen_push_ids) > 100_000:
                self.seen_push_ids.popitem(last=False)
            record.pushes += 1
            self.pending = [c for c in self.pending if c.worker_id != worker_id]  # at most one each
            self.pending.append(
                Contribution(push_id, worker_id, base_version, tokens, steps, mean_loss, tensors, ranges, len(blob),
                             factor, blob if self.run.compression.downlink in ("relay", "count") else b"")
            )
            if self.first_pending_at is None:
                self.first_pending_at = self.clock()
            self._count_delta("accepted")
            if self.metrics is not None:
                self.metrics.delta_staleness.observe(staleness)
                raw = 4 * self.num_params
                self.metrics.compression_ratio.set(raw / max(1, len(blob)))
            self._maybe_merge()
            return PushOutcome(True, self.version, staleness)

    def max_blob_bytes(self) -> int:
        """Largest acceptable delta blob: fp32 of every parameter plus headroom for headers."""
        return 4 * self.num_params + 64 * len(self.spec) * 8 + (1 << 16)

    def _check_push_header(self, push_id: str, base_version: int, tokens: int, ranges: list[TrainedRange], worker_id: str) -> None:
        if not push_id or len(push_id) > 64:
            raise InvalidArgument("push_id must be 1-64 characters")
        if push_id in self.seen_push_ids or any(c.push_id == push_id for c in self.pending):
            self._count_delta("duplicate")
            raise AlreadyExists(f"push {push_id} was already received")
        if base_version > self.version:
            raise FailedPrecondition(
                f"delta is based on version {base_version} but the coordinator is at {self.version} "
                "(it restarted from a checkpoint): resync the model"
            )
        trained = sum(r.end - r.start for r in ranges)
        if tokens != trained:
            raise InvalidArgument(f"tokens={tokens} but the reported ranges cover {trained} tokens")
        try:
            self.ledger.check(worker_id, ranges)
        except LedgerError as exc:
            self._count_delta("invalid")
            raise InvalidArgument(f"delta refused: {exc}") from exc

    def _count_delta(self, result: str) -> None:
        counter = self._metric("deltas", result)
        if counter is not None:
            counter.inc()

    # ------------------------------------------------------------------ merging

    def _participants(self) -> int:
        """Live workers that push: a sync group counts once (its rank 0); caller holds the lock."""
        return sum(1 for w in self.workers.values() if not w.left and not self.groups.rank_of(w.worker_id))

    def _expected_workers(self) -> set[str]:
        """Workers a semi-sync merge waits for: those training leased data (they will push).
        A worker still downloading, or one whose data ran out at the end of the run, is not
        waited for."""
        return {w.worker_id for w in self.workers.values() if not w.left and self.ledger.held_by(w.worker_id)}

    def _history_limit(self) -> int:
        """Updates kept for workers catching up: at least workers.history_versions, and two per
        live worker, so under the async policy (a version per push) a worker a round behind still
        gets small updates instead of the full model."""
        live = sum(1 for w in self.workers.values() if not w.left)
        return max(1, self.run.workers.history_versions, 2 * live)

    def semi_sync_timeout(self) -> float:
        """Seconds a semi-sync merge waits for the last worker (MergeConfig.semi_sync_timeout)."""
        m = self.run.merge
        if m.semi_sync_timeout > 0:
            return m.semi_sync_timeout
        if not self.round_times:
            return m.first_semi_sync_timeout
        return max(SEMI_SYNC_TIMEOUT_MIN_S, SEMI_SYNC_TIMEOUT_FACTOR * statistics.median(self.round_times))

    def _maybe_merge(self, now: float | None = None) -> None:
        """Merge when the policy says so. Caller holds the lock."""
        if not self.pending:
            return
        if self.run.merge.policy == "async":
            self._merge()
            return
        waiting_for = self._expected_workers() - {c.worker_id for c in self.pending}
        now = self.clock() if now is None else now
        timed_out = self.first_pending_at is not None and now - self.first_pending_at >= self.semi_sync_timeout()
        if not waiting_for or timed_out:
            if waiting_for:
                log.info("semi-sync timeout: merging without %d straggler(s)", len(waiting_for))
            self._merge()

    def _merge(self) -> None:
        started = time.perf_counter()
        batch, self.pending, self.first_pending_at = self.pending, [], None
        valid = []
        for c in batch:
            try:
                self.ledger.check(c.worker_id, c.ranges)
                valid.append(c)
            except LedgerError as exc:  # its lease moved on since the push: retrained elsewhere
                log.warning("dropping delta %s: %s", c.push_id, exc)
        if not valid:
            return
        scale = 1.0
        if self.run.merge.policy == "async":
            scale = 1.0 / max(1, self._participants())  # one delta moves the model by its share
        # Downlink "count": the deltas of one round differ by the steps trained while a push was in
        # flight; equal weights keep their merge a count of signs. Merges of deltas of clearly
        # different sizes (the run's last, partial rounds) keep token weights (and are relayed).
        sizes = [max(1, c.tokens) for c in valid]
        equal = self.run.merge.weights == "equal" or (
            self.run.compression.downlink == "count" and max(sizes) <= COUNT_TOKEN_SPREAD * min(sizes))
        weights = merge_weights(valid, self.version, self.run.merge.staleness_power, scale, by_tokens=not equal)
        mean_delta = weighted_sum([c.tensors for c in valid], [c.factor for c in valid], weights)
        push_ids = [c.push_id for c in valid]
        tokens_in = sum(c.tokens for c in valid)
        downlink = self.run.compression.downlink
        if downlink == "relay":  # every worker replays this merge exactly: the update goes out lossless
            update = self.outer.update(mean_delta, tokens=tokens_in)
            relayed = [RelayedDelta(c.push_id, c.blob, w, c.factor) for c, w in zip(valid, weights)]
            self._commit_version(b"", update, push_ids, relayed, self.outer.last_fraction)
        elif downlink == "combine":  # one payload: the merged delta, compressed with error feedback
            combined, update = self._combined_update(mean_delta, tokens_in)
            self._commit_version(b"", update, push_ids, [combined], self.outer.last_fraction)
        elif downlink == "count":  # a count merge when the deltas allow it, else relayed
            self._merge_counted(valid, weights, mean_delta, tokens_in)
        else:
            update = self.outer.update(mean_delta, tokens=tokens_in)
            blob, decoded = encode_tensors(
                update, self.run.compression.down_scheme, self.run.compression.chunk, feedback=self.down_feedback,
                zstd_level=self.run.compression.zstd_level,
            )
            self._commit_version(blob, decoded, push_ids)
        tokens = 0
        for c in valid:
            committed = self.ledger.commit(c.worker_id, c.ranges)
            tokens += committed
            record = self.workers.get(c.worker_id)
            if record is not None:
                record.merged_tokens += committed
                record.merged_pushes = (record.merged_pushes + [(self.version, c.push_id)])[-32:]
                if record.left and not self.ledger.held_by(c.worker_id):
                    self._drop(c.worker_id, "left")
            self.contributors.add(c.worker_id)
        self.train_loss = sum(c.mean_loss * c.tokens for c in valid) / max(1, sum(c.tokens for c in valid))
        now = self.clock()
        self.round_times.append(now - self.last_merge_at)
        if self.metrics is not None:
            self.metrics.record_merge(self, tokens, now - self.last_merge_at, time.perf_counter() - started)
        self.last_merge_at = now
        self._update_shard_gauge()
        self.version_changed.notify_all()
        log.info(
            "version %d: merged %d delta(s)%s, %d tokens, train loss %.4f",
            self.version, len(valid), " as counts" if self.history and self.history[-1].counted else "",
            tokens, self.train_loss,
        )

    # ------------------------------------------------------------------ periodic work

    def tick(self) -> None:
        """Called by the server every ~0.5 s: expiry, timeouts, finishing, checkpoint/eval triggers."""
        with self.lock:
            now = self.clock()
            for record in list(self.workers.values()):
                if now - record.last_seen > self.run.workers.lease_seconds:
                    self._drop(record.worker_id, f"no heartbeat for {now - record.last_seen:.0f}s")
            self._maybe_merge(now)
            if self.state == "training" and self.ledger.remaining_budget() == 0:
                self.state = "finishing"
                log.info("token budget leased out: finishing")
            if self.state == "finishing" and self.ledger.finished() and not self.pending:
                self.state = "finished"
                self.version_changed.notify_all()
        if self.state == "finished" and self.final_summary is None:
            self.finish()
            return
        self._maybe_evaluate()
        self._maybe_checkpoint()

    def _maybe_evaluate(self) -> None:
        every = self.run.eval.every_versions
        with self.lock:
            due = every > 0 and self.version > 0 and self.version - self.last_eval_version >= every
            if not due or self.evaluating:
                return
            self.evaluating = True
        threading.Thread(target=self._evaluate_in_background, name="eval", daemon=True).start()

    def _evaluate_in_background(self) -> None:
        try:
            self.evaluate(self.run.eval.iters)
        except Exception:  # noqa: BLE001 - logged; evaluation never stops training
            log.exception("evaluation failed")
        finally:
            self.evaluating = False

    def evaluate(self, iters: int) -> float:
        """Validation loss of the current global model (deterministic batches)."""
        with self.lock:
            version = self.version
            snapshot = clone_tensors(self.global_params)
            tokens = self.ledger.committed_total
        model = GPT(self.model_config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(snapshot[name])
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(iters):
                x, y = self.data.get_batch("val", self.run.eval.batch_size, self.model_config.block_size, EVAL_SEED, i)
                losses.append(float(model(x, y)[1]))
        val = sum(losses) / len(losses)
        row = {"version": version, "tokens": tokens, "val_loss": val}
        if self.hellaswag is not None:
            hs = evaluate_hellaswag(model, self.data.tokenizer(), self.hellaswag, progress=False)
            row["hellaswag_acc_norm"] = hs["acc_norm"]
        with self.lock:
            self.val_loss = val
            self.last_eval_version = max(self.last_eval_version, version)
            if self.metrics is not None:
                self.metrics.val_loss.set(val)
                if "hellaswag_acc_norm" in row:
                    self.metrics.hellaswag_acc_norm.set(row["hellaswag_acc_norm"])
            self._append_history(row)
        log.info("version %d: validation loss %.4f", version, val)
        return val

    def _append_history(self, row: dict) -> None:
        row = {"seconds": round(self.elapsed(), 3), "train_loss": self.train_loss, **row}
        row["workers"] = {w.name: w.stats for w in self.workers.values()}
        with open(self.run_dir / "history.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _maybe_checkpoint(self) -> None:
        cfg = self.run.checkpoint
        with self.lock:
            due = self.version > self.last_checkpoint_version and (
                self.version - self.last_checkpoint_version >= cfg.every_versions
                or self.clock() - self.last_checkpoint_at >= cfg.every_seconds
            )
        if due:
            try:
                self.checkpoint()
            except OSError as exc:  # full disk etc.: loud, keep training, the previous one stays
                log.error("checkpoint failed, training goes on, previous checkpoint kept: %s", exc)
                if self.metrics is not None:
                    self.metrics.checkpoint_failures.inc()
                with self.lock:
                    self.last_checkpoint_at = self.clock()

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> Path:
        """Write an atomic checkpoint of everything needed to resume exactly."""
        with self.lock:
            tensors = {f"model.{n}": t.clone() for n, t in self.global_params.items()}
            tensors.update({k: v.clone() for k, v in self.outer.state_dict().items()})
            tensors.update({f"downlink_residual.{k}": v.clone() for k, v in self.down_feedback.state_dict().items()})
            state = {
                "version": self.version,
                "run_id": self.run_id,
                "model": self.model_config.to_dict(),
                "model_config": self.model_config.to_dict(),  # read by geotrain sample / eval
                "tokenizer": self.data.manifest.tokenizer,
                "data_dir": str(self.data.data_dir),
                "ledger": self.ledger.state_dict(),
                "seconds": self.elapsed(),
                "train_loss": self.train_loss,
                "val_loss": self.val_loss,
                "params_sha256": self.params_sha,
                "contributors": sorted(self.contributors),
                "state": self.state,
                "software_version": __version__,
            }
            version = self.version
        path = save_checkpoint(self.ckpt_root, version, tensors, state, keep=self.run.checkpoint.keep)
        with self.lock:
            self.last_checkpoint_version = version
            self.last_checkpoint_at = self.clock()
            self.checkpoint_wall_time = time.time()
        log.info("checkpoint %s written", path.name)
        return path

    @property
    def version_mark_path(self) -> Path:
        return self.run_dir / "version.mark"

    def _write_version_mark(self) -> None:
        """Record the highest version ever published (tmp + rename: safe against SIGKILL). After a
        restart from an older checkpoint the restored weights get a version above it, so a version
        number never names two different models and never goes backwards."""
        tmp = self.version_mark_path.with_suffix(".tmp")
        tmp.write_text(str(self.version))
        os.replace(tmp, self.version_mark_path)

    def _read_version_mark(self) -> int:
        try:
            return int(self.version_mark_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _restore(self) -> None:
        loaded = load_latest_checkpoint(self.ckpt_root)
        if loaded is None:
            mark = self._read_version_mark()
            if mark >= self.version:  # died after publishing versions but before any checkpoint
                log.warning("no checkpoint in %s but versions up to %d were published: starting over at %d",
                            self.ckpt_root, mark, mark + 1)
                self.version = mark + 1
                self._write_version_mark()
            return
        tensors, state, path = loaded
        if state.get("model") != self.model_config.to_dict():
            raise ValueError(
                f"checkpoint {path} is for model {state.get('model')}, but this run's config gives "
                f"{self.model_config.to_dict()}; use another --run-dir or the matching config"
            )
        for name in self.global_params:
            self.global_params[name] = tensors[f"model.{name}"].clone().float()
        self.outer.load_state_dict(tensors)
        residuals = {k[len("downlink_residual."):]: v for k, v in tensors.items() if k.startswith("downlink_residual.")}
        self.down_feedback.load_state_dict(residuals)
        self.ledger.load_state_dict(state["ledger"])
        self.ledger.release_all()
        self.version = int(state["version"])
        self.run_id = str(state["run_id"])
        self.seconds_before_restart = float(state["seconds"])
        self.train_loss = float(state["train_loss"])
        self.val_loss = float(state["val_loss"])
        self.contributors = set(state.get("contributors", []))
        self.params_sha = params_sha256(self.global_params)
        if self.params_sha != state["params_sha256"]:
            raise ValueError(f"checkpoint {path}: restored weights do not match their recorded checksum")
        mark = self._read_version_mark()
        if mark > self.version:
            log.warning("versions %d..%d were lost with the crash; the restored model becomes version %d",
                        self.version + 1, mark, mark + 1)
            self.version = mark + 1
            self._write_version_mark()
        self.last_checkpoint_version = self.version
        self.last_eval_version = self.version
        self.restored_from = path
        log.info("resumed from %s at version %d (%d tokens merged)", path.name, self.version, self.ledger.committed_total)

    def _write_run_json(self) -> None:
        (self.run_dir / "run.json").write_text(
            json.dumps({"run": self.run.to_dict(), "model": self.model_config.to_dict(), "run_id": self.run_id}, indent=2)
        )

    # ------------------------------------------------------------------ finishing and status

    def finish(self, eval_iters: int | None = None) -> dict:
        """Final evaluation, checkpoint and summary.json. Idempotent."""
        if self.final_summary is not None:
            return self.final_summary
        if self.state == "finished":
            self._drop_lookahead()
        val = self.evaluate(eval_iters or max(self.run.eval.iters, 50))
        try:
            self.checkpoint()
        except OSError as exc:  # disk full at the end: say so loudly, still write the summary
            log.error("final checkpoint failed, the previous checkpoint stays: %s", exc)
        summary = self.summary()
        summary["val_loss"] = val
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.final_summary = summary
        log.info("run finished: version %d, %d tokens, validation loss %.4f", self.version, summary["tokens"], val)
        return summary

    def _merge_counted(
        self, valid: list[Contribution], weights: list[float], mean_delta: dict[str, torch.Tensor], tokens: int
    ) -> None:
        """Downlink "count": commit the merge as a count of signs (or relayed when it is not one).
        Caller holds the lock."""
        counted = self._counted_record(valid, weights)
        relayed = []
        if counted is not None:
            k = {n: sum(1 - 2 * torch.signbit(c.tensors[n]).to(torch.int16) for c in valid) for n in self.spec}
            update = self.outer.update(counted_mean(k, dict(zip(self.spec, counted.scales)), counted.weight), tokens=tokens)
        else:
            update = self.outer.update(mean_delta, tokens=tokens)
            relayed = [RelayedDelta(c.push_id, c.blob, w, c.factor) for c, w in zip(valid, weights)]
        self._commit_version(b"", update, [c.push_id for c in valid], relayed, self.outer.last_fraction, counted)

    def _counted_record(self, valid: list[Contribution], weights: list[float]) -> CountedRecord | None:
        """A CountedRecord when this merge is a count of signs: at least 2 deltas, all based on the
        current version, each decoding to +-(one scale) per tensor (scheme tsign), with equal
        weights and no clipping. The merge's scale per tensor is the mean of the deltas' own (fp32),
        sent with the counts: every worker then takes its own delta as that scale x its signs
        (a sign does not depend on the scale; what the scale drops stays in its weights). None:
        relay it. Caller holds the lock."""
        if len(valid) < 2 or len(set(weights)) != 1:
            return None
        if any(c.base_version != self.version or c.factor != 1.0 for c in valid):
            return None
        scales = []
        for name in self.spec:
            own = []
            for c in valid:
                t = c.tensors[name].reshape(-1)
                magnitude = t[:1].abs()
                if t.numel() and not bool(torch.all(t.abs() == magnitude)):
                    return None
                own.append(float(magnitude) if t.numel() else 0.0)
            scales.append(float(np.float32(sum(own) / len(own))))
        return CountedRecord([c.push_id for c in valid], [c.blob for c in valid], weights[0], scales)

    def _count_payload(self, counted: CountedRecord, reference: str) -> bytes:
        """The count payload of a count merge for a requester holding `reference` ("" = plus
        counts); computed once per (version, reference). Caller holds the lock."""
        payload = counted.payloads.get(reference)
        if payload is None:
            names = list(self.spec)
            negative = [negative_signs(decode_tensors(b, self.spec), names) for b in counted.blobs]
            if reference:
                i = counted.push_ids.index(reference)
                agree = sum((negative[j] == negative[i]).to(torch.uint8) for j in range(len(negative)) if j != i)
                payload = encode_counts(agree.numpy(), len(negative) - 1, self.run.compression.zstd_level)
            else:
                plus = sum((~n).to(torch.uint8) for n in negative)
                payload = encode_counts(plus.numpy(), len(negative), self.run.compression.zstd_level)
            counted.payloads[reference] = payload
        return payload

    def _combined_update(self, mean_delta: dict[str, torch.Tensor], tokens: int) -> tuple[RelayedDelta, dict[str, torch.Tensor]]:
        """Downlink "combine": the merge's weighted mean delta, compressed with `scheme` and the
        coordinator's error feedback (what quantization drops joins the next merge), goes out as a
        single relayed delta of weight 1; the outer step runs on exactly what the workers decode,
        through the same weighted_sum and OuterOptimizer.update they replay, so basepoints stay
        bit-identical while the downlink costs one payload per version for any merge size.
        Caller holds the lock."""
        blob, decoded = encode_tensors(
            mean_delta, self.run.compression.down_scheme, self.run.compression.chunk, feedback=self.down_feedback,
            zstd_level=self.run.compression.zstd_level,
        )
        replayed = weighted_sum([decoded], [1.0], [1.0])
        update = self.outer.update(replayed, tokens=tokens)
        return RelayedDelta(f"merge-{self.run_id}-{self.version + 1}", blob, 1.0, 1.0), update

    def _commit_version(
        self, blob: bytes, decoded: dict[str, torch.Tensor], push_ids: list[str],
        relayed: list[RelayedDelta] | None = None, outer_fraction: float = 1.0,
        counted: CountedRecord | None = None,
    ) -> None:
        """Apply a decoded update to the global model as the next version, kept in the history
        (as `blob`, or as the relayed deltas, what workers download) for catch-up. Caller holds
        the lock."""
        for name, t in self.global_params.items():  # one IEEE add each: what workers do too
            t.add_(decoded[name])
        self.version += 1
        self._write_version_mark()
        self.params_sha = params_sha256(self.global_params)
        self.history.append(UpdateRecord(self.version, blob, push_ids, self.params_sha, relayed or [], outer_fraction,
                                         counted))
        while len(self.history) > self._history_limit():
            self.history.popleft()

    def _drop_lookahead(self) -> None:
        """When every token is merged, the final model is the global model minus the outer
        Nesterov lookahead (lr * mu * m), applied as one last, uncompressed version. The lookahead
        anticipates rounds that will not come; at the end of the inner schedule the deltas shrink
        while m still remembers larger ones, and the lookahead overshoots: on the final checkpoints
        of 2000-step nano runs (benchmarks/README.md) dropping it lowered the validation loss by
        0.2-1.5%. Not done when a run is merely stopped: a resumed run continues from the lookahead
        point its momentum belongs to."""
        with self.lock:
            lookahead = self.outer.lookahead()
            if lookahead is None or global_norm(lookahead) == 0.0:
                return
            update = {n: -t for n, t in lookahead.items()}
            blob, decoded = encode_tensors(update, "none", zstd_level=self.run.compression.zstd_level)
            self._commit_version(blob, decoded, [])
            log.info("version %d: final model without the outer Nesterov lookahead (norm %.4g)",
                     self.version, global_norm(lookahead))

    def summary(self) -> dict:
        with self.lock:
            stats = [w.stats for w in self.workers.values() if w.stats] + list(self.departed_stats.values())
            wall = sum(s.get("wall_seconds", 0.0) for s in stats)
            return {
                "val_loss": self.val_loss,
                "train_loss": self.train_loss,
                "tokens": self.ledger.committed_total,
                "params": self.num_params,
                "model_version": self.version,
                "workers": len(self.contributors),
                "seconds": self.elapsed(),
                "sent_bytes": int(sum(s.get("sent_bytes", 0) for s in stats)),
                "received_bytes": int(sum(s.get("received_bytes", 0) for s in stats)),
                "data_bytes": int(sum(s.get("data_bytes", 0) for s in stats)),
                "coordinator_sent_bytes": self.sent_bytes,
                "coordinator_received_bytes": self.received_bytes,
                "wait_fraction": (sum(s.get("wait_seconds", 0.0) for s in stats) / wall) if wall else 0.0,
                "state": self.state,
                "run_id": self.run_id,
                "compression": self.run.compression.scheme,
                "round_steps": self.run.round.steps,
            }

    def status(self) -> dict:
        with self.lock:
            now = self.clock()
            out = self.summary()
            out["shards"] = self.ledger.counts()
            out["epoch"] = self.ledger.epoch
            out["worker_list"] = [
                {
                    "worker_id": w.worker_id,
                    "name": w.name,
                    "device": w.device,
                    "stats": w.stats,
                    "merged_tokens": w.merged_tokens,
                    "pushes": w.pushes,
                    "last_seen_seconds": now - w.last_seen,
                }
                for w in self.workers.values()
            ]
            return out

    def count_traffic(self, sent: int = 0, received: int = 0) -> None:
        with self.lock:
            self.sent_bytes += sent
            self.received_bytes += received
        if self.metrics is not None:
            if sent:
                self.metrics.sent_bytes.inc(sent)
            if received:
                self.metrics.received_bytes.inc(received)
