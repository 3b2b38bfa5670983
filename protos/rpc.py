"""gRPC plumbing shared by the coordinator, workers and sync-group peers.

Policies stated once here:
- Messages: tensors and shards move as streams of CHUNK_BYTES chunks; MAX_MESSAGE_BYTES (chunk plus
  headroom) bounds every single message on both sides.
- Keepalive: clients ping every KEEPALIVE_MS; servers permit it (otherwise GOAWAY too_many_pings).
- Retries: `retry_call` retries UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED (server busy)
  with exponential backoff and full jitter, then raises the last error. Other codes raise at once.
- Authentication: a bearer token in the `authorization` metadata; `TokenAuthInterceptor` refuses a
  missing or wrong token with UNAUTHENTICATED (health checks are exempt).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import grpc

# 2: relayed updates (UpdateInfo.relayed, ModelHeader.momentum_bytes); 3: count merges
# (UpdateInfo.counted, next_scales; DeltaHeader.own_scales) and combined deltas; 4: count merges
# take the mean of the deltas' own scales (next_scales and own_scales retired); 5: counts of 2
# workers packed at 1 bit (common/counts.py), HeartbeatReply.round_seconds_cap; 6: the outer step
# of a count merge depends on its number of deltas (common/merge.py count_step); 7: majority count
# merges and their vote payloads (CountedMerge.majority, compression.count_rule); 8: majority
# merges take the configured outer step (count_step(majority=True)); HeartbeatReply.round_steps
# (round.many_scale).
PROTOCOL_VERSION = 8
CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = CHUNK_BYTES + (1 << 20)
KEEPALIVE_MS = 20_000

log = logging.getLogger(__name__)
T = TypeVar("T")


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def make_channel(target: str, tls_ca: bytes | None = None) -> grpc.Channel:
    """A channel to HOST:PORT; TLS when `tls_ca` (PEM bytes of the trusted CA) is given."""
    if tls_ca is not None:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca), channel_options())
    return grpc.insecure_channel(target, channel_options())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_chunks(blob: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(blob)
    for offset in range(0, len(blob), chunk_bytes):
        yield bytes(view[offset : offset + chunk_bytes])


def collect_blob(chunks: Iterable[bytes], total_bytes: int, sha256: str, max_bytes: int) -> bytes:
    """Join streamed chunks into one blob, checking the announced size before buffering anything
    and the sha256 at the end. ValueError on any mismatch (truncated, oversized, corrupted)."""
    if total_bytes > max_bytes:
        raise ValueError(f"announced size {total_bytes} bytes exceeds the limit of {max_bytes}")
    buffer = bytearray()
    for chunk in chunks:
        if len(buffer) + len(chunk) > total_bytes:
            raise ValueError(f"stream carries more than the announced {total_bytes} bytes")
        buffer += chunk
    if len(buffer) != total_bytes:
        raise ValueError(f"stream truncated: got {len(buffer)} of {total_bytes} bytes")
    if sha256_hex(bytes(buffer)) != sha256:
        raise ValueError("stream checksum mismatch (sha256)")
    return bytes(buffer)


# --------------------------------------------------------------------------- retries


RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass
class Backoff:
    """Exponential backoff with full jitter: sleep U(0, min(cap, base * 2**attempt))."""

    base: float = 0.5
    cap: float = 10.0
    attempts: int = 8  # tries before giving up; 0 = retry forever

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * (2**attempt)))


def retry_call(
    fn: Callable[[], T],
    what: str,
    backoff: Backoff,
    should_stop: Callable[[], bool] = lambda: False,
    retryable: frozenset = RETRYABLE,
) -> T:
    """Call fn(); retry retryable gRPC errors per `backoff`; raise the last error when tries run out
    or should_stop() turns true."""
    attempt = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            attempt += 1
            if code not in retryable or should_stop() or (backoff.attempts and attempt >= backoff.attempts):
                raise
            delay = backoff.delay(attempt)
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, code.name if code else "?", _details(exc), attempt, delay)
            time.sleep(delay)


def _details(exc: grpc.RpcError) -> str:
    try:
        return exc.details() or ""
    except Exception:  # noqa: BLE001 - some RpcError subclasses have no details()
        return str(exc)


# --------------------------------------------------------------------------- authentication


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuse RPCs without the run token (constant-time compare). Health checks are exempt.
    `on_reject(method)` is called for each refusal (the coordinator counts them in a metric)."""

    EXEMPT_PREFIX = "/grpc.health.v1.Health/"

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None, exempt: Sequence[str] = ()):
        """exempt: further method prefixes that authenticate callers themselves (a worker's Peer
        service checks its sync group's secret, never the run token)."""
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject
        self._exempt = (self.EXEMPT_PREFIX, *exempt)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream_in = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_stream_out = grpc.unary_stream_rpc_method_handler(deny)
        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(method)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return self._deny_bidi
        if handler.request_streaming:
            return self._deny_stream_in
        if handler.response_streaming:
            return self._deny_stream_out
        return self._deny


def read_token(token_file: str | None, env_value: str | None) -> str | None:
    """The run token from --token-file (first line) or the environment; None when neither is set."""
    if token_file:
        try:
            with open(token_file) as fh:
                token = fh.readline().strip()
        except OSError as exc:
            raise ValueError(f"cannot read token file {token_file}: {exc}") from exc
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return env_value or None


STATUS_DEADLINE_SECONDS = 10.0


def fetch_status(target: str, token: str | None = None, tls_ca: bytes | None = None,
                 timeout: float = STATUS_DEADLINE_SECONDS) -> dict[str, Any]:
    """The coordinator's status dict (the Status RPC's status_json). grpc.RpcError on failure."""
    import json

    from geotrain.protos import geotrain_pb2 as pb
    from geotrain.protos import geotrain_pb2_grpc as pb_grpc

    with make_channel(target, tls_ca) as channel:
        reply = pb_grpc.CoordinatorStub(channel).Status(
            pb.StatusRequest(), timeout=timeout, metadata=auth_metadata(token)
        )
    return json.loads(reply.status_json)
