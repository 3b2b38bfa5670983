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

Failure policy: every exchange has a deadline (fixed `deadline_s`, or derived: max(`min_deadline_s`,
5 x p99 of the last 64 exchange durations)). A send that fails or a message that does not arrive in
time raises `PeerFailure(rank, reason, survivors)`, never hangs. Before raising, the member probes
the others' Status (2 s each, in parallel): survivors answer and are either FAILED themselves or
have been in their current state for less than one deadline. What happens next (re-form the group
with the largest power of two, or fall back to async) is the caller's decision (worker/sync.py).

Messages that arrive before this member reaches their (step, round) wait in a bounded inbox
(count and bytes); a full inbox answers RESOURCE_EXHAUSTED and the sender retries until its deadline.
"""

from __future__ import annotations

import collections
import functools
import hmac
import logging
import threading
import time
import weakref
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import grpc
import numpy as np
import torch

from geotrain.protos import rpc
from geotrain.common.compression import SIGN_SCALES
from geotrain.common.counts import decode_counts, encode_counts, scale_codes, scales_from_codes
from geotrain.protos import peer_pb2, peer_pb2_grpc

log = logging.getLogger(__name__)

SCHEMES = ("sign", "int8", "none")
ALGORITHMS = ("auto", "halving", "doubling", "allgather", "scatter", "count")
DEADLINE_P99_FACTOR = 5.0
PROBE_TIMEOUT_S = 2.0
_Key = tuple  # (step, round, sender)


class PeerFailure(RuntimeError):
    """A group member failed or stalled during a collective.

    rank: the member this one was waiting on or sending to; reason: what happened;
    survivors: ranks that answered a Status probe afterwards and look healthy (self included).
    """

    def __init__(self, rank: int, reason: str, survivors: Sequence[int] | None = None):
        self.rank = rank
        self.reason = reason
        self.survivors = sorted(survivors) if survivors is not None else None
        super().__init__(f"peer rank {rank}: {reason}" + (f" (survivors {self.survivors})" if survivors is not None else ""))


@dataclass
class AllReduceStats:
    """Counters for one all-reduce call (and, summed, for the life of the object)."""

    seconds: float = 0.0
    bytes_sent: int = 0      # payload + headers this member sent
    bytes_received: int = 0  # payload + headers this member received
    calls: int = 0
    encode_seconds: float = 0.0  # encoding + decoding + summing (CPU work)

    def add(self, other: "AllReduceStats") -> None:
        self.seconds += other.seconds
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.calls += other.calls
        self.encode_seconds += other.encode_seconds


# --------------------------------------------------------------------------- layout


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


# --------------------------------------------------------------------------- server side


class PeerRouter(peer_pb2_grpc.PeerServicer):
    """The Peer servicer of one gRPC server: routes each call to the group registered under its
    group_id. Registered once per server (`add_to_server`); groups attach and detach as they form."""

    def __init__(self) -> None:
        self._groups: dict[str, "CompressedAllReduce"] = {}
        self._lock = threading.Lock()

    def attach(self, group: "CompressedAllReduce") -> None:
        with self._lock:
            self._groups[group.group_id] = group

    def detach(self, group: "CompressedAllReduce") -> None:
        with self._lock:
            if self._groups.get(group.group_id) is group:
                del self._groups[group.group_id]

    def _group(self, group_id: str, epoch: int | None, context) -> "CompressedAllReduce":
        """The group a call names, once the caller proved it holds the group's secret (bearer
        metadata; the run token is not accepted here)."""
        with self._lock:
            group = self._groups.get(group_id)
        if group is None or (epoch is not None and epoch != group.epoch):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no group {group_id!r} epoch {epoch} here")
        if group._expected_auth is not None:
            given = str(dict(context.invocation_metadata() or ()).get("authorization", "")).encode()
            if not hmac.compare_digest(given, group._expected_auth):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong secret of group {group_id!r}")
        return group

    def Exchange(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stream must start with a header")
        header = first.header
        group = self._group(header.group_id, header.epoch, context)
        chunks = (part.chunk for part in request_iterator)
        try:
            buffered = group._receive(header, chunks)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except _InboxFull as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return peer_pb2.ExchangeReply(buffered_bytes=buffered)

    def Checksum(self, request, context):
        group = self._group(request.group_id, request.epoch, context)
        sha = group._wait_checksum(request.step, max(0.0, (context.time_remaining() or 60.0) - 0.05))
        if sha is None:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no checksum recorded for step {request.step}")
        return peer_pb2.ChecksumReply(step=request.step, params_sha256=sha, rank=group.rank)

    def FetchState(self, request, context):
        group = self._group(request.group_id, request.epoch, context)
        if group._state_provider is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this member serves no state")
        step, blob, params_sha = group._state_provider()
        if step != request.step:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"state is at step {step}, asked for {request.step}")
        group._count_sent(len(blob))
        yield peer_pb2.StatePart(
            header=peer_pb2.StateHeader(step=step, total_bytes=len(blob), sha256=rpc.sha256_hex(blob), params_sha256=params_sha)
        )
        for chunk in rpc.iter_chunks(blob):
            yield peer_pb2.StatePart(chunk=chunk)

    def FetchRebase(self, request, context):
        group = self._group(request.group_id, request.epoch, context)
        with group._lock:
            served = group._rebase_served
        if served is None or served[0] != request.step:
            have = served[0] if served is not None else None
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no rebase for step {request.step} here (serving {have})")
        step, blob, sha = served
        group._count_sent(len(blob))
        yield peer_pb2.StatePart(header=peer_pb2.StateHeader(step=step, total_bytes=len(blob), sha256=sha))
        for chunk in rpc.iter_chunks(blob):
            yield peer_pb2.StatePart(chunk=chunk)

    def Status(self, request, context):
        return self._group(request.group_id, None, context)._status_reply()


_ROUTERS: "weakref.WeakKeyDictionary[grpc.Server, PeerRouter]" = weakref.WeakKeyDictionary()
_ROUTERS_LOCK = threading.Lock()


def router_for(server: grpc.Server) -> PeerRouter:
    """The server's PeerRouter, registering one on first use (do it before `server.start()`)."""
    with _ROUTERS_LOCK:
        router = _ROUTERS.get(server)
        if router is None:
            router = _ROUTERS[server] = PeerRouter()
            peer_pb2_grpc.add_PeerServicer_to_server(router, server)
        return router


class _InboxFull(Exception):
    pass


class _Inbox:
    """Messages by (step, round, sender), bounded in count and bytes. Messages older than the
    receiver's current step are dropped on arrival (a failed step's leftovers)."""

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._items: dict[_Key, tuple[peer_pb2.ExchangeHeader, bytes]] = {}
        self._bytes = 0
        self._floor_step = 0
        self._cond = threading.Condition()

    def put(self, key: _Key, header, payload: bytes) -> int:
        with self._cond:
            if key[0] < self._floor_step:
                log.info("dropping stale message %s (current step %d)", key, self._floor_step)
                return self._bytes
            if len(self._items) >= self.max_messages or self._bytes + len(payload) > self.max_bytes:
                raise _InboxFull(f"inbox full ({len(self._items)} messages, {self._bytes} bytes)")
            self._items[key] = (header, payload)
            self._bytes += len(payload)
            self._cond.notify_all()
            return self._bytes

    def get(self, key: _Key, timeout: float):
        deadline = time.monotonic() + timeout
        with self._cond:
            while key not in self._items:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            header, payload = self._items.pop(key)
            self._bytes -= len(payload)
            return header, payload

    def advance(self, step: int) -> None:
        """Drop everything older than `step`; later puts of older steps are ignored."""
        with self._cond:
            self._floor_step = step
            for key in [k for k in self._items if k[0] < step]:
                self._bytes -= len(self._items.pop(key)[1])


# --------------------------------------------------------------------------- the collective


@dataclass
class _Round:
    index: int
    level: int
    phase: int  # peer_pb2.Phase


class CompressedAllReduce:
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
        if not isinstance(world_size, int) or world_size < 1 or world_size & (world_size - 1):
            raise ValueError(f"world_size must be a power of two >= 1, got {world_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if len(peers) != world_size:
            raise ValueError(f"peers must list all {world_size} members in rank order, got {len(peers)}")
        if compression not in SCHEMES:
            raise ValueError(f"compression must be one of {SCHEMES}, got {compression!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        if sign_scale not in SIGN_SCALES:
            raise ValueError(f"sign_scale must be one of {SIGN_SCALES}, got {sign_scale!r}")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.rank, self.world_size, self.peers = rank, world_size, list(peers)
        self.group_id, self.epoch = group_id, epoch
        self.compression, self.chunk, self.sign_scale = compression, chunk, sign_scale
        if algorithm == "auto":  # see the module docstring
            if world_size <= 2:
                algorithm = "doubling"
            else:
                algorithm = "count" if compression == "sign" else "halving"
        if algorithm == "count" and compression != "sign":
            raise ValueError(f"algorithm 'count' needs compression 'sign', got {compression!r}")
        self.algorithm = algorithm
        self.levels = world_size.bit_length() - 1
        self._fixed_deadline, self.min_deadline_s = deadline_s, min_deadline_s
        self._token = token
        self._metadata = rpc.auth_metadata(token)
        self._expected_auth = f"Bearer {token}".encode() if token else None
        self._tls_ca = tls_ca
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
        self._inbox = _Inbox(max_messages=8 * (2 * self.levels + 2), max_bytes=max_buffered_bytes)
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[int, peer_pb2_grpc.PeerStub] = {}
        self._sender = futures.ThreadPoolExecutor(max_workers=max(1, world_size - 1), thread_name_prefix=f"peer{rank}-send")
        self._durations: collections.deque[float] = collections.deque(maxlen=64)
        self._last_step = -1
        self._lock = threading.Lock()  # guards counters and status below
        self._state = peer_pb2.PeerStatusReply.IDLE
        self._state_since = time.monotonic()
        self._status_step = 0
        self._reason = ""
        self._server_sent = 0  # bytes the server side sent (state blobs)
        self._checksums: dict[int, str] = {}
        self._checksum_cond = threading.Condition()
        self._state_provider: Callable[[], tuple[int, bytes, str]] | None = None
        self._router: PeerRouter | None = None
        self.last = AllReduceStats()
        self.total = AllReduceStats()
        self._plan = None      # rank 0's BatchPlan of the running call, once this member knows it
        self.last_plan = None  # ... of the last completed call (None: rank 0 sent none)
        self._rebase = ""      # sha256 of rank 0's rebase announced in the running call ("" none)
        self.last_rebase = ""  # ... of the last completed call
        self._rebase_served: tuple[int, bytes, str] | None = None  # rank 0: (step, blob, sha256)

    # ------------------------------------------------------------------ wiring

    def add_to_server(self, server: grpc.Server) -> None:
        """Serve this group's Peer traffic on `server` (the worker's --port server)."""
        self._router = router_for(server)
        self._router.attach(self)

    def serve_state(self, provider: Callable[[], tuple[int, bytes, str]]) -> None:
        """provider() -> (step, blob, params_sha256) of this member's full state, for FetchState."""
        self._state_provider = provider

    def close(self) -> None:
        """Leave: detach from the server, close channels. Idempotent."""
        self._set_state(peer_pb2.PeerStatusReply.CLOSED, self._status_step)
        if self._router is not None:
            self._router.detach(self)
            self._router = None
        self._sender.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._stubs.clear()

    def __enter__(self) -> "CompressedAllReduce":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def deadline_s(self) -> float:
        """Seconds one exchange may take before its partner is declared failed."""
        if self._fixed_deadline is not None:
            return self._fixed_deadline
        if not self._durations:
            return self.min_deadline_s
        ordered = sorted(self._durations)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return max(self.min_deadline_s, DEADLINE_P99_FACTOR * p99)

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
            elif self.algorithm == "allgather":
                result = self._gather_own(flat, step, stats)
            elif self.algorithm == "scatter":
                result = self._scatter_own(flat, step, stats)
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
            _, got = self._exchange(partner, step, _Round(rnd, level, peer_pb2.REDUCE_SCATTER), payload, segs, stats)
            t0 = time.perf_counter()
            acc[keep[0] * B : keep[1] * B] += self._codec.decode(got, ((keep[1] - keep[0]) * B,))
            stats.encode_seconds += time.perf_counter() - t0
            lo, hi, rnd = keep[0], keep[1], rnd + 1
        t0 = time.perf_counter()
        mine, _ = self._encode("ag", acc[lo * B : hi * B] / n)  # owner encodes the mean of its block once
        stats.encode_seconds += time.perf_counter() - t0
        return self._all_gather_blocks({lo: mine}, self._codec, step, rnd, stats)

    def _gather_own(self, flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
        t0 = time.perf_counter()
        mine, _ = self._encode("own", flat)  # this member's contribution, quantized once
        stats.encode_seconds += time.perf_counter() - t0
        payloads = {self.rank: mine}
        for level in range(self.levels):  # recursive doubling: forward every payload held so far
            self._forward_held(payloads, self.rank ^ (1 << level), step, _Round(level, level, peer_pb2.ALL_GATHER), stats)
        missing = sorted(set(range(self.world_size)) - set(payloads))
        if missing:
            raise PeerFailure(self.rank ^ (1 << (self.levels - 1)), f"all-gather ended without the payloads of ranks {missing}")
        t0 = time.perf_counter()
        acc = self._codec.decode(payloads[0], flat.shape).reshape(-1).to(torch.float32)
        for r in range(1, self.world_size):  # rank order on every member: bit-identical sums
            acc.add_(self._codec.decode(payloads[r], flat.shape).reshape(-1).to(torch.float32))
        stats.encode_seconds += time.perf_counter() - t0
        return acc.div_(self.world_size)

    def _scatter_own(self, flat: torch.Tensor, step: int, stats: AllReduceStats) -> torch.Tensor:
        """Schedule "scatter": reduce-scatter by recursive halving that forwards every member's own
        encoded blocks unchanged (no partial sum is quantized), so the owner of block b decodes all N
        members' contributions to it and sums them exactly in rank order; the owner then encodes the
        block's mean once (its own error feedback) and the all-gather forwards those bytes."""
        B, n = self._layout.block, self.world_size
        t0 = time.perf_counter()
        held = {}  # member * n + block -> that member's own encoded block
        for b in range(n):
            held[self.rank * n + b], _ = self._encode(f"own{b}", flat[b * B : (b + 1) * B])
        stats.encode_seconds += time.perf_counter() - t0
        lo, hi, rnd = 0, n, 0
        for level in range(self.levels):
            partner, mid = self.rank ^ (1 << level), (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if not self.rank >> level & 1 else ((mid, hi), (lo, mid))
            order = sorted(k for k in held if give[0] <= k % n < give[1])
            segs = [(k, len(held[k])) for k in order]
            header, got = self._exchange(partner, step, _Round(rnd, level, peer_pb2.REDUCE_SCATTER),
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
            raise PeerFailure(self.rank ^ (1 << (self.levels - 1)), f"reduce-scatter ended without block {lo} of ranks {missing}")
        t0 = time.perf_counter()
        acc = self._codec.decode(held[lo], (B,)).reshape(-1).to(torch.float32)
        for m in range(1, n):  # rank order: the owner's exact sum of the N quantized contributions
            acc.add_(self._codec.decode(held[m * n + lo], (B,)).reshape(-1).to(torch.float32))
        mean = acc.div_(n)
        if self._mean_feedback is not None:  # owner encodes the mean of its block once
            mine, _ = self._mean_feedback.compress("mean", mean)
        else:
            mine, _ = self._mean_codec.encode(mean)
        stats.encode_seconds += time.perf_counter() - t0
        return self._all_gather_blocks({lo: mine}, self._mean_codec, step, rnd, stats)

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
            _, got = self._exchange(p, step, _Round(r - 1, r, peer_pb2.REDUCE_SCATTER), payload, [(p, len(payload))], stats)
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
            _, got = self._exchange(p, step, _Round(n - 2 + r, r, peer_pb2.ALL_GATHER), payload, [(p, len(payload))], stats)
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
            self._forward_held(blocks, self.rank ^ (1 << level), step, _Round(rnd, level, peer_pb2.ALL_GATHER), stats)
            rnd += 1
        t0 = time.perf_counter()
        B = self._layout.block
        out = torch.cat([codec.decode(blocks[b], (B,)).reshape(-1) for b in range(self.world_size)])
        stats.encode_seconds += time.perf_counter() - t0
        return out

    def _forward_held(self, held: dict[int, bytes], partner: int, step: int, rnd: _Round, stats: AllReduceStats) -> None:
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
            _, got = self._exchange(partner, step, _Round(level, level, peer_pb2.RECURSIVE_DOUBLING), payload, [(0, len(payload))], stats)
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

    # ------------------------------------------------------------------ transport

    def _stub(self, rank: int) -> peer_pb2_grpc.PeerStub:
        stub = self._stubs.get(rank)
        if stub is None:
            channel = self._channels[rank] = rpc.make_channel(self.peers[rank], self._tls_ca)
            stub = self._stubs[rank] = peer_pb2_grpc.PeerStub(channel)
        return stub

    def _exchange(self, partner, step, rnd: _Round, payload, segments, stats):
        """Send `payload` to the partner and receive its message for the same (step, round)."""
        deadline = self.deadline_s
        t0 = time.monotonic()
        header = peer_pb2.ExchangeHeader(
            group_id=self.group_id, epoch=self.epoch, step=step, round=rnd.index, level=rnd.level,
            phase=rnd.phase, sender=self.rank, scheme=self.compression, total_bytes=len(payload),
            sha256=rpc.sha256_hex(payload), segments=[peer_pb2.Segment(block=b, size_bytes=s) for b, s in segments],
        )
        if self._plan is not None:
            header.next_batch.CopyFrom(self._plan)
        header.rebase_sha256 = self._rebase
        sending = self._sender.submit(self._send, partner, header, payload, t0 + deadline)
        got = None
        while got is None:  # wait for the partner's message; a failed send ends the wait early
            left = t0 + deadline - time.monotonic()
            if left <= 0:
                sending.cancel()
                raise PeerFailure(partner, f"no message for step {step} round {rnd.index} within {deadline:.1f} s")
            got = self._inbox.get((step, rnd.index, partner), timeout=min(left, 0.25))
            if got is None and sending.done() and sending.exception() is not None:
                raise sending.exception()
        try:
            sending.result(timeout=max(0.0, t0 + deadline - time.monotonic()))
        except futures.TimeoutError:
            raise PeerFailure(partner, f"send of step {step} round {rnd.index} not acknowledged within {deadline:.1f} s") from None
        self._durations.append(time.monotonic() - t0)
        if self._plan is None and got[0].HasField("next_batch"):
            self._plan = got[0].next_batch  # rank 0's, forwarded
        if not self._rebase and got[0].rebase_sha256:
            self._rebase = got[0].rebase_sha256  # rank 0's, forwarded
        stats.bytes_sent += len(payload) + header.ByteSize()
        stats.bytes_received += len(got[1]) + got[0].ByteSize()
        return got

    def _send(self, partner: int, header, payload: bytes, deadline_at: float) -> None:
        """Stream header + chunks; retry until the deadline on RESOURCE_EXHAUSTED (the partner's inbox
        is full) and NOT_FOUND (the partner has not attached this group yet: members enter a group,
        and create its fp32 sibling, at slightly different moments; a group the partner has left
        stays NOT_FOUND and fails at the deadline)."""

        def parts() -> Iterator[peer_pb2.PeerPart]:
            yield peer_pb2.PeerPart(header=header)
            for chunk in rpc.iter_chunks(payload):
                yield peer_pb2.PeerPart(chunk=chunk)

        while True:
            left = deadline_at - time.monotonic()
            if left <= 0:
                raise PeerFailure(partner, f"send of step {header.step} round {header.round} timed out")
            try:
                self._stub(partner).Exchange(parts(), timeout=left, metadata=self._metadata, wait_for_ready=True)
                return
            except grpc.RpcError as exc:
                retry = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND)
                if exc.code() in retry and deadline_at - time.monotonic() > 0.1:
                    time.sleep(0.05)
                    continue
                raise PeerFailure(partner, f"send of step {header.step} round {header.round}: {exc.code().name} {exc.details()}") from None

    def _receive(self, header, chunks: Iterator[bytes]) -> int:
        """Server side of Exchange: check and buffer one message. ValueError if malformed."""
        if not 0 <= header.sender < self.world_size or header.sender == self.rank:
            raise ValueError(f"bad sender rank {header.sender}")
        if header.scheme != self.compression:
            raise ValueError(f"scheme {header.scheme!r} differs from this group's {self.compression!r}")
        if sum(s.size_bytes for s in header.segments) != header.total_bytes:
            raise ValueError("segment sizes do not add up to total_bytes")
        payload = rpc.collect_blob(chunks, header.total_bytes, header.sha256, self._inbox.max_bytes)
        return self._inbox.put((header.step, header.round, header.sender), header, payload)

    # ------------------------------------------------------------------ status and survivors

    def _set_state(self, state: int, step: int, reason: str = "") -> None:
        with self._lock:
            self._state, self._status_step, self._reason = state, step, reason
            self._state_since = time.monotonic()

    def _status_reply(self) -> peer_pb2.PeerStatusReply:
        with self._lock:
            return peer_pb2.PeerStatusReply(
                rank=self.rank, epoch=self.epoch, state=self._state, step=self._status_step,
                seconds_in_state=time.monotonic() - self._state_since, reason=self._reason,
            )

    def _count_sent(self, n: int) -> None:
        with self._lock:
            self._server_sent += n

    def survivors(self, timeout: float = PROBE_TIMEOUT_S) -> list[int]:
        """Ranks that answer Status within `timeout` and look healthy: FAILED themselves (they are
        waiting to re-form) or in their current state for less than one deadline. Self included."""
        others = [r for r in range(self.world_size) if r != self.rank]
        if not others:
            return [self.rank]
        limit = self.deadline_s
        request = peer_pb2.PeerStatusRequest(group_id=self.group_id, sender=self.rank)

        def probe(r: int) -> bool:
            try:
                reply = self._stub(r).Status(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError:
                return False
            if reply.epoch != self.epoch or reply.state == peer_pb2.PeerStatusReply.CLOSED:
                return False
            return reply.state == peer_pb2.PeerStatusReply.FAILED or reply.seconds_in_state < limit

        with futures.ThreadPoolExecutor(max_workers=len(others)) as pool:
            alive = dict(zip(others, pool.map(probe, others)))
        return sorted([self.rank] + [r for r, ok in alive.items() if ok])

    # ------------------------------------------------------------------ checksums and state

    def exchange_checksum(self, step: int, params_sha256: str) -> str:
        """Record this member's checksum at `step` and return rank 0's (rank 0 returns its own).
        Raises PeerFailure if rank 0 does not answer within the deadline."""
        with self._checksum_cond:
            self._checksums[step] = params_sha256
            for old in [s for s in self._checksums if s < step - 8]:
                del self._checksums[old]
            self._checksum_cond.notify_all()
        if self.rank == 0:
            return params_sha256
        request = peer_pb2.ChecksumRequest(group_id=self.group_id, epoch=self.epoch, step=step, sender=self.rank, params_sha256=params_sha256)
        try:
            reply = self._stub(0).Checksum(request, timeout=self.deadline_s, metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise self._failure(0, f"checksum at step {step}: {exc.code().name} {exc.details()}") from None
        return reply.params_sha256

    def _wait_checksum(self, step: int, timeout: float) -> str | None:
        with self._checksum_cond:
            self._checksum_cond.wait_for(lambda: step in self._checksums, timeout=timeout)
            return self._checksums.get(step)

    def fetch_state(self, step: int, max_bytes: int = 64 << 30) -> tuple[bytes, str]:
        """rank 0's state blob at `step` and the params checksum it announces (verified size and
        sha256 of the blob). Raises PeerFailure when rank 0 cannot provide it in time."""
        request = peer_pb2.StateRequest(group_id=self.group_id, epoch=self.epoch, step=step, sender=self.rank)
        timeout = max(60.0, self.deadline_s)
        try:
            parts = self._stub(0).FetchState(request, timeout=timeout, metadata=self._metadata, wait_for_ready=True)
            first = next(parts)
            if first.WhichOneof("part") != "header":
                raise ValueError("state stream must start with a header")
            h = first.header
            blob = rpc.collect_blob((p.chunk for p in parts), h.total_bytes, h.sha256, max_bytes)
        except grpc.RpcError as exc:
            raise self._failure(0, f"state fetch at step {step}: {exc.code().name} {exc.details()}") from None
        except (ValueError, StopIteration) as exc:
            raise self._failure(0, f"state fetch at step {step}: {exc!r}") from None
        self.total.bytes_received += len(blob)
        return blob, h.params_sha256

    def serve_rebase(self, step: int, blob: bytes) -> str:
        """Rank 0: serve `blob` (the rebase applied before group step `step`) to FetchRebase until
        the next one replaces it; returns its sha256, to announce with `allreduce(..., rebase=)`."""
        sha = rpc.sha256_hex(blob)
        with self._lock:
            self._rebase_served = (step, blob, sha)
        return sha

    def fetch_rebase(self, step: int, sha256: str, max_bytes: int = 64 << 30) -> bytes:
        """Rank 0's rebase blob for `step`, checked against the announced sha256. Raises PeerFailure
        when rank 0 cannot provide it in time."""
        request = peer_pb2.StateRequest(group_id=self.group_id, epoch=self.epoch, step=step, sender=self.rank)
        try:
            parts = self._stub(0).FetchRebase(request, timeout=max(60.0, self.deadline_s), metadata=self._metadata,
                                              wait_for_ready=True)
            first = next(parts)
            if first.WhichOneof("part") != "header" or first.header.sha256 != sha256:
                raise ValueError(f"rebase stream must start with the header of blob {sha256[:12]}")
            blob = rpc.collect_blob((p.chunk for p in parts), first.header.total_bytes, sha256, max_bytes)
        except grpc.RpcError as exc:
            raise self._failure(0, f"rebase fetch at step {step}: {exc.code().name} {exc.details()}") from None
        except (ValueError, StopIteration) as exc:
            raise self._failure(0, f"rebase fetch at step {step}: {exc!r}") from None
        self.total.bytes_received += len(blob)
        return blob

    def _failure(self, rank: int, reason: str) -> PeerFailure:
        self._set_state(peer_pb2.PeerStatusReply.FAILED, self._status_step, reason=reason)
        return PeerFailure(rank, reason, self.survivors())
