"""Named-tensor helpers shared by the coordinator and workers.

A model's trainable state travels as `dict[str, Tensor]` keyed by `model.named_parameters()` names
(tied weights appear once). The checksum below identifies a basepoint: the coordinator sends it with
every version and workers compare it with their own copy.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name (views, not copies; tied weights once)."""
    return {name: p.data for name, p in model.named_parameters()}


def clone_tensors(tensors: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Contiguous float32 copies on `device`."""
    return {n: t.detach().to(device=device, dtype=torch.float32, copy=True).contiguous() for n, t in tensors.items()}


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """name -> shape, the schema a decoder checks a blob against before allocating."""
    return {n: tuple(t.shape) for n, t in tensors.items()}


def params_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, shape, float32 bytes) in sorted name order; equal iff bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu" or t.dtype != torch.float32:
            t = t.to("cpu", torch.float32)
        digest.update(name.encode())
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def add_(target: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], alpha: float = 1.0) -> None:
    """target[name] += alpha * update[name] in place; the names must match exactly."""
    if set(target) != set(update):
        missing = sorted(set(target) ^ set(update))[:5]
        raise ValueError(f"tensor names differ: {missing}")
    for name, t in target.items():
        t.add_(update[name].to(t.device, t.dtype), alpha=alpha)


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """a - b per name, as new float32 CPU tensors."""
    return {n: (a[n].detach().float().cpu() - b[n].detach().float().cpu()) for n in a}


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


def all_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())
