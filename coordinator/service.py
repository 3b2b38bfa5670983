"""gRPC adapter for the Coordinator service: decode the request, call CoordinatorState, encode.

No training, merge or ledger logic lives here. CoordinatorError subclasses become the status code
they name; ValueError from decoding becomes INVALID_ARGUMENT. Every error is counted in
geotrain_rpc_errors_total{method,code}.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Callable, Iterator

import grpc

from geotrain.protos.rpc import CHUNK_BYTES, collect_blob
from geotrain.coordinator.ledger import TrainedRange
from geotrain.coordinator.state import CoordinatorError, CoordinatorState, InvalidArgument
from geotrain.protos import geotrain_pb2 as pb
from geotrain.protos import geotrain_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STAT_FIELDS = [f.name for f in pb.WorkerStats.DESCRIPTOR.fields]
_INT_FIELDS = {f.name for f in pb.WorkerStats.DESCRIPTOR.fields if f.cpp_type in (f.CPPTYPE_UINT64, f.CPPTYPE_UINT32)}


def stats_message(stats: dict[str, float]) -> pb.WorkerStats:
    return pb.WorkerStats(**{k: (int(v) if k in _INT_FIELDS else v) for k, v in stats.items() if k in STAT_FIELDS})


def _rpc(method: Callable) -> Callable:
    """Map state errors to gRPC statuses and count them."""

    @functools.wraps(method)
    def wrapper(self: "CoordinatorServicer", request, context):
        try:
            result = method(self, request, context)
            if hasattr(result, "__next__"):  # server-streaming: errors surface while iterating
                return self._guard_stream(method.__name__, result, context)
            return result
        except CoordinatorError as exc:
            self._abort(context, method.__name__, exc.status, str(exc))
        except ValueError as exc:
            self._abort(context, method.__name__, "INVALID_ARGUMENT", str(exc))

    return wrapper


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, state: CoordinatorState):
        self.state = state

    # ------------------------------------------------------------------ plumbing

    def _abort(self, context, method: str, code: str, message: str) -> None:
        if self.state.metrics is not None:
            self.state.metrics.rpc_errors.labels(method, code).inc()
        if code not in ("NOT_FOUND",):
            log.info("%s -> %s: %s", method, code, message)
        context.abort(getattr(grpc.StatusCode, code), message)

    def _guard_stream(self, method: str, gen: Iterator, context) -> Iterator:
        try:
            yield from gen
        except CoordinatorError as exc:
            self._abort(context, method, exc.status, str(exc))

    # ------------------------------------------------------------------ membership

    @_rpc
    def Join(self, request, context):
        record, spec = self.state.join(
            name=request.name,
            device=request.device,
            memory_bytes=request.memory_bytes,
            software_version=request.software_version,
            protocol_version=request.protocol_version,
            fingerprint=request.config_fingerprint,
            advertise=f"{request.advertise_host}:{request.advertise_port}" if request.advertise_host else "",
            sync_group=request.sync_group,
            previous_worker_id=request.previous_worker_id,
        )
        cfg = self.state.run.workers
        return pb.JoinReply(
            worker_id=record.worker_id,
            session_id=record.session_id,
            run_id=self.state.run_id,
            run_spec_json=spec,
            model_version=self.state.version,
            lease_seconds=cfg.lease_seconds,
            heartbeat_seconds=cfg.heartbeat_seconds,
            protocol_version=request.protocol_version,
        )

    @_rpc
    def Heartbeat(self, request, context):
        stats = {name: float(getattr(request.stats, name)) for name in STAT_FIELDS}
        for name, value in stats.items():
            if not math.isfinite(value):
                raise InvalidArgument(f"stat {name} is not finite")
        action, version = self.state.heartbeat(request.worker_id, request.session_id, stats)
        if request.HasField("group_failure"):
            f = request.group_failure
            self.state.report_group_failure(request.worker_id, request.session_id, f.group_id, f.epoch, list(f.survivor_ranks))
        group = self.state.group_assignment(request.worker_id, request.active_group_id)
        return pb.HeartbeatReply(
            action=pb.HeartbeatReply.Action.Value(action),
            model_version=version,
            lease_seconds=self.state.run.workers.lease_seconds,
            round_seconds_cap=self.state.round_seconds_cap(),
            round_steps=self.state.round_steps(),
            group=pb.GroupAssignment(
                group_id=group.group_id, epoch=group.epoch, rank=group.rank, world_size=group.world_size, peers=list(group.peers),
                peer_secret=group.secret,
            ) if group is not None else None,
        )

    @_rpc
    def Leave(self, request, context):
        self.state.leave(request.worker_id, request.session_id, request.reason)
        return pb.LeaveReply()

    @_rpc
    def LeaseWork(self, request, context):
        exhausted, r = self.state.lease(request.worker_id, request.session_id, request.request_id)
        if r is None:
            return pb.LeaseReply(exhausted=exhausted)
        unit = self.state.ledger.units[r.unit_id]
        return pb.LeaseReply(
            range=pb.TokenRange(unit_id=r.unit_id, shard=unit.shard, start=r.start, end=r.end, epoch=r.epoch)
        )

    # ------------------------------------------------------------------ model and data

    @_rpc
    def GetModel(self, request, context):
        self.state.check_session(request.worker_id, request.session_id)  # before waiting
        reply = self.state.model_reply(
            request.have_version, request.force_full, request.wait_seconds, request.worker_id,
            held_push_ids=frozenset(request.held_push_ids),
        )
        # (an UPDATES reply may be empty: a relayed merge of the caller's own push alone)
        sha = "" if reply.kind == "UNCHANGED" else reply.sha256
        header = pb.ModelHeader(
            kind=pb.ModelHeader.Kind.Value(reply.kind),
            version=reply.version,
            total_bytes=reply.total_bytes,
            sha256=sha,
            params_sha256=reply.params_sha256,
            updates=[_update_info(u) for u in reply.updates],
            merged_push_ids=reply.merged_push_ids,
            momentum_bytes=reply.momentum_bytes,
        )
        return self._stream_model(header, reply)

    def _stream_model(self, header, reply) -> Iterator:
        """The header, then the reply's bytes in CHUNK_BYTES chunks (a FULL reply read from its
        file a chunk at a time)."""
        try:
            yield pb.ModelPart(header=header)
            for chunk in reply.chunks(CHUNK_BYTES):
                self.state.count_traffic(sent=len(chunk))
                yield pb.ModelPart(chunk=chunk)
        finally:
            reply.close()

    @_rpc
    def GetShard(self, request, context):
        if request.sequences:
            data, sha = self.state.shard_sequences(request.worker_id, request.session_id, request.shard,
                                                   request.epoch, request.first_slot, request.sequences)
            return self._stream_bytes(data, sha)
        path, sha = self.state.shard_path(request.worker_id, request.session_id, request.shard)
        return self._stream_file(path, sha)

    def _stream_bytes(self, data: bytes, sha: str) -> Iterator:
        for offset in range(0, len(data), CHUNK_BYTES):
            part = data[offset : offset + CHUNK_BYTES]
            self.state.count_traffic(sent=len(part))
            yield pb.DataChunk(data=part, offset=offset, total_bytes=len(data), sha256=sha)

    def _stream_file(self, path: Path, sha: str) -> Iterator:
        total = path.stat().st_size
        with open(path, "rb") as fh:
            offset = 0
            while True:
                data = fh.read(CHUNK_BYTES)
                if not data:
                    break
                self.state.count_traffic(sent=len(data))
                yield pb.DataChunk(data=data, offset=offset, total_bytes=total, sha256=sha)
                offset += len(data)

    @_rpc
    def PushDelta(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("a delta stream must start with its header")
        h = first.header
        chunks = (part.chunk for part in request_iterator if part.WhichOneof("part") == "chunk")
        try:
            blob = collect_blob(chunks, h.total_bytes, h.sha256, self.state.max_blob_bytes())
        except ValueError as exc:
            self.state._count_delta("invalid")
            raise InvalidArgument(f"delta stream refused: {exc}") from exc
        except grpc.RpcError:  # the client went away mid-stream: nothing to answer, nothing changed
            self.state._count_delta("invalid")
            if self.state.metrics is not None:
                self.state.metrics.rpc_errors.labels("PushDelta", "CANCELLED").inc()
            log.info("PushDelta -> CANCELLED: delta stream refused: the client cut it (push %s of worker %s)",
                     h.push_id, h.worker_id)
            raise
        self.state.count_traffic(received=len(blob))
        ranges = [TrainedRange(r.unit_id, r.start, r.end, r.epoch) for r in h.ranges]
        if not math.isfinite(h.mean_loss):
            raise InvalidArgument("mean_loss is not finite")
        outcome = self.state.push(
            h.worker_id, h.session_id, h.push_id, h.base_version, h.tokens, h.steps, h.mean_loss, ranges, blob,
        )
        return pb.PushReply(
            result=pb.PushReply.Result.ACCEPTED if outcome.accepted else pb.PushReply.Result.STALE,
            model_version=outcome.version,
            staleness=max(0, outcome.staleness),
            message=outcome.message,
        )

    # ------------------------------------------------------------------ status

    @_rpc
    def Status(self, request, context):
        import json

        status = self.state.status()
        return pb.StatusReply(
            run_id=status["run_id"],
            model_version=status["model_version"],
            tokens=status["tokens"],
            val_loss=status["val_loss"],
            train_loss=status["train_loss"],
            workers=[
                pb.WorkerStatus(
                    worker_id=w["worker_id"], name=w["name"], device=w["device"],
                    stats=stats_message(w["stats"]),
                    merged_tokens=w["merged_tokens"], pushes=w["pushes"], last_seen_seconds=w["last_seen_seconds"],
                )
                for w in status["worker_list"]
            ],
            sent_bytes=status["coordinator_sent_bytes"],
            received_bytes=status["coordinator_received_bytes"],
            state=status["state"],
            seconds=status["seconds"],
            status_json=json.dumps(status),
        )


def _update_info(u) -> pb.UpdateInfo:
    """coordinator/records.py UpdateSlice -> UpdateInfo (relayed deltas with their placement)."""
    r = u.record
    info = pb.UpdateInfo(
        version=r.version, offset=u.offset, size=u.size, merged_push_ids=r.merged_push_ids,
        params_sha256=r.params_sha256, outer_fraction=r.outer_fraction,
        relayed=[
            pb.RelayedDelta(push_id=d.push_id, offset=offset, size=size, weight=d.weight, factor=d.factor)
            for d, (offset, size) in zip(r.relayed, u.parts)
        ],
    )
    if r.counted is not None:
        c = r.counted
        info.counted.CopyFrom(pb.CountedMerge(
            push_ids=c.push_ids, reference_push_id=u.reference, deltas=len(c.push_ids), weight=c.weight,
            scales=c.scales, offset=u.offset, size=u.size, majority=c.majority,
        ))
    return info
