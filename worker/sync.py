"""Synchronous data-parallel training of one GPT across a power-of-two sync group.

Every member computes gradients on its own batch; `CompressedAllReduce` averages them (1 bit per
value with error feedback, or fp32); every member clips and applies the same AdamW step to the same
parameters, so the parameters stay bit-identical. Every `check_every` steps (and before the first
step of a group) the members compare a sha256 of their parameters with rank 0's; a member that
differs fetches rank 0's full state (model + optimizer + step), logs it and counts it in `repairs`.

Failure policy (what the worker driving this does with `PeerFailure`):
  `step()` raises the PeerFailure of the all-reduce (or of a checksum / state fetch) unchanged, with
  `survivors` (ranks that answered a Status probe and look healthy). No optimizer step is applied on
  a failed all-reduce, but with halving/doubling some members may have completed theirs before the
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
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from common.model import autocast_context, configure_optimizer
from common.tensors import params_sha256
from worker.allreduce import CompressedAllReduce, PeerFailure  # noqa: F401 - re-exported for callers

log = logging.getLogger(__name__)


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
    repaired: bool             # ... and this member's state was replaced by rank 0's


class SyncGroupTrainer:
    """One member's side of synchronous training. See the module docstring for the failure policy.

    model: the GPT (any nn.Module whose forward(x, y) returns (logits, loss)) on `device`.
    allreduce: this member's CompressedAllReduce, already on the worker's server.
    lr, weight_decay, betas: AdamW (common.model.configure_optimizer); `lr_fn(step)` overrides lr.
    grad_clip: global-norm clip after averaging (0 disables). check_every: steps between checksum
    rounds (0 disables periodic checks; the initial one still runs). on_metrics: called after every
    step with SyncStepMetrics.
    """

    def __init__(
        self,
        model: nn.Module,
        allreduce: CompressedAllReduce,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        grad_clip: float = 1.0,
        check_every: int = 50,
        device: torch.device | str = "cpu",
        lr_fn: Callable[[int], float] | None = None,
        on_metrics: Callable[[SyncStepMetrics], None] | None = None,
    ):
        if check_every < 0:
            raise ValueError(f"check_every must be >= 0, got {check_every!r}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {grad_clip!r}")
        self.model = model
        self.device = torch.device(device)
        self.optimizer = configure_optimizer(model, weight_decay, lr, betas, self.device)
        self.grad_clip, self.check_every = grad_clip, check_every
        self.lr_fn, self.on_metrics = lr_fn, on_metrics
        self.step_count = 0     # optimizer steps of this model (travels with a repair)
        self.repairs = 0        # times this member's state was replaced by rank 0's
        self.checks = 0
        self._state_lock = threading.Lock()  # held while the state changes; FetchState reads under it
        self.ar: CompressedAllReduce | None = None
        self.set_group(allreduce)

    # ------------------------------------------------------------------ group

    def set_group(self, allreduce: CompressedAllReduce) -> None:
        """Train with a (re-formed) group from now on; the next step starts with a checksum round."""
        self.ar = allreduce
        self._group_calls = 0     # all-reduce calls in this group: the step key on the wire
        self._needs_check = True
        allreduce.serve_state(self._state_snapshot)

    @property
    def group_size(self) -> int:
        return self.ar.world_size

    # ------------------------------------------------------------------ training

    def step(self, x: torch.Tensor, y: torch.Tensor) -> SyncStepMetrics:
        """One synchronous step on this member's batch x, y (B, T). Raises PeerFailure."""
        if self._needs_check:
            self.check()
        t0 = time.perf_counter()
        self.model.train()
        with autocast_context(self.device):
            _, loss = self.model(x.to(self.device), y.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = dict(self.model.named_parameters())  # tied weights once
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
        mean = self.ar.allreduce(grads, step=self._group_calls + 1)
        with self._state_lock:  # counted only once done: rank 0 serves its state at the old key meanwhile
            self._group_calls += 1
            for name, p in params.items():
                p.grad = mean[name]
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if self.lr_fn is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_fn(self.step_count)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
        checked = repaired = False
        if self.check_every and self._group_calls % self.check_every == 0:
            checked, repaired = True, self.check()
        metrics = SyncStepMetrics(
            step=self.step_count, loss=float(loss.detach()), step_seconds=time.perf_counter() - t0,
            allreduce_seconds=self.ar.last.seconds, allreduce_bytes_sent=self.ar.last.bytes_sent,
            allreduce_bytes_received=self.ar.last.bytes_received, group_size=self.group_size,
            residual_norm=self.ar.residual_norm(), checked=checked, repaired=repaired,
        )
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        return metrics

    # ------------------------------------------------------------------ checksums and repair

    def params_sha256(self) -> str:
        return params_sha256({n: p.data for n, p in self.model.named_parameters()})

    def check(self) -> bool:
        """Compare parameters with rank 0's; on mismatch load rank 0's state. True if repaired."""
        key = self._group_calls
        mine = self.params_sha256()
        reference = self.ar.exchange_checksum(key, mine)
        self._needs_check = False
        self.checks += 1
        if reference == mine:
            return False
        blob, announced = self.ar.fetch_state(key)
        self._load_state(blob)
        now = self.params_sha256()
        if now != announced:
            raise RuntimeError(f"state from rank 0 does not match its checksum ({now[:12]} != {announced[:12]})")
        self.ar.reset_feedback()  # the basepoint jumped: old residuals no longer apply
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
            torch.save(
                {"step": self.step_count, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                buffer,
            )
            return self._group_calls, buffer.getvalue(), self.params_sha256()

    def _load_state(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        with self._state_lock:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step_count = int(state["step"])
