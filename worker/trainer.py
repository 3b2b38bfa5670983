"""The worker's local training: its model, inner AdamW and one training step.

`LocalTrainer.step(x, y, step)` is the whole per-step computation: the lr schedule at the run-wide
step, then common/step.py's TrainStep (micro-batches of the memory plan, clip, the optimizer step); the runner calls it once per step boundary and does the
bookkeeping (ranges, stats) itself, so the step can be replaced by another implementation with the
same signature.

RNG: each worker seeds the global generators (CPU and every CUDA device) with the run's seed plus a
hash of its worker id (`worker_seed`), so its dropout masks are its own. Rebuilding the run's
initial weights from the run's seed (`initial_weights_from_seed`) happens inside
`torch.random.fork_rng` over every CUDA device: it leaves the worker's generators as they were.
"""

from __future__ import annotations

import logging
import time
import zlib
import torch

from geotrain.common.config import ModelConfig, RunConfig
from geotrain.common.tensors import clone_tensors, model_tensors, params_sha256

log = logging.getLogger(__name__)


def worker_seed(run_seed: int, worker_id: str) -> int:
    """The seed of a worker's generators (dropout): the run's seed plus a hash of its id."""
    return run_seed + (zlib.crc32(worker_id.encode()) % 10_000)


def _fork_all_rng():
    """fork_rng over the CPU generator and every CUDA device's (none on a host without CUDA)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def initial_weights_from_seed(run: RunConfig, model: ModelConfig, initial_sha: str) -> dict[str, torch.Tensor] | None:
    """The run's version 1, built exactly as the coordinator builds it (fp32 on CPU after
    torch.manual_seed(run.train.seed)), or None when `initial_sha` is empty or the checksum
    differs (another torch version may initialise differently). Every global generator's state
    (CPU and each CUDA device) is kept."""
    from geotrain.common.model import GPT

    if not initial_sha:
        return None
    with _fork_all_rng():
        torch.manual_seed(run.train.seed)
        weights = clone_tensors(model_tensors(GPT(model)), "cpu")
    if params_sha256(weights) != initial_sha:
        log.info("the seed does not reproduce the initial model here: downloading it")
        return None
    return weights


class LocalTrainer:
    """The worker's model on `device` and its inner AdamW (the run's optim config).

    `params` are the model's parameter tensors by name (views: writing them changes the model);
    the runner loads the global model into them and rebases them in place."""

    def __init__(self, run_cfg: RunConfig, model_cfg: ModelConfig, device: torch.device, worker_id: str,
                 batch_size: int = 0):
        from geotrain.common.model import GPT
        from geotrain.common.step import TrainStep

        self.run_cfg = run_cfg
        self.model_cfg = model_cfg
        self.device = device
        self.batch_size = batch_size or run_cfg.train.batch_size  # sequences per step on this device
        torch.manual_seed(worker_seed(run_cfg.train.seed, worker_id))
        self.model = GPT(model_cfg).to(device)
        # common/step.py: micro-batches of the memory plan, activation checkpointing, optimizer state
        self.train_step = TrainStep.for_run(self.model, model_cfg, run_cfg.optim, run_cfg.train, device,
                                            self.batch_size)
        self.optimizer = self.train_step.optimizer
        log.info("%s", self.train_step.plan.table(f"memory plan on {device}:"))
        self.params = model_tensors(self.model)

    def plan_with_state(self, optimizer_state: str):
        """The memory plan (common/memplan.py MemoryPlan) of a step of this model and batch on this
        device whose optimizer keeps `optimizer_state` (fp32 | 8bit | offload): this trainer's own
        plan when its optimizer keeps that state (its micro-batch probed on CUDA), else
        common/step.py's plan for it, from the same run settings (train.micro_batch,
        train.activation_checkpointing). The sync member (fp32 AdamW on the device) steps by it."""
        from dataclasses import replace

        from geotrain.common.step import plan_for_device

        own = self.train_step.plan
        if own is not None and own.optimizer_state == optimizer_state:
            return own
        train = replace(self.run_cfg.train, optimizer_state=optimizer_state)
        return plan_for_device(self.model_cfg, train, self.device, self.batch_size)

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy `weights` (any device, any float dtype) into the model."""
        with torch.no_grad():
            for name, t in self.params.items():
                t.copy_(weights[name].to(t.device, t.dtype))

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[float, float]:
        """One inner step on the batch x, y (int64 (B, T), on the CPU or already on the device:
        worker/shards.py LeaseBatches) at run-wide step `step` (the lr schedule's); returns (loss,
        seconds of compute)."""
        from geotrain.common.train import lr_at

        if x.device.type == self.device.type:
            pass
        elif self.device.type == "cuda":
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        t0 = time.monotonic()
        lr = lr_at(step, self.run_cfg.optim, self.run_cfg.train.max_iters)
        loss = self.train_step(x, y, lr=lr).loss  # micro-batches, clip, optimizer step
        loss_value = float(loss.item())
        return loss_value, time.monotonic() - t0

    def clear_optimizer(self) -> None:
        """Drop AdamW's moments (the local weights were reset)."""
        self.optimizer.state.clear()
