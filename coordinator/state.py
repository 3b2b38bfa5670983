"""The coordinator's state machine: a facade over membership, data leases, merges, the downlink,
persistence and evaluation, which owns the locks and composes them.

Plain module (no gRPC): coordinator/service.py decodes requests and calls these methods; errors are
`CoordinatorError` subclasses (coordinator/records.py) carrying the gRPC status name the servicer
returns.

Modules, one concern each:
- membership.py: workers, sessions, the departed;     ledger.py: data units and leases;
- groups.py: sync groups;                             merger.py: deltas -> the next global model;
- history.py: published versions for catching up;     serving.py: the full model as a file;
- persistence.py: checkpoints, version mark, run.json; evaluation.py: validation loss;
- memory.py: the host-memory check at start.

Locks (always taken in this order: model lock, then state lock):
- `lock` (the state lock) guards every record above; it is held only for bookkeeping, so
  heartbeats, leases and pushes are answered within milliseconds whatever else runs.
- `model_lock` (merger.model_lock) guards the global weights, the outer momentum and the downlink
  residual. Held for the slow work: a merge's arithmetic and checksum, encoding and hashing the
  full model, writing a checkpoint, a CPU evaluation. The version and the weights change
  together, under both locks, at a merge's commit.

Who calls what:
- service.py: join / heartbeat / leave / lease / model_reply / shard_path / shard_sequences / push
  / status
- server.py: `tick()` every 0.5 s (lease expiry, semi-sync timeouts, checkpoints, evaluation,
  finishing), `finish()` at shutdown.
A merge runs in the thread whose call made it due (a push, a leave, a tick), outside the state
lock; a merge due while another thread holds the model lock is run by that thread when it
releases it (`_run_merges`).

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
import statistics
import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Container

import torch

from geotrain.common import __version__
from geotrain.common.config import (
    REPLAYED_DOWNLINKS, SEMI_SYNC_TIMEOUT_FACTOR, SEMI_SYNC_TIMEOUT_MIN_S, ModelConfig, RunConfig,
)
from geotrain.common.reader import TokenData
from geotrain.common.merge import merge_weights
from geotrain.common.hellaswag import evaluate_hellaswag, read_examples
from geotrain.common.hf import initial_model
from geotrain.common.model import GPT
from geotrain.common.tensors import global_norm, model_tensors, params_sha256
from geotrain.coordinator.evaluation import EVAL_SEED, Evaluator
from geotrain.coordinator.groups import Assignment, GroupFormation
from geotrain.coordinator.history import DownlinkHistory
from geotrain.coordinator.ledger import Ledger, LedgerError, TrainedRange
from geotrain.coordinator.membership import NAME_RE, Membership
from geotrain.coordinator.memory import check_fits, count_params
from geotrain.coordinator.merger import Merger, MergeResult
from geotrain.coordinator.pacing import Rates, lease_cap, round_time_cap
from geotrain.coordinator.persistence import Persistence
from geotrain.coordinator.records import (  # noqa: F401 - re-exported: the errors and records callers name
    AlreadyExists,
    CoordinatorError,
    CountedRecord,
    FailedPrecondition,
    InvalidArgument,
    ModelReply,
    NotFound,
    PendingDelta,
    PushOutcome,
    RelayedDelta,
    ResourceExhausted,
    UpdateRecord,
    UpdateSlice,
    WorkerRecord,
)
from geotrain.coordinator.serving import FullModelFile

log = logging.getLogger(__name__)

COUNT_TOKEN_SPREAD = 1.5  # downlink "count": deltas within this token ratio are weighed equally
INSPECT_SLOTS = 2  # pushed deltas decoded at once for validation (each holds one decoded tensor)
__all__ = [
    "AlreadyExists", "CoordinatorError", "CoordinatorState", "CountedRecord", "EVAL_SEED", "FailedPrecondition",
    "InvalidArgument", "ModelReply", "NAME_RE", "NotFound", "PendingDelta", "PushOutcome", "RelayedDelta",
    "ResourceExhausted", "UpdateRecord", "UpdateSlice", "WorkerRecord",
]


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
        self.metrics = metrics
        self.clock = clock
        self.lock = threading.RLock()
        self.version_changed = threading.Condition(self.lock)

        # model.init_from: Hugging Face GPT-2 weights instead of the seed's (common/hf.py)
        self.model_config, initial = initial_model(run.model, data.vocab_size, data.manifest.tokenizer.get("name", ""))
        self.num_params = count_params(self.model_config)
        check_fits(self.num_params, run.model.preset)  # before anything large is allocated
        self.persistence = Persistence(self.run_dir, run.checkpoint.keep)
        self.evaluator = Evaluator(run.eval, self.model_config, data)
        self.hellaswag = (read_examples(run.eval.hellaswag_file, run.eval.hellaswag_examples or None)
                          if run.eval.hellaswag_file else None)  # eval.hellaswag_file, checked at start
        torch.manual_seed(run.train.seed)
        # The initial weights from the seed (or imported); the model object is dropped, its tensors kept.
        model = GPT(self.model_config)
        if initial is not None:
            model.load_state_dict(initial)
        self.merger = Merger(run, model_tensors(model))
        del model
        self.spec = self.merger.spec
        self.groups = GroupFormation(clock=self.clock)  # sync groups (coordinator/groups.py)
        self.membership = Membership(run.workers, clock)
        self.rates = Rates()  # each worker's smoothed speed (coordinator/pacing.py)
        train_shards = [(s.name, s.tokens) for s in data.manifest.shards if s.split == "train"]
        self.ledger = Ledger(
            train_shards,
            unit_tokens=run.plan.unit_tokens,
            block_size=self.model_config.block_size,
            seed=run.train.seed,
            max_tokens=run.plan.max_tokens,
        )
        self.history = DownlinkHistory(self.spec, self.num_params, run.workers.history_fraction,
                                       run.compression.zstd_level)
        self.full_model = FullModelFile(self.run_dir / "serve", run.compression.zstd_level)
        self._inspect_slots = threading.BoundedSemaphore(INSPECT_SLOTS)

        self.run_id = uuid.uuid4().hex[:12]
        self.version = 1  # the initial model; have_version 0 on the wire means "nothing yet"
        self.params_sha = params_sha256(self.global_params)
        # Version 1 is built from the seed: a worker that rebuilds it bit-identically (same seed,
        # same torch init) skips the first full download (run_spec "initial_sha256").
        # Imported weights cannot be rebuilt from the seed: "" makes every worker download them.
        self.initial_sha = self.params_sha if initial is None else ""
        self.pending: list[PendingDelta] = []
        self.first_pending_at: float | None = None
        self.seen_push_ids: OrderedDict[str, None] = OrderedDict()
        self.round_times: deque[float] = deque(maxlen=16)
        self.last_merge_at = self.clock()
        self.train_loss = float("nan")
        self.val_loss = float("nan")
        self.contributors: set[str] = set()
        self.sent_bytes = 0
        self.received_bytes = 0
        self.seconds_before_restart = 0.0
        self.started_at = self.clock()
        self.state = "training"
        self.last_checkpoint_version = self.version
        self.last_checkpoint_at = self.clock()
        self.checkpoint_wall_time = time.time()
        self.evaluating = False
        self.checkpointing = False
        self.last_eval_version = -1
        self.final_summary: dict | None = None
        self.restored_from: Path | None = None
        self._restore()
        self.persistence.write_run_json(self.run.to_dict(), self.model_config.to_dict(), self.run_id)
        self._update_shard_gauge()
        self._update_worker_gauge()

    # ------------------------------------------------------------------ composed parts

    @property
    def global_params(self) -> dict[str, torch.Tensor]:
        """The global weights (read them under model_lock while the run is live)."""
        return self.merger.global_params

    @property
    def model_lock(self) -> threading.RLock:
        return self.merger.model_lock

    @property
    def outer(self):
        return self.merger.outer

    @property
    def gate(self):
        return self.merger.gate

    @property
    def down_feedback(self):
        return self.merger.down_feedback

    @property
    def workers(self) -> dict[str, WorkerRecord]:
        return self.membership.workers

    @property
    def departed_stats(self) -> dict[str, dict[str, float]]:
        return self.membership.departed_stats

    @property
    def ckpt_root(self) -> Path:
        return self.persistence.ckpt_root

    @property
    def version_mark_path(self) -> Path:
        return self.persistence.version_mark_path

    @property
    def relaying(self) -> bool:
        """Downlinks whose versions the workers replay (outer step included): "relay", "combine", "count"."""
        return self.run.compression.downlink in REPLAYED_DOWNLINKS

    # ------------------------------------------------------------------ helpers

    def elapsed(self) -> float:
        return self.seconds_before_restart + (self.clock() - self.started_at)

    def _metric(self, name: str, *labels: str) -> Any:
        if self.metrics is None:
            return None
        metric = getattr(self.metrics, name)
        return metric.labels(*labels) if labels else metric

    def _session(self, worker_id: str, session_id: str) -> WorkerRecord:
        return self.membership.session(worker_id, session_id)

    def check_session(self, worker_id: str, session_id: str) -> None:
        """NotFound unless (worker_id, session_id) is a live session; renews its lease."""
        with self.lock:
            self._session(worker_id, session_id)

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
        Membership.check_join(name, protocol_version, device=device, fingerprint=fingerprint, advertise=advertise,
                              sync_group=sync_group)
        with self.lock:
            carried = self.membership.carried_pushes(previous_worker_id)
            if previous_worker_id in self.workers:
                self._drop(previous_worker_id, "rejoined")
                self.membership.departed_pushes.pop(previous_worker_id, None)
            record = self.membership.admit(name, device, memory_bytes, fingerprint, advertise, sync_group,
                                           previous_worker_id, carried)
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
            self.rates.observe(worker_id, stats.get("step_seconds", 0.0), stats.get("tokens_per_second", 0.0))
            if self.metrics is not None:
                self.metrics.observe_worker(record.name, stats, record.merged_tokens)
            # Only a finished run stops workers: while finishing, an idle worker stays (its lease
            # requests get "ask again soon") so it can retrain tokens a dying worker gives back.
            stop = self.state == "finished"
            return ("STOP" if stop else "CONTINUE"), self.version

    def round_steps(self) -> int:
        """Inner steps per round now (HeartbeatReply.round_steps): round.steps_for the number of
        deltas a round merges, one per live async worker and one per sync group."""
        with self.lock:
            return self._round_steps()

    def _round_steps(self) -> int:
        units = {self.groups.group_of(w.worker_id) or f"worker:{w.worker_id}" for w in self.membership.live()}
        return self.run.round.steps_for(len(units))

    def round_seconds_cap(self) -> float:
        """Seconds after which a step-based round ends anyway (HeartbeatReply.round_seconds_cap;
        coordinator/pacing.py round_time_cap over the live workers and round_steps; 0 = none)."""
        with self.lock:
            steps = [self.rates.step_seconds.get(w.worker_id, 0.0) for w in self.membership.live()]
            return round_time_cap(steps, self._round_steps(), self.run.round.time_cap)

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
            due = self._merge_due()
        if due:
            self._run_merges()

    def _drop(self, worker_id: str, why: str) -> None:
        """Forget a worker: discard its pending delta, return its leased tokens. Caller holds the lock."""
        record = self.membership.remove(worker_id)
        self.rates.forget(worker_id)
        self.groups.remove(worker_id, why)
        self.pending = [c for c in self.pending if c.worker_id != worker_id]
        returned = self.ledger.release(worker_id)
        if record is not None and why != "left":
            log.warning("worker %s dropped (%s); %d leased tokens return to the pool", record.name, why, returned)
        self._update_worker_gauge()

    def _update_worker_gauge(self) -> None:
        gauge = self._metric("workers")
        if gauge is not None:
            gauge.set(len(self.membership.live()))

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
        r = self.ledger.lease(worker_id, self._lease_cap(worker_id))
        if r is None and self.ledger.finished():
            return True, None  # budget spent and every leased token committed
        if r is not None and self.state == "finishing":
            # a dropped worker's tokens came back after the budget was leased out
            log.info("leased tokens returned to the pool: training again")
            self.state = "training"
        self._update_shard_gauge()
        return False, r

    def _lease_cap(self, worker_id: str) -> int:
        """Tokens a lease to `worker_id` may hold now (0 = a unit's whole free range): smaller
        leases near the end of the budget (coordinator/pacing.py lease_cap)."""
        if not self.run.plan.guided_leases:
            return 0
        rates = self.rates.tokens_per_second
        live = [rates.get(w.worker_id, 0.0) for w in self.membership.live()] or [0.0]
        step_tokens = self.run.train.batch_size * self.model_config.block_size
        return lease_cap(rates.get(worker_id, 0.0), live, self.ledger.remaining_budget(), self.ledger.outstanding(),
                         step_tokens, self._round_steps())

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
        Under a replayed downlink a FULL reply ends with the outer momentum (`momentum_bytes`).
        The replies are built outside the state lock (count payloads, the full model's file)."""
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
                return ModelReply("UNCHANGED", self.version, [], self.params_sha, [])
            records = None if force_full else self.history.updates_since(have_version, self.version, held_push_ids)
            version, sha = self.version, self.params_sha
            if records is None:
                cached = self.full_model.cached(version, sha, self._own_pushes(worker_id, have_version))
                if cached is not None:
                    return cached
        if records is not None:
            return self.history.build_reply(records, held_push_ids, version, sha)
        with self.model_lock:  # the weights stand still while their file is written
            with self.lock:
                version, sha = self.version, self.params_sha
                own = self._own_pushes(worker_id, have_version)
            momentum = self.outer.momentum if self.relaying else {}
            reply = self.full_model.reply(version, sha, self.global_params, momentum, own)
        self._run_merges()
        return reply

    def _own_pushes(self, worker_id: str, have_version: int) -> list[str]:
        """The caller's pushes merged after `have_version` (a FULL reply names them). Caller holds the lock."""
        record = self.workers.get(worker_id)
        return [p for v, p in record.merged_pushes if v > have_version] if record else []

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
        """Validate a delta and queue it (semi-sync) or merge it (async). The delta is decoded for
        validation outside the state lock (INSPECT_SLOTS at a time) and kept compressed."""
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
            with self._inspect_slots:
                norm, magnitudes = self.merger.inspect(blob, self.max_blob_bytes())
        except ValueError as exc:
            self._count_delta("invalid")
            raise InvalidArgument(f"delta refused: {exc}") from exc
        with self.lock:
            accept, factor, reason = self.gate.check_norm(norm)
        if not accept:
            self._count_delta("invalid")
            raise InvalidArgument(f"delta refused: {reason}")
        if factor != 1.0:
            log.warning("clipping delta from %s: %s", worker_id, reason)
        with self.lock:
            record = self._session(worker_id, session_id)
            self._check_push_header(push_id, base_version, tokens, ranges, worker_id)  # again: state may have moved
            staleness = self.version - base_version
            self.gate.record_norm(norm, factor)
            self.seen_push_ids[push_id] = None
            while len(self.seen_push_ids) > 100_000:
                self.seen_push_ids.popitem(last=False)
            record.pushes += 1
            self.pending = [c for c in self.pending if c.worker_id != worker_id]  # at most one each
            self.pending.append(PendingDelta(push_id, worker_id, base_version, tokens, steps, mean_loss, ranges, blob,
                                             factor, norm, magnitudes))
            if self.first_pending_at is None:
                self.first_pending_at = self.clock()
            self._count_delta("accepted")
            if self.metrics is not None:
                self.metrics.delta_staleness.observe(staleness)
                self.metrics.compression_ratio.set(4 * self.num_params / max(1, len(blob)))
            due = self._merge_due()
        if due:
            self._run_merges()
        with self.lock:
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
        gets small updates instead of the full model (DownlinkHistory also bounds their bytes)."""
        return max(1, self.run.workers.history_versions, 2 * len(self.membership.live()))

    def semi_sync_timeout(self) -> float:
        """Seconds a semi-sync merge waits for the last worker (MergeConfig.semi_sync_timeout)."""
        m = self.run.merge
        if m.semi_sync_timeout > 0:
            return m.semi_sync_timeout
        if not self.round_times:
            return m.first_semi_sync_timeout
        return max(SEMI_SYNC_TIMEOUT_MIN_S, SEMI_SYNC_TIMEOUT_FACTOR * statistics.median(self.round_times))

    def _merge_due(self, now: float | None = None) -> bool:
        """Whether the policy merges the pending deltas now. Caller holds the lock."""
        if not self.pending:
            return False
        if self.run.merge.policy == "async":
            return True
        waiting_for = self._expected_workers() - {c.worker_id for c in self.pending}
        now = self.clock() if now is None else now
        timed_out = self.first_pending_at is not None and now - self.first_pending_at >= self.semi_sync_timeout()
        if waiting_for and timed_out:
            log.info("semi-sync timeout: merging without %d straggler(s)", len(waiting_for))
        return not waiting_for or timed_out

    def _maybe_merge(self, now: float | None = None) -> None:
        """Merge when the policy says so. Caller must not hold the state lock."""
        with self.lock:
            due = self._merge_due(now)
        if due:
            self._run_merges(now)

    def _run_merges(self, now: float | None = None) -> None:
        """Run the merges that are due, unless another thread holds the model lock (it runs them
        when it lets go: every holder calls this after releasing). Caller must not hold the state lock."""
        while True:
            if not self.model_lock.acquire(blocking=False):
                return
            try:
                while self._merge_once(now):
                    pass
            finally:
                self.model_lock.release()
            with self.lock:
                if not self._merge_due(now):
                    return

    def _merge_once(self, now: float | None) -> bool:
        """One merge if one is due: batch and weights under the state lock, the arithmetic under
        the model lock only, the commit under both. Returns whether a batch was taken."""
        with self.lock:
            if not self._merge_due(now):
                return False
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
                return True
            scale = 1.0
            if self.run.merge.policy == "async":
                scale = 1.0 / max(1, self._participants())  # one delta moves the model by its share
            # Downlink "count": the deltas of one round differ by the steps trained while a push was
            # in flight; equal weights keep their merge a count of signs. Merges of deltas of clearly
            # different sizes (the run's last, partial rounds) keep token weights (and are relayed).
            sizes = [max(1, c.tokens) for c in valid]
            equal = self.run.merge.weights == "equal" or (
                self.run.compression.downlink == "count" and max(sizes) <= COUNT_TOKEN_SPREAD * min(sizes))
            weights = merge_weights(valid, self.version, self.run.merge.staleness_power, scale, by_tokens=not equal)
            version = self.version
        result = self.merger.apply(valid, weights, sum(c.tokens for c in valid), version, self.run_id)
        with self.lock:
            self._commit_merge(valid, result, started)
        return True

    def _commit_merge(self, valid: list[PendingDelta], result: MergeResult, started: float) -> None:
        """Publish a merge's version and commit its ranges. Caller holds both locks."""
        self._publish(result.blob, result.params_sha256, [c.push_id for c in valid], result.relayed,
                      result.outer_fraction, result.counted)
        tokens = 0
        for c in valid:
            try:
                committed = self.ledger.commit(c.worker_id, c.ranges)
            except LedgerError as exc:  # the worker was dropped while its delta merged
                log.warning("delta %s merged but its ranges returned to the pool (trained again): %s", c.push_id, exc)
                continue
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
        log.info(
            "version %d: merged %d delta(s)%s, %d tokens, train loss %.4f",
            self.version, len(valid), " as counts" if result.counted is not None else "", tokens, self.train_loss,
        )

    def _publish(self, blob: bytes, sha: str, push_ids: list[str], relayed: list[RelayedDelta] | None = None,
                 outer_fraction: float = 1.0, counted: CountedRecord | None = None) -> None:
        """The weights (already changed) become the next version, kept in the history (as `blob`,
        or as the relayed deltas / count record, what workers download). Caller holds both locks."""
        self.version += 1
        self.persistence.write_version_mark(self.version)
        self.params_sha = sha
        self.history.append(UpdateRecord(self.version, blob, push_ids, sha, relayed or [], outer_fraction, counted),
                            self._history_limit())
        self.version_changed.notify_all()

    def _drop_lookahead(self) -> None:
        """When every token is merged, the final model is the global model minus the outer
        Nesterov lookahead (lr * mu * m), applied as one last, uncompressed version. The lookahead
        anticipates rounds that will not come; at the end of the inner schedule the deltas shrink
        while m still remembers larger ones, and the lookahead overshoots: on the final checkpoints
        of 2000-step nano runs (benchmarks/README.md) dropping it lowered the validation loss by
        0.2-1.5%. Not done when a run is merely stopped: a resumed run continues from the lookahead
        point its momentum belongs to."""
        with self.model_lock:
            lookahead = self.outer.lookahead()
            if lookahead is None or global_norm(lookahead) == 0.0:
                return
            norm = global_norm(lookahead)
            blob, sha = self.merger.apply_plain({n: -t for n, t in lookahead.items()})
            del lookahead
            with self.lock:
                self._publish(blob, sha, [])
                log.info("version %d: final model without the outer Nesterov lookahead (norm %.4g)", self.version, norm)

    # ------------------------------------------------------------------ periodic work

    def tick(self) -> None:
        """Called by the server every ~0.5 s: expiry, timeouts, finishing, checkpoint/eval triggers."""
        with self.lock:
            now = self.clock()
            for record in self.membership.silent(now):
                self._drop(record.worker_id, f"no heartbeat for {now - record.last_seen:.0f}s")
        self._maybe_merge(now)
        with self.lock:
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
        """Validation loss of the current global model (deterministic batches, at most
        eval.max_tokens tokens), computed outside the state lock (coordinator/evaluation.py)."""
        on_cpu = self.evaluator.device.type == "cpu"
        with self.model_lock:  # the version cannot move while the weights are read
            with self.lock:
                version, tokens = self.version, self.ledger.committed_total
            params = self.evaluator.on_device(self.global_params)
            if on_cpu:
                val = self.evaluator.loss(params, iters)
        if not on_cpu:
            val = self.evaluator.loss(params, iters)
        hellaswag = None
        if self.hellaswag is not None:  # eval.hellaswag_file: a sample, on a model built for it
            with self.model_lock:
                model = GPT(self.model_config)
                model.load_state_dict({k: t for k, t in self.global_params.items()}, strict=False)
            hellaswag = evaluate_hellaswag(model.eval(), self.data.tokenizer(), self.hellaswag, progress=False)["acc_norm"]
            del model
        del params
        self._run_merges()
        with self.lock:
            self.val_loss = val
            self.last_eval_version = max(self.last_eval_version, version)
            if self.metrics is not None:
                self.metrics.val_loss.set(val)
                if hellaswag is not None:
                    self.metrics.hellaswag_acc_norm.set(hellaswag)
            row = {"seconds": round(self.elapsed(), 3), "train_loss": self.train_loss,
                   "version": version, "tokens": tokens, "val_loss": val}
            if hellaswag is not None:
                row["hellaswag_acc_norm"] = hellaswag
            row["workers"] = {w.name: w.stats for w in self.workers.values()}
        self.persistence.append_history(row)
        log.info("version %d: validation loss %.4f", version, val)
        return val

    def _maybe_checkpoint(self) -> None:
        cfg = self.run.checkpoint
        with self.lock:
            due = self.version > self.last_checkpoint_version and (
                self.version - self.last_checkpoint_version >= cfg.every_versions
                or self.clock() - self.last_checkpoint_at >= cfg.every_seconds
            )
            if not due or self.checkpointing:
                return
            self.checkpointing = True
        try:
            self.checkpoint()
        except OSError as exc:  # full disk etc.: loud, keep training, the previous one stays
            log.error("checkpoint failed, training goes on, previous checkpoint kept: %s", exc)
            if self.metrics is not None:
                self.metrics.checkpoint_failures.inc()
            with self.lock:
                self.last_checkpoint_at = self.clock()
        finally:
            self.checkpointing = False

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> Path:
        """Write an atomic checkpoint of everything needed to resume exactly. The tensors are
        written in place under the model lock (merges wait; the state lock is free meanwhile)."""
        with self.model_lock:
            with self.lock:
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
            path = self.persistence.save(version, self.merger.state_tensors(), state)
        with self.lock:
            self.last_checkpoint_version = version
            self.last_checkpoint_at = self.clock()
            self.checkpoint_wall_time = time.time()
        log.info("checkpoint %s written", path.name)
        self._run_merges()
        return path

    def _write_version_mark(self) -> None:
        self.persistence.write_version_mark(self.version)

    def _restore(self) -> None:
        loaded = self.persistence.load()
        if loaded is None:
            mark = self.persistence.read_version_mark()
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
        self.merger.load_state_tensors(tensors)
        del tensors
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
        mark = self.persistence.read_version_mark()
        if mark > self.version:
            log.warning("versions %d..%d were lost with the crash; the restored model becomes version %d",
                        self.version + 1, mark, mark + 1)
            self.version = mark + 1
            self._write_version_mark()
        self.last_checkpoint_version = self.version
        self.last_eval_version = self.version
        self.restored_from = path
        log.info("resumed from %s at version %d (%d tokens merged)", path.name, self.version, self.ledger.committed_total)

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

    def summary(self) -> dict:
        with self.lock:
            stats = self.membership.all_stats()
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
                "round_steps": self._round_steps(),
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
