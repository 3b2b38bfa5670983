"""The all-reduce schedules measured worse than the default ones, kept as references: benchmarks
and tests compare against them, and `compression.sync_schedule` can still name them. Imported by
CompressedAllReduce.allreduce only when one of them is chosen.

- "allgather": every member encodes its OWN buffer once (error feedback) and the payloads travel
  unchanged by recursive doubling; every member decodes all N and sums them in rank order.
  Bytes: (N - 1) x encoded. "count" quantizes the same way at 22x instead of 14x fewer bytes than
  fp32 (tests/test_sync.py measures count against it).
- "scatter": a reduce-scatter forwarding every member's own encoded blocks, the owner's exact sum,
  re-quantized ternary once; +1.4-3.9% / +10-16% validation loss at 4 members (worker/sync.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from geotrain.protos import peer_pb2
from geotrain.worker.peer import AllReduceStats, PeerFailure, Round

if TYPE_CHECKING:
    from geotrain.worker.allreduce import CompressedAllReduce


def gather_own(ar: "CompressedAllReduce", flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
    t0 = time.perf_counter()
    mine, _ = ar._encode("own", flat)  # this member's contribution, quantized once
    stats.encode_seconds += time.perf_counter() - t0
    payloads = {ar.rank: mine}
    for level in range(ar.levels):  # recursive doubling: forward every payload held so far
        ar._forward_held(payloads, ar.rank ^ (1 << level), step, Round(level, level, peer_pb2.ALL_GATHER), stats)
    missing = sorted(set(range(ar.world_size)) - set(payloads))
    if missing:
        raise PeerFailure(ar.rank ^ (1 << (ar.levels - 1)), f"all-gather ended without the payloads of ranks {missing}")
    t0 = time.perf_counter()
    acc = ar._codec.decode(payloads[0], flat.shape).reshape(-1).to(torch.float32)
    for r in range(1, ar.world_size):  # rank order on every member: bit-identical sums
        acc.add_(ar._codec.decode(payloads[r], flat.shape).reshape(-1).to(torch.float32))
    stats.encode_seconds += time.perf_counter() - t0
    return acc.div_(ar.world_size)


def scatter_own(ar: "CompressedAllReduce", flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
    """Schedule "scatter": reduce-scatter by recursive halving that forwards every member's own
    encoded blocks unchanged (no partial sum is quantized), so the owner of block b decodes all N
    members' contributions to it and sums them exactly in rank order; the owner then encodes the
    block's mean once (its own error feedback) and the all-gather forwards those bytes."""
    B, n = ar._layout.block, ar.world_size
    t0 = time.perf_counter()
    held = {}  # member * n + block -> that member's own encoded block
    for b in range(n):
        held[ar.rank * n + b], _ = ar._encode(f"own{b}", flat[b * B : (b + 1) * B])
    stats.encode_seconds += time.perf_counter() - t0
    lo, hi, rnd = 0, n, 0
    for level in range(ar.levels):
        partner, mid = ar.rank ^ (1 << level), (lo + hi) // 2
        keep, give = ((lo, mid), (mid, hi)) if not ar.rank >> level & 1 else ((mid, hi), (lo, mid))
        order = sorted(k for k in held if give[0] <= k % n < give[1])
        segs = [(k, len(held[k])) for k in order]
        header, got = ar._exchange(partner, step, Round(rnd, level, peer_pb2.REDUCE_SCATTER),
                                     b"".join(held[k] for k in order), segs, stats)
        for k in order:
            del held[k]
        pos = 0
        for seg in header.segments:
            if not (0 <= seg.block < n * n and keep[0] <= seg.block % n < keep[1]):
                raise PeerFailure(partner, f"reduce-scatter segment {seg.block} is outside blocks {keep}")
            held[seg.block] = got[pos : pos + seg.size_bytes]
            pos += seg.size_bytes
        lo, hi, rnd = keep[0], keep[1], rnd + 1
    missing = sorted(set(range(n)) - {k // n for k in held})
    if missing:
        raise PeerFailure(ar.rank ^ (1 << (ar.levels - 1)), f"reduce-scatter ended without block {lo} of ranks {missing}")
    t0 = time.perf_counter()
    acc = ar._codec.decode(held[lo], (B,)).reshape(-1).to(torch.float32)
    for m in range(1, n):  # rank order: the owner's exact sum of the N quantized contributions
        acc.add_(ar._codec.decode(held[m * n + lo], (B,)).reshape(-1).to(torch.float32))
    mean = acc.div_(n)
    if ar._mean_feedback is not None:  # owner encodes the mean of its block once
        mine, _ = ar._mean_feedback.compress("mean", mean)
    else:
        mine, _ = ar._mean_codec.encode(mean)
    stats.encode_seconds += time.perf_counter() - t0
    return ar._all_gather_blocks({lo: mine}, ar._mean_codec, step, rnd, stats)


SCHEDULES = {"allgather": gather_own, "scatter": scatter_own}
