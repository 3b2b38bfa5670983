"""The worker's local state against the global model: basepoint, pending ranges, the push in
flight, and the rebase rules that apply what the comm thread (worker/comm.py) delivers.

The local weights always satisfy ``params = base + L`` where ``base`` is the global model at
``base_version`` (verified with params_sha256) and ``L`` is everything this worker trained that the
global model does not contain yet. Rebase rules (`apply_update`, `rebase_full`):

- update U (global(v) = global(v-1) + U):  base += U; params += U.
- if U merged our in-flight push P:          params -= decoded(P)   (exactly what was merged)
- FULL reply G:  params += G - base; base = G; and params -= decoded(P) when G contains P.
- STALE / lost / refused push: subtract nothing; its ranges stay pending and its progress stays in
  ``params - base``, so the next delta carries it again.

Error feedback is *implicit*: the compression error ``d - decoded(P)`` stays in ``params - base``
and therefore goes out with the next delta. A separate ErrorFeedback buffer on top of this would
send the residual twice (once from params, once from the buffer), so encode_tensors is called with
feedback=None; `residual_norm` reports ||d - decoded|| of the last push.

When does a FULL reply contain our push P? The header lists our pushes merged after the version
we asked from (ModelHeader.merged_push_ids): P is in it, or not yet merged. A FULL whose version
is below P's base_version means the coordinator lost history (restored an older checkpoint): P is
treated as lost (kept in params); an accepted P still unmerged after max_staleness + 2 versions
is treated the same way.

Host memory: `base` (fp32, CPU) and the in-flight push's decoded delta are the two model copies
this state holds besides the device weights; a push is built one tensor at a time where it can be
(`make_push`). `RoundState` belongs to the training thread; the comm thread encodes a sealed
Push (`encode_push`: its `delta` becomes `decoded`, before the push goes out), reads its `decoded`
and sets its `accepted_version` / `resolved`.

What stays on the training thread is what must happen between two optimizer steps: the delta
snapshot of a push (`snapshot_push`: params - base, one subtraction per tensor) and the rebase's
additions to params. The push's encoding runs on the comm thread; the rebase's additions to base
(base += U) and the basepoint's checksum at the version they reach run on the `base` thread (one
job at a time), and everything on the training thread that reads or changes `base` waits for the
job first (`wait_base`); it has usually finished steps before.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc
import torch

from geotrain.common.config import CompressionConfig, RoundConfig
from geotrain.common.tensors import add_, params_sha256
from geotrain.protos import geotrain_pb2 as pb
from geotrain.worker.metrics import StatsBook

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- rebase arithmetic


def apply_update(
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    own_decoded: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """One merged update U, in place: base += U; params += U; params -= own_decoded (when U
    contains our push). Keeps params - base = local progress not yet in the global model."""
    add_(base, update)
    add_update_to_params(params, update, own_decoded)


def add_update_to_params(
    params: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    own_decoded: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """The params half of `apply_update`: params += U, or params += (U - own_decoded) as one
    addition (exact when the update is our own delta alone). RoundState does the base half
    (base += U) on its `base` thread."""
    if own_decoded is None:
        add_(params, update)
    else:
        for n, u in update.items():
            p = params[n]
            p.add_((u.to(torch.float32) - own_decoded[n].to(u.device, torch.float32)).to(p.device, p.dtype))


def all_finite_exact(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True iff every value of every tensor is finite: one float64 sum per tensor (a NaN or an
    infinity makes it non-finite; a sum of finite float32 values cannot overflow float64) and one
    host sync for all of them. Cheaper than isfinite(t).all(), which writes a bool per value."""
    sums = [t.detach().sum(dtype=torch.float64) for t in tensors.values()]
    if not sums:
        return True
    device = sums[0].device
    return bool(torch.isfinite(torch.stack([s.to(device) for s in sums])).all())


def rebase_full(
    params: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    full: Mapping[str, torch.Tensor],
    own_decoded: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """A full global model G, in place: params += G - base; base = G; params -= own_decoded."""
    if set(full) != set(base):
        raise ValueError("full model names differ from the local model")
    for name, b in base.items():
        g = full[name].to(b.device, torch.float32)
        params[name].add_((g - b).to(params[name].device, params[name].dtype))
        b.copy_(g)
    if own_decoded is not None:
        add_(params, own_decoded, alpha=-1.0)


def full_contains_push(version: int, base_version: int, push_id: str, merged_push_ids) -> bool | None:
    """Whether a FULL model at `version` contains our push: True, False (not yet), or None (lost:
    the model is older than the push's base, so the coordinator restarted without it)."""
    if version < base_version:
        return None
    return push_id in merged_push_ids


# --------------------------------------------------------------------------- state


@dataclass
class Push:
    push_id: str
    base_version: int
    decoded: dict[str, torch.Tensor] | None  # what the coordinator decodes (fp32, CPU); None until encoded
    n_ranges: int
    steps: int
    tokens: int
    loss_sum: float
    accepted_version: int = -1
    resolved: bool = False  # merge seen, STALE, lost or refused
    pushed_at_step: int = 0  # the worker's local_step when the push was made
    session: int = 0  # client.session_epoch it was trained in; never sent under a later one
    delta: dict[str, torch.Tensor] | None = None  # params - base at the seal (fp32, CPU), until encoded
    header: pb.DeltaHeader | None = field(default=None, repr=False)


@dataclass
class PendingRange:
    """Tokens [start, end) of a leased unit trained since the last merged push."""

    unit_id: int
    shard: str
    start: int
    end: int
    epoch: int
    steps: int
    loss_sum: float
    session: int  # the client's session epoch it was leased in (a push is never sent under a later one)


class NewRun(Exception):
    """The coordinator started another run: set everything up again."""


class RoundState:
    """params = base + L bookkeeping of one run (training thread).

    params: the model's tensors (device); base: fp32 CPU copy of the global model at base_version.
    `handle(msg)` applies one message of the comm thread's inbox (worker/comm.py lists them).
    """

    def __init__(self, params: dict[str, torch.Tensor], base: dict[str, torch.Tensor], base_version: int,
                 run_id: str, stats: StatsBook, need_full: threading.Event, metrics=None,
                 release_push: Callable[[str], None] | None = None, on_reset: Callable[[], None] | None = None,
                 on_params_changed: Callable[[], None] | None = None):
        self.params = params
        self.base = base
        self.base_version = base_version
        self.run_id = run_id
        self.stats = stats
        self.metrics = metrics
        self.release_push = release_push or (lambda push_id: None)  # a resolved push's held payload
        self.on_reset = on_reset or (lambda: None)  # local weights reset to base: clear the optimizer
        # the params changed outside the optimizer (rebase, reset): a multi-device worker's
        # followers take them (worker/host_group.py HostGroup.params_changed)
        self.on_params_changed = on_params_changed or (lambda: None)
        self.need_full = need_full  # set: the comm thread fetches the full model (shared with it)
        self.inflight: Push | None = None
        self.pending: list[PendingRange] = []
        self.sealed = 0  # pending[:sealed] went out with the push in flight
        self.local_step = 0
        self.round_steps = 0
        self.round_start = time.monotonic()
        self._base_thread: threading.Thread | None = None  # the base thread's job in progress

    # ------------------------------------------------------------------ the base thread

    def wait_base(self) -> None:
        """Training thread: wait for the base thread's job (base += U, checksum), if any. Called
        before `base` is read or changed, so base is at base_version and the checksum hashes the
        basepoint of the version it verifies."""
        thread, self._base_thread = self._base_thread, None
        if thread is not None:
            thread.join()

    def _base_later(self, updates: list[Mapping[str, torch.Tensor]], version: int, sha: str, resync: bool) -> None:
        """On the `base` thread: base += U for each update in order, then, when `sha` is given,
        check params_sha256(base) == sha. A mismatch is logged; with `resync` it also asks the comm
        thread for the full model (need_full) and counts a resync."""
        self.wait_base()

        def verify() -> None:
            try:
                with torch.no_grad():
                    for update in updates:
                        add_(self.base, update)
                if not sha:
                    return
                ok = params_sha256(self.base) == sha
            except Exception as exc:  # noqa: BLE001 - a basepoint that fails to update is a mismatch
                log.error("basepoint update or checksum at version %d failed: %s", version, exc)
                ok = False
            if ok:
                return
            if resync:
                log.error("basepoint checksum mismatch at version %d: resyncing with the full model", version)
                self.stats.add(resyncs=1)
                self.need_full.set()
            else:
                log.error("full model at version %d does not match its announced checksum", version)

        self._base_thread = threading.Thread(target=verify, name="base", daemon=True)
        self._base_thread.start()

    # ------------------------------------------------------------------ training bookkeeping

    def record_range(self, lease, start: int, end: int, loss: float) -> None:
        """One step trained tokens [start, end) of `lease` (worker/shards.py Lease)."""
        last = self.pending[-1] if len(self.pending) > self.sealed else None
        if (last is not None and last.unit_id == lease.unit_id and last.epoch == lease.epoch and last.end == start
                and last.session == lease.session):
            last.end = end
            last.steps += 1
            last.loss_sum += loss
        else:
            self.pending.append(PendingRange(lease.unit_id, lease.shard, start, end, lease.epoch, 1, loss, lease.session))

    def push_session(self, current: int) -> int:
        """The session a push of the pending ranges belongs to: the oldest one they were leased in
        (`current`, the client's, when none). A rejoin may land between the last step and its
        handling (`drop_unmerged`); a push sealed then carries old-session ranges and must not go
        out under the new session."""
        return min((p.session for p in self.pending), default=current)

    def round_over(self, r: RoundConfig, seconds_cap: float = 0.0, steps: int = 0) -> bool:
        """The round is over: `steps` steps trained (the coordinator's HeartbeatReply.round_steps;
        0: r.steps), or (step-based rounds) seconds_cap > 0 seconds passed with at least one step
        (the coordinator's HeartbeatReply.round_seconds_cap: a slower worker pushes with the
        fastest), or (time-based rounds) r.seconds passed."""
        if r.steps > 0:
            if self.round_steps >= (steps or r.steps):
                return True
            return seconds_cap > 0 and self.round_steps > 0 and time.monotonic() - self.round_start >= seconds_cap
        return time.monotonic() - self.round_start >= r.seconds

    def lag_exhausted(self, max_lag_steps: int) -> bool:
        """max_lag_steps > 0 and the push in flight is that many steps old."""
        push = self.inflight
        return max_lag_steps > 0 and push is not None and self.local_step - push.pushed_at_step >= max_lag_steps

    def unsent_steps(self) -> int:
        return sum(p.steps for p in self.pending[self.sealed:])

    # ------------------------------------------------------------------ pushes

    def make_push(self, c: CompressionConfig, scheme: str | None, session: int) -> tuple[Push, pb.DeltaHeader, bytes]:
        """The delta since the basepoint, encoded with `scheme` (default: the run's), all on the
        calling thread: `snapshot_push` then `encode_push`."""
        push = self.snapshot_push(session)
        blob = self.encode_push(push, c, scheme)
        return push, push.header, blob

    def snapshot_push(self, session: int) -> Push:
        """Training thread: a Push of every pending range with its delta params - base (fp32 CPU,
        one model copy, taken now: the next step changes params). Not encoded yet (`encode_push`)."""
        with torch.no_grad():
            self.wait_base()  # base is final for base_version
            delta = {n: p.detach().to("cpu", torch.float32) - self.base[n] for n, p in self.params.items()}
        ranges = [pb.TokenRange(unit_id=p.unit_id, shard=p.shard, start=p.start, end=p.end, epoch=p.epoch)
                  for p in self.pending]
        steps = sum(p.steps for p in self.pending)
        loss_sum = sum(p.loss_sum for p in self.pending)
        tokens = sum(p.end - p.start for p in self.pending)
        push = Push(uuid.uuid4().hex, self.base_version, None, len(self.pending), steps, tokens, loss_sum,
                    pushed_at_step=self.local_step, session=self.push_session(session), delta=delta)
        push.header = pb.DeltaHeader(push_id=push.push_id, base_version=push.base_version, tokens=tokens, steps=steps,
                                     mean_loss=loss_sum / max(1, steps), ranges=ranges)
        self.stats.add(pushes=1)
        return push

    def encode_push(self, push: Push, c: CompressionConfig, scheme: str | None) -> bytes:
        """Any thread (the comm thread, before sending): encode the push's delta with `scheme`
        (default: the run's) and return the payload; `push.decoded` is then what the coordinator
        decodes and `push.delta` is let go. The compression error stays in params - base, so the
        next push carries it (implicit error feedback). Host memory: the delta and its decoded
        form (2 model copies) while encoding; afterwards the decoded form only."""
        from geotrain.common.compression import encode_tensors

        delta = push.delta
        if delta is None:
            raise ValueError(f"push {push.push_id[:8]} has no delta to encode (encoded already?)")
        blob, decoded = encode_tensors(delta, scheme or c.scheme, c.chunk, feedback=None, zstd_level=c.zstd_level)
        decoded = {n: t.detach().float().cpu() for n, t in decoded.items()}
        residual_sq = 0.0
        for n, d in delta.items():  # ||delta - decoded||, one tensor at a time
            residual_sq += float(((d - decoded[n]).double() ** 2).sum())
        push.decoded = decoded
        push.delta = None
        del delta
        self.stats.set(residual_norm=residual_sq ** 0.5)
        return blob

    def seal(self, push: Push) -> None:
        """`push` (of every pending range) goes out now: it is the push in flight."""
        self.sealed = len(self.pending)
        self.inflight = push
        self.round_steps = 0
        self.round_start = time.monotonic()

    # ------------------------------------------------------------------ the comm thread's messages

    def drain(self, inbox: queue.Queue) -> None:
        while True:
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                return
            self.handle(msg)

    def resolve(self, push: Push, merged: bool) -> None:
        if self.inflight is not push:
            return
        push.resolved = True
        self.inflight = None
        self.sealed = 0
        self.release_push(push.push_id)
        if merged:
            # The next round counts from the merge, not from the push: every worker of a semi-sync
            # merge gets it at about the same moment, so their next pushes arrive together and the
            # merge waits less for the last one (the lag until the merge is what makes updates late).
            self.round_steps = 0
            self.round_start = time.monotonic()
            del self.pending[: push.n_ranges]
            lag = self.local_step - push.pushed_at_step
            self.stats.add(merged=1, merge_lag_steps=lag)
            if self.metrics is not None:
                self.metrics.merge_lag_steps.observe(lag)

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "fatal":
            raise msg[1]
        if kind == "pushed":
            push, reply = msg[1], msg[2]
            if reply.result == pb.PushReply.STALE:
                log.info("push %s stale (staleness %d): its progress goes out again", push.push_id[:8], reply.staleness)
                self.stats.add(stale=1)
                self.resolve(push, merged=False)
        elif kind in ("push_failed", "push_lost"):
            push = msg[1]
            if kind == "push_failed":
                exc = msg[2]
                code = exc.code().name if isinstance(exc, grpc.RpcError) else type(exc).__name__
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                if code == "INVALID_ARGUMENT" and self.inflight is push:
                    # Refused for good: resending the same ranges is refused again, forever (e.g.
                    # after a coordinator restart lost the merges before them, the ranges no longer
                    # continue the committed cursor). Drop the ranges (the tokens are leased and
                    # trained again); the weight progress stays and goes out with the next delta.
                    log.error("push %s refused (%s: %s): dropping its %d range(s), resyncing",
                              push.push_id[:8], code, details, push.n_ranges)
                    del self.pending[: push.n_ranges]
                    self.sealed = 0
                else:
                    log.error("push %s refused (%s: %s): keeping its progress, resyncing", push.push_id[:8], code, details)
                self.need_full.set()
            self.resolve(push, merged=False)
        elif kind == "updates":
            # apply_update split in two: params here (before the next step), base on the base
            # thread with the checksum of the version it ends at (a mismatch resyncs in full)
            self.wait_base()
            last_sha = ""
            with torch.no_grad():
                for version, tensors, sha, own, counted_own in msg[1]:
                    decoded = None
                    if own is not None and own is self.inflight:  # a count merge took our signs at its scale
                        decoded = counted_own if counted_own is not None else own.decoded
                    add_update_to_params(self.params, tensors, decoded)
                    if decoded is not None:
                        self.resolve(own, merged=True)
                    self.base_version = version
                    last_sha = sha
            if msg[1]:
                self._base_later([u[1] for u in msg[1]], self.base_version, last_sha, resync=True)
            self.after_rebase()
        elif kind == "full":
            _, version, full, sha, own, lost = msg
            self.wait_base()
            decoded = own.decoded if own is not None and own is self.inflight else None
            with torch.no_grad():
                rebase_full(self.params, self.base, full, decoded)
            if decoded is not None:
                self.resolve(own, merged=True)
            elif lost and self.inflight is not None:
                self.resolve(self.inflight, merged=False)
            self.base_version = version
            if sha:
                self._base_later([], version, sha, resync=False)
            self.after_rebase()
        elif kind == "rejoined":
            reply = msg[1]
            if reply.run_id != self.run_id:
                raise NewRun()
            log.warning("session renewed: dropping the current lease")
            self.drop_unmerged()
            if reply.model_version < self.base_version:
                self.need_full.set()

    def reset_to_base(self) -> None:
        """Local progress dropped: params = base."""
        self.wait_base()
        with torch.no_grad():
            for n, t in self.params.items():
                t.copy_(self.base[n].to(t.device, t.dtype))

    def drop_unmerged(self) -> None:
        """After a rejoin: the coordinator released every range leased in the old session (or
        restarted from a checkpoint), so pending ranges can never be committed and pushing them
        is refused forever. Drop them and the progress they carry (params back to base); those
        tokens are retrained by whoever leases them. An in-flight push is no longer ours to
        subtract: if it still merges, its update arrives like any other."""
        steps = sum(p.steps for p in self.pending)
        if steps:
            log.warning("dropping %d unmerged local steps of the old session; their tokens are retrained", steps)
        if self.inflight is not None:
            self.inflight.resolved = True  # the comm thread stops waiting for its merge
            self.release_push(self.inflight.push_id)
        self.pending, self.sealed, self.inflight = [], 0, None
        self.reset_to_base()
        self.on_params_changed()

    def after_rebase(self) -> None:
        if not all_finite_exact(self.params):
            log.error("local weights are not finite: dropping local progress, restarting from the global model")
            self.reset_to_base()
            self.on_reset()
        self.on_params_changed()
        if self.metrics is not None:
            self.metrics.model_version.set(self.base_version)

