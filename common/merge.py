"""Merging workers' deltas into the global model: weighting, outer optimizer, outlier gate.

Sign convention (tested analytically in tests/test_coordinator.py): a worker's delta is
`local_params - basepoint`, i.e. the direction its inner optimizer moved. The outer *gradient* is
the negative of the weighted mean delta, so a positive outer learning rate moves the global model
*along* the workers' deltas.

- `combine`: weighted mean of deltas; weight = tokens x (1 + staleness) ** -staleness_power.
- `weighted_sum` + `OuterOptimizer.update(..., fraction=)`: the merge arithmetic, written so that
  a worker replaying it on the same decoded deltas, weights and fraction gets a bit-identical
  update on any device (downlink "relay", `replay_version` below, called by worker/downlink.py): fp32 throughout, one IEEE operation
  per kernel (no fused multiply-add such as `add_(x, alpha=w)`, whose rounding differs between
  CPUs and GPUs), a fixed order of the deltas.
- `counted_mean`: the merge of N 1-bit deltas that share per-tensor scales and a weight (downlink
  "count"): k x (scale x weight) with k the sum of their signs, which a worker rebuilds from counts.
- `OuterOptimizer`: "average" (update = lr * mean delta) or "nesterov" (SGD with Nesterov momentum
  on the outer gradient, DiLoCo style: m = mu*m + D; update = lr * (D + mu*m)); a merge that
  carries only a fraction f of a typical merge's tokens gets m = mu**f * m + D and
  update = lr * (D + f * mu * m), so partial merges move the model by about their share.
- `NormGate`: refuses (or clips) a delta whose norm is far above the recent median.

Plain module: torch only, no gRPC. Both roles use it: the coordinator merges with it (under its
state lock) and a worker replays the same arithmetic on a relayed or counted version, bit for bit.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from geotrain.common.config import MergeConfig, OuterConfig
from geotrain.common.tensors import global_norm


@dataclass
class Contribution:
    """One decoded delta ready to merge."""

    push_id: str
    worker_id: str
    base_version: int
    tokens: int
    steps: int
    mean_loss: float
    tensors: dict[str, torch.Tensor]  # name -> float32 (same shapes as the model), as decoded
    ranges: list = field(default_factory=list)  # ledger TrainedRange list
    wire_bytes: int = 0
    factor: float = 1.0  # the outlier gate's clip factor (NormGate), applied in weighted_sum
    blob: bytes = b""  # the pushed payload (kept for downlinks "relay" and "count")


def staleness_weight(staleness: int, power: float) -> float:
    """Multiplier for a delta measured `staleness` versions behind the current model."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return (1.0 + staleness) ** -power


def merge_weights(
    contributions: Sequence[Contribution], current_version: int, staleness_power: float, scale: float = 1.0,
    by_tokens: bool = True,
) -> list[float]:
    """Each delta's weight in the merge: scale x tokens_i / sum(tokens) (or scale / N with
    by_tokens False), damped by staleness.

    With staleness 0 everywhere the weighted sum is the token-weighted mean. Damping multiplies a
    stale delta's contribution without renormalizing, so stale work moves the model less.
    by_tokens False (downlink "count"): workers keep training while their push is in flight, so the
    deltas of one round differ by a few steps; equal weights keep the merge a count of signs.
    """
    if not contributions:
        raise ValueError("a merge needs at least one contribution")
    total_tokens = sum(max(c.tokens, 1) for c in contributions)
    return [
        scale * (max(c.tokens, 1) / total_tokens if by_tokens else 1.0 / len(contributions))
        * staleness_weight(current_version - c.base_version, staleness_power)
        for c in contributions
    ]


class WeightedSum:
    """sum_i (delta_i * factor_i) * weight_i in fp32, accumulated one delta at a time (`add`), in
    the order given; every factor and weight is rounded to fp32 once. Deterministic across devices
    (see the module docstring). Holding one accumulator instead of every delta keeps a replaying
    worker at one decoded delta at a time."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] | None = None
        self.count = 0

    def add(self, delta: Mapping[str, torch.Tensor], factor: float, weight: float) -> None:
        if self.total is None:
            self.total = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in delta.items()}
        for n, acc in self.total.items():
            fold_into(acc, delta[n], factor, weight)
        self.count += 1


def weighted_sum(
    deltas: Sequence[Mapping[str, torch.Tensor]], factors: Sequence[float], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_i (delta_i * factor_i) * weight_i in fp32, in the given order (WeightedSum); the
    coordinator's merge and a relaying worker's replay both compute it."""
    if not deltas or not (len(deltas) == len(factors) == len(weights)):
        raise ValueError(f"need as many factors and weights as deltas, got {len(deltas)}, {len(factors)}, {len(weights)}")
    acc = WeightedSum()
    for delta, factor, weight in zip(deltas, factors, weights):
        acc.add(delta, factor, weight)
    return acc.total


def fold_into(acc: torch.Tensor, delta: torch.Tensor, factor: float, weight: float) -> None:
    """acc += (delta * factor) * weight, one term of weighted_sum: acc starting as fp32 zeros and
    folded with each delta in order equals weighted_sum bit for bit (the coordinator folds the
    deltas of a merge a tensor at a time, never holding them all decoded)."""
    x = delta.to(acc.device, torch.float32)
    if factor != 1.0:
        x = x * _f32(factor, x)
    acc.add_(x * _f32(weight, x))


def counted_mean(
    k: Mapping[str, torch.Tensor], scales: Mapping[str, float], weight: float
) -> dict[str, torch.Tensor]:
    """The mean delta of a count merge (downlink "count"): k * (fp32(scale) * fp32(weight)) per
    tensor, k the integer sum of the N deltas' signs. One rounding for the scalar product and one
    per value, the same on every device; the coordinator and every worker call it."""
    out = {}
    for n, kn in k.items():
        kf = kn.to(torch.float32)
        out[n] = kf * (_f32(scales[n], kf) * _f32(weight, kf))
    return out


def negative_signs(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Concatenated sign bits (True = negative, -0.0 included) of `tensors` in `names` order."""
    return torch.cat([torch.signbit(tensors[n].detach().reshape(-1).cpu()) for n in names])


def sign_sum_from_agree(
    own_negative: torch.Tensor, agree: torch.Tensor, n_deltas: int, shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """k per tensor from a reference delta's signs and, per value, how many of the other
    n_deltas - 1 share its sign: k = s_own * (2 * agree - n_deltas + 2)."""
    own = 1 - 2 * own_negative.to(torch.int16)
    return _split(own * (2 * agree.to(torch.int16) - (n_deltas - 2)), shapes)


def sign_sum_from_plus(plus: torch.Tensor, n_deltas: int, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """k per tensor from, per value, how many of the n_deltas signs are positive: k = 2 * plus - n."""
    return _split(2 * plus.to(torch.int16) - n_deltas, shapes)


def majority_k(k: torch.Tensor, n_deltas: int) -> torch.Tensor:
    """The k of a majority count merge (compression.count_rule "majority"): n x sign(k), 0 on a
    tie; every value moves by the whole scale in the direction most of the n signs take. Integer
    arithmetic (int16), the same everywhere; the coordinator and every replaying worker call it."""
    return torch.sign(k).to(torch.int16) * n_deltas


def vote_of(k: torch.Tensor, own_negative: torch.Tensor | None = None) -> torch.Tensor:
    """The vote payload's values (common/counts.py, maxval 2) from the sum of signs k (flat):
    1 + sign(k), or relative to a reference delta's signs 1 + s_own x sign(k) (2: the majority
    shares its sign, 1: a tie, 0: against it)."""
    v = torch.sign(k).to(torch.int16)
    if own_negative is not None:
        v = v * (1 - 2 * own_negative.to(torch.int16))
    return (v + 1).to(torch.uint8)


def majority_k_from_vote(vote: torch.Tensor, n_deltas: int, shapes: Mapping[str, Sequence[int]],
                         own_negative: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Inverse of vote_of, as majority_k per tensor: n x (vote - 1) (x s_own with a reference)."""
    v = vote.to(torch.int16) - 1
    if own_negative is not None:
        v = v * (1 - 2 * own_negative.to(torch.int16))
    return _split(v * n_deltas, shapes)


def _split(flat: torch.Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for n, shape in shapes.items():
        size = 1
        for d in shape:
            size *= int(d)
        out[n] = flat[pos : pos + size].reshape(tuple(shape))
        pos += size
    assert pos == flat.numel(), (pos, flat.numel())
    return out


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A python float as a 0-dim fp32 tensor on like's device: the same rounding everywhere."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def combine(
    contributions: Sequence[Contribution], current_version: int, staleness_power: float, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """The weighted mean of the contributions' deltas (merge_weights, weighted_sum)."""
    weights = merge_weights(contributions, current_version, staleness_power, scale)
    return weighted_sum([c.tensors for c in contributions], [c.factor for c in contributions], weights)


COUNT_SCALING_MAX_DELTAS = 4  # count_step grows the step up to merges of this many deltas (measured: 2, 4, 8)


def count_step(config: OuterConfig, deltas: int, majority: bool = False) -> tuple[float, float]:
    """(lr, momentum) of the outer Nesterov step for a count merge of `deltas` 1-bit deltas.

    majority: the merge took the majority sign (count_rule "majority", 3 deltas or more). It moves
    every value by the whole scale where most deltas agree, a larger step than the exact mean's
    where they split, and takes config's step as it is (measured: 4 deltas at config's 0.8 / 0.8
    1.3275, at 1.2 / 0.7 1.3411; benchmarks/README.md, "The outer step of a majority merge, and
    shorter rounds from 3 workers").

    Measured, not derived: the best immediate step lr x (1 + mu) of a count merge is larger for 4
    one-bit deltas than for 2, at the same total step lr / (1 - mu) of a steady direction, while 4
    uncompressed deltas keep the smaller one (benchmarks/README.md,
    "The outer step of a count merge": 2 deltas 0.8 / 0.8, 4 deltas 1.2 / 0.7; 8 deltas also
    1.2 / 0.7, larger immediate steps were worse there). For N > 2 the immediate step is config's
    x sqrt(min(N, COUNT_SCALING_MAX_DELTAS) / 2) and mu = sqrt(1 - immediate / total), so that
    lr = total x (1 - mu); with the defaults: N = 3 -> 1.01 / 0.75, N >= 4 -> 1.2 / 0.7.
    N <= 2, config.count_scaling False or kind "average": config's. Plain Python floats: the
    coordinator and every replaying worker get the same two numbers."""
    lr, mu = config.lr, config.momentum
    if majority or not config.count_scaling or config.kind != "nesterov" or deltas <= 2:
        return lr, mu
    total = lr / (1.0 - mu)
    immediate = lr * (1.0 + mu) * math.sqrt(min(deltas, COUNT_SCALING_MAX_DELTAS) / 2.0)
    mu_n = math.sqrt(max(0.0, 1.0 - immediate / total))
    return total * (1.0 - mu_n), mu_n


class OuterOptimizer:
    """The coordinator's outer step. `update` is called once per merge, under the state lock."""

    RECENT_MERGES = 16  # merges whose token counts define a "typical" merge

    def __init__(self, config: OuterConfig, shapes: Mapping[str, tuple[int, ...]]):
        self.config = config.validate()
        self.momentum: dict[str, torch.Tensor] = (
            {n: torch.zeros(s) for n, s in shapes.items()} if config.kind == "nesterov" else {}
        )
        self.recent_tokens: deque[int] = deque(maxlen=self.RECENT_MERGES)
        self.last_fraction = 1.0  # f of the last update (sent to relaying workers)
        self.last_step = (config.lr, config.momentum)  # (lr, mu) of the last update (lookahead)

    def round_fraction(self, tokens: int) -> float:
        """`tokens` as a fraction of the median of the recent merges' tokens, at most 1 (1 when
        unknown: tokens <= 0 or no merge yet)."""
        if tokens <= 0 or not self.recent_tokens:
            return 1.0
        return min(1.0, tokens / statistics.median(self.recent_tokens))

    def update(
        self, mean_delta: Mapping[str, torch.Tensor], tokens: int = 0, fraction: float | None = None,
        counted: int = 0, majority: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The change to apply to the global model for this merge (not applied here).

        tokens: the tokens the merged deltas carry (0: treat as a typical merge). With nesterov, a
        merge carrying a fraction f < 1 of a typical merge (a worker's last few steps at the end of
        the run, a straggler merged alone) decays the momentum by mu**f and looks ahead by f * mu * m
        instead of a full momentum step, which would overshoot just as the inner learning rate has
        decayed. With f = 1 this is DiLoCo's m = mu * m + D; update = lr * (D + mu * m).

        fraction: f as the coordinator computed it (`last_fraction`), for a worker replaying the
        merge (its replica has no token history); `tokens` is then ignored. Every scalar is
        rounded to fp32 once and every step is one IEEE operation: bit-identical on any device.

        counted: N for a count merge of N 1-bit deltas (its step is count_step's), 0 otherwise;
        majority: that merge took the majority sign (count_step's majority).
        """
        if fraction is None:
            f = self.round_fraction(tokens)
            if tokens > 0:
                self.recent_tokens.append(tokens)
        else:
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"outer fraction must be in (0, 1], got {fraction!r}")
            f = float(fraction)
        self.last_fraction = f
        lr, mu = count_step(self.config, counted, majority)
        self.last_step = (lr, mu)
        if self.config.kind == "average":
            return {n: d * _f32(lr, d) for n, d in mean_delta.items()}
        out = {}
        for n, d in mean_delta.items():
            m = self.momentum[n]
            m.mul_(_f32(mu**f, m)).add_(d)
            out[n] = (d + m * _f32(f * mu, m)) * _f32(lr, m)
        return out

    def lookahead(self) -> dict[str, torch.Tensor] | None:
        """Nesterov's lookahead lr * mu * m, the part of the last updates that anticipates the
        next ones (the global model minus it is the classical-momentum iterate); None for "average"."""
        if self.config.kind != "nesterov":
            return None
        lr, mu = self.last_step
        return {n: m * (lr * mu) for n, m in self.momentum.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The momentum (`outer_momentum.<name>`) and what the next update and lookahead depend on
        besides it: the last update's (lr, mu) (`outer_last_step`, float64 (2,)) and the recent
        merges' tokens (`outer_recent_tokens`, int64 (k,), oldest first)."""
        out = {f"outer_momentum.{n}": m for n, m in self.momentum.items()}
        out["outer_last_step"] = torch.tensor(self.last_step, dtype=torch.float64)
        out["outer_recent_tokens"] = torch.tensor(list(self.recent_tokens), dtype=torch.int64)
        return out

    def load_momentum(self, momentum: Mapping[str, torch.Tensor]) -> None:
        """Replace the momentum (a relaying worker's replica, from a FULL model reply)."""
        if self.config.kind != "nesterov":
            return
        if set(momentum) != set(self.momentum):
            raise ValueError(f"momentum names differ from the model's: {sorted(set(momentum) ^ set(self.momentum))[:5]}")
        for n, m in momentum.items():
            if tuple(m.shape) != tuple(self.momentum[n].shape):
                raise ValueError(f"momentum {n!r} has shape {tuple(m.shape)}, expected {tuple(self.momentum[n].shape)}")
        self.momentum = {n: m.detach().to("cpu", torch.float32).clone() for n, m in momentum.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for n in self.momentum:
            key = f"outer_momentum.{n}"
            if key not in tensors:
                raise ValueError(f"checkpoint lacks outer optimizer state {key!r}")
            self.momentum[n] = tensors[key].clone().float()
        # Checkpoints written before these two were kept: the configured step, no token history.
        if "outer_last_step" in tensors:
            step = tensors["outer_last_step"]
            if tuple(step.shape) != (2,):
                raise ValueError(f"outer_last_step has shape {tuple(step.shape)}, expected (2,)")
            self.last_step = (float(step[0]), float(step[1]))
        if "outer_recent_tokens" in tensors:
            self.recent_tokens.clear()
            self.recent_tokens.extend(int(t) for t in tensors["outer_recent_tokens"].tolist())


class NormGate:
    """Outlier policy for delta norms (merge.max_delta_norm_ratio; 0 disables it).

    A delta whose L2 norm exceeds ratio x the median of the last `window` accepted norms is
    refused, or, with clip_outliers, scaled down to that bound. The first `warmup` deltas only
    build the history.
    """

    def __init__(self, config: MergeConfig, window: int = 32, warmup: int = 4):
        self.ratio = config.max_delta_norm_ratio
        self.clip = config.clip_outliers
        self.warmup = warmup
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, tensors: dict[str, torch.Tensor]) -> tuple[bool, float, str]:
        """Returns (accept, factor to multiply the delta by, reason). Does not record the norm."""
        return self.check_norm(global_norm(tensors))

    def check_norm(self, norm: float) -> tuple[bool, float, str]:
        """check() for a delta whose L2 norm is already known."""
        if self.ratio <= 0 or len(self.recent) < self.warmup:
            return True, 1.0, ""
        bound = self.ratio * statistics.median(self.recent)
        if norm <= bound:
            return True, 1.0, ""
        reason = f"delta norm {norm:.4g} exceeds {self.ratio} x recent median ({bound:.4g})"
        if self.clip:
            return True, bound / norm, reason
        return False, 0.0, reason

    def record(self, tensors: dict[str, torch.Tensor], factor: float = 1.0) -> None:
        """Remember an accepted delta's norm (after the clip `factor` check() returned)."""
        self.record_norm(global_norm(tensors), factor)

    def record_norm(self, norm: float, factor: float = 1.0) -> None:
        """record() for a delta whose L2 norm is already known."""
        self.recent.append(norm * factor)


# --------------------------------------------------------------------------- replaying a version
#
# A worker under a replayed downlink ("relay", "combine", "count") rebuilds each version's update
# U from the payloads the coordinator streamed and its replica of the outer momentum. The wire
# messages (geotrain.proto UpdateInfo, RelayedDelta, CountedMerge) are converted to the plain
# dataclasses below by the worker (worker/downlink.py); the arithmetic is the coordinator's own.


@dataclass(frozen=True)
class RelayedDelta:
    """One pushed delta inside a relayed version: its payload is stream[offset : offset + size],
    or, with size 0, the replaying worker's own held copy of push `push_id`."""

    push_id: str
    offset: int
    size: int
    weight: float  # merge weight (tokens share x staleness damping)
    factor: float = 1.0  # the outlier gate's clip factor


@dataclass(frozen=True)
class CountedDeltas:
    """A count merge of `deltas` 1-bit deltas of equal `weight` (downlink "count"): per value, a
    count payload at stream[offset : offset + size] (common/counts.py), agree counts against the
    held push `reference_push_id`, or plus counts when it is ""."""

    push_ids: tuple[str, ...]
    reference_push_id: str
    deltas: int
    weight: float
    scales: tuple[float, ...]  # per tensor, in the model's tensor order
    offset: int
    size: int
    majority: bool = False  # vote payload; k = n x sign(sum of signs) (majority_k)


@dataclass(frozen=True)
class ReplayedVersion:
    """What a worker needs to replay version `version`: relayed deltas or a count merge, and the
    outer step's fraction."""

    version: int
    outer_fraction: float
    relayed: tuple[RelayedDelta, ...] = ()
    counted: CountedDeltas | None = None


def replay_relayed(
    v: ReplayedVersion,
    stream: bytes,
    held: Mapping[str, bytes],
    decode: Callable[[bytes], dict[str, torch.Tensor]],
    outer: OuterOptimizer,
) -> dict[str, torch.Tensor]:
    """The update U of a relayed version (downlinks "relay", "combine"): decode every merged delta
    (from the stream, or our own copy in `held` when the coordinator omitted it), then replay the
    coordinator's merge: U = outer.update(weighted_sum(deltas, factors, weights), fraction).
    Bit-identical to the coordinator's U when `outer` holds its momentum at version - 1. Advances
    outer's momentum; on ValueError (a missing or bad delta) nothing has changed."""
    if not v.relayed:
        raise ValueError(f"update {v.version} relays no deltas")
    payloads = []
    for d in v.relayed:  # every payload located before anything is decoded
        if d.size == 0:
            payload = held.get(d.push_id)
            if payload is None:
                raise ValueError(f"update {v.version} omits push {d.push_id}, which this worker does not hold")
        elif d.offset + d.size > len(stream):
            raise ValueError(f"update {v.version}: delta {d.push_id} lies outside the stream "
                             f"({d.offset}+{d.size} > {len(stream)} bytes)")
        else:
            payload = memoryview(stream)[d.offset : d.offset + d.size]
        payloads.append(payload)
    acc = WeightedSum()  # one decoded delta at a time: the same sum, in the same order, as weighted_sum
    for d, payload in zip(v.relayed, payloads):
        acc.add(decode(bytes(payload)), d.factor, d.weight)
    return outer.update(acc.total, fraction=v.outer_fraction)


def replay_counted(
    v: ReplayedVersion,
    stream: bytes,
    held: Mapping[str, bytes],
    decode: Callable[[bytes], dict[str, torch.Tensor]],
    outer: OuterOptimizer,
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """The update U of a count merge (downlink "count"): rebuild k, the sum of the N deltas' signs
    per value (a majority merge: majority_k of it), from the count or vote payload (and our own
    delta's signs when the payload refers to it), then
    U = outer.update(counted_mean(k, scales, weight), fraction). Bit-identical to the
    coordinator's U when `outer` holds its momentum at version - 1. On ValueError (a bad payload,
    a missing delta) nothing has changed."""
    from geotrain.common.counts import decode_counts

    c = v.counted
    names = list(shapes)
    if c is None:
        raise ValueError(f"update {v.version} is not a count merge")
    if c.deltas < 2 or len(c.push_ids) != c.deltas or len(c.scales) != len(names):
        raise ValueError(f"update {v.version}: malformed count merge ({c.deltas} deltas, "
                         f"{len(c.push_ids)} push ids, {len(c.scales)} scales for {len(names)} tensors)")
    if c.offset + c.size > len(stream):
        raise ValueError(f"update {v.version}: count payload outside the stream ({c.offset}+{c.size} > {len(stream)})")
    payload = stream[c.offset : c.offset + c.size]
    total = sum(math.prod(shape) for shape in shapes.values())
    own_negative = None
    if c.reference_push_id:
        if c.reference_push_id not in c.push_ids:
            raise ValueError(f"update {v.version}: reference {c.reference_push_id} is not one of the merged deltas")
        own = held.get(c.reference_push_id)
        if own is None:
            raise ValueError(f"update {v.version} counts against push {c.reference_push_id}, which this worker does not hold")
        own_negative = negative_signs(decode(own), names)
    if c.majority:
        vote = torch.from_numpy(decode_counts(payload, total, 2))
        k = majority_k_from_vote(vote, c.deltas, shapes, own_negative)
    elif own_negative is not None:
        agree = torch.from_numpy(decode_counts(payload, total, c.deltas - 1))
        k = sign_sum_from_agree(own_negative, agree, c.deltas, shapes)
    else:
        plus = torch.from_numpy(decode_counts(payload, total, c.deltas))
        k = sign_sum_from_plus(plus, c.deltas, shapes)
    mean = counted_mean(k, dict(zip(names, c.scales)), c.weight)
    return outer.update(mean, fraction=v.outer_fraction, counted=c.deltas, majority=bool(c.majority))


def replay_version(
    v: ReplayedVersion,
    stream: bytes,
    held: Mapping[str, bytes],
    decode: Callable[[bytes], dict[str, torch.Tensor]],
    outer: OuterOptimizer,
    shapes: Mapping[str, Sequence[int]],
) -> dict[str, torch.Tensor]:
    """replay_counted for a count merge, else replay_relayed."""
    if v.counted is not None:
        return replay_counted(v, stream, held, decode, outer, shapes)
    return replay_relayed(v, stream, held, decode, outer)


def counted_contribution(
    own_decoded: Mapping[str, torch.Tensor], scales: Sequence[float], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Our delta as a count merge took it: per tensor, the merge's scale x the signs of what we
    pushed (signbit, as the coordinator counts them)."""
    if len(scales) != len(names):
        raise ValueError(f"count merge carries {len(scales)} scales for {len(names)} tensors")
    out = {}
    for name, scale in zip(names, scales):
        t = own_decoded[name]
        s = torch.tensor(scale, dtype=torch.float32)
        out[name] = torch.where(torch.signbit(t), -s, s)
    return out
