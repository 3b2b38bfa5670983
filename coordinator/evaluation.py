"""Validation loss of the global model, without a resident copy of it.

Contract: `Evaluator.loss(params, iters)` returns the mean loss over deterministic validation
batches (seed EVAL_SEED, batch i for i < iters) of the tensors `on_device(global weights)` gave. The model is a parameterless shell (on
the meta device) called with the global tensors (torch.func.functional_call), so no evaluation
model is held between evaluations. On eval.device "cpu" the loss is computed on the global tensors
themselves, under the model lock (merges wait; heartbeats, leases and pushes do not); on another
device the tensors are copied there under the lock and evaluated after it is released. Either way
an evaluation reads at most eval.max_tokens tokens (iters shrink to fit, at least one batch).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from geotrain.common.config import EvalConfig, ModelConfig
from geotrain.common.reader import TokenData
from geotrain.common.model import GPT

log = logging.getLogger(__name__)

EVAL_SEED = 20_231_105


class Evaluator:
    def __init__(self, config: EvalConfig, model_config: ModelConfig, data: TokenData):
        if config.max_tokens < 0:
            raise ValueError(f"eval.max_tokens must be >= 0, got {config.max_tokens}")
        try:
            self.device = torch.device(config.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"eval.device {config.device!r} is not a torch device: {exc}") from None
        self.config = config
        self.model_config = model_config
        self.data = data
        with torch.device("meta"):
            self.shell = GPT(model_config).eval()

    def batches(self, iters: int) -> int:
        """Batches one evaluation reads: `iters`, shrunk to eval.max_tokens (at least 1)."""
        per_batch = self.config.batch_size * self.model_config.block_size
        if self.config.max_tokens:
            iters = min(iters, max(1, self.config.max_tokens // per_batch))
        return max(1, iters)

    def on_device(self, params: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The tensors to evaluate: `params` themselves on "cpu" (the caller then holds the model
        lock through `loss`), else copies on eval.device (the caller holds it for this call only)."""
        if self.device.type == "cpu":
            return params
        return {k: t.to(self.device, copy=True) for k, t in params.items()}

    def loss(self, params: Mapping[str, torch.Tensor], iters: int) -> float:
        """Mean validation loss of `params` over batches(iters) deterministic batches."""
        return self._loss(params, self.batches(iters))

    def _loss(self, params: Mapping[str, torch.Tensor], n: int) -> float:
        losses = []
        T = self.model_config.block_size
        device = next(iter(params.values())).device
        with torch.no_grad():
            for i in range(n):
                x, y = self.data.get_batch("val", self.config.batch_size, T, EVAL_SEED, i, device=device)
                _, loss = torch.func.functional_call(self.shell, dict(params), (x, y), tie_weights=True)
                losses.append(float(loss))
        return sum(losses) / len(losses)
