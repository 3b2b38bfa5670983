"""1-bit compressed all-reduce for power-of-two sync groups, over gRPC streams between members.

A sync group is N = 2^k workers that train as one. Every step they average gradients with
`CompressedAllReduce.allreduce`, peer to peer over the Peer service (protos/peer.proto) served on each
worker's `--port`.

Schedules (partner at level l = rank XOR 2^l):
- "halving" (Rabenseifner): reduce-scatter by recursive halving (level l sends the half of the
  current range the partner keeps, re-encoded with error feedback), then all-gather by recursive
  doubling of the reduced blocks. Each block is encoded once by its owner (with error feedback) and
  forwarded unchanged, so every member decodes the same bytes: results are bit-identical by
  construction. Bytes sent per member: 2 (N-1)/N x encoded buffer.
- "doubling": log2(N) levels, each exchanging the whole re-encoded buffer; both partners sum the two
  *decoded* contributions lower rank first, so they hold identical sums. Bytes: log2(N) x encoded.
- "allgather": every member encodes its OWN buffer once (error feedback) and the payloads travel
  unchanged by recursive doubling; every member decodes all N and sums them in rank order, so the
  only quantization is of each member's own contribution. Bytes: (N - 1) x encoded.
- "scatter": the reduce-scatter of "halving", but forwarding every member's own encoded blocks
  unchanged instead of re-encoding partial sums, so the owner of a block sums all N members' 1-bit
  contributions exactly; the owner then encodes the block's mean once, ternary (a zero where the
  members cancel; error feedback on the owner, as a 1-bit Adam server does), and the all-gather
  forwards it. Bytes: log2(N)/2 1-bit buffers + (N-1)/N ternary ones (1.6 bits per value):
  2.2 bits per value at N = 4 (allgather 3, halving 1.5), 3.0 at N = 8 (allgather 7, halving 1.75).
- "count": each member's own contribution quantized once, as in "allgather", but on scales the
  group shares, so a block's owner holds the exact sum of the N signs and sends each member, per
  value, how many of the other N - 1 agree with that member's own sign: pairwise exchanges with
  rank XOR r, r = 1 .. N-1 (direct, nothing forwarded). Reduce-scatter: my sign bits of block p and
  my scale per chunk of it (one byte, common/counts.py scale codes) to p; all-gather: p's shared
  scales (the mean of the members') and my agree counts over block p (2 bits for N = 4, about 1.9
  after zstd). Bytes: (N-1)/N x (1 + 1.9) bits per value at N = 4 plus 2 bytes per chunk: 22x
  fewer than a fp32 ring all-reduce (allgather: 14x). 2 (N-1) exchanges per call.
"auto" picks: doubling at N = 2 (halving's bytes, one quantization instead of two), count from
N = 4 (one quantization per member, fewest bytes); without compression, halving from N = 4 (the
ring's bytes). Quality against fp32 sync (worker/sync.py docstring; tiny model, 100 / 300 steps,
one seed): 4 members: allgather +1.2% / +3.8%, scatter +2.4-3.9% / +12%, halving +5.2% / +25-31%;
8 members: allgather +4.8% / +2.5%, scatter +4.3% / +16%, halving +9.0% / +66%. Over seeds 1-3
(100 steps) the spread is wider than those gaps: 4 members allgather +0.4 to +6.1%, count +0.2
to +6.4% (tests/test_sync.py measures count against allgather). Re-quantizing a mean costs quality
because the sign of a sum of members' values has no zero where they disagree; ternary keeps the
zero but still loses the magnitudes.

Compression ("sign"): 1 bit per value plus one fp32 scale per `chunk` values (common/compression.py);
the scale is sqrt(mean y^2) of the chunk (`sign_scale="rms"`, the default: the decoded chunk has
y's norm) or mean |y| ("mean_abs": the least-squares scale of one step, whose shortfall error
feedback carries to later steps; measured worse for training, worker/sync.py);
every tensor starts on a chunk boundary of the flattened buffer, so a scale never spans two tensors.
Error feedback keeps one residual per (phase, level) of the schedule, i.e. per position of the
flattened buffer and hence per tensor. "int8" (8 bits + an fp32 absmax / 127 scale per chunk,
error feedback: the warmup steps of 1-bit sync, 4x fewer bytes than fp32) takes the schedules
of "none"; "none" moves fp32.

Transport, deadlines and the failure policy: worker/peer.py (`PeerGroup`, which this class
extends); the flat buffer and the count arithmetic: worker/allreduce_layout.py. The schedules
"allgather" and "scatter" (measured worse than "count" and "doubling", kept as references for
benchmarks and tests) live in worker/allreduce_reference.py, imported only when chosen.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np
import torch

from geotrain.common.compression import SIGN_SCALES
from geotrain.common.counts import decode_counts, encode_counts, scale_codes, scales_from_codes
from geotrain.protos import peer_pb2
from geotrain.worker.allreduce_layout import (
    _COMMIT_ROWS, _Layout, _agree_table, _chunk_scales, _codec, _feedback, _k_from_agree, _k_from_plus,
)
from geotrain.worker.peer import (  # noqa: F401 - PeerFailure, AllReduceStats and router_for are re-exported
    AllReduceStats, PeerFailure, PeerGroup, Round, router_for,
)

SCHEMES = ("sign", "int8", "none")
REFERENCE_ALGORITHMS = ("allgather", "scatter")  # worker/allreduce_reference.py
ALGORITHMS = ("auto", "halving", "doubling", "count", *REFERENCE_ALGORITHMS)


class CompressedAllReduce(PeerGroup):
    """Mean of named tensors over a power-of-two group; see the module docstring for the schedule
    and the failure policy.

    rank: this member, 0 .. world_size-1. peers: "host:port" of every member in rank order (this
    member's own entry is not dialled). group_id / epoch: identify this incarnation of the group on
    the wire. compression: "sign" (1 bit + fp32 scale per `chunk` values, error feedback), "int8"
    (8 bits + scale per chunk, error feedback) or "none" (fp32); sign_scale: "rms" (default) or
    "mean_abs", the scale of a chunk under "sign". token: the group's secret (issued by the
    coordinator at formation, never the run token): sent as bearer metadata with every call, and
    required of every Peer call this member serves for the group; None: no authentication.
    tls_ca: PEM of the CA that signed the members' certificates: dial the peers over TLS.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        peers: Sequence[str],
        group_id: str = "sync",
        *,
        epoch: int = 0,
        compression: str = "sign",
        chunk: int = 256,
        sign_scale: str = "rms",
        algorithm: str = "auto",
        deadline_s: float | None = None,
        min_deadline_s: float = 10.0,
        token: str | None = None,
        tls_ca: bytes | None = None,
        max_buffered_bytes: int = 2 << 30,
    ):
        if compression not in SCHEMES:
            raise ValueError(f"compression must be one of {SCHEMES}, got {compression!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        if sign_scale not in SIGN_SCALES:
            raise ValueError(f"sign_scale must be one of {SIGN_SCALES}, got {sign_scale!r}")
        super().__init__(rank, world_size, peers, group_id, epoch=epoch, compression=compression, deadline_s=deadline_s,
                         min_deadline_s=min_deadline_s, token=token, tls_ca=tls_ca, max_buffered_bytes=max_buffered_bytes)
        self.chunk, self.sign_scale = chunk, sign_scale
        if algorithm == "auto":  # see the module docstring
            if world_size <= 2:
                algorithm = "doubling"
            else:
                algorithm = "count" if compression == "sign" else "halving"
        if algorithm == "count" and compression != "sign":
            raise ValueError(f"algorithm 'count' needs compression 'sign', got {compression!r}")
        self.algorithm = algorithm
        self._codec = _codec(compression, chunk, sign_scale)
        self._feedback = _feedback(self._codec) if compression != "none" else None
        # "scatter" under "sign": the owners' block means go out ternary (a mean of directions that
        # cancel keeps its zero), with the owner's own error feedback.
        self._mean_codec, self._mean_feedback = self._codec, self._feedback
        if compression == "sign" and algorithm == "scatter":
            self._mean_codec = _codec("ternary", chunk, sign_scale)
            self._mean_feedback = _feedback(self._mean_codec)
        self._layout: _Layout | None = None
        self._k_buf: torch.Tensor | None = None  # the count schedule's sums, reused between calls
        self._last_step = -1

    # ------------------------------------------------------------------ error feedback

    def residual_norm(self) -> float:
        """L2 norm of all error-feedback residuals (0 without compression)."""
        if self._feedback is None:
            return 0.0
        own = self._feedback.residual_norm()
        if self._mean_feedback is self._feedback:
            return own
        return (own**2 + self._mean_feedback.residual_norm() ** 2) ** 0.5

    def _count_buffer(self, size: int) -> torch.Tensor:
        """The count schedule's fp32 result buffer, kept between calls (a fresh 4-bytes-per-value
        buffer costs its page faults on every call); the caller's result is a new tensor."""
        if self._k_buf is None or self._k_buf.numel() != size:
            self._k_buf = torch.empty(size, dtype=torch.float32)
        return self._k_buf

    def reset_feedback(self) -> None:
        """Drop the residuals (after a state repair or re-form the basepoint jumped)."""
        if self._feedback is not None:
            self._feedback.reset()
        if self._mean_feedback is not None:
            self._mean_feedback.reset()

    # ------------------------------------------------------------------ the collective

    def allreduce(self, tensors: Mapping[str, torch.Tensor], step: int, plan=None, rebase: str = "") -> dict[str, torch.Tensor]:
        """The mean of `tensors` over all members, identical bit for bit on every member.

        Every member must call it with the same names and shapes and the same `step`, which must
        increase from call to call. Returns new tensors (same device and dtype as the inputs).
        plan: rank 0 only, a peer_pb2.BatchPlan that rides along in the message headers; after the
        call every member holds it in `last_plan` (None when rank 0 sent none).
        rebase: rank 0 only, the sha256 of a rebase blob it serves for `step` (serve_rebase); after
        the call every member holds it in `last_rebase` ("" when rank 0 announced none).
        Raises PeerFailure when a member fails or misses a deadline; ValueError on caller mistakes.
        """
        if (plan is not None or rebase) and self.rank != 0:
            raise ValueError(f"only rank 0 sends a batch plan or a rebase (this member is rank {self.rank})")
        if step <= self._last_step:
            raise ValueError(f"step must increase from call to call: got {step} after {self._last_step}")
        if not tensors:
            raise ValueError("tensors must not be empty")
        if self._layout is None or not self._layout.matches(tensors):
            if self._layout is not None:
                self.reset_feedback()
            self._layout = _Layout.build(tensors, self.world_size, self.chunk)
        self._last_step = step
        self._plan, self.last_plan = plan, None
        self._rebase, self.last_rebase = rebase, ""
        self._inbox.advance(step)
        stats = AllReduceStats(calls=1)
        start = time.perf_counter()
        self._set_state(peer_pb2.PeerStatusReply.IN_ALLREDUCE, step)
        try:
            flat = self._layout.flatten(tensors, self.world_size)
            if self.world_size == 1:
                result = flat
            elif self.algorithm == "halving":
                result = self._halving_doubling(flat, step, stats)
            elif self.algorithm in REFERENCE_ALGORITHMS:  # not on the default path (module docstring)
                from geotrain.worker.allreduce_reference import SCHEDULES

                result = SCHEDULES[self.algorithm](self, flat, step, stats)
            elif self.algorithm == "count":
                result = self._count_own(flat, step, stats)
            else:
                result = self._recursive_doubling(flat, step, stats)
        except PeerFailure as exc:
            self._set_state(peer_pb2.PeerStatusReply.FAILED, step, reason=str(exc))
            exc.survivors = self.survivors()
            raise
        self._set_state(peer_pb2.PeerStatusReply.IDLE, step)
        self.last_plan = self._plan
        self.last_rebase = self._rebase
        stats.seconds = time.perf_counter() - start
        self.last = stats
        self.total.add(stats)
        return self._layout.unflatten(result, tensors)

    def _halving_doubling(self, flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
        B, n = self._layout.block, self.world_size
        lo, hi, rnd = 0, n, 0
        acc = flat  # acc[lo*B:hi*B] holds this member's partial sums of its current range
        for level in range(self.levels):  # reduce-scatter by recursive halving
            partner, mid = self.rank ^ (1 << level), (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if not self.rank >> level & 1 else ((mid, hi), (lo, mid))
            t0 = time.perf_counter()
            payload, _ = self._encode(f"rs{level}", acc[give[0] * B : give[1] * B])
            stats.encode_seconds += time.perf_counter() - t0
            segs = [(give[0], len(payload))]
            _, got = self._exchange(partner, step, Round(rnd, level, peer_pb2.REDUCE_SCATTER), payload, segs, stats)
            t0 = time.perf_counter()
            acc[keep[0] * B : keep[1] * B] += self._codec.decode(got, ((keep[1] - keep[0]) * B,))
            stats.encode_seconds += time.perf_counter() - t0
            lo, hi, rnd = keep[0], keep[1], rnd + 1
        t0 = time.perf_counter()
        mine, _ = self._encode("ag", acc[lo * B : hi * B] / n)  # owner encodes the mean of its block once
        stats.encode_seconds += time.perf_counter() - t0
        return self._all_gather_blocks({lo: mine}, self._codec, step, rnd, stats)

    def _count_own(self, flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
        """Schedule "count": every member's own 1-bit contribution on scales the group shares, summed
        exactly by the block's owner, which sends each member, per value, how many of the other
        N - 1 members share that member's own sign (2 bits for N = 4, then zstd) instead of their
        N - 1 sign bits. Both phases are pairwise exchanges with partner rank XOR r, r = 1 .. N-1
        (direct sends, nothing forwarded):
          reduce-scatter: to the owner of block p, my sign bits of block p + my scale code per chunk
            of it (my scale there, `sign_scale`, one byte: common/counts.py scale codes);
          all-gather: from the owner of block p, the block's shared scale codes (the mean of the
            members' scales) + my agree counts.
        A sign does not depend on its scale, so every member quantizes with the shared scale of the
        same call; its error feedback (residual = y - shared scale x sign) is committed only when
        the call succeeds. The mean is k x scale / N with k the integer sum of the N signs: the same
        bits on every member."""
        C, B, n = self.chunk, self._layout.block, self.world_size
        t0 = time.perf_counter()
        residual = self._feedback.residual("own", flat)
        y = residual.add_(flat)  # y = x + residual, in the residual's buffer (undone on failure)
        rows = y.view(-1, C)  # (n * chunks, C)
        bits = np.packbits(torch.signbit(y).view(n, B).numpy(), axis=1)  # (n, sign_bytes); 1 = negative
        own_codes = scale_codes(_chunk_scales(rows, self.sign_scale).numpy()).reshape(n, B // C)
        stats.encode_seconds += time.perf_counter() - t0
        try:
            mean = self._count_exchange(y, bits, own_codes, step, stats)
        except BaseException:
            residual.sub_(flat)  # the call failed: the residual as it was (up to rounding)
            raise
        return mean

    def _count_exchange(self, y: torch.Tensor, bits: np.ndarray, own_codes: np.ndarray, step: int,
                        stats: AllReduceStats) -> torch.Tensor:
        """The two phases of "count" (see _count_own); on success y (the residual's buffer) becomes
        the new residual."""
        C, B, n, me = self.chunk, self._layout.block, self.world_size, self.rank
        chunks, sign_bytes = B // C, -(-B // 8)
        rows = y.view(-1, C)
        signs, codes = {me: bits[me]}, {me: own_codes[me]}  # member -> its part of my block
        for r in range(1, n):
            p = me ^ r
            payload = bits[p].tobytes() + own_codes[p].tobytes()
            _, got = self._exchange(p, step, Round(r - 1, r, peer_pb2.REDUCE_SCATTER), payload, [(p, len(payload))], stats)
            if len(got) != sign_bytes + chunks:
                raise PeerFailure(p, f"count reduce-scatter message of {len(got)} bytes, expected {sign_bytes + chunks}")
            signs[p] = np.frombuffer(got, dtype=np.uint8, count=sign_bytes)
            codes[p] = np.frombuffer(got, dtype=np.uint8, offset=sign_bytes)
        t0 = time.perf_counter()
        negs = np.unpackbits(np.stack([signs[m] for m in range(n)]), axis=1, count=B)  # (n, B)
        plus = np.uint8(n) - negs.sum(axis=0, dtype=np.uint8)  # members with a + sign, per value
        block_codes = scale_codes(np.stack([scales_from_codes(codes[m]) for m in range(n)]).mean(axis=0, dtype=np.float64))
        agree_of = _agree_table(n)
        k = self._count_buffer(n * B)  # the sum of the N signs / N, per value of the buffer
        _k_from_plus(plus, n, k[me * B : (me + 1) * B])
        stats.encode_seconds += time.perf_counter() - t0
        block_codes_of = {me: block_codes}
        for r in range(1, n):
            p = me ^ r
            t0 = time.perf_counter()
            agree = np.take(agree_of, negs[p] * np.uint8(n + 1) + plus)  # the others sharing p's sign
            payload = block_codes.tobytes() + encode_counts(agree, n - 1)
            stats.encode_seconds += time.perf_counter() - t0
            _, got = self._exchange(p, step, Round(n - 2 + r, r, peer_pb2.ALL_GATHER), payload, [(p, len(payload))], stats)
            t0 = time.perf_counter()
            try:
                if len(got) < chunks:
                    raise ValueError(f"{len(got)} bytes, fewer than its {chunks} scale codes")
                agree_mine = decode_counts(got[chunks:], B, n - 1)
            except ValueError as exc:
                raise PeerFailure(p, f"count all-gather message unusable: {exc}") from None
            mine_negative = np.unpackbits(bits[p], count=B)
            _k_from_agree(mine_negative, agree_mine, n, k[p * B : (p + 1) * B])
            block_codes_of[p] = np.frombuffer(got, dtype=np.uint8, count=chunks)
            stats.encode_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        scale = torch.from_numpy(scales_from_codes(np.concatenate([block_codes_of[b] for b in range(n)])))[:, None]
        for lo in range(0, rows.shape[0], _COMMIT_ROWS):  # commit the error feedback: y - scale x sign
            part = rows[lo : lo + _COMMIT_ROWS]  # (in slices that stay in cache: 8x faster than one pass)
            part.sub_(torch.copysign(scale[lo : lo + _COMMIT_ROWS], part))
        out = k.view(-1, C).mul(scale).view(-1)  # same inputs and ops everywhere
        stats.encode_seconds += time.perf_counter() - t0
        return out

    def _all_gather_blocks(self, blocks: dict[int, bytes], codec, step: int, rnd: int, stats: AllReduceStats) -> torch.Tensor:
        """All-gather by recursive doubling of the owners' encoded blocks (bytes forwarded
        unchanged, from round index `rnd` on), then decode all N in block order."""
        for level in reversed(range(self.levels)):
            self._forward_held(blocks, self.rank ^ (1 << level), step, Round(rnd, level, peer_pb2.ALL_GATHER), stats)
            rnd += 1
        t0 = time.perf_counter()
        B = self._layout.block
        out = torch.cat([codec.decode(blocks[b], (B,)).reshape(-1) for b in range(self.world_size)])
        stats.encode_seconds += time.perf_counter() - t0
        return out

    def _forward_held(self, held: dict[int, bytes], partner: int, step: int, rnd: Round, stats: AllReduceStats) -> None:
        """One all-gather exchange: send every payload in `held` (block -> bytes, unchanged) to the
        partner and add the ones it sends back."""
        order = sorted(held)
        segs = [(b, len(held[b])) for b in order]
        header, got = self._exchange(partner, step, rnd, b"".join(held[b] for b in order), segs, stats)
        pos = 0
        for seg in header.segments:
            held[seg.block] = got[pos : pos + seg.size_bytes]
            pos += seg.size_bytes

    def _recursive_doubling(self, flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
        acc = flat
        for level in range(self.levels):
            partner = self.rank ^ (1 << level)
            t0 = time.perf_counter()
            payload, mine = self._encode(f"rd{level}", acc)
            stats.encode_seconds += time.perf_counter() - t0
            _, got = self._exchange(partner, step, Round(level, level, peer_pb2.RECURSIVE_DOUBLING), payload, [(0, len(payload))], stats)
            t0 = time.perf_counter()
            theirs = self._codec.decode(got, acc.shape).reshape(-1)  # a new buffer: summed into in place
            # IEEE addition of two values is commutative bit for bit, so both partners get the same sum.
            acc = theirs.add_(mine.reshape(-1).to(torch.float32))
            stats.encode_seconds += time.perf_counter() - t0
        return acc.div_(self.world_size)

    def _encode(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        x = x.contiguous()
        if self._feedback is not None:
            return self._feedback.compress(name, x)
        return self._codec.encode(x)
