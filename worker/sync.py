"""Synchronous data-parallel training of one GPT across a power-of-two sync group.

Every member computes gradients on its own batch; the members average them and every member applies
the same AdamW step to the same parameters from the same decoded bytes, so the parameters stay
bit-identical.

What is averaged depends on the group's compression:
  "none": fp32 gradients every step; clip the mean gradient; torch AdamW. Plain data parallel.
  "sign" (1 bit per value + a scale per chunk, error feedback), in three modes:
  - warmup (all modes but "gradient"): the first `warmup_steps` optimizer steps all-reduce
    gradients in int8 (8 bits + a scale per chunk, error feedback; `warmup_compression="none"`:
    fp32) and take the torch AdamW step on the mean, as "none" does (a sibling CompressedAllReduce
    on the same server, group_id + "/warmup"). Default: 25% of total_steps (DeepSpeed: 15-25%).
  - "update" (default): each member keeps its own Adam moments from its LOCAL gradient
    (m_i, v_i, bias-corrected), all-reduces the Adam direction u_i = m_i^ / (sqrt(v_i^) + eps) with
    1 bit + error feedback, and every member applies p <- p * (1 - lr * wd) - lr * mean(u) from the
    same decoded bytes. Adam directions are near +-1, which sign compression keeps well, and v
    never sees quantization noise. Differs from fp32 AdamW in that v_i comes from one member's
    batch (it also holds that batch's sampling noise, so noisy coordinates get a smaller step) and
    the moments of the members differ (a repair copies rank 0's). The VarianceProbe (below) scales
    each tensor's v by the group-vs-local second-moment ratio it measures on a few probe
    coordinates, which removes most of that difference.
  - "momentum" (DeepSpeed 1-bit Adam): v frozen after warmup, m_local = beta1 m + (1 - beta1) g_i
    all-reduced with 1 bit, p <- p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps) with bc2 at the
    freeze step; `variance_refresh_every` N makes every Nth step an fp32 AdamW step (0/1 Adam).
    Measured unusable for short, fast-moving runs: with v frozen at step 15-45 the nano model stalls
    at the unigram plateau (val 2.8, even with exact fp32 momentum), because coordinates whose v
    was tiny at the freeze take huge steps later. Kept for long runs where v has settled.
  - "gradient": the old behaviour, compressed gradients into AdamW (measured 26%-150% worse).
  After warmup the gradient clip applies to each member's LOCAL gradient (same global-norm
  threshold) because the mean gradient is never materialised.

Quality (benchmarks/bench_sync_quality.py: the tests/test_sync.py setup, nano 1x32, the same
init and batches for fp32 and 1-bit sync). Over a whole run on the worker's lr schedule (1000
steps, warmup, cosine decay), seeds 0-3, with the int8 warmup: 2 members -0.4% to +2.0% of fp32
sync's validation loss (mean +0.5%), 4 members ("count") -4.9% to +1.0%; with an fp32 warmup
-1.1% to +0.6% and -1.0% to +0.7% (the figures below are with an fp32 warmup). Early in a run,
at a constant lr 3e-3 for 100 steps, the loss is falling fastest right after the unigram plateau and a few steps' delay is several
percent: 2 members, 8 seeds, +3.7% on average, one seed +13.8% (no quantization at all, local
moments alone: +1.8%, up to +5.3%). Two things decide it:
  - the 1-bit scale: sqrt(mean y^2) per chunk (the default; norm-preserving, as 1-bit Adam and
    TScale do) rather than mean |y| (the L2-optimal scale of one step): mean |y| sends a shorter
    vector than y every step, error feedback carries the difference, and the backlog (residual
    norm above the direction's own) delays the large, consistent coordinates. Whole runs: +0.10%
    vs +0.35% mean at 4 members; 100 constant-lr steps at 2 members: +3.7% vs +5.9%.
  - the VarianceProbe's floor (1/N, see the class): without it the ratio fell to 0.01 on the
    plateau and 2 of 8 seeds stalled (+50%, +59% at 100 steps, mean |y| scales, chunk 64).
Found before those two (mean |y| scales, 100 / 300 constant-lr steps, seed 0): "gradient" mode
+26% / +150%; local v without the probe +2.9% / +8.9%; "momentum" mode stalls on the plateau. The
schedule matters as much as the scale: quantizing a sum of directions erases the cancellation
between members that disagree (a sign has no zero): 2 members "halving" +14.7% at 300 steps
against "doubling" +0.05%; 4 members "halving" +5.2% / +25-31%, "scatter" (the mean re-quantized
ternary) +1.4-3.9% / +10-16%, "allgather" and "count" (each member's own direction quantized once)
within a few % of each other (tests/test_sync.py measures count against allgather); 8 members
halving +9.0% / +66%, scatter +4.3% / +16%, allgather +4.8% / +2.5%.

Every `check_every` steps (and before the first step of a group) the members compare a sha256 of their parameters with rank 0's; a member that
differs fetches rank 0's full state (model + optimizer + step) and logs it. The first check of a
group is the members' entry (counted in `joins`: they come with their own weights); a mismatch
after it is a defect that the repair hides, counted in `repairs` (geotrain_sync_repairs_total).

Rebases (`rebase`): rank 0 of a group inside an async run changes its parameters outside the
optimizer when merged updates arrive (worker/group_runner.py). It applies each change c as one
addition p <- p_before + c, keeps c, and announces it in the next step's all-reduce headers; every
other member fetches c from rank 0 (FetchRebase) and adds it the same way before that step's
optimizer update, so identical parameters stay identical bit for bit (fp32 additions of the same
operands; the member's gradient of that one step was taken before the change). Bytes: 4 per
parameter per rebase (a repair moves the model and both Adam moments).

Failure policy (what the worker driving this does with `PeerFailure`):
  `step()` raises the PeerFailure of the all-reduce (or of a checksum / state fetch) unchanged, with
  `survivors` (ranks that answered a Status probe and look healthy). No optimizer step is applied on
  a failed all-reduce, but with halving/doubling/scatter some members may have completed theirs before the
  failure: parameters may now differ by one step. The worker then
    1. closes the failed group's CompressedAllReduce (its server keeps running),
    2. reports the survivors to the coordinator, which re-forms the group from the largest power of
       two of survivors (new group_id or epoch, rank 0 = the lowest surviving rank),
    3. calls `set_group(new_allreduce)`; the next `step()` first runs a checksum round, so members
       that diverged are repaired from the new rank 0 before training on,
    4. members left out (and a group of one) fall back to async training as a solo participant.
  A checksum or state fetch that fails raises PeerFailure the same way.

Repair needs rank 0's state to be at the step the asker expects: every member checks at the same
points and the next all-reduce needs every member, so rank 0 cannot move on while one repairs.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import math

from geotrain.common.config import OptimConfig, SyncConfig
from geotrain.common.model import configure_optimizer
from geotrain.common.step import forward_backward
from geotrain.common.tensors import params_sha256
from geotrain.worker.allreduce import CompressedAllReduce, PeerFailure  # noqa: F401 - re-exported for callers

log = logging.getLogger(__name__)

MODES = ("momentum", "update", "gradient")
WARMUP_SCHEMES = ("int8", "none")  # the warmup / refresh / probe all-reduce of a compressed group
DEFAULT_WARMUP_FRACTION = SyncConfig.compression_warmup  # of total_steps, when the caller knows them (DeepSpeed: 15-25%)
DEFAULT_WARMUP_STEPS = 100       # otherwise


def warmup_steps_for(compression_warmup: int | float | None, total_steps: int | None) -> int:
    """Steps of fp32 warmup: an int is a step count; a float in (0, 1) a fraction of total_steps;
    None the default (DEFAULT_WARMUP_FRACTION of total_steps, or DEFAULT_WARMUP_STEPS)."""
    if compression_warmup is None:
        if total_steps:
            return max(1, round(DEFAULT_WARMUP_FRACTION * total_steps))
        return DEFAULT_WARMUP_STEPS
    if isinstance(compression_warmup, float) and not compression_warmup.is_integer():
        if not 0 < compression_warmup < 1:
            raise ValueError(f"compression_warmup fraction must be in (0, 1), got {compression_warmup!r}")
        if not total_steps:
            raise ValueError("a fractional compression_warmup needs total_steps")
        return max(1, round(compression_warmup * total_steps))
    if compression_warmup < 1:
        raise ValueError(f"compression_warmup must be >= 1 step (1-bit Adam needs a warmed-up v), got {compression_warmup!r}")
    return int(compression_warmup)


@dataclass
class SyncStepMetrics:
    """What one synchronous step did (units in the names)."""

    step: int                  # optimizer steps taken by this model after this one
    loss: float                # this member's local training loss
    step_seconds: float        # forward + backward + all-reduce + optimizer
    allreduce_seconds: float
    allreduce_bytes_sent: int
    allreduce_bytes_received: int
    group_size: int
    residual_norm: float       # L2 norm of the all-reduce's error-feedback residuals
    checked: bool              # a checksum round ran after this step
    repaired: bool             # ... and this member's state was replaced by rank 0's (not at entry)
    next_batch: object = None  # rank 0's peer_pb2.BatchPlan for the next step, if it sent one
    micro_batches: int = 1     # forward/backward passes of this member's batch (`micro_batch`)


class VarianceProbe:
    """Corrects the local second moments of mode "update" toward those of fp32 data parallelism.

    A member's v comes from its own batch's gradients, whose noise the group's mean gradient
    averages away: v_local overestimates the v of fp32 sync, most where noise dominates, and every
    step is too short (measured +8% validation loss at 300 steps of the test setup). The group
    measures the ratio per tensor: every `every` steps the members all-reduce (on the warmup
    all-reduce: int8 by default), their
    gradients at a fixed set of probe coordinates (numel / 256 of each tensor, at least 64), keep
    an EMA of the squared MEAN gradient there, and scale the tensor's v by
    rho = sum(that EMA) / sum(local v) over the probes, clamped to [1 / N, 1] for a group of N: the
    mean of N gradients has at least 1/N of one member's second moment (E[mean g^2] = mu^2 +
    sigma^2 / N), so a smaller ratio is the probes' sampling noise. Unclamped, a sparse probe EMA
    that caught the members' gradients cancelling drove rho to 0.01 on the plateau of the test
    setup: every member's direction grew 10x, its 1-bit error did not cancel like the directions
    do, and training stalled (+50-60% validation loss on 2 of 8 seeds at 2 members). The probes are the same on every
    member (a golden-ratio sequence seeded by the tensor's name, no RNG state). Cost: 32 bits x
    1/256 every 8 steps, about 1% of the 1-bit all-reduce's bytes.
    """

    FRACTION = 1 / 256
    MIN_PROBES = 64

    def __init__(self, shapes: dict[str, int], every: int, beta2: float, group_size: int):
        if every < 1:
            raise ValueError(f"variance probe interval must be >= 1 step, got {every!r}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size!r}")
        self.every, self.decay = every, beta2 ** every
        self.floor = 1.0 / group_size
        self.index = {name: self.probes(name, numel) for name, numel in shapes.items()}
        self.ema: dict[str, torch.Tensor] = {}   # name -> EMA of mean g^2 at the probes
        self.rho: dict[str, float] = {name: 1.0 for name in shapes}

    @classmethod
    def probes(cls, name: str, numel: int) -> torch.Tensor:
        """Sorted distinct flat indices into a tensor of numel values (deterministic): every value
        of a tensor smaller than MIN_PROBES, else about max(MIN_PROBES, numel * FRACTION)."""
        k = min(numel, max(cls.MIN_PROBES, int(numel * cls.FRACTION)))
        if k == numel:
            return torch.arange(numel)
        offset = zlib.crc32(name.encode()) / 2**32
        golden = (math.sqrt(5.0) - 1.0) / 2.0
        points = torch.remainder(offset + torch.arange(k, dtype=torch.float64) * golden, 1.0)
        return torch.unique((points * numel).long().clamp_(0, numel - 1))

    def start(self, local_v: dict[str, torch.Tensor]) -> None:
        """Seed the EMA with this member's v at the probes: call at the first compressed step, when
        v is still the fp32 warmup's, i.e. the group's (after a re-form mid-run it is local: rho
        then starts at 1 and the probes pull it down)."""
        for n, idx in self.index.items():
            self.ema[n] = local_v[n].reshape(-1)[idx.to(local_v[n].device)].float().cpu().clone()

    def due(self, call: int) -> bool:
        """Probe every `every` all-reduce calls (the same calls on every member)."""
        return call % self.every == 0

    def sample(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: g.reshape(-1)[self.index[n].to(g.device)].float().contiguous() for n, g in grads.items()}

    def update(self, mean_at_probes: dict[str, torch.Tensor], local_v: dict[str, torch.Tensor]) -> None:
        """Fold in the group's mean gradient at the probes; local_v: this member's v (full tensors)."""
        for n, idx in self.index.items():
            v_probe = local_v[n].reshape(-1)[idx.to(local_v[n].device)].float().cpu()
            g2 = mean_at_probes[n].float().cpu() ** 2
            if n not in self.ema:
                self.ema[n] = v_probe.clone()
            self.ema[n] = self.ema[n] * self.decay + g2 * (1 - self.decay)
            ratio = float(self.ema[n].sum() / v_probe.sum().clamp_min(1e-30))
            self.rho[n] = min(1.0, max(self.floor, ratio))


class SyncGroupTrainer:
    """One member's side of synchronous training. See the module docstring for the failure policy.

    model: the GPT (any nn.Module whose forward(x, y) returns (logits, loss)) on `device`.
    allreduce: this member's CompressedAllReduce, already on the worker's server.
    lr, weight_decay, betas: AdamW (common.model.configure_optimizer); `lr_fn(step)` overrides lr.
    grad_clip: global-norm clip after averaging (0 disables; after the warmup of 1-bit Adam: of the
    local gradient). check_every: steps between checksum rounds (0 disables periodic checks; the
    initial one still runs). on_metrics: called after every step with SyncStepMetrics.
    compression_warmup / total_steps: warmup steps of 1-bit Adam (see warmup_steps_for); only used
    when the all-reduce compresses. warmup_compression: how those steps (and the probes and
    refresh steps) all-reduce: "int8" (default) or "none" (fp32). variance_refresh_every: after warmup, every Nth step is an fp32
    AdamW step that also updates v (0: v stays frozen). mode: "momentum" (1-bit Adam) or "gradient"
    (compressed gradients into AdamW, the old behaviour; for comparison). variance_probe_every:
    mode "update", steps between VarianceProbe exchanges (0 disables the correction).
    """

    def __init__(
        self,
        model: nn.Module,
        allreduce: CompressedAllReduce,
        *,
        lr: float = OptimConfig.lr,
        weight_decay: float = OptimConfig.weight_decay,
        betas: tuple[float, float] = (OptimConfig.beta1, OptimConfig.beta2),
        grad_clip: float = OptimConfig.grad_clip,
        check_every: int = 50,
        device: torch.device | str = "cpu",
        lr_fn: Callable[[int], float] | None = None,
        on_metrics: Callable[[SyncStepMetrics], None] | None = None,
        compression_warmup: int | float | None = None,
        total_steps: int | None = None,
        variance_refresh_every: int = 0,
        eps: float = 1e-8,
        mode: str = "update",
        variance_probe_every: int = 8,
        warmup_compression: str = "int8",
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if variance_refresh_every < 0:
            raise ValueError(f"variance_refresh_every must be >= 0, got {variance_refresh_every!r}")
        if variance_refresh_every and mode != "momentum":
            # An fp32 refresh step is a plain AdamW step with each member's own moments: in "update"
            # mode those are local, so the members' parameters would drift apart.
            raise ValueError(f"variance_refresh_every applies to mode 'momentum' only, got mode {mode!r}")
        if variance_probe_every < 0:
            raise ValueError(f"variance_probe_every must be >= 0, got {variance_probe_every!r}")
        if warmup_compression not in WARMUP_SCHEMES:
            raise ValueError(f"warmup_compression must be one of {WARMUP_SCHEMES}, got {warmup_compression!r}")
        self.warmup_compression = warmup_compression
        if check_every < 0:
            raise ValueError(f"check_every must be >= 0, got {check_every!r}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {grad_clip!r}")
        self.model = model
        self.device = torch.device(device)
        self.optimizer = configure_optimizer(model, weight_decay, lr, betas, self.device)
        for group in self.optimizer.param_groups:
            group["eps"] = eps
        self.betas, self.eps, self.mode = betas, eps, mode
        self.warmup_steps = warmup_steps_for(compression_warmup, total_steps)
        self.variance_refresh_every = variance_refresh_every
        self.variance_probe_every = variance_probe_every if mode == "update" else 0
        self._probe: VarianceProbe | None = None  # per group (set_group)
        self._probe_bytes = (0, 0)  # (sent, received) by this step's probe exchange
        self._warmup_ar: CompressedAllReduce | None = None  # the warmup / refresh sibling
        self.grad_clip, self.check_every = grad_clip, check_every
        self.lr_fn, self.on_metrics = lr_fn, on_metrics
        self.step_count = 0     # optimizer steps of this model (travels with a repair)
        self.micro_batch = 0    # sequences per forward/backward of a step (0: the whole batch); the
        # worker sets it from its memory plan (worker/group_runner.py member_trainer)
        self._next_batch = None  # rank 0's BatchPlan riding on the current step's all-reduce
        self.repairs = 0        # times this member's state was replaced by rank 0's after entry
        self.joins = 0          # entry checks that gave this member rank 0's state
        self.rebases = 0        # rebases this member replayed (rank 0: applied)
        self._rebases: list[dict[str, torch.Tensor]] = []  # rank 0: applied since the last step (CPU)
        self._rebase_sha = ""   # rank 0: announced with the running step's all-reduce
        self._skip_rebases = 0  # a member: leading rebases of the next step already in a loaded state
        self.checks = 0
        self._state_lock = threading.Lock()  # held while the state changes; FetchState reads under it
        self.ar: CompressedAllReduce | None = None
        self.set_group(allreduce)

    # ------------------------------------------------------------------ group

    def set_group(self, allreduce: CompressedAllReduce) -> None:
        """Train with a (re-formed) group from now on; the next step starts with a checksum round."""
        self._close_sibling()
        self.ar = allreduce
        self._group_calls = 0     # all-reduce calls in this group: the step key on the wire
        self._needs_check = True
        self._entering = True     # the first check gives a member rank 0's state: not a repair
        self._rebases = []
        allreduce.serve_state(self._state_snapshot)
        if allreduce.compression != "none" and self.mode != "gradient":
            self._warmup_ar = _warmup_sibling(allreduce, self.warmup_compression)
        self._probe = None
        if self.variance_probe_every and allreduce.compression != "none":
            shapes = {n: p.numel() for n, p in self.model.named_parameters()}
            self._probe = VarianceProbe(shapes, self.variance_probe_every, self.betas[1], allreduce.world_size)

    def close(self) -> None:
        """Detach the fp32 sibling (the caller closes the CompressedAllReduce it passed in)."""
        self._close_sibling()

    def _close_sibling(self) -> None:
        if self._warmup_ar is not None:
            self._warmup_ar.close()
            self._warmup_ar = None

    def compressed_phase(self, step: int | None = None) -> bool:
        """True when optimizer step `step` (default: the next one) all-reduces 1-bit momentum."""
        step = self.step_count if step is None else step
        if self.ar.compression == "none" or self.mode == "gradient" or step < self.warmup_steps:
            return False
        k = self.variance_refresh_every
        return not (k and (step - self.warmup_steps + 1) % k == 0)

    @property
    def group_size(self) -> int:
        return self.ar.world_size

    # ------------------------------------------------------------------ training

    def step(self, x: torch.Tensor, y: torch.Tensor, next_batch=None) -> SyncStepMetrics:
        """One synchronous step on this member's batch x, y (B, T). Raises PeerFailure.

        next_batch: rank 0 only, an optional peer_pb2.BatchPlan that travels with this step's
        all-reduce; every member finds it in the returned metrics' `next_batch`."""
        self._next_batch = next_batch
        self._probe_bytes = (0, 0)
        if self._needs_check:
            self.check()
        self._announce_rebase()
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(self.model, x, y, self.micro_batch, self.device)  # common/step.py
        params = dict(self.model.named_parameters())  # tied weights once
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
        if self.compressed_phase():
            ar = self.ar
            if self.mode == "momentum":
                self._momentum_step(params, grads)
            else:
                self._update_step(params, grads)
        else:
            ar = self._warmup_ar if self._warmup_ar is not None else self.ar
            mean = self._allreduce(ar, grads)
            rebase = self._fetch_rebase(ar)
            with self._state_lock:  # counted only once done: rank 0 serves its state at the old key meanwhile
                self._replay_rebase(rebase)
                self._group_calls += 1
                for name, p in params.items():
                    p.grad = mean[name]
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self._set_lr()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step_count += 1
        checked = repaired = False
        if self.check_every and self._group_calls % self.check_every == 0:
            checked, repaired = True, self.check()
        metrics = SyncStepMetrics(
            step=self.step_count, loss=float(loss.detach()), step_seconds=time.perf_counter() - t0,
            allreduce_seconds=ar.last.seconds, allreduce_bytes_sent=ar.last.bytes_sent + self._probe_bytes[0],
            allreduce_bytes_received=ar.last.bytes_received + self._probe_bytes[1], group_size=self.group_size,
            residual_norm=self.ar.residual_norm(), checked=checked, repaired=repaired, next_batch=ar.last_plan,
            micro_batches=-(-x.size(0) // (self.micro_batch if 0 < self.micro_batch < x.size(0) else x.size(0))),
        )
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        return metrics

    def _allreduce(self, ar: CompressedAllReduce, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return ar.allreduce(tensors, step=self._group_calls + 1, plan=self._next_batch, rebase=self._rebase_sha)

    # ------------------------------------------------------------------ rebases

    def rebase(self, change: Callable[[], None]) -> bool:
        """Rank 0: run `change()` (it edits the parameters in place outside the optimizer, e.g. the
        worker applying merged updates) and make it replayable: the parameters become
        p_before + (p_after - p_before), which the other members repeat at the next step. Must not
        be called while `step()` runs. True if any parameter changed."""
        if self.ar.rank != 0:
            raise ValueError(f"only rank 0 rebases the group (this member is rank {self.ar.rank})")
        with self._state_lock, torch.no_grad():
            params = dict(self.model.named_parameters())
            before = {n: p.detach().clone() for n, p in params.items()}
            change()
            diff = {n: p.detach() - before[n] for n, p in params.items()}
            if not any(bool(d.any()) for d in diff.values()):
                return False
            for n, p in params.items():
                p.copy_(before[n]).add_(diff[n])  # the one addition every member replays
            self._rebases.append({n: d.cpu() for n, d in diff.items()})
            self.rebases += 1
        return True

    def _announce_rebase(self) -> None:
        """Rank 0, at the start of a step: serve the rebases applied since the last step under this
        step's key and announce them in its all-reduce headers."""
        self._rebase_sha = ""
        if not self._rebases:
            return
        buffer = io.BytesIO()
        torch.save(self._rebases, buffer)
        self._rebases = []
        self._rebase_sha = self.ar.serve_rebase(self._group_calls + 1, buffer.getvalue())

    def _fetch_rebase(self, ar: CompressedAllReduce) -> list[dict[str, torch.Tensor]]:
        """A member > 0, after the step's all-reduce: rank 0's announced rebases (empty if none).
        Raises PeerFailure like the all-reduce."""
        sha, skip, self._skip_rebases = ar.last_rebase, self._skip_rebases, 0
        if not sha or self.ar.rank == 0:
            return []
        blob = self.ar.fetch_rebase(self._group_calls + 1, sha)
        return torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)[skip:]

    def _replay_rebase(self, rebases: list[dict[str, torch.Tensor]]) -> None:
        """Add rank 0's corrections in its order (under the state lock, before the optimizer update)."""
        if not rebases:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for diff in rebases:
                for n, p in params.items():
                    p.add_(diff[n])
        self.rebases += len(rebases)

    def _set_lr(self) -> None:
        if self.lr_fn is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_fn(self.step_count)

    def _momentum_step(self, params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
        """1-bit Adam after warmup: all-reduce 1-bit momentum, AdamW update with the frozen v."""
        beta1, beta2 = self.betas
        if self.grad_clip > 0:  # local clip: the mean gradient is never materialised
            torch.nn.utils.clip_grad_norm_(list(grads.values()), self.grad_clip)
        state = self.optimizer.state
        with torch.no_grad():
            m_local = {n: state[p]["exp_avg"] * beta1 + grads[n] * (1 - beta1) for n, p in params.items()}
        m = self._allreduce(self.ar, m_local)
        rebase = self._fetch_rebase(self.ar)
        with self._state_lock, torch.no_grad():
            self._replay_rebase(rebase)
            self._group_calls += 1
            self._set_lr()
            by_param = {p: n for n, p in params.items()}
            for group in self.optimizer.param_groups:
                lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
                for p in group["params"]:
                    st = state[p]
                    st["step"] += 1
                    t = float(st["step"])
                    bc1 = 1 - beta1 ** t
                    bc2 = 1 - beta2 ** min(t, float(self.warmup_steps))
                    st["exp_avg"].copy_(m[by_param[p]])
                    if wd:
                        p.mul_(1 - lr * wd)
                    denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(eps)
                    p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1

    def _update_step(self, params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
        """Local Adam moments, 1-bit all-reduce of the Adam direction, shared decoupled-decay step."""
        beta1, beta2 = self.betas
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(grads.values()), self.grad_clip)
        state = self.optimizer.state
        eps = self.eps
        self._probe_variance(params, grads)
        with torch.no_grad():
            directions, moments = {}, {}
            for n, p in params.items():
                st = state[p]
                t = float(st["step"]) + 1
                g = grads[n]
                m = st["exp_avg"] * beta1 + g * (1 - beta1)
                v = st["exp_avg_sq"] * beta2 + g * g * (1 - beta2)
                v_hat = v / (1 - beta2 ** t)
                if self._probe is not None and self._probe.rho[n] < 1.0:
                    v_hat = v_hat * self._probe.rho[n]  # toward the group's v (VarianceProbe)
                directions[n] = (m / (1 - beta1 ** t)) / (v_hat.sqrt() + eps)
                moments[p] = (m, v)  # committed only if the all-reduce succeeds
        u = self._allreduce(self.ar, directions)
        rebase = self._fetch_rebase(self.ar)
        with self._state_lock, torch.no_grad():
            self._replay_rebase(rebase)
            self._group_calls += 1
            self._set_lr()
            by_param = {p: n for n, p in params.items()}
            for group in self.optimizer.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                for p in group["params"]:
                    st = state[p]
                    st["step"] += 1
                    st["exp_avg"].copy_(moments[p][0])
                    st["exp_avg_sq"].copy_(moments[p][1])
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(u[by_param[p]], alpha=-lr)
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1

    def _probe_variance(self, params: dict[str, nn.Parameter], grads: dict[str, torch.Tensor]) -> None:
        """Mode "update": when due, all-reduce the gradients at the probe coordinates (warmup scheme) and
        refresh the per-tensor v corrections. Raises PeerFailure like the main all-reduce; the
        probe state is this member's own (it never touches the shared parameters)."""
        probe = self._probe
        if probe is None or self._warmup_ar is None:
            return
        state = self.optimizer.state
        local_v = {n: state[p]["exp_avg_sq"] for n, p in params.items()}
        if not probe.ema:
            probe.start(local_v)
        if not probe.due(self._group_calls):
            return
        mean = self._warmup_ar.allreduce(probe.sample(grads), step=self._group_calls + 1)
        self._probe_bytes = (self._warmup_ar.last.bytes_sent, self._warmup_ar.last.bytes_received)
        probe.update(mean, local_v)

    # ------------------------------------------------------------------ checksums and repair

    def params_sha256(self) -> str:
        return params_sha256({n: p.data for n, p in self.model.named_parameters()})

    def check(self) -> bool:
        """Compare parameters with rank 0's; on mismatch load rank 0's state. True if that was a
        repair (a mismatch after the group's entry check)."""
        key = self._group_calls
        mine = self.params_sha256()
        reference = self.ar.exchange_checksum(key, mine)
        entering, self._needs_check, self._entering = self._entering, False, False
        self.checks += 1
        if reference == mine:
            return False
        blob, announced = self.ar.fetch_state(key)
        self._load_state(blob)
        now = self.params_sha256()
        if now != announced:
            raise RuntimeError(f"state from rank 0 does not match its checksum ({now[:12]} != {announced[:12]})")
        self.ar.reset_feedback()  # the basepoint jumped: old residuals no longer apply
        if entering:
            self.joins += 1
            log.info("sync group %s rank %d: took rank 0's state on entry at group step %d (%d bytes, now at step %d)",
                     self.ar.group_id, self.ar.rank, key, len(blob), self.step_count)
            return False
        self.repairs += 1
        log.warning(
            "sync group %s rank %d: parameters differed from rank 0 at group step %d (%s != %s); "
            "repaired from rank 0 (%d bytes, now at step %d; %d repairs so far)",
            self.ar.group_id, self.ar.rank, key, mine[:12], reference[:12], len(blob), self.step_count, self.repairs,
        )
        return True

    def _state_snapshot(self) -> tuple[int, bytes, str]:
        """(group step key, torch.save blob of model + optimizer + step, params checksum)."""
        with self._state_lock:
            buffer = io.BytesIO()
            # rebased_ahead: rebases already in these parameters that the next step still announces
            # (rank 0 rebased after this step's checksum); a member that loads the state skips them.
            torch.save(
                {"step": self.step_count, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rebased_ahead": len(self._rebases)},
                buffer,
            )
            return self._group_calls, buffer.getvalue(), self.params_sha256()

    def _load_state(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        with self._state_lock:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step_count = int(state["step"])
            self._skip_rebases = int(state.get("rebased_ahead", 0))


def _warmup_sibling(ar: CompressedAllReduce, scheme: str) -> CompressedAllReduce:
    """A CompressedAllReduce under `scheme` ("int8" or "none") with ar's members, deadlines and
    credentials, group_id + "/warmup", routed by the same server: the warmup and variance-refresh
    steps of 1-bit sync and the VarianceProbe's exchanges."""
    sibling = CompressedAllReduce(
        ar.rank, ar.world_size, ar.peers, f"{ar.group_id}/warmup", epoch=ar.epoch, compression=scheme,
        chunk=ar.chunk, sign_scale=ar.sign_scale, algorithm="auto" if ar.algorithm == "count" else ar.algorithm,
        deadline_s=ar._fixed_deadline, min_deadline_s=ar.min_deadline_s, token=ar._token, tls_ca=ar._tls_ca,
    )
    if ar._router is not None:
        sibling._router = ar._router
        ar._router.attach(sibling)
    return sibling
