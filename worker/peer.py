"""Peer transport of a sync group: the gRPC servicer every member serves, the bounded inbox of
early messages and `PeerGroup`, one member's side of the wire (exchanges, status, checksums,
state and rebase transfers). The all-reduce schedules build on it (worker/allreduce.py).

Authentication: a group's calls carry the secret the coordinator issued to that group
(`token`), as bearer metadata; the servicer refuses any other (UNAUTHENTICATED), the run token
included, so only the members talk to each other. TLS: `tls_ca` dials the peers over TLS (the
worker serves its --port with its --tls-cert).

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
import hmac
import logging
import threading
import time
import weakref
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import grpc

from geotrain.protos import peer_pb2, peer_pb2_grpc, rpc

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- server side


class PeerRouter(peer_pb2_grpc.PeerServicer):
    """The Peer servicer of one gRPC server: routes each call to the group registered under its
    group_id. Registered once per server (`add_to_server`); groups attach and detach as they form."""

    def __init__(self) -> None:
        self._groups: dict[str, "PeerGroup"] = {}
        self._lock = threading.Lock()

    def attach(self, group: "PeerGroup") -> None:
        with self._lock:
            self._groups[group.group_id] = group

    def detach(self, group: "PeerGroup") -> None:
        with self._lock:
            if self._groups.get(group.group_id) is group:
                del self._groups[group.group_id]

    def _group(self, group_id: str, epoch: int | None, context) -> "PeerGroup":
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


@dataclass
class Round:
    """One exchange of a schedule: its index in the call, its level (partner = rank XOR 2^level)
    and its phase (peer_pb2.Phase)."""

    index: int
    level: int
    phase: int  # peer_pb2.Phase


class PeerGroup:
    """One member's side of a sync group's wire: exchanges with deadlines, the inbox, status and
    survivors, checksums, state and rebase transfers. See the module docstring.

    rank: this member, 0 .. world_size-1. peers: "host:port" of every member in rank order (this
    member's own entry is not dialled). group_id / epoch: identify this incarnation of the group on
    the wire. compression: the codec name every message of this group carries (a message with
    another is refused). token: the group's secret (issued by the coordinator at formation, never
    the run token): sent as bearer metadata with every call, and required of every Peer call this
    member serves for the group; None: no authentication. tls_ca: PEM of the CA that signed the
    members' certificates: dial the peers over TLS.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        peers: Sequence[str],
        group_id: str,
        *,
        epoch: int,
        compression: str,
        deadline_s: float | None,
        min_deadline_s: float,
        token: str | None,
        tls_ca: bytes | None,
        max_buffered_bytes: int,
    ):
        if not isinstance(world_size, int) or world_size < 1 or world_size & (world_size - 1):
            raise ValueError(f"world_size must be a power of two >= 1, got {world_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if len(peers) != world_size:
            raise ValueError(f"peers must list all {world_size} members in rank order, got {len(peers)}")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.rank, self.world_size, self.peers = rank, world_size, list(peers)
        self.group_id, self.epoch, self.compression = group_id, epoch, compression
        self.levels = world_size.bit_length() - 1
        self._fixed_deadline, self.min_deadline_s = deadline_s, min_deadline_s
        self._token = token
        self._metadata = rpc.auth_metadata(token)
        self._expected_auth = f"Bearer {token}".encode() if token else None
        self._tls_ca = tls_ca
        self._inbox = _Inbox(max_messages=8 * (2 * self.levels + 2), max_bytes=max_buffered_bytes)
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[int, peer_pb2_grpc.PeerStub] = {}
        self._sender = futures.ThreadPoolExecutor(max_workers=max(1, world_size - 1), thread_name_prefix=f"peer{rank}-send")
        self._durations: collections.deque[float] = collections.deque(maxlen=64)
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

    # ------------------------------------------------------------------ transport

    def _stub(self, rank: int) -> peer_pb2_grpc.PeerStub:
        stub = self._stubs.get(rank)
        if stub is None:
            channel = self._channels[rank] = rpc.make_channel(self.peers[rank], self._tls_ca)
            stub = self._stubs[rank] = peer_pb2_grpc.PeerStub(channel)
        return stub

    def _exchange(self, partner, step, rnd: Round, payload, segments, stats):
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

    # ------------------------------------------------------------------ checksums, state and rebases

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
