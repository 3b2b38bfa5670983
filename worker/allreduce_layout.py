"""The flat buffer of a sync-group all-reduce and the count schedule's arithmetic.

`_Layout` places every named tensor at a chunk-aligned offset of one fp32 vector padded to
world_size equal blocks (a scale never spans two tensors); the count helpers turn the integer sum
of the members' signs into the mean exactly (small integers over a power of two). Used by
worker/allreduce.py and worker/allreduce_reference.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch



@dataclass
class _Layout:
    """Where each tensor lives in the flat fp32 buffer: chunk-aligned offsets, padded to N blocks."""

    names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    offsets: list[int]
    block: int  # elements per block; total = world_size * block

    @classmethod
    def build(cls, tensors: Mapping[str, torch.Tensor], world_size: int, chunk: int) -> "_Layout":
        names = sorted(tensors)
        offsets, pos = [], 0
        for name in names:
            offsets.append(pos)
            pos += -(-tensors[name].numel() // chunk) * chunk
        block = max(chunk, -(-pos // (world_size * chunk)) * chunk)
        return cls(names, [tensors[n].shape for n in names], [tensors[n].dtype for n in names], offsets, block)

    def matches(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        return sorted(tensors) == self.names and all(tensors[n].shape == s for n, s in zip(self.names, self.shapes))

    def flatten(self, tensors: Mapping[str, torch.Tensor], world_size: int) -> torch.Tensor:
        """One fp32 vector of world_size * block values; the padding between tensors is zero."""
        flat = torch.empty(world_size * self.block, dtype=torch.float32)
        pos = 0
        for name, off in zip(self.names, self.offsets):
            t = tensors[name].detach().reshape(-1)
            flat[pos:off].zero_()
            flat[off : off + t.numel()].copy_(t)
            pos = off + t.numel()
        flat[pos:].zero_()
        return flat

    def unflatten(self, flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape, dtype, off in zip(self.names, self.shapes, self.dtypes, self.offsets):
            n = shape.numel()
            out[name] = flat[off : off + n].view(shape).to(device=like[name].device, dtype=dtype, copy=True)
        return out


@functools.lru_cache(maxsize=None)
def _agree_table(n: int) -> np.ndarray:
    """agree[s * (n + 1) + plus]: how many of the other n - 1 members share the sign s (1 =
    negative) of a member, given `plus` members with a + sign (entries that cannot occur are 0)."""
    agree = np.zeros(2 * (n + 1), dtype=np.uint8)
    for plus in range(1, n + 1):
        agree[plus] = plus - 1
    for plus in range(0, n):
        agree[(n + 1) + plus] = n - plus - 1
    return agree


_COMMIT_ROWS = 4096  # chunks per slice of the count schedule's residual update


def _k_from_plus(plus: np.ndarray, n: int, out: torch.Tensor) -> None:
    """out = (2 plus - n) / n: the sum of the n signs / n from the number of + signs (exact in fp32:
    small integers over a power of two)."""
    out.copy_(torch.from_numpy(plus)).mul_(2.0 / n).sub_(1.0)


def _k_from_agree(negative: np.ndarray, agree: np.ndarray, n: int, out: torch.Tensor) -> None:
    """out = (1 - 2 s) (2 a - n + 2) / n: the sum of the n signs / n from a member's sign s
    (1 = negative) and the number a of the other n - 1 that share it (exact, as _k_from_plus)."""
    v = torch.from_numpy(agree).to(torch.int8).mul_(2).sub_(n - 2)
    v.mul_(torch.from_numpy(negative).to(torch.int8).mul_(-2).add_(1))
    out.copy_(v).mul_(1.0 / n)


def _codec(scheme: str, chunk: int, sign_scale: str):
    from geotrain.common.compression import get_codec  # the shared codecs (sign = 1 bit + per-chunk scales)

    return get_codec(scheme, chunk=chunk, sign_scale=sign_scale)


def _chunk_scales(rows: torch.Tensor, sign_scale: str) -> torch.Tensor:
    """One scale per row of rows (chunks, C): mean |y| or sqrt(mean y^2), as SignCodec's sign_scale."""
    if sign_scale == "rms":
        return torch.linalg.vector_norm(rows, ord=2, dim=1) / rows.shape[1] ** 0.5
    return torch.linalg.vector_norm(rows, ord=1, dim=1) / rows.shape[1]


def _feedback(codec):
    from geotrain.common.compression import ErrorFeedback

    return ErrorFeedback(codec)
