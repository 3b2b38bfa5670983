"""The worker's side of the coordinator protocol (protos/geotrain.proto): one method per RPC.

Deadlines (seconds, per attempt; a retried call gets a fresh deadline each time):

- Join ``JOIN_DEADLINE_S`` (30): the coordinator may be loading a checkpoint.
- Heartbeat ``HEARTBEAT_DEADLINE_S`` (10), LeaseWork ``LEASE_DEADLINE_S`` (10), Leave
  ``LEAVE_DEADLINE_S`` (5: only ever called on the way out).
- GetModel, GetShard, PushDelta: ``BLOB_BASE_DEADLINE_S`` (30) + bytes / ``MIN_BANDWIDTH_BPS``
  (we assume at least 1 MB/s between a worker and the coordinator) + the long-poll wait for
  GetModel. Before the size is known (GetModel) the caller passes the expected size: the fp32
  model for a full model.

Retries: UNAVAILABLE and DEADLINE_EXCEEDED mean the coordinator is down, restarting or slow;
every call retries them with exponential backoff and full jitter (``geotrain.protos.rpc.Backoff``, cap 10 s)
for as long as the client is not stopped (``stop_event``), or for ``patience`` seconds when a
caller gives one (the way out: final push and Leave). So workers survive a coordinator restart
with no manual step.

Other codes:
- NOT_FOUND: the coordinator forgot our session (restart) or dropped us (lease expired). The
  client joins again with ``previous_worker_id`` and repeats the call with the new session, then
  calls ``on_rejoin(reply)`` so the runner can drop its lease and resync.
- UNAUTHENTICATED anywhere, FAILED_PRECONDITION at Join (protocol mismatch): ``FatalError``, the
  worker exits non-zero with the server's message.
- Everything else raises ``grpc.RpcError`` to the caller.

Payload bytes (serialized request and reply messages, chunks included) are counted in
``sent_bytes`` / ``received_bytes``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import grpc

from geotrain.common import __version__
from geotrain.protos.rpc import (
    CHUNK_BYTES,
    PROTOCOL_VERSION,
    Backoff,
    auth_metadata,
    collect_blob,
    iter_chunks,
    make_channel,
    retry_call,
    sha256_hex,
)
from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

JOIN_DEADLINE_S = 30.0
HEARTBEAT_DEADLINE_S = 10.0
LEASE_DEADLINE_S = 10.0
LEAVE_DEADLINE_S = 5.0
BLOB_BASE_DEADLINE_S = 30.0
MIN_BANDWIDTH_BPS = 1_000_000  # bytes per second we assume at worst
MAX_REJOINS_PER_CALL = 3

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def blob_deadline(num_bytes: int, wait_seconds: float = 0.0) -> float:
    """Deadline of a blob transfer of `num_bytes`: base + size at MIN_BANDWIDTH_BPS + long-poll wait."""
    return BLOB_BASE_DEADLINE_S + max(0, num_bytes) / MIN_BANDWIDTH_BPS + max(0.0, wait_seconds)


class FatalError(RuntimeError):
    """The coordinator refused us for good (bad token, protocol mismatch): exit non-zero."""


class SessionRenewed(RuntimeError):
    """A call made for one session would go out under a later one (the client joined again
    meanwhile); not sent: what it carried belongs to the old session."""


class StoppedError(RuntimeError):
    """The client was stopped while a call was being retried."""


def parse_target(value: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); ValueError with a clear message otherwise."""
    value = (value or "").strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT (e.g. 10.0.0.5:7000), got {value!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [ADDR]:PORT, got {value!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be a number in 1..65535, got {port_text!r} in {value!r}")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    return host, int(port_text)


@dataclass
class ModelReply:
    header: pb.ModelHeader
    blob: bytes  # empty for UNCHANGED


class CoordinatorClient:
    """A channel to the coordinator plus the session (worker_id, session_id) after join()."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: bytes | None = None,
        stop_event: threading.Event | None = None,
        on_rejoin: Callable[[pb.JoinReply], None] | None = None,
        backoff: Backoff | None = None,
    ):
        self.target = target
        self.stop_event = stop_event or threading.Event()
        self.on_rejoin = on_rejoin
        self.backoff = backoff or Backoff(base=0.5, cap=10.0, attempts=0)
        self._metadata = auth_metadata(token)
        self._channel = make_channel(target, tls_ca)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._lock = threading.Lock()  # bytes counters
        self._join_lock = threading.Lock()
        self._rejoin_lock = threading.Lock()
        self.sent_bytes = 0  # model traffic and control messages (bytes on the wire, both directions)
        self.received_bytes = 0
        self.data_bytes = 0  # shard downloads, counted apart: a worker with local data has none
        self.join_request: pb.JoinRequest | None = None
        self.join_reply: pb.JoinReply | None = None
        self.worker_id = ""
        self.session_id = ""
        self.session_epoch = 0  # +1 on every (re)join

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._channel.close()

    def _count(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.sent_bytes += sent
            self.received_bytes += received

    def _retry(self, fn: Callable[[], T], what: str, patience: float | None) -> T:
        give_up = None if patience is None else time.monotonic() + patience

        def should_stop() -> bool:
            if give_up is not None:
                return time.monotonic() > give_up
            return self.stop_event.is_set()

        return retry_call(fn, what, self.backoff, should_stop=should_stop, retryable=RETRY_CODES)

    def _session_call(self, what: str, fn: Callable[[], T], patience: float | None = None) -> T:
        """Run fn (which reads self.worker_id/session_id when it builds its request) with retries;
        NOT_FOUND -> join again and repeat; UNAUTHENTICATED -> FatalError."""
        rejoins = 0
        while True:
            epoch = self.session_epoch
            try:
                return self._retry(fn, what, patience)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise FatalError(f"coordinator refused {what}: {exc.details()}") from None
                if code != grpc.StatusCode.NOT_FOUND or rejoins >= MAX_REJOINS_PER_CALL:
                    raise
                rejoins += 1
                log.warning("%s: coordinator does not know this session (%s); joining again", what, exc.details())
                self.rejoin(epoch)

    # ------------------------------------------------------------------ RPCs

    def join(self, request: pb.JoinRequest, patience: float | None = None) -> pb.JoinReply:
        """Join (protocol_version is filled in). FatalError on UNAUTHENTICATED/FAILED_PRECONDITION."""
        req = pb.JoinRequest()
        req.CopyFrom(request)
        request = req
        request.protocol_version = PROTOCOL_VERSION
        if not request.software_version:
            request.software_version = __version__

        def call() -> pb.JoinReply:
            self._count(sent=request.ByteSize())
            reply = self._stub.Join(request, timeout=JOIN_DEADLINE_S, metadata=self._metadata)
            self._count(received=reply.ByteSize())
            return reply

        try:
            reply = self._retry(call, "Join", patience)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
                raise FatalError(f"coordinator refused to join ({exc.code().name}): {exc.details()}") from None
            raise
        if reply.protocol_version and reply.protocol_version != PROTOCOL_VERSION:
            raise FatalError(
                f"coordinator speaks protocol {reply.protocol_version}, this worker {PROTOCOL_VERSION}: upgrade"
            )
        with self._join_lock:
            self.join_request = request
            self.join_reply = reply
            self.worker_id = reply.worker_id
            self.session_id = reply.session_id
            self.session_epoch += 1
        return reply

    def rejoin(self, seen_epoch: int | None = None) -> pb.JoinReply:
        """Join again as the same worker (previous_worker_id), then tell on_rejoin. `seen_epoch`:
        the session the failed call used; when another thread already rejoined since, reuse that."""
        if self.join_request is None:
            raise RuntimeError("rejoin() before join()")
        with self._rejoin_lock:
            if seen_epoch is not None and self.session_epoch != seen_epoch:
                return self.join_reply  # type: ignore[return-value]
            request = pb.JoinRequest()
            request.CopyFrom(self.join_request)
            request.previous_worker_id = self.worker_id or request.previous_worker_id
            reply = self.join(request)
        log.warning("rejoined as %s (run %s, model version %d)", reply.worker_id, reply.run_id, reply.model_version)
        if self.on_rejoin is not None:
            self.on_rejoin(reply)
        return reply

    def heartbeat(self, stats: pb.WorkerStats, patience: float | None = None, active_group_id: str = "",
                  group_failure: pb.GroupFailure | None = None) -> pb.HeartbeatReply:
        """One Heartbeat. active_group_id: the sync group this worker trains in ("" = async);
        group_failure: a sync group's failure to report (worker/group_runner.py)."""

        def call() -> pb.HeartbeatReply:
            req = pb.HeartbeatRequest(worker_id=self.worker_id, session_id=self.session_id, stats=stats,
                                      active_group_id=active_group_id)
            if group_failure is not None:
                req.group_failure.CopyFrom(group_failure)
            self._count(sent=req.ByteSize())
            reply = self._stub.Heartbeat(req, timeout=HEARTBEAT_DEADLINE_S, metadata=self._metadata)
            self._count(received=reply.ByteSize())
            return reply

        return self._session_call("Heartbeat", call, patience)

    def lease_work(self, patience: float | None = None) -> pb.LeaseReply:
        """LeaseWork; every retry carries the same request id (see LeaseRequest.request_id)."""
        request_id = uuid.uuid4().hex

        def call() -> pb.LeaseReply:
            req = pb.LeaseRequest(worker_id=self.worker_id, session_id=self.session_id, request_id=request_id)
            self._count(sent=req.ByteSize())
            reply = self._stub.LeaseWork(req, timeout=LEASE_DEADLINE_S, metadata=self._metadata)
            self._count(received=reply.ByteSize())
            return reply

        return self._session_call("LeaseWork", call, patience)

    def leave(self, reason: str, patience: float | None = 5.0) -> None:
        def call() -> None:
            req = pb.LeaveRequest(worker_id=self.worker_id, session_id=self.session_id, reason=reason)
            self._count(sent=req.ByteSize())
            self._stub.Leave(req, timeout=LEAVE_DEADLINE_S, metadata=self._metadata)

        # No rejoin on NOT_FOUND: a coordinator that forgot us has nothing to release.
        try:
            self._retry(call, "Leave", patience)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise

    def get_model(
        self,
        have_version: int,
        expected_bytes: int,
        max_bytes: int,
        force_full: bool = False,
        wait_seconds: float = 0.0,
        patience: float | None = None,
        held_push_ids: tuple[str, ...] = (),
    ) -> ModelReply:
        """GetModel: the header and the whole blob (size and sha256 checked; ValueError if not).
        held_push_ids: our pushes whose payloads we still hold (a relayed update omits them)."""
        deadline = blob_deadline(expected_bytes, wait_seconds)

        def call() -> ModelReply:
            req = pb.ModelRequest(
                worker_id=self.worker_id, session_id=self.session_id, have_version=have_version,
                force_full=force_full, wait_seconds=wait_seconds, held_push_ids=held_push_ids,
            )
            self._count(sent=req.ByteSize())
            stream = self._stub.GetModel(req, timeout=deadline, metadata=self._metadata)
            return self._read_model_stream(stream, max_bytes)

        return self._session_call("GetModel", call, patience)

    def _read_model_stream(self, stream: Iterator[pb.ModelPart], max_bytes: int) -> ModelReply:
        first = next(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise ValueError("GetModel stream did not start with a header")
        self._count(received=first.ByteSize())
        header = first.header
        if header.kind == pb.ModelHeader.UNCHANGED:
            for _ in stream:  # drain (nothing expected)
                pass
            return ModelReply(header, b"")

        def chunks() -> Iterator[bytes]:
            for part in stream:
                if part.WhichOneof("part") != "chunk":
                    raise ValueError("GetModel stream has a second header")
                self._count(received=part.ByteSize())
                yield part.chunk

        blob = collect_blob(chunks(), header.total_bytes, header.sha256, max_bytes)
        return ModelReply(header, blob)

    def push_delta(self, header: pb.DeltaHeader, blob: bytes, patience: float | None = None,
                   session_epoch: int | None = None) -> pb.PushReply:
        """PushDelta: header (ids, size, sha256 filled in here) then the blob in chunks.

        A retry resends the same push_id. ALREADY_EXISTS on a retry means an earlier attempt got
        through (its reply was lost): reported as ACCEPTED with the message set.
        session_epoch: the session the delta was trained in; once the client has joined again
        (a coordinator restart), the push is not sent under the new session: SessionRenewed. (Its
        ranges were dropped with the old session and are leased and trained again; sent anyway,
        they could commit tokens the worker is training a second time.)
        """
        digest = sha256_hex(blob)
        deadline = blob_deadline(len(blob))
        attempts = [0]

        def call() -> pb.PushReply:
            if session_epoch is not None and self.session_epoch != session_epoch:
                raise SessionRenewed(f"push {header.push_id[:8]} was made in session {session_epoch}, "
                                     f"the client is in session {self.session_epoch}: not sent")
            attempts[0] += 1
            head = pb.DeltaHeader()
            head.CopyFrom(header)
            head.worker_id, head.session_id = self.worker_id, self.session_id
            head.total_bytes, head.sha256 = len(blob), digest

            def parts() -> Iterator[pb.DeltaPart]:
                first = pb.DeltaPart(header=head)
                self._count(sent=first.ByteSize())
                yield first
                for chunk in iter_chunks(blob, CHUNK_BYTES):
                    part = pb.DeltaPart(chunk=chunk)
                    self._count(sent=part.ByteSize())
                    yield part

            try:
                reply = self._stub.PushDelta(
                    parts(), timeout=deadline, metadata=self._metadata, compression=grpc.Compression.NoCompression
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS and attempts[0] > 1:
                    return pb.PushReply(result=pb.PushReply.ACCEPTED, message="accepted by an earlier attempt")
                raise
            self._count(received=reply.ByteSize())
            return reply

        return self._session_call("PushDelta", call, patience)

    def get_shard(self, shard: str, expected_bytes: int, dest_write: Callable[[bytes], None],
                  patience: float | None = None) -> tuple[int, str]:
        """Stream shard bytes into `dest_write` (called per chunk, in order). Returns (total bytes,
        sha256 announced by the server). Every attempt first calls `dest_write(None)`: the caller
        truncates its file and starts over (a retry after a broken stream restarts from 0)."""
        deadline = blob_deadline(expected_bytes)

        def call() -> tuple[int, str]:
            req = pb.ShardRequest(worker_id=self.worker_id, session_id=self.session_id, shard=shard)
            self._count(sent=req.ByteSize())
            dest_write(None)  # type: ignore[arg-type]  # start over
            total, digest, got = -1, "", 0
            for part in self._stub.GetShard(req, timeout=deadline, metadata=self._metadata):
                self.data_bytes += part.ByteSize()  # data, kept apart from model traffic
                if total < 0:
                    total, digest = part.total_bytes, part.sha256
                    if total > expected_bytes:
                        raise ValueError(f"shard {shard}: server announces {total} bytes, manifest implies {expected_bytes}")
                if part.offset != got:
                    raise ValueError(f"shard {shard}: chunk at offset {part.offset}, expected {got}")
                got += len(part.data)
                if got > total:
                    raise ValueError(f"shard {shard}: more than the announced {total} bytes")
                dest_write(part.data)
            if got != max(total, 0):
                raise ValueError(f"shard {shard}: truncated stream ({got} of {total} bytes)")
            return got, digest

        return self._session_call("GetShard", call, patience)

    def get_sequences(self, shard: str, epoch: int, first_slot: int, sequences: int, row_bytes: int,
                      patience: float | None = None) -> bytes:
        """`sequences` rows of the shard's visiting order (ShardRequest.sequences): exactly
        sequences x row_bytes bytes, sha256-checked. Retried like every session call; ValueError
        for a stream of the wrong size or digest."""
        import hashlib

        expected = sequences * row_bytes
        deadline = blob_deadline(expected)

        def call() -> bytes:
            req = pb.ShardRequest(worker_id=self.worker_id, session_id=self.session_id, shard=shard, epoch=epoch,
                                  first_slot=first_slot, sequences=sequences)
            self._count(sent=req.ByteSize())
            parts, digest = [], ""
            got = 0
            for part in self._stub.GetShard(req, timeout=deadline, metadata=self._metadata):
                self.data_bytes += part.ByteSize()
                digest = part.sha256
                if part.total_bytes != expected or part.offset != got or got + len(part.data) > expected:
                    raise ValueError(f"shard {shard}: sequence stream of {part.total_bytes} bytes at offset "
                                     f"{part.offset}, expected {expected} bytes at {got}")
                parts.append(part.data)
                got += len(part.data)
            data = b"".join(parts)
            if len(data) != expected or hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"shard {shard}: sequence stream truncated or corrupt ({len(data)} of {expected} bytes)")
            return data

        return self._session_call("GetShard", call, patience)
