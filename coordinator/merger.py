"""The merge: validated deltas in, the next global model out (weights, outer step, downlink record).

Contract:
- `inspect(blob)` decodes a pushed delta one tensor at a time (no decoded copy kept) and returns
  its L2 norm and, per tensor, the one magnitude of a +-scale tensor (what a count merge needs);
  ValueError for a malformed or non-finite delta or one whose tensors are not in the model's order.
- `apply(batch, weights, tokens, version, run_id)` merges the batch into `global_params` in place
  and returns a `MergeResult` (what the downlink history records). Under downlinks "relay" and
  "count" (and "recode" up to its encode) the merge streams: every delta is decoded a tensor at a
  time, in lockstep, and each tensor of the merged delta is combined (common/merge.py weighted_sum
  or counted_mean, the arithmetic workers replay bit for bit), stepped by the outer optimizer and
  added to the weights before the next tensor is decoded. Working set: one tensor per delta plus a
  few of the merged tensor, so the coordinator's memory is the weights, the outer momentum and the
  pending compressed blobs. "combine" and "recode" encode a whole merged delta (or update) with
  error feedback, which needs it whole: one or two model copies more, for the merge's duration.

Locking: every read or write of `global_params`, the outer momentum or the downlink residual
happens under `model_lock` (held by the facade around apply, serving, checkpoints, evaluation);
the state lock is never held for the arithmetic.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from geotrain.common.compression import ErrorFeedback, encode_tensors, get_codec, iter_decode_tensors
from geotrain.common.config import RunConfig
from geotrain.common.merge import NormGate, OuterOptimizer, counted_mean, fold_into, majority_k, weighted_sum
from geotrain.common.tensors import params_sha256, tensor_spec
from geotrain.coordinator.records import CountedRecord, PendingDelta, RelayedDelta

log = logging.getLogger(__name__)

NORM_SLICE = 1 << 22  # values per slice of the norm's fp64 sum (bounds its temporary to 32 MiB)


@dataclass
class MergeResult:
    """What a merge publishes: the plain update blob (non-replayed downlinks) or the relayed
    deltas / the count record, the outer step's fraction and the new weights' checksum."""

    blob: bytes
    relayed: list[RelayedDelta] = field(default_factory=list)
    outer_fraction: float = 1.0
    counted: CountedRecord | None = None
    params_sha256: str = ""


class Merger:
    def __init__(self, run: RunConfig, global_params: dict[str, torch.Tensor]):
        self.run = run
        self.global_params = global_params  # name -> fp32 CPU tensor, model order; changed in place
        self.spec = tensor_spec(global_params)
        self.num_params = sum(t.numel() for t in global_params.values())
        self.outer = OuterOptimizer(run.outer, self.spec)
        self.gate = NormGate(run.merge)
        self.down_feedback = ErrorFeedback(get_codec(run.compression.down_scheme, run.compression.chunk))
        self.model_lock = threading.RLock()

    # ------------------------------------------------------------------ pushes

    def inspect(self, blob: bytes, max_blob_bytes: int) -> tuple[float, list[float] | None]:
        """(L2 norm, per-tensor magnitudes or None) of a pushed delta; ValueError when it is not
        a valid delta of this model. The norm is global_norm's: sqrt of the fp64 sum of squares."""
        total = torch.zeros((), dtype=torch.float64)
        magnitudes: list[float] | None = []
        names = iter(self.spec)
        for name, t in iter_decode_tensors(blob, self.spec, max_blob_bytes=max_blob_bytes):
            expected = next(names)
            if name != expected:
                raise ValueError(f"tensor {name!r} comes where the model has {expected!r}: send tensors in the model's order")
            flat = t.reshape(-1)
            del t
            magnitude = flat[:1].abs()
            uniform = magnitudes is not None
            for start in range(0, flat.numel(), NORM_SLICE):  # slices bound the temporaries
                piece = flat[start : start + NORM_SLICE]
                total = total + (piece.double() ** 2).sum()
                uniform = uniform and bool(torch.all(piece.abs() == magnitude))
            if magnitudes is not None:
                magnitudes = magnitudes + [float(magnitude) if flat.numel() else 0.0] if uniform or not flat.numel() else None
            del flat
        return float(torch.sqrt(total)), magnitudes

    # ------------------------------------------------------------------ merging

    def counted_record(self, batch: Sequence[PendingDelta], weights: list[float], version: int) -> CountedRecord | None:
        """A CountedRecord when this merge is a count of signs: at least 2 deltas, all based on the
        current version, each decoding to +-(one scale) per tensor (scheme tsign), with equal
        weights and no clipping. The merge's scale per tensor is the mean of the deltas' own (fp32),
        sent with the counts: every worker then takes its own delta as that scale x its signs
        (a sign does not depend on the scale; what the scale drops stays in its weights). None:
        relay it."""
        if len(batch) < 2 or len(set(weights)) != 1:
            return None
        if any(c.base_version != version or c.factor != 1.0 or c.magnitudes is None for c in batch):
            return None
        scales = []
        for i in range(len(self.spec)):
            own = [c.magnitudes[i] for c in batch]
            scales.append(float(np.float32(sum(own) / len(own))))
        majority = self.run.compression.count_rule == "majority" and len(batch) >= 3  # 2: the same k
        return CountedRecord([c.push_id for c in batch], [c.blob for c in batch], weights[0], scales, majority)

    def apply(self, batch: Sequence[PendingDelta], weights: list[float], tokens: int, version: int,
              run_id: str) -> MergeResult:
        """Merge `batch` (merge weights `weights`, `tokens` trained tokens) into the weights of
        `version`, making version + 1. Caller holds model_lock."""
        downlink = self.run.compression.downlink
        if downlink == "combine":
            return self._apply_combined(batch, weights, tokens, version, run_id)
        counted = self.counted_record(batch, weights, version) if downlink == "count" else None
        scales = dict(zip(self.spec, counted.scales)) if counted is not None else {}
        streams = [iter_decode_tensors(c.blob, self.spec) for c in batch]
        factors = [c.factor for c in batch]
        updates: dict[str, torch.Tensor] = {}  # "recode" only: the whole update, encoded at the end
        first = True
        n_counted = len(batch) if counted is not None else 0  # its outer step: merge.count_step
        majority = counted is not None and counted.majority
        for name in self.spec:
            mean = {name: self._merged_tensor(name, streams, factors, weights, counted, scales)}
            if first:
                update = self.outer.update(mean, tokens=tokens, counted=n_counted, majority=majority)
                first = False
            else:
                update = self.outer.update(mean, fraction=self.outer.last_fraction, counted=n_counted,
                                           majority=majority)
            if downlink in ("relay", "count"):
                self.global_params[name].add_(update[name])  # one IEEE add each: what workers do too
            else:
                updates[name] = update[name]
        for s in streams:  # completes each frame (its checksum was verified at push)
            next(s, None)
        result = MergeResult(b"", outer_fraction=self.outer.last_fraction, counted=counted)
        if downlink in ("relay", "count"):
            if counted is None:
                result.relayed = [RelayedDelta(c.push_id, c.blob, w, c.factor) for c, w in zip(batch, weights)]
        else:  # "recode": the update itself, compressed with the coordinator's error feedback
            blob, decoded = encode_tensors(
                updates, self.run.compression.down_scheme, self.run.compression.chunk, feedback=self.down_feedback,
                zstd_level=self.run.compression.zstd_level,
            )
            del updates
            self._add(decoded)
            result.blob, result.outer_fraction = blob, 1.0
        result.params_sha256 = params_sha256(self.global_params)
        return result

    @staticmethod
    def _merged_tensor(name: str, streams: list, factors: list[float], weights: list[float],
                       counted: CountedRecord | None, scales: Mapping[str, float]) -> torch.Tensor:
        """Tensor `name` of the merged delta, folding the next tensor of every stream in order:
        weighted_sum's arithmetic (fold_into), or counted_mean of the summed signs."""
        acc = k = None
        for s, factor, weight in zip(streams, factors, weights):
            got, t = next(s)
            assert got == name, (got, name)  # inspect() checked the order at push
            if counted is not None:
                signs = 1 - 2 * torch.signbit(t).to(torch.int16)
                k = signs if k is None else k + signs
            else:
                if acc is None:
                    acc = torch.zeros_like(t, dtype=torch.float32)
                fold_into(acc, t, factor, weight)
            del t
        if counted is not None:
            if counted.majority:
                k = majority_k(k, len(streams))
            return counted_mean({name: k}, {name: scales[name]}, counted.weight)[name]
        return acc

    def _apply_combined(self, batch: Sequence[PendingDelta], weights: list[float], tokens: int, version: int,
                        run_id: str) -> MergeResult:
        """Downlink "combine": the merge's weighted mean delta, compressed with `down_scheme` and
        the coordinator's error feedback (what quantization drops joins the next merge), goes out
        as a single relayed delta of weight 1; the outer step runs on exactly what the workers
        decode, through the same weighted_sum and OuterOptimizer.update they replay."""
        streams = [iter_decode_tensors(c.blob, self.spec) for c in batch]
        factors = [c.factor for c in batch]
        mean_delta = {name: self._merged_tensor(name, streams, factors, weights, None, {}) for name in self.spec}
        for s in streams:
            next(s, None)
        blob, decoded = encode_tensors(
            mean_delta, self.run.compression.down_scheme, self.run.compression.chunk, feedback=self.down_feedback,
            zstd_level=self.run.compression.zstd_level,
        )
        del mean_delta
        replayed = weighted_sum([decoded], [1.0], [1.0])
        del decoded
        update = self.outer.update(replayed, tokens=tokens)
        del replayed
        self._add(update)
        combined = RelayedDelta(f"merge-{run_id}-{version + 1}", blob, 1.0, 1.0)
        return MergeResult(b"", [combined], self.outer.last_fraction, None, params_sha256(self.global_params))

    def apply_plain(self, update: Mapping[str, torch.Tensor]) -> tuple[bytes, str]:
        """Add an uncompressed update (the final version without the Nesterov lookahead);
        returns its blob and the new checksum. Caller holds model_lock."""
        blob, decoded = encode_tensors(dict(update), "none", zstd_level=self.run.compression.zstd_level)
        self._add(decoded)
        return blob, params_sha256(self.global_params)

    def _add(self, update: Mapping[str, torch.Tensor]) -> None:
        for name, t in self.global_params.items():  # one IEEE add each: what workers do too
            t.add_(update[name])

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the merge state (no copies). Caller holds model_lock."""
        tensors = {f"model.{n}": t for n, t in self.global_params.items()}
        tensors.update(self.outer.state_dict())
        tensors.update({f"downlink_residual.{k}": v for k, v in self.down_feedback.state_dict().items()})
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in list(self.global_params):
            self.global_params[name] = tensors[f"model.{name}"].clone().float()
        self.outer.load_state_dict(tensors)
        residuals = {k[len("downlink_residual."):]: v for k, v in tensors.items() if k.startswith("downlink_residual.")}
        self.down_feedback.load_state_dict(residuals)

